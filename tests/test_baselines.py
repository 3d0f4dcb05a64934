"""Baseline losses against plain references on hand-built examples; gradients reach the student, never the teacher."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from minigenrecal.study import baselines as B
from minigenrecal.loop import PairData
from minigenrecal.stages import StageConfig, teacher_forward


def test_align_by_index_pairs_first_min_positions():
    # sample 0: La_s=3, La_l=2 -> 2 pairs; sample 1: La_s=1, La_l=4 -> 1 pair
    i_s, i_t = B.align_by_index(torch.tensor([3, 1]), torch.tensor([2, 4]))
    assert i_s.tolist() == [0, 1, 3]
    assert i_t.tolist() == [0, 1, 2]


def test_uld_loss_hand_built():
    # student vocab 2, teacher vocab 3, one row each; probabilities chosen by hand
    p_s = [0.25, 0.75]
    p_t = [0.2, 0.5, 0.3]
    s_logits = torch.tensor([[math.log(v) for v in p_s]])
    t_logits = torch.tensor([[math.log(v) for v in p_t]])
    # sorted: student [0.75, 0.25, 0], teacher [0.5, 0.3, 0.2] -> |0.25| + |0.05| + |0.2| = 0.5
    torch.testing.assert_close(B.uld_loss(s_logits, t_logits), torch.tensor(0.5))


def test_uld_loss_matches_loop_reference():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=g), torch.randn(5, 11, generator=g)
    ref = 0.0
    for r in range(5):
        a = sorted(F.softmax(s[r], -1).tolist(), reverse=True) + [0.0] * 4
        b = sorted(F.softmax(t[r], -1).tolist(), reverse=True)
        ref += sum(abs(x - y) for x, y in zip(a, b)) / 5
    torch.testing.assert_close(B.uld_loss(s, t), torch.tensor(ref, dtype=torch.float32))
    assert B.uld_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)  # same distribution: zero


def test_projector_losses_reference():
    torch.manual_seed(0)
    d_s, d_l, V = 3, 4, 6
    proj, head = nn.Linear(d_s, d_l), nn.Linear(d_l, V, bias=False)
    h_s, z_t, labels = torch.randn(2, d_s), torch.randn(2, d_l), torch.tensor([1, 5])
    ce, kl = B.projector_losses(h_s, proj, head, z_t, labels, tau=2.0)
    logits = h_s @ proj.weight.T + proj.bias
    logits = logits @ head.weight.T
    t_logits = z_t @ head.weight.T
    ref_ce = -(logits.log_softmax(-1)[0, 1] + logits.log_softmax(-1)[1, 5]) / 2
    p_t = (t_logits / 2).softmax(-1)
    ref_kl = (p_t * (p_t.log() - (logits / 2).log_softmax(-1))).sum(-1).mean() * 4
    torch.testing.assert_close(ce, ref_ce)
    torch.testing.assert_close(kl, ref_kl)


def test_same_tokenizer_kd_loss_reference():
    s = torch.tensor([[0.0, 1.0, 2.0]])
    t = torch.tensor([[2.0, 0.0, 0.0]])
    p = [math.exp(v) for v in (2.0, 0.0, 0.0)]
    p = [v / sum(p) for v in p]
    qz = sum(math.exp(v) for v in (0.0, 1.0, 2.0))
    q = [math.exp(v) / qz for v in (0.0, 1.0, 2.0)]
    ref = sum(a * math.log(a / b) for a, b in zip(p, q))
    torch.testing.assert_close(B.same_tokenizer_kd_loss(s, t), torch.tensor(ref, dtype=torch.float32))
    assert B.same_tokenizer_kd_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("method", B.METHODS)
def test_gradients_reach_student_never_teacher(method, tiny_pair, samples):
    teacher, make_student = tiny_pair
    if method == "same_tokenizer_kd":
        from minigenrecal.models.vlm import VLMView
        m, p = B.build_same_tokenizer_student(0)
        student = VLMView(m, p, name="student")
    else:
        student = make_student(0)
    cfg = StageConfig(train_vision=True)
    from minigenrecal.stages import set_trainable
    set_trainable(3, student.model, None, teacher.model, True)
    s_batch = student.collate([student.encode(s) for s in samples[:4]])
    t = teacher_forward(teacher, teacher.collate([teacher.encode(s) for s in samples[:4]]))
    proj = nn.Linear(student.d, teacher.d) if method == "linear_projector" else None
    terms = B.baseline_terms(method, student, s_batch, t, teacher.head, cfg, proj)
    terms["loss"].backward()
    llm = [p for n, p in student.model.named_parameters() if "layers" in n]
    assert llm and all(p.grad is not None and p.grad.abs().sum() > 0 for p in llm)
    assert all(p.grad is None for p in teacher.model.parameters())
    if proj is not None:
        assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    # the distillation term itself also sends gradient into the student
    student.model.zero_grad()
    key = {"same_tokenizer_kd": "kl", "uld": "uld", "linear_projector": "kl_proj"}[method]
    terms = B.baseline_terms(method, student, s_batch, t, teacher.head, cfg, proj)
    terms[key].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in llm)


def test_same_tokenizer_student_shares_teacher_tokenizer(tiny_pair):
    teacher, _ = tiny_pair
    m, p = B.build_same_tokenizer_student(0)
    assert p.tokenizer.get_vocab() == teacher.tokenizer.get_vocab()
    assert m.config.text_config.hidden_size == 96 and m.config.text_config.num_hidden_layers == 2
    assert m.get_output_embeddings().weight.shape[0] == teacher.V


def test_train_baseline_lowers_loss_on_one_batch(tiny_pair, samples):
    teacher, make_student = tiny_pair
    student = make_student(0)
    data = PairData([student.encode(s) for s in samples], [teacher.encode(s) for s in samples])
    cfg = StageConfig(steps=25, batch_size=8, lr=3e-3, lr_end=3e-3, train_vision=True)
    hist = B.train_baseline("uld", student, data, cfg, teacher)
    assert len(hist) == 25 and hist[-1]["loss"] < 0.7 * hist[0]["loss"]
    assert all(p.grad is None for p in teacher.model.parameters())
