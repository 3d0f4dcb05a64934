"""Notebook helpers: the boundary table agrees with the losses, cosine/pooling maths, tables, the smoke switch."""
import matplotlib

matplotlib.use("Agg")

import pytest
import torch

from minigenrecal.teach import viz
from minigenrecal.losses import split_teacher
from minigenrecal.recalibrator import Recalibrator


def test_boundary_rows_last_question_position_predicts_a0():
    rows = viz.boundary_rows(Lq=4, La=3)
    assert [r["pos"] for r in rows] == list(range(6))  # Lq + La - 1 positions
    assert [r["input"] for r in rows] == ["z_q[0]", "z_q[1]", "z_q[2]", "z_q[3]", "P(a_0)", "P(a_1)"]
    assert [r["predicts"] for r in rows] == [None, None, None, "a_0", "a_1", "a_2"]


@pytest.mark.parametrize("Lq,La", [(1, 2), (5, 2), (7, 6)])
def test_boundary_rows_predict_from_the_last_question_position_on(Lq, La):
    """docs/method.md decision 4: positions Lq-1 .. Lq+La-2 predict a_0 .. a_{La-1}, in order; the rest predict nothing."""
    rows = viz.boundary_rows(Lq, La)
    assert len(rows) == Lq + La - 1
    predicts = {r["pos"]: r["predicts"] for r in rows if r["predicts"] is not None}
    assert predicts == {Lq - 1 + k: f"a_{k}" for k in range(La)}
    assert [r["input"] for r in rows[Lq:]] == [f"P(a_{k})" for k in range(La - 1)]


def test_cosine_matrix_against_hand_computed():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, -1.0]])
    m = viz.cosine_matrix(a, b)
    s = 2 ** -0.5
    torch.testing.assert_close(m, torch.tensor([[1.0, 0.0, -s], [s, s, -1.0]]))


def test_path_cosine_centers_each_side():
    shared = torch.tensor([10.0, 10.0, 0.0])
    own = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-1.0, -1.0, 0.0]])  # zero-mean over samples
    paths = {"student_path": shared + own, "teacher_path": shared + 2 * own}
    torch.testing.assert_close(viz.path_cosine(paths), viz.cosine_matrix(own, own))
    assert viz.path_cosine(paths, center=False).min() > 0.8  # the shared direction dominates uncentred


def test_path_features_pools_the_answer_predicting_rows():
    from transformers import LlamaConfig
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    recal = Recalibrator(24, cfg).eval()
    q_lens, a_lens = torch.tensor([5, 3]), torch.tensor([3, 2])
    z = torch.randn(2, 8, 24)
    t = split_teacher(z, torch.zeros(2, 8, dtype=torch.long), q_lens, a_lens)
    z_q = [torch.randn(4, 16), torch.randn(6, 16)]
    pooled = viz.path_features(recal, z_q, t)
    assert pooled.shape == (2, 24)
    with torch.no_grad():
        out = recal(z_q, t.z_a)
    torch.testing.assert_close(pooled[0], out[0, 3:6].mean(0))  # rows Lq-1 .. Lq+La-2 of sample 0 (Lq=4, La=3)
    torch.testing.assert_close(pooled[1], out[1, 5:7].mean(0))  # sample 1 (Lq=6, La=2)


def test_smooth_is_a_trailing_mean():
    assert viz.smooth([1, 2, 3, 4, 5], 2) == [1.0, 1.5, 2.5, 3.5, 4.5]
    assert viz.smooth([4.0, 2.0], 1) == [4.0, 2.0]


def test_summarize_rows_and_markdown_table():
    rows = [{"method": "sft", "seed": 0, "accuracy": 0.5, "jsd": None, "ece": 0.2},
            {"method": "sft", "seed": 1, "accuracy": 0.7, "jsd": None, "ece": 0.4},
            {"method": "genrecal", "seed": 0, "accuracy": 0.9, "jsd": 0.01, "ece": 0.1}]
    s = {r["method"]: r for r in viz.summarize_rows(rows)}
    assert s["sft"]["seeds"] == 2 and s["sft"]["accuracy"] == pytest.approx(0.6)
    assert s["sft"]["accuracy_std"] == pytest.approx(0.1414, abs=1e-3)
    assert s["sft"]["jsd"] is None and s["genrecal"]["accuracy_std"] is None
    md = viz.markdown_table(viz.summarize_rows(rows), ["method", "seeds", "accuracy", "jsd"])
    lines = md.splitlines()
    assert lines[0] == "| method | seeds | accuracy | jsd |"
    assert lines[2] == "| sft | 2 | 0.600 | - |"


def test_smoke_switch(monkeypatch):
    monkeypatch.setenv(viz.SMOKE_ENV, "1")
    assert viz.smoke() and viz.pick(100, 3) == 3
    monkeypatch.setenv(viz.SMOKE_ENV, "0")
    assert not viz.smoke() and viz.pick(100, 3) == 100
    monkeypatch.delenv(viz.SMOKE_ENV)
    assert viz.pick(100, 3) == 100


def test_token_rows_spans_follow_the_encoding(tiny_pair, samples):
    teacher, student_factory = tiny_pair
    for view in (teacher, student_factory()):
        enc = view.encode(samples[0])
        rows = viz.token_rows(view, enc)
        assert len(rows) == enc.q_len + enc.a_len
        assert [r["span"] for r in rows].count("a") == enc.a_len
        assert sum(r["span"] == "image" for r in rows) == int((enc.input_ids == view.image_token_id).sum())
        assert "La=" in viz.tokens_html(view, enc, "x")


def test_plots_draw_without_error(tiny_pair, samples):
    import matplotlib.pyplot as plt
    ax = viz.plot_boundary(Lq_s=6, Lq_l=8, La=3)
    reds = [t.get_text() for t in ax.texts if t.get_color() == "#c0392b"]
    assert reds == ["a_0", "a_1", "a_2"] * 3  # three rows, each scoring a_0..a_2
    hist = [{"loss": 3.0 - 0.1 * i, "ce_main": 1.0} for i in range(10)]
    ax = viz.plot_history(hist, window=3)
    assert len(ax.lines) == 2
    fig = viz.plot_cosine({"a": torch.eye(3)})
    assert "mean diagonal 1.00" in fig.axes[0].get_title()
    fig = viz.show_samples(samples[:2], ["x", samples[1].answer], ncols=2)
    assert fig.axes[1].title.get_color() == "green" and fig.axes[0].title.get_color() == "red"
    plt.close("all")


def test_recal_token_accuracy_counts_first_tokens(tiny_pair, samples):
    from minigenrecal.recalibrator import Recalibrator
    teacher, student_factory = tiny_pair
    student = student_factory()
    torch.manual_seed(0)
    recal = Recalibrator(teacher.d, student.text_config).eval()
    acc = viz.recal_token_accuracy(recal, student, teacher, samples[:5], batch_size=2)
    assert 0.0 <= acc["first_token"] <= 1.0 and 0.0 <= acc["all_tokens"] <= 1.0
    # a stand-in whose outputs at the predicting rows are the teacher's own features scores exactly as the teacher
    from minigenrecal.stages import teacher_forward
    t = teacher_forward(teacher, teacher.collate([teacher.encode(s) for s in samples[:5]]))
    ok = (teacher.head(t.z_pred).argmax(-1) == t.labels).float()
    rows = list(t.z_pred.split(t.a_lens.tolist()))

    def echo(z_q, z_a):
        out = torch.zeros(len(z_q), max(len(q) + len(a) for q, a in zip(z_q, z_a)), teacher.d)
        for b, (q, r) in enumerate(zip(z_q, rows)):
            out[b, len(q) - 1: len(q) - 1 + len(r)] = r
        return out
    acc = viz.recal_token_accuracy(echo, student, teacher, samples[:5], batch_size=5)
    starts = torch.cumsum(t.a_lens, 0) - t.a_lens
    assert acc["all_tokens"] == pytest.approx(ok.mean().item())
    assert acc["first_token"] == pytest.approx(ok[starts].mean().item())


def test_plot_token_values_one_bar_per_position():
    import matplotlib.pyplot as plt
    ax = viz.plot_token_values({"g": torch.tensor([0.0, 1.0, 2.0]), "h": [1, 1, 1]}, ["q", "image", "a"])
    assert len(ax.patches) >= 6  # 2 series x 3 positions (+ span shading)
    plt.close("all")
