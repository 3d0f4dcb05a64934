"""Exact-match evaluation of a VLM's greedy answers."""
from __future__ import annotations

from tqdm.auto import tqdm

from minigenrecal.data.synthetic import Sample, normalize
from minigenrecal.models.vlm import VLMView


def exact_match(view: VLMView, samples: list[Sample], batch_size: int = 50, progress: bool = False) -> dict:
    """Greedy-decode every sample; returns accuracy, n and the predictions."""
    view.model.eval()
    preds = []
    for i in tqdm(range(0, len(samples), batch_size), disable=not progress, desc="evaluate", leave=False):
        preds += view.generate(samples[i: i + batch_size])
    hits = [normalize(p) == normalize(s.answer) for p, s in zip(preds, samples)]
    return {"accuracy": sum(hits) / max(len(hits), 1), "n": len(hits), "predictions": preds}
