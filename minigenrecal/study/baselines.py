"""Distillation baselines to set beside GenRecal on one pair, under the same student budget.

| baseline            | student                                  | loss on the student                                        |
|---------------------|------------------------------------------|------------------------------------------------------------|
| `sft`               | the cross-tokenizer student              | its own CE (`pipeline.run_sft`)                            |
| `same_tokenizer_kd` | a Llava student with the TEACHER's tokenizer | forward KL to the teacher's logits + CE                  |
| `uld`               | the cross-tokenizer student              | Universal Logit Distillation (sorted-probability L1) + CE  |
| `linear_projector`  | the cross-tokenizer student              | DSKD-style: Linear(d_s -> d_l) -> teacher head, CE + KL, + CE |

Cross-tokenizer answer positions are paired by index: the k-th answer-predicting row of the student with the k-th of
the teacher, for k < min(La_s, La_l). Each loss is a small function of plain tensors (tested against a reference
in tests/test_baselines.py); `train_baseline` runs any of them in the one loop (`loop.train_stage`) as a module of its
own: AdamW, LR linear from `lr` to `lr_end`, the student's LLM + projector (+ vision encoder with `train_vision`) train,
the teacher is frozen.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

from minigenrecal.loop import Engine, PairData, train_stage
from minigenrecal.losses import TeacherOut, answer_rows, head_losses, kl_from_logits
from minigenrecal.models.tiny import _finish, student_config, student_processor, teacher_config, teacher_processor
from minigenrecal.models.vlm import VLMView
from minigenrecal.stages import StageConfig, teacher_forward

METHODS = ("same_tokenizer_kd", "uld", "linear_projector")


# -- losses (plain tensors in, scalar out) ----------------------------------------------------------------
def align_by_index(s_lens: torch.Tensor, t_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices into the flattened answer rows of each side that pair answer position k with k, k < min(La_s, La_l)."""
    idx_s, idx_t, off_s, off_t = [], [], 0, 0
    for a_s, a_t in zip(s_lens.tolist(), t_lens.tolist()):
        k = torch.arange(min(a_s, a_t))
        idx_s.append(off_s + k)
        idx_t.append(off_t + k)
        off_s, off_t = off_s + a_s, off_t + a_t
    return torch.cat(idx_s), torch.cat(idx_t)


def uld_loss(s_logits: torch.Tensor, t_logits: torch.Tensor) -> torch.Tensor:
    """ULD on aligned rows: sort each side's probabilities descending, zero-pad the smaller vocabulary, L1 per row, mean.

    s_logits (N, V_s), t_logits (N, V_l); the teacher side carries no gradient.
    """
    p_s = F.softmax(s_logits.float(), -1).sort(-1, descending=True).values  # (N, V_s)
    p_t = F.softmax(t_logits.detach().float(), -1).sort(-1, descending=True).values  # (N, V_l)
    V = max(p_s.shape[-1], p_t.shape[-1])
    p_s, p_t = F.pad(p_s, (0, V - p_s.shape[-1])), F.pad(p_t, (0, V - p_t.shape[-1]))  # (N, V)
    return (p_s - p_t).abs().sum(-1).mean()


def projector_losses(h_s: torch.Tensor, proj: nn.Linear, t_head: nn.Linear, z_t: torch.Tensor, labels: torch.Tensor,
                     tau: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """DSKD-style (CE, KL): aligned student rows h_s (N, d_s) -> proj -> the teacher's frozen head, against the
    teacher's labels (N,) and its logits head(z_t) (N, d_l -> V_l). No decoder blocks between proj and head."""
    return head_losses(proj(h_s), z_t, labels, t_head, tau)  # (CE, KL), the same terms GenRecal's paths use


def same_tokenizer_kd_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Classic logit KD when both sides share one vocabulary: forward KL(p_teacher || p_student), rows (N, V)."""
    return kl_from_logits(s_logits, t_logits.detach(), tau)


# -- one batch's terms per method -------------------------------------------------------------------------
def baseline_terms(method: str, student: VLMView, s_batch: dict, t: TeacherOut, t_head: nn.Linear,
                   cfg: StageConfig, proj: nn.Linear | None = None) -> dict[str, torch.Tensor]:
    """Every loss term of `method` on one batch; terms['loss'] is what trains (the student's CE always included)."""
    z_s = student.body(s_batch)  # (B, T_s, d_s)
    terms = {"ce_student": student.student_ce(z_s, s_batch)}
    h_s = answer_rows(z_s, s_batch["q_lens"], s_batch["a_lens"])  # (N_s, d_s): answer-predicting rows
    with torch.no_grad():
        t_logits = t_head(t.z_pred).float()  # (N_l, V_l): the teacher's answer-predicting logits
    if method == "same_tokenizer_kd":
        if h_s.shape[0] != t.z_pred.shape[0]:
            raise ValueError("same_tokenizer_kd needs the student to render answers exactly as the teacher does")
        terms["kl"] = same_tokenizer_kd_loss(student.head(h_s), t_logits, cfg.tau)
        terms["loss"] = cfg.w_student * terms["ce_student"] + cfg.w_kl * terms["kl"]
        return terms
    i_s, i_t = align_by_index(s_batch["a_lens"].cpu(), t.a_lens.cpu())
    i_s, i_t = i_s.to(h_s.device), i_t.to(h_s.device)
    if method == "uld":
        terms["uld"] = uld_loss(student.head(h_s[i_s]), t_logits[i_t])
        terms["loss"] = cfg.w_student * terms["ce_student"] + cfg.w_kl * terms["uld"]
    elif method == "linear_projector":
        terms["ce_proj"], terms["kl_proj"] = projector_losses(h_s[i_s], proj, t_head, t.z_pred[i_t], t.labels[i_t], cfg.tau)
        terms["loss"] = cfg.w_student * terms["ce_student"] + cfg.w_ce * terms["ce_proj"] + cfg.w_kl * terms["kl_proj"]
    else:
        raise ValueError(f"unknown baseline {method!r}; choose from {METHODS}")
    return terms


# -- a baseline is a loss of its own in the one training loop (loop.train_stage) --------------------------------
class BaselineModule(nn.Module):
    """The student (+ the linear projector) whose forward gives `method`'s loss terms: what `train_stage` trains."""

    def __init__(self, method: str, student: VLMView, t_head: nn.Linear, proj: nn.Linear | None = None):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"unknown baseline {method!r}; choose from {METHODS}")
        self.method, self.student_view, self.student, self.proj = method, student, student.model, proj
        object.__setattr__(self, "t_head", t_head)  # frozen and not a submodule: never trained or saved

    def forward(self, stage: int, s_batch: dict, t: TeacherOut, cfg: StageConfig) -> dict[str, torch.Tensor]:
        return baseline_terms(self.method, self.student_view, s_batch, t, self.t_head, cfg, self.proj)


def train_baseline(method: str, student: VLMView, data: PairData, cfg: StageConfig, teacher: VLMView,
                   teacher_fn: Callable[[dict | None, torch.Tensor], TeacherOut] | None = None,
                   progress: bool = False) -> list[dict]:
    """Train `student` with `method` for `cfg.steps` optimizer steps in the one loop, as stage 3 with the teacher's
    targets (so the student's LLM + projector, + vision with `train_vision`, train, with stage 3's data order);
    returns the per-step history. `teacher_fn` may replace the live teacher's forward (e.g. a cache's). The linear
    projector trains alongside and is then dropped."""
    dev = next(student.model.parameters()).device
    proj = nn.Linear(student.d, teacher.d).to(dev) if method == "linear_projector" else None
    engine = Engine(student, None, None, {3: cfg}, module=BaselineModule(method, student, teacher.head, proj))
    history = train_stage(3, student, data, cfg, teacher, teacher_fn=teacher_fn or (lambda tb, idx: teacher_forward(teacher, tb)),
                          progress=progress, engine=engine)
    return [{"method": method, **h} for h in history]


# -- the same-tokenizer student -----------------------------------------------------------------------------
def build_same_tokenizer_student(seed: int = 0):
    """A Llava student that shares the teacher's tokenizer, processor and vocabulary (V_l), with the tiny student's
    text dimensions (d=96, 2 layers) and a vision tower of the tiny student's size. Different class and tokenizer
    from the cross-tokenizer student: that is the point of the row."""
    proc = teacher_processor()
    t_cfg = teacher_config(proc.tokenizer)
    s_text = student_config(student_processor().tokenizer).text_config
    text = t_cfg.text_config
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
        setattr(text, k, getattr(s_text, k))
    sv = student_config(student_processor().tokenizer).vision_config
    vision = CLIPVisionConfig(hidden_size=sv.hidden_size, intermediate_size=sv.intermediate_size,
                              num_hidden_layers=sv.num_hidden_layers, num_attention_heads=sv.num_attention_heads,
                              image_size=t_cfg.vision_config.image_size, patch_size=t_cfg.vision_config.patch_size,
                              projection_dim=sv.hidden_size)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=t_cfg.image_token_id,
                      vision_feature_layer=-1, vision_feature_select_strategy="default", projector_hidden_act="gelu")
    torch.manual_seed(seed)
    return _finish(LlavaForConditionalGeneration(cfg), proc.tokenizer), proc
