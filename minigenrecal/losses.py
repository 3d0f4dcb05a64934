"""GenRecal's losses and the next-token boundary (docs/method.md, decision 4).

Teacher sequence: question at 0..Lq_l-1, answer a_0..a_{La-1} at Lq_l..Lq_l+La-1.
  teacher targets   = teacher logits at Lq_l-1 .. Lq_l+La-2 (they predict a_0..a_{La-1}); labels = a_0..a_{La-1}
  Recalibrator input = [z_q (Lq), ProjPre(z_l at Lq_l .. Lq_l+La-2)]            (length Lq + La - 1)
  predictions        = Recalibrator output at Lq-1 .. Lq+La-2                   (the last question position -> a_0)
The main path uses the student's question (Lq = Lq_s); the regularization path the teacher's (Lq = Lq_l).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from minigenrecal.chunked import fused_head_loss


def answer_rows(x: torch.Tensor, q_lens, a_lens, shift: int = -1) -> torch.Tensor:
    """Rows Lq+shift .. Lq+La-1+shift of each sample, flattened: (sum La, ...); lengths on the host (lists, tensors)."""
    qs, as_ = (v.tolist() if torch.is_tensor(v) else v for v in (q_lens, a_lens))
    return torch.cat([x[b, q + shift: q + a + shift] for b, (q, a) in enumerate(zip(qs, as_))])


@dataclass
class TeacherOut:
    """Everything the losses need from the frozen teacher (computed once per batch; cacheable)."""

    z_q: list[torch.Tensor]  # per sample (Lq_l, d_l): question features, the regularization path's input
    z_a: list[torch.Tensor]  # per sample (La-1, d_l): answer features a_0..a_{La-2}, the Recalibrator's answer input
    z_pred: torch.Tensor  # (N, d_l): features at Lq_l-1..Lq_l+La-2; head(z_pred) = the teacher's target logits
    labels: torch.Tensor  # (N,): a_0..a_{La-1} in the teacher's vocabulary
    a_lens: torch.Tensor  # (B,): La per sample, on the host (lengths index rows; they never go to a device)

    @property
    def q_lens(self) -> torch.Tensor:
        return torch.tensor([len(q) for q in self.z_q])

    def select(self, rows: list[int]) -> "TeacherOut":
        """Samples `rows` only (the regularization path's when a cache kept z_q for some: the others' have width 0)."""
        r = torch.cat([torch.arange(int(self.a_lens[:b].sum()), int(self.a_lens[:b + 1].sum())) for b in rows])
        return TeacherOut([self.z_q[b] for b in rows], [self.z_a[b] for b in rows], self.z_pred[r], self.labels[r],
                          self.a_lens[rows])

    def to(self, device, dtype=None) -> "TeacherOut":
        mv = lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() and dtype else t.dtype)
        return TeacherOut([mv(q) for q in self.z_q], [mv(a) for a in self.z_a], mv(self.z_pred), mv(self.labels),
                          self.a_lens.cpu())


def split_teacher(z: torch.Tensor, input_ids: torch.Tensor, q_lens: torch.Tensor, a_lens: torch.Tensor,
                  z_answer_input: torch.Tensor | None = None) -> TeacherOut:
    """Cut teacher features (B, T, d_l) into the TeacherOut spans. `z_answer_input` replaces the answer input."""
    src = z if z_answer_input is None else z_answer_input
    qs, as_ = q_lens.tolist(), a_lens.tolist()
    return TeacherOut(z_q=[z[b, :q] for b, q in enumerate(qs)],
                      z_a=[src[b, q: q + a - 1] for b, (q, a) in enumerate(zip(qs, as_))],
                      z_pred=answer_rows(z, qs, as_, shift=-1),
                      labels=answer_rows(input_ids, qs, as_, shift=0), a_lens=a_lens.cpu())


def kl_from_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Forward KL(p_teacher || p_student) at temperature tau, scaled by tau^2, averaged over rows."""
    log_p_t = F.log_softmax(teacher_logits.float() / tau, -1)
    log_p_s = F.log_softmax(student_logits.float() / tau, -1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean() * tau ** 2


def head_losses(h: torch.Tensor, z_t: torch.Tensor, labels: torch.Tensor, head: nn.Linear,
                tau: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE, KL) of recalibrated features h (N, d_l) read by the frozen teacher head, against labels and the teacher's
    own logits head(z_t). Naive: (N, V_l) logits; `fused_paths` is the same loss in bounded memory."""
    # Both matmuls in the frozen head's dtype, as chunked: bf16 rows (FSDP2/DeepSpeed) meet a head in the teacher's.
    w_dtype = head.weight.dtype
    logits = head(h.to(w_dtype)).float()  # (N, V_l)
    with torch.no_grad():
        t_logits = head(z_t.to(w_dtype)).float()  # (N, V_l)
    return F.cross_entropy(logits, labels), kl_from_logits(logits, t_logits, tau)


def recal_rows(recal, z_q: list[torch.Tensor], t: TeacherOut) -> torch.Tensor:
    """One Recalibrator path's answer-predicting rows: [z_q, ProjPre(teacher answer)] -> rows Lq-1..Lq+La-2: (N, d_l).
    The teacher's answers start at its Lq_l (NPE off reads it)."""
    out = recal(z_q, t.z_a, a_pos=t.q_lens.tolist())  # (B, T, d_l) (all rows: Proj-post's weight gradient keeps its
    return answer_rows(out, [len(q) for q in z_q], t.a_lens)  # summation order)


def recal_path(recal, z_q: list[torch.Tensor], t: TeacherOut, head: nn.Linear,
               tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One Recalibrator path: its rows (`recal_rows`) read by the teacher's head -> (CE, KL)."""
    return head_losses(recal_rows(recal, z_q, t), t.z_pred, t.labels, head, tau)


def fused_paths(recal, z_qs: list[list[torch.Tensor]], t: TeacherOut, head: nn.Linear, tau: float, w_ce: float,
                w_kl: float, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every path (z_qs: main, then reg) in one fused loss: (w_ce CE + w_kl KL summed, the (P, 2) (CE, KL) record)."""
    hs = [recal(z_q, t.z_a, predicting_only=True, a_pos=t.q_lens.tolist()) for z_q in z_qs]  # (N, d_l) each
    return fused_head_loss(hs, t.z_pred, t.labels, head.weight, head.bias, tau, w_ce, w_kl, chunk_size)
