"""GenRecal's three stages: their knobs, what each trains, the teacher's forward and each stage's loss terms."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from minigenrecal.losses import TeacherOut, fused_paths, head_losses, recal_path, recal_rows, split_teacher
from minigenrecal.recalibrator import Recalibrator


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
    reg: bool = True  # the regularization path (stage 1 always uses it unless False; stage 2: docs/method.md, dec. 6)
    train_recal: bool = True  # False freezes the Recalibrator in stage 2 (a diagnostic variant, not the paper's)
    chunk_size: int | None = None  # tokens per chunk of the fused teacher-head loss (memory-bounded); None: unfused
    max_grad_norm: float = 0.0  # clip the gradient's global L2 norm to this (0: off; the paper does not say)
    seed: int = 0


# -- what each stage trains (docs/method.md, decision 7): the one table --------------------------------------
GROUPS = ("recal", "llm", "vision")  # the Recalibrator; the student's LLM + vision projector; its vision encoder


def trains(group: str, stage: int, cfg: StageConfig) -> bool:
    """Does `stage` train `group`? Stage 1: the Recalibrator; 2: both; 3: the student (vision only with train_vision)."""
    if group == "recal":
        return stage == 1 or (stage == 2 and cfg.train_recal)
    if group == "llm":
        return stage in (2, 3)
    return stage in (2, 3) and cfg.train_vision


PROJECTOR_KEYS = ("multi_modal_projector", "connector", "visual.merger", "mlp1")
VISION_KEYS = ("vision_tower", "vision_model", "visual.")


def param_kind(name: str) -> str:
    """'vision' (encoder), 'projector' or 'llm', from a parameter's name."""
    if any(k in name for k in PROJECTOR_KEYS):
        return "projector"
    return "vision" if any(k in name for k in VISION_KEYS) else "llm"


def group_of(name: str) -> str:
    """The group of a trained module's parameter: 'recal.*', else the student's by `param_kind` (projector: llm)."""
    if name.startswith("recal."):
        return "recal"
    return "vision" if param_kind(name) == "vision" else "llm"


def student_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Split a VLM's parameters into vision encoder / vision projector / LLM by name."""
    groups = {"vision": [], "projector": [], "llm": []}
    for name, p in model.named_parameters():
        groups[param_kind(name)].append(p)
    return groups


def set_trainable(stage: int, student: nn.Module, recal: nn.Module | None, teacher: nn.Module | None = None,
                  train_vision: bool = False, train_recal: bool = True) -> list[nn.Parameter]:
    """Freeze everything, then unfreeze what `stage` trains (by `trains`); returns the trainable parameters."""
    cfg = StageConfig(train_vision=train_vision, train_recal=train_recal)
    for m in (student, recal, teacher):
        if m is not None:
            m.requires_grad_(False)
    g = student_groups(student)
    params = list(recal.parameters()) if recal is not None and trains("recal", stage, cfg) else []
    params += g["llm"] + g["projector"] if trains("llm", stage, cfg) else []
    params += g["vision"] if trains("vision", stage, cfg) else []
    for p in params:
        p.requires_grad_(True)
    return params


# -- the frozen teacher's forward: one function, so it can be cached --------------------------------------
@torch.no_grad()
def teacher_forward(teacher, t_batch: dict, answer_input: str = "features") -> TeacherOut:
    """Run the frozen teacher body once and cut what the losses need ('embeddings': ours, docs/method.md dec. 4)."""
    z = teacher.body(t_batch)  # (B, T_l, d_l)
    emb = teacher.embed(t_batch["input_ids"]).to(z.dtype) if answer_input == "embeddings" else None
    return split_teacher(z, t_batch["input_ids"], t_batch["q_lens"], t_batch["a_lens"], emb)  # host lengths


# -- the module that trains -----------------------------------------------------------------------------
class GenRecal(nn.Module):
    """Student + Recalibrator + the teacher's frozen head; forward returns every loss term of a stage."""

    def __init__(self, student, recal: Recalibrator | None, teacher_head: nn.Linear | None):
        super().__init__()
        self.student_view = student
        self.student, self.recal = student.model, recal
        # not a submodule: the frozen head stays replicated and outside what DDP/FSDP/DeepSpeed wrap or save
        object.__setattr__(self, "teacher_head", teacher_head)

    def main_rows(self, z_qs: list[torch.Tensor], z_s: torch.Tensor, s_batch: dict, t: TeacherOut) -> torch.Tensor:
        """The main path's answer-predicting rows (N, d_l); a variant overrides only this (study/variants.py)."""
        return recal_rows(self.recal, z_qs, t)

    def forward(self, stage: int, s_batch: dict, t: TeacherOut | None, cfg: StageConfig) -> dict[str, torch.Tensor]:
        terms, fused = {}, None
        if stage in (1, 2):
            with torch.set_grad_enabled(stage == 2):
                z_s = self.student_view.body(s_batch)  # (B, T_s, d_s)
            z_qs = [z_s[b, :q] for b, q in enumerate(s_batch["q_lens"].tolist())]  # host lengths: no device read
            has = [b for b, q in enumerate(t.z_q) if q.shape[-1]] if cfg.reg else []  # reg path: samples with z_q
            t_reg = t if len(has) == len(t.z_q) else t.select(has) if has else None  # (a cache may keep it for some)
            z_ql, zero = lambda: [self.recal.proj_pre(q) for q in t_reg.z_q], t.z_pred.new_zeros(())  # (Lq_l, d_s)
            if cfg.chunk_size is None:  # unfused: each term its own tensor (the tiny pair's histories are pinned)
                terms["ce_main"], terms["kl_main"] = head_losses(self.main_rows(z_qs, z_s, s_batch, t), t.z_pred,
                                                                 t.labels, self.teacher_head, cfg.tau)
                if cfg.reg:  # none with z_q: the terms are 0
                    terms["ce_reg"], terms["kl_reg"] = recal_path(self.recal, z_ql(), t_reg, self.teacher_head,
                                                                  cfg.tau) if has else (zero, zero)
            else:  # fused (chunked.py): the weighted head terms as one loss; their values are kept for the record
                args = (self.teacher_head, cfg.tau, cfg.w_ce, cfg.w_kl, cfg.chunk_size)
                fused, parts = fused_paths(self.recal, [z_qs] + ([z_ql()] if t_reg is t else []), t, *args)
                if cfg.reg and t_reg is not t:  # the subsample with z_q: a fused loss of its own; none: 0
                    f, p = fused_paths(self.recal, [z_ql()], t_reg, *args) if has else (zero, parts.new_zeros(1, 2))
                    fused, parts = fused + f, torch.cat([parts, p])
                for name, (ce, kl) in zip(("main", "reg"), parts):
                    terms[f"ce_{name}"], terms[f"kl_{name}"] = ce, kl
        if stage in (2, 3):
            z_s = z_s if stage == 2 else self.student_view.body(s_batch)
            terms["ce_student"] = self.student_view.student_ce(z_s, s_batch)
        w = {"ce_main": cfg.w_ce, "kl_main": cfg.w_kl, "ce_reg": cfg.w_ce, "kl_reg": cfg.w_kl, "ce_student": cfg.w_student}
        weighted = [w[k] * v for k, v in terms.items() if fused is None or k == "ce_student"]
        terms["loss"] = sum(weighted, fused if fused is not None else 0)
        return terms


def stage_loss(stage: int, student, recal: Recalibrator | None, teacher_head: nn.Linear | None,
               s_batch: dict, t: TeacherOut | None, cfg: StageConfig) -> dict[str, torch.Tensor]:
    """The loss terms of one stage on one batch (stage 1: CE+KL main and reg; 2: + student CE; 3: student CE)."""
    return GenRecal(student, recal, teacher_head)(stage, s_batch, t, cfg)


