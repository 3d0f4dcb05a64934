"""Training the shipped tiny teacher (`make-teacher`) and what a rebuild must match."""
from __future__ import annotations

import hashlib
import json
import os
import random
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from minigenrecal.data.synthetic import make_split
from minigenrecal.evaluation.exact_match import exact_match
from minigenrecal.evaluation.metrics import posterior_metrics, prior_dists, true_posterior
from minigenrecal.loop import PairData, train_stage
from minigenrecal.models.tiny import ROOT, TEACHER_DIR, build_teacher
from minigenrecal.models.vlm import VLMView
from minigenrecal.scale.manifest import git_state, versions
from minigenrecal.stages import StageConfig


def build_record(threads: int) -> dict:
    """What a rebuild needs to match: thread count, CPU kernels, package versions, and the git commit with whether
    the package's code differed from it (scale/manifest.py's pieces, flat, as `training.json` stores them)."""
    git = git_state("minigenrecal")
    return {"threads": threads, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "versions": versions(),
            "git_commit": git["commit"], "package_code_modified": git["dirty"]}


def weights_digest(model) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes) in state-dict order: equal iff bit-identical."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def posterior_report(view, train: list, n_test: int = 500, data_seed: int = 0) -> dict:
    """Task 'posterior': the model vs the prior (image-blind) and the Bayes-optimal predictor (the posterior itself)
    on `n_test` test items: `metrics.posterior_scores` plus greedy exact match against the most likely answer."""

    test = make_split(data_seed, "test", n_test, task="posterior")
    mode = [replace(s, answer=max(s.posterior, key=s.posterior.get)) for s in test]
    out = {"model": posterior_metrics(view, test), "prior": posterior_metrics(None, test, prior_dists(train, test)),
           "bayes_optimal": posterior_metrics(None, test, [true_posterior(s) for s in test])}
    out["model"]["exact_match_mode"] = exact_match(view, mode)["accuracy"]
    out["model"]["exact_match_label"] = exact_match(view, test)["accuracy"]
    return out


def seed_everything(seed: int) -> None:
    """Seed every RNG a build touches (Python, NumPy, torch); the thread count is fixed by `fixed_threads`."""


    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def fixed_threads(threads: int):
    """Run with `threads` torch threads (they set the reduction order, hence the exact floats), then restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_teacher(out: str | Path = TEACHER_DIR, steps: int = 3000, n_train: int = 20000, batch_size: int = 32,
                  lr: float = 7e-4, lr_end: float = 5e-5, warmup: int = 200, vision_lr_scale: float = 0.3,
                  seed: int = 0, n_val: int = 500, n_test: int = 500, threads: int = 1, task: str = "shapes",
                  log=print) -> dict:
    """Train the tiny teacher with its own CE on the synthetic train split and save it (fp16 weights, < 10 MB).

    This is what `python -m minigenrecal make-teacher` runs. The same arguments and thread count give bit-identical
    weights (`weights_sha256`, over the fp32 weights before the fp16 save); the arguments, the thread count,
    package versions, git commit, and val/test exact match (data seed 0) are saved beside the weights.
    `task` is 'shapes' (the synthetic task) or 'posterior' (blended colours, labels sampled from a known posterior).
    """


    t0, cpu0 = time.time(), time.process_time()
    with fixed_threads(threads):
        seed_everything(seed)
        model, proc = build_teacher(seed)
        view = VLMView(model, proc, name="teacher")
        train = make_split(seed, "train", n_train, task=task)
        data = PairData([view.encode(s) for s in train])
        cfg = StageConfig(steps=steps, batch_size=batch_size, lr=lr, lr_end=lr_end, seed=seed, train_vision=True,
                          warmup_steps=warmup, vision_lr_scale=vision_lr_scale)
        hist = train_stage(3, view, data, cfg, progress=False)
        digest = weights_digest(model)
        val = exact_match(view, make_split(0, "val", n_val, task=task))["accuracy"]
        test = exact_match(view, make_split(0, "test", n_test, task=task))["accuracy"]
        extra = {"posterior_test": posterior_report(view, train, n_test)} if task == "posterior" else {}
    log(f"teacher ({task}) exact match: val {val:.3f}, test {test:.3f} after {steps} steps "
        f"(final loss {hist[-1]['loss']:.4f}, {time.time() - t0:.0f} s on {threads} thread(s))")
    out = Path(out)
    model.half().save_pretrained(out)
    proc.save_pretrained(out)
    model.float()
    where = out.resolve().relative_to(ROOT) if out.resolve().is_relative_to(ROOT) else out
    command = (f"python -m minigenrecal make-teacher --out {where} --steps {steps} --n-train {n_train} "
               f"--seed {seed} --threads {threads}" + (f" --task {task}" if task != "shapes" else ""))
    info = {"command": command, "task": task, "val_accuracy": val, "test_accuracy": test,
            "eval": f"exact match on {n_val} val and {n_test} test items of data seed 0, before the fp16 save",
            "steps": steps, "n_train": n_train, "batch_size": batch_size, "lr": lr, "lr_end": lr_end,
            "warmup": warmup, "vision_lr_scale": vision_lr_scale, "seed": seed, "final_loss": hist[-1]["loss"],
            "weights_sha256": digest, "seconds": round(time.time() - t0, 1),
            "cpu_seconds": round(time.process_time() - cpu0, 1), **build_record(threads), **extra}
    (out / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    return info
