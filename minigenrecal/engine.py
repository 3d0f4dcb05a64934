"""One training engine per run: the student and the Recalibrator form one module, prepared once.

Decision: a run prepares ONE module (student + Recalibrator) and ONE AdamW for all three stages; a stage does not
prepare anything new (a second `prepare` would leave DeepSpeed stepping the first engine). It switches what trains:

- Every parameter that trains in SOME stage of the run gets `requires_grad=True` once, before preparing, so DDP's
  reducer, FSDP2 and DeepSpeed all know it from the start. What a stage does not train receives no gradient
  (stage 1 runs the student body under `no_grad`; stage 3 never calls the Recalibrator), and its optimizer
  group runs at lr 0, which leaves AdamW's update and its decoupled weight decay exactly zero.
- The optimizer has three groups, `recal`, `llm` (the student's LLM and projector) and `vision`. `begin(stage)`
  sets each group's lr and weight decay from that stage's config, clears AdamW's moments (each stage starts
  fresh, as the paper's three separate runs do), starts the stage's LR schedule and sets its gradient
  accumulation.
- Trainable parameters are fp32 master weights on every path, whatever dtype the weights loaded in; compute
  runs in bf16 under autocast (accelerate) or FSDP2's MixedPrecisionPolicy or DeepSpeed's bf16 on CUDA.

`train_stage` without an engine builds a one-stage engine (what the notebooks and the tiny pipeline do): the same
code, and for one stage exactly the optimizer the earlier per-stage loop made (AdamW skips parameters without
gradient, so the extra groups change nothing).

The teacher's head is never part of the module: it stays a replicated, frozen `nn.Linear` on every rank, read by
the chunked losses. Why replicate and not gather per chunk: at 72B it is 152,064 x 8,192 x 2 bytes = 2.5 GB per
GPU once, while gathering it would move those 2.5 GB per chunk, several times per step (docs/scaling.md).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .stages import GenRecal, StageConfig, param_kind

GROUPS = ("recal", "llm", "vision")


def trains(group: str, stage: int, cfg: StageConfig) -> bool:
    """Does `stage` train `group`? (METHOD.md decision 7: stage 1 the Recalibrator only; 2 both; 3 the student.)"""
    if group == "recal":
        return stage == 1 or (stage == 2 and cfg.train_recal)
    if group == "llm":
        return stage in (2, 3)
    return stage in (2, 3) and cfg.train_vision


def group_of(name: str) -> str:
    """The optimizer group of a GenRecal parameter name ('recal.*', or 'student.*' split by `param_kind`)."""
    if name.startswith("recal."):
        return "recal"
    return "vision" if param_kind(name) == "vision" else "llm"


def decay_fn(cfg: StageConfig):
    """LR multiplier per step: optional linear warmup (0 by default, as in the paper), then linear lr -> lr_end."""
    def decay(s):
        if s < cfg.warmup_steps:
            return (s + 1) / cfg.warmup_steps
        return 1.0 - (1.0 - cfg.lr_end / cfg.lr) * min(s, cfg.steps) / max(cfg.steps, 1)
    return decay


class Engine:
    """Student + Recalibrator (+ the frozen teacher head beside them) prepared once for the stages in `plan`.

    backend: one of sharding.py's backends (default: the one the launch asks for, `sharding.get_backend`).
    After `begin(stage, cfg)`: `acc` (the accelerate-like object the loop talks to), `module`, `opt`, `sched`.
    """

    def __init__(self, student, recal: nn.Module | None, teacher_head: nn.Linear | None,
                 plan: dict[int, StageConfig], backend=None):
        from .sharding import get_backend
        self.backend = backend or get_backend()
        module = GenRecal(student, recal, teacher_head)
        on = {g: any(trains(g, s, c) for s, c in plan.items()) for g in GROUPS}
        for name, p in module.named_parameters():
            p.requires_grad_(on[group_of(name)])
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()  # fp32 master weights (AdamW's 1e-5-scale updates vanish in bf16)
        module = self.backend.wrap(module)  # FSDP2 shards here, before the optimizer sees the parameters
        groups = [{"params": [p for n, p in module.named_parameters() if p.requires_grad and group_of(n) == g],
                   "lr": 0.0, "name": g} for g in GROUPS]
        opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=0.0)
        self.acc = self.backend.acc
        self.module, self.opt, self.inner = self.backend.prepare_module(module, opt)
        self.sched = None

    def begin(self, stage: int, cfg: StageConfig):
        """Switch to `stage`: per-group lr and weight decay, fresh AdamW moments, the stage's schedule and
        gradient accumulation. Returns the LR scheduler."""
        self.backend.set_grad_accum(cfg.grad_accum)
        for g in self.inner.param_groups:
            lr = (cfg.lr * (cfg.vision_lr_scale if g["name"] == "vision" else 1.0)) if trains(g["name"], stage, cfg) else 0.0
            g["lr"] = g["initial_lr"] = lr
            g["weight_decay"] = cfg.weight_decay
        self.inner.state.clear()
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.inner, decay_fn(cfg))
        return self.sched
