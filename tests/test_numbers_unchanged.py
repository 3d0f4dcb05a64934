"""A refactor moves no number: the loss histories of every training path on the tiny pair (GenRecal stages 1-3 with
both answer inputs, and the three distillation baselines) equal, float for float, those of the code before the
package was restructured (`tests/data/loss_histories.json`, written by `tests/refactor_reference.py`)."""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from refactor_reference import OUT, histories  # noqa: E402

SKIP = {"method", "stage", "skipped", "stage_seconds"}  # labels, not numbers (the baselines' records gained two)


def numbers(h: dict) -> dict:
    return {k: v for k, v in h.items() if k not in SKIP}


def test_loss_histories_are_bit_for_bit_those_of_the_reference():
    if torch.get_num_threads() != 2:
        torch.set_num_threads(2)  # the reference was written on 2 threads (thread count changes float sums)
    want, got = json.loads(OUT.read_text()), histories()
    assert set(got) == set(want)
    for path in want:
        w, g = want[path], got[path]
        if isinstance(w, dict):
            assert set(w) == set(g), path
            pairs = [(f"{path} stage {s}", a, b) for s in w for a, b in zip(w[s], g[s])]
            assert all(len(w[s]) == len(g[s]) for s in w), path
        else:
            assert len(w) == len(g), path
            pairs = [(path, a, b) for a, b in zip(w, g)]
        for where, a, b in pairs:
            assert numbers(a) == numbers(b), (where, numbers(a), numbers(b))
