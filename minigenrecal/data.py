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
    posterior: dict[str, float] | None = None  # the true P(answer | image, question) where known (task 'posterior')


def draw_scene(cells: list[tuple[str | tuple[int, int, int], str] | None], rng: random.Random) -> Image.Image:
    """Render a 2x2 grid; each cell holds (color, shape) or None; a color is a COLORS name or an RGB paint."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (245, 245, 245))
    d = ImageDraw.Draw(img)
    half = IMAGE_SIZE // 2
    for k, cell in enumerate(cells):
        if cell is None:
            continue
        color, shape = cell
        fill = COLORS[color] if isinstance(color, str) else color
        r = rng.randint(9, 12)
        cx = (k % 2) * half + half // 2 + rng.randint(-2, 2)
        cy = (k // 2) * half + half // 2 + rng.randint(-2, 2)
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "circle":
            d.ellipse(box, fill=fill)
        elif shape == "square":
            d.rectangle(box, fill=fill)
        else:
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
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


TASKS = ("shapes", "posterior")  # see `make_split`


def make_split(seed: int, split: str, n: int, start: int = 0, task: str = "shapes") -> list[Sample]:
    """`n` samples of one split; train, val and test never share a scene.

    `task`: 'shapes' (every answer determined by the image) or 'posterior' (blended colours: each sample carries
    the true posterior over its question's candidate answers, and its label is sampled from it).
    """
    if split not in SPLIT_OFFSET:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLIT_OFFSET)}")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {list(TASKS)}")
    make = make_posterior_sample if task == "posterior" else make_sample
    return [make(seed, split, i) for i in range(start, start + n)]


def make_posterior_split(seed: int, split: str, n: int, start: int = 0) -> list[Sample]:
    """`make_split(..., task="posterior")`."""
    return make_split(seed, split, n, start, task="posterior")


# -- a task with a known posterior: shapes painted in a blend of two colours ----------------------------------
# Each shape's paint is w * colour A + (1 - w) * colour B, with w drawn from BLEND_WEIGHTS (w = 1: one pure colour).
# Generative story: the shape's true colour is A with probability w, else B. The image shows the blend, so given
# the image the colour's posterior is {A: w, B: 1 - w} (the 6 pairs x 3 blends map to distinct paints), and a
# question's posterior over its closed candidate answers follows exactly. The label is SAMPLED from that posterior.
BLEND_WEIGHTS = (1.0, 0.8, 0.65, 0.55)  # weight of the dominant colour A; drawn uniformly
POSTERIOR_QUESTIONS = ((0, 0.45), (1, 0.35), (2, 0.1), (3, 0.1))  # (make_qa kind, probability): no captions
POSTERIOR_OFFSET = 5_000_011  # posterior-task scenes never coincide with the shapes task's


def blend(a: str, b: str, w: float) -> tuple[int, int, int]:
    """The paint of a shape that is colour `a` with probability w and `b` otherwise."""
    return tuple(round(w * x + (1 - w) * y) for x, y in zip(COLORS[a], COLORS[b]))


def colour_posterior(cell: tuple[str, str, float] | None) -> dict[str, float]:
    """P(true colour | image) for one cell (A, B, w); empty for an empty cell."""
    if cell is None:
        return {}
    a, b, w = cell
    return {a: w} if w == 1.0 else {a: w, b: 1.0 - w}


def question_posterior(cells: list[tuple[str, str, float, str] | None], kind: int, arg) -> tuple[str, dict[str, float]]:
    """The question of kind `kind` (as in `make_qa`; `arg` = cell index, colour or shape) and its exact posterior
    over every closed candidate answer (zeros included, the order of `metrics.candidates`)."""
    from itertools import product

    present = [c for c in cells if c is not None]
    if kind == 0:
        q = f"What is in the {CELLS[arg]} cell?"
        keys = ["nothing"] + [f"a {c} {s}" for c in COLORS for s in SHAPES]
        post = dict.fromkeys(keys, 0.0)
        c = cells[arg]
        if c is None:
            post["nothing"] = 1.0
        else:
            for colour, p in colour_posterior(c[:3]).items():
                post[f"a {colour} {c[3]}"] += p
        return q, post
    noun = arg if kind == 2 else "shape"
    keys = [_count_phrase(n, noun) for n in range(5)]
    post = dict.fromkeys(keys, 0.0)
    if kind == 1:  # Poisson-binomial count: each shape is `arg` with its own probability
        q = f"How many {arg} shapes are there?"
        ps = [colour_posterior(c[:3]).get(arg, 0.0) for c in present]
        for hits in product((0, 1), repeat=len(ps)):
            pr = 1.0
            for h, p in zip(hits, ps):
                pr *= p if h else 1.0 - p
            post[keys[sum(hits)]] += pr
    elif kind == 2:
        q = f"How many {arg}s are there?"
        post[keys[sum(c[3] == arg for c in present)]] = 1.0
    else:
        q = "How many shapes are there in total?"
        post[keys[len(present)]] = 1.0
    return q, post


def sample_answer(posterior: dict[str, float], rng: random.Random) -> str:
    """Draw one answer from `posterior` (inverse CDF over its keys' order)."""
    u, acc = rng.random(), 0.0
    for answer, p in posterior.items():
        acc += p
        if u < acc:
            return answer
    return max(posterior, key=posterior.get)  # u within rounding of 1


def make_posterior_sample(seed: int, split: str, index: int) -> Sample:
    """Deterministic like `make_sample`: blended-colour scene, a closed question, its posterior, a sampled label."""
    rng = random.Random(f"{seed}/{POSTERIOR_OFFSET + SPLIT_OFFSET[split]}/{index}")
    cells = []  # (A, B, w, shape) or None
    for _ in range(4):
        if rng.random() < 0.3:
            cells.append(None)
            continue
        a = rng.choice(list(COLORS))
        b = rng.choice([c for c in COLORS if c != a])
        cells.append((a, b, rng.choice(BLEND_WEIGHTS), rng.choice(SHAPES)))
    image = draw_scene([None if c is None else (blend(*c[:3]), c[3]) for c in cells], rng)
    kind = rng.choices([k for k, _ in POSTERIOR_QUESTIONS], weights=[p for _, p in POSTERIOR_QUESTIONS])[0]
    arg = {0: lambda: rng.randrange(4), 1: lambda: rng.choice(list(COLORS)), 2: lambda: rng.choice(SHAPES),
           3: lambda: None}[kind]()
    q, post = question_posterior(cells, kind, arg)
    return Sample(image=image, question=q, answer=sample_answer(post, rng), id=f"{split}-posterior-{seed}-{index}",
                  posterior=post)


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


# -- regimes with something to distill (label noise) and a disjoint caption pool (the student's warm start) ----
def label_noise(samples: list[Sample], rho: float, seed: int) -> tuple[list[Sample], list[int]]:
    """Replace exactly round(rho * n) answers by a wrong answer; returns (new samples, indices of the noisy ones).

    Closed questions get a wrong candidate (uniform over the others); a caption gets the caption of another random
    grid. Deterministic in (seed, rho, ids). The teacher never sees these labels during its own training.
    """
    from .metrics import candidates, is_closed  # metrics imports this module
    if not 0.0 <= rho < 1.0:
        raise ValueError(f"label noise rho must be in [0, 1), got {rho}")
    rng = random.Random(f"noise/{seed}/{rho}/{len(samples)}")
    noisy = sorted(rng.sample(range(len(samples)), round(rho * len(samples))))
    out = list(samples)
    for i in noisy:
        s = samples[i]
        if is_closed(s):
            wrong = [c for c in candidates(s.question) if c != s.answer]
            answer = rng.choice(wrong)
        else:
            answer = s.answer
            while answer == s.answer:
                answer = caption([None if rng.random() < 0.3 else (rng.choice(list(COLORS)), rng.choice(SHAPES))
                                  for _ in range(4)])
        out[i] = Sample(image=s.image, question=s.question, answer=answer, id=s.id)
    return out, noisy


def caption(cells: list[tuple[str, str] | None]) -> str:
    """The answer to 'Describe the grid.': every cell in reading order."""
    return ", ".join("nothing" if c is None else f"{c[0]} {c[1]}" for c in cells)


PRETRAIN_OFFSET = 3_000_003  # the caption pool never shares a scene with train/val/test


def make_caption_pool(seed: int, n: int) -> list[Sample]:
    """`n` caption samples ('Describe the grid.') from a pool disjoint from every split: the warm start's data."""
    out = []
    for i in range(n):
        rng = random.Random(f"{seed}/{PRETRAIN_OFFSET}/{i}")
        cells = [None if rng.random() < 0.3 else (rng.choice(list(COLORS)), rng.choice(SHAPES)) for _ in range(4)]
        out.append(Sample(image=draw_scene(cells, rng), question="Describe the grid.", answer=caption(cells),
                          id=f"pretrain-{seed}-{i}"))
    return out
