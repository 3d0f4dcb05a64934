"""Step time of stages 1 and 2 on the `train` path (`run_stages`, the loop every launch uses), and the loader's share.

    python benchmarks/bench_step.py                       # tiny pair, 24 steps per stage, batch 16
    python benchmarks/bench_step.py --chunk 64 --json out.json
    python benchmarks/bench_step.py --stream --workers 1      # rendered per batch from a JSONL stream, 1 render worker
    python benchmarks/bench_step.py --lazy --workers 1        # the same file read lazily (shuffled), a DataLoader worker

The pair is the offline tiny one (the shipped teacher, a random-init student), rendered once; the stages run through
`minigenrecal.run_stages` exactly as a launch does, with one callback that times each optimizer step
(`on_step_end`) and wraps the loop's batch iterator to time each draw (`on_stage_begin`): `scale.tracking.StepTimer`,
which every `train` launch also runs. Figures printed:
  - each stage's median step time (the first `--warmup` steps of a stage are left out),
  - the stage-2 / stage-1 ratio of the medians,
  - the loader's share: seconds inside the loop's `next(batches)` (collate and moving to the device; the samples are
    pre-rendered, as `--cache`/`encode_pairs` give them) over the stage's wall time, the warm-up steps left out.
    With `--stream`, the samples are written as a JSONL file with PNG images and read as `train --stream` reads
    them (`StreamPairData`): decoding and rendering both sides then happen inside the draw, or in `--workers`
    render processes beside training (data/feed.py), with `--shuffle_buffer` and `--length_buckets`.
A CPU figure only: there is no device queue here, so host syncs cost nothing; what shows is the host-side work.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import minigenrecal as mg  # noqa: E402
from minigenrecal.models.tiny import build_student, load_teacher  # noqa: E402
from minigenrecal.scale.tracking import StepTimer  # noqa: E402


def stream_data(a, teacher, student, samples):
    """The samples as `train --stream` (or `--lazy`) reads a JSONL file: images decoded as batches are drawn."""
    from minigenrecal.data.llava import write_llava_json
    from minigenrecal.data.sources import LazyPairData, StreamPairData, open_source
    from minigenrecal.scale.checkpoint import StreamPosition
    folder = tempfile.mkdtemp(prefix="bench_step_")
    records = json.loads(write_llava_json(samples, folder).read_text())
    path = os.path.join(folder, "train.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    if a.lazy:
        return LazyPairData(open_source(path), student, teacher, workers=a.workers)
    return StreamPairData(StreamPosition(open_source(path), a.shuffle_buffer), student, teacher, workers=a.workers,
                          buckets=a.length_buckets)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--chunk", type=int, default=None, help="chunk_size of the teacher-head loss (default: unchunked)")
    p.add_argument("--json", default=None)
    p.add_argument("--stream", action="store_true", help="render per batch from a JSONL stream (as train --stream)")
    p.add_argument("--lazy", action="store_true", help="render per batch from a JSONL file, shuffled (as train --lazy)")
    p.add_argument("--workers", type=int, default=0, help="with --stream/--lazy: render worker processes")
    p.add_argument("--shuffle_buffer", type=int, default=0, help="with --stream: records in the shuffle buffer")
    p.add_argument("--length_buckets", type=int, default=0, help="with --stream: batches per length-bucket window")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    teacher = mg.VLMView(*load_teacher(), name="teacher")
    student = mg.VLMView(*build_student(0), name="student")
    # read lazily: one pass over the file covers the run (a new pass restarts the render workers)
    samples = mg.make_split(0, "train", (a.steps + 1) * a.batch if a.stream or a.lazy else 4 * a.batch)
    data = stream_data(a, teacher, student, samples) if a.stream or a.lazy else mg.encode_pairs(teacher, student, samples)
    cfg = mg.StageConfig(steps=a.steps, batch_size=a.batch, lr=1e-3, lr_end=1e-4, chunk_size=a.chunk)
    timer = StepTimer(warmup=a.warmup)  # what every `train` launch records in train_log.json (`timing`)
    mg.run_stages({1: cfg, 2: cfg}, student, data, teacher, depth=2, progress=False, callbacks=[timer])
    out = dict(device="cpu", threads=torch.get_num_threads(), torch=torch.__version__, steps=a.steps, warmup=a.warmup,
               batch=a.batch, chunk=a.chunk, stream=a.stream, lazy=a.lazy, workers=a.workers, shuffle_buffer=a.shuffle_buffer,
               length_buckets=a.length_buckets, stages={})
    timing = timer.summary()
    for stage in (1, 2):
        out["stages"][stage] = dict(step_s=timing[stage]["step_ms"] / 1e3, loader_share=timing[stage]["loader_share"])
    out["ratio_2_over_1"] = timing["ratio_2_over_1"]
    print(f"tiny pair, CPU {out['threads']} thread(s), torch {torch.__version__}, batch {a.batch}, chunk {a.chunk}, "
          f"median of {a.steps - a.warmup} steps; " + (f"--stream, {a.workers} render worker(s), shuffle buffer "
                                                      f"{a.shuffle_buffer}, length buckets {a.length_buckets}" if a.stream else
                                                      f"--lazy, {a.workers} DataLoader worker(s)" if a.lazy else
                                                      "pre-rendered samples"))
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
