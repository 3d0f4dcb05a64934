"""The Sample type and the synthetic shape-VQA task: scenes, questions, their closed answer sets, label noise."""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from itertools import product

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


QUESTION_TYPES = ("caption", "cell", "count", "arithmetic")  # what `make_qa` asks, as `question_type` names it


def question_type(question: str) -> str:
    """The kind of a task question: 'caption' (describe the grid), 'cell' (what is in one cell), 'count' (how many
    shapes of a colour, of a shape, or in total) or 'arithmetic' (the number of shapes plus k)."""
    if question == "Describe the grid.":
        return "caption"
    if question.startswith("What is in the "):
        return "cell"
    if question.startswith("How many "):
        return "count"
    if question.startswith("What is the number of shapes plus "):
        return "arithmetic"
    raise ValueError(f"not a question of the synthetic tasks: {question!r}")


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


# -- regimes with something to distill (label noise) and a disjoint caption pool (the student's warm start) ----
def label_noise(samples: list[Sample], rho: float, seed: int) -> tuple[list[Sample], list[int]]:
    """Replace exactly round(rho * n) answers by a wrong answer; returns (new samples, indices of the noisy ones).

    Closed questions get a wrong candidate (uniform over the others); a caption gets the caption of another random
    grid. Deterministic in (seed, rho, ids). The teacher never sees these labels during its own training.
    """
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


# -- the closed answer set of each question type (scored by evaluation.metrics) --------------------------
def normalize(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".").split())


MAX_COUNT = 4  # a 2x2 grid holds at most four shapes


OPEN_QUESTIONS = ("Describe the grid.",)  # too many possible answers to score each one; exact match only


def is_closed(s: Sample) -> bool:
    """Whether the sample's question has a closed candidate set (JSD and ECE are computed on these only)."""
    return s.question.strip() not in OPEN_QUESTIONS


def candidates(question: str) -> list[str]:
    """The closed answer set of one synthetic question (fixed order); ValueError for an unknown question type."""
    q = question.strip()
    if re.fullmatch(r"What is in the (top|bottom) (left|right) cell\?", q):
        return ["nothing"] + [f"a {c} {s}" for c in COLORS for s in SHAPES]
    if q == "How many shapes are there in total?":
        return [_count_phrase(n, "shape") for n in range(MAX_COUNT + 1)]
    m = re.fullmatch(r"How many (\w+) shapes are there\?", q)
    if m and m.group(1) in COLORS:
        return [_count_phrase(n, "shape") for n in range(MAX_COUNT + 1)]
    m = re.fullmatch(r"How many (\w+)s are there\?", q)
    if m and m.group(1) in SHAPES:
        return [_count_phrase(n, m.group(1)) for n in range(MAX_COUNT + 1)]
    m = re.fullmatch(r"What is the number of shapes plus (\w+)\?", q)
    if m and m.group(1) in NUMBERS:
        k = NUMBERS.index(m.group(1))
        return [NUMBERS[k + n] for n in range(MAX_COUNT + 1) if k + n < len(NUMBERS)]
    raise ValueError(f"no candidate answer set for the question {question!r}")


def gold_index(s: Sample) -> int:
    """Index of the sample's answer in its candidate set (ValueError if absent)."""
    return [normalize(c) for c in candidates(s.question)].index(normalize(s.answer))
