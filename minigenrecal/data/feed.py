"""How rendered samples reach the training loop at scale: render workers, a stream's shuffle buffer, length buckets.

The loop asks a data set for its loader (`data.make_loader(cfg, acc, g, collate)` where it has one, else
`loop.make_loader`). `LazyPairData` and `StreamPairData` (sources.py) have one:

    LazyPairData(records, student, teacher, workers=4)        # DataLoader workers render the batches ahead
    StreamPairData(StreamPosition(records, shuffle_buffer=1000), student, teacher, workers=4, buckets=8)

`train --stream` / `--lazy` set them with `--dataloader_num_workers`, `--shuffle_buffer` and `--length_buckets`.

Decisions:
- **Workers render; the training process keeps the books.** Decoding, tiling and tokenizing are what stall a step.
  - A map-style share is rendered by DataLoader workers (`num_workers`, TRL's and the Trainer's
    `dataloader_num_workers`), in the sampler's order, two batches ahead per worker. Each item carries back the
    skip records its worker wrote, and the training process adds them to `skipped` as the batch arrives, so a
    checkpoint's skip report holds exactly the bad samples met before it.
  - A stream is read in the training process, and only each record's decoding and rendering goes to a pool of
    forked workers, in order, two batches of records ahead (or 2 x workers, if more): the next batch renders while
    this one trains. Its position (records done), its sample ids and its skip records stay where a checkpoint
    reads them.
  - A stream's rendered records come back pickled: as plain bytes when small (torch's shared memory passes each
    tensor as a file descriptor, about 1 ms apiece, more than copying a tiny sample), in shared memory above 1 MiB
    (a 30 MiB InternVL sample: 4.5 ms to unpickle instead of 22, nothing copied through the pipe; docs/scaling.md).
  - Workers run the same rendering function as the training process: the batches are bit-identical with or without
    them. Workers are forked (Linux's default): the views they render with are inherited, never pickled.
- **A stream's shuffle buffer** (`shuffle_buffer` records; the algorithm of `datasets`' `IterableDataset.shuffle`):
  the first `shuffle_buffer` records fill it, then each new record takes the place of a random one, which is
  emitted; at the end the rest come out in a random order. The buffer holds records (text and an image reference),
  never decoded images. Each pass over the share (each stage, and each restart at its end) draws its seed from the
  stage's generator: stage 2 does not begin where stage 1 began, and a resume redraws the same order. A shuffle
  buffer is local: no record comes out more than `shuffle_buffer` places before its place in the file.
- **Length buckets** (`buckets` batches; a stream only): the stream renders `buckets x batch` samples, sorts them
  by length (the teacher's plus the student's tokens), cuts them into batches and yields those in a random order
  (seeded by the pass and the window). Fewer pad tokens; each window holds the same samples as without buckets.
  A resume renders the window it stopped in once more and skips what was already yielded. A `--lazy` share is not
  bucketed: its lengths are known only once rendered, and its sampler draws the indices first.
"""
from __future__ import annotations

import multiprocessing as mp
import pickle
import random
from collections import deque
from multiprocessing.reduction import ForkingPickler
from typing import Callable, Iterable, Iterator

import torch
from torch.utils.data import DataLoader

from minigenrecal.loop import on_device

AHEAD = 2  # batches in flight (a stream's render pool: at least 2 records per worker)
SHARE_BYTES = 1 << 20  # a stream's rendered record above this crosses in shared memory, below as bytes


def shuffled(records: Iterable, buffer: int, seed: int) -> Iterator:
    """`records` through a shuffle buffer of `buffer` items (fewer than 2: in order), seeded."""
    if buffer < 2:
        yield from records
        return
    rng, buf = random.Random(seed), []
    for r in records:
        if len(buf) < buffer:
            buf.append(r)
            continue
        j = rng.randrange(buffer)
        yield buf[j]
        buf[j] = r
    rng.shuffle(buf)
    yield from buf


def pass_seed(g: torch.Generator | None) -> int:
    """A pass's seed, drawn from the stage's generator (0 without one)."""
    return 0 if g is None else int(torch.randint(2 ** 62, (), generator=g))


# -- a stream: records read here, rendered in a pool of forked workers, in order ---------------------------------
_JOB: Callable | None = None  # the function a forked worker runs (inherited at the fork)


def _init_worker() -> None:
    torch.set_num_threads(1)  # as DataLoader workers: the training process keeps the cores it asked for


def _nbytes(x) -> int:
    """The bytes of every tensor in x (lists, tuples, dicts, objects' attributes)."""
    if torch.is_tensor(x):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(map(_nbytes, x))
    if isinstance(x, dict):
        return sum(map(_nbytes, x.values()))
    return _nbytes(vars(x)) if hasattr(x, "__dict__") else 0


def _run(x) -> bytes:
    """fn(x), pickled here. Under SHARE_BYTES of tensors, as plain bytes through the pipe; above, its tensors in
    shared memory (torch's sharing: one file descriptor a tensor, about 1 ms apiece, nothing copied through the
    pipe). A tiny sample (98 KB) costs less copied; a 30 MiB InternVL sample unpickles in 4.5 ms shared against 22 ms
    copied, and 31 MB less goes through the pipe."""
    out = _JOB(x)
    if _nbytes(out) < SHARE_BYTES:
        return pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL)
    return bytes(ForkingPickler.dumps(out))


def ordered(fn: Callable, items: Iterable, workers: int, ahead: int = 0) -> Iterator:
    """fn(x) for each x, in order: in this process (workers=0), or in `workers` forked processes with at most
    max(ahead, AHEAD x workers) items in flight (memory stays bounded however long `items` is)."""
    global _JOB
    if workers <= 0:
        yield from map(fn, items)
        return
    _JOB = fn
    pool = mp.get_context("fork").Pool(workers, initializer=_init_worker)
    try:
        pending = deque()
        for x in items:
            pending.append(pool.apply_async(_run, (x,)))
            if len(pending) >= max(ahead, AHEAD * workers):
                yield pickle.loads(pending.popleft().get())
        while pending:
            yield pickle.loads(pending.popleft().get())
    finally:
        pool.terminate()


def bucketed(items: Iterable, size: int, batch: int, key: Callable, seed: int, on_window: Callable) -> Iterator:
    """Windows of `size` items, each sorted by `key`, cut into batches of `batch` and yielded in a random order
    seeded by (seed, the label `on_window()` returns as the window begins). size <= batch: unchanged."""
    if size <= batch:
        yield from items
        return
    it = iter(items)
    while True:
        label = on_window()
        window = [x for _, x in zip(range(size), it)]  # zip asks range first: nothing is read past the window
        if not window:
            return
        window.sort(key=key)  # stable: equal lengths keep the stream's order
        batches = [window[i: i + batch] for i in range(0, len(window), batch)]
        random.Random(f"{seed}.{label}").shuffle(batches)
        for b in batches:
            yield from b


# -- a map-style share: DataLoader workers, their skip records carried back with the items ----------------------
class WorkerFed:
    """A DataLoader whose workers render; each batch arrives with the skip records written while rendering it,
    which are added to `data`'s skip report here, in the training process. Batches come out on `device` (as
    `loop.on_device`'s do)."""

    def __init__(self, loader: DataLoader, data, device):
        self.loader, self.data, self.device = loader, data, device

    def __iter__(self):
        return iter(on_device(self._received(), self.device))

    def _received(self):
        for batch, skips in self.loader:
            for entry in skips:
                self.data.log.record(entry)
            yield batch


def with_skips(collate: Callable) -> Callable:
    """A collate for items (student, teacher, index, skip records): the batch, and the items' skip records."""
    return lambda items: (collate([it[:3] for it in items]), [e for it in items for e in it[3]])


def worker_loader(data, batch_size: int, g: torch.Generator, collate: Callable, workers: int) -> DataLoader:
    """The map-style loader `loop.make_loader` builds for a share (shuffled by `g`), rendered by `workers`. Not
    `persistent_workers`: a reused iterator draws from `g` otherwise than a new one, so a resumed run (a new loader)
    would shuffle its next epoch differently (`tests/test_feed.py` sees it)."""
    return DataLoader(data, batch_size=batch_size, shuffle=True, generator=g, drop_last=len(data) >= batch_size,
                      collate_fn=with_skips(collate), num_workers=workers, prefetch_factor=AHEAD,
                      multiprocessing_context="fork")
