"""What keeps a run alive: atomic, exactly resumable checkpoints, plugged into `train_stage` as a callback, and the
fault hooks the resume tests use.

A checkpoint is one directory `stage{S}-step{K:07d}` under a run's checkpoint directory, written from state dicts:
- `module.pt`: the trained module's state dict (student + Recalibrator; the frozen teacher head is not in it);
- `optimizer.pt`, `scheduler.pt`: AdamW's state dict (moments, groups, lrs) and the LR schedule's;
- under FSDP2 and ZeRO-3, `shards/` instead of `module.pt` and `optimizer.pt`: each rank writes its own shard of
  the module and of AdamW's state, as the backend's own checkpointing does (`backends.*.save_shards`);
- `riders.pt`: modules saved beside the trained one (in stage 3 the Recalibrator, no longer in the trained module);
- `rng_{P}.pt` per process P: python, numpy, torch and CUDA RNG states, the accumulation counter, and the
  position of P's own share of a lazily read data set (a stream's records read, its bad samples so far);
- `state.json`: stage, step, the data-loader position, the loss histories so far, the stage's config.

It is written under a temporary name, fsynced and renamed; only then is the previous checkpoint removed. Every
process writes its part, then all wait, and only then does process 0 write `state.json` (what makes it complete)
and rename it. A crash while writing leaves a `.tmp-*` directory that is never read (and is cleared on resume)
beside the previous, complete checkpoint.

Resuming jumps to the data position instead of drawing the batches again: a map-style loader skips the drawn
batches' indices in its batch sampler (accelerate's `skip_first_batches`), a stream read through `StreamPosition`
skips the records already read without decoding them. Nothing before the resume point is rendered.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
import signal
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from accelerate.data_loader import skip_first_batches
from transformers import AutoTokenizer

from minigenrecal.data.feed import WorkerFed, shuffled
from minigenrecal.loop import Batches, Callback, LoopState, on_device
from minigenrecal.models.vlm import VLMView

FAULT_ENV = "MINIGENRECAL_FAULT"  # fault injection for the resume tests: "kill step S K" or "kill checkpoint N"
STATE_FILE = "state.json"
SHARDS = "shards"  # the sharded backends' own checkpoint, inside ours
TOKENIZER_DIR = "student_tokenizer"  # the tokenizer the student trained with (the tiny one is retrained per process)


def tokenizer_digest(tok) -> str:
    """A fingerprint of a tokenizer: its full serialization (vocabulary, merges or scores, normalizer)."""
    backend = getattr(tok, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fault(point: str, *where: int) -> None:
    """Kill (SIGKILL, no cleanup) or raise here when MINIGENRECAL_FAULT names this point, e.g. 'kill step 2 3'."""
    spec = os.environ.get(FAULT_ENV, "").split()
    if spec[1:] != [point, *map(str, where)]:
        return
    if spec[0] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"{FAULT_ENV}: injected fault at {' '.join(spec[1:])}")


def complete_checkpoints(root: str | Path) -> list[Path]:
    """The complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("stage") and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: tuple(int(x) for x in p.name[5:].split("-step")))


def latest_checkpoint(root: str | Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            _fsync(Path(dirpath) / f)
        _fsync(Path(dirpath))


def rng_state() -> dict:
    """This process's RNG states: python, numpy, torch (CPU) and every CUDA device."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if st["cuda"]:
        torch.cuda.set_rng_state_all(st["cuda"])


def resolve_root(path: str | Path) -> Path:
    """`--resume_from_checkpoint DIR` accepts a run's output directory (with checkpoints/ inside) or the checkpoint directory."""
    path = Path(path)
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def with_saved_tokenizer(view, ckpt: "Checkpointer"):
    """The student view, with the tokenizer saved in `ckpt`'s resume point when the live one differs from it.

    Needed for the tiny student: its Unigram tokenizer is retrained in every process and the trainer is not
    deterministic across processes, so a resumed process would otherwise encode the data differently.
    """
    saved = ckpt.saved_tokenizer()
    if saved is None or tokenizer_digest(saved) == tokenizer_digest(view.tokenizer):
        return view
    if len(saved) != view.model.get_input_embeddings().weight.shape[0]:
        raise ValueError(f"the tokenizer saved in {ckpt.point} has {len(saved)} tokens, the student's embedding "
                         f"{view.model.get_input_embeddings().weight.shape[0]} rows")
    proc = view.processor
    if hasattr(proc, "tokenizer"):
        proc.tokenizer = saved
    else:
        proc = saved
    return VLMView(view.model, proc, view.max_length, name=view.name)



class StreamPosition:
    """A stream's records, counting those this pass has read (`read`), so that a resume can skip that many without
    decoding their images (`skip`, taken by the next pass). Wrap the records a `StreamPairData` reads. With a
    `shuffle_buffer`, a pass reads them through it (data/feed.py), seeded by `seed` (the data sets it each pass);
    a resume then reads the pass's records again, undecoded, up to its position."""

    def __init__(self, records, shuffle_buffer: int = 0):
        self.records, self.read, self.skip, self.shuffle_buffer, self.seed = records, 0, 0, shuffle_buffer, 0

    def __iter__(self):
        skip, self.skip, self.read = self.skip, 0, 0
        for record in shuffled(self.records, self.shuffle_buffer, self.seed):  # decoded later, not here
            self.read += 1
            if self.read > skip:
                yield record


def _positioned(data) -> bool:
    """Can this stream jump to a saved position? One sample per record: a batch then ends between records."""
    return isinstance(getattr(data, "records", None), StreamPosition) and getattr(data, "multi_turn", "") == "reject"


def batches_state(b: Batches) -> dict:
    """Where the loop is in its data: the sampler generator's state when the epoch began, and the batches drawn."""
    return {"generator": base64.b64encode(b.epoch_state.numpy().tobytes()).decode(), "drawn": b.drawn}


def data_position(data) -> dict:
    """This process's own part of the data position: a positioned stream's records read and samples yielded, and
    the bad samples a lazily read data set has met so far (its skip report)."""
    pos = {"skipped": list(data.skipped)} if hasattr(data, "skipped") and hasattr(data, "log") else {}
    if _positioned(data) and data.buckets > 1:  # the window it is in: rendered again, its yielded samples skipped
        pos.update(records=data.mark[0], count=data.mark[1], replay=data.count - data.mark[1])
    elif _positioned(data):
        pos.update(records=data.done, count=data.count)
    return pos


def restore_batches(b: Batches, sd: dict, position: dict | None = None) -> None:
    """Rebuild the same epoch's iterator positioned after `drawn` batches, so the next batch is the one the saved run
    would have drawn; no skipped sample is fetched or rendered. A map-style loader skips the drawn batches' indices
    (its sampler still draws the epoch's permutation from the same generator state); a positioned stream skips the
    records read. Any other stream draws its batches again (collate only: the teacher and the losses do not run)."""
    b.g.set_state(torch.frombuffer(bytearray(base64.b64decode(sd["generator"])), dtype=torch.uint8))
    b.restart()
    position = position or {}
    data = b.loader.dataset if hasattr(b.loader, "dataset") else b.loader.loader.dataset  # or loop.on_device's
    if hasattr(data, "log") and "skipped" in position:  # the skip report of the part not read again
        data.skipped[:] = position["skipped"]
        data.log.seen = {x["id"] for x in position["skipped"]}
    if isinstance(data, torch.utils.data.IterableDataset):
        if _positioned(data) and "records" in position:
            data.records.skip, data.count, data.drop = position["records"], position["count"], position.get("replay", 0)
            # the stream's iterator is made now, before the RNG is restored: it draws its base seed from the global
            # RNG, which the saved run did at the epoch's start, not at the resume point
            b.it = iter(on_device(iter(b.loader.loader), b.loader.device))
        else:
            for _ in range(sd["drawn"]):
                next(b)
    elif isinstance(b.loader, WorkerFed):  # rendered by DataLoader workers
        b.it = iter(WorkerFed(skip_first_batches(b.loader.loader, sd["drawn"]), data, b.loader.device))
    elif hasattr(b.loader, "loader"):  # loop.on_device around a torch DataLoader
        b.it = iter(on_device(skip_first_batches(b.loader.loader, sd["drawn"]), b.loader.device))
    else:
        b.it = iter(skip_first_batches(b.loader, sd["drawn"]))
    b.drawn = sd["drawn"]


class Checkpointer(Callback):
    """Where a run checkpoints (`root`), how often (`every` optimizer steps; 0: only at each stage's end), and
    what it resumes from (`resume=True`: the latest complete checkpoint under `root`, which must exist).

    `histories` holds every stage's history (train_stage fills it); `extra` is free JSON that a driver wants back
    on resume (the demo keeps its per-stage accuracies there). Both are written into every checkpoint.
    """

    def __init__(self, root: str | Path, every: int = 0, resume: bool = False):
        self.root, self.every, self.writes = Path(root), every, 0
        self.histories: dict[int, list[dict]] = {}
        self.extra: dict = {}
        self.point, self.state = None, None
        if resume:
            self.point = latest_checkpoint(self.root)
            if self.point is None:
                raise FileNotFoundError(f"no complete checkpoint under {self.root} to resume from")
            self.state = json.loads((self.point / STATE_FILE).read_text())
            self.histories = {int(k): v for k, v in self.state["histories"].items()}
            self.extra = self.state["extra"]
            for tmp in self.root.glob(".tmp-*"):  # a write that a crash interrupted
                shutil.rmtree(tmp, ignore_errors=True)

    # -- resuming ----------------------------------------------------------------------------------------
    def done(self, stage: int) -> list[dict] | None:
        """`stage`'s stored history when the resume point lies in a later stage (it is not rerun), else None."""
        return self.histories.get(stage, []) if self.state is not None and self.state["stage"] > stage else None

    def saved_tokenizer(self):
        """The student's tokenizer as saved with the resume point (None when not resuming)."""
        return None if self.point is None else AutoTokenizer.from_pretrained(self.point / TOKENIZER_DIR)

    def on_stage_begin(self, st: LoopState) -> None:
        """Load the resume point if it lies in this stage: the module, optimizer, schedule, RNG, data position and
        history, so the stage continues exactly as if it had never stopped."""
        stage = st.stage
        if self.state is None or self.state["stage"] != stage:
            self.histories[stage] = st.history
            return
        if self.state["student_tokenizer"] != tokenizer_digest(st.tokenizer):
            raise ValueError(f"the student's tokenizer is not the one {self.point} was trained with; load that one "
                             f"(Checkpointer.saved_tokenizer(), {self.point / TOKENIZER_DIR}) before encoding the data")
        saved, cfg_dict = self.state["config"], asdict(st.cfg)
        diff = sorted(k for k in set(saved) | set(cfg_dict) if saved.get(k) != cfg_dict.get(k))
        if diff:
            raise ValueError(f"{self.point} was written with another stage-{stage} config: "
                             + ", ".join(f"{k}: {saved.get(k)!r} != {cfg_dict.get(k)!r}" for k in diff))
        if self.state.get("threads", torch.get_num_threads()) != torch.get_num_threads():
            warnings.warn(f"{self.point} was written on {self.state['threads']} CPU threads, this process has "
                          f"{torch.get_num_threads()}: the continuation will not be bit-identical")
        e, acc = st.engine, st.engine.acc
        load = lambda name: torch.load(self.point / name, map_location="cpu", weights_only=False)  # noqa: E731
        shards = getattr(e.backend, "load_shards", None)
        if shards is not None:  # FSDP2 / ZeRO-3: every rank loads its own shards (a collective)
            shards(e.module, e.inner, self.point / SHARDS)
        else:
            acc.unwrap_model(e.module).load_state_dict(load("module.pt"))
            e.inner.load_state_dict(load("optimizer.pt"))
        e.sched.load_state_dict(load("scheduler.pt"))
        for rider, sd in zip(st.riders, load("riders.pt")):
            rider.load_state_dict(sd)
        rng = load(f"rng_{acc.process_index}.pt")
        restore_batches(st.batches, self.state["data"], rng.get("data"))
        set_rng_state(rng)  # after the data: rebuilding a stream's iterator draws from the global RNG
        if hasattr(acc, "step"):
            acc.step = rng["accumulation_step"]
        pending = self.point / f"pending_grads_{acc.process_index}.pt"
        if pending.exists():  # gradients accumulated since the last optimizer step (see save)
            grads = torch.load(pending, map_location="cpu")
            for n, p in acc.unwrap_model(e.module).named_parameters():
                if n in grads:
                    p.grad = grads[n].to(p.device)
        self._loaded = (stage, self.state["step"])
        st.history[:] = self.state["history"]
        self.histories[stage] = st.history
        st.step, st.in_row = self.state["step"], self.state["skips_in_row"]

    def on_step_end(self, st: LoopState) -> None:
        if self.due(st.step, st.cfg.steps):
            self.save(st)
        fault("step", st.stage, st.step)  # the resume tests kill the process here

    # -- saving ------------------------------------------------------------------------------------------
    def due(self, step: int, steps: int) -> bool:
        return step == steps or (self.every > 0 and step % self.every == 0)

    def save(self, st: LoopState) -> Path | None:
        """Write the checkpoint of (stage, step) atomically; then remove the previous one."""
        stage, step, e = st.stage, st.step, st.engine
        acc, module = e.acc, e.module
        if getattr(self, "_loaded", None) == (stage, step):
            return None  # just loaded from exactly this state
        name = f"stage{stage}-step{step:07d}"
        final, tmp = self.root / name, self.root / f".tmp-{name}"
        if acc.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        shards = getattr(e.backend, "save_shards", None)
        if shards is not None:  # FSDP2 / ZeRO-3: every rank writes its own shards (a collective)
            shards(module, e.inner, tmp / SHARDS)
        if acc.is_main_process:
            if shards is None:
                torch.save(acc.unwrap_model(module).state_dict(), tmp / "module.pt")
                torch.save(e.inner.state_dict(), tmp / "optimizer.pt")
            torch.save(e.sched.state_dict(), tmp / "scheduler.pt")
            torch.save([r.state_dict() for r in st.riders], tmp / "riders.pt")
        torch.save({**rng_state(), "accumulation_step": getattr(acc, "step", 0), "data": data_position(st.data)},
                   tmp / f"rng_{acc.process_index}.pt")
        # If a step's last micro-batch was not an optimizer step (accelerate can sync early, e.g. at an epoch's end),
        # gradients are pending and the next step adds to them. Each process keeps its own.
        grads = {n: p.grad.detach().cpu() for n, p in acc.unwrap_model(module).named_parameters() if p.grad is not None}
        if grads:
            torch.save(grads, tmp / f"pending_grads_{acc.process_index}.pt")
        self.writes += 1
        fault("checkpoint", self.writes)  # tests kill the process here: mid-write, before the rename
        acc.wait_for_everyone()  # complete only when every process has written its part
        if acc.is_main_process:
            st.tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
            state = {"stage": stage, "step": step, "skips_in_row": st.in_row, "data": batches_state(st.batches),
                     "config": asdict(st.cfg), "student_tokenizer": tokenizer_digest(st.tokenizer),
                     "threads": torch.get_num_threads(), "history": self.histories[stage],
                     "histories": {k: v for k, v in self.histories.items() if k < stage}, "extra": self.extra}
            (tmp / STATE_FILE).write_text(json.dumps(state) + "\n")
            _fsync_tree(tmp)
            if final.exists():  # the same state, written before: keep it
                shutil.rmtree(tmp)
            else:
                os.rename(tmp, final)
                _fsync(self.root)
            for old in complete_checkpoints(self.root):
                if old != final:
                    shutil.rmtree(old)
        acc.wait_for_everyone()
        return final
