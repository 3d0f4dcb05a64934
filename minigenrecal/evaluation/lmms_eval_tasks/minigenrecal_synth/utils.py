"""The lmms-eval task `minigenrecal_synth`: the kit's synthetic test split, scored like `python -m minigenrecal
evaluate` (the same question text under the model's own chat template, the same `normalize`, exact match).

`test.jsonl` beside this file lists the items (data seed 1, the first 500 of the test split: the `evaluate`
defaults, so `--limit N` scores the same items as `evaluate --n N`); each item's image is drawn again by
`make_sample`, so nothing but ids and text is shipped. `python utils.py` rewrites the file."""
from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

from minigenrecal.data.synthetic import make_sample, normalize

DOCS = Path(__file__).with_name("test.jsonl")
DATA_SEED, SPLIT, N_DOCS = 1, "test", 500


def synth_doc(seed: int, split: str, index: int) -> dict:
    """One item as a JSONL row: where its sample comes from, its question and its answer."""
    s = make_sample(seed, split, index)
    return {"id": s.id, "data_seed": seed, "split": split, "index": index, "question": s.question,
            "answer": s.answer}


def write_synth_docs(path: Path = DOCS, seed: int = DATA_SEED, n: int = N_DOCS) -> None:
    """Write the task's items: the first `n` samples of the test split of `seed`."""
    rows = [synth_doc(seed, SPLIT, i) for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_vlmevalkit_tsv(path: str | Path, seed: int = DATA_SEED, n: int = N_DOCS) -> None:
    """The same items as a VLMEvalKit custom VQA TSV (index, image as base64 PNG, question, answer), for
    `configs/vlmevalkit_student.json`: save it as `$LMUData/minigenrecal_synth.tsv`."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["index", "image", "question", "answer"])
        for i in range(n):
            s, png = make_sample(seed, SPLIT, i), io.BytesIO()
            s.image.save(png, format="PNG")
            w.writerow([i, base64.b64encode(png.getvalue()).decode(), s.question, s.answer])


def synth_doc_to_visual(doc: dict) -> list:
    """The item's image, drawn again from its (seed, split, index); a row that no longer matches the generator
    (an edited file, a changed `make_sample`) fails here rather than being scored against the wrong image."""
    s = make_sample(doc["data_seed"], doc["split"], doc["index"])
    if (s.question, s.answer) != (doc["question"], doc["answer"]):
        raise ValueError(f"{doc['id']}: test.jsonl disagrees with make_sample; rewrite it with `python utils.py`")
    return [s.image]


def synth_doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The bare question: the model's chat template adds the rest, as the kit's `Renderer.prompt` does."""
    return doc["question"]


def synth_process_results(doc: dict, results: list[str]) -> dict:
    """Exact match after the kit's `normalize` (case, surrounding space, a final period)."""
    return {"exact_match": float(normalize(results[0]) == normalize(doc["answer"]))}


def synth_accuracy(hits: list[float]) -> float:
    """The share of exact matches, as `exact_match` computes it (0 for no items)."""
    return sum(hits) / max(len(hits), 1)


if __name__ == "__main__":
    write_synth_docs()
