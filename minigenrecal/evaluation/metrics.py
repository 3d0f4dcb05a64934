"""Vocabulary-independent metrics: answer distributions over a closed candidate set, their JSD, and ECE.

The teacher and the student have different tokenizers, so their token distributions cannot be compared directly.
Every question of the synthetic task has a small closed set of possible answers, read off its question type:

| question                                   | candidates                                        |
|--------------------------------------------|---------------------------------------------------|
| What is in the {cell} cell?                | nothing, a {color} {shape} (4 x 3)  -> 13         |
| How many {color} shapes are there?         | zero shapes .. four shapes           -> 5         |
| How many {shape}s are there?               | zero {shape}s .. four {shape}s       -> 5         |
| How many shapes are there in total?        | zero shapes .. four shapes           -> 5         |
| What is the number of shapes plus {k}?     | NUMBERS[k + 0] .. NUMBERS[k + 4]     -> 5         |
| Describe the grid.                         | open (13^4 captions): left out of JSD and ECE     |

Each model scores each candidate's full answer sequence (its own answer tokens + end-of-turn) given the question
and the image; a softmax over the candidates' sequence log-probabilities is that model's answer distribution.
Exact match (greedy decoding) lives in `evaluation.exact_match` and is re-exported here.
Where the true posterior is known (`make_split(..., task="posterior")`), `posterior_metrics` scores a model's
candidate distribution against it: accuracy against the most likely answer, NLL and JSD.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from minigenrecal.data.synthetic import Sample, candidates, gold_index, is_closed
from minigenrecal.evaluation.exact_match import exact_match
from minigenrecal.losses import answer_rows
from minigenrecal.models.render import Encoded
from minigenrecal.models.vlm import VLMView

__all__ = ["candidates", "is_closed", "answer_distributions", "jsd", "mean_jsd", "ece", "exact_match", "gold_index",
           "true_posterior", "posterior_scores", "posterior_metrics", "prior_dists"]
@torch.no_grad()
def candidate_logprobs(view: VLMView, samples: list[Sample], batch_size: int = 64) -> list[torch.Tensor]:
    """Per sample, (C,) log-probabilities of each candidate's answer tokens + end-of-turn under `view`'s model."""
    view.model.eval()
    dev = next(view.model.parameters()).device
    encs, owner = [], []
    for i, s in enumerate(samples):
        q = view.encode(s)  # the question span and the image inputs, rendered once
        for c in candidates(s.question):
            a = torch.tensor(view.answer_ids(replace(s, answer=c)), dtype=torch.long)
            encs.append(Encoded(torch.cat([q.input_ids[: q.q_len], a]), q.q_len, len(a), q.vision, s.id))
            owner.append(i)
    scores = []
    for i in range(0, len(encs), batch_size):
        batch = {k: v.to(dev) for k, v in view.collate(encs[i: i + batch_size]).items()}
        z = view.body(batch)  # (B, T, d)
        logp = view.head(answer_rows(z, batch["q_lens"], batch["a_lens"])).float().log_softmax(-1)  # (N, V)
        tok = logp.gather(1, view.answer_labels(batch)[:, None])[:, 0]  # (N,)
        scores += [part.sum().item() for part in tok.split(batch["a_lens"].tolist())]
    out = [[] for _ in samples]
    for i, sc in zip(owner, scores):
        out[i].append(sc)
    return [torch.tensor(o, dtype=torch.float64) for o in out]


def answer_distributions(view: VLMView, samples: list[Sample], batch_size: int = 64) -> list[torch.Tensor]:
    """Per sample, the model's distribution over the candidate answers: softmax of sequence log-probabilities."""
    return [lp.softmax(-1) for lp in candidate_logprobs(view, samples, batch_size)]


def jsd(p: torch.Tensor, q: torch.Tensor) -> float:
    """Jensen-Shannon divergence in nats: 0.5 KL(p || m) + 0.5 KL(q || m), m = (p + q) / 2."""
    p, q = p.double(), q.double()
    m = 0.5 * (p + q)
    kl = lambda a: (torch.xlogy(a, a) - torch.xlogy(a, m)).sum()
    return float(0.5 * kl(p) + 0.5 * kl(q))


def mean_jsd(ps: list[torch.Tensor], qs: list[torch.Tensor]) -> float:
    """JSD(student || teacher) averaged over questions."""
    return sum(jsd(p, q) for p, q in zip(ps, qs)) / max(len(ps), 1)


def ece(dists: list[torch.Tensor], gold: list[int], n_bins: int = 15) -> float:
    """Expected calibration error: confidence = max candidate prob, correct = argmax == gold; equal-width bins
    (k/n_bins, (k+1)/n_bins]; sum over bins of (bin size / n) * |accuracy - mean confidence|."""
    conf = torch.tensor([float(d.max()) for d in dists], dtype=torch.float64)
    hit = torch.tensor([float(int(d.argmax()) == g) for d, g in zip(dists, gold)], dtype=torch.float64)
    bins = (torch.ceil(conf * n_bins) - 1).clamp(0, n_bins - 1).long()
    total = 0.0
    for b in range(n_bins):
        sel = bins == b
        if sel.any():
            total += float(sel.sum()) / len(dists) * abs(float(hit[sel].mean() - conf[sel].mean()))
    return total


def calibration(view: VLMView, samples: list[Sample], teacher_dists: list[torch.Tensor] | None = None,
                batch_size: int = 64) -> dict:
    """{'ece', 'candidate_accuracy', 'n_closed', and 'jsd' to `teacher_dists` if given} for one model on the
    closed-set questions of `samples` (open caption questions are left out; `teacher_dists` are over the same)."""
    samples = [s for s in samples if is_closed(s)]
    dists = answer_distributions(view, samples, batch_size)
    gold = [gold_index(s) for s in samples]
    out = {"ece": ece(dists, gold), "n_closed": len(samples),
           "candidate_accuracy": sum(int(d.argmax()) == g for d, g in zip(dists, gold)) / max(len(gold), 1)}
    if teacher_dists is not None:
        out["jsd"] = mean_jsd(dists, teacher_dists)
    out["dists"] = dists
    return out


# -- against a known posterior (task 'posterior': each sample carries the true P(answer | image, question)) -------
def true_posterior(s: Sample) -> torch.Tensor:
    """The sample's true posterior as a (C,) tensor in `candidates(s.question)` order (ValueError if it has none)."""
    if s.posterior is None:
        raise ValueError(f"sample {s.id} has no posterior (make it with make_split(..., task='posterior'))")
    cands = candidates(s.question)
    if sorted(s.posterior) != sorted(cands):
        raise ValueError(f"sample {s.id}: posterior keys differ from the candidate set of {s.question!r}")
    return torch.tensor([s.posterior[c] for c in cands], dtype=torch.float64)


def posterior_scores(dists: list[torch.Tensor], samples: list[Sample], eps: float = 1e-12) -> dict:
    """Mean scores of predicted candidate distributions q against each sample's true posterior p:
    'mode_accuracy' (argmax q == argmax p), 'label_accuracy' (argmax q == the sampled label),
    'nll' (expected NLL of a label drawn from p: -sum p log q), 'label_nll' (-log q(sampled label)),
    'jsd' (JSD(q, p) in nats), 'kl' (KL(p || q)), 'entropy' (H(p): the nll of the Bayes-optimal predictor)."""
    sums = dict.fromkeys(("mode_accuracy", "label_accuracy", "nll", "label_nll", "jsd", "kl", "entropy"), 0.0)
    for q, s in zip(dists, samples, strict=True):
        p, q = true_posterior(s), q.double()
        logq = q.clamp_min(eps).log()
        gold = gold_index(s)
        sums["mode_accuracy"] += float(int(q.argmax()) == int(p.argmax()))
        sums["label_accuracy"] += float(int(q.argmax()) == gold)
        sums["nll"] += float(-(p * logq).sum())
        sums["label_nll"] += float(-logq[gold])
        sums["jsd"] += jsd(q, p)
        sums["entropy"] += float(-torch.xlogy(p, p).sum())
        sums["kl"] += float((torch.xlogy(p, p) - p * logq).sum())
    n = max(len(samples), 1)
    return {"n": len(samples), **{k: v / n for k, v in sums.items()}}


def posterior_metrics(view: VLMView | None, samples: list[Sample], dists: list[torch.Tensor] | None = None,
                      batch_size: int = 64) -> dict:
    """`posterior_scores` of `view`'s candidate distributions (softmax of `candidate_logprobs`), or of `dists` if
    given (e.g. `prior_dists(...)` or the true posteriors themselves: the Bayes-optimal predictor)."""
    if dists is None:
        dists = answer_distributions(view, samples, batch_size)
    return posterior_scores(dists, samples)


def prior_dists(train: list[Sample], samples: list[Sample]) -> list[torch.Tensor]:
    """The image-blind predictor: per question, the mean true posterior over the `train` samples asking it
    (smoothed by a 1e-6 uniform floor so every candidate keeps some mass)."""
    by_q: dict[str, torch.Tensor] = {}
    for s in train:
        p = true_posterior(s)
        by_q[s.question] = by_q.get(s.question, torch.zeros_like(p)) + p
    out = []
    for s in samples:
        m = by_q.get(s.question, torch.ones(len(candidates(s.question)), dtype=torch.float64)) + 1e-6
        out.append(m / m.sum())
    return out
