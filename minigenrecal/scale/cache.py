"""Teacher-feature cache: run the frozen teacher body once, then train stages 1-2 from disk with only its head.

What is stored per sample (the fields of `losses.TeacherOut`, in bf16 safetensors shards):
    z_seq   (Lq_l + La - 1, d_l)   the teacher's features at positions 0 .. Lq_l+La-2, from which
            z_q    = z_seq[:Lq_l]                   (the regularization path's question features)
            z_pred = z_seq[Lq_l-1:]                 (the answer-predicting positions; head(z_pred) = target logits)
            z_a    = z_seq[Lq_l:] = z_pred[1:]      (the Recalibrator's answer input, answer_input='features')
    z_a     (La - 1, d_l)          only with answer_input='embeddings' (then z_a is the answer word embeddings)
    labels  (La,)                  a_0 .. a_{La-1} in the teacher's vocabulary
Storing z_seq once instead of z_q, z_a and z_pred separately is lossless and saves the overlap.
store='answers' (`_stored`) keeps z_pred (La, d_l) of every sample and z_q's other rows only for the input positions
divisible by `reg_every`; a sample without them is read back with z_q of width 0 (the reg path skips it).

Files of a cache directory (docs/cache.md has the details):
    build.json                     the build's settings; rerunning the same build resumes it
    shard-r{R}-{K}.safetensors     process R's K-th shard: consecutive samples, at most `shard_bytes` bytes
    shard-r{R}-{K}.json            written right after its shard: sample ids, skipped samples, input positions
    rank-{R}.json                  process R has finished
    head.safetensors, meta.json    written last by process 0: the frozen head and every sample id in global order

    python -m minigenrecal cache-teacher --preset tiny --n 1000 --output_dir runs/cache
    accelerate launch --num_processes 8 -m minigenrecal cache-teacher --preset NAME --data train.json --output_dir CACHE

    accelerate launch ... cache-teacher --data train.jsonl --stream --store answers --reg-every 16 --output_dir CACHE

`build_cache_stream` (`--stream`) reads the records in order and holds one batch of decoded samples at a time.
Samples are looked up by id: `TeacherCache(dir).teacher_fn_for(ids)` serves a training set in any order or subset;
`teacher_fn_by_id(data.sample_id)` looks each batch up as it is drawn (`train --lazy/--stream --cache`).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import Counter, OrderedDict
from functools import cached_property
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from minigenrecal.data.llava import SampleError, read_llava_json, skip_entry
from minigenrecal.data.pairs import write_skip_report
from minigenrecal.data.sources import iter_samples, open_source
from minigenrecal.data.synthetic import Sample, make_split
from minigenrecal.losses import TeacherOut
from minigenrecal.models.loading import teacher_loader
from minigenrecal.models.presets import get_preset
from minigenrecal.models.vlm import VLMView
from minigenrecal.scale.backends import end_launch, get_backend
from minigenrecal.stages import teacher_forward

FORMAT = 2
SHARD_BYTES = 2 * 1024 ** 3  # default cap of one shard file
HEADER_BYTES = 1024  # bound on a shard's safetensors header (8-byte length + the JSON of at most five tensors)
ESTIMATE_SAMPLES = 32  # the size estimate reads the token counts of this many samples
_UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
          "k": 2 ** 10, "kib": 2 ** 10, "m": 2 ** 20, "mib": 2 ** 20, "g": 2 ** 30, "gib": 2 ** 30, "tib": 2 ** 40}


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.replace("torch.", ""))


def parse_bytes(text: str | int) -> int:
    """'2GiB', '512MiB', '64K' (binary), '1.5GB' (decimal) or '65536' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (expected e.g. 2GiB, 512MiB, 1.5GB or a byte count)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def sample_bytes(Lq: float, La: float, d_l: int, dtype: str = "bfloat16", answer_input: str = "features",
                 store: str = "full", reg_every: int = 1) -> float:
    """Bytes one sample takes in a shard: z_seq (Lq+La-1, d_l) [+ z_a (La-1, d_l)] in `dtype`, the int64 labels
    (La,) and its two int64 lengths. `store='answers'`: z_pred (La, d_l), plus z_q's other Lq-1 rows for one
    sample in `reg_every` (the mean), and a third int64 (has_q)."""
    if store == "full":
        rows = Lq + La - 1
    else:
        rows = La + (Lq - 1) / reg_every
    rows += La - 1 if answer_input == "embeddings" else 0
    return rows * d_l * _dtype(dtype).itemsize + 8 * La + (16 if store == "full" else 24)


# -- processes ----------------------------------------------------------------------------------------------
def _rank_world() -> tuple[int, int]:
    """(this process's rank, the number of processes); (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _rank_world()[1] > 1:
        dist.barrier()


def _max_over_ranks(n: int, device: torch.device) -> int:
    if _rank_world()[1] == 1:
        return n
    t = torch.tensor([n], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def rank_batches(n: int, batch_size: int, rank: int = 0, world: int = 1) -> range:
    """The batches process `rank` of `world` runs (batch j = samples j*B .. j*B+B-1 in input order): contiguous
    blocks of ceil(n_batches / world), so rank 0's samples, then rank 1's, ... are the input order. The last
    ranks' blocks may be shorter or empty."""
    n_batches = math.ceil(n / batch_size)
    per = math.ceil(n_batches / world)
    return range(min(rank * per, n_batches), min((rank + 1) * per, n_batches))


def _positions(batches: range, batch_size: int, n: int) -> range:
    """The input positions of a block of batches."""
    return range(min(batches.start * batch_size, n), min(batches.stop * batch_size, n))


# -- writing shards -----------------------------------------------------------------------------------------
def _name(rank: int, k: int) -> str:
    return f"shard-r{rank:03d}-{k:05d}"


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write to a temp file beside `path`, then rename: `path` is either absent or complete."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _write_json(path: Path, obj: dict) -> None:
    _atomic(path, lambda p: p.write_text(json.dumps(obj, indent=1) + "\n"))


def _rows(t: TeacherOut, dt: torch.dtype, answer_input: str) -> list[dict[str, torch.Tensor]]:
    """Per sample of a teacher batch, the CPU tensors a shard stores (features in `dt`)."""
    starts = torch.cumsum(t.a_lens, 0) - t.a_lens
    out = []
    for b in range(len(t.z_q)):
        La, st = int(t.a_lens[b]), int(starts[b])
        z_pred = t.z_pred[st: st + La]  # (La, d_l)
        row = {"z_seq": torch.cat([t.z_q[b], z_pred[1:]]).to("cpu", dt),  # (Lq+La-1, d_l): z at 0 .. Lq_l+La-2
               "labels": t.labels[st: st + La].cpu(),  # (La,)
               "q_lens": torch.tensor([len(t.z_q[b])]), "a_lens": torch.tensor([La])}
        if answer_input == "embeddings":
            row["z_a"] = t.z_a[b].to("cpu", dt)  # (La-1, d_l)
        out.append(row)
    return out


STORES = ("full", "answers")


def _check_store(store: str, reg_every: int) -> None:
    if store not in STORES:
        raise ValueError(f"store must be one of {list(STORES)}, got {store!r}")
    if reg_every < 1 or (store == "full" and reg_every != 1):
        raise ValueError(f"reg_every must be >= 1, and 1 with store='full' (every sample keeps z_q); got {reg_every}")


def _stored(row: dict[str, torch.Tensor], pos: int, store: str, reg_every: int) -> dict[str, torch.Tensor]:
    """The row a shard stores for the sample at input position `pos`. 'full': as `_rows` gives it. 'answers': the
    rows the main path reads, z_pred (La, d_l) (z_a = z_pred[1:] with answer_input='features'), and z_q's other
    rows (positions 0 .. Lq-2; its last row is z_pred's first) only when `pos` is divisible by `reg_every`
    (has_q = 1; else 0 rows and has_q = 0)."""
    if store == "full":
        return row
    Lq, z = int(row["q_lens"]), row["z_seq"]
    keep = pos % reg_every == 0
    out = {k: v for k, v in row.items() if k != "z_seq"}
    return {"z_pred": z[Lq - 1:].clone(), "z_q": z[: Lq - 1 if keep else 0].clone(), **out,
            "has_q": torch.tensor([int(keep)])}


def _complete_shards(out: Path, rank: int) -> list[dict]:
    """This process's complete shards from an earlier, interrupted build (metadata written, file of the
    recorded size), in order. Everything of this process after them (a partial shard, temp files) is deleted."""
    done = []
    while (meta := out / f"{_name(rank, len(done))}.json").exists():
        rec = json.loads(meta.read_text())
        f = out / rec["file"]
        if not f.exists() or f.stat().st_size != rec["bytes"]:
            break
        done.append(rec)
    keep = {f"{_name(rank, k)}.{ext}" for k in range(len(done)) for ext in ("json", "safetensors")}
    for p in out.glob(f"shard-r{rank:03d}-*"):
        if p.name not in keep:
            p.unlink()
    return done


class _ShardWriter:
    """One process's shards. Samples arrive in input order and are cut into files of at most `cap` bytes (a
    sample larger than `cap` gets a shard of its own) and at most `max_n` samples. Each shard's metadata is
    written right after it; a new writer continues after the last complete shard (`resume_at`)."""

    def __init__(self, out: Path, rank: int, cap: int, max_n: int | None, start: int):
        self.out, self.rank, self.cap, self.max_n = out, rank, cap, max_n
        self.shards = _complete_shards(out, rank)
        self.start = self.shards[-1]["stop"] if self.shards else start  # input position the open shard starts at
        self.resume_at = self.start
        self.rows, self.ids, self.skipped, self.nbytes = [], [], [], 0

    def add(self, pos: int, sid: str, row: dict[str, torch.Tensor]) -> None:
        size = sum(t.nbytes for t in row.values())
        if self.rows and (self.nbytes + size + HEADER_BYTES > self.cap or len(self.rows) == self.max_n):
            self.flush(stop=pos)
        self.rows.append(row)
        self.ids.append(sid)
        self.nbytes += size

    def skip(self, record: dict) -> None:
        self.skipped.append(record)

    def flush(self, stop: int) -> None:
        """Write the open shard (samples at input positions start .. stop-1), then its metadata."""
        name = _name(self.rank, len(self.shards))
        tensors = {k: torch.cat([r[k] for r in self.rows]).contiguous() for k in self.rows[0]}
        _atomic(self.out / f"{name}.safetensors", lambda p: save_file(tensors, str(p)))
        rec = {"file": f"{name}.safetensors", "rank": self.rank, "index": len(self.shards), "n": len(self.ids),
               "bytes": (self.out / f"{name}.safetensors").stat().st_size, "start": self.start, "stop": stop,
               "sample_ids": self.ids, "skipped": self.skipped}
        _write_json(self.out / f"{name}.json", rec)
        self.shards.append(rec)
        self.rows, self.ids, self.skipped, self.nbytes, self.start = [], [], [], 0, stop

    def finish(self, stop: int, forwards: int) -> None:
        """Write the last shard and rank-R.json (skipped samples not in a shard: only when it wrote none)."""
        if self.rows:
            self.flush(stop)
        _write_json(self.out / f"rank-{self.rank:03d}.json", {"rank": self.rank, "shards": len(self.shards),
                    "stop": stop, "skipped": self.skipped, "forwards": forwards})


# -- the build ----------------------------------------------------------------------------------------------
def _unique_ids(samples: list[Sample], skip_bad: bool, skipped: list[dict]) -> list[Sample]:
    """The samples whose id no other sample has (the cache is looked up by id). The others raise ValueError,
    or with `skip_bad` are all left out and recorded in `skipped`."""
    count = Counter(s.id for s in samples)
    dup = {i for i, c in count.items() if c > 1}
    if not dup:
        return samples
    if not skip_bad:
        raise ValueError(f"{len(dup)} sample id(s) occur more than once, e.g. {sorted(dup)[:5]}: the cache looks "
                         "samples up by id, so ids must be unique")
    skipped += [{"id": s.id, "reason": f"{count[s.id]} samples have this id (the cache looks samples up by id)"}
                for s in samples if s.id in dup]
    return [s for s in samples if s.id not in dup]


def _settings(samples: list[Sample], head: nn.Linear, world: int, **kw) -> dict:
    """What a rerun must repeat to resume a build: the knobs, the process count, the samples' ids and texts and
    a checksum of the head (so another teacher is not resumed into this cache)."""
    h = hashlib.sha256()
    for s in samples:
        h.update(json.dumps([s.id, s.question, s.answer]).encode())
    return _settings_of(h.hexdigest(), len(samples), head, world, **kw)


def _settings_of(digest: str, n: int, head: nn.Linear, world: int, **kw) -> dict:
    """`_settings` from the samples' count and the sha256 of their ids and texts."""
    w = head.weight.detach()
    return json.loads(json.dumps({"format": FORMAT, "world_size": world, **kw, "n": n,
                                  "samples_sha256": digest, "d_l": w.shape[1], "V_l": w.shape[0],
                                  "head_checksum": float(w[:: max(1, w.shape[0] // 256)].double().sum())}))


def _begin(out: Path, settings: dict, rank: int) -> None:
    """Check that `out` is new or holds a build with the same settings (which this one resumes); record them."""
    path = out / "build.json"
    if path.exists():
        old = json.loads(path.read_text())
        diff = sorted(k for k in settings.keys() | old.keys() if settings.get(k) != old.get(k))
        if diff:
            raise ValueError(f"{out} holds a cache build with other settings ({', '.join(diff)} differ): rerun "
                             "it with the same ones to resume it, or write to a new directory")
    elif (out / "meta.json").exists() or any(out.glob("shard-*")):
        raise ValueError(f"{out} holds cache files of another build (no build.json): write to a new directory")
    _barrier()
    if rank == 0 and not path.exists():
        _write_json(path, settings)
    _barrier()


class _Filler:
    """A batch of one: the first sample of the data that the teacher renders. Forwarded where a process has no
    batch of its own (padding, or every sample of its batch rejected), so that every process runs the same
    number of teacher forwards (a sharded teacher's forward is a collective); its output is not written."""

    def __init__(self, teacher: VLMView, samples: list[Sample]):
        self.teacher, self.samples, self.encs = teacher, samples, None

    def get(self) -> list:
        if self.encs is None:
            self.encs = _first_rendered(self.teacher, self.samples, 1)
            if not self.encs:
                raise ValueError(f"no usable sample: the teacher rejects all {len(self.samples)}")
        return self.encs


def _first_rendered(teacher: VLMView, samples: list[Sample], k: int) -> list:
    """The Encoded of the first `k` samples the teacher renders."""
    encs = []
    for s in samples:
        if len(encs) == k:
            break
        try:
            encs.append(teacher.encode(s))
        except SampleError:
            continue
    return encs


def _device(teacher: VLMView) -> torch.device:
    return next(teacher.model.parameters()).device


@torch.no_grad()
def build_cache(teacher: VLMView, samples: list[Sample], out: str | Path, batch_size: int = 32,
                shard_size: int | None = None, dtype: str = "bfloat16", answer_input: str = "features",
                info: dict | None = None, progress: bool = False, *, shard_bytes: int = SHARD_BYTES,
                head: nn.Linear | None = None, skip_bad: bool = False, skipped: list[dict] | None = None,
                store: str = "full", reg_every: int = 1) -> dict:
    """Run `stages.teacher_forward` over `samples` in batches of `batch_size` and write the cache to `out`;
    returns meta (on every process). `store`/`reg_every`: what each sample keeps (`_stored`).

    `teacher` is already placed (replicated, or sharded with `head` its replicated head). Under torch.distributed
    each process runs its own contiguous block of batches (`rank_batches`) and writes its own shards; the last
    blocks are padded with forwards that are not written, so every process runs the same number of forwards.
    Shards hold at most `shard_bytes` bytes (and `shard_size` samples, if given). A rerun with the same
    settings resumes an interrupted build: complete shards are kept, a partial one is discarded, and the batch
    holding the next sample is recomputed whole (same padding: byte-identical shards).
    A sample the teacher cannot render raises SampleError, or with `skip_bad` is left out and recorded in
    meta['skipped'] after the records already in `skipped` (e.g. the reader's). Ids must be unique.
    """
    _check_store(store, reg_every)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    head = teacher.head if head is None else head
    rank, world = _rank_world()
    skipped = list(skipped or [])
    samples = _unique_ids(samples, skip_bad, skipped)
    settings = _settings(samples, head, world, batch_size=batch_size, shard_bytes=shard_bytes, shard_size=shard_size,
                         dtype=dtype, answer_input=answer_input, info=info or {}, **_store_settings(store, reg_every))
    _begin(out, settings, rank)
    batches = rank_batches(len(samples), batch_size, rank, world)
    share = _positions(batches, batch_size, len(samples))
    writer = _ShardWriter(out, rank, shard_bytes, shard_size, share.start)
    todo = range(writer.resume_at // batch_size, batches.stop) if writer.resume_at < share.stop else range(0)
    steps = _max_over_ranks(len(todo), _device(teacher))
    run = _BatchRunner(teacher, samples, batch_size, _dtype(dtype), answer_input, skip_bad, store, reg_every)
    bar = range(steps)
    if progress and rank == 0:
        bar = tqdm(bar, desc="teacher cache")
    for step in bar:
        run(todo[step] if step < len(todo) else None, writer)
    writer.finish(share.stop, steps)
    _barrier()
    if rank == 0:
        _write_head(out, head)
        _write_json(out / "meta.json", _assemble(out, settings, world, skipped))
    _barrier()
    return json.loads((out / "meta.json").read_text())


def _store_settings(store: str, reg_every: int) -> dict:
    """The storage mode's settings: none for 'full' (its build.json and meta.json are those of before the mode)."""
    return {} if store == "full" else {"store": store, "reg_every": reg_every}


def _stream_texts(records, multi_turn: str, n: int | None,
                  skip_bad: bool = True) -> tuple[Counter, str, list[dict]]:
    """The first pass of a streamed build, over the records' texts only (no image opened), up to the first `n`
    samples: how often each sample id occurs, the sha256 of the samples' ids and texts, and the records whose text
    is bad (skip records, in input order; raised without `skip_bad`)."""
    count, h, bad, seen = Counter(), hashlib.sha256(), [], 0
    for record in records:
        try:
            pairs = record.pairs(multi_turn)
        except SampleError as e:
            if not skip_bad:
                raise
            bad.append(skip_entry(record.id, e))
            continue
        for k, (q, a) in enumerate(pairs):
            if n is not None and seen == n:
                return count, h.hexdigest(), bad
            seen += 1
            count[f"{record.id}#{k}"] += 1
            h.update(json.dumps([f"{record.id}#{k}", q, a]).encode())
    return count, h.hexdigest(), bad


def _stream_positions(records, multi_turn: str, dup: set[str], n: int | None):
    """(input position, record, turn k) of each sample the build caches, from texts only: the first `n` samples
    whose text reads, without the ids in `dup`; or, for a sample id in `dup`, (None, record, k)."""
    pos, seen = 0, 0
    for record in records:
        try:
            turns = len(record.pairs(multi_turn))
        except SampleError:
            continue
        for k in range(turns):
            if n is not None and seen == n:
                return
            seen += 1
            if f"{record.id}#{k}" in dup:
                yield None, record, k
                continue
            yield pos, record, k
            pos += 1


class _Decoded:
    """A record's samples, decoded once (one image per record) and kept while the next samples are its own."""

    def __init__(self, multi_turn: str):
        self.multi_turn, self.record, self.samples = multi_turn, None, None

    def __call__(self, record, k: int) -> Sample:
        if record is not self.record:
            self.record = record
            try:
                self.samples = record.samples(self.multi_turn)
            except SampleError as e:  # a bad image: raised again for each of the record's samples
                self.samples = e
        if isinstance(self.samples, SampleError):
            raise self.samples
        return self.samples[k]


@torch.no_grad()
def build_cache_stream(teacher: VLMView, records, out: str | Path, batch_size: int = 32, dtype: str = "bfloat16",
                       answer_input: str = "features", info: dict | None = None, progress: bool = False, *,
                       shard_bytes: int = SHARD_BYTES, multi_turn: str = "reject", n: int | None = None,
                       head: nn.Linear | None = None, skip_bad: bool = False, store: str = "full",
                       reg_every: int = 1) -> dict:
    """`build_cache` over records read in order (`data.sources.open_source(path)`, every record on every process),
    at bounded memory: a process holds one batch of samples (decoded images, renderings, features) at a time and
    decodes only the images of its own batches. Returns meta (on every process).

    Input positions come from the records' texts alone: a first pass reads them (no image opened) to count the
    sample ids (every sample whose id occurs more than once is left out, as `build_cache` does) and to checksum
    them; position p is then the p-th sample whose text reads, without repeated ids, of the first `n`. Batch j is
    positions j*B .. j*B+B-1, and the blocks of batches, the padding forwards, the shards, the resume and the
    global order are `build_cache`'s. A sample whose image cannot be decoded is skipped inside its batch (recorded
    under its sample id), like one the teacher cannot render. Over records whose images all decode the cache is
    byte-identical to `build_cache`'s (build.json records `stream`); the eager build drops a record with a bad
    image before batching, so after one the batches differ (each cache is still the teacher's features)."""
    _check_store(store, reg_every)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    head = teacher.head if head is None else head
    rank, world = _rank_world()
    count, digest, bad_text = _stream_texts(records, multi_turn, n, skip_bad)
    dup = {i for i, c in count.items() if c > 1}
    if dup and not skip_bad:
        raise ValueError(f"{len(dup)} sample id(s) occur more than once, e.g. {sorted(dup)[:5]}: the cache looks "
                         "samples up by id, so ids must be unique")
    total = sum(c for c in count.values() if c == 1)
    settings = _settings_of(digest, total, head, world, batch_size=batch_size, shard_bytes=shard_bytes,
                            shard_size=None, dtype=dtype, answer_input=answer_input, info=info or {}, stream=True,
                            **_store_settings(store, reg_every))
    _begin(out, settings, rank)
    batches = rank_batches(total, batch_size, rank, world)
    share = _positions(batches, batch_size, total)
    writer = _ShardWriter(out, rank, shard_bytes, None, share.start)
    todo = range(writer.resume_at // batch_size, batches.stop) if writer.resume_at < share.stop else range(0)
    steps = _max_over_ranks(len(todo), _device(teacher))
    run = _StreamRunner(teacher, records, multi_turn, dup, n, _dtype(dtype), answer_input, skip_bad, store, reg_every)
    first = todo.start * batch_size if todo else share.stop
    items = ((p, r, k) for p, r, k in _stream_positions(records, multi_turn, dup, n)
             if p is not None and first <= p < share.stop)
    bar = tqdm(range(steps), desc="teacher cache", disable=not (progress and rank == 0))
    for step in bar:
        size = min(batch_size, share.stop - todo[step] * batch_size) if step < len(todo) else 0
        run([next(items) for _ in range(size)], writer)
    writer.finish(share.stop, steps)
    _barrier()
    if rank == 0:
        dups = [{"id": f"{r.id}#{k}", "reason": f"{count[f'{r.id}#{k}']} samples have this id (the cache looks "
                 "samples up by id)"} for p, r, k in _stream_positions(records, multi_turn, dup, n) if p is None]
        _write_head(out, head)
        _write_json(out / "meta.json", _assemble(out, settings, world, bad_text + dups))
    _barrier()
    return json.loads((out / "meta.json").read_text())


class _StreamRunner:
    """run(batch, writer): decode and render a batch of (input position, record, turn k), run the teacher on it
    and hand its samples to `writer` in input order; an empty batch (or one whose samples all fail) forwards the
    filler, the first sample of the stream the teacher renders, and writes nothing."""

    def __init__(self, teacher: VLMView, records, multi_turn: str, dup: set[str], n: int | None, dt: torch.dtype,
                 answer_input: str, skip_bad: bool, store: str, reg_every: int):
        self.teacher, self.records, self.multi_turn, self.dup, self.n = teacher, records, multi_turn, dup, n
        self.dt, self.answer_input, self.skip_bad = dt, answer_input, skip_bad
        self.store, self.reg_every = store, reg_every
        self.decoded, self.filler = _Decoded(multi_turn), None

    def _filler(self) -> list:
        if self.filler is None:
            decoded = _Decoded(self.multi_turn)
            for p, r, k in _stream_positions(self.records, self.multi_turn, self.dup, self.n):
                try:
                    self.filler = [self.teacher.encode(decoded(r, k))]
                    break
                except SampleError:
                    continue
            else:
                raise ValueError("no usable sample: the teacher renders none of the stream's samples")
        return self.filler

    def __call__(self, batch: list[tuple[int, object, int]], writer: _ShardWriter) -> None:
        encs, order = [], []  # order: (input position, sample id, index into encs or a skip record)
        for p, record, k in batch:
            sid = f"{record.id}#{k}"
            try:
                encs.append(self.teacher.encode(self.decoded(record, k)))
                order.append((p, sid, len(encs) - 1))
            except SampleError as e:
                if not self.skip_bad:
                    raise
                order.append((p, sid, {"id": sid, "reason": str(e).removeprefix(f"sample {sid}: ").removeprefix(
                    f"sample {record.id}: ")}))  # a bad image's message names the record
        _forward_and_write(self, encs or self._filler(), order, writer)


class _BatchRunner:
    """run(j, writer): render batch j, run the teacher on it and hand its samples to `writer` in input order
    (j None: a padding forward of the filler, nothing written)."""

    def __init__(self, teacher: VLMView, samples: list[Sample], batch_size: int, dt: torch.dtype,
                 answer_input: str, skip_bad: bool, store: str = "full", reg_every: int = 1):
        self.teacher, self.samples, self.B, self.dt = teacher, samples, batch_size, dt
        self.answer_input, self.skip_bad, self.store, self.reg_every = answer_input, skip_bad, store, reg_every
        self.filler = _Filler(teacher, samples)

    def __call__(self, j: int | None, writer: _ShardWriter) -> None:
        positions = range(j * self.B, min((j + 1) * self.B, len(self.samples))) if j is not None else range(0)
        encs, order = [], []  # order: (input position, sample id, index into encs or a skip record)
        for p in positions:
            sid = self.samples[p].id
            try:
                encs.append(self.teacher.encode(self.samples[p]))
                order.append((p, sid, len(encs) - 1))
            except SampleError as e:
                if not self.skip_bad:
                    raise
                order.append((p, sid, skip_entry(sid, e)))
        _forward_and_write(self, encs or self.filler.get(), order, writer)


def _forward_and_write(run, encs: list, order: list[tuple], writer: _ShardWriter) -> None:
    """The teacher's forward on `encs` (the filler where a batch has none to cache), then each (input position,
    sample id, index into encs or a skip record) of `order` to `writer`, in input order; `run` is a batch runner
    (its teacher, stored dtype, answer input and storage mode)."""
    dev = _device(run.teacher)
    t = teacher_forward(run.teacher, {k: v.to(dev) for k, v in run.teacher.collate(encs).items()}, run.answer_input)
    rows = _rows(t, run.dt, run.answer_input)  # a filler's rows are never read
    for p, sid, what in order:
        if p < writer.resume_at:
            continue  # written before an interruption; its batch is recomputed only for the same padding
        if isinstance(what, dict):
            writer.skip(what)
        else:
            writer.add(p, sid, _stored(rows[what], p, run.store, run.reg_every))


def _write_head(out: Path, head: nn.Linear) -> None:
    """head.safetensors: the frozen head's weight and bias, in the teacher's own dtype."""
    tensors = {"weight": head.weight.detach().cpu().contiguous()}
    if head.bias is not None:
        tensors["bias"] = head.bias.detach().cpu().contiguous()
    _atomic(out / "head.safetensors", lambda p: save_file(tensors, str(p)))


def _assemble(out: Path, settings: dict, world: int, skipped: list[dict]) -> dict:
    """meta.json from the processes' shard metadata, in global order: rank 0's shards, then rank 1's, ...,
    which is the input order without the skipped samples, whatever the number of processes."""
    shards, ids, skipped = [], [], list(skipped)
    for r in range(world):
        done = json.loads((out / f"rank-{r:03d}.json").read_text())
        for k in range(done["shards"]):
            rec = json.loads((out / f"{_name(r, k)}.json").read_text())
            shards.append({key: rec[key] for key in ("file", "rank", "n", "bytes")})
            ids += rec["sample_ids"]
            skipped += rec["skipped"]
        skipped += done["skipped"]
    keep = ("d_l", "V_l", "dtype", "answer_input", "world_size", "batch_size", "shard_bytes", "store", "reg_every")
    return {"format": FORMAT, "n": len(ids), **{k: settings[k] for k in keep if k in settings}, "shards": shards,
            "sample_ids": ids, "skipped": skipped, **settings["info"]}


# -- the size before building ---------------------------------------------------------------------------------
def estimate_size(teacher: VLMView, samples: list[Sample], dtype: str = "bfloat16", answer_input: str = "features",
                  shard_bytes: int = SHARD_BYTES, batch_size: int = 32, world_size: int = 1,
                  head: nn.Linear | None = None, k: int = ESTIMATE_SAMPLES, n: int | None = None,
                  store: str = "full", reg_every: int = 1) -> dict:
    """The cache's size by arithmetic before building it (`size_arithmetic`), at the teacher's d_l and the mean
    token counts of the first `k` samples it renders; for `n` samples (default: all of `samples`)."""
    head = teacher.head if head is None else head
    encs = _first_rendered(teacher, samples, k)
    if not encs:
        raise ValueError(f"no usable sample among the first of {len(samples)}: the teacher rejects them")
    Lq = sum(e.q_len for e in encs) / len(encs)
    La = sum(e.a_len for e in encs) / len(encs)
    head_bytes = sum(p.numel() * p.element_size() for p in (head.weight, head.bias) if p is not None)
    n = len(samples) if n is None else n
    return {**size_arithmetic(n, Lq, La, head.weight.shape[1], head_bytes, dtype, answer_input,
                              shard_bytes, batch_size, world_size, store=store, reg_every=reg_every),
            "from_samples": len(encs)}


def size_arithmetic(n: int, Lq: float, La: float, d_l: int, head_bytes: int, dtype: str = "bfloat16",
                    answer_input: str = "features", shard_bytes: int = SHARD_BYTES, batch_size: int = 32,
                    world_size: int = 1, *, store: str = "full", reg_every: int = 1) -> dict:
    """Bytes of a cache of `n` samples of Lq question and La answer tokens: n x `sample_bytes` (for 'answers', the
    mean over one sample in `reg_every` keeping z_q), plus one header per shard and the head; and the shards the
    processes write (each packs whole samples of its block of batches up to `shard_bytes`, counted at the mean
    sample size)."""
    per = sample_bytes(Lq, La, d_l, dtype, answer_input, store, reg_every)
    per_shard = max(1, int((shard_bytes - HEADER_BYTES) // per))
    shards = sum(math.ceil(len(_positions(rank_batches(n, batch_size, r, world_size), batch_size, n)) / per_shard)
                 for r in range(world_size))
    return {"n": n, "mean_q_tokens": Lq, "mean_a_tokens": La, "d_l": d_l, "dtype": dtype, "bytes_per_sample": per,
            "head_bytes": head_bytes, "shards": shards, "shard_bytes": shard_bytes, "store": store,
            "reg_every": reg_every,
            "total_bytes": round(n * per + shards * HEADER_BYTES + head_bytes)}


def format_estimate(e: dict) -> str:
    """The estimate as the command prints it."""
    store = "" if e.get("store", "full") == "full" else f"store answers, z_q for 1 sample in {e['reg_every']}, "
    return (f"size estimate (arithmetic): {e['n']} samples x {e['bytes_per_sample']:,.0f} B (d_l {e['d_l']}, "
            f"{e['dtype']}, {store}mean {e['mean_q_tokens']:.1f} question + {e['mean_a_tokens']:.1f} answer tokens over "
            f"the first {e['from_samples']} samples) + head {format_bytes(e['head_bytes'])} = "
            f"{e['total_bytes']:,} B ({format_bytes(e['total_bytes'])}) in {e['shards']} shard(s) of at most "
            f"{format_bytes(e['shard_bytes'])}")


# -- reading ----------------------------------------------------------------------------------------------
class _Shards:
    """Shard files opened on first use (memory-mapped), at most `keep` open at once."""

    def __init__(self, paths: list[Path], keep: int = 64):
        self.paths, self.keep, self.open = paths, keep, OrderedDict()

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, k: int):
        if k not in self.open:
            self.open[k] = safe_open(str(self.paths[k]), framework="pt")
            if len(self.open) > self.keep:
                self.open.popitem(last=False)
        self.open.move_to_end(k)
        return self.open[k]


class TeacherCache:
    """A cache on disk, read lazily (memory-mapped safetensors). Row i is meta['sample_ids'][i];
    `indices(ids)` finds rows by sample id and `teacher_fn_for(ids)` gives a training set's `teacher_fn`."""

    def __init__(self, path: str | Path, dtype: torch.dtype = torch.float32):
        self.path = Path(path)
        meta_file = self.path / "meta.json"
        if not meta_file.exists():
            raise FileNotFoundError(f"no teacher cache at {self.path}; build it with `python -m minigenrecal "
                                    "cache-teacher --output_dir DIR` (an interrupted build resumes when rerun)")
        self.meta = json.loads(meta_file.read_text())
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{self.path}: cache format {self.meta.get('format')}, this code reads {FORMAT}")
        self.dtype = dtype  # features are returned in this dtype (CPU fp32 training cannot read bf16 directly)
        self.store = self.meta.get("store", "full")
        self.files = _Shards([self.path / sh["file"] for sh in self.meta["shards"]])
        self.where = []  # where[i] = (shard, z_seq (or z_pred) row start, a row start, label start, Lq, La, z_q row
        # start, has z_q)
        for k, sh in enumerate(self.meta["shards"]):
            self.where += self._locate(k, sh)
        if len(self.where) != self.meta["n"]:
            raise ValueError(f"{self.path}: meta says {self.meta['n']} samples, shards hold {len(self.where)}")
        self._row = None

    def _locate(self, k: int, sh: dict) -> list[tuple]:
        f = self.path / sh["file"]
        if not f.exists() or f.stat().st_size != sh["bytes"]:
            raise ValueError(f"{f}: missing or not {sh['bytes']} bytes as meta.json says (a damaged cache)")
        with safe_open(str(f), framework="pt") as g:
            q, a = g.get_tensor("q_lens").tolist(), g.get_tensor("a_lens").tolist()
            has = g.get_tensor("has_q").tolist() if self.store == "answers" else [1] * len(q)
        out, seq, ans, lab, qrow = [], 0, 0, 0, 0
        for Lq, La, h in zip(q, a, has):
            out.append((k, seq, ans, lab, Lq, La, qrow, h))
            seq, ans, lab = seq + (Lq + La - 1 if self.store == "full" else La), ans + La - 1, lab + La
            qrow += (Lq - 1) * h
        return out

    def __len__(self):
        return len(self.where)

    def __contains__(self, sample_id: str) -> bool:
        return sample_id in self._rows()

    @property
    def sample_ids(self) -> list[str]:
        return self.meta["sample_ids"]

    @cached_property
    def skipped(self) -> dict[str, str]:
        """{sample id: reason} of the samples the build left out."""
        return {r["id"]: r["reason"] for r in self.meta.get("skipped", [])}

    def _rows(self) -> dict[str, int]:
        if self._row is None:
            self._row = {sid: i for i, sid in enumerate(self.sample_ids)}
        return self._row

    def indices(self, ids: list[str]) -> list[int]:
        """The cache rows of these sample ids; raises ValueError naming the ids the cache does not hold."""
        rows = self._rows()
        missing = [i for i in ids if i not in rows]
        if missing:
            why = self.skipped
            named = ", ".join(f"{i!r}" + (f" (skipped: {why[i]})" if i in why else "") for i in missing[:10])
            raise ValueError(f"{self.path}: {len(missing)} sample(s) are not in the cache: {named}"
                             + (" ..." if len(missing) > 10 else "") + "; leave them out of training or rebuild "
                             "the cache over the same data")
        return [rows[i] for i in ids]

    def teacher_fn_for(self, ids: list[str]) -> Callable[[dict | None, torch.Tensor], TeacherOut]:
        """`teacher_fn(t_batch, idx)` for a dataset whose sample i has id ids[i] (any order or subset of the
        cached samples): dataset indices go through `indices(ids)`, resolved here once."""
        rows = self.indices(ids)
        return lambda t_batch, idx: self.teacher_out([rows[i] for i in idx.tolist()])

    def teacher_fn_by_id(self, sample_id: Callable[[int], str]) -> Callable[[dict | None, torch.Tensor], TeacherOut]:
        """`teacher_fn(t_batch, idx)` for data read as training draws it (`--lazy`, `--stream`): each index of a
        drawn batch is named by `sample_id` (a LazyPairData index, or a stream's counter k) and looked up now.
        An id the cache does not hold raises the ValueError of `indices` (naming it and why the build left it
        out); `only_cached` keeps such samples out of the data, so this is a guard, not the skip path."""
        return lambda t_batch, idx: self.teacher_out(self.indices([sample_id(i) for i in idx.tolist()]))

    def only_cached(self, view: VLMView) -> "CachedOnly":
        """`view` (the student's) rejecting every sample this cache does not hold, with a SampleError: data read
        lazily then skips and records it like any sample that cannot be rendered (or fails with --strict)."""
        return CachedOnly(view, self)

    def check(self, samples: list[Sample]) -> None:
        """Raise unless `samples` are the first cached ones, in the same order (then `teacher_fn` serves them;
        any other order or subset is served by `teacher_fn_for`)."""
        ids = [s.id for s in samples]
        if ids != self.sample_ids[: len(ids)]:
            bad = next(i for i, (a, b) in enumerate(zip(ids, self.sample_ids)) if a != b) if len(ids) <= len(self) else len(self)
            raise ValueError(f"{self.path}: the training samples do not match the cache (first mismatch at index "
                             f"{bad}); look samples up by id with `TeacherCache.teacher_fn_for(ids)`")

    def head(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """The teacher's frozen head, rebuilt from head.safetensors (its stored dtype unless `dtype`)."""
        with safe_open(str(self.path / "head.safetensors"), framework="pt") as f:
            w = f.get_tensor("weight")
            b = f.get_tensor("bias") if "bias" in f.keys() else None
        dtype = dtype or w.dtype
        lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
        lin.weight = nn.Parameter(w.to(dtype), requires_grad=False)
        if b is not None:
            lin.bias = nn.Parameter(b.to(dtype), requires_grad=False)
        return lin

    def has_q(self, i: int) -> bool:
        """Does cache row i hold the teacher's question features (always, unless built with store='answers')?"""
        return bool(self.where[i][7])

    def sample(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z_q (Lq_l, d_l), z_a (La-1, d_l), z_pred (La, d_l), labels (La,)) of cache row i. A row of an 'answers'
        cache without z_q gives z_q of width 0, (Lq_l, 0): the losses skip it on the regularization path, and its
        length Lq_l still places the answer rows (NPE off)."""
        k, seq, ans, lab, Lq, La, qrow, has = self.where[i]
        f = self.files[k]
        labels = f.get_slice("labels")[lab: lab + La]
        if self.store == "full":
            z = f.get_slice("z_seq")[seq: seq + Lq + La - 1].to(self.dtype)  # (Lq + La - 1, d_l)
            z_q, z_pred = z[:Lq], z[Lq - 1:]
        else:
            z_pred = f.get_slice("z_pred")[seq: seq + La].to(self.dtype)  # (La, d_l)
            z_q = (torch.cat([f.get_slice("z_q")[qrow: qrow + Lq - 1].to(self.dtype), z_pred[:1]]) if has
                   else z_pred.new_empty(Lq, 0))
        if self.meta["answer_input"] == "features":
            return z_q, z_pred[1:], z_pred, labels
        return z_q, f.get_slice("z_a")[ans: ans + La - 1].to(self.dtype), z_pred, labels

    def teacher_out(self, idx: torch.Tensor | list[int]) -> TeacherOut:
        """The TeacherOut of a batch of cache rows, as `stages.teacher_forward` would give it."""
        parts = [self.sample(int(i)) for i in idx]
        return TeacherOut(z_q=[p[0] for p in parts], z_a=[p[1] for p in parts],
                          z_pred=torch.cat([p[2] for p in parts]), labels=torch.cat([p[3] for p in parts]),
                          a_lens=torch.tensor([len(p[3]) for p in parts]))

    def teacher_fn(self, t_batch: dict | None, idx: torch.Tensor) -> TeacherOut:
        """For `loop.train_stage(teacher_fn=...)` when dataset index = cache row (see `check`); otherwise
        use `teacher_fn_for(ids)`. Ignores the (absent) teacher batch."""
        return self.teacher_out(idx.tolist())


class CachedOnly:
    """A view whose `encode` first asks the cache: a sample it does not hold is a SampleError saying why (the
    build's own reason when the build skipped it). Everything else is the wrapped view's."""

    def __init__(self, view: VLMView, cache: TeacherCache):
        self.view, self.cache = view, cache

    def encode(self, s: Sample):
        if s.id not in self.cache:
            why = self.cache.skipped.get(s.id)
            raise SampleError(f"sample {s.id}: not in the teacher cache {self.cache.path}"
                              + (f" (the build skipped it: {why})" if why else " (built from other data?)"))
        return self.view.encode(s)

    def __getattr__(self, name: str):
        return getattr(self.view, name)


# -- command line -----------------------------------------------------------------------------------------
def _init_distributed() -> None:
    """Under `accelerate launch` / `torchrun` with several processes: torch.distributed (nccl on CUDA, gloo on CPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def _load_teacher(a) -> tuple[VLMView, nn.Linear]:
    """The frozen teacher, placed for the build by the launch's backend (scale/backends.py): (view, head). Under the
    FSDP or ZeRO-3 launch configs it is sharded across the processes (its body is then a collective: every process
    runs the same number of forwards, see `build_cache`) and the head is a replicated copy; otherwise each process
    holds it whole on its own device."""
    preset = get_preset(a.preset)
    return get_backend().place_teacher(teacher_loader(preset, False, a.teacher_dir), preset.max_length)


def _read_samples(a, skipped: list | None) -> tuple[list[Sample], dict]:
    """The samples to cache (`--data` records, or the synthetic train split) and what meta.json says of them."""
    if a.data:
        samples = read_llava_json(a.data, a.image_root, multi_turn=a.multi_turn, skipped=skipped)
        return samples[: a.n] if a.n else samples, {"data": Path(a.data).name, "multi_turn": a.multi_turn}
    n = a.n or get_preset(a.preset).n_train
    return make_split(a.data_seed, "train", n), {"data_seed": a.data_seed, "split": "train"}


def _store_kw(a) -> dict:
    """--store / --reg-every as build keywords (none for the default, full)."""
    store, k = getattr(a, "store", "full"), getattr(a, "reg_every", 1)
    _check_store(store, k)
    return {} if store == "full" else {"store": store, "reg_every": k}


def _cache_teacher_stream(a, preset) -> dict:
    """`cache-teacher --stream`: `build_cache_stream` over the --data records, every process reading them in order."""
    if not a.data:
        raise ValueError("cache-teacher --stream reads --data records in order: pass --data FILE.jsonl")
    records = open_source(a.data, 0, 1, a.image_root)  # every record, on every process: positions are global
    teacher, head = _load_teacher(a)
    rank, world = _rank_world()
    kw = dict(batch_size=a.per_device_eval_batch_size, dtype=a.dtype, answer_input=a.answer_input,
              shard_bytes=parse_bytes(a.shard_bytes), **_store_kw(a))
    if rank == 0:
        first = []
        for s in iter_samples(records, a.multi_turn, []):  # the estimate's samples: a few decoded, then dropped
            first.append(s)
            if len(first) == ESTIMATE_SAMPLES:
                break
        count, _, _ = _stream_texts(records, a.multi_turn, a.n)
        print(format_estimate(estimate_size(teacher, first, head=head, n=sum(c for c in count.values() if c == 1), world_size=world, **kw)),
              flush=True)
        del first
    return build_cache_stream(teacher, records, a.output_dir, head=head, progress=True, skip_bad=not a.strict,
                              multi_turn=a.multi_turn, n=a.n, info={"preset": preset.name, "teacher": preset.teacher,
                                                                   "data": Path(a.data).name,
                                                                   "multi_turn": a.multi_turn}, **kw)


def cache_teacher(a) -> None:
    """`cache-teacher`: the preset's teacher once over the samples (`a` is the command's namespace), one shard file
    per `shard_bytes`, resumable; bad samples skipped and recorded in OUT/skipped.jsonl (or fatal with --strict)."""
    _init_distributed()
    rank, world = _rank_world()
    preset = get_preset(a.preset)
    if getattr(a, "stream", False):
        meta = _cache_teacher_stream(a, preset)
    else:
        skipped = None if a.strict else []  # bad samples: left out and recorded in OUT/skipped.jsonl, or fail fast
        samples, about = _read_samples(a, skipped)
        teacher, head = _load_teacher(a)
        kw = dict(batch_size=a.per_device_eval_batch_size, dtype=a.dtype, answer_input=a.answer_input,
                  shard_bytes=parse_bytes(a.shard_bytes), **_store_kw(a))
        if rank == 0:
            print(format_estimate(estimate_size(teacher, samples, head=head, world_size=world, **kw)), flush=True)
        meta = build_cache(teacher, samples, a.output_dir, head=head, progress=True, skip_bad=not a.strict,
                           skipped=skipped, info={"preset": preset.name, "teacher": preset.teacher, **about}, **kw)
    if rank == 0:
        write_skip_report(a.output_dir, meta["skipped"])
        written = sum(f.stat().st_size for f in Path(a.output_dir).iterdir() if f.is_file())
        print(f"cached {meta['n']} samples in {len(meta['shards'])} shard(s), {written:,} B on disk; skipped "
              f"{len(meta['skipped'])} bad sample(s), ids and reasons in {Path(a.output_dir) / 'skipped.jsonl'}")
        print(json.dumps({k: v for k, v in meta.items() if k not in ("sample_ids", "skipped", "shards")}))
    if not end_launch() and dist.is_initialized():  # a sharded teacher's launch tears itself down; DDP's here
        dist.destroy_process_group()
