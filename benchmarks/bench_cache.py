"""Stage-1 throughput: training from the teacher cache against running the live teacher, on two pairs.

    OMP_NUM_THREADS=1 python benchmarks/bench_cache.py [--steps 20] [--batch 16]

Pairs (random init, built offline from config):
  tiny: the tiny pair's classes and sizes (Llava teacher d_l=192, 4 layers; Idefics3 student d_s=96, 2 layers)
  mid:  Llava teacher d_l=1024, 12 layers (text), Idefics3 student d_s=256, 4 layers
Throughput = samples per second of `stages.train_stage(1, ...)` over --steps steps (after a 1-step warm-up run),
collate and data loading included; the cache is read from disk (memory-mapped bf16 safetensors, returned in fp32).
The one-off cost of building the cache is reported beside it.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from minigenrecal.scale.cache import TeacherCache, build_cache  # noqa: E402
from minigenrecal.data.synthetic import make_split  # noqa: E402
from minigenrecal.recalibrator import Recalibrator  # noqa: E402
from minigenrecal.loop import PairData, train_stage
from minigenrecal.stages import StageConfig  # noqa: E402
from minigenrecal.models.tiny import build_student, build_teacher  # noqa: E402
from minigenrecal.models.families import build_tiny_vlm
from minigenrecal.models.vlm import VLMView  # noqa: E402


def pair(kind):
    if kind == "tiny":
        (tm, tp), (sm, sp) = build_teacher(1), build_student(0)
    else:
        (tm, tp), (sm, sp) = build_tiny_vlm("llava", seed=1, d=1024, layers=12), build_tiny_vlm("idefics3", seed=0, d=256, layers=4)
    return VLMView(tm.requires_grad_(False), tp, name="teacher"), VLMView(sm, sp, name="student")


def run(kind, n, steps, batch):
    teacher, student = pair(kind)
    samples = make_split(0, "train", n)
    data = PairData([student.encode(s) for s in samples], [teacher.encode(s) for s in samples])
    cfg = StageConfig(steps=steps, batch_size=batch, lr=1e-3)
    t_params = sum(p.numel() for p in teacher.model.parameters())
    s_params = sum(p.numel() for p in student.model.parameters())
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        build_cache(teacher, samples, d, batch_size=32)
        build_s = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in Path(d).iterdir())
        cache = TeacherCache(d)
        head = cache.head(torch.float32)
        out = {}
        for mode in ("live", "cache"):
            torch.manual_seed(0)
            recal = Recalibrator(teacher.d, student.text_config)
            kw = (dict(teacher=teacher) if mode == "live" else
                  dict(teacher=None, teacher_head=head, teacher_fn=cache.teacher_fn))
            d_ = data if mode == "live" else PairData(data.s)
            train_stage(1, student, d_, StageConfig(steps=1, batch_size=batch), recal=recal, progress=False, **kw)
            t0 = time.perf_counter()
            train_stage(1, student, d_, cfg, recal=recal, progress=False, **kw)
            out[mode] = steps * batch / (time.perf_counter() - t0)
    return dict(pair=kind, teacher_M=t_params / 1e6, student_M=s_params / 1e6, live=out["live"], cache=out["cache"],
                speedup=out["cache"] / out["live"], build_s=build_s, n=n, cache_mb=size / 2 ** 20)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--pairs", default="tiny,mid")
    a = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rows = [run(k, a.n, a.steps, a.batch) for k in a.pairs.split(",")]
    print(f"\nStage 1 from the teacher cache vs the live teacher (CPU, {torch.get_num_threads()} thread(s), "
          f"batch {a.batch}, {a.steps} steps, torch {torch.__version__})")
    print("| pair | teacher params (M) | student params (M) | live samples/s | cache samples/s | speedup | "
          "cache build (s, n samples) | cache size (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['pair']} | {r['teacher_M']:.1f} | {r['student_M']:.1f} | {r['live']:.1f} | {r['cache']:.1f} | "
              f"{r['speedup']:.2f}x | {r['build_s']:.1f} ({r['n']}) | {r['cache_mb']:.1f} |")


if __name__ == "__main__":
    main()
