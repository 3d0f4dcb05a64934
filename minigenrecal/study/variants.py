"""Our variants of the method (not the paper's): what the transfer study tries so that GenRecal passes on more.

The method's main path (`stages.GenRecal`) reads `[z_qs, ProjPre(teacher answer features)]`: the student enters the
distillation graph through its question features only, and with contextual answer features every later answer row
carries its own target (docs/method.md, decision 4). A variant overrides `GenRecal.main_rows` and nothing else, so
stage 1's and 2's other terms, the regularization path, the loop and the schedule stay the method's.

| variant            | the main path's answer rows                                                               |
|--------------------|-------------------------------------------------------------------------------------------|
| `StudentAnswers`   | the Recalibrator reads the student's own sequence `[z_qs, z_as]` (its answer positions too)   |

`StudentAnswers` scores row j of the student's answer against row j of the teacher's, so both must tokenize the answer
alike: it runs on the same-tokenizer student, where they do (a cross-tokenizer pair would need the text alignment
of the baselines). Keeping distillation on through stage 3 needs no module: the transfer study runs stage 2 for
stage 2 + stage 3's steps (`study/transfer.py`, `TRANSFER_VARIANTS`).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from minigenrecal.losses import TeacherOut, answer_rows
from minigenrecal.stages import GenRecal


class StudentAnswers(GenRecal):
    """The main path reads the student's own answer features: no teacher vector in its input, and the distillation
    KL reaches every answer position of the student (stage 2), not just its question. Ours."""

    def main_rows(self, z_qs: list[torch.Tensor], z_s: torch.Tensor, s_batch: dict, t: TeacherOut) -> torch.Tensor:
        q_lens, a_lens = s_batch["q_lens"].tolist(), s_batch["a_lens"].tolist()
        if a_lens != t.a_lens.tolist():
            bad = next(b for b, (a, c) in enumerate(zip(a_lens, t.a_lens.tolist())) if a != c)
            raise ValueError(f"StudentAnswers pairs answer rows one to one, but sample {bad} of the batch has "
                             f"{a_lens[bad]} student answer tokens and {int(t.a_lens[bad])} teacher ones: use a "
                             f"student that shares the teacher's tokenizer")
        # per sample [z_qs (Lq_s), z_as (La-1)]: the student's own features up to its last answer-predicting row
        seqs = [torch.cat([zq, z_s[b, q: q + a - 1]]) for b, (zq, q, a) in enumerate(zip(z_qs, q_lens, a_lens))]
        x = nn.utils.rnn.pad_sequence(seqs, batch_first=True)  # (B, T, d_s)
        out = self.recal.run(x, [len(zq) for zq in z_qs], a_lens, a_pos=q_lens)  # (B, T, d_l)
        return answer_rows(out, [len(zq) for zq in z_qs], a_lens)  # (N, d_l)

    def forward(self, stage: int, s_batch: dict, t: TeacherOut | None, cfg) -> dict[str, torch.Tensor]:
        if cfg.chunk_size is not None:
            raise ValueError("StudentAnswers overrides the unfused main path; run it with chunk_size=None")
        return super().forward(stage, s_batch, t, cfg)
