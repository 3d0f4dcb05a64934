"""Reading real data: LLaVA conversation (or chat-format `messages` + `images`) JSON/JSONL records into Samples,
with named errors for bad records."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from minigenrecal.data.synthetic import Sample


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


def _chat_text(content, sid: str, k: int) -> str:
    """A chat message's content as LLaVA text: text parts joined, an image part as the '<image>' placeholder."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise SampleError(f"sample {sid}: message {k} has no content (expected a string or a list of parts)")
    text = ""
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            text += "<image>"
        elif kind == "text" and isinstance(part.get("text"), str):
            text += part["text"]
        else:
            raise SampleError(f"sample {sid}: message {k}, content part {j}: expected {{'type': 'text', 'text': "
                              f"...}} or {{'type': 'image'}}, got {part!r}")
    return text


def chat_as_llava(rec: dict, sid: str) -> dict:
    """A chat-format record (TRL's VLM datasets: `messages` of role/content with `{"type": "image"}` parts, and an
    `images` list) as the LLaVA fields every reader checks: 'conversations' (an image part becomes '<image>') and
    'image' (the one image). Its own problems raise SampleError naming the record; the LLaVA rules then apply."""
    msgs = rec.get("messages")
    if not isinstance(msgs, list) or len(msgs) < 2 or len(msgs) % 2:
        n = len(msgs) if isinstance(msgs, list) else 0
        raise SampleError(f"sample {sid}: expected user/assistant message pairs, got {n} messages")
    turns = []
    for k, m in enumerate(msgs):
        role, want = (m.get("role") if isinstance(m, dict) else None), ("user", "assistant")[k % 2]
        if role != want:
            raise SampleError(f"sample {sid}: message {k} must be {want}, got role {role!r} (user/assistant turns "
                              "only: a system message is not supported)")
        turns.append({"from": ("human", "gpt")[k % 2], "value": _chat_text(m.get("content"), sid, k)})
    images = rec.get("images")  # checked where the image is read (`_record_image`): none, or several, are refused
    if isinstance(images, (list, tuple)):
        images = images[0] if len(images) == 1 else list(images)
    return {"conversations": turns, "image": images}


def as_llava(rec: dict, sid: str) -> dict:
    """The record's LLaVA fields: a chat-format record converted (`chat_as_llava`), a LLaVA one as it is."""
    return chat_as_llava(rec, sid) if "messages" in rec else rec


def with_context(pairs: list[tuple[str, str]], k: int) -> str:
    """Question k of a conversation with the turns before it as text: 'Q: ...\\nA: ...\\n' per turn, then 'Q: ...'."""
    return "".join(f"Q: {q}\nA: {a}\n" for q, a in pairs[:k]) + f"Q: {pairs[k][0]}"


def read_llava_json(path: str | Path, image_root: str | Path | None = None, multi_turn: str = "reject",
                    skipped: list | None = None) -> list[Sample]:
    """Read LLaVA conversation records (a JSON list, or one record per line in a `.jsonl` file) into Samples.

    Each record has an `id`, one `image` (a file name under `image_root`, default the file's folder; a
    one-element list is accepted) and `conversations` of human/gpt turns. The `<image>` placeholder is removed
    from the question: each side's chat template places the image itself. Images become 8-bit RGB by `to_rgb`.
    Sample ids are `<id>#<k>` for the k-th question/answer pair. A chat-format record (`messages` + `images`, the
    format of TRL's VLM trainers) is read as the same LLaVA record (`chat_as_llava`), under the same rules.

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
            rec = as_llava(rec, sid)
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
