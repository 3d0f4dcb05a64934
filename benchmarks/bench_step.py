"""Step time of stages 1 and 2 on the `train` path (`run_stages`, the loop every launch uses), and the loader's share.

    python benchmarks/bench_step.py                       # tiny pair, 24 steps per stage, batch 16
    python benchmarks/bench_step.py --chunk 64 --json out.json

The pair is the offline tiny one (the shipped teacher, a random-init student), rendered once; the stages run through
`minigenrecal.run_stages` exactly as a launch does, with one callback that times each optimizer step
(`on_step_end`) and wraps the loop's batch iterator to time each draw (`on_stage_begin`). Figures printed:
  - each stage's median step time (the first `--warmup` steps of a stage are left out),
  - the stage-2 / stage-1 ratio of the medians,
  - the loader's share: seconds inside the loop's `next(batches)` (collate and moving to the device; the samples are
    pre-rendered, as `--cache`/`encode_pairs` give them) over the stage's wall time, the warm-up steps left out.
A CPU figure only: there is no device queue here, so host syncs cost nothing; what shows is the host-side work.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import minigenrecal as mg  # noqa: E402
from minigenrecal.models.tiny import build_student, load_teacher  # noqa: E402


class TimedBatches:
    """The loop's batch iterator, timing each draw."""

    def __init__(self, batches):
        self.batches, self.seconds = batches, []

    def __next__(self):
        t0 = time.perf_counter()
        batch = next(self.batches)
        self.seconds.append(time.perf_counter() - t0)
        return batch

    def __getattr__(self, name):  # state_dict, load_state_dict, drawn: the wrapped iterator's
        return getattr(self.batches, name)


class StepTimer(mg.Callback):
    """Per stage: the wall time of each optimizer step and of each batch draw."""

    def __init__(self):
        self.steps, self.draws = {}, {}

    def on_stage_begin(self, st):
        st.batches = TimedBatches(st.batches)
        self.steps[st.stage], self.draws[st.stage], self._t = [], st.batches.seconds, time.perf_counter()

    def on_step_end(self, st):
        now = time.perf_counter()
        self.steps[st.stage].append(now - self._t)
        self._t = now


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--chunk", type=int, default=None, help="chunk_size of the teacher-head loss (default: unchunked)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    teacher = mg.VLMView(*load_teacher(), name="teacher")
    student = mg.VLMView(*build_student(0), name="student")
    data = mg.encode_pairs(teacher, student, mg.make_split(0, "train", 4 * a.batch))
    cfg = mg.StageConfig(steps=a.steps, batch_size=a.batch, lr=1e-3, lr_end=1e-4, chunk_size=a.chunk)
    timer = StepTimer()
    mg.run_stages({1: cfg, 2: cfg}, student, data, teacher, depth=2, progress=False, callbacks=[timer])
    out = dict(device="cpu", threads=torch.get_num_threads(), torch=torch.__version__, steps=a.steps, warmup=a.warmup,
               batch=a.batch, chunk=a.chunk, stages={})
    for stage in (1, 2):
        steps, draws = timer.steps[stage][a.warmup:], timer.draws[stage][a.warmup:]
        out["stages"][stage] = dict(step_s=statistics.median(steps), loader_share=sum(draws) / sum(steps))
    out["ratio_2_over_1"] = out["stages"][2]["step_s"] / out["stages"][1]["step_s"]
    print(f"tiny pair, CPU {out['threads']} thread(s), torch {torch.__version__}, batch {a.batch}, chunk {a.chunk}, "
          f"median of {a.steps - a.warmup} steps")
    print("| stage | step ms (median) | loader share |")
    print("|---|---|---|")
    for stage, r in out["stages"].items():
        print(f"| {stage} | {1e3 * r['step_s']:.1f} | {100 * r['loader_share']:.1f}% |")
    print(f"stage-2 / stage-1 step time: {out['ratio_2_over_1']:.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
