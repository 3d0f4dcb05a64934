"""Distillation baselines to set beside GenRecal on one pair, under the same student budget.

| baseline            | student                                  | loss on the student                                        |
|---------------------|------------------------------------------|------------------------------------------------------------|
| `sft`               | the cross-tokenizer student              | its own CE (`pipeline.run_sft`)                            |
| `same_tokenizer_kd` | a Llava student with the TEACHER's tokenizer | forward KL to the teacher's logits + CE                  |
| `uld`               | the cross-tokenizer student              | Universal Logit Distillation (sorted-probability L1) + CE  |
| `linear_projector`  | the cross-tokenizer student              | DSKD-style: Linear(d_s -> d_l) -> teacher head, CE + KL, + CE |
| `uld_text`          | the cross-tokenizer student              | `uld`'s loss on text-aligned rows                          |
| `linear_projector_text` | the cross-tokenizer student          | `linear_projector`'s losses on text-aligned rows           |

`uld` and `linear_projector` pair cross-tokenizer answer positions by index (`align_by_index`): the k-th
answer-predicting row of the student with the k-th of the teacher, for k < min(La_s, La_l), which pairs rows that
predict different text as soon as one teacher token is several student tokens. Their `_text` versions pair rows by
the answer text (`align_by_text`): each side's tokens are grouped into the smallest spans that end at the same
character of the answer, and the row predicting the first token of each span is paired with the other side's. The
by-index methods stay as they were, so their numbers remain reproducible.

Each loss is a small function of plain tensors (tested against a reference in tests/test_baselines.py);
`train_baseline` runs any of them in the one loop (`loop.train_stage`) as a module of its own: AdamW, LR linear from
`lr` to `lr_end`, the student's LLM + projector (+ vision encoder with `train_vision`) train, the teacher is frozen.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

from minigenrecal.loop import Engine, PairData, train_stage
from minigenrecal.losses import TeacherOut, answer_rows, head_losses, kl_from_logits
from minigenrecal.models.render import Encoded
from minigenrecal.models.tiny import _finish, student_config, student_processor, teacher_config, teacher_processor
from minigenrecal.models.vlm import VLMView
from minigenrecal.stages import StageConfig, teacher_forward

METHODS = ("same_tokenizer_kd", "uld", "linear_projector", "uld_text", "linear_projector_text")
TEXT_ALIGNED = ("uld_text", "linear_projector_text")  # each is its by-index method's loss on `align_by_text` rows


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


def _boundaries(offsets: list[tuple[int, int]], n_chars: int) -> list[int]:
    """Where each token ends in an answer of n_chars characters, (La,): template text before the answer ends at 0
    (so it joins the answer's first span); every token from the answer's end on (the end-of-turn token, any template
    text after the answer) ends at n_chars + 1, one boundary for the whole end of turn on both sides."""
    return [n_chars + 1 if a >= n_chars else min(max(b, 0), n_chars) for a, b in offsets]


def align_by_text(s_text: str, s_offsets: list[tuple[int, int]], t_text: str, t_offsets: list[tuple[int, int]],
                  sample: str = "?") -> list[tuple[list[int], list[int]]]:
    """Pair the student's and the teacher's tokenizations of one answer by its text: ([student token indices],
    [teacher token indices]) per aligned span, in order, covering every token of both sides.

    s_offsets (La_s,) and t_offsets (La_l,) are each answer token's (start, end) in the answer text (as
    `Renderer.answer_offsets` gives them). Consecutive tokens are grouped into the smallest spans that end at the same
    character on both sides (a span closes where both tokenizers put a boundary); the end-of-turn tokens of each side
    make the last span, so the final end token pairs with the final end token.

    Raises ValueError naming `sample` when the two texts differ, a side's token ends go backwards, or a side's
    tokens end before the other's (tokens that no span could take): nothing is dropped silently.
    """
    if s_text != t_text:
        raise ValueError(f"sample {sample}: the student's answer text {s_text!r} differs from the teacher's "
                         f"{t_text!r}; text alignment needs both sides to render the same answer")
    b_s, b_t = _boundaries(s_offsets, len(s_text)), _boundaries(t_offsets, len(t_text))
    for side, b in (("student", b_s), ("teacher", b_t)):
        if any(x > y for x, y in zip(b, b[1:])):
            raise ValueError(f"sample {sample}: the {side}'s answer token offsets go backwards ({b})")
    spans, i, j, i0, j0 = [], 0, 0, 0, 0
    while i < len(b_s) and j < len(b_t):
        if b_s[i] != b_t[j]:  # the side whose token ends first takes its next token into the open span
            i, j = (i + 1, j) if b_s[i] < b_t[j] else (i, j + 1)
            continue
        while i + 1 < len(b_s) and b_s[i + 1] == b_s[i]:  # tokens ending at the same character (e.g. empty ones)
            i += 1
        while j + 1 < len(b_t) and b_t[j + 1] == b_t[j]:
            j += 1
        i, j = i + 1, j + 1
        spans.append((list(range(i0, i)), list(range(j0, j))))
        i0, j0 = i, j
    if i0 < len(b_s) or j0 < len(b_t):
        raise ValueError(f"sample {sample}: tokens {list(range(i0, len(b_s)))} of the student and "
                         f"{list(range(j0, len(b_t)))} of the teacher end at no common boundary (student ends {b_s}, "
                         f"teacher ends {b_t}): do both answers end with their end-of-turn token?")
    return spans


def text_rows(pairs: list[tuple[Encoded, Encoded]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices into the flattened answer rows (N_s,) and (N_l,) of a batch of (student, teacher) encodings of
    the same samples, one pair per `align_by_text` span: each side's row predicting the span's FIRST token.

    Why the first row: answer row k predicts token k from everything before it. A span's first row is the only row
    on each side whose context is the same text (the answer up to the span's start), so the two rows answer the same
    question: what comes next after this text. A later row inside a span is conditioned on a piece of text that the
    other side has no row for. Merging a span's rows (scaling the first row's distribution by the probabilities of
    the span's later tokens) gives an unnormalized vector that CE through the teacher's head and ULD's sorted
    probabilities cannot read as a distribution; the first row keeps both losses on true next-token distributions,
    and the teacher's label at that row is the token its distribution is trained towards.
    Returns (P,) and (P,) long tensors on the host.
    """
    idx_s, idx_t, off_s, off_t = [], [], 0, 0
    for s, t in pairs:
        for e, side in ((s, "student"), (t, "teacher")):
            if e.a_offsets is None or len(e.a_offsets) != e.a_len:
                raise ValueError(f"sample {e.id}: the {side}'s encoding carries no offsets for its {e.a_len} answer "
                                 "tokens (a tokenizer without offsets, or a template that rewrites the answer), so it "
                                 "cannot be aligned by text")
        for span_s, span_t in align_by_text(s.answer, s.a_offsets, t.answer, t.a_offsets, s.id):
            idx_s.append(off_s + span_s[0])
            idx_t.append(off_t + span_t[0])
        off_s, off_t = off_s + s.a_len, off_t + t.a_len
    return torch.tensor(idx_s, dtype=torch.long), torch.tensor(idx_t, dtype=torch.long)


@dataclass
class TextAlignedOut(TeacherOut):
    """The teacher's targets for a batch with the batch's `text_rows` (the pairs depend on both sides' encodings,
    which only the dataset holds, so they ride with the targets the loop hands the loss)."""

    rows_s: torch.Tensor | None = None  # (P,) rows into the student's flattened answer-predicting rows
    rows_t: torch.Tensor | None = None  # (P,) rows into the teacher's (z_pred, labels)

    def to(self, device, dtype=None) -> "TextAlignedOut":
        base = super().to(device, dtype)
        return TextAlignedOut(**{f.name: getattr(base, f.name) for f in fields(TeacherOut)},
                              rows_s=self.rows_s.to(device), rows_t=self.rows_t.to(device))


def with_text_rows(t: TeacherOut, pairs: list[tuple[Encoded, Encoded]]) -> TextAlignedOut:
    """`t` plus the `text_rows` of `pairs` (the batch's encodings, in the batch's order), computed on the host.
    Raises naming the sample if `t`'s answer lengths are not the teacher encodings' (a cache of other samples)."""
    if len(pairs) != len(t.a_lens):
        raise ValueError(f"{len(pairs)} encodings for a batch of {len(t.a_lens)} teacher targets")
    for (_, e), a in zip(pairs, t.a_lens.tolist()):
        if e.a_len != a:
            raise ValueError(f"sample {e.id}: the teacher's targets have {a} answer rows but its encoding {e.a_len}")
    rows_s, rows_t = text_rows(pairs)
    return TextAlignedOut(**{f.name: getattr(t, f.name) for f in fields(TeacherOut)}, rows_s=rows_s, rows_t=rows_t)


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
def paired_rows(method: str, s_batch: dict, t: TeacherOut) -> tuple[torch.Tensor, torch.Tensor]:
    """(P,) student rows and (P,) teacher rows that `method` pairs: by text for the `_text` methods (which need `t`
    from `with_text_rows`), else by index."""
    if method not in TEXT_ALIGNED:
        return align_by_index(s_batch["a_lens"].cpu(), t.a_lens.cpu())
    if not isinstance(t, TextAlignedOut):
        raise ValueError(f"{method} needs the teacher's targets with the batch's text-aligned rows: train it with "
                         "`train_baseline`, or pass `with_text_rows(t, pairs)`")
    return t.rows_s, t.rows_t


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
    i_s, i_t = paired_rows(method, s_batch, t)
    i_s, i_t = i_s.to(h_s.device), i_t.to(h_s.device)
    method = method.removesuffix("_text")  # the same losses, on the rows the method pairs
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
    projector trains alongside and is then dropped. The `_text` methods read both sides' encodings from `data`
    (its items' answer offsets) by the batch's sample indices."""
    dev = next(student.model.parameters()).device
    proj = nn.Linear(student.d, teacher.d).to(dev) if method.startswith("linear_projector") else None
    engine = Engine(student, None, None, {3: cfg}, module=BaselineModule(method, student, teacher.head, proj))
    fn = teacher_fn or (lambda tb, idx: teacher_forward(teacher, tb))
    if method in TEXT_ALIGNED:  # the batch's sample indices give both sides' encodings: pair their rows on the host
        targets = fn
        fn = lambda tb, idx: with_text_rows(targets(tb, idx), [data[i][:2] for i in idx.tolist()])  # noqa: E731
    history = train_stage(3, student, data, cfg, teacher, teacher_fn=fn, progress=progress, engine=engine)
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
