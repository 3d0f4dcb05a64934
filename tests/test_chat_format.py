"""Chat-format records (`messages` of role/content with `{"type": "image"}` parts, plus `images`) give the same
samples as the same records in LLaVA format, from JSON, JSONL and `datasets`, under the same bad-input rules."""
import json

import datasets
import pytest

from minigenrecal.data.llava import SampleError, chat_as_llava, read_llava_json, read_records, skip_entry
from minigenrecal.data.sources import LazySamples, iter_samples, open_source
from test_sources import _every, _mixed, _same_samples

datasets.disable_progress_bars()


def _as_chat(rec: dict) -> dict:
    """A LLaVA record written as a chat record (what TRL's VLM datasets hold)."""
    msgs = []
    for k, t in enumerate(rec.get("conversations", [])):
        text = t["value"]
        parts = [{"type": "text", "text": text.replace("<image>\n", "")}]
        if "<image>" in text:
            parts.insert(0, {"type": "image"})
        msgs.append({"role": ("user", "assistant")[k % 2], "content": parts})
    image = rec.get("image")
    out = {"messages": msgs, "images": image if isinstance(image, list) else [image]}
    return {"id": rec["id"], **out} if "id" in rec else out


def _write(records, path):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records))
    return path


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
@pytest.mark.parametrize("multi_turn", ["reject", "split", "context"])
def test_chat_records_give_the_llava_samples(tmp_path, suffix, multi_turn):
    llava = _mixed(tmp_path, suffix)
    (tmp_path / "chat").mkdir()
    chat = _write([_as_chat(r) for r in read_records(llava)], tmp_path / "chat" / llava.name)  # same name: same ids
    skipped, chat_skipped = [], []
    expected = read_llava_json(llava, multi_turn=multi_turn, skipped=skipped)
    got = read_llava_json(chat, tmp_path, multi_turn=multi_turn, skipped=chat_skipped)
    assert len(got) == {"reject": 7, "split": 12, "context": 12}[multi_turn]
    _same_samples(got, expected)
    assert [r["id"] for r in chat_skipped] == [r["id"] for r in skipped]
    # the lazy and streamed readers: the same samples and the same skip records as the eager one
    lazy, lazy_skipped = _every(LazySamples(open_source(chat, image_root=tmp_path), multi_turn))
    _same_samples(lazy, expected)
    assert lazy_skipped == chat_skipped
    streamed = []
    _same_samples(list(iter_samples(open_source(chat, image_root=tmp_path), multi_turn, streamed)), expected)
    assert streamed == chat_skipped
    reasons, llava_reasons = ({r["id"]: r["reason"] for r in rs} for rs in (chat_skipped, skipped))
    assert reasons["missing"] == llava_reasons["missing"]  # the same image rule, the same words
    assert reasons["odd"] == "expected user/assistant message pairs, got 1 messages"


def test_a_chat_dataset_with_an_images_column_gives_the_llava_samples(tmp_path):
    llava = _mixed(tmp_path, ".json")
    records = [r for r in read_records(llava) if r.get("id") not in (None, "missing", "odd")]
    expected = read_llava_json(_write(records, tmp_path / "good.json"), multi_turn="split")
    rows = [{"id": r["id"], "messages": c["messages"], "images": [str(tmp_path / c["images"][0])]}
            for r in records for c in [_as_chat(r)]]
    ds = datasets.Dataset.from_list(rows).cast_column("images", datasets.List(datasets.Image()))
    ds.save_to_disk(str(tmp_path / "saved"))
    for source in (open_source(ds), open_source(tmp_path / "saved")):
        _same_samples(_every(LazySamples(source, "split"))[0], expected)
    _same_samples(list(iter_samples(open_source(ds.to_iterable_dataset()), "split")), expected)


@pytest.mark.parametrize("record, reason", [
    ({"id": "sys", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"}],
      "images": ["a.png"]}, "message 0 must be user, got role 'system'"),
    ({"id": "part", "messages": [{"role": "user", "content": [{"type": "video"}]},
                                 {"role": "assistant", "content": "a"}], "images": ["a.png"]},
     "message 0, content part 0: expected {'type': 'text', 'text': ...} or {'type': 'image'}"),
    ({"id": "none", "messages": "hello"}, "expected user/assistant message pairs, got 0 messages"),
])
def test_a_bad_chat_record_is_named(record, reason):
    with pytest.raises(SampleError) as e:
        chat_as_llava(record, record["id"])
    assert skip_entry(record["id"], e.value)["reason"].startswith(reason)


def test_two_images_or_none_are_refused_as_in_llava(tmp_path):
    llava = _mixed(tmp_path, ".json")
    img = json.loads(llava.read_text())[0]["image"]
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "a"}]}]
    path = _write([{"id": "two", "messages": msgs, "images": [img, img]}, {"id": "zero", "messages": msgs,
                                                                             "images": []}], tmp_path / "bad.json")
    skipped = []
    assert read_llava_json(path, skipped=skipped) == []
    assert skipped == [{"id": "two", "reason": "2 images in one record; several images per record are not supported "
                                               "(one image per sample)"},
                       {"id": "zero", "reason": "no image (the 'image' field is missing or empty)"}]
