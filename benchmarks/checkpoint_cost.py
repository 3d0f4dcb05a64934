"""What a checkpoint costs on the tiny preset: seconds to write and bytes on disk, per stage.

    OMP_NUM_THREADS=1 python benchmarks/checkpoint_cost.py [--repeat 3]

The shipped tiny teacher and the tiny student, the tiny preset's stage configs cut to 2 steps each; one checkpoint
at each stage's end (`Checkpointer.save`: state dicts, state.json, the tokenizer, fsync, rename).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from minigenrecal.scale.checkpoint import Checkpointer, complete_checkpoints  # noqa: E402
from minigenrecal.models.presets import get_preset  # noqa: E402
from minigenrecal.data.synthetic import make_split  # noqa: E402
from minigenrecal.data.pairs import encode_pairs
from minigenrecal.study.pipeline import load_pair  # noqa: E402
from minigenrecal.recalibrator import Recalibrator  # noqa: E402
from minigenrecal.loop import train_stage  # noqa: E402


class Timed(Checkpointer):
    def save(self, *args, **kw):
        t0 = time.perf_counter()
        out = super().save(*args, **kw)
        self.seconds = time.perf_counter() - t0
        return out


def size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    preset = get_preset("tiny")
    teacher, student = load_pair(preset)
    data = encode_pairs(teacher, student, make_split(0, "train", 64))
    torch.manual_seed(0)
    recal = Recalibrator(teacher.d, student.text_config, preset.depth)
    n_student = sum(p.numel() for p in student.model.parameters())
    print(f"student {n_student:,} parameters, Recalibrator {sum(p.numel() for p in recal.parameters()):,}")
    with tempfile.TemporaryDirectory() as d:
        for stage in (1, 2, 3):
            cfg = replace(preset.stages()[stage], steps=2)
            secs = []
            for _ in range(a.repeat):
                ck = Timed(Path(d) / "checkpoints")
                train_stage(stage, student, data, cfg, teacher=teacher, recal=recal, progress=False, checkpoint=ck)
                secs.append(ck.seconds)
            point = complete_checkpoints(Path(d) / "checkpoints")[-1]
            files = {f.name: f.stat().st_size for f in point.iterdir() if f.is_file()}
            print(f"stage {stage}: write {min(secs):.3f} s (best of {a.repeat}), {size(point):,} bytes; files {files}")


if __name__ == "__main__":
    main()
