"""How the CPU thread count changes the numbers: the tiny preset's SFT stage (stage 3 alone, seed 0) at 1 and 2
torch threads, and at 1 thread twice.

    python benchmarks/threads.py [--steps 300] [--n-test 500]

Prints, per run: the final loss, exact-match accuracy on the test split, and whether the per-step losses are
bit-identical to the first 1-thread run (and if not, the first step where they differ and the largest difference).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from minigenrecal.models.presets import get_preset  # noqa: E402
from minigenrecal.data.synthetic import make_split  # noqa: E402
from minigenrecal.evaluation.exact_match import exact_match  # noqa: E402
from minigenrecal.loop import PairData, train_stage  # noqa: E402
from minigenrecal.models.tiny import build_student  # noqa: E402
from minigenrecal.models.vlm import VLMView  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--n-test", type=int, default=500)
    a = ap.parse_args()
    preset = get_preset("tiny")
    cfg = preset.stage3.__class__(**{**preset.stage3.__dict__, "steps": a.steps})
    model, proc = build_student(0)  # one processor for every run
    train, test = make_split(0, "train", preset.n_train), make_split(0, "test", a.n_test)
    data = PairData([VLMView(model, proc).encode(s) for s in train])
    rows, ref = [], None
    for threads in (1, 2, 1):
        torch.set_num_threads(threads)
        student = VLMView(copy.deepcopy(model), proc, name="student")
        torch.manual_seed(0)
        losses = [h["loss"] for h in train_stage(3, student, data, cfg, progress=False)]
        acc = exact_match(student, test)["accuracy"]
        ref = ref or losses
        diff = [i for i, (x, y) in enumerate(zip(losses, ref)) if x != y]
        rows.append({"threads": threads, "final_loss": losses[-1], "accuracy": acc, "identical_to_first": not diff,
                     "first_differing_step": diff[0] if diff else None,
                     "max_abs_loss_diff": max(abs(x - y) for x, y in zip(losses, ref))})
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
