"""Notebook helpers: the smoke switch, token tables, the boundary picture, Fig. 7-style cosine matrices,
loss curves, sample grids and results tables. Plotting only; the method itself lives in the other modules."""
from __future__ import annotations

import html
import math
import os
import statistics
from collections import defaultdict

import torch
import torch.nn.functional as F

from minigenrecal.losses import answer_rows
from minigenrecal.study.tables import md_table

SMOKE_ENV = "MINIGENRECAL_SMOKE"


# -- the CI switch ------------------------------------------------------------------------------------------
def smoke() -> bool:
    """True when MINIGENRECAL_SMOKE=1: notebooks shrink step and sample counts so CI runs all six in minutes."""
    return os.environ.get(SMOKE_ENV, "").strip().lower() in ("1", "true", "yes")


def pick(learner, smoke_value):
    """`learner` normally, `smoke_value` under MINIGENRECAL_SMOKE=1."""
    return smoke_value if smoke() else learner


def tiny_teacher(log=print):
    """(model, processor, trained): the shipped trained tiny teacher, or a random-init one of the same shape
    (with a printed notice) when data_samples/tiny_teacher has not been built."""
    from minigenrecal.models.tiny import TEACHER_DIR, build_teacher, load_teacher
    if (TEACHER_DIR / "config.json").exists():
        model, proc = load_teacher()
        return model, proc, True
    log("note: data_samples/tiny_teacher not found; using a RANDOM-INIT teacher of the same architecture "
        "(build the trained one with `python -m minigenrecal make-teacher`). Shapes are right; accuracies are not.")
    model, proc = build_teacher()
    return model, proc, False


# -- tokens ---------------------------------------------------------------------------------------------------
def token_rows(view, enc) -> list[dict]:
    """One row per token of an Encoded sample: position, id, token string and span ('q', 'image' or 'a')."""
    toks = view.tokenizer.convert_ids_to_tokens(enc.input_ids.tolist())
    rows = []
    for i, (tid, tok) in enumerate(zip(enc.input_ids.tolist(), toks)):
        span = "a" if i >= enc.q_len else ("image" if tid == view.image_token_id else "q")
        rows.append({"pos": i, "id": tid, "token": tok, "span": span})
    return rows


_SPAN_COLOR = {"q": "#dbe8f6", "image": "#e6e6e6", "a": "#fde2c4"}


def tokens_html(view, enc, title: str = "", collapse_image: bool = True) -> str:
    """Tokens as coloured chips (question blue, image grey, answer orange); runs of image tokens collapsed."""
    chips, rows, i = [], token_rows(view, enc), 0
    while i < len(rows):
        r = rows[i]
        j = i
        while collapse_image and r["span"] == "image" and j + 1 < len(rows) and rows[j + 1]["span"] == "image":
            j += 1
        label = f"{html.escape(r['token'])} x{j - i + 1}" if j > i else html.escape(repr(r["token"])[1:-1])
        tip = f"pos {r['pos']}" + (f"-{rows[j]['pos']}" if j > i else f", id {r['id']}")
        chips.append(f"<span title='{tip}' style='background:{_SPAN_COLOR[r['span']]};border:1px solid #999;"
                     f"border-radius:3px;padding:1px 3px;margin:1px;font-family:monospace;display:inline-block'>"
                     f"{label}</span>")
        i = j + 1
    n_img = sum(r["span"] == "image" for r in rows)
    head = (f"<b>{html.escape(title)}</b> Lq={enc.q_len} (image tokens {n_img}), La={enc.a_len}, "
            f"total {len(rows)}<br>")
    return "<div style='margin-bottom:8px'>" + head + "".join(chips) + "</div>"


# -- the boundary (docs/method.md decision 4) ------------------------------------------------------------------
def boundary_rows(Lq: int, La: int, q_label: str = "z_q") -> list[dict]:
    """The Recalibrator's input sequence position by position, and which teacher answer token each position
    predicts (None for positions that predict nothing). Built with losses.answer_rows, the code the losses use."""
    T = Lq + La - 1
    inputs = [f"{q_label}[{i}]" for i in range(Lq)] + [f"P(a_{k})" for k in range(La - 1)]
    targets: list[str | None] = [None] * T
    pred_pos = answer_rows(torch.arange(T)[None], torch.tensor([Lq]), torch.tensor([La])).tolist()
    for k, p in enumerate(pred_pos):
        targets[p] = f"a_{k}"
    return [{"pos": p, "input": inputs[p], "predicts": targets[p]} for p in range(T)]


def plot_boundary(Lq_s: int, Lq_l: int, La: int, show_q: int = 3, ax=None):
    """Three rows: the teacher's own sequence, the main path [z_qs, P(z_al)] and the regularization path
    [P(z_ql), P(z_al)]; arrows point from each predicting position to the teacher answer token it predicts."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, Rectangle
    if ax is None:
        _, ax = plt.subplots(figsize=(11, 5.2))
    rows = [("teacher's own sequence", Lq_l, La, "q_l", "a", True),
            ("main path: [z_qs, P(z_al)]", Lq_s, La, "z_qs", "P(a", False),
            ("reg. path: [P(z_ql), P(z_al)]", Lq_l, La, "P(z_ql)", "P(a", False)]
    for r, (name, Lq, La_, qlab, alab, own) in enumerate(rows):
        y = -r * 2.2
        ax.text(-0.3, y + 0.4, name, ha="right", va="center", fontsize=10)
        n_ans = La_ if own else La_ - 1
        shown = list(range(max(0, Lq - show_q), Lq))
        cols = [("...", None, "#dbe8f6")] if shown[0] > 0 else []
        cols += [(qlab, p, "#dbe8f6") for p in shown]
        cols += [(f"a_{k}" if own else f"P(a_{k})", Lq + k, "#fde2c4") for k in range(n_ans)]
        for x, (lab, pos, color) in enumerate(cols):
            ax.add_patch(Rectangle((x, y), 0.9, 0.8, facecolor=color, edgecolor="#555"))
            ax.text(x + 0.45, y + 0.4, lab, ha="center", va="center", fontsize=7)
            if pos is not None:
                ax.text(x + 0.45, y - 0.2, str(pos), ha="center", va="center", fontsize=7, color="#666")
            predicts = pos is not None and Lq - 1 <= pos <= Lq + La_ - 2
            if predicts:
                k = pos - (Lq - 1)
                ax.add_patch(FancyArrowPatch((x + 0.45, y + 0.8), (x + 0.45, y + 1.25), arrowstyle="-|>",
                                             mutation_scale=8, color="#c0392b"))
                ax.text(x + 0.45, y + 1.33, f"a_{k}", ha="center", va="bottom", fontsize=8, color="#c0392b")
    ax.set_xlim(-5.5, show_q + La + 1.2)
    ax.set_ylim(-2 * 2.2 - 0.5, 1.8)
    ax.axis("off")
    ax.set_title("Who predicts what: red arrows = the position whose output is scored against teacher token a_k "
                 "(grey numbers = NPE position ids)", fontsize=10)
    return ax


# -- Fig. 7-style: how close are the two Recalibrator paths? ------------------------------------------------
@torch.no_grad()
def path_features(recal, z_q: list[torch.Tensor], t) -> torch.Tensor:
    """Recalibrator outputs at the answer-predicting rows, mean-pooled per sample: (B, d_l)."""
    out = recal(z_q, t.z_a)  # (B, T, d_l)
    q_lens = torch.tensor([len(q) for q in z_q])
    rows = answer_rows(out, q_lens, t.a_lens.cpu())  # (N, d_l)
    return torch.stack([r.mean(0) for r in rows.split(t.a_lens.tolist())])


@torch.no_grad()
def recal_paths(recal, student, teacher, samples) -> dict[str, torch.Tensor]:
    """Pooled answer-row features of the student path, the teacher (regularization) path and the teacher
    itself, for a few samples: each (B, d_l)."""
    from minigenrecal.stages import teacher_forward
    s_batch = student.collate([student.encode(s) for s in samples])
    t_batch = teacher.collate([teacher.encode(s) for s in samples])
    t = teacher_forward(teacher, t_batch)
    z_s = student.body(s_batch)
    z_qs = [z_s[b, :q] for b, q in enumerate(s_batch["q_lens"].tolist())]
    z_ql = [recal.proj_pre(q) for q in t.z_q]
    teacher_rows = torch.stack([r.mean(0) for r in t.z_pred.split(t.a_lens.tolist())])
    return {"student_path": path_features(recal, z_qs, t), "teacher_path": path_features(recal, z_ql, t),
            "teacher": teacher_rows}


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, m) cosine similarities between the rows of a (n, d) and b (m, d)."""
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


def path_cosine(paths: dict, a: str = "student_path", b: str = "teacher_path", center: bool = True) -> torch.Tensor:
    """Cosine matrix between two of `recal_paths`' outputs; `center` removes each side's mean over the samples
    first, so the matrix shows what is specific to each QA pair rather than a direction they all share."""
    x, y = paths[a], paths[b]
    if center:
        x, y = x - x.mean(0), y - y.mean(0)
    return cosine_matrix(x, y)


def plot_cosine(mats: dict, vmin: float = -1.0, vmax: float = 1.0, xlabel: str = "teacher-path sample",
                ylabel: str = "student-path sample"):
    """Side-by-side heatmaps of cosine matrices {title: (n, n) tensor}; the diagonal is the same QA pair."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(mats), figsize=(4.2 * len(mats), 3.8), squeeze=False)
    for ax, (title, m) in zip(axes[0], mats.items()):
        im = ax.imshow(m.numpy(), vmin=vmin, vmax=vmax, cmap="viridis")
        diag = torch.diagonal(m).mean().item()
        ax.set_title(f"{title}\nmean diagonal {diag:.2f}", fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    return fig


# -- loss curves ---------------------------------------------------------------------------------------------
def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (the first points average what exists so far)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_history(history, keys=None, window: int = 5, ax=None, title: str = "", label_prefix: str = ""):
    """Loss terms against step. `history` is train_stage's list of dicts, or a {stage: list} dict (concatenated)."""
    import matplotlib.pyplot as plt
    if isinstance(history, dict):
        history = [h for st in sorted(history) for h in history[st]]
    keys = keys or [k for k in ("loss", "ce_main", "kl_main", "ce_reg", "kl_reg", "ce_student") if k in history[0]]
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.6))
    x = list(range(len(history)))
    for k in keys:
        ys = [h.get(k, math.nan) for h in history]
        ax.plot(x, smooth(ys, window) if window > 1 else ys, label=label_prefix + k)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return ax


# -- samples -------------------------------------------------------------------------------------------------
def show_samples(samples, predictions=None, ncols: int = 4, title: str = ""):
    """A grid of images with question, gold answer and (optionally) the prediction, green when exact."""
    import matplotlib.pyplot as plt

    from minigenrecal.data.synthetic import normalize
    n = len(samples)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 3.4 * nrows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        s = samples[i]
        ax.imshow(s.image)
        text = f"Q: {s.question}\ngold: {s.answer}"
        color = "black"
        if predictions is not None:
            ok = normalize(predictions[i]) == normalize(s.answer)
            text += f"\npred: {predictions[i]}"
            color = "green" if ok else "red"
        ax.set_title(text, fontsize=8, color=color)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


# -- results ----------------------------------------------------------------------------------------------
def summarize_rows(rows: list[dict], metrics=("accuracy", "jsd", "ece")) -> list[dict]:
    """Group result rows by method: n seeds, and mean/std of each metric over the rows that have it."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r["method"]].append(r)
    out = []
    for method, rs in groups.items():
        row = {"method": method, "seeds": len(rs)}
        for m in metrics:
            vals = [r[m] for r in rs if r.get(m) is not None]
            row[m] = statistics.fmean(vals) if vals else None
            row[m + "_std"] = statistics.stdev(vals) if len(vals) > 1 else None
        out.append(row)
    return out


def markdown_table(rows: list[dict], columns: list[str] | None = None, digits: int = 3) -> str:
    """A markdown table of dict rows; floats rounded, None shown as a dash, `|` in a cell escaped, and the width of
    every row checked (`study.tables.md_table`)."""
    columns = columns or list(rows[0])
    return "\n".join(md_table(columns, [[r.get(c) for c in columns] for r in rows], digits))


# The paper's numbers (arXiv 2506.15681; InternVL2.5-78B teacher), as docs/method.md lists them.
PAPER = {
    "stage_by_stage": {"after stage 1 (student unchanged)": 67.0, "after stage 2": 74.3, "after stage 3": 76.4,
                       "SFT only": 69.2},
    "regularization": {"no reg": 70.1, "feature-MSE reg": 71.7, "KL-only reg": 73.5, "CE-only reg": 74.6,
                       "CE+KL reg": 76.4},
    "depth": {"1": 74.9, "2": 76.4, "5-20": "76.4-76.7"},
    "npe": {"without NPE": 70.5, "with NPE": 76.4},
    "calibration": {"SFT": {"jsd_x100": 0.53, "ece": 0.21}, "GenRecal": {"jsd_x100": 0.02, "ece": 0.13},
                    "teacher": {"jsd_x100": None, "ece": 0.11}},
    "cross_tokenizer_avg": {"base": 67.0, "ULD": 69.4, "MOT": 70.8, "GenRecal": 76.4},
}


# -- what the Recalibrator gets right, and where gradients land -------------------------------------------
@torch.no_grad()
def recal_token_accuracy(recal, student, teacher, samples, batch_size: int = 32) -> dict:
    """Teacher-head argmax accuracy of the main path's recalibrated features against the teacher's answer
    tokens: over all answer tokens, and over a_0 alone (the one token predicted from the student's question only)."""
    from minigenrecal.stages import teacher_forward
    hits = first = n = n_first = 0
    for i in range(0, len(samples), batch_size):
        chunk = samples[i: i + batch_size]
        s_batch = student.collate([student.encode(s) for s in chunk])
        t = teacher_forward(teacher, teacher.collate([teacher.encode(s) for s in chunk]))
        z_s = student.body(s_batch)
        z_qs = [z_s[b, :q] for b, q in enumerate(s_batch["q_lens"].tolist())]
        out = recal(z_qs, t.z_a)  # (B, T, d_l)
        h = answer_rows(out, torch.tensor([len(q) for q in z_qs]), t.a_lens.cpu())  # (N, d_l)
        ok = (teacher.head(h).argmax(-1) == t.labels).float()
        starts = torch.cumsum(t.a_lens, 0) - t.a_lens  # row of a_0 for each sample
        hits, n = hits + ok.sum().item(), n + len(ok)
        first, n_first = first + ok[starts].sum().item(), n_first + len(starts)
    return {"all_tokens": hits / max(n, 1), "first_token": first / max(n_first, 1)}


def plot_token_values(series: dict, spans: list[str], ylabel: str = "gradient norm", title: str = "", ax=None):
    """Bars per position for each {label: (T,) values}; the background shades question, image and answer spans."""
    import matplotlib.pyplot as plt
    if ax is None:
        _, ax = plt.subplots(figsize=(11, 3.4))
    for i, sp in enumerate(spans):
        ax.axvspan(i - 0.5, i + 0.5, color=_SPAN_COLOR[sp], alpha=0.6, lw=0)
    width = 0.8 / len(series)
    for k, (label, vals) in enumerate(series.items()):
        xs = [i - 0.4 + width * (k + 0.5) for i in range(len(vals))]
        ax.bar(xs, [float(v) for v in vals], width=width, label=label)
    ax.set_xlim(-0.5, len(spans) - 0.5)
    ax.set_xlabel("student position (blue: question text, grey: image tokens, orange: answer)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return ax
