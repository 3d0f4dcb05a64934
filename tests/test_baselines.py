"""Baseline losses against plain references on hand-built examples; gradients reach the student, never the teacher."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from minigenrecal.data.synthetic import Sample, make_split
from minigenrecal.losses import answer_rows
from minigenrecal.loop import PairData
from minigenrecal.models.render import Encoded
from minigenrecal.models.vlm import VLMView
from minigenrecal.study import baselines as B
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


# -- text alignment ---------------------------------------------------------------------------------------------
# "blue cat" (8 characters), offsets in the answer's coordinates. Student (Metaspace): a lone leading-space piece
# ending at 0, "blue" in three pieces, " cat" in one, then its end-of-turn token after the answer. Teacher (byte BPE):
# "blue" in one token, " cat" in two, then its end-of-turn token.
S_OFF = [(-1, 0), (0, 1), (1, 3), (3, 4), (4, 8), (8, 26)]
T_OFF = [(0, 4), (4, 6), (6, 8), (8, 18)]


def test_align_by_text_hand_built_spans():
    spans = B.align_by_text("blue cat", S_OFF, "blue cat", T_OFF, "s1")
    # "blue": four student tokens (leading space included) <-> one teacher token; " cat": one <-> two; end <-> end
    assert spans == [([0, 1, 2, 3], [0]), ([4], [1, 2]), ([5], [3])]
    # the same split on both sides: one span per token
    assert B.align_by_text("ab", [(0, 1), (1, 2), (2, 5)], "ab", [(0, 1), (1, 2), (2, 3)]) == \
        [([0], [0]), ([1], [1]), ([2], [2])]
    # boundaries that cross: "abc" as a|bc vs ab|c close only at the end of the text
    assert B.align_by_text("abc", [(0, 1), (1, 3), (3, 4)], "abc", [(0, 2), (2, 3), (3, 4)]) == \
        [([0, 1], [0, 1]), ([2], [2])]


def test_align_by_text_names_the_sample_on_a_mismatch():
    with pytest.raises(ValueError, match="sample s7: the student's answer text 'blue cat' differs"):
        B.align_by_text("blue cat", S_OFF, "blue hat", T_OFF, "s7")
    with pytest.raises(ValueError, match=r"sample s8: tokens \[\] of the student and \[3\] of the teacher"):
        B.align_by_text("blue cat", S_OFF[:-1], "blue cat", T_OFF, "s8")  # the student lost its end-of-turn token
    with pytest.raises(ValueError, match="sample s9: the teacher's answer token offsets go backwards"):
        B.align_by_text("blue cat", S_OFF, "blue cat", [(4, 6), (0, 4), (6, 8), (8, 18)], "s9")


def _enc(sid, answer, offsets):
    ids = torch.zeros(3 + len(offsets), dtype=torch.long)
    return Encoded(ids, 3, len(offsets), {}, sid, answer, offsets)


def test_text_rows_first_row_of_each_span_offset_per_sample():
    pairs = [(_enc("a", "blue cat", S_OFF), _enc("a", "blue cat", T_OFF)),
             (_enc("b", "ab", [(0, 1), (1, 2), (2, 5)]), _enc("b", "ab", [(0, 2), (2, 3)]))]
    i_s, i_t = B.text_rows(pairs)
    # sample a: student rows 0, 4, 5 / teacher 0, 1, 3; sample b after 6 student and 4 teacher rows:
    # "ab" = a|b vs ab -> (6, 4); end -> (8, 5)
    assert i_s.tolist() == [0, 4, 5, 6, 8]
    assert i_t.tolist() == [0, 1, 3, 4, 5]
    with pytest.raises(ValueError, match="sample c: the teacher's encoding carries no offsets"):
        B.text_rows([(_enc("c", "ab", [(0, 2), (2, 3)]), Encoded(torch.zeros(5, dtype=torch.long), 3, 2, {}, "c"))])


def test_encodings_carry_answer_offsets_of_both_tokenizers(tiny_pair):
    """The tiny pair on "blue triangle": the student's Metaspace pieces vs the teacher's byte-BPE tokens."""
    teacher, make_student = tiny_pair
    student = make_student(0)
    s = Sample(make_split(0, "train", 1)[0].image, "Which shape?", "blue triangle", id="bt")
    es, et = student.encode(s), teacher.encode(s)
    assert es.answer == et.answer == "blue triangle"
    assert student.tokenizer.convert_ids_to_tokens(es.input_ids[es.q_len:].tolist()) == \
        ["\u2581", "b", "lu", "e", "\u2581triangle", "<end_of_utterance>"]
    assert es.a_offsets == [(-1, 0), (0, 1), (1, 3), (3, 4), (4, 13), (13, 31)]
    assert teacher.tokenizer.convert_ids_to_tokens(et.input_ids[et.q_len:].tolist()) == \
        ["blue", "\u0120triangle", "<|im_end|>"]
    assert et.a_offsets == [(0, 4), (4, 13), (13, 23)]
    i_s, i_t = B.text_rows([(es, et)])
    assert i_s.tolist() == [0, 4, 5] and i_t.tolist() == [0, 1, 2]  # by index it would pair (0,0), (1,1), (2,2)


def _terms(method, student, teacher, samples, proj):
    s_encs, t_encs = [student.encode(s) for s in samples], [teacher.encode(s) for s in samples]
    t = teacher_forward(teacher, teacher.collate(t_encs))
    if method in B.TEXT_ALIGNED:
        t = B.with_text_rows(t, list(zip(s_encs, t_encs)))
    torch.manual_seed(0)
    return B.baseline_terms(method, student, student.collate(s_encs), t, teacher.head, StageConfig(), proj)


@pytest.mark.parametrize("old", ["uld", "linear_projector"])
def test_text_methods_equal_index_methods_when_tokenizations_coincide(old, tiny_pair, samples):
    """The same-tokenizer student renders every answer as the teacher does: one span per token, rows k <-> k."""
    teacher, _ = tiny_pair
    student = VLMView(*B.build_same_tokenizer_student(0), name="student")
    proj = nn.Linear(student.d, teacher.d) if old == "linear_projector" else None
    a, b = _terms(old, student, teacher, samples[:4], proj), _terms(old + "_text", student, teacher, samples[:4], proj)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


@pytest.mark.parametrize("old", ["uld", "linear_projector"])
def test_text_methods_differ_from_index_methods_on_the_cross_tokenizer_pair(old, tiny_pair):
    """ "blue triangle": by index the student's row predicting 'b' meets the teacher's predicting ' triangle'; by text
    the rows are student 0, 4, 5 <-> teacher 0, 1, 2. The text method's loss equals the plain loss on those rows."""
    teacher, make_student = tiny_pair
    student = make_student(0)
    s = [Sample(make_split(0, "train", 1)[0].image, "Which shape?", "blue triangle", id="bt")]
    proj = nn.Linear(student.d, teacher.d) if old == "linear_projector" else None
    with torch.no_grad():
        student.head.weight.mul_(30)  # a random-init head is near uniform on every row: make rows tell apart
        if proj is not None:
            proj.weight.mul_(30)
        by_index, by_text = _terms(old, student, teacher, s, proj), _terms(old + "_text", student, teacher, s, proj)
        es, et = student.encode(s[0]), teacher.encode(s[0])
        batch = student.collate([es])
        h_s = answer_rows(student.body(batch), batch["q_lens"], batch["a_lens"])  # (6, d_s)
        t = teacher_forward(teacher, teacher.collate([et]))
        rows_s, rows_t = torch.tensor([0, 4, 5]), torch.tensor([0, 1, 2])
        if old == "uld":
            ref = B.uld_loss(student.head(h_s[rows_s]), teacher.head(t.z_pred[rows_t]))
            key = "uld"
        else:
            ref = B.projector_losses(h_s[rows_s], proj, teacher.head, t.z_pred[rows_t], t.labels[rows_t])[1]
            key = "kl_proj"
    torch.testing.assert_close(by_text[key], ref)
    assert (by_index[key] - by_text[key]).abs() > 1e-2


@pytest.mark.parametrize("method", B.METHODS)
def test_gradients_reach_student_never_teacher(method, tiny_pair, samples):
    teacher, make_student = tiny_pair
    if method == "same_tokenizer_kd":
        m, p = B.build_same_tokenizer_student(0)
        student = VLMView(m, p, name="student")
    else:
        student = make_student(0)
    cfg = StageConfig(train_vision=True)
    from minigenrecal.stages import set_trainable
    set_trainable(3, student.model, None, teacher.model, True)
    s_batch = student.collate([student.encode(s) for s in samples[:4]])
    t = teacher_forward(teacher, teacher.collate([teacher.encode(s) for s in samples[:4]]))
    if method in B.TEXT_ALIGNED:
        t = B.with_text_rows(t, [(student.encode(s), teacher.encode(s)) for s in samples[:4]])
    proj = nn.Linear(student.d, teacher.d) if method.startswith("linear_projector") else None
    terms = B.baseline_terms(method, student, s_batch, t, teacher.head, cfg, proj)
    terms["loss"].backward()
    llm = [p for n, p in student.model.named_parameters() if "layers" in n]
    assert llm and all(p.grad is not None and p.grad.abs().sum() > 0 for p in llm)
    assert all(p.grad is None for p in teacher.model.parameters())
    if proj is not None:
        assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    # the distillation term itself also sends gradient into the student
    student.model.zero_grad()
    key = {"same_tokenizer_kd": "kl", "uld": "uld", "linear_projector": "kl_proj"}[method.removesuffix("_text")]
    terms = B.baseline_terms(method, student, s_batch, t, teacher.head, cfg, proj)
    terms[key].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in llm)


def test_same_tokenizer_student_shares_teacher_tokenizer(tiny_pair):
    teacher, _ = tiny_pair
    m, p = B.build_same_tokenizer_student(0)
    assert p.tokenizer.get_vocab() == teacher.tokenizer.get_vocab()
    assert m.config.text_config.hidden_size == 96 and m.config.text_config.num_hidden_layers == 2
    assert m.get_output_embeddings().weight.shape[0] == teacher.V


@pytest.mark.parametrize("method", ["uld", "uld_text"])
def test_train_baseline_lowers_loss_on_one_batch(method, tiny_pair, samples):
    teacher, make_student = tiny_pair
    student = make_student(0)
    data = PairData([student.encode(s) for s in samples], [teacher.encode(s) for s in samples])
    cfg = StageConfig(steps=25, batch_size=8, lr=3e-3, lr_end=3e-3, train_vision=True)
    hist = B.train_baseline(method, student, data, cfg, teacher)
    assert len(hist) == 25 and hist[-1]["loss"] < 0.7 * hist[0]["loss"]
    assert all(p.grad is None for p in teacher.model.parameters())
