"""A teacher cache at the scale of a real run: `train --cache` with `--lazy`/`--stream` (targets looked up by id as
each batch is drawn), `cache-teacher --stream` (one batch rendered at a time) equal to the eager build."""
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import kill_when_written, run_cli

from minigenrecal.data.llava import SampleError, write_llava_json
from minigenrecal.data.synthetic import make_split
from minigenrecal.scale.cache import TeacherCache

torch.set_num_threads(1)
N = 10


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    """N tiny samples as a JSONL file with PNG images."""
    d = tmp_path_factory.mktemp("data")
    records = json.loads(write_llava_json(make_split(0, "train", N), d).read_text())
    path = d / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _cache(data_file, out, *extra) -> Path:
    run_cli(["cache-teacher", "--preset", "tiny", "--data", str(data_file), "--output_dir", str(out), "--dtype",
              "float32", "--per_device_eval_batch_size", "4", *extra])
    return out


@pytest.fixture(scope="module")
def fp32_cache(data_file, tmp_path_factory) -> Path:
    return _cache(data_file, tmp_path_factory.mktemp("c") / "cache")


def _train(data_file, out, *extra) -> dict:
    run_cli(["train", "--preset", "tiny", "--data", str(data_file), "--stages", "1", "--max_steps", "4",
              "--per_device_train_batch_size", "4", "--quiet", "--save_steps", "0", "--output_dir", str(out), *extra])
    return json.loads((out / "train_log.json").read_text())


def _losses(log: dict) -> list[dict]:
    return [{k: v for k, v in h.items() if k.startswith(("ce_", "kl_", "loss"))} for h in log["stages"]["1"]["history"]]


@pytest.fixture(scope="module")
def answers_cache(data_file, tmp_path_factory) -> Path:
    return _cache(data_file, tmp_path_factory.mktemp("a") / "cache", "--store", "answers", "--reg-every", "1")


@pytest.mark.parametrize("mode", ["--stream", "--lazy"])
@pytest.mark.parametrize("store", ["full", "answers"])
def test_stage1_from_cache_equals_live_when_read_lazily(data_file, fp32_cache, answers_cache, tmp_path, mode, store):
    """The same run with the live teacher and from an fp32 cache (full, or answers with K=1): every loss term of
    every step equal up to fp32 roundoff (the tolerance of the eager path's test in test_cache.py), over more steps
    than one pass of the data."""
    live = _losses(_train(data_file, tmp_path / "live", mode))
    cache = fp32_cache if store == "full" else answers_cache
    cached = _train(data_file, tmp_path / "cached", mode, "--cache", str(cache))
    assert len(live) == 4 and [h.keys() for h in _losses(cached)] == [h.keys() for h in live]
    for a, b in zip(live, _losses(cached)):
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-5), k
    assert cached["skipped"] == 0


@pytest.mark.parametrize("mode", ["--stream", "--lazy"])
@pytest.mark.parametrize("workers", ["0", "2"])
def test_samples_the_cache_lacks_are_skipped_and_recorded(data_file, tmp_path, mode, workers):
    """A cache of the first 6 samples: the other 4 are skipped as training meets them (in the render workers too),
    each recorded with its id and reason; --strict fails on the first one, naming it."""
    cache = _cache(data_file, tmp_path / "cache", "--n", "6")
    log = _train(data_file, tmp_path / "run", mode, "--cache", str(cache), "--dataloader_num_workers", workers)
    report = [json.loads(line) for line in (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()]
    ids = [f"{s.id}#0" for s in make_split(0, "train", N)]
    assert sorted(r["id"] for r in report) == sorted(ids[6:]) and log["skipped"] == 4
    assert all("not in the teacher cache" in r["reason"] for r in report)
    with pytest.raises(SampleError, match=f"sample {ids[6]}: not in the teacher cache"):
        _train(data_file, tmp_path / "strict", "--stream", "--cache", str(cache), "--strict")


def test_a_cache_of_other_data_is_refused_before_training(data_file, fp32_cache, tmp_path):
    records = [json.loads(line) for line in data_file.read_text().splitlines()]
    other = data_file.parent / "other.jsonl"
    other.write_text("".join(json.dumps({**r, "id": "x" + r["id"]}) + "\n" for r in records))
    with pytest.raises(ValueError, match="holds none of the 10 training samples"):
        _train(other, tmp_path / "run", "--stream", "--cache", str(fp32_cache))


def test_lookup_as_drawn_names_a_missing_id(fp32_cache):
    cache = TeacherCache(fp32_cache)
    fn = cache.teacher_fn_by_id(lambda k: ["nope", cache.sample_ids[0]][k])
    assert torch.equal(fn(None, torch.tensor([1])).labels, cache.teacher_out([0]).labels)
    with pytest.raises(ValueError, match="1 sample\\(s\\) are not in the cache: 'nope'"):
        fn(None, torch.tensor([0, 1]))


# -- cache-teacher --stream ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bad_data(tmp_path_factory) -> Path:
    """JSONL with 12 good records, one the teacher rejects (too long), one the reader rejects (no image file) and a
    repeated id (both of its records are left out)."""
    d = tmp_path_factory.mktemp("bad")
    records = json.loads(write_llava_json(make_split(0, "train", 12), d).read_text())
    records.insert(4, {**records[3], "id": "too-long", "conversations": [
        {"from": "human", "value": "<image>\n" + "Is there a red square here? " * 60}, {"from": "gpt", "value": "no"}]})
    records.insert(9, {**records[0], "id": "no-image", "image": "images/missing.png"})
    records.insert(11, dict(records[1]))
    path = d / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _files(d: Path) -> dict[str, bytes]:
    """Every file of a cache but build.json (a streamed build records `stream`) and rank-R.json (forwards run)."""
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name != "build.json" and not p.name.startswith("rank-")}


def _build_args(data: Path, *extra) -> list[str]:
    return ["cache-teacher", "--preset", "tiny", "--data", str(data), "--per_device_eval_batch_size", "4",
            "--shard-bytes", "30KiB", *extra]


@pytest.fixture(scope="module")
def images_ok(bad_data) -> Path:
    """bad_data without the record whose image is missing."""
    path = bad_data.parent / "images_ok.jsonl"
    path.write_text("".join(line + "\n" for line in bad_data.read_text().splitlines() if '"no-image"' not in line))
    return path


@pytest.mark.parametrize("extra", [[], ["--n", "9"]])
def test_streamed_build_is_byte_identical_to_the_eager_build(images_ok, tmp_path, extra):
    """Over records whose images all decode (one the teacher rejects, a repeated id), with and without --n."""
    eager = run_cli([*_build_args(images_ok, *extra), "--output_dir", str(tmp_path / "eager")])
    stream = run_cli([*_build_args(images_ok, *extra), "--output_dir", str(tmp_path / "stream"), "--stream"])
    files = _files(tmp_path / "stream")
    assert files == _files(tmp_path / "eager") and len([f for f in files if f.endswith(".safetensors")]) >= 3
    assert eager.splitlines()[-1] == stream.splitlines()[-1]  # the same meta summary
    assert re.search(r"size estimate \(arithmetic\): \d+ samples", stream)
    meta = TeacherCache(tmp_path / "stream").meta
    dup = f"{make_split(0, 'train', 2)[1].id}#0"
    assert [r["id"] for r in meta["skipped"]] == ([dup, dup, "too-long#0"] if not extra else ["too-long#0"])
    assert json.loads((tmp_path / "stream" / "build.json").read_text())["stream"] is True


def test_streamed_build_skips_a_bad_image_inside_its_batch(bad_data, tmp_path):
    """The record whose image is missing keeps its input position and is recorded under its sample id; every other
    sample is cached; --strict fails on it."""
    run_cli([*_build_args(bad_data), "--output_dir", str(tmp_path / "stream"), "--stream"])
    run_cli([*_build_args(bad_data), "--output_dir", str(tmp_path / "eager")])
    stream, eager = TeacherCache(tmp_path / "stream"), TeacherCache(tmp_path / "eager")
    assert stream.sample_ids == eager.sample_ids and len(stream) == 11
    assert "not found" in stream.skipped["no-image#0"] and "sample" not in stream.skipped["no-image#0"]
    first = next(json.loads(p.read_text()) for p in sorted((tmp_path / "stream").glob("shard-*.json"))
                 if any(r["id"] == "no-image#0" for r in json.loads(p.read_text())["skipped"]))
    assert first["start"] <= 7 < first["stop"]  # position 7: after 0-3, too-long, 4, 5 (dups left out: 1 and its copy)
    lines = bad_data.read_text().splitlines()
    only_image_bad = bad_data.parent / "strict.jsonl"
    only_image_bad.write_text("".join(x + "\n" for x in lines[:3] + [x for x in lines if '"no-image"' in x]))
    with pytest.raises(SampleError, match="sample no-image: image file .* not found"):
        run_cli([*_build_args(only_image_bad), "--output_dir", str(tmp_path / "strict"), "--stream", "--strict"])


def test_streamed_build_resumes_to_identical_files(images_ok, tmp_path, monkeypatch):
    from minigenrecal.data.sources import open_source
    from minigenrecal.models.tiny import load_teacher
    from minigenrecal.models.vlm import VLMView
    from minigenrecal.scale import cache as C
    model, proc = load_teacher()
    teacher = VLMView(model.requires_grad_(False), proc, name="teacher")
    records = open_source(images_ok)
    kw = dict(batch_size=4, shard_bytes=12 * 1024, skip_bad=True, store="answers", reg_every=2)
    full = C.build_cache_stream(teacher, records, tmp_path / "full", **kw)
    k = max(i for i in range(len(full["shards"]))  # the last shard that starts inside a batch
            if json.loads((tmp_path / "full" / f"{C._name(0, i)}.json").read_text())["start"] % 4)
    kill_when_written(monkeypatch, C, f"{C._name(0, k)}.json")
    with pytest.raises(RuntimeError, match="killed"):
        C.build_cache_stream(teacher, records, tmp_path / "part", **kw)
    monkeypatch.undo()
    assert not (tmp_path / "part" / "meta.json").exists()
    assert C.build_cache_stream(teacher, records, tmp_path / "part", **kw) == full
    assert _files(tmp_path / "part") == _files(tmp_path / "full")
    forwards = [json.loads((d / "rank-000.json").read_text())["forwards"] for d in (tmp_path / "part", tmp_path / "full")]
    assert forwards[0] < forwards[1]  # the complete shards were not recomputed


@pytest.mark.slow
def test_two_processes_stream_equal_one(images_ok, tmp_path):
    """`accelerate launch --num_processes 2` on CPU (gloo): each process decodes only its block of batches (12
    input positions in batches of 4: 3 batches, 2 for rank 0, 1 plus a padding forward for rank 1); the cache
    equals the one-process streamed cache sample by sample, bit for bit."""
    import os
    import subprocess
    import sys
    root = Path(__file__).resolve().parent.parent
    run_cli([*_build_args(images_ok), "--output_dir", str(tmp_path / "one"), "--stream"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "--num_processes", "2", "--main_process_port", "29571", "-m", "minigenrecal",
           *_build_args(images_ok), "--output_dir", str(tmp_path / "two"), "--stream"]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert r.stdout.count("size estimate") == 1
    one, two = TeacherCache(tmp_path / "one"), TeacherCache(tmp_path / "two")
    assert two.sample_ids == one.sample_ids and two.meta["skipped"] == one.meta["skipped"] and len(one) == 11
    for i in range(len(one)):
        for x, y in zip(one.sample(i), two.sample(i)):
            assert torch.equal(x, y)
    ranks = [json.loads((tmp_path / "two" / f"rank-{r:03d}.json").read_text()) for r in (0, 1)]
    assert [d["forwards"] for d in ranks] == [2, 2] and {s["rank"] for s in two.meta["shards"]} == {0, 1}


def test_streamed_build_needs_data(tmp_path):
    with pytest.raises(ValueError, match="--stream reads --data records"):
        run_cli(["cache-teacher", "--preset", "tiny", "--n", "4", "--output_dir", str(tmp_path / "d"), "--stream"])


def test_stage1_trains_from_an_answers_cache_with_a_reg_subsample(data_file, tmp_path):
    """--reg-every 4: samples 0, 4, 8 keep z_q, so each streamed batch of 4 (samples 0-3, 4-7, 8-9) holds one of
    them: every step has the reg terms, of that one sample, and the same keys."""
    cache = _cache(data_file, tmp_path / "cache", "--store", "answers", "--reg-every", "4", "--stream")
    c = TeacherCache(cache)
    assert [c.has_q(i) for i in range(N)] == [i % 4 == 0 for i in range(N)]
    hist = _losses(_train(data_file, tmp_path / "run", "--stream", "--cache", str(cache)))
    assert all(h.keys() == {"ce_main", "kl_main", "ce_reg", "kl_reg", "loss"} for h in hist)
    assert all(h["ce_reg"] > 0 and h["loss"] == pytest.approx(sum(v for k, v in h.items() if k != "loss"), rel=1e-5)
               for h in hist)
