"""Candidate answer sets, answer distributions, JSD and ECE."""
import math
from dataclasses import replace

import pytest
import torch

from minigenrecal.evaluation import metrics as M
from minigenrecal.data.synthetic import make_split


def test_candidate_sets_contain_gold_for_a_large_split():
    sizes = {}
    closed = [s for s in make_split(0, "test", 3000) + make_split(3, "train", 1000) if M.is_closed(s)]
    assert 3000 < len(closed) < 4000  # the open caption questions are the only ones left out
    for s in closed:
        c = M.candidates(s.question)
        assert s.answer in c, (s.question, s.answer, c)
        assert len(set(c)) == len(c)
        sizes[len(c)] = sizes.get(len(c), 0) + 1
    assert set(sizes) == {13, 5}  # cell questions and the count-like ones


def test_candidates_reject_unknown_question():
    with pytest.raises(ValueError, match="no candidate"):
        M.candidates("What colour is the sky?")
    with pytest.raises(ValueError, match="no candidate"):
        M.candidates("Describe the grid.")  # open: exact match only


def test_calibration_skips_open_questions(tiny_pair):
    teacher, _ = tiny_pair
    test = make_split(0, "test", 12)
    n_open = sum(not M.is_closed(s) for s in test)
    assert n_open > 0
    cal = M.calibration(teacher, test)
    assert cal["n_closed"] == len(test) - n_open == len(cal["dists"])


def test_jsd_hand_computed():
    p, q = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert M.jsd(p, q) == pytest.approx(math.log(2))
    p, q = torch.tensor([0.5, 0.5]), torch.tensor([0.75, 0.25])
    m = [0.625, 0.375]
    ref = 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])) + \
        0.5 * (0.75 * math.log(0.75 / m[0]) + 0.25 * math.log(0.25 / m[1]))
    assert M.jsd(p, q) == pytest.approx(ref)
    assert M.jsd(q, p) == pytest.approx(ref)  # symmetric
    assert M.mean_jsd([p, p], [q, p]) == pytest.approx(ref / 2)


def test_ece_hand_computed():
    dists = [torch.tensor([0.9, 0.1]), torch.tensor([0.8, 0.2]), torch.tensor([0.3, 0.7]), torch.tensor([0.5, 0.5])]
    gold = [0, 1, 1, 1]
    # conf 0.9 (hit), 0.8 (miss), 0.7 (hit), 0.5 (argmax 0: miss); 15 bins of width 1/15
    # bins: 0.9 -> (13/15, 14/15]; 0.8 -> (11/15, 12/15]; 0.7 -> (10/15, 11/15]; 0.5 -> (7/15, 8/15]: all separate
    ref = (abs(1 - 0.9) + abs(0 - 0.8) + abs(1 - 0.7) + abs(0 - 0.5)) / 4
    assert M.ece(dists, gold) == pytest.approx(ref)
    # two samples in one bin: |mean acc - mean conf| weighted by bin share
    d2 = [torch.tensor([0.95, 0.05]), torch.tensor([0.97, 0.03])]
    assert M.ece(d2, [0, 1]) == pytest.approx(abs(0.5 - 0.96))


def _reference_distribution(view, s):
    """Softmax over the candidates of each candidate's summed answer-token log-probs, from the full model's
    logits on that candidate's own rendering (one forward per candidate, no batching, no padding)."""
    scores = []
    for c in M.candidates(s.question):
        e = view.encode(replace(s, answer=c))
        with torch.no_grad():
            logp = view.model(input_ids=e.input_ids[None], **e.vision).logits[0].float().log_softmax(-1)
        scores.append(sum(logp[e.q_len - 1 + j, e.input_ids[e.q_len + j]].item() for j in range(e.a_len)))
    return torch.tensor(scores, dtype=torch.float64).softmax(-1)


@pytest.mark.slow
def test_answer_distributions_equal_a_per_candidate_reference(tiny_pair):
    teacher, make_student = tiny_pair
    test = [s for s in make_split(0, "test", 12) if M.is_closed(s)][:3]
    for view in (teacher, make_student(0)):
        ref = [_reference_distribution(view, s) for s in test]
        for batch_size in (64, 5):  # one batch, and candidates split across batches (padding differs)
            got = M.answer_distributions(view, test, batch_size=batch_size)
            for g, r in zip(got, ref):
                torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    # different models (different tokenizers): a positive divergence
    assert M.mean_jsd(M.answer_distributions(teacher, test), M.answer_distributions(make_student(0), test)) > 0


def test_candidate_logprob_matches_full_sequence_score(tiny_pair):
    """A candidate's score equals the sum of the model's log-probs of its answer tokens, computed directly."""
    teacher, _ = tiny_pair
    s = next(s for s in make_split(0, "test", 20) if M.is_closed(s))
    lp = M.candidate_logprobs(teacher, [s])[0]
    k = M.gold_index(s)
    e = teacher.encode(s)  # the gold answer's own rendering
    with torch.no_grad():
        logits = teacher.model(input_ids=e.input_ids[None], **e.vision).logits[0].log_softmax(-1)
    ref = sum(logits[e.q_len - 1 + j, e.input_ids[e.q_len + j]].item() for j in range(e.a_len))
    assert lp[k].item() == pytest.approx(ref, abs=1e-4)
