"""Lazy, rank-sharded training data: the same samples as read_llava_json, disjoint covering shares, one image
decoded per access, bad samples recorded (never dropped silently), and the pair datasets the training loop reads."""
import json

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from torch.utils.data import DataLoader

from minigenrecal.data.llava import SampleError, read_llava_json, write_llava_json
from minigenrecal.data.synthetic import make_split
from minigenrecal.data.pairs import encode_pairs
from minigenrecal.data.sources import LazyPairData, LazySamples, SkipLog, StreamPairData, iter_samples, open_source
from minigenrecal.stages import StageConfig
from minigenrecal.loop import make_collate, train_stage
from minigenrecal.models.tiny import build_student, build_teacher
from minigenrecal.models.vlm import VLMView

torch.set_num_threads(1)
datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def views():
    t_model, t_proc = build_teacher(seed=3)
    s_model, s_proc = build_student(seed=0)
    return VLMView(s_model, s_proc, name="student"), VLMView(t_model.requires_grad_(False), t_proc, name="teacher")


def _turns(*qa):
    return [{"from": "human" if k % 2 == 0 else "gpt", "value": v} for k, v in enumerate(qa)]


def _mixed(tmp_path, suffix=".json", long_answer=False):
    """11 records: 6 single-turn, a 3-turn and a 2-turn one, one without an id, one whose image is missing, one
    with a question and no answer (+ one whose answer is too long to render, if asked)."""
    path = write_llava_json(make_split(0, "train", 6), tmp_path)
    records = json.loads(path.read_text())
    img = records[0]["image"]
    records += [{"id": "mt3", "image": img, "conversations": _turns("<image>\nWhat is it?", "a shape", "Its colour?",
                                                                     "red", "How many?", "one")},
                {"id": "mt2", "image": [img], "conversations": _turns("<image>\nDescribe.", "a grid", "More?", "no")},
                {"image": img, "conversations": _turns("<image>\nAnything?", "yes")},
                {"id": "missing", "image": "images/none.png", "conversations": _turns("<image>\nQ?", "A")},
                {"id": "odd", "image": img, "conversations": _turns("<image>\nQ?")}]
    if long_answer:
        records.append({"id": "long", "image": img, "conversations": _turns("<image>\nQ?", "red " * 300)})
    out = tmp_path / f"mixed{suffix}"
    if suffix == ".json":
        out.write_text(json.dumps(records))
    else:  # a blank line too: not a record
        out.write_text("\n".join(json.dumps(r) for r in records[:3]) + "\n\n"
                       + "".join(json.dumps(r) + "\n" for r in records[3:]))
    return out


def _same_samples(got, expected):
    assert [s.id for s in got] == [s.id for s in expected]
    assert [(s.question, s.answer) for s in got] == [(s.question, s.answer) for s in expected]
    for a, b in zip(got, expected):
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))


def _every(lazy):
    """Every sample of a LazySamples, bad ones recorded as read_llava_json records them."""
    got, log = [], SkipLog([])
    for i in range(len(lazy)):
        try:
            got.append(lazy[i])
        except SampleError as e:
            log(lazy.locate(i)[0].id, e)
    return got, log.records


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
@pytest.mark.parametrize("multi_turn,n_items", [("reject", 11), ("split", 14), ("context", 14)])
def test_lazy_samples_equal_read_llava_json(tmp_path, suffix, multi_turn, n_items):
    path = _mixed(tmp_path, suffix)
    skipped = []
    expected = read_llava_json(path, multi_turn=multi_turn, skipped=skipped)
    assert len(expected) == {"reject": 7, "split": 12, "context": 12}[multi_turn]
    lazy = LazySamples(open_source(path), multi_turn)
    assert len(lazy) == n_items  # a bad record is one item (it fails on access)
    got, lazy_skipped = _every(lazy)
    _same_samples(got, expected)
    assert lazy_skipped == skipped
    streamed_skipped = []
    _same_samples(list(iter_samples(open_source(path), multi_turn, streamed_skipped)), expected)
    assert streamed_skipped == skipped


def _hf_rows(samples, image):
    return [{"id": s.id, "image": image(s), "conversations": _turns("<image>\n" + s.question, s.answer)}
            for s in samples]


def test_hf_image_column_path_column_and_saved_dataset(tmp_path):
    samples = make_split(0, "train", 5)
    path = write_llava_json(samples, tmp_path)
    expected = read_llava_json(path)
    by_pil = datasets.Dataset.from_list(_hf_rows(samples, lambda s: s.image))
    by_path = datasets.Dataset.from_list(_hf_rows(samples, lambda s: f"images/{s.id}.png"))
    by_pil.save_to_disk(str(tmp_path / "saved"))
    for source in (open_source(by_pil), open_source(by_path, image_root=tmp_path), open_source(tmp_path / "saved"),
                   open_source(datasets.DatasetDict({"train": by_pil}))):
        _same_samples(_every(LazySamples(source))[0], expected)
    qa = datasets.Dataset.from_list([{"image": s.image, "question": s.question, "answer": s.answer} for s in samples])
    got = _every(LazySamples(open_source(qa)))[0]  # question/answer columns, no id column
    assert [s.id for s in got] == [f"dataset[{i}]#0" for i in range(5)]
    assert [(s.question, s.answer) for s in got] == [(s.question, s.answer) for s in expected]


def _shares(make, world):
    return [[r.id for r in make(rank)] for rank in range(world)]


def test_ranks_get_disjoint_shares_that_cover_everything(tmp_path):
    samples = make_split(0, "train", 10)
    path = write_llava_json(samples, tmp_path)
    jsonl = tmp_path / "samples.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in json.loads(path.read_text())))
    ds = datasets.Dataset.from_list(_hf_rows(samples, lambda s: s.image))
    ds.save_to_disk(str(tmp_path / "saved"))
    everything = sorted(s.id for s in samples)
    strided = {"json": path, "jsonl": jsonl, "dataset": ds, "saved": tmp_path / "saved",
               "stream": ds.to_iterable_dataset(num_shards=1)}  # one shard: every world-th example
    for name, data in strided.items():
        shares = _shares(lambda rank: open_source(data, rank, 3), 3)
        assert [len(s) for s in shares] == [4, 3, 3], name
        assert sorted(sum(shares, [])) == everything, name
        assert shares[1] == [samples[i].id for i in (1, 4, 7)], name
    shares = _shares(lambda rank: open_source(ds.to_iterable_dataset(num_shards=4), rank, 2), 2)  # whole shards
    assert sorted(sum(shares, [])) == everything and not set(shares[0]) & set(shares[1])
    # multi-turn items: all turns of a record on one rank, the union is every item
    mixed = _mixed(tmp_path / "mixed")
    whole = LazySamples(open_source(mixed), "split")
    items = [[LazySamples(open_source(mixed, r, 3), "split").sample_id(i) for i in range(n)]
             for r, n in enumerate((6, 5, 3))]
    assert sorted(sum(items, [])) == sorted(whole.sample_id(i) for i in range(len(whole)))
    with pytest.raises(ValueError, match="rank"):
        open_source(path, 3, 3)


def test_a_jsonl_rank_parses_only_its_own_lines(tmp_path, monkeypatch):
    path = write_llava_json(make_split(0, "train", 40), tmp_path)
    jsonl = tmp_path / "samples.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in json.loads(path.read_text())))
    parses = []
    loads = json.loads
    monkeypatch.setattr(json, "loads", lambda s, *a, **k: parses.append(1) or loads(s, *a, **k))
    source = open_source(jsonl, 1, 4)
    assert len(parses) == 0
    assert [r.id for r in source] == [f"train-0-{i}" for i in range(1, 40, 4)] and len(parses) == 10
    lazy = LazySamples(source)  # 'reject': the index is the rank's line offsets, nothing parsed
    assert len(lazy) == 10 and len(parses) == 10
    assert lazy.sample_id(2) == "train-0-9#0" and len(parses) == 11
    LazySamples(source, "split")  # turn counts: each own line once
    assert len(parses) == 21


@pytest.fixture
def opened(monkeypatch):
    """Counts PIL.Image.open calls."""
    calls = []
    real = PIL.Image.open
    monkeypatch.setattr(PIL.Image, "open", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_images_are_decoded_on_access_one_per_item(tmp_path, views, opened):
    student, teacher = views
    samples = make_split(0, "train", 4)
    ds = datasets.Dataset.from_list(_hf_rows(samples, lambda s: s.image))
    path = _mixed(tmp_path)
    opened.clear()
    for records, multi_turn in ((open_source(path), "split"), (open_source(ds), "reject")):
        data = LazyPairData(records, student, teacher, multi_turn=multi_turn)
        assert len(opened) == 0
        s, t, i = data[2]
        assert len(opened) == 1 and i == 2 and s.id == data.sample_id(2) and t.id == s.id
        opened.clear()


def test_lazy_pair_data_equals_encode_pairs_and_collates(tmp_path, views):
    student, teacher = views
    path = write_llava_json(make_split(0, "train", 6), tmp_path)
    eager = encode_pairs(teacher, student, read_llava_json(path))
    lazy = LazyPairData(open_source(path), student, teacher)
    assert len(lazy) == len(eager) == 6
    for i in range(6):
        (s, t, j), (es, et, ej) = lazy[i], eager[i]
        assert j == ej and lazy.sample_id(i) == eager.sample_id(i)
        for a, b in ((s, es), (t, et)):
            assert torch.equal(a.input_ids, b.input_ids) and (a.q_len, a.a_len) == (b.q_len, b.a_len)
            assert torch.equal(a.vision["pixel_values"], b.vision["pixel_values"])
    batches = list(DataLoader(lazy, batch_size=3, collate_fn=make_collate(student, teacher)))
    assert [b[2].tolist() for b in batches] == [[0, 1, 2], [3, 4, 5]]
    assert batches[1][1]["input_ids"].shape[0] == 3
    assert LazyPairData(open_source(path), student).__getitem__(0)[1] is None  # student alone


def test_bad_items_are_recorded_once_and_replaced(tmp_path, views, opened):
    student, teacher = views
    path = _mixed(tmp_path, long_answer=True)  # 12 records; mt3, mt2 (reject), missing, odd, long are bad
    expected_skips = []
    read_llava_json(path, skipped=expected_skips)
    data = LazyPairData(open_source(path), student, teacher)
    assert len(data) == 12
    got = [data[i][2] for i in range(12)]
    assert got == [0, 1, 2, 3, 4, 5, 8, 8, 8, 0, 0, 0]  # 6, 7: the next good item (8); 9-11: wrap to 0
    assert [r["id"] for r in data.skipped] == ["mt3", "mt2", "missing", "odd", "long#0"]
    assert data.skipped[:4] == expected_skips
    assert data.skipped[4]["reason"].startswith("rejected, too long for max_length=256")
    batches = [b[2].tolist() for b in DataLoader(data, batch_size=4, collate_fn=make_collate(student, teacher))]
    assert batches == [[0, 1, 2, 3], [4, 5, 8, 8], [8, 0, 0, 0]] and len(data.skipped) == 5  # not recorded twice
    opened.clear()
    assert data[11][2] == 0 and len(opened) == 1  # a known bad item is not decoded again
    strict = LazyPairData(open_source(path), student, teacher, strict=True)
    with pytest.raises(SampleError, match="sample missing: image file 'images/none.png' not found"):
        strict[9]
    with pytest.raises(SampleError, match="sample long#0: rejected, too long"):
        strict[11]


def test_a_stream_yields_each_rank_its_good_samples_and_records_the_bad(views):
    student, teacher = views
    samples = make_split(0, "train", 7)
    rows = _hf_rows(samples, lambda s: s.image)
    rows[3]["image"] = None  # a row with no image
    stream = datasets.Dataset.from_list(rows).to_iterable_dataset(num_shards=1)
    seen, skipped = [], []
    for rank in range(2):
        data = StreamPairData(open_source(stream, rank, 2), student, teacher if rank == 0 else None)
        first = [(k, s.id, t is None) for s, t, k in data]
        again = [k for _, _, k in data]  # a second pass: indices go on, the bad row is not recorded again
        assert [k for k, _, _ in first] == list(range(len(first))) and again == list(range(len(first), 2 * len(first)))
        assert [data.sample_id(k) for k, _, _ in first] == [i for _, i, _ in first]
        assert all(no_t == (rank == 1) for _, _, no_t in first)
        seen.append([i for _, i, _ in first])
        skipped += data.skipped
    assert seen == [[samples[i].id + "#0" for i in (0, 2, 4, 6)], [samples[i].id + "#0" for i in (1, 5)]]
    assert skipped == [{"id": samples[3].id, "reason": "no image (the 'image' field is missing or empty)"}]
    with pytest.raises(SampleError, match=f"sample {samples[3].id}: no image"):
        list(StreamPairData(open_source(stream, 1, 2), student, strict=True))
    short = StreamPairData(open_source(stream, 0, 2), student, id_window=2)
    assert [k for _, _, k in short] == [0, 1, 2, 3] and short.sample_id(3) == samples[6].id + "#0"
    with pytest.raises(KeyError, match="not among the last 2"):
        short.sample_id(1)


def test_train_stage_reads_lazy_and_streamed_data(tmp_path, views):
    student, _ = views
    path = write_llava_json(make_split(0, "train", 8), tmp_path)
    for data in (LazyPairData(open_source(path), student), StreamPairData(open_source(path), student)):
        hist = train_stage(3, student, data, StageConfig(steps=2, batch_size=4, lr=1e-3), progress=False)
        assert len(hist) == 2 and all(np.isfinite(h["loss"]) for h in hist)
