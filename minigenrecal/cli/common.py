"""What every command group shares: quiet library logging, and --preset / --teacher / --student."""
from __future__ import annotations

import argparse
import warnings

from transformers.utils import logging

from minigenrecal.models.presets import PRESETS, Preset, get_preset
from minigenrecal.scale.tracking import REPORT_TO


def quiet() -> None:
    """No warnings and no transformers info lines on the command line."""
    warnings.filterwarnings("ignore")
    logging.set_verbosity_error()


class _PairAction(argparse.Action):
    """Stores --preset, --teacher or --student, and keeps `preset` the typed `Preset` that the three name, in
    whatever order they were given (no flag at all leaves the default name, which `get_preset` reads the same)."""

    def __call__(self, parser, ns, value, option_string=None):
        setattr(ns, self.dest, value)
        name = ns.preset.name if isinstance(ns.preset, Preset) else ns.preset
        if self.dest == "preset":
            name = value
        ns.preset = get_preset(name, teacher=getattr(ns, "teacher", None), student=getattr(ns, "student", None))


def add_preset_option(p, default: str = "tiny") -> None:
    """`--preset`: one of PRESETS, whose names the help lists; `--teacher` / `--student` replace its models."""
    p.add_argument("--preset", default=default, choices=list(PRESETS), metavar="NAME", action=_PairAction,
                   help=f"named preset, one of: {', '.join(PRESETS)} (default: {default})")
    for side in ("teacher", "student"):
        p.add_argument(f"--{side}", default=None, metavar="ID_OR_DIR", action=_PairAction,
                       help=f"the {side} VLM instead of the preset's: a hub id, a local directory (model and "
                            f"processor, e.g. a saved student) or 'tiny'; the preset's other settings stay")


def add_tracking_options(p, logging_steps: int = 10) -> None:
    """`--report_to`, `--logging_steps`, `--run_name`: transformers' names, accelerate's trackers (scale/tracking.py)."""
    p.add_argument("--report_to", nargs="+", default=["none"], choices=REPORT_TO, metavar="TRACKER",
                   help=f"experiment trackers, one or more of: {', '.join(REPORT_TO)} (default none); tensorboard "
                        "writes OUTPUT_DIR/runs/RUN_NAME")
    p.add_argument("--logging_steps", type=int, default=logging_steps,
                   help=f"optimizer steps between tracker logs (mean of each loss term over them; default "
                        f"{logging_steps})")
    p.add_argument("--run_name", default=None, help="the run's name in the trackers (default: OUTPUT_DIR's name)")
