"""Training data read lazily: records from a file or a `datasets` dataset, one rank's share, images decoded per item.

    source = open_source("train.jsonl", rank=acc.process_index, world_size=acc.num_processes)
    data = LazyPairData(source, student, teacher)           # map-style: a drop-in for loop.PairData
    data = StreamPairData(open_source(streamed_ds, rank=r, world_size=w), student, teacher)   # a stream

Records are LLaVA conversations (`conversations` + `image`) or chat format (`messages` of role/content with
`{"type": "image"}` parts + `images`, as TRL's VLM trainers read them; `llava.chat_as_llava`), in any source.
Sources (`open_source`): a LLaVA conversation `.json` list, a `.jsonl`/`.ndjson` file (one record per line), a
`datasets.Dataset`, a `datasets.IterableDataset` (streaming), or a directory written by `Dataset.save_to_disk`.
A record is kept un-decoded (a `Record`: its id, its conversation, a reference to its image) until a sample is
asked for; the same record logic as `data.read_llava_json` turns it into the same `Sample`s.

Decisions:
- **Sharding.** Record r belongs to rank r % world_size (a stride), so the ranks' shares are disjoint, cover every
  record, and a JSONL rank parses only its own lines. A JSON list must be parsed whole on every rank (use JSONL at
  scale); a `datasets.Dataset` is strided by `Dataset.shard(contiguous=False)`; a stream by
  `datasets.distributed.split_dataset_by_node`. All turns of a record stay on its rank. A map-style share is
  already this rank's: do not shard it a second time (e.g. by a distributed sampler).
- **Multi-turn records** ('split'/'context' give one sample per question/answer pair). Map-style data indexes
  samples as (record, turn): under 'reject' sample i is record i and nothing is read up front; under 'split' and
  'context' each record's turn count is read once at construction, from its text only (no image is opened; a
  record whose turns are malformed counts as one sample, which fails when accessed). Streams expand each record
  into its samples as they read it, and decode its image once for all of them.
- **Images** are decoded when a sample is accessed, one per sample (per record in a stream). A `datasets` Image
  column is read undecoded (`Image(decode=False)`) and decoded here, so that `to_rgb` converts it faithfully.
- **Bad samples** are never dropped silently. A record that cannot be read or a sample that either side cannot
  render is recorded once, as {"id": ..., "reason": ...} (the format of `llava.skip_entry`; a record's id
  when the record is bad, the sample's `<id>#<k>` when rendering fails), in the dataset's `skipped` list, which
  the caller writes out (`pipeline.write_skip_report`). With `strict=True` it raises the SampleError instead.
  A map-style item that fails is replaced by the next good item after it (wrapping around), so batches keep
  their size and `loop.make_collate` needs no change; a stream simply does not yield it.
- **Ids.** A record without an id is named `<name>[r]` (r: its index in the whole source, as `read_llava_json`
  names it); in a `datasets` stream, where that index is unknown, `<name>[<rank>.<j>]` (its j-th record on that
  rank). Relative image paths start at `image_root` (default: the data file's folder, else the current folder).
- **Processes.** `skipped` and a stream's `sample_id` live in the training process. Rendering can go to workers
  (`workers=N`, data/feed.py): a map-style share's DataLoader workers send their skip records back with the
  items; a stream is read here and only rendered in forked workers. A bare DataLoader with `num_workers` over a
  stream would split it among its workers and keep their skip records there: use `workers` instead.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from minigenrecal.data.feed import AHEAD, WorkerFed, bucketed, ordered, pass_seed, worker_loader
from minigenrecal.data.llava import (
    MULTI_TURN,
    SampleError,
    _record_image,
    as_llava,
    read_records,
    record_pairs,
    skip_entry,
    to_rgb,
)
from minigenrecal.data.synthetic import Sample
from minigenrecal.loop import RankLocal, make_loader

View = object  # a models.vlm.VLMView (or any object with its `encode`); data sits below models


# -- records -----------------------------------------------------------------------------------------------
@dataclass
class Record:
    """One record, un-decoded: `fields` holds 'conversations' (LLaVA turns) and 'image' (a file name, a `datasets`
    image {'bytes', 'path'}, or a PIL image); `error` says why a record could not even be read."""

    id: str
    fields: dict = field(default_factory=dict)
    root: Path = Path(".")
    error: str | None = None

    def pairs(self, multi_turn: str) -> list[tuple[str, str]]:
        """(question, answer) per sample under the policy; opens no image."""
        return record_pairs(self.llava(), self.id, multi_turn)

    def llava(self) -> dict:
        """The record's LLaVA fields (a chat-format record converted); raises SampleError for a bad record."""
        if self.error is not None:
            raise SampleError(f"sample {self.id}: {self.error}")
        return as_llava(self.fields, self.id)

    def image(self) -> Image.Image:
        """The record's image, decoded now, as 8-bit RGB."""
        value = self.llava().get("image")
        if isinstance(value, Image.Image):
            return to_rgb(value, self.id)
        if isinstance(value, dict) and value.get("bytes"):
            try:
                image = Image.open(io.BytesIO(value["bytes"]))
            except Exception as e:
                raise SampleError(f"sample {self.id}: the stored image is not a readable image ({e})") from e
            return to_rgb(image, self.id, "the stored image")
        if isinstance(value, dict):  # a `datasets` image stored by path only
            value = value.get("path")
        return _record_image({"image": value}, self.id, self.root)

    def samples(self, multi_turn: str) -> list[Sample]:
        """Every sample of the record; its image is decoded once and shared, as in `read_llava_json`."""
        pairs = self.pairs(multi_turn)
        image = self.image()
        return [Sample(image=image, question=q, answer=a, id=f"{self.id}#{k}") for k, (q, a) in enumerate(pairs)]

    def sample(self, k: int, multi_turn: str) -> Sample:
        """The record's k-th sample; decodes one image."""
        q, a = self.pairs(multi_turn)[k]
        return Sample(image=self.image(), question=q, answer=a, id=f"{self.id}#{k}")


def _worker() -> tuple[int, int]:
    """(this DataLoader worker, number of workers); (0, 1) in the main process."""
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..world_size-1, got rank={rank}, world_size={world_size}")


class MapRecords:
    """A map-style share: `len`, `share[j] -> Record`, iteration in order (split among DataLoader workers)."""

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, j: int) -> Record:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Record]:
        w, n_w = _worker()
        return (self[j] for j in range(w, len(self), n_w))

    def text_records(self) -> Iterator[Record]:
        """Every record of the share, images not read (for counting turns)."""
        return (self[j] for j in range(len(self)))


class JsonRecords(MapRecords):
    """A LLaVA conversation JSON list (parsed whole: a JSON list has no cheap partial parse); this rank's records."""

    def __init__(self, path: str | Path, rank: int = 0, world_size: int = 1, image_root: str | Path | None = None):
        self.path, self.rank, self.world = Path(path), rank, world_size
        self.root = Path(image_root) if image_root is not None else self.path.parent
        self.records = read_records(self.path)[rank::world_size]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, j: int) -> Record:
        rec = self.records[j]
        return Record(str(rec.get("id", f"{self.path.name}[{self.rank + j * self.world}]")), rec, self.root)


def _jsonl_lines(path: Path) -> Iterator[tuple[int, int, int, bytes]]:
    """(record index r, line number, byte offset, line) of each non-blank line; nothing is parsed."""
    r, offset = 0, 0
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                yield r, n, offset, line
                r += 1
            offset += len(line)


class JsonlRecords(MapRecords):
    """One LLaVA record per line; this rank's lines only are parsed. Iterating streams the file; indexing
    (`len`, `[j]`) first scans it once for the byte offsets of this rank's lines (without parsing them)."""

    def __init__(self, path: str | Path, rank: int = 0, world_size: int = 1, image_root: str | Path | None = None):
        self.path, self.rank, self.world = Path(path), rank, world_size
        self.root = Path(image_root) if image_root is not None else self.path.parent

    def _parse(self, r: int, n: int, line: bytes) -> Record:
        sid = f"{self.path.name}[{r}]"
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return Record(sid, root=self.root, error=f"line {n} of {self.path.name} is not one JSON record ({e})")
        if not isinstance(rec, dict):
            return Record(sid, root=self.root, error=f"line {n} of {self.path.name} is a {type(rec).__name__}, "
                                                     "not a JSON object")
        return Record(str(rec.get("id", sid)), rec, self.root)

    @cached_property
    def _offsets(self) -> list[tuple[int, int, int]]:
        """(r, line number, byte offset) of this rank's lines."""
        return [(r, n, o) for r, n, o, _ in _jsonl_lines(self.path) if r % self.world == self.rank]

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, j: int) -> Record:
        r, n, offset = self._offsets[j]
        with open(self.path, "rb") as f:
            f.seek(offset)
            return self._parse(r, n, f.readline())

    def __iter__(self) -> Iterator[Record]:
        w, n_w = _worker()  # line r is this worker's when r = rank + world * (w + n_w * m)
        stride, first = self.world * n_w, self.rank + self.world * w
        return (self._parse(r, n, line) for r, n, _, line in _jsonl_lines(self.path) if r % stride == first)


def _hf_record(row: dict, sid: str, root: Path, image_column: str) -> Record:
    """A `datasets` row as a Record: LLaVA 'conversations', chat 'messages' + 'images', or 'question'/'answer'
    columns (one pair)."""
    if row.get("messages") is not None:
        return Record(sid, {"messages": row["messages"], "images": row.get("images")}, root)
    conv = row.get("conversations")
    if conv is None and "question" in row:
        conv = [{"from": "human", "value": row["question"]}, {"from": "gpt", "value": row.get("answer")}]
    return Record(sid, {"conversations": conv, "image": row.get(image_column)}, root)


def _undecoded(ds, image_column: str):
    """The dataset with its Image column (and a chat dataset's `images` list of Image) read as {'bytes', 'path'}
    (decoded later, here, per sample)."""
    from datasets import Image as ImageFeature  # optional: only `datasets` sources need it
    from datasets import List, Sequence  # optional: only `datasets` sources need it
    features = ds.features or {}
    if isinstance(features.get(image_column), ImageFeature):
        ds = ds.cast_column(image_column, ImageFeature(decode=False))
    images = features.get("images")
    if isinstance(images, (List, Sequence)) and isinstance(images.feature, ImageFeature):
        ds = ds.cast_column("images", List(ImageFeature(decode=False)))
    return ds


class HFRecords(MapRecords):
    """A `datasets.Dataset` (in memory or memory-mapped from `save_to_disk`); this rank's rows r = rank + j * world.
    The image column holds a `datasets` Image (or PIL images) or file names under `image_root`."""

    def __init__(self, ds, rank: int = 0, world_size: int = 1, image_root: str | Path | None = None,
                 image_column: str = "image", id_column: str = "id", name: str = "dataset"):
        self.rank, self.world, self.name = rank, world_size, name
        self.root = Path(image_root) if image_root is not None else Path(".")
        self.image_column, self.id_column = image_column, id_column
        self.ds = _undecoded(ds, image_column).shard(world_size, rank, contiguous=False)

    def __len__(self) -> int:
        return len(self.ds)

    def _record(self, row: dict, j: int) -> Record:
        sid = row.get(self.id_column)
        sid = str(sid) if sid is not None else f"{self.name}[{self.rank + j * self.world}]"
        return _hf_record(row, sid, self.root, self.image_column)

    def __getitem__(self, j: int) -> Record:
        return self._record(self.ds[j], j)

    def text_records(self) -> Iterator[Record]:
        cols = [c for c in (self.id_column, "conversations", "messages", "question", "answer")
                if c in self.ds.column_names]
        return (self._record(row, j) for j, row in enumerate(self.ds.select_columns(cols)))


class HFStreamRecords:
    """A `datasets.IterableDataset`: this rank's part by `split_dataset_by_node` (whole shards when their count
    divides by world_size, else every world_size-th example); DataLoader workers split it further by shard."""

    def __init__(self, ds, rank: int = 0, world_size: int = 1, image_root: str | Path | None = None,
                 image_column: str = "image", id_column: str = "id", name: str = "stream"):
        from datasets.distributed import split_dataset_by_node  # optional: only `datasets` sources need it
        self.rank, self.name = rank, name
        self.root = Path(image_root) if image_root is not None else Path(".")
        self.image_column, self.id_column = image_column, id_column
        self.ds = split_dataset_by_node(_undecoded(ds, image_column), rank=rank, world_size=world_size)

    def __iter__(self) -> Iterator[Record]:
        for j, row in enumerate(self.ds):
            sid = row.get(self.id_column)
            yield _hf_record(row, str(sid) if sid is not None else f"{self.name}[{self.rank}.{j}]", self.root,
                             self.image_column)


def _one_split(ds, split: str):
    """A DatasetDict's `split`; a dataset unchanged."""
    import datasets  # optional: only `datasets` sources need it
    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split not in ds:
            raise ValueError(f"the dataset has splits {list(ds)}, not {split!r}; pass split=...")
        return ds[split]
    return ds


def open_source(data, rank: int = 0, world_size: int = 1, image_root: str | Path | None = None, *,
                split: str = "train", image_column: str = "image", id_column: str = "id"):
    """This rank's share of `data`, records un-decoded: a `.json` or `.jsonl` path, a `save_to_disk` directory, a
    `datasets.Dataset` (map-style: `MapRecords`) or a `datasets.IterableDataset` (a stream: iterate it)."""
    import datasets  # optional: only `datasets` sources need it
    _check_rank(rank, world_size)
    hf = dict(image_root=image_root, image_column=image_column, id_column=id_column)
    if isinstance(data, (str, Path)):
        path = Path(data)
        if path.is_dir():
            return HFRecords(_one_split(datasets.load_from_disk(str(path)), split), rank, world_size, name=path.name,
                             **hf)
        if path.suffix.lower() in (".jsonl", ".ndjson"):
            return JsonlRecords(path, rank, world_size, image_root)
        return JsonRecords(path, rank, world_size, image_root)
    data = _one_split(data, split)
    if isinstance(data, datasets.IterableDataset):
        return HFStreamRecords(data, rank, world_size, **hf)
    if isinstance(data, datasets.Dataset):
        return HFRecords(data, rank, world_size, **hf)
    raise TypeError(f"cannot read training data from a {type(data).__name__}: expected a .json/.jsonl path, a "
                    "save_to_disk directory, or a datasets.Dataset / IterableDataset")


# -- samples -----------------------------------------------------------------------------------------------
class SkipLog:
    """Bad samples: each recorded once in `records` as {"id", "reason"}, or raised when `records` is None (strict)."""

    def __init__(self, records: list | None):
        self.records, self.seen = records, set()

    def __call__(self, sid: str, e: SampleError) -> None:
        if self.records is None:
            raise e
        self.record(skip_entry(sid, e))

    def record(self, entry: dict) -> None:
        """Add a skip record {"id", "reason"} (one a render worker wrote), unless its id is recorded already."""
        if entry["id"] not in self.seen:
            self.seen.add(entry["id"])
            self.records.append(entry)


def _check_policy(multi_turn: str) -> None:
    if multi_turn not in MULTI_TURN:
        raise ValueError(f"multi_turn must be one of {list(MULTI_TURN)}, got {multi_turn!r}")


def iter_samples(records, multi_turn: str = "reject", skipped: list | SkipLog | None = None) -> Iterator[Sample]:
    """The samples of a share of records, in order, each record expanded as it is read (one image decode per
    record). Equals `read_llava_json(path, multi_turn=..., skipped=...)` over a whole file; a bad record raises
    SampleError, or with a `skipped` list (or a SkipLog) is left out and recorded there."""
    _check_policy(multi_turn)
    log = skipped if isinstance(skipped, SkipLog) else SkipLog(skipped)
    for record in records:
        try:
            samples = record.samples(multi_turn)
        except SampleError as e:
            log(record.id, e)
            continue
        yield from samples


class LazySamples:
    """Map-style samples of a `MapRecords` share: sample i = (record j, turn k); `[i]` decodes one image and raises
    SampleError for a bad record. The index holds turn counts only ('split'/'context'), never a sample."""

    def __init__(self, records: MapRecords, multi_turn: str = "reject"):
        _check_policy(multi_turn)
        self.records, self.multi_turn = records, multi_turn
        if multi_turn == "reject":  # one sample per record: nothing to read up front
            self.starts = None
        else:  # starts[j]: the first sample of record j
            self.starts = np.cumsum([0] + [self._turns(r) for r in records.text_records()])

    def _turns(self, record: Record) -> int:
        try:
            return len(record.pairs(self.multi_turn))
        except SampleError:
            return 1  # one sample, which fails (and is recorded) when it is accessed

    def __len__(self) -> int:
        return len(self.records) if self.starts is None else int(self.starts[-1])

    def locate(self, i: int) -> tuple[Record, int]:
        """(record, turn k) of sample i; reads the record, opens no image."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} of {len(self)}")
        if self.starts is None:
            return self.records[i], 0
        j = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.records[j], i - int(self.starts[j])

    def sample_id(self, i: int) -> str:
        record, k = self.locate(i)
        return f"{record.id}#{k}"

    def __getitem__(self, i: int) -> Sample:
        record, k = self.locate(i)
        return record.sample(k, self.multi_turn)


# -- what the training loop reads ----------------------------------------------------------------------------
def _encode(student: View, teacher: View | None, s: Sample) -> tuple:
    return student.encode(s), (teacher.encode(s) if teacher is not None else None)


class LazyPairData(RankLocal):
    """Map-style: `[i] -> (student Encoded, teacher Encoded or None, index)`, read, decoded and encoded on access,
    like `loop.PairData` (use `loop.make_collate`). A bad item is recorded in `skipped` (or raised when
    `strict`) and the next good item after it is returned instead, with its own index."""

    def __init__(self, records: MapRecords, student: View, teacher: View | None = None, *,
                 multi_turn: str = "reject", strict: bool = False, skipped: list | None = None, workers: int = 0):
        self.samples = LazySamples(records, multi_turn)
        self.student, self.teacher, self.workers = student, teacher, workers
        self.skipped = [] if skipped is None else skipped
        self.log, self.bad = SkipLog(None if strict else self.skipped), set()

    def make_loader(self, cfg, acc, g: torch.Generator, collate):
        """The loop's loader: `loop.make_loader`'s, rendered by `workers` DataLoader workers (feed.py)."""
        if not self.workers:
            return make_loader(self, cfg, acc, g, collate)
        return WorkerFed(worker_loader(self, cfg.batch_size, g, collate, self.workers), self, acc.device)

    def __len__(self) -> int:
        return len(self.samples)

    def sample_id(self, i: int) -> str:
        return self.samples.sample_id(i)

    def _try(self, i: int):
        """Item i, or None when it is bad (recorded under the record's id, or the sample's if rendering failed)."""
        record, k = self.samples.locate(i)
        name = record.id
        try:
            s = record.sample(k, self.samples.multi_turn)
            name = s.id
            return (*_encode(self.student, self.teacher, s), i)
        except SampleError as e:
            self.log(name, e)
            return None

    def __getitem__(self, i: int):
        n = len(self)
        if not 0 <= i < n:
            raise IndexError(f"item {i} of {n}")
        before = len(self.skipped)
        for j in (x % n for x in range(i, i + n)):
            if j in self.bad:
                continue
            item = self._try(j)
            if item is not None:  # in a DataLoader worker, with the skip records it wrote (feed.WorkerFed)
                return item if torch.utils.data.get_worker_info() is None else (*item, self.skipped[before:])
            self.bad.add(j)
        raise ValueError(f"no usable sample: all {n} were rejected (first: {self.skipped[:1]})")


class StreamPairData(torch.utils.data.IterableDataset):
    """A stream of `(student Encoded, teacher Encoded or None, k)`, k counting the samples this reader has yielded.
    Bad samples are recorded in `skipped` (once, across passes) and not yielded, or raised when `strict`.
    `sample_id(k)` names one of the last `id_window` samples (the loop names a batch's samples in its errors).
    `workers` render its records in forked processes; `buckets` sorts windows of that many batches by length; a
    `StreamPosition`'s shuffle buffer draws each pass's seed from the stage's generator (feed.py)."""

    def __init__(self, records, student: View, teacher: View | None = None, *, multi_turn: str = "reject",
                 strict: bool = False, skipped: list | None = None, id_window: int = 65536, workers: int = 0,
                 buckets: int = 0):
        _check_policy(multi_turn)
        self.records, self.student, self.teacher, self.multi_turn = records, student, teacher, multi_turn
        self.skipped = [] if skipped is None else skipped
        self.log = SkipLog(None if strict else self.skipped)
        self.count, self.ids = 0, [None] * id_window
        self.workers, self.buckets, self.batch_size, self.generator = workers, buckets, 1, None
        self.done, self.drop, self.mark = 0, 0, (0, 0)  # records done this pass; a resume's position (feed.py)

    def make_loader(self, cfg, acc, g: torch.Generator, collate):
        """In order, one process reading (`loop.make_loader`'s); each pass's seed comes from `g`."""
        self.batch_size, self.generator = cfg.batch_size, g
        return make_loader(self, cfg, acc, g, collate)

    def _render(self, record: Record) -> list[tuple[str, tuple | SampleError]]:
        """(sample id, rendered pair or the SampleError) per sample of a record (one image decode)."""
        try:
            samples = record.samples(self.multi_turn)
        except SampleError as e:
            return [(record.id, e)]
        out = []
        for s in samples:
            try:
                out.append((s.id, _encode(self.student, self.teacher, s)))
            except SampleError as e:
                out.append((s.id, e))
        return out

    def _samples(self) -> Iterator[tuple[tuple, str]]:
        for results in ordered(self._render, self.records, self.workers, ahead=AHEAD * self.batch_size):
            self.done += 1  # counted before its samples are yielded: a checkpoint between them skips the record
            for sid, out in results:
                if isinstance(out, SampleError):
                    self.log(sid, out)
                else:
                    yield out, sid

    def _window(self) -> int:
        """A bucket window begins: its position (records done, samples yielded) and its seed's label."""
        self.mark = (self.done, self.count)
        return self.done

    def __iter__(self):
        shuffle = getattr(self.records, "shuffle_buffer", 0) > 1
        seed = pass_seed(self.generator) if shuffle or self.buckets > 1 else 0
        if shuffle:
            self.records.seed = seed
        self.done = getattr(self.records, "skip", 0)  # a resume starts after the records it skips
        size = self.buckets * self.batch_size
        key = lambda x: sum(len(e.input_ids) for e in x[0] if e is not None)  # noqa: E731
        for pair, sid in bucketed(self._samples(), size, self.batch_size, key, seed, self._window):
            k, self.count = self.count, self.count + 1
            self.ids[k % len(self.ids)] = (k, sid)
            if self.drop:  # yielded before the checkpoint this run resumed from
                self.drop -= 1
                continue
            yield (*pair, k)

    def sample_id(self, k: int) -> str:
        entry = self.ids[k % len(self.ids)]
        if entry is None or entry[0] != k:
            raise KeyError(f"sample {k} is not among the last {len(self.ids)} this stream yielded")
        return entry[1]
