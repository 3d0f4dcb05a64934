"""Synthetic shape-VQA task, the LLaVA conversation-JSON reader, and the Sample type."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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


class SampleError(ValueError):
    """A sample that cannot be used; the message names the sample and the problem."""


MULTI_TURN = ("reject", "split", "context")  # policies for a record with several question/answer pairs
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # PIL's modes for 16-bit greys (PNG gives 'I;16' or 'I')


def to_rgb(image: Image.Image, sid: str = "?", name: str = "image") -> Image.Image:
    """The image as 8-bit RGB, converted faithfully; an unreadable or unsupported image raises SampleError.

    16-bit greys are scaled to 8 bits (round(v * 255 / 65535)), not clipped; palette images keep their palette
    colours; transparent pixels (an alpha band or a transparency entry) are composited onto white.
    """
    try:
        image.load()  # PIL decodes lazily: a truncated or corrupt file fails here
    except Exception as e:
        raise SampleError(f"sample {sid}: {name} cannot be decoded, the file is truncated or corrupt ({e})") from e
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in SIXTEEN_BIT:
        v = np.asarray(image).astype(np.int64)
        if v.size and (v.min() < 0 or v.max() > 65535):
            raise SampleError(f"sample {sid}: {name} is a {mode} image with values outside 0..65535 "
                              "(its bit depth is unknown)")
        grey = ((v * 255 + 32767) // 65535).astype(np.uint8)  # round(v * 255 / 65535)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode in ("RGBA", "LA", "La", "RGBa", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    if mode in ("RGB", "L", "1", "P", "CMYK", "YCbCr"):
        return image.convert("RGB")
    raise SampleError(f"sample {sid}: {name} has pixel mode {mode!r}, which is not supported "
                      "(expected 8- or 16-bit grey, RGB, CMYK, palette, or any of these with alpha)")


def read_records(path: str | Path) -> list[dict]:
    """The records of a data file: a JSON list, or one JSON object per line in a `.jsonl` (or `.ndjson`) file."""
    path = Path(path)
    text = path.read_text()
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {n}: not one JSON record ({e.msg}, column {e.colno})") from e
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            hint = "; a file with one JSON record per line must be named *.jsonl" if e.msg == "Extra data" else ""
            raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}){hint}") from e
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    for r, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise ValueError(f"{path}: record {r} is a {type(rec).__name__}, not a JSON object")
    return records


def _record_image(rec: dict, sid: str, root: Path) -> Image.Image:
    """The record's one image, as RGB."""
    field = rec.get("image")
    if isinstance(field, list) and len(field) == 1:
        field = field[0]  # a one-element list is the same single image
    if not field:
        raise SampleError(f"sample {sid}: no image (the 'image' field is missing or empty)")
    if isinstance(field, list):
        raise SampleError(f"sample {sid}: {len(field)} images in one record; several images per record are not "
                          "supported (one image per sample)")
    if not isinstance(field, str):
        raise SampleError(f"sample {sid}: the 'image' field must be a file name, got {type(field).__name__}")
    image_path = root / field
    if not image_path.is_file():
        raise SampleError(f"sample {sid}: image file {field!r} not found under the image root")
    try:
        image = Image.open(image_path)
    except Exception as e:
        raise SampleError(f"sample {sid}: image file {field!r} is not a readable image ({e})") from e
    return to_rgb(image, sid, f"image file {field!r}")


def _record_turns(rec: dict, sid: str) -> list[tuple[str, str]]:
    """The record's (question, answer) pairs, `<image>` removed from the questions."""
    turns = rec.get("conversations")
    if not isinstance(turns, list) or len(turns) < 2 or len(turns) % 2:
        n = len(turns) if isinstance(turns, list) else 0
        raise SampleError(f"sample {sid}: expected human/gpt turn pairs, got {n} turns")
    pairs, n_tags = [], 0
    for t in range(0, len(turns), 2):
        h, g = turns[t], turns[t + 1]
        h, g = (h if isinstance(h, dict) else {}), (g if isinstance(g, dict) else {})
        if h.get("from") != "human" or g.get("from") != "gpt":
            raise SampleError(f"sample {sid}: turn {t} must be human then gpt, "
                              f"got {h.get('from')!r}, {g.get('from')!r}")
        q, a = h.get("value"), g.get("value")
        if not isinstance(q, str) or not isinstance(a, str):
            raise SampleError(f"sample {sid}: turns {t} and {t + 1} must both have a text 'value'")
        if "<image>" in a:
            raise SampleError(f"sample {sid}: turn {t + 1}: the answer contains an <image> placeholder "
                              "(the image belongs to the question)")
        n_tags += q.count("<image>")
        if n_tags > 1:
            raise SampleError(f"sample {sid}: turn {t} has more <image> placeholders than the record's one image")
        pairs.append((q.replace("<image>", "").strip(), a))
    return pairs


def with_context(pairs: list[tuple[str, str]], k: int) -> str:
    """Question k of a conversation with the turns before it as text: 'Q: ...\\nA: ...\\n' per turn, then 'Q: ...'."""
    return "".join(f"Q: {q}\nA: {a}\n" for q, a in pairs[:k]) + f"Q: {pairs[k][0]}"


def read_llava_json(path: str | Path, image_root: str | Path | None = None, multi_turn: str = "reject",
                    skipped: list | None = None) -> list[Sample]:
    """Read LLaVA conversation records (a JSON list, or one record per line in a `.jsonl` file) into Samples.

    Each record has an `id`, one `image` (a file name under `image_root`, default the file's folder; a
    one-element list is accepted) and `conversations` of human/gpt turns. The `<image>` placeholder is removed
    from the question: each side's chat template places the image itself. Images become 8-bit RGB by `to_rgb`.
    Sample ids are `<id>#<k>` for the k-th question/answer pair.

    Multi-turn records (several human/gpt pairs) are never reduced silently; `multi_turn` says what to do:
    'reject' (default) raises SampleError naming the record; 'context' makes one sample per answer whose
    question carries the earlier turns as text (`with_context`); 'split' makes each pair an independent sample
    (the earlier turns are dropped, on request).

    A bad record raises SampleError (a ValueError) naming it and the problem; with a `skipped` list it is
    left out instead and recorded there as {"id": ..., "reason": ...}.
    """
    if multi_turn not in MULTI_TURN:
        raise ValueError(f"multi_turn must be one of {list(MULTI_TURN)}, got {multi_turn!r}")
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    samples = []
    for r, rec in enumerate(read_records(path)):
        sid = str(rec.get("id", f"{path.name}[{r}]"))
        try:
            pairs = record_pairs(rec, sid, multi_turn)
            image = _record_image(rec, sid, root)
        except SampleError as e:
            if skipped is None:
                raise
            skipped.append(skip_entry(sid, e))
            continue
        samples += [Sample(image=image, question=q, answer=a, id=f"{sid}#{k}") for k, (q, a) in enumerate(pairs)]
    return samples


def record_pairs(rec: dict, sid: str, multi_turn: str = "reject") -> list[tuple[str, str]]:
    """The (question, answer) of each sample a record gives under a `multi_turn` policy (see `read_llava_json`);
    opens no image. A bad record, or several pairs under 'reject', raises SampleError naming it."""
    pairs = _record_turns(rec, sid)
    if len(pairs) > 1 and multi_turn == "reject":
        raise SampleError(f"sample {sid}: a multi-turn conversation ({len(pairs)} question/answer pairs); "
                          "pass multi_turn='context' (each answer with the earlier turns as context) or "
                          "'split' (each pair on its own)")
    return [(with_context(pairs, k) if multi_turn == "context" and k > 0 else q, a) for k, (q, a) in enumerate(pairs)]


def skip_entry(sid: str, e: SampleError) -> dict:
    """One line of a skip report, {"id": ..., "reason": ...}: the message without its 'sample <id>: ' prefix."""
    return {"id": sid, "reason": str(e).removeprefix(f"sample {sid}: ")}


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
