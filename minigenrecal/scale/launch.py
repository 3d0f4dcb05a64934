"""`python -m minigenrecal train`: stages 1-3 for a preset, launchable by `accelerate launch`.

    accelerate launch --config_file configs/single_gpu.yaml -m minigenrecal train --preset "smolvlm-256m<-qwen2-vl-2b" --data train.json
    accelerate launch --config_file configs/zero3.yaml -m minigenrecal train --preset "internvl2.5-8b<-internvl2.5-78b" --cache CACHE --data train.json
    accelerate launch --multi_gpu --num_processes 2 -m minigenrecal train --preset tiny --tiny-random --max_steps 1   # CPU, gloo

Pair: the preset's hub ids; `--tiny-random` builds the preset's model classes at tiny size instead (offline smoke
runs of a launch config). Data: the synthetic train split, or `--data` LLaVA conversation JSON/JSONL. `--cache DIR`
(from `cache-teacher` over the same samples) trains stages 1-2 without the teacher body: only its head is loaded.

A sample that cannot be read or rendered is skipped and recorded (id and reason) in OUT/skipped.jsonl, and the
count is printed; `--strict` fails on the first one instead.

Checkpoints go to OUT/checkpoints every `--save_steps` optimizer steps and at each stage's end, under every backend
(under FSDP2 and ZeRO-3 each rank writes its own shards); `--resume_from_checkpoint OUT` continues the run from the
latest complete one, mid-stage, with the same numbers as an uninterrupted run, without rendering again the samples
drawn before it. OUT/manifest.json and OUT/train_log.json record what produced the run; `--report_to`
sends the loss terms, LR and skipped steps to accelerate's trackers (scale/tracking.py). OUT is `--output_dir`.
"""
from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from minigenrecal.chunked import fused_head_loss
from minigenrecal.data.llava import SampleError, read_llava_json
from minigenrecal.data.pairs import encode_pairs, write_skip_report
from minigenrecal.data.sources import LazyPairData, StreamPairData, open_source
from minigenrecal.data.synthetic import make_split
from minigenrecal.loop import Callback, Engine, LoopState, run_stages
from minigenrecal.models.loading import student_loader, teacher_loader
from minigenrecal.models.presets import get_preset
from minigenrecal.recalibrator import Recalibrator
from minigenrecal.scale.backends import end_launch, gathered, get_backend
from minigenrecal.scale.cache import TeacherCache
from minigenrecal.scale.checkpoint import Checkpointer, StreamPosition, resolve_root, with_saved_tokenizer
from minigenrecal.scale.manifest import run_manifest, write_manifest
from minigenrecal.scale.model_card import write_model_card
from minigenrecal.scale.tracking import StepTimer, Tracking


def local_bytes(model: torch.nn.Module) -> int:
    """Parameter bytes this rank holds: a DTensor's local shard, a ZeRO-3 partition, or the whole tensor."""
    total = 0
    for p in model.parameters():
        t = p.ds_tensor if hasattr(p, "ds_tensor") else (p.to_local() if hasattr(p, "to_local") else p)
        total += t.numel() * t.element_size()
    return total


def save_outputs(backend, module, student, recal, out: Path, main: bool) -> dict[str, torch.Tensor]:
    """Gather the whole module (a collective: every rank calls this) and, on the main rank, write
    OUT/student (weights, config, processor: loads with the Auto classes) and OUT/recalibrator.safetensors
    (+ recalibrator.json), so a later launch can continue with `--recal-in OUT`. Returns the gathered state."""
    full = backend.full_state_dict(module)
    if main:
        sd = {k[len("student."):]: v for k, v in full.items() if k.startswith("student.")}
        backend.acc.unwrap_model(module).student.save_pretrained(out / "student", state_dict=sd)
        save_processor(student.processor, out / "student")
        rec = {k[len("recal."):]: v.contiguous() for k, v in full.items() if k.startswith("recal.")}
        if not rec and recal is not None:  # a stage-3-only launch: the Recalibrator did not train
            rec = {k: v.detach().cpu().contiguous() for k, v in recal.state_dict().items()}
        if rec:
            save_file(rec, str(out / "recalibrator.safetensors"))
            (out / "recalibrator.json").write_text(json.dumps({"d_l": recal.d_l, "depth": len(recal.blocks)}) + "\n")
    return full


def save_processor(processor, path: Path) -> None:
    """The student's processor beside its weights, so `evaluate` loads both; a stand-in processor that transformers
    cannot save (a tiny random instance's) leaves its tokenizer there and says so."""
    if hasattr(processor, "save_pretrained"):
        processor.save_pretrained(path)
        return
    tok = getattr(processor, "tokenizer", None)
    if tok is not None:
        tok.save_pretrained(path)
    print(f"note: {type(processor).__name__} is a stand-in processor with no save_pretrained: only its tokenizer was "
          f"saved in {path}")


def load_recal(recal, path: str | Path) -> None:
    """Load OUT/recalibrator.safetensors of an earlier launch (stages as separate launches)."""
    path = Path(path)
    recal.load_state_dict(load_file(str(path / "recalibrator.safetensors" if path.is_dir() else path)))


def check_recal_in(a, preset) -> None:
    """`--recal-in OUT` continues an earlier launch, whose student is OUT/student: `--student` must name it, or the
    later stages would start from the student as it was before that launch."""
    saved = Path(a.recal_in) / "student" if a.recal_in else None
    if saved is not None and saved.is_dir() and Path(preset.student).resolve() != saved.resolve():
        raise ValueError(f"--recal-in {a.recal_in} continues a launch that saved its student in {saved}: pass "
                         f"--student {saved} (now {preset.student!r}), or the stages start from the untrained student")


def teacher_width(a, preset) -> int:
    """The teacher's hidden size d_l (the Recalibrator's output width) without loading it: from the Recalibrator a
    `--recal-in` launch saved, else from the teacher's config."""
    saved = Path(a.recal_in) / "recalibrator.json" if a.recal_in else None
    if saved is not None and saved.is_file():
        return json.loads(saved.read_text())["d_l"]
    cfg = teacher_loader(preset, a.tiny_random).config()
    return (getattr(cfg, "llm_config", None) or cfg.get_text_config()).hidden_size


def stage_overrides(a) -> dict:
    """The command line's overrides for every stage: --max_steps, --per_device_train_batch_size,
    --gradient_accumulation_steps (an explicit accumulation wins over the one derived from the global batch)."""
    return {k: v for k, v in dict(steps=a.max_steps, batch_size=a.per_device_train_batch_size,
                                  grad_accum=a.gradient_accumulation_steps).items() if v}


def with_learning_rate(cfg, a):
    """--learning_rate for a stage: the peak, with the stage's final LR keeping its ratio to the peak
    (1e-3 -> 1e-4 becomes 2e-3 -> 2e-4)."""
    return replace(cfg, lr=a.learning_rate, lr_end=cfg.lr_end * a.learning_rate / cfg.lr) if a.learning_rate else cfg


def data_description(a, preset) -> str:
    """What the launch trained on, in words (for the model card)."""
    data = (f"`{Path(a.data).name}`" if a.data else
            f"the synthetic shapes task, train split (seed {a.data_seed}, {a.n or preset.n_train} samples)")
    return data + (" (teacher targets from a teacher cache)" if a.cache else "")


def no_shared_samples(cache, a, ids: list[str]) -> str:
    """Why a cache cannot train on this data (whose sample ids are `ids`): the cache's source and the data's, with
    an id of each."""
    meta = cache.meta
    built = (f"--data {meta['data']}" if "data" in meta else f"the synthetic {meta.get('split', 'train')} split, "
             f"--data-seed {meta.get('data_seed')}")
    cached = cache.sample_ids
    source = f"--data {a.data}" if a.data else f"the synthetic train split, --data-seed {a.data_seed}"
    return (f"the teacher cache {a.cache} holds none of the {len(ids)} training samples read: it was built from "
            f"{built} ({len(cached)} samples, e.g. {cached[0] if cached else 'none'!r}), training reads {source} (e.g. "
            f"{ids[0]!r}); build the cache from the same data (cache-teacher with the same --data/--data-seed "
            f"and --n), or pass the data it was built from")


def feed_options(a, preset) -> dict:
    """Render workers, a stream's shuffle buffer and length buckets: the flags, else the preset's (data/feed.py)."""
    flags = {k: getattr(a, flag, None) for k, flag in (("workers", "dataloader_num_workers"),
                                                       ("shuffle_buffer", "shuffle_buffer"), ("length_buckets", "length_buckets"))}
    return {k: getattr(preset, k) if v is None else v for k, v in flags.items()}


def lazy_data(a, acc, student, teacher, skipped: list | None, preset=None):
    """`--lazy` / `--stream`: this process's share of --data (record r to process r % P), nothing decoded up front;
    each item is rendered on both sides when its batch is drawn (sources.py), by `--dataloader_num_workers`
    processes. `--lazy` shuffles the share; `--stream` reads it in order (JSONL: a process parses only its own
    lines), through a shuffle buffer and length buckets where set."""
    records = open_source(a.data, acc.process_index, acc.num_processes, a.image_root)
    feed = feed_options(a, preset or get_preset(a.preset))
    if a.stream:  # a resume skips the records read before it without decoding them
        return StreamPairData(StreamPosition(records, feed["shuffle_buffer"]), student, teacher, multi_turn=a.multi_turn,
                              strict=a.strict, skipped=skipped, workers=feed["workers"], buckets=feed["length_buckets"])
    return LazyPairData(records, student, teacher, multi_turn=a.multi_turn, strict=a.strict, skipped=skipped,
                        workers=feed["workers"])


def check_shares_samples(cache, a, acc, k: int = 64) -> None:
    """`--lazy`/`--stream` with `--cache`: raise `no_shared_samples` when none of the first `k` samples of this
    process's share is cached (a cache of other data), reading their ids only (no image decoded). Later samples
    the cache lacks are skipped and recorded as training meets them (`TeacherCache.only_cached`)."""
    ids = []
    for record in open_source(a.data, acc.process_index, acc.num_processes, a.image_root):
        try:
            ids += [f"{record.id}#{j}" for j in range(len(record.pairs(a.multi_turn)))]
        except SampleError:
            continue
        if len(ids) >= k:
            break
    if ids and not any(i in cache for i in ids):
        raise ValueError(no_shared_samples(cache, a, ids))


def timing_line(timing: dict) -> str:
    """The step time and loader share of each stage that ran, in one line."""
    parts = [f"stage {s}: median step {t['step_ms']:.1f} ms, loader {100 * t['loader_share']:.1f}% of the time"
             for s, t in timing.items() if isinstance(s, int)]
    ratio = f"; stage 2 / stage 1 step time {timing['ratio_2_over_1']:.2f}" if "ratio_2_over_1" in timing else ""
    return "timing (this process): " + "; ".join(parts) + ratio


def gather_lists(items: list, world: int) -> list:
    """Every process's list, concatenated in process order, on every process."""
    if world == 1:
        return items
    parts = [None] * world
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def run(a) -> dict:
    preset = get_preset(a.preset)
    check_recal_in(a, preset)
    backend = get_backend()
    lazy = bool(a.data) and (a.lazy or a.stream)
    torch.manual_seed(a.seed)
    skipped = None if a.strict else []  # bad samples: left out and recorded in OUT/skipped.jsonl, or fail fast
    samples = ([] if lazy else read_llava_json(a.data, a.image_root, multi_turn=a.multi_turn, skipped=skipped) if a.data
               else make_split(a.data_seed, "train", a.n or preset.n_train))
    teacher, cache = None, None
    distils = any(int(x) in (1, 2) for x in a.stages.split(","))
    if a.cache and distils:  # looked up by sample id: any order or subset of the cached samples trains
        cache = TeacherCache(a.cache)
        if lazy:
            check_shares_samples(cache, a, backend.acc)
        missing = [s for s in samples if s.id not in cache]
        if samples and len(missing) == len(samples):  # nothing would train: a cache of another data source
            raise ValueError(no_shared_samples(cache, a, [s.id for s in samples]))
        if missing and a.strict:
            cache.indices([s.id for s in missing])  # raises, naming them and why the build left them out
        for s in missing:
            skipped.append({"id": s.id, "reason": "not in the teacher cache"
                            + (f" (the build skipped it: {cache.skipped[s.id]})" if s.id in cache.skipped else "")})
        samples = [s for s in samples if s.id in cache]
        head, d_l = cache.head().to(backend.acc.device), cache.meta["d_l"]
    elif not distils:  # stage 3 alone: no teacher, no teacher side rendered; the Recalibrator is only carried along
        head, d_l = None, teacher_width(a, preset)
    else:  # the teacher first: under ZeRO-3 its DeepSpeed config must be alive before its from_pretrained
        teacher, head = backend.place_teacher(teacher_loader(preset, a.tiny_random), preset.max_length)
        d_l = head.weight.shape[1]  # the replicated head: a ZeRO-3 teacher parameter has shape (0,)
    load = student_loader(preset, a.tiny_random)  # whole on every rank, but under ZeRO-3: partitioned as it loads
    student = backend.load_student(load) if hasattr(backend, "load_student") else load()
    student_bytes = local_bytes(student.model)  # what this rank holds of it before the engine sees it
    resume = a.resume_from_checkpoint
    out = Path(a.output_dir or (resolve_root(resume).parent if resume else "runs/train"))
    ckpt = None
    if resume:
        ckpt = Checkpointer(resolve_root(resume), a.save_steps, resume=True)
        student = with_saved_tokenizer(student, ckpt)
    elif a.save_steps > 0 and not a.no_save:
        ckpt = Checkpointer(out / "checkpoints", a.save_steps)
    if lazy:  # from a cache: the student side only, and a sample the cache lacks is skipped like a bad one
        data = lazy_data(a, backend.acc, student if cache is None else cache.only_cached(student), teacher, skipped,
                         preset)
    else:
        data = encode_pairs(teacher, student, samples, skipped)
    cache_fn = None
    if cache is not None:  # eager: the ids resolved once; lazy/stream: looked up as each batch is drawn
        cache_fn = (cache.teacher_fn_by_id(data.sample_id) if lazy else
                    cache.teacher_fn_for([data.sample_id(i) for i in range(len(data))]))
    torch.manual_seed(a.seed)
    recal = Recalibrator(d_l, student.text_config, preset.depth)
    if a.recal_in:
        load_recal(recal, a.recal_in)
    stages = [int(s) for s in a.stages.split(",")]
    # the paper's global batches on this launch's world size; a --tiny-random smoke run keeps the per-GPU numbers
    planned = preset.stage_configs(None if a.tiny_random else backend.acc.num_processes, **stage_overrides(a))
    cfgs = {stage: with_learning_rate(planned[stage], a) for stage in stages}
    trains_recal = any(s in (1, 2) for s in stages)
    engine = Engine(student, recal if trains_recal else None, head if trains_recal else None, cfgs, backend)
    acc = engine.acc
    probe = _Probe(a.state_out, backend, engine, teacher, head, student_bytes)
    config = {k: (v.name if k == "preset" and hasattr(v, "name") else v) for k, v in vars(a).items() if k != "fn"}
    manifest = run_manifest({**config, "stage_configs": {k: asdict(c) for k, c in cfgs.items()},
                             "world_size": acc.num_processes, "backend": backend.name}, a.seed)
    n = len(data) if hasattr(data, "__len__") else None  # a stream's length is not known up front
    log = {"preset": preset.name, "world_size": acc.num_processes, "backend": backend.name, "manifest": manifest,
           "stages": {}, "samples": n, "skipped": len(skipped or [])}
    if acc.is_main_process:
        if not a.no_save:
            write_skip_report(out, skipped or [])
        if lazy:
            print(f"training on {'a stream of' if a.stream else f'{n} items of'} {a.data} (this process's share, "
                  "decoded as batches are drawn); bad samples are counted at the end")
        else:
            print(f"training on {len(data)} samples; skipped {len(skipped or [])} bad sample(s)"
                  + (f", ids and reasons in {out / 'skipped.jsonl'}" if skipped and not a.no_save else ""))
    if acc.is_main_process and not a.no_save:
        write_manifest(out, manifest)
    probe.write(0)
    tracking = Tracking(a.report_to, out, a.run_name, config=config, plan=cfgs, logging_steps=a.logging_steps,
                        main_process=acc.is_main_process)
    timer = StepTimer()  # after the checkpointer: it times the batches a resume has positioned
    _, hists = run_stages(cfgs, student, data, teacher, recal, engine=engine, teacher_head=head, teacher_fn=cache_fn,
                          progress=not a.quiet, callbacks=[c for c in (ckpt, probe, tracking, timer) if c is not None],
                          max_skips=a.max_skips)
    tracking.finish()
    log["timing"] = timer.summary()
    if acc.is_main_process:
        print(timing_line(log["timing"]))
    for stage, hist in hists.items():
        log["stages"][stage] = {"seconds": hist[-1].get("stage_seconds"), "last": hist[-1], "history": hist,
                                "skipped": sum(h.get("skipped", False) for h in hist)}
    acc.wait_for_everyone()
    if lazy:  # every process met its own bad samples: one report, in process order
        skipped = gather_lists(skipped or [], acc.num_processes)
        log["skipped"] = len(skipped)
        if acc.is_main_process:
            if not a.no_save:
                write_skip_report(out, skipped)
            print(f"skipped {len(skipped)} bad sample(s) while training"
                  + (f", ids and reasons in {out / 'skipped.jsonl'}" if skipped and not a.no_save else ""))
    if not a.no_save:
        out.mkdir(parents=True, exist_ok=True)
        full = save_outputs(backend, engine.module, student, recal, out, acc.is_main_process)
        probe.saved(full)
        if acc.is_main_process:
            (out / "train_log.json").write_text(json.dumps(log, indent=1, default=str) + "\n")
            write_model_card(out / "student", student=preset.student, teacher=preset.teacher, stages=cfgs,
                             data=data_description(a, preset), preset=preset.name)
    acc.wait_for_everyone()
    end_launch()
    return log


class _Probe(Callback):
    """`--state-out DIR` (for tests): after each stage every rank writes what the launch tests assert on,
    `stage{S}-rank{R}.pt`: the gathered parameters (every rank under accelerate, rank 0 when sharded), the
    teacher's bytes on this rank and the student's as loaded, the engine's identity and the trainable parameters'
    dtypes."""

    def __init__(self, root, backend, engine, teacher, head, student_bytes: int | None = None):
        self.root, self.backend, self.engine, self.teacher, self.head = root, backend, engine, teacher, head
        self.student_bytes = student_bytes
        if root:
            Path(root).mkdir(parents=True, exist_ok=True)

    def _teacher(self) -> dict:
        if self.teacher is None:
            return {}
        root = getattr(self.teacher, "root", None)
        full = self.backend.full_state_dict(root) if root is not None else {}
        return {"teacher_local_bytes": local_bytes(self.teacher.model),
                "teacher_full": {k: v.detach().cpu() for k, v in full.items()},
                "head": {"weight": self.head.weight.detach().cpu(),
                         "bias": None if self.head.bias is None else self.head.bias.detach().cpu()},
                "loaded_partitioned": getattr(self.backend, "teacher_loaded_partitioned", None),
                "chunked": self._chunked()}

    def _chunked(self) -> dict:
        """The chunked (CE, KL) through the teacher's own (sharded) head and through the replicated copy."""
        lm = self.teacher.model.get_output_embeddings()
        g = torch.Generator().manual_seed(0)
        d, V = self.head.weight.shape[1], self.head.weight.shape[0]
        h, z = (torch.randn(10, d, generator=g).to(self.head.weight.device) for _ in range(2))
        y = torch.randint(0, V, (10,), generator=g).to(h.device)
        parts = lambda w, b: fused_head_loss([h], z, y, w, b, 2.0, 1.0, 1.0, 3)[1][0].tolist()  # noqa: E731
        out = {"h": h.cpu(), "z": z.cpu(), "y": y.cpu(), "replicated": parts(self.head.weight, self.head.bias)}
        with gathered(lm.weight, lm.bias) as (w, b):
            out["sharded"] = parts(w, b)
        return out

    def write(self, stage: int, loss: float | None = None) -> None:
        if not self.root:
            return
        full = {k: v.detach().cpu().float() for k, v in self.backend.full_state_dict(self.engine.module).items()}
        trainable = {n: str(p.dtype) for n, p in self.engine.module.named_parameters() if p.requires_grad}
        rec = {"params": full, "loss": loss, "engine": id(self.engine.module), "engine_type": type(self.engine.module).__name__,
               "trainable_dtypes": trainable, "master_dtype": self._master_dtype(),
               "student_local_bytes": self.student_bytes,
               "student_loaded_partitioned": getattr(self.backend, "student_loaded_partitioned", None), **self._teacher()}
        torch.save(rec, Path(self.root) / f"stage{stage}-rank{self.backend.acc.process_index}.pt")

    def _master_dtype(self) -> str:
        flat = getattr(getattr(self.engine.module, "optimizer", None), "fp32_partitioned_groups_flat", None)
        tensors = flat or [p for g in self.engine.inner.param_groups for p in g["params"]]
        return ",".join(sorted({str(t.dtype) for t in tensors}))

    def on_stage_end(self, st: LoopState) -> None:
        self.write(st.stage, st.history[-1]["loss"])

    def saved(self, full: dict) -> None:
        if self.root and self.backend.acc.is_main_process:
            torch.save({k: v.detach().cpu() for k, v in full.items()}, Path(self.root) / "saved_gathered.pt")
