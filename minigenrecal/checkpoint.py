"""What keeps a run alive: atomic, exactly resumable checkpoints for `train_stage`, the data-loader position, the
non-finite-step guard, and the fault hooks the resume tests use.

A checkpoint is one directory `stage{S}-step{K:07d}` under a run's checkpoint directory:
- accelerate's `save_state`: the trained module (student + Recalibrator; the frozen teacher head is left out), the
  AdamW moments, the LR scheduler, every RNG (python, numpy, torch, CUDA) of every process, accelerate's step counter;
  in stage 3 the Recalibrator (no longer in the trained module) rides along as a registered object;
- `state.json`: stage, step, the data-loader position, the loss histories so far, the stage's config.

It is written under a temporary name, fsynced and renamed; only then is the previous checkpoint removed. A crash
while writing leaves a `.tmp-*` directory that is never read (and is cleared on resume) beside the previous,
complete checkpoint.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

FAULT_ENV = "MINIGENRECAL_FAULT"  # fault injection for the resume tests: "kill step S K" or "kill checkpoint N"
STATE_FILE = "state.json"
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


class Batches:
    """Endless batches from a loader. Its position (the sampler generator's state when the current epoch began, and
    the batches drawn since) is enough to rebuild the same iterator and continue from the same batch."""

    def __init__(self, loader, generator: torch.Generator):
        self.loader, self.g = loader, generator
        self._start()

    def _start(self):
        self.epoch_state, self.drawn = self.g.get_state(), 0
        self.it = iter(self.loader)

    def __next__(self):
        try:
            batch = next(self.it)
        except StopIteration:
            self._start()
            batch = next(self.it)
        self.drawn += 1
        return batch

    def state_dict(self) -> dict:
        return {"generator": base64.b64encode(self.epoch_state.numpy().tobytes()).decode(), "drawn": self.drawn}

    def load_state_dict(self, sd: dict) -> None:
        state = torch.frombuffer(bytearray(base64.b64decode(sd["generator"])), dtype=torch.uint8)
        self.g.set_state(state)
        self._start()
        for _ in range(sd["drawn"]):  # collate only: the teacher and the losses do not run for skipped batches
            next(self)


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


def all_finite(acc, finite: torch.Tensor, module: torch.nn.Module) -> bool:
    """Were the losses finite (`finite`), and is the (synchronized) gradient? One verdict on every process."""
    ok = finite.to(acc.device)
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if grads:
        norm = torch.nn.utils.get_total_norm(grads)
        ok = ok & torch.isfinite(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    if acc.num_processes > 1:
        ok = acc.reduce((~ok).float(), "sum") == 0
    return bool(ok)


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


@contextmanager
def _registered(acc, module, opt, sched, extra: list):
    """Show accelerate only this run's objects while saving or loading.

    The one Accelerator of a process keeps every object ever prepared (a notebook builds one engine per stage);
    `save_state` / `load_state` would write and read them all, so the lists are swapped for this stage's.
    The teacher head is not a submodule of the module (stages.GenRecal), so it is never saved.
    """
    names = ("_models", "_optimizers", "_schedulers", "_dataloaders", "_custom_objects")
    saved = [getattr(acc, n) for n in names]
    for n, v in zip(names, ([module], [opt], [sched], [], list(extra))):
        setattr(acc, n, v)
    try:
        yield
    finally:
        for n, v in zip(names, saved):
            setattr(acc, n, v)


def resolve_root(path: str | Path) -> Path:
    """`--resume DIR` accepts a run's output directory (with checkpoints/ inside) or the checkpoint directory."""
    path = Path(path)
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def with_saved_tokenizer(view, ckpt: "Checkpointer"):
    """The student view, with the tokenizer saved in `ckpt`'s resume point when the live one differs from it.

    Needed for the tiny student: its Unigram tokenizer is retrained in every process and the trainer is not
    deterministic across processes, so a resumed process would otherwise encode the data differently.
    """
    from .vlm import VLMView
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


class Checkpointer:
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
    def done(self, stage: int) -> bool:
        """True when the resume point lies in a later stage: `stage` is finished and its history is stored."""
        return self.state is not None and self.state["stage"] > stage

    def history(self, stage: int) -> list[dict]:
        return self.histories.get(stage, [])

    def saved_tokenizer(self):
        """The student's tokenizer as saved with the resume point (None when not resuming)."""
        from transformers import AutoTokenizer
        return None if self.point is None else AutoTokenizer.from_pretrained(self.point / TOKENIZER_DIR)

    def resume(self, acc, stage: int, cfg_dict: dict, module, opt, sched, batches: Batches, extra_objects: list,
               tokenizer) -> tuple[list[dict], int, int]:
        """Load the resume point if it lies in `stage`: returns (history so far, step, skips in a row)."""
        if self.state is None or self.state["stage"] != stage:
            self.histories[stage] = []
            return self.histories[stage], 0, 0
        if self.state["student_tokenizer"] != tokenizer_digest(tokenizer):
            raise ValueError(f"the student's tokenizer is not the one {self.point} was trained with; load that one "
                             f"(Checkpointer.saved_tokenizer(), {self.point / TOKENIZER_DIR}) before encoding the data")
        saved = self.state["config"]
        diff = sorted(k for k in set(saved) | set(cfg_dict) if saved.get(k) != cfg_dict.get(k))
        if diff:
            raise ValueError(f"{self.point} was written with another stage-{stage} config: "
                             + ", ".join(f"{k}: {saved.get(k)!r} != {cfg_dict.get(k)!r}" for k in diff))
        if self.state.get("threads", torch.get_num_threads()) != torch.get_num_threads():
            warnings.warn(f"{self.point} was written on {self.state['threads']} CPU threads, this process has "
                          f"{torch.get_num_threads()}: the continuation will not be bit-identical")
        with _registered(acc, module, opt, sched, extra_objects):
            acc.load_state(str(self.point))
        pending = self.point / f"pending_grads_{acc.process_index}.pt"
        if pending.exists():  # gradients accumulated since the last optimizer step (see save)
            grads = torch.load(pending, map_location="cpu")
            for n, p in acc.unwrap_model(module).named_parameters():
                if n in grads:
                    p.grad = grads[n].to(p.device)
        batches.load_state_dict(self.state["data"])
        self._loaded = (stage, self.state["step"])
        self.histories[stage] = self.state["history"]
        return self.histories[stage], self.state["step"], self.state["skips_in_row"]

    # -- saving ------------------------------------------------------------------------------------------
    def due(self, step: int, steps: int) -> bool:
        return step == steps or (self.every > 0 and step % self.every == 0)

    def save(self, acc, stage: int, cfg_dict: dict, module, opt, sched, batches: Batches, extra_objects: list,
             tokenizer, *, step: int, skips_in_row: int) -> Path | None:
        """Write the checkpoint of (stage, step) atomically; then remove the previous one."""
        if getattr(self, "_loaded", None) == (stage, step):
            return None  # just loaded from exactly this state
        name = f"stage{stage}-step{step:07d}"
        final, tmp = self.root / name, self.root / f".tmp-{name}"
        if acc.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        with _registered(acc, module, opt, sched, extra_objects):
            acc.save_state(str(tmp))
        # If a step's last micro-batch was not an optimizer step (accelerate can sync early, e.g. at an epoch's end),
        # gradients are pending and the next step adds to them. Each process keeps its own.
        grads = {n: p.grad.detach().cpu() for n, p in acc.unwrap_model(module).named_parameters() if p.grad is not None}
        if grads:
            torch.save(grads, tmp / f"pending_grads_{acc.process_index}.pt")
        self.writes += 1
        fault("checkpoint", self.writes)  # tests kill the process here: mid-write, before the rename
        if acc.is_main_process:
            tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
            state = {"stage": stage, "step": step, "skips_in_row": skips_in_row, "data": batches.state_dict(),
                     "config": cfg_dict, "student_tokenizer": tokenizer_digest(tokenizer),
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
