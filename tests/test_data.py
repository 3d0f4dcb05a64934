"""Synthetic task determinism and splits; the LLaVA JSON reader on the shipped samples."""
import collections
from pathlib import Path

from minigenrecal.data.synthetic import NUMBERS, make_split
from minigenrecal.data.llava import read_llava_json, write_llava_json

ROOT = Path(__file__).resolve().parent.parent


def test_generator_is_deterministic_and_splits_are_disjoint():
    a, b = make_split(7, "train", 20), make_split(7, "train", 20)
    assert [(s.question, s.answer) for s in a] == [(s.question, s.answer) for s in b]
    assert all(x.image.tobytes() == y.image.tobytes() for x, y in zip(a, b))
    images = {split: {s.image.tobytes() for s in make_split(7, split, 200)} for split in ("train", "val", "test")}
    assert not (images["train"] & images["test"]) and not (images["train"] & images["val"])
    assert make_split(8, "train", 5)[0].image.tobytes() != a[0].image.tobytes()


def test_task_needs_the_image_and_answers_are_multi_word():
    samples = make_split(0, "train", 2000)
    by_q = collections.defaultdict(collections.Counter)
    for s in samples:
        by_q[s.question][s.answer] += 1
    # the most common answer per question is far from always right: the image matters
    blind = sum(c.most_common(1)[0][1] for c in by_q.values()) / len(samples)
    assert blind < 0.5, blind
    assert sum(len(s.answer.split()) > 1 for s in samples) / len(samples) > 0.5
    plus = [s for s in samples if "plus" in s.question]
    assert plus and all(s.answer in NUMBERS for s in plus)


def test_llava_json_round_trip(tmp_path):
    samples = make_split(1, "val", 3)
    path = write_llava_json(samples, tmp_path)
    back = read_llava_json(path)
    assert [(s.question, s.answer) for s in back] == [(s.question, s.answer) for s in samples]
    assert all(x.image.tobytes() == y.image.tobytes() for x, y in zip(back, samples))


def test_shipped_samples_read():
    back = read_llava_json(ROOT / "data_samples" / "samples.json")
    assert len(back) >= 5 and all(s.image is not None and s.answer for s in back)
