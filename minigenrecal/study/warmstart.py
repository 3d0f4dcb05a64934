"""The students' warm start: SFT on captions from a pool disjoint from every split.

Every method in the transfer study starts from the same warm start, so a comparison measures what each method passes
on, not how fast a random vision encoder learns to see. There are two: the cross-tokenizer student (Idefics3, the
kit's student) and the same-tokenizer student (Llava with the teacher's tokenizer, for the positive control).
`python -m minigenrecal make-warm-start` rebuilds both; the same arguments and thread count give the same weights.
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from minigenrecal.data.synthetic import make_caption_pool
from minigenrecal.evaluation.exact_match import exact_match
from minigenrecal.loop import PairData, train_stage
from minigenrecal.models.tiny import ROOT, build_student
from minigenrecal.models.vlm import VLMView
from minigenrecal.stages import StageConfig
from minigenrecal.study.baselines import build_same_tokenizer_student
from minigenrecal.study.teacher import build_record, weights_digest

KINDS = ("cross_tokenizer", "same_tokenizer")
WARM_DIR = ROOT / "data_samples" / "warm_start"


def _build(kind: str, seed: int):
    if kind == "cross_tokenizer":
        return build_student(seed)
    if kind == "same_tokenizer":
        return build_same_tokenizer_student(seed)
    raise ValueError(f"unknown warm-start kind {kind!r}; choose from {KINDS}")


def train_warm_start(kind: str, out: str | Path | None = None, n: int = 12000, steps: int = 1500, batch_size: int = 32,
                     lr: float = 1e-3, lr_end: float = 1e-4, warmup: int = 100, seed: int = 0, threads: int = 1,
                     n_eval: int = 300, log=print) -> dict:
    """Caption SFT of a random-init student (vision encoder included); saves weights + processor + training.json."""
    t0 = time.time()
    torch.set_num_threads(threads)  # the thread count sets the reduction order, hence the exact floats
    random.seed(seed)
    torch.manual_seed(seed)
    model, proc = _build(kind, seed)
    view = VLMView(model, proc, name=kind)
    data = PairData([view.encode(s) for s in make_caption_pool(seed, n)])
    cfg = StageConfig(steps=steps, batch_size=batch_size, lr=lr, lr_end=lr_end, warmup_steps=warmup, seed=seed,
                      train_vision=True)
    hist = train_stage(3, view, data, cfg, progress=False)
    held_out = make_caption_pool(seed + 1, n_eval)  # another pool seed: captions never trained on
    acc = exact_match(view, held_out)["accuracy"]
    out = Path(out or WARM_DIR / kind)
    model.save_pretrained(out)
    proc.save_pretrained(out)
    info = {"command": f"python -m minigenrecal make-warm-start --kind {kind} --n {n} --steps {steps} --seed {seed} "
                       f"--threads {threads}", "kind": kind, "n_captions": n, "steps": steps, "batch_size": batch_size,
            "lr": lr, "lr_end": lr_end, "warmup": warmup, "seed": seed, "final_loss": hist[-1]["loss"],
            "held_out_caption_exact_match": acc, "weights_sha256": weights_digest(model),
            "seconds": round(time.time() - t0, 1), **build_record(threads)}
    (out / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    log(f"warm start {kind}: held-out caption exact match {acc:.3f} ({info['seconds']:.0f} s)")
    return info


def load_warm_start(kind: str, path: str | Path | None = None):
    """(model, processor) of a shipped warm start; a fresh copy on every call."""
    path = Path(path or WARM_DIR / kind)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no warm start at {path}; build it with `python -m minigenrecal make-warm-start`")
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    return model.eval(), AutoProcessor.from_pretrained(path)
