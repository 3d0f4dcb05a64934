"""Commands of the scale-up room: train (the launch), cache-teacher, bench."""
from __future__ import annotations

import argparse
import json

import torch

from minigenrecal.cli.common import add_preset_option, add_tracking_options
from minigenrecal.cli.config import add_config_option
from minigenrecal.data.llava import MULTI_TURN
from minigenrecal.models.presets import PRESETS
from minigenrecal.scale.bench import (WillNotFit, bench, print_estimate, print_table, real_length_memory_table,
                                      training_memory_table)
from minigenrecal.scale.cache import cache_teacher
from minigenrecal.scale.launch import run


# -- the command of minigenrecal.scale.launch ---------------------------------------------------------------------------
def count(text: str) -> int:
    """A whole number >= 0 (workers, records, batches), or argparse's error naming the flag."""
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {n}")
    return n


def add_data_options(p) -> None:
    """--data, --image-root, --multi-turn, --strict: the same for `train` and `cache-teacher` (use the same values
    for both, so the cache holds the samples training asks for)."""
    p.add_argument("--data", default=None, help="LLaVA conversation records or chat-format ones (messages + "
                                                "images), a .json list or a .jsonl file (default: the synthetic "
                                                "train split)")
    p.add_argument("--image-root", default=None, help="folder the records' image names are relative to "
                                                      "(default: the data file's folder)")
    p.add_argument("--multi-turn", default="reject", choices=list(MULTI_TURN),
                   help="records with several question/answer pairs: reject them (default), 'context' (each answer "
                        "with the earlier turns as text), or 'split' (each pair on its own, earlier turns dropped)")
    p.add_argument("--strict", action="store_true",
                   help="fail on the first bad sample instead of skipping it (skipped ones go to OUT/skipped.jsonl)")


def add_launch_command(sub) -> None:
    t = sub.add_parser("train", help="stages 1-3 for a preset (launch with `accelerate launch -m minigenrecal train`)")
    add_config_option(t)
    add_preset_option(t)
    t.add_argument("--stages", default="1,2,3", help="comma-separated, e.g. 1,2")
    add_data_options(t)
    t.add_argument("--lazy", action="store_true",
                   help="with --data: each process reads only its share, rendering images per batch (not all up "
                        "front); bad samples are found, skipped and reported as training meets them")
    t.add_argument("--stream", action="store_true",
                   help="with --data: like --lazy, read in order as a stream (JSONL: a process parses only its lines)")
    t.add_argument("--dataloader_num_workers", type=count, default=None,
                   help="with --lazy/--stream: processes that render samples beside training (default: the preset's; "
                        "0 renders in the training process)")
    t.add_argument("--shuffle_buffer", type=count, default=None,
                   help="with --stream: records in its shuffle buffer, each pass in a new order (default: the preset's;"
                        " 0 reads in order)")
    t.add_argument("--length_buckets", type=count, default=None,
                   help="with --stream: sort windows of this many batches by length, then shuffle their batches "
                        "(default: the preset's; 0 off)")
    t.add_argument("--n", type=int, default=None, help="synthetic samples (default: the preset's n_train)")
    t.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic train split")
    t.add_argument("--cache", default=None, help="teacher cache dir: stages 1-2 without the teacher body")
    t.add_argument("--tiny-random", action="store_true", help="the preset's model classes at tiny size, random init")
    t.add_argument("--max_steps", type=int, default=None, help="optimizer steps of every stage (default: the preset's)")
    t.add_argument("--per_device_train_batch_size", type=int, default=None,
                   help="samples per process per micro-batch, every stage (default: the preset's)")
    t.add_argument("--gradient_accumulation_steps", type=int, default=None,
                   help="micro-batches per optimizer step, every stage (default: the preset's)")
    t.add_argument("--learning_rate", type=float, default=None,
                   help="peak LR of every stage; each stage's final LR keeps the preset's ratio to it (default: the "
                        "preset's)")
    t.add_argument("--seed", type=int, default=0, help="Recalibrator init and data-order seed")
    t.add_argument("--recal-in", default=None, metavar="DIR",
                   help="start from the Recalibrator an earlier launch saved (its OUTPUT_DIR, or the .safetensors "
                        "file): stages as separate launches, e.g. --stages 3 --student OUT/student after a --stages "
                        "1,2 launch")
    t.add_argument("--output_dir", default=None, help="default: runs/train, or the resumed run's directory")
    t.add_argument("--no-save", action="store_true", help="write nothing under OUTPUT_DIR (no student, no checkpoints)")
    t.add_argument("--save_steps", type=int, default=100,
                   help="optimizer steps between checkpoints in OUTPUT_DIR/checkpoints (also at each stage's end); "
                        "0: none")
    t.add_argument("--resume_from_checkpoint", default=None, metavar="DIR",
                   help="continue from the latest complete checkpoint of a run (its OUTPUT_DIR, or "
                        "OUTPUT_DIR/checkpoints)")
    t.add_argument("--max-skips", type=int, default=3,
                   help="stop after this many steps in a row with a non-finite loss or gradient (each is skipped)")
    add_tracking_options(t)
    t.add_argument("--state-out", default=None, help=argparse.SUPPRESS)
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(fn=run)


# -- the command of minigenrecal.scale.cache ----------------------------------------------------------------------------
def add_cache_command(sub) -> None:
    c = sub.add_parser("cache-teacher", help="run the frozen teacher once over the training samples and store its "
                                             "features (rerun the same command to resume an interrupted build)")
    add_config_option(c)
    add_preset_option(c)
    add_data_options(c)
    c.add_argument("--n", type=int, default=None,
                   help="samples: the first n of --data, or of the synthetic split (default: all / the preset's n_train)")
    c.add_argument("--output_dir", required=True, help="cache directory to write (an interrupted build there resumes)")
    c.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic train split")
    c.add_argument("--per_device_eval_batch_size", type=int, default=32, help="samples per teacher forward")
    c.add_argument("--shard-bytes", default="2GiB", help="largest shard file, e.g. 2GiB, 512MiB (default 2GiB); "
                                                         "a sample larger than this gets a shard of its own")
    c.add_argument("--dtype", default="bfloat16", help="stored feature dtype (bfloat16, float16, float32)")
    c.add_argument("--answer-input", default="features", choices=["features", "embeddings"],
                   help="what the Recalibrator reads at answer positions: teacher features or answer embeddings")
    c.add_argument("--store", default="full", choices=["full", "answers"],
                   help="full: every feature a sample's losses read (default); answers: the answer-predicting rows, "
                        "and the question features only for the samples --reg-every selects (docs/cache.md)")
    c.add_argument("--reg-every", type=int, default=1, metavar="K",
                   help="with --store answers: samples at input positions divisible by K keep their question "
                        "features, which the regularization path trains on (default 1: all)")
    c.add_argument("--stream", action="store_true",
                   help="with --data: read the records in order and decode only the current batch's images (bounded "
                        "memory; several processes and resume as without it; docs/cache.md)")
    c.add_argument("--teacher-dir", default=None, help="tiny preset: a teacher checkpoint other than the shipped one")
    c.set_defaults(fn=cache_teacher)


# -- the command of minigenrecal.scale.bench ----------------------------------------------------------------------------
def add_bench_command(sub) -> None:
    b = sub.add_parser("bench", help="stage 1/2 step time, tokens/s, peak memory and MFU from config dimensions")
    add_preset_option(b, default="smolvlm-256m<-qwen2-vl-2b")
    b.add_argument("--random-weights", action="store_true", help="required: models are random-init from DIMS")
    b.add_argument("--scale", type=float, default=None, help="shrink widths/depths/vocab (default 1 on CUDA, 0.05 on CPU)")
    b.add_argument("--batch", type=int, default=None, help="samples per step (default 4 on CUDA, 2 on CPU)")
    b.add_argument("--lq", type=int, default=None, help="question tokens (student; teacher uses the same)")
    b.add_argument("--la", type=int, default=None, help="answer tokens")
    b.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up step)")
    b.add_argument("--chunk", type=int, default=1024, help="teacher-head loss chunk (0: naive)")
    b.add_argument("--cache", action="store_true", help="no teacher body (stages 1-2 from a teacher cache)")
    b.add_argument("--stages", default="1,2", help="comma-separated stages to time")
    b.add_argument("--peak-tflops", type=float, default=989.0, help="the device's peak bf16 TFLOP/s, for MFU")
    b.add_argument("--gpus", type=int, default=1, help="GPU count for the printed memory estimate (ZeRO-3 sharding)")
    b.add_argument("--estimate-only", action="store_true", help="print every preset's memory estimate; build nothing")
    b.add_argument("--capacity-gib", type=float, default=None, help="memory to refuse above (default: the GPU's)")
    b.add_argument("--force", action="store_true", help="build even when the estimate exceeds the memory")
    b.add_argument("--json", default=None, help="also write the rows to this JSON file")
    b.add_argument("--memory-table", action="store_true",
                   help="print docs/scaling.md's training memory tables (every preset and GPU count at 768 + 256 "
                        "tokens; then stage 2 at each preset's real lengths, without and with activation "
                        "checkpointing; arithmetic)")

    def run(a):
        cuda = torch.cuda.is_available()
        scale = a.scale or (1.0 if cuda else 0.05)
        shape = dict(batch=a.batch or (4 if cuda else 2), lq=a.lq or (768 if cuda else 48), la=a.la or (256 if cuda else 16))
        stages = [int(s) for s in a.stages.split(",")]
        if a.memory_table:
            print("\n".join(training_memory_table() + [""] + real_length_memory_table()))
            return
        if a.estimate_only:
            for name in PRESETS:
                if name != "tiny":
                    print_estimate(name, stages, gpus=a.gpus, use_cache=a.cache, chunk=a.chunk or None, scale=scale,
                                   **shape)
            return
        if not a.random_weights:
            raise SystemExit("bench builds random-init models from config dimensions: pass --random-weights")
        if a.gpus != 1:
            print_estimate(a.preset, stages, gpus=a.gpus, use_cache=a.cache, chunk=a.chunk or None, scale=scale, **shape)
        try:
            rows = bench(a.preset, scale=scale, steps=a.steps, chunk=a.chunk or None, use_cache=a.cache, stages=stages,
                         peak_flops=a.peak_tflops * 1e12, capacity_gib=a.capacity_gib, force=a.force, verbose=True,
                         **shape)
        except WillNotFit as e:
            raise SystemExit(str(e))
        print_table(rows)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(rows, f, indent=1)
    b.set_defaults(fn=run)
