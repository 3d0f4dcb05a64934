"""Experiment trackers (`--report_to tensorboard|trackio|wandb`, default none) through accelerate's tracker classes.

    tracking = Tracking(["tensorboard"], "runs/x", "x", config=vars(args), plan=cfgs, logging_steps=10)
    run_stages(..., callbacks=[tracking])         # every logging_steps steps: each loss term, the LR, skipped steps
    tracking.log_eval(stage, {"exact_match": 0.52})   # the evaluation after a stage (the demo's)
    tracking.finish()

Decisions:
- **One step axis for the run.** A stage's step s is logged at the global step (steps of the plan's earlier
  stages) + s, so stages follow each other on one axis; names carry the stage: `stage1/loss`, `stage1/ce`,
  `stage1/lr`, `stage1/skipped_steps`, and `eval/exact_match` at the stage's last step.
- **Per window, as transformers' Trainer logs.** Every `logging_steps` optimizer steps (and at a stage's end) a
  term is the mean over the steps since the last log, the LR is the last step's, `skipped_steps` counts the
  non-finite steps the loop skipped in that window.
- **Where.** tensorboard writes under OUT/runs/<run_name> (transformers' layout); trackio and wandb use their own
  stores and settings (e.g. `WANDB_MODE=offline`). Only the main process logs.
- The run's configuration goes to each tracker as flat hyperparameters (`store_init_configuration`).
- **Step time and the loader's share** (`StepTimer`, every `train` launch): per stage, the median wall time of an
  optimizer step and the share of the stage's time spent drawing batches (`next(batches)`: rendering where it is
  not done ahead, collate, the move to the device), its first `warmup` steps left out. The loop reads the step's
  losses on the host once per step, so on a GPU a step's wall time includes its kernels. In OUT/train_log.json
  (`timing`) and printed at the end.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

from minigenrecal.loop import Callback, LoopState
from minigenrecal.stages import StageConfig

REPORT_TO = ("none", "tensorboard", "trackio", "wandb")
NOT_TERMS = ("stage", "step", "lr", "skipped", "stage_seconds")  # history keys that are not loss terms


def flat_config(config: dict, prefix: str = "") -> dict:
    """Nested settings as one level of bool/str/int/float values (what trackers take as hyperparameters)."""
    out = {}
    for k, v in config.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_config(v, f"{name}."))
        elif isinstance(v, (bool, int, float, str)):
            out[name] = v
        elif v is not None:
            out[name] = str(v)
    return out


def open_trackers(report_to: list[str], logging_dir: str | Path, run_name: str) -> list:
    """accelerate's tracker objects, started; a tracker whose package is missing is refused by name."""
    names = [n for n in dict.fromkeys(report_to) if n != "none"]
    unknown = [n for n in names if n not in REPORT_TO]
    if unknown:
        raise ValueError(f"--report_to {unknown[0]!r}: expected one of {', '.join(REPORT_TO)}")
    available = {str(t) for t in get_available_trackers()}
    missing = [n for n in names if n not in available]
    if missing:
        raise ValueError(f"--report_to {missing[0]}: the {missing[0]} package is not installed "
                         f"(pip install {missing[0]}), or use --report_to none")
    trackers = []
    for n in names:
        cls = LOGGER_TYPE_TO_CLASS[n]
        tracker = cls(run_name, str(logging_dir)) if cls.requires_logging_directory else cls(run_name)
        tracker.start()
        trackers.append(tracker)
    return trackers


class Tracking(Callback):
    """Logs a run's stages to accelerate's trackers (see the module's decisions); a no-op for `['none']`."""

    def __init__(self, report_to: list[str], output_dir: str | Path, run_name: str | None = None, *,
                 config: dict | None = None, plan: dict[int, StageConfig], logging_steps: int = 10,
                 main_process: bool = True):
        if logging_steps < 1:
            raise ValueError(f"--logging_steps must be at least 1, got {logging_steps}")
        self.logging_steps, self.window = logging_steps, []
        self.offset, self.steps, total = {}, {}, 0
        for stage, cfg in plan.items():  # the global step of each stage's step 0
            self.offset[stage], self.steps[stage], total = total, cfg.steps, total + cfg.steps
        self.run_name = run_name or Path(output_dir).name or "run"
        self.logging_dir = Path(output_dir) / "runs"
        self.trackers = open_trackers(report_to, self.logging_dir, self.run_name) if main_process else []
        if self.trackers and config:
            for tracker in self.trackers:
                tracker.store_init_configuration(flat_config(config))

    def log(self, values: dict, step: int) -> None:
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def on_stage_begin(self, st: LoopState) -> None:
        self.window = []

    def on_step_end(self, st: LoopState) -> None:
        self.window.append(st.history[-1])
        if st.step % self.logging_steps == 0 or st.step == st.cfg.steps:
            self._flush(st.stage, st.step)

    def on_stage_end(self, st: LoopState) -> None:
        if self.window:
            self._flush(st.stage, st.step)

    def _flush(self, stage: int, step: int) -> None:
        rows, self.window = self.window, []
        terms = [k for k in rows[-1] if k not in NOT_TERMS]
        values = {f"stage{stage}/{k}": sum(r[k] for r in rows) / len(rows) for k in terms}
        values[f"stage{stage}/lr"] = rows[-1]["lr"]
        values[f"stage{stage}/skipped_steps"] = sum(bool(r.get("skipped")) for r in rows)
        self.log(values, self.offset.get(stage, 0) + step)

    def log_eval(self, stage: int | None, metrics: dict) -> None:
        """An evaluation after `stage` (None: before training), at that stage's last step."""
        step = 0 if stage is None else self.offset[stage] + self.steps[stage]
        self.log({f"eval/{k}": v for k, v in metrics.items()}, step)

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()


class TimedBatches:
    """The loop's batch iterator, timing each draw."""

    def __init__(self, batches):
        self.batches, self.seconds = batches, []

    def __next__(self):
        t0 = time.perf_counter()
        batch = next(self.batches)
        self.seconds.append(time.perf_counter() - t0)
        return batch

    def __getattr__(self, name):  # the position a checkpoint saves (epoch_state, drawn, ...): the wrapped iterator's
        return getattr(self.batches, name)


class StepTimer(Callback):
    """Per stage: the wall time of each optimizer step and of each batch draw (`summary()`: medians and shares).
    Put it after a resuming Checkpointer in the callbacks: it wraps the batches that one has positioned."""

    def __init__(self, warmup: int = 4):
        self.warmup, self.steps, self.draws = warmup, {}, {}

    def on_stage_begin(self, st: LoopState) -> None:
        st.batches = TimedBatches(st.batches)
        self.steps[st.stage], self.draws[st.stage], self._t = [], st.batches.seconds, time.perf_counter()

    def on_step_end(self, st: LoopState) -> None:
        now = time.perf_counter()
        self.steps[st.stage].append(now - self._t)
        self._t = now

    def summary(self) -> dict:
        """{stage: step_ms (median), loader_share, steps timed}, and the stage-2 / stage-1 ratio of the medians."""
        out = {}
        for stage, steps in self.steps.items():
            k = min(self.warmup, len(steps) // 4)  # a short stage keeps three quarters of its steps
            timed = steps[k:]
            draws = self.draws[stage][k * (len(self.draws[stage]) // max(len(steps), 1)):]
            if timed:
                out[stage] = {"step_ms": 1e3 * statistics.median(timed), "loader_share": sum(draws) / sum(timed),
                              "steps": len(timed)}
        if 1 in out and 2 in out:
            out["ratio_2_over_1"] = out[2]["step_ms"] / out[1]["step_ms"]
        return out
