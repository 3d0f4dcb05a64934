"""GenRecal's three stages: the teacher's forward, each stage's loss, and one flat training loop (accelerate)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .checkpoint import Batches, Checkpointer, NonFiniteError, all_finite, fault
from .losses import TeacherOut, recal_path, split_teacher
from .recalibrator import Recalibrator
from .sharding import get_accelerator, on_device  # noqa: F401 (get_accelerator: re-exported, one per process)
from .vlm import Encoded, VLMView


@dataclass
class StageConfig:
    """One set of knobs for a stage. LR decays linearly from `lr` to `lr_end` within the stage (paper: 1e-4 -> 1e-5)."""

    steps: int = 100
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-4
    lr_end: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0  # the paper has none; the from-scratch tiny teacher uses some
    tau: float = 1.0  # KL temperature; KL is scaled by tau^2, CE never is
    w_ce: float = 1.0  # CE through the teacher head
    w_kl: float = 1.0  # KL to the teacher's logits
    w_student: float = 1.0  # the student's own CE (stages 2 and 3)
    train_vision: bool = False  # paper: the student's vision encoder is always frozen; True only for random-init toys
    vision_lr_scale: float = 1.0  # LR multiplier for a trained vision encoder (its patch embedding has a huge fan-in)
    reg: bool = True  # the regularization path (stage 1 always uses it unless False; stage 2 per METHOD decision 6)
    train_recal: bool = True  # False freezes the Recalibrator in stage 2 (a diagnostic variant, not the paper's)
    chunk_size: int | None = None  # tokens per chunk for the teacher-head losses (memory-bounded)
    seed: int = 0


# -- which parameters train (METHOD.md decision 7) -------------------------------------------------------
PROJECTOR_KEYS = ("multi_modal_projector", "connector", "visual.merger", "mlp1")
VISION_KEYS = ("vision_tower", "vision_model", "visual.")


def param_kind(name: str) -> str:
    """'vision' (encoder), 'projector' or 'llm', from a parameter's name."""
    if any(k in name for k in PROJECTOR_KEYS):
        return "projector"
    return "vision" if any(k in name for k in VISION_KEYS) else "llm"


def student_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Split a VLM's parameters into vision encoder / vision projector / LLM by name."""
    groups = {"vision": [], "projector": [], "llm": []}
    for name, p in model.named_parameters():
        groups[param_kind(name)].append(p)
    return groups


def set_trainable(stage: int, student: nn.Module, recal: nn.Module | None, teacher: nn.Module | None = None,
                  train_vision: bool = False, train_recal: bool = True) -> list[nn.Parameter]:
    """Freeze everything, then unfreeze what `stage` trains; returns the trainable parameters.

    `train_vision` (off by default, as in the paper) also trains the student's vision encoder in stages 2-3;
    the tiny preset turns it on because its student is random-init and a frozen random encoder is blind.
    """
    for m in (student, recal, teacher):
        if m is not None:
            m.requires_grad_(False)
    g = student_groups(student)
    params = list(recal.parameters()) if stage in (1, 2) and (train_recal or stage == 1) else []
    if stage in (2, 3):
        params += g["llm"] + g["projector"] + (g["vision"] if train_vision else [])
    for p in params:
        p.requires_grad_(True)
    return params


# -- the frozen teacher's forward: one function, so it can be cached --------------------------------------
@torch.no_grad()
def teacher_forward(teacher: VLMView, t_batch: dict, answer_input: str = "features") -> TeacherOut:
    """Run the frozen teacher body once and cut what the losses need.

    answer_input='embeddings' is our extension (not the paper's): the Recalibrator gets the teacher's answer
    input embeddings instead of its contextualized answer features, so only the student's question sees the image.
    """
    z = teacher.body(t_batch)  # (B, T_l, d_l)
    emb = teacher.embed(t_batch["input_ids"]).to(z.dtype) if answer_input == "embeddings" else None
    return split_teacher(z, t_batch["input_ids"], t_batch["q_lens"].cpu(), t_batch["a_lens"].cpu(), emb)


# -- the module that trains -----------------------------------------------------------------------------
class GenRecal(nn.Module):
    """Student + Recalibrator + the teacher's frozen head; forward returns every loss term of a stage."""

    def __init__(self, student: VLMView, recal: Recalibrator | None, teacher_head: nn.Linear | None):
        super().__init__()
        self.student_view = student
        self.student, self.recal = student.model, recal
        # not a submodule: the frozen head stays replicated and outside what DDP/FSDP/DeepSpeed wrap or save
        object.__setattr__(self, "teacher_head", teacher_head)

    def forward(self, stage: int, s_batch: dict, t: TeacherOut | None, cfg: StageConfig) -> dict[str, torch.Tensor]:
        terms = {}
        if stage in (1, 2):
            with torch.set_grad_enabled(stage == 2):
                z_s = self.student_view.body(s_batch)  # (B, T_s, d_s)
            z_qs = [z_s[b, :q] for b, q in enumerate(s_batch["q_lens"].tolist())]
            terms["ce_main"], terms["kl_main"] = recal_path(self.recal, z_qs, t, self.teacher_head, cfg.tau, cfg.chunk_size)
            if cfg.reg:
                z_ql = [self.recal.proj_pre(q) for q in t.z_q]  # (Lq_l, d_s) each
                terms["ce_reg"], terms["kl_reg"] = recal_path(self.recal, z_ql, t, self.teacher_head, cfg.tau, cfg.chunk_size)
        if stage in (2, 3):
            z_s = z_s if stage == 2 else self.student_view.body(s_batch)
            terms["ce_student"] = self.student_view.student_ce(z_s, s_batch)
        w = {"ce_main": cfg.w_ce, "kl_main": cfg.w_kl, "ce_reg": cfg.w_ce, "kl_reg": cfg.w_kl, "ce_student": cfg.w_student}
        terms["loss"] = sum(w[k] * v for k, v in terms.items())
        return terms


def stage_loss(stage: int, student: VLMView, recal: Recalibrator | None, teacher_head: nn.Linear | None,
               s_batch: dict, t: TeacherOut | None, cfg: StageConfig) -> dict[str, torch.Tensor]:
    """The loss terms of one stage on one batch (stage 1: CE+KL main and reg; 2: + student CE; 3: student CE)."""
    return GenRecal(student, recal, teacher_head)(stage, s_batch, t, cfg)


# -- data -----------------------------------------------------------------------------------------------
class PairData(torch.utils.data.Dataset):
    """Pre-rendered samples: (student Encoded, teacher Encoded or None, index)."""

    def __init__(self, student_encs: list[Encoded], teacher_encs: list[Encoded] | None = None):
        self.s, self.t = student_encs, teacher_encs

    def __len__(self):
        return len(self.s)

    def __getitem__(self, i):
        return self.s[i], (self.t[i] if self.t is not None else None), i

    def sample_id(self, i: int) -> str:
        return self.s[i].id


def make_collate(student: VLMView, teacher: VLMView | None):
    def collate(items):
        s = student.collate([it[0] for it in items])
        t = teacher.collate([it[1] for it in items]) if teacher is not None and items[0][1] is not None else None
        return s, t, torch.tensor([it[2] for it in items])
    return collate


# -- the loop -------------------------------------------------------------------------------------------
def train_stage(stage: int, student: VLMView, data: PairData, cfg: StageConfig, teacher: VLMView | None = None,
                recal: Recalibrator | None = None, teacher_head: nn.Linear | None = None,
                teacher_fn: Callable[[dict | None, torch.Tensor], TeacherOut] | None = None,
                progress: bool = True, answer_input: str = "features", *, checkpoint: Checkpointer | None = None,
                max_skips: int = 3, engine=None) -> list[dict]:
    """Train one stage for `cfg.steps` optimizer steps; returns a per-step history (every loss term, lr, skipped).

    `teacher_fn(t_batch, idx)` gives the TeacherOut; by default the live teacher's forward. A cache passes its own.
    `engine` (an `engine.Engine` built once per run over all its stages) carries the one prepared module and
    optimizer from stage to stage; without it a one-stage engine is built here.
    `checkpoint` writes checkpoints (every `checkpoint.every` steps and at the stage's end) and continues from its
    resume point. A non-finite loss or gradient skips the step (no update, the LR does not advance, the batch is
    spent); `max_skips` skips in a row raise NonFiniteError naming the batch's sample ids.
    """
    from .engine import Engine
    if checkpoint is not None and checkpoint.done(stage):
        return checkpoint.history(stage)
    if stage in (1, 2):
        teacher_head = teacher_head if teacher_head is not None else teacher.head
        if teacher_fn is None:
            teacher_fn = lambda tb, idx: teacher_forward(teacher, tb, answer_input)
    if teacher is not None:
        teacher.model.requires_grad_(False)
    if teacher_head is not None:
        teacher_head.requires_grad_(False)
    riders = []
    if engine is None:
        engine = Engine(student, recal if stage in (1, 2) else None, teacher_head if stage in (1, 2) else None,
                        {stage: cfg})
        riders = [recal] if stage == 3 and recal is not None else []  # saved beside the module it is not in
    sched = engine.begin(stage, cfg)
    acc, module, opt = engine.acc, engine.module, engine.opt
    g = torch.Generator().manual_seed(cfg.seed + stage)
    collate = make_collate(student, teacher if stage in (1, 2) else None)
    if isinstance(data, torch.utils.data.IterableDataset):  # a stream, already this process's share: in order
        loader = on_device(DataLoader(data, batch_size=cfg.batch_size, collate_fn=collate), acc.device)
    elif getattr(data, "rank_local", False):  # already this process's share: shuffled, not split again
        loader = on_device(DataLoader(data, batch_size=cfg.batch_size, shuffle=True, generator=g,
                                       drop_last=len(data) >= cfg.batch_size, collate_fn=collate), acc.device)
    else:  # map-style: shuffled, and accelerate gives each process its own batches
        loader = acc.prepare(DataLoader(data, batch_size=cfg.batch_size, shuffle=True, generator=g,
                                        drop_last=len(data) >= cfg.batch_size, collate_fn=collate))
    if teacher is not None and stage in (1, 2) and not getattr(teacher, "placed", False):
        teacher.model.to(acc.device)
    batches = Batches(loader, g)
    history, step, in_row = [], 0, 0
    ckpt_args = (acc, stage, asdict(cfg), module, opt, sched, batches, riders, student.tokenizer)
    if checkpoint is not None:
        history, step, in_row = checkpoint.resume(*ckpt_args)
    bar = tqdm(total=cfg.steps, initial=step, desc=f"stage {stage}", leave=False,
               disable=not progress or not acc.is_local_main_process)
    module.train()
    while step < cfg.steps:
        skipped, ids, finite = False, [], torch.tensor(True, device=acc.device)
        for _ in range(cfg.grad_accum):
            s_batch, t_batch, idx = next(batches)
            ids += idx.tolist()
            with acc.accumulate(module), acc.autocast():
                t = teacher_fn(t_batch, idx).to(acc.device) if stage in (1, 2) else None
                terms = module(stage, s_batch, t, cfg)
                finite = finite & torch.isfinite(terms["loss"].detach())
                acc.backward(terms["loss"])
                if acc.sync_gradients:  # the optimizer steps only here (accelerate's accumulation)
                    if all_finite(acc, finite, module):
                        opt.step()
                        sched.step()
                    else:
                        skipped = True
                    finite = torch.tensor(True, device=acc.device)
                opt.zero_grad()
        rec = {k: v.item() for k, v in terms.items()}
        # the stage's LR: groups it does not train run at 0
        history.append({"stage": stage, "step": step, "lr": max(sched.get_last_lr()), **rec, "skipped": skipped})
        in_row = in_row + 1 if skipped else 0
        if in_row >= max_skips:
            names = [data.sample_id(i) for i in ids]
            raise NonFiniteError(f"stage {stage}, step {step}: {in_row} steps in a row had a non-finite loss or "
                                 f"gradient (last loss {rec['loss']}); the last batch's sample ids: {names} "
                                 f"(dataset indices {ids}, process {acc.process_index})")
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.3f}")
        step += 1
        if checkpoint is not None and checkpoint.due(step, cfg.steps):
            checkpoint.save(*ckpt_args, step=step, skips_in_row=in_row)
        fault("step", stage, step)
    bar.close()
    module.eval()
    return history
