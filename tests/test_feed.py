"""How lazily read data reaches the loop (data/feed.py): render workers, a stream's shuffle buffer, length buckets.

Each property is checked against the plain path (no workers, no buffer, no buckets) or an exact count."""
import json

import pytest
import torch

from minigenrecal.data.feed import AHEAD, bucketed, ordered, shuffled
from minigenrecal.scale.checkpoint import FAULT_ENV, Checkpointer, StreamPosition, complete_checkpoints


def _square(x):
    return x * x


class Counted:
    """An iterable that counts how many items have been read from it."""

    def __init__(self, n):
        self.n, self.read = n, 0

    def __iter__(self):
        for i in range(self.n):
            self.read += 1
            yield i


# -- the pieces -------------------------------------------------------------------------------------------------
def test_shuffle_buffer_is_a_seeded_permutation_that_reads_at_most_a_buffer_ahead():
    src = Counted(1000)
    out, ahead = [], 0
    for x in shuffled(src, 64, seed=7):
        out.append(x)
        ahead = max(ahead, src.read - len(out))
    assert sorted(out) == list(range(1000)) and out != list(range(1000))
    assert ahead <= 64  # the buffer never holds more than its size
    assert out == list(shuffled(range(1000), 64, seed=7)) and out != list(shuffled(range(1000), 64, seed=8))
    assert min(out.index(i) - i for i in range(1000)) >= -64  # local: no record comes out more than 64 places early
    assert list(shuffled(range(10), 1, seed=7)) == list(range(10))  # 0 or 1: in order


@pytest.mark.parametrize("workers", [0, 2])
def test_ordered_keeps_the_order_and_bounds_what_is_in_flight(workers):
    src = Counted(50)
    out, ahead = [], 0
    for y in ordered(_square, src, workers, ahead=6):
        out.append(y)
        ahead = max(ahead, src.read - len(out))
    assert out == [i * i for i in range(50)]
    assert ahead <= (1 if workers == 0 else max(6, AHEAD * workers))


def _big(i):
    return {"x": torch.full((600, 600), float(i)), "i": torch.tensor([i])}  # 1.4 MB: crosses in shared memory


def test_large_results_cross_in_shared_memory_and_small_ones_as_bytes():
    from minigenrecal.data.feed import SHARE_BYTES, _nbytes
    assert _nbytes(_big(0)) > SHARE_BYTES > _nbytes([_square(3), {"a": torch.zeros(10)}])
    out = list(ordered(_big, range(5), workers=2))
    assert [int(o["i"]) for o in out] == list(range(5))
    assert all(torch.equal(o["x"], _big(i)["x"]) for i, o in enumerate(out))


def test_buckets_sort_each_window_and_keep_its_samples():
    lengths = [5, 1, 9, 3, 7, 2, 8, 4, 6, 0, 11, 10, 12]
    out = list(bucketed(iter(lengths), 6, 2, key=lambda x: x, seed=0, on_window=lambda: 0))
    assert sorted(out[:6]) == sorted(lengths[:6]) and sorted(out[6:12]) == sorted(lengths[6:12])
    assert out[12:] == [12]
    for w in (out[:6], out[6:12]):  # each batch is two neighbours of the sorted window
        pairs = {tuple(w[i:i + 2]) for i in range(0, 6, 2)}
        s = sorted(w)
        assert pairs == {tuple(s[i:i + 2]) for i in range(0, 6, 2)}
    assert list(bucketed(iter(lengths), 2, 2, key=lambda x: x, seed=0, on_window=lambda: 0)) == lengths


# -- the data sets -----------------------------------------------------------------------------------------------
def _jsonl(tmp_path, n=13, bad=(1,), name="train.jsonl"):
    from minigenrecal.data.llava import write_llava_json
    from minigenrecal.data.synthetic import make_split
    records = json.loads(write_llava_json(make_split(0, "train", n), tmp_path).read_text())
    for i in bad:
        records[i]["image"] = "missing.png"
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _items(data, n):
    it = iter(data)
    return [next(it) for _ in range(n)]


def _same(a, b):
    assert [x[2] for x in a] == [x[2] for x in b]
    for x, y in zip(a, b):
        for e, f in zip(x[:2], y[:2]):
            assert e.id == f.id and torch.equal(e.input_ids, f.input_ids)
            assert e.vision.keys() == f.vision.keys()
            assert all(torch.equal(e.vision[k], f.vision[k]) for k in e.vision if torch.is_tensor(e.vision[k]))


def test_a_stream_rendered_by_workers_equals_the_stream_rendered_here(tiny_pair, tmp_path):
    from minigenrecal.data.sources import StreamPairData, open_source
    teacher, make_student = tiny_pair
    student, path = make_student(), _jsonl(tmp_path, bad=(1, 6))
    plain = StreamPairData(StreamPosition(open_source(path)), student, teacher)
    fed = StreamPairData(StreamPosition(open_source(path)), student, teacher, workers=2)
    _same(_items(plain, 11), _items(fed, 11))
    assert fed.skipped == plain.skipped and [e["id"] for e in fed.skipped] == ["train-0-1", "train-0-6"]
    assert [fed.sample_id(k) for k in range(11)] == [plain.sample_id(k) for k in range(11)]


def _stage(data, student, teacher, steps=5, batch=2, callbacks=(), stage=1):
    from minigenrecal.loop import train_stage
    from minigenrecal.recalibrator import Recalibrator
    from minigenrecal.stages import StageConfig
    torch.manual_seed(0)
    recal = Recalibrator(teacher.d, student.text_config)
    return train_stage(stage, student, data, StageConfig(steps=steps, batch_size=batch, lr=1e-2), teacher=teacher,
                       recal=recal, progress=False, callbacks=callbacks)


def test_lazy_data_rendered_by_dataloader_workers_trains_the_same_and_reports_every_skip(tiny_pair, tmp_path):
    """A shuffled share with two bad records: the history is bit-identical with 2 workers, and the skip records
    written in the workers reach the training process's report."""
    from minigenrecal.data.feed import WorkerFed
    from minigenrecal.data.sources import LazyPairData, open_source
    teacher, make_student = tiny_pair
    path = _jsonl(tmp_path, n=12, bad=(1, 6))
    runs = {}
    for workers in (0, 1, 2):
        data = LazyPairData(open_source(path), make_student(seed=3), teacher, workers=workers)
        runs[workers] = (_stage(data, data.student, teacher, steps=6), sorted(e["id"] for e in data.skipped))
    assert runs[1] == runs[0] and runs[2] == runs[0]
    assert runs[0][1] == ["train-0-1", "train-0-6"]  # 6 steps x 2 = one whole pass: every record was met
    data = LazyPairData(open_source(path), make_student(), teacher, workers=2)
    assert isinstance(data.make_loader(_cfg(), _Acc(), torch.Generator(), lambda x: x), WorkerFed)


def _cfg():
    from minigenrecal.stages import StageConfig
    return StageConfig(batch_size=2)


class _Acc:
    device = torch.device("cpu")


def _first_ids(data, student, teacher, stage):
    """The sample ids of the first batch a stage draws."""
    from minigenrecal.loop import Batches, make_collate
    g = torch.Generator().manual_seed(stage)
    loader = data.make_loader(_cfg(), _Acc(), g, make_collate(student, teacher))
    _, _, idx, _ = next(Batches(loader, g))
    return [data.sample_id(k) for k in idx.tolist()]


def test_a_shuffled_stream_starts_each_stage_elsewhere_and_covers_every_record(tiny_pair, tmp_path):
    from minigenrecal.data.sources import StreamPairData, open_source
    teacher, make_student = tiny_pair
    student, path = make_student(), _jsonl(tmp_path, n=40, bad=())

    def stream(buffer):
        return StreamPairData(StreamPosition(open_source(path), buffer), student, teacher)
    plain = stream(0)
    assert _first_ids(plain, student, teacher, 1) == _first_ids(plain, student, teacher, 2)  # the defect
    data = stream(16)
    firsts = [_first_ids(data, student, teacher, s) for s in (1, 2)]
    assert firsts[0] != firsts[1]  # stage 2 does not begin where stage 1 began
    assert firsts == [_first_ids(stream(16), student, teacher, s) for s in (1, 2)]  # seeded: the same each run
    data.generator = torch.Generator().manual_seed(5)
    one_pass = [x[2] for x in data]
    assert len(one_pass) == 40
    assert sorted(data.sample_id(k) for k in one_pass) == sorted(f"train-0-{r}#0" for r in range(40))


def test_length_buckets_cut_padding_and_keep_each_windows_samples(tiny_pair, tmp_path):
    from minigenrecal.data.sources import StreamPairData, open_source
    teacher, make_student = tiny_pair
    student, path = make_student(), _jsonl(tmp_path, n=32, bad=())

    def batches(buckets):
        data = StreamPairData(StreamPosition(open_source(path)), student, teacher, buckets=buckets)
        data.batch_size, data.generator = 4, torch.Generator().manual_seed(0)
        items = list(data)
        ids = [data.sample_id(x[2]) for x in items]
        lens = [sum(len(e.input_ids) for e in x[:2]) for x in items]
        pad = sum(4 * max(lens[i:i + 4]) - sum(lens[i:i + 4]) for i in range(0, 32, 4))
        return ids, pad
    ids0, pad0 = batches(0)
    ids8, pad8 = batches(4)  # windows of 4 batches = 16 samples
    assert sorted(ids8[:16]) == sorted(ids0[:16]) and sorted(ids8[16:]) == sorted(ids0[16:])
    assert ids8 != ids0 and pad8 < pad0
    print(f"pad tokens (both sides) over 8 batches of 4: {pad0} in order, {pad8} with buckets of 4 batches")


@pytest.mark.parametrize("feed", [dict(buffer=8, buckets=0, workers=0), dict(buffer=8, buckets=3, workers=2),
                                  dict(lazy=True, workers=2)])
def test_buffer_buckets_and_workers_resume_exactly(tiny_pair, tmp_path, monkeypatch, feed):
    """A stream (through its shuffle buffer, length buckets, render workers) or a lazy share (DataLoader workers),
    stopped after step 3 of 7, resumed from the step-2 checkpoint (inside a bucket window): the uninterrupted
    history and skip report, bit for bit."""
    from minigenrecal.data.sources import LazyPairData, StreamPairData, open_source
    teacher, make_student = tiny_pair
    path = _jsonl(tmp_path, n=13, bad=(2,))

    def run(callbacks=()):
        student = make_student(seed=3)
        data = (LazyPairData(open_source(path), student, teacher, skipped=[], workers=feed["workers"])
                if feed.get("lazy") else
                StreamPairData(StreamPosition(open_source(path), feed["buffer"]), student, teacher, skipped=[],
                               workers=feed["workers"], buckets=feed["buckets"]))
        try:
            history = _stage(data, student, teacher, steps=7, callbacks=callbacks)
        except RuntimeError:
            history = None
        return history, data.skipped

    ref, ref_skipped = run()
    monkeypatch.setenv(FAULT_ENV, "raise step 1 3")
    assert run([Checkpointer(tmp_path / "ck", every=2)])[0] is None
    monkeypatch.delenv(FAULT_ENV)
    assert [p.name for p in complete_checkpoints(tmp_path / "ck")] == ["stage1-step0000002"]
    history, skipped = run([Checkpointer(tmp_path / "ck", every=2, resume=True)])
    assert history == ref and skipped == ref_skipped and len(ref_skipped) == 1


# -- the launch: flags, the presets' defaults ----------------------------------------------------------------------
def test_the_real_presets_feed_with_workers_a_buffer_and_buckets_and_the_flags_win():
    from argparse import Namespace
    from minigenrecal.models.presets import PRESETS
    from minigenrecal.scale.launch import feed_options
    none = Namespace(dataloader_num_workers=None, shuffle_buffer=None, length_buckets=None)
    assert feed_options(none, PRESETS["tiny"]) == {"workers": 0, "shuffle_buffer": 0, "length_buckets": 0}
    for name in set(PRESETS) - {"tiny"}:
        assert feed_options(none, PRESETS[name]) == {"workers": 4, "shuffle_buffer": 1000, "length_buckets": 8}, name
    flags = Namespace(dataloader_num_workers=0, shuffle_buffer=5, length_buckets=None)
    assert feed_options(flags, PRESETS["internvl2.5-8b<-internvl2.5-78b"]) == {"workers": 0, "shuffle_buffer": 5,
                                                                               "length_buckets": 8}


def _train(path, out, *extra):
    import contextlib
    import io
    from minigenrecal.cli import main
    with contextlib.redirect_stdout(io.StringIO()):
        main(["train", "--preset", "tiny", "--data", str(path), "--stages", "1", "--max_steps", "3",
              "--per_device_train_batch_size", "4", "--quiet", "--save_steps", "0", "--output_dir", str(out), *extra])
    log = json.loads((out / "train_log.json").read_text())
    return [{k: v for k, v in h.items() if k != "stage_seconds"} for h in log["stages"]["1"]["history"]], log


@pytest.mark.parametrize("mode", ["--stream", "--lazy"])
def test_train_with_render_workers_gives_the_same_history(tmp_path, mode):
    path = _jsonl(tmp_path, n=12, bad=(3,))
    plain, _ = _train(path, tmp_path / "plain", mode)
    fed, log = _train(path, tmp_path / "fed", mode, "--dataloader_num_workers", "2")
    assert fed == plain
    assert log["manifest"]["config"]["dataloader_num_workers"] == 2


def test_a_negative_feed_flag_is_refused_naming_it(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _train(tmp_path / "x.jsonl", tmp_path / "run", "--stream", "--dataloader_num_workers", "-1")
    assert "--dataloader_num_workers: must be 0 or more, got -1" in capsys.readouterr().err


def test_train_reads_a_stream_through_its_buffer_and_buckets(tmp_path):
    path = _jsonl(tmp_path, n=12, bad=())
    plain, _ = _train(path, tmp_path / "plain", "--stream")
    mixed, log = _train(path, tmp_path / "mixed", "--stream", "--shuffle_buffer", "6", "--length_buckets", "2")
    assert len(mixed) == len(plain) == 3 and mixed != plain  # other batches
    assert (log["manifest"]["config"]["shuffle_buffer"], log["manifest"]["config"]["length_buckets"]) == (6, 2)


def test_train_records_each_stages_step_time_and_loader_share(tmp_path):
    """`train` times every optimizer step and every batch draw (train_log.json `timing`): the medians and shares
    are those of the steps the loop ran."""
    path = _jsonl(tmp_path, n=12, bad=())
    _, log = _train(path, tmp_path / "run", "--stream", "--max_steps", "8")
    t = log["timing"]["1"]
    assert t["steps"] == 6 and 0 < t["loader_share"] < 1 and t["step_ms"] > 0  # 8 steps, the first 2 left out


def test_the_step_timer_leaves_out_the_warmup_and_keeps_the_position():
    from minigenrecal.scale.tracking import StepTimer
    from types import SimpleNamespace

    class Slow:
        drawn, epoch_state = 3, "s"

        def __next__(self):
            return 1
    timer = StepTimer(warmup=2)
    st = SimpleNamespace(stage=1, batches=Slow())
    timer.on_stage_begin(st)
    assert st.batches.drawn == 3 and st.batches.epoch_state == "s"  # a checkpoint still reads the position
    for _ in range(8):
        next(st.batches)
        timer.on_step_end(st)
    timer.steps[1] = [1.0, 1.0, 0.2, 0.4, 0.3, 0.5, 0.1, 0.6]
    timer.draws[1][:] = [0.5, 0.5, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]
    s = timer.summary()[1]
    assert s["steps"] == 6 and s["step_ms"] == pytest.approx(350.0) and s["loader_share"] == pytest.approx(0.6 / 2.1)
