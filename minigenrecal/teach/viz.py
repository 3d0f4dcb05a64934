"""Notebook helpers: the smoke switch, token tables, the boundary picture, Fig. 7-style cosine matrices,
loss curves, sample grids and results tables. Plotting only; the method itself lives in the other modules."""
from __future__ import annotations

import html
import math
import os
import statistics
import textwrap
import warnings
from collections import defaultdict

import torch
import torch.nn.functional as F
import transformers

from minigenrecal.data.synthetic import normalize
from minigenrecal.losses import answer_rows
from minigenrecal.models.tiny import TEACHER_DIR, build_teacher, load_teacher
from minigenrecal.stages import teacher_forward
from minigenrecal.study.tables import md_table

SMOKE_ENV = "MINIGENRECAL_SMOKE"


# -- the CI switch ------------------------------------------------------------------------------------------
def smoke() -> bool:
    """True when MINIGENRECAL_SMOKE=1: notebooks shrink step and sample counts so CI runs all six in minutes."""
    return os.environ.get(SMOKE_ENV, "").strip().lower() in ("1", "true", "yes")


def pick(learner, smoke_value):
    """`learner` normally, `smoke_value` under MINIGENRECAL_SMOKE=1."""
    return smoke_value if smoke() else learner


def quiet_libraries() -> None:
    """What a notebook's first cell calls: no transformers progress bars ("Loading weights", "Writing model shards"),
    no transformers info or warning logs, no Python warnings. The notebooks' output is then only their own."""
    warnings.filterwarnings("ignore")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def tiny_teacher(log=print):
    """(model, processor, trained): the shipped trained tiny teacher, or a random-init one of the same shape
    (with a printed notice) when data_samples/tiny_teacher has not been built. `trained` says which one you got.
    Loads without a progress bar."""
    transformers.utils.logging.disable_progress_bar()
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
    import matplotlib.pyplot as plt  # heavy: only the plots need it
    from matplotlib.patches import FancyArrowPatch, Rectangle  # heavy: only the plots need it
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
    import matplotlib.pyplot as plt  # heavy: only the plots need it
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
    """Trailing moving average (the first points average what exists so far); NaN (a term a step does not have)
    stays NaN and is left out of its neighbours' averages."""
    out = []
    for i, v in enumerate(values):
        seen = [x for x in values[max(0, i - window + 1): i + 1] if x == x]
        out.append(statistics.fmean(seen) if v == v and seen else math.nan)
    return out


# One colour and line style per loss term, the same in every plot: CE terms thick and solid, KL terms thin and
# dashed or dotted on top (CE and KL nearly coincide when the teacher is confident, and both stay visible), the
# summed loss thick grey and dashed.
TERM_STYLE = {"loss": dict(color="0.35", lw=2.6, ls="--"), "ce_main": dict(color="tab:blue", lw=2.4),
              "kl_main": dict(color="tab:orange", lw=1.5, ls="--"),
              "ce_reg": dict(color="tab:purple", lw=2.4, alpha=0.6),
              "kl_reg": dict(color="tab:red", lw=1.5, ls=":"), "ce_student": dict(color="tab:green", lw=2.0),
              "mse": dict(color="tab:brown", lw=1.6)}
TERMS = ("loss", "ce_main", "kl_main", "ce_reg", "kl_reg", "ce_student")


def plot_history(history, keys=None, window: int = 5, ax=None, title: str = "", label_prefix: str = "",
                 logy: bool | None = None, legend: bool = True, color: str | None = None):
    """Loss terms against step, each term in its `TERM_STYLE`. `history` is train_stage's list of dicts, or a
    {stage: list} dict (concatenated, each stage smoothed on its own so a jump at a stage boundary stays sharp).
    `logy` (default: when the terms span more than a factor 10) puts terms of different sizes on one readable axis.
    `loss` is left out when it equals a single term (stage 3: loss = ce_student).
    `color` overrides the term colours (to tell two runs of the same term apart on one axis)."""
    import matplotlib.pyplot as plt  # heavy: only the plots need it
    from matplotlib import ticker  # heavy: only the plots need it
    segments = [history[st] for st in sorted(history)] if isinstance(history, dict) else [history]
    history = [h for seg in segments for h in seg]
    keys = list(keys or [k for k in TERMS if any(k in h for h in history)])
    terms = [k for k in keys if k != "loss"]
    if "loss" in keys and len(terms) == 1 and all(h["loss"] == h.get(terms[0]) for h in history):
        keys.remove("loss")
        terms = [f"{terms[0]} (= loss)"]
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.6))
    x = list(range(len(history)))
    curves = {}
    for k in keys:
        curves[k] = [y for seg in segments for y in smooth([h.get(k, math.nan) for h in seg], max(window, 1))]
        name = terms[0] if keys == [k] and terms[0].endswith("(= loss)") else k
        style = TERM_STYLE.get(k, {}) | ({"color": color} if color else {})  # `color`: two runs on one axis
        ax.plot(x, curves[k], label=label_prefix + name, **style)
    finite = [v for ys in curves.values() for v in ys if v == v and v > 0]
    if logy is None:
        logy = bool(finite) and max(finite) > 10 * min(finite)
    if logy:
        ax.set_yscale("log")
        plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")  # 20, 5, 0.5 rather than 2x10^1
        ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))  # labels at 1, 2, 5 x 10^k
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain if max(finite) < 4 * min(finite) else ticker.NullFormatter())
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (log axis)" if logy else "loss")
    ax.set_title(title, fontsize=10)
    if legend:
        ax.legend(fontsize=9)
    ax.grid(alpha=0.3, which="both" if logy else "major")
    return ax


def plot_stages(histories: dict, window: int = 5, width: float = 9.6):
    """One panel per stage of a run's {stage: history}, every term in its own `TERM_STYLE` colour in all panels,
    log loss axes, one legend for the figure."""
    import matplotlib.pyplot as plt  # heavy: only the plots need it
    fig, axes = plt.subplots(1, len(histories), figsize=(width, 3.4), layout="constrained", squeeze=False)
    seen = {}
    for ax, (st, hist) in zip(axes[0], sorted(histories.items())):
        plot_history(hist, ax=ax, window=window, title=f"stage {st}", logy=True, legend=False)
        ax.tick_params(labelsize=9)
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab.endswith(" (= loss)"):
                lab = lab.removesuffix(" (= loss)")
                ax.set_title(f"stage {st} (loss = {lab})", fontsize=10)
            seen.setdefault(lab, h)
    fig.legend(seen.values(), seen.keys(), loc="outside lower center", ncol=len(seen), fontsize=9, frameon=False)
    return fig


# -- samples -------------------------------------------------------------------------------------------------
def show_samples(samples, predictions=None, ncols: int = 4, title: str = "", width: float = 9.6):
    """A grid of images with question, gold answer and (optionally) the prediction, green when exact. `width` in
    inches (9.6 fills a notebook's output area at 100 dpi); titles wrap and the layout leaves room for them."""
    import matplotlib.pyplot as plt  # heavy: only the plots need it

    n = len(samples)
    nrows = math.ceil(n / ncols)
    side = width / ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, (side + 0.75) * nrows + (0.4 if title else 0)),
                             squeeze=False, layout="constrained")
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        s = samples[i]
        ax.imshow(s.image)
        lines = textwrap.wrap(f"Q: {s.question}", 30)[:2] + [f"gold: {s.answer}"]
        color = "black"
        if predictions is not None:
            ok = normalize(predictions[i]) == normalize(s.answer)
            lines.append(f"pred: {predictions[i]}"[:34])
            color = "green" if ok else "red"
        ax.set_title("\n".join(lines), fontsize=9, color=color)
    if title:
        fig.suptitle(title, fontsize=11)
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


def plot_token_values(series: dict, spans: list[str], ylabel: str = "gradient norm", title: str = "", ax=None,
                      logy: bool = False):
    """Bars per position for each {label: (T,) values}; the background shades question, image and answer spans.
    `logy` shows values that differ by orders of magnitude (bars of exactly 0 then do not appear)."""
    import matplotlib.pyplot as plt  # heavy: only the plots need it
    if ax is None:
        _, ax = plt.subplots(figsize=(9.6, 3.4))
    for i, sp in enumerate(spans):
        ax.axvspan(i - 0.5, i + 0.5, color=_SPAN_COLOR[sp], alpha=0.6, lw=0)
    width = 0.8 / len(series)
    for k, (label, vals) in enumerate(series.items()):
        xs = [i - 0.4 + width * (k + 0.5) for i in range(len(vals))]
        ax.bar(xs, [float(v) for v in vals], width=width, label=label)
    ax.set_xlim(-0.5, len(spans) - 0.5)
    if logy:
        ax.set_yscale("log")
        ys = [float(v) for vals in series.values() for v in vals if float(v) > 0]
        ax.set_ylim(min(ys) / 2, max(ys) * 2)
    ax.set_xlabel("student position (blue: question text, grey: image tokens, orange: answer)")
    ax.set_ylabel(ylabel + (" (log axis)" if logy else ""))
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=9, loc="upper left")
    return ax
