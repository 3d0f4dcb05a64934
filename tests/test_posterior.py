"""The posterior task: deterministic, labels sampled from a true posterior over exactly the candidate set, and the
metrics against that posterior."""
import collections
import math
import random

import pytest
import torch

from minigenrecal.data.synthetic import (BLEND_WEIGHTS, COLORS, Sample, blend, make_posterior_split, make_split, question_posterior, sample_answer)
from minigenrecal.evaluation.metrics import (answer_distributions, posterior_metrics, posterior_scores, prior_dists, true_posterior)
from minigenrecal.data.synthetic import candidates


def test_posterior_split_is_deterministic_and_disjoint():
    a, b = make_posterior_split(3, "train", 30), make_split(3, "train", 30, task="posterior")
    assert [(s.question, s.answer, s.posterior) for s in a] == [(s.question, s.answer, s.posterior) for s in b]
    assert all(x.image.tobytes() == y.image.tobytes() for x, y in zip(a, b))
    images = {sp: {s.image.tobytes() for s in make_posterior_split(3, sp, 200)} for sp in ("train", "val", "test")}
    assert not (images["train"] & images["test"]) and not (images["train"] & images["val"])
    shapes = {s.image.tobytes() for s in make_split(3, "train", 200)}
    assert not (images["train"] & shapes)
    assert make_posterior_split(4, "train", 1)[0].image.tobytes() != a[0].image.tobytes()
    with pytest.raises(ValueError, match="unknown task"):
        make_split(0, "train", 1, task="nope")


def test_posterior_is_over_exactly_the_candidate_set_and_contains_the_label():
    for s in make_posterior_split(0, "val", 1000):
        assert list(s.posterior) == candidates(s.question)
        assert math.isclose(sum(s.posterior.values()), 1.0, abs_tol=1e-12)
        assert min(s.posterior.values()) >= 0 and s.posterior[s.answer] > 0


def test_blends_are_distinct_and_the_posterior_is_the_blend_weight():
    paints = [blend(a, b, w) for a in COLORS for b in COLORS if a != b for w in BLEND_WEIGHTS if w < 1]
    assert len(set(paints + [blend(a, a, 1.0) for a in COLORS])) == len(paints) + len(COLORS)
    cells = [("red", "blue", 0.65, "circle"), None, ("red", "green", 0.8, "square"), ("blue", "red", 1.0, "circle")]
    q, p = question_posterior(cells, 0, 0)
    assert q == "What is in the top left cell?"
    assert p["a red circle"] == 0.65 and math.isclose(p["a blue circle"], 0.35) and sum(v > 0 for v in p.values()) == 2
    q, p = question_posterior(cells, 1, "red")  # Poisson-binomial over p = 0.65, 0.8, 0 (pure blue)
    assert q == "How many red shapes are there?"
    want = [0.35 * 0.2, 0.65 * 0.2 + 0.35 * 0.8, 0.65 * 0.8, 0, 0]
    assert [round(v, 12) for v in p.values()] == [round(v, 12) for v in want]
    assert question_posterior(cells, 2, "circle")[1]["two circles"] == 1.0


def test_labels_are_sampled_from_the_posterior():
    post = {"zero shapes": 0.1, "one shape": 0.6, "two shapes": 0.3, "three shapes": 0.0, "four shapes": 0.0}
    rng = random.Random(0)
    freq = collections.Counter(sample_answer(post, rng) for _ in range(20000))
    for k, p in post.items():  # 4 binomial standard deviations at most
        assert abs(freq[k] / 20000 - p) <= 4 * math.sqrt(p * (1 - p) / 20000) + 1e-12, (k, freq[k])
    # over a split: the mean posterior of the label's candidate matches how often the label is the mode
    samples = make_posterior_split(0, "train", 4000)
    amb = [s for s in samples if max(s.posterior.values()) < 1]
    hit = sum(s.answer == max(s.posterior, key=s.posterior.get) for s in amb) / len(amb)
    expect = sum(max(s.posterior.values()) for s in amb) / len(amb)
    assert len(amb) > 1000 and abs(hit - expect) < 4 * math.sqrt(expect * (1 - expect) / len(amb)), (hit, expect)


def test_bayes_accuracy_is_informative_but_not_certain():
    samples = make_posterior_split(0, "train", 3000)
    bayes = sum(max(s.posterior.values()) for s in samples) / len(samples)
    prior = posterior_scores(prior_dists(samples, samples), samples)["mode_accuracy"]
    assert 0.7 < bayes < 0.88 and prior < bayes - 0.3, (bayes, prior)


def _s(question, post, answer):
    return Sample(None, question, answer, posterior=dict(zip(candidates(question), post)))


def test_posterior_scores_hand_computed():
    q1 = "How many shapes are there in total?"
    s1 = _s(q1, [0.0, 0.7, 0.3, 0.0, 0.0], "two shapes")  # the label is not the mode here
    s2 = _s(q1, [0.0, 0.0, 0.0, 0.0, 1.0], "four shapes")
    d1 = torch.tensor([0.0, 0.4, 0.6, 0.0, 0.0], dtype=torch.float64)
    d2 = torch.tensor([0.0, 0.0, 0.0, 0.2, 0.8], dtype=torch.float64)
    r = posterior_scores([d1, d2], [s1, s2])
    ln = math.log
    j1 = 0.5 * (0.4 * ln(0.4 / 0.55) + 0.6 * ln(0.6 / 0.45)) + 0.5 * (0.7 * ln(0.7 / 0.55) + 0.3 * ln(0.3 / 0.45))
    j2 = 0.5 * (0.2 * ln(0.2 / 0.1) + 0.8 * ln(0.8 / 0.9)) + 0.5 * (1.0 * ln(1.0 / 0.9))
    assert r["jsd"] == pytest.approx((j1 + j2) / 2, abs=1e-12)
    assert r["nll"] == pytest.approx((-(0.7 * ln(0.4) + 0.3 * ln(0.6)) - ln(0.8)) / 2, abs=1e-12)  # -sum p log q
    assert r["label_nll"] == pytest.approx((-ln(0.6) - ln(0.8)) / 2, abs=1e-12)
    assert r["entropy"] == pytest.approx(-(0.7 * ln(0.7) + 0.3 * ln(0.3)) / 2, abs=1e-12)
    assert r["kl"] == pytest.approx(r["nll"] - r["entropy"], abs=1e-12)
    assert (r["mode_accuracy"], r["label_accuracy"], r["n"]) == (0.5, 1.0, 2)
    bayes = posterior_scores([true_posterior(s1), true_posterior(s2)], [s1, s2])
    assert bayes["jsd"] == 0 and bayes["kl"] == pytest.approx(0) and bayes["mode_accuracy"] == 1.0


def test_posterior_metrics_of_a_model_match_its_candidate_distributions(tiny_pair):
    teacher, _ = tiny_pair
    samples = make_posterior_split(0, "test", 6)
    dists = answer_distributions(teacher, samples)
    assert posterior_metrics(teacher, samples) == posterior_scores(dists, samples)
    with pytest.raises(ValueError, match="no posterior"):
        true_posterior(make_split(0, "test", 1)[0])


def test_shipped_posterior_teacher_beats_the_prior_and_records_its_command():
    import json

    from minigenrecal.models.tiny import TEACHER_POSTERIOR_DIR, load_teacher
    from minigenrecal.models.vlm import VLMView
    info = json.loads((TEACHER_POSTERIOR_DIR / "training.json").read_text())
    assert info["task"] == "posterior" and "--task posterior" in info["command"] and info["n_train"] >= 20000
    teacher = VLMView(*load_teacher(TEACHER_POSTERIOR_DIR), name="teacher")
    test = make_posterior_split(0, "test", 40)
    model = posterior_metrics(teacher, test)
    prior = posterior_metrics(None, test, prior_dists(make_posterior_split(0, "train", 2000), test))
    assert model["jsd"] < prior["jsd"] / 2 and model["nll"] < prior["nll"] - 0.5, (model, prior)
    assert model["jsd"] > 0.01  # and it is not the posterior itself
