"""The command line: argparse and nothing else. Each room's commands are in their own module here, imported
explicitly (core: demo, evaluate, make-teacher; scale: train, cache-teacher, bench; study: reproduce, transfer,
make-warm-start; teach: grade, assignment; models: families); the library functions they call know nothing of
argparse. `train`, `demo` and `cache-teacher` also read their flags from `--config FILE` (cli/config.py)."""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from minigenrecal.cli.common import add_preset_option, add_tracking_options, quiet
from minigenrecal.cli.config import add_config_option, parse_with_config
from minigenrecal.cli.models import add_families_command
from minigenrecal.cli.scale import add_bench_command, add_cache_command, add_launch_command
from minigenrecal.cli.study import add_reproduce_command, add_transfer_command, add_warmstart_command
from minigenrecal.cli.teach import add_grading_command
from minigenrecal.data.synthetic import make_split
from minigenrecal.evaluation.exact_match import exact_match
from minigenrecal.models.hub import load_hub_vlm
from minigenrecal.models.presets import get_preset
from minigenrecal.models.tiny import TEACHER_DIR
from minigenrecal.models.vlm import VLMView
from minigenrecal.study.pipeline import demo
from minigenrecal.study.teacher import train_teacher


def cmd_demo(a):
    torch.manual_seed(a.seed)
    preset = get_preset(a.preset)
    res = demo(preset, a.output_dir, data_seed=a.data_seed, n_test=a.n_test, checkpoint_every=a.save_steps,
               resume=a.resume_from_checkpoint, seed=a.seed,
               tracking=dict(report_to=a.report_to, run_name=a.run_name, logging_steps=a.logging_steps))
    print(f"\n== minigenrecal demo ({preset.name}) ==")
    print(f"teacher accuracy         {res['teacher']:.3f}")
    print(f"student before           {res['student_before']:.3f}")
    for st in (1, 2, 3):
        print(f"student after stage {st}    {res[f'student_after_stage{st}']:.3f}")
    print(f"skipped samples          {res['skipped']} (ids and reasons in {a.output_dir}/skipped.jsonl)")
    print(f"wall time                {res['seconds']:.0f} s")
    print(f"final student saved to   {a.output_dir}/student; numbers in {a.output_dir}/summary.json")


def cmd_evaluate(a):
    model, proc = load_hub_vlm(a.student, dtype="float32")  # the family's processor stand-in without torchvision
    res = exact_match(VLMView(model, proc, name="student"), make_split(a.data_seed, a.split, a.n))
    print(json.dumps({"student": a.student, "data_seed": a.data_seed, "split": a.split, "n": res["n"],
                      "accuracy": res["accuracy"]}))


def cmd_make_teacher(a):
    info = train_teacher(a.out, steps=a.steps, n_train=a.n_train, seed=a.seed, threads=a.threads, task=a.task)
    print(json.dumps(info))


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: the core subcommands and those that live in their own modules."""
    p = argparse.ArgumentParser(prog="python -m minigenrecal", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="teacher -> stages 1, 2, 3 -> evaluation on the tiny pair (CPU, offline)")
    add_config_option(d)
    d.add_argument("--output_dir", default="runs/demo", help="output directory (student, summary.json, manifest.json)")
    add_preset_option(d)
    d.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic train and test splits")
    d.add_argument("--n-test", type=int, default=500, help="test samples for the accuracies")
    d.add_argument("--seed", type=int, default=0, help="torch's seed and the Recalibrator's init seed")
    d.add_argument("--save_steps", type=int, default=50, help="optimizer steps between checkpoints in "
                                                              "OUTPUT_DIR/checkpoints (also at each stage's end); 0: none")
    d.add_argument("--resume_from_checkpoint", default=None, metavar="DIR",
                   help="continue a killed run from its latest complete checkpoint (the run's OUTPUT_DIR, or "
                        "OUTPUT_DIR/checkpoints)")
    add_tracking_options(d)
    d.set_defaults(fn=cmd_demo)
    e = sub.add_parser("evaluate", help="exact-match accuracy of a saved student on fresh synthetic samples")
    e.add_argument("--student", required=True, help="directory of a saved student (model and processor)")
    e.add_argument("--data-seed", type=int, default=1, help="seed of the synthetic samples")
    e.add_argument("--split", default="test", choices=["train", "val", "test"], help="synthetic split to score")
    e.add_argument("--n", type=int, default=500, help="samples to score")
    e.set_defaults(fn=cmd_evaluate)
    m = sub.add_parser("make-teacher", help="train the tiny teacher and save it (the shipped checkpoint)")
    m.add_argument("--out", default=str(TEACHER_DIR), help="where to save it (default: the shipped teacher)")
    m.add_argument("--steps", type=int, default=3000, help="optimizer steps")
    m.add_argument("--n-train", type=int, default=20000, help="synthetic training samples")
    m.add_argument("--seed", type=int, default=0, help="init and data seed")
    m.add_argument("--threads", type=int, default=1, help="torch threads; the same count gives the same weights")
    m.add_argument("--task", default="shapes", choices=["shapes", "posterior"],
                   help="synthetic task: 'shapes' (answers fixed by the image) or 'posterior' (blended colours)")
    m.set_defaults(fn=cmd_make_teacher)
    for add in (add_launch_command, add_cache_command, add_bench_command, add_reproduce_command,
                add_transfer_command, add_warmstart_command, add_grading_command, add_families_command):
        add(sub)
    p.subcommands = sub.choices  # name -> its parser (for --config)
    return p


def main(argv=None):
    if not torch.cuda.is_available():  # accelerate imports DeepSpeed when installed; it would warn on every command
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    quiet()
    a = parse_with_config(build_parser(), argv)
    a.fn(a)


if __name__ == "__main__":
    sys.exit(main())
