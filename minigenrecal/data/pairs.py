"""Rendering samples for training: both sides of every sample, bad ones skipped and recorded, never dropped silently."""
from __future__ import annotations

import json
from pathlib import Path

from minigenrecal.data.llava import SampleError, skip_entry
from minigenrecal.data.sources import iter_samples, open_source
from minigenrecal.data.synthetic import Sample
from minigenrecal.loop import PairData


def encode_pairs(teacher, student, samples: list[Sample], skipped: list | None = None
                 ) -> PairData:
    """Render every sample on both sides (teacher None: the student alone). A sample that either side rejects
    raises SampleError; with a `skipped` list it is left out of both sides and recorded there instead."""
    s_encs, t_encs = [], []
    for s in samples:
        try:
            pair = student.encode(s), (teacher.encode(s) if teacher is not None else None)
        except SampleError as e:
            if skipped is None:
                raise
            skipped.append(skip_entry(s.id, e))
            continue
        s_encs.append(pair[0])
        t_encs.append(pair[1])
    if not s_encs and samples:
        raise ValueError(f"no usable sample: all {len(samples)} were rejected (first: {skipped[0]})")
    return PairData(s_encs, t_encs if teacher is not None else None)


def as_samples(train, skipped: list | None = None) -> list[Sample]:
    """A list of Samples as it is; anything else `sources.open_source` reads (a `datasets.Dataset` or streaming
    `IterableDataset` with an Image or path column and LLaVA `conversations` or `question`/`answer` columns, a
    JSON/JSONL path, a `save_to_disk` directory) becomes one, images decoded; bad records go to `skipped`."""
    if isinstance(train, list):
        return train
    return list(iter_samples(open_source(train), "reject", skipped))


def write_skip_report(out, skipped: list[dict]) -> Path:
    """OUT/skipped.jsonl: one JSON line per skipped sample, {"id": ..., "reason": ...} (empty when none)."""
    path = Path(out) / "skipped.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in skipped))
    return path
