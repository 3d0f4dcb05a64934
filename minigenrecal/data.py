"""Synthetic shape-VQA task, the LLaVA conversation-JSON reader, and the Sample type."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
CELLS = ("top left", "top right", "bottom left", "bottom right")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLIT_OFFSET = {"train": 0, "val": 1_000_003, "test": 2_000_003}
IMAGE_SIZE = 64  # pixels; each side's own image processor resizes from here


@dataclass
class Sample:
    """One training sample: an image, a question and an answer."""

    image: Image.Image | None
    question: str
    answer: str
    id: str = "?"


def draw_scene(cells: list[tuple[str, str] | None], rng: random.Random) -> Image.Image:
    """Render a 2x2 grid; each cell holds (color, shape) or None."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (245, 245, 245))
    d = ImageDraw.Draw(img)
    half = IMAGE_SIZE // 2
    for k, cell in enumerate(cells):
        if cell is None:
            continue
        color, shape = cell
        r = rng.randint(9, 12)
        cx = (k % 2) * half + half // 2 + rng.randint(-2, 2)
        cy = (k // 2) * half + half // 2 + rng.randint(-2, 2)
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "circle":
            d.ellipse(box, fill=COLORS[color])
        elif shape == "square":
            d.rectangle(box, fill=COLORS[color])
        else:
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLORS[color])
    return img


def _count_phrase(n: int, noun: str) -> str:
    return f"{NUMBERS[n]} {noun}" + ("" if n == 1 else "s")


def make_qa(cells: list[tuple[str, str] | None], rng: random.Random) -> tuple[str, str]:
    """Pick one question about the scene; every answer needs the image."""
    kind = rng.randrange(6)
    present = [c for c in cells if c is not None]
    if kind == 5:  # a caption: every cell, in reading order (dense supervision of what is where)
        return "Describe the grid.", ", ".join("nothing" if c is None else f"{c[0]} {c[1]}" for c in cells)
    if kind == 0:
        k = rng.randrange(4)
        c = cells[k]
        return f"What is in the {CELLS[k]} cell?", ("nothing" if c is None else f"a {c[0]} {c[1]}")
    if kind == 1:
        color = rng.choice(list(COLORS))
        n = sum(c[0] == color for c in present)
        return f"How many {color} shapes are there?", _count_phrase(n, "shape")
    if kind == 2:
        shape = rng.choice(SHAPES)
        n = sum(c[1] == shape for c in present)
        return f"How many {shape}s are there?", _count_phrase(n, shape)
    if kind == 3:
        return "How many shapes are there in total?", _count_phrase(len(present), "shape")
    k = rng.randint(1, 5)
    return f"What is the number of shapes plus {NUMBERS[k]}?", NUMBERS[len(present) + k]


def make_sample(seed: int, split: str, index: int) -> Sample:
    """Deterministic: the same (seed, split, index) always gives the same sample."""
    rng = random.Random(f"{seed}/{SPLIT_OFFSET[split]}/{index}")
    cells = [None if rng.random() < 0.3 else (rng.choice(list(COLORS)), rng.choice(SHAPES)) for _ in range(4)]
    image = draw_scene(cells, rng)
    q, a = make_qa(cells, rng)
    return Sample(image=image, question=q, answer=a, id=f"{split}-{seed}-{index}")


TASKS = ("shapes",)  # see `make_split`


def make_split(seed: int, split: str, n: int, start: int = 0, task: str = "shapes") -> list[Sample]:
    """`n` samples of one split; train, val and test never share a scene.

    `task`: 'shapes' (every answer determined by the image).
    """
    if split not in SPLIT_OFFSET:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLIT_OFFSET)}")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {list(TASKS)}")
    return [make_sample(seed, split, i) for i in range(start, start + n)]


def text_corpus() -> list[str]:
    """Every word the synthetic task can produce, for training the tiny tokenizers."""
    rng = random.Random(0)
    out = []
    for i in range(3000):
        cells = [None if rng.random() < 0.3 else (rng.choice(list(COLORS)), rng.choice(SHAPES)) for _ in range(4)]
        out.extend(make_qa(cells, rng))
    out += list(NUMBERS) + [f"{c} {s}" for c in COLORS for s in SHAPES]
    return out


def read_llava_json(path: str | Path, image_root: str | Path | None = None) -> list[Sample]:
    """Read LLaVA conversation JSON; each human/gpt pair becomes one Sample with that record's image.

    The `<image>` placeholder is removed from the question: each side's chat template places the image itself.
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    records = json.loads(path.read_text())
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    samples = []
    for r, rec in enumerate(records):
        sid = str(rec.get("id", f"{path.name}[{r}]"))
        if not rec.get("image"):
            raise ValueError(f"sample {sid}: no image (the 'image' field is missing or empty)")
        image_path = root / rec["image"]
        if not image_path.exists():
            raise ValueError(f"sample {sid}: image file {rec['image']!r} not found under the image root")
        image = Image.open(image_path).convert("RGB")
        turns = rec.get("conversations", [])
        if len(turns) < 2 or len(turns) % 2:
            raise ValueError(f"sample {sid}: expected human/gpt turn pairs, got {len(turns)} turns")
        for t in range(0, len(turns), 2):
            h, g = turns[t], turns[t + 1]
            if h.get("from") != "human" or g.get("from") != "gpt":
                raise ValueError(f"sample {sid}: turn {t} must be human then gpt, got {h.get('from')!r}, {g.get('from')!r}")
            if h["value"].count("<image>") > 1:
                raise ValueError(f"sample {sid}: turn {t} has more <image> placeholders than the record's one image")
            q = h["value"].replace("<image>", "").strip()
            samples.append(Sample(image=image, question=q, answer=g["value"], id=f"{sid}#{t // 2}"))
    return samples


def write_llava_json(samples: list[Sample], out_dir: str | Path, name: str = "samples.json") -> Path:
    """Write samples as LLaVA conversation JSON plus PNG images (used to build data_samples/)."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for s in samples:
        rel = f"images/{s.id}.png"
        s.image.save(out / rel)
        records.append({"id": s.id, "image": rel, "conversations": [
            {"from": "human", "value": f"<image>\n{s.question}"}, {"from": "gpt", "value": s.answer}]})
    (out / name).write_text(json.dumps(records, indent=1) + "\n")
    return out / name
