"""Command line: demo, evaluate, make-teacher, reproduce, cache-teacher, bench."""
from __future__ import annotations

import argparse
import json
import sys
import warnings


def _quiet():
    warnings.filterwarnings("ignore")
    from transformers.utils import logging
    logging.set_verbosity_error()


def cmd_demo(a):
    import torch
    from .config import get_preset
    from .pipeline import demo
    torch.manual_seed(0)
    preset = get_preset(a.preset)
    res = demo(preset, a.out, data_seed=a.data_seed, n_test=a.n_test, checkpoint_every=a.checkpoint_every,
               resume=a.resume)
    print(f"\n== minigenrecal demo ({preset.name}) ==")
    print(f"teacher accuracy         {res['teacher']:.3f}")
    print(f"student before           {res['student_before']:.3f}")
    for st in (1, 2, 3):
        print(f"student after stage {st}    {res[f'student_after_stage{st}']:.3f}")
    print(f"wall time                {res['seconds']:.0f} s")
    print(f"final student saved to   {a.out}/student; numbers in {a.out}/summary.json")


def cmd_evaluate(a):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from .data import make_split
    from .evaluate import exact_match
    from .vlm import VLMView
    model = AutoModelForImageTextToText.from_pretrained(a.student)
    proc = AutoProcessor.from_pretrained(a.student)
    res = exact_match(VLMView(model, proc, name="student"), make_split(a.data_seed, a.split, a.n))
    print(json.dumps({"student": a.student, "data_seed": a.data_seed, "split": a.split, "n": res["n"],
                      "accuracy": res["accuracy"]}))


def cmd_make_teacher(a):
    from .tiny import train_teacher
    info = train_teacher(a.out, steps=a.steps, n_train=a.n_train, seed=a.seed, threads=a.threads, task=a.task)
    print(json.dumps(info))


def main(argv=None):
    _quiet()
    p = argparse.ArgumentParser(prog="python -m minigenrecal", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="teacher -> stages 1, 2, 3 -> evaluation on the tiny pair (CPU, offline)")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--preset", default="tiny")
    d.add_argument("--data-seed", type=int, default=0)
    d.add_argument("--n-test", type=int, default=500)
    d.add_argument("--checkpoint-every", type=int, default=50,
                   help="optimizer steps between checkpoints in OUT/checkpoints (also at each stage's end); 0: none")
    d.add_argument("--resume", default=None, metavar="DIR",
                   help="continue a killed run from its latest complete checkpoint (the run's OUT, or OUT/checkpoints)")
    d.set_defaults(fn=cmd_demo)
    e = sub.add_parser("evaluate", help="exact-match accuracy of a saved student on fresh synthetic samples")
    e.add_argument("--student", required=True)
    e.add_argument("--data-seed", type=int, default=1)
    e.add_argument("--split", default="test")
    e.add_argument("--n", type=int, default=500)
    e.set_defaults(fn=cmd_evaluate)
    m = sub.add_parser("make-teacher", help="train the tiny teacher and save it (the shipped checkpoint)")
    from .tiny import TEACHER_DIR
    m.add_argument("--out", default=str(TEACHER_DIR))
    m.add_argument("--steps", type=int, default=3000)
    m.add_argument("--n-train", type=int, default=20000)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--threads", type=int, default=1, help="torch threads; the same count gives the same weights")
    m.add_argument("--task", default="shapes", choices=["shapes", "posterior"])
    m.set_defaults(fn=cmd_make_teacher)
    for extra in _extra_commands():
        extra(sub)
    a = p.parse_args(argv)
    a.fn(a)


def _extra_commands():
    """Subcommands that live in their own modules (reproduce, cache-teacher, bench, grade, ...)."""
    out = []
    for mod in ("reproduce", "cache", "bench", "train", "study.transfer", "study.warmstart", "grading"):
        try:
            m = __import__(f"minigenrecal.{mod}", fromlist=["add_command"])
        except ImportError:
            continue
        out.append(m.add_command)
    return out


if __name__ == "__main__":
    sys.exit(main())
