"""How far the fused teacher-head loss moves a training run from the unfused one: the tiny pair, stages 1-3.

    python benchmarks/fused_vs_unfused.py              # 10 steps per stage, chunk 16
    python benchmarks/fused_vs_unfused.py --steps 30 --chunk 64

Both runs start from the same seed and data; only `StageConfig.chunk_size` differs (None: the unfused loss, each
term its own tensor; a number: `chunked.fused_head_loss`). The two losses are the same function in exact arithmetic,
so every difference is float rounding (other summation orders) carried through AdamW (stage 3 has no head
loss: it shows what stages 1-2 passed on). Printed: per stage, the
largest relative difference of each recorded term over the steps, and at which step it first exceeds 1e-6.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import minigenrecal as mg  # noqa: E402
from minigenrecal.models.tiny import build_student, load_teacher  # noqa: E402

TERMS = ("loss", "ce_main", "kl_main", "ce_reg", "kl_reg", "ce_student")


def run(teacher, train, cfg):
    student = mg.VLMView(*build_student(0), name="student")
    return mg.run_genrecal(teacher, student, train, {1: cfg, 2: cfg, 3: cfg}, depth=1, progress=False)["histories"]


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--chunk", type=int, default=16)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    teacher = mg.VLMView(*load_teacher(), name="teacher")
    train = mg.make_split(0, "train", 48)
    cfg = mg.StageConfig(steps=a.steps, batch_size=8, lr=1e-3, lr_end=1e-4)
    unfused, fused = run(teacher, train, cfg), run(teacher, train, replace(cfg, chunk_size=a.chunk))
    out = {}
    print(f"tiny pair, CPU {torch.get_num_threads()} thread(s), {a.steps} steps per stage, fused chunk {a.chunk}")
    print("| stage | term | max relative difference | first step over 1e-6 |")
    print("|---|---|---|---|")
    for stage in (1, 2, 3):
        for term in TERMS:
            if term not in unfused[stage][0]:
                continue
            rel = [abs(f[term] - u[term]) / abs(u[term]) for u, f in zip(unfused[stage], fused[stage])]
            first = next((i for i, r in enumerate(rel) if r > 1e-6), None)
            out[(stage, term)] = max(rel)
            print(f"| {stage} | {term} | {max(rel):.1e} | {'-' if first is None else first} |")
    return out


if __name__ == "__main__":
    main()
