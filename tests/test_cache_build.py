"""Building a teacher cache for a real run: shards capped by bytes, resume after an interruption, LLaVA data with
bad samples skipped and recorded, two processes equal to one, lookup by id, the size estimate and the docs' table."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import kill_when_written, run_cli

from minigenrecal.scale import cache as C
from minigenrecal.scale.cache import TeacherCache, build_cache, parse_bytes, sample_bytes, size_arithmetic
from minigenrecal.data.synthetic import make_split
from minigenrecal.data.llava import write_llava_json
from minigenrecal.stages import teacher_forward
from minigenrecal.models.tiny import load_teacher
from minigenrecal.models.vlm import VLMView

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent
N = 24
CAP = "40KiB"  # about three tiny-teacher samples (about 10 KiB each in bf16) per shard


@pytest.fixture(scope="module")
def teacher():
    model, proc = load_teacher()
    return VLMView(model.requires_grad_(False), proc, name="teacher")


@pytest.fixture(scope="module")
def samples():
    return make_split(0, "train", N)


def _same_samples(a: TeacherCache, i: int, b: TeacherCache, j: int) -> None:
    for x, y in zip(a.sample(i), b.sample(j)):
        assert torch.equal(x, y)


def _build_files(d: Path) -> dict[str, bytes]:
    """Every file of a cache but the rank-R.json records (which count this run's forwards)."""
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if not p.name.startswith("rank-")}


def test_parse_bytes():
    assert parse_bytes("2GiB") == 2 * 2 ** 30 and parse_bytes("512MiB") == 512 * 2 ** 20
    assert parse_bytes("1.5GB") == 1_500_000_000 and parse_bytes("65536") == 65536 and parse_bytes("64K") == 65536
    with pytest.raises(ValueError, match="not a size"):
        parse_bytes("2 parsecs")


def test_shards_are_capped_by_bytes(teacher, samples, tmp_path):
    cap = parse_bytes(CAP)
    meta = build_cache(teacher, samples, tmp_path / "capped", batch_size=5, shard_bytes=cap)
    sizes = [(tmp_path / "capped" / s["file"]).stat().st_size for s in meta["shards"]]
    assert sizes == [s["bytes"] for s in meta["shards"]] and len(sizes) >= 6
    assert max(sizes) <= cap and all(s["n"] >= 2 for s in meta["shards"])  # packed, and under the cap
    whole = build_cache(teacher, samples, tmp_path / "whole", batch_size=5)  # default 2 GiB: one shard
    assert len(whole["shards"]) == 1 and whole["sample_ids"] == meta["sample_ids"] == [s.id for s in samples]
    # a sample larger than the cap gets a shard of its own (the one case where a file exceeds the cap)
    tiny = build_cache(teacher, samples, tmp_path / "tiny", batch_size=5, shard_bytes=1000)
    assert len(tiny["shards"]) == N and all(s["n"] == 1 and s["bytes"] > 1000 for s in tiny["shards"])
    caches = [TeacherCache(tmp_path / d) for d in ("capped", "whole", "tiny")]
    for i in range(N):  # the cut does not change a feature
        _same_samples(caches[0], i, caches[1], i)
        _same_samples(caches[2], i, caches[1], i)


def test_interrupted_build_resumes_to_identical_files(teacher, samples, tmp_path, monkeypatch):
    kw = dict(batch_size=5, shard_bytes=parse_bytes(CAP), info={"split": "train"})
    full = build_cache(teacher, samples, tmp_path / "full", **kw)
    # interrupt where the next shard starts inside a batch: the resume must recompute that batch whole
    k = next(i for i, s in enumerate(full["shards"]) if i > 1 and
             json.loads((tmp_path / "full" / f"{C._name(0, i)}.json").read_text())["start"] % 5)
    kill_when_written(monkeypatch, C, f"{C._name(0, k)}.json")
    part = tmp_path / "part"
    with pytest.raises(RuntimeError, match="killed"):
        build_cache(teacher, samples, part, **kw)
    monkeypatch.undo()
    assert (part / f"{C._name(0, k)}.safetensors").exists() and not (part / f"{C._name(0, k)}.json").exists()
    assert not (part / "meta.json").exists()
    (part / f"{C._name(0, k + 1)}.safetensors.tmp").write_bytes(b"a write cut short")
    resumed = build_cache(teacher, samples, part, **kw)  # the same call again
    assert resumed == full
    assert _build_files(part) == _build_files(tmp_path / "full")  # shards, their metadata, head, meta: byte-identical
    forwards = [json.loads((d / "rank-000.json").read_text())["forwards"] for d in (part, tmp_path / "full")]
    assert forwards[1] == 5 and forwards[0] < forwards[1]  # complete shards were not recomputed


def test_a_rerun_with_other_settings_is_refused(teacher, samples, tmp_path):
    first = build_cache(teacher, samples[:6], tmp_path, batch_size=3)
    assert build_cache(teacher, samples[:6], tmp_path, batch_size=3) == first  # a finished build: nothing to do
    with pytest.raises(ValueError, match=r"other settings \(batch_size differ\)"):
        build_cache(teacher, samples[:6], tmp_path, batch_size=2)
    with pytest.raises(ValueError, match=r"other settings \(samples_sha256 differ\)"):
        build_cache(teacher, samples[1:7], tmp_path, batch_size=3)


def test_lookup_by_id_serves_any_order_or_subset(teacher, samples, tmp_path):
    build_cache(teacher, samples[:8], tmp_path, batch_size=4, dtype="float32")
    cache = TeacherCache(tmp_path)
    ids = [s.id for s in samples[:8]]
    train = [samples[5], samples[0], samples[7]]  # a training set: another order, a subset
    assert cache.indices([s.id for s in train]) == [5, 0, 7]
    teacher_fn = cache.teacher_fn_for([s.id for s in train])
    got = teacher_fn(None, torch.tensor([2, 0]))  # dataset indices 2, 0 -> samples 7, 5
    live = teacher_forward(teacher, teacher.collate([teacher.encode(s) for s in (train[2], train[0])]))
    for x, y in zip(got.z_q + got.z_a + [got.z_pred], live.z_q + live.z_a + [live.z_pred]):
        torch.testing.assert_close(x, y)  # other padding than the cache's batches: fp32 roundoff
    assert torch.equal(got.labels, live.labels)
    assert ids[0] in cache and "nope" not in cache
    with pytest.raises(ValueError, match="1 sample\\(s\\) are not in the cache: 'nope'"):
        cache.indices([ids[0], "nope"])
    with pytest.raises(ValueError, match="do not match.*teacher_fn_for"):
        cache.check(train)


# -- the command line: LLaVA data, one process and two ---------------------------------------------------------
@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """N good records, plus one the teacher rejects (too long), one the reader rejects (no image file) and a
    repeated id (both of its records are left out: the cache is looked up by id)."""
    path = write_llava_json(make_split(0, "train", N), tmp_path_factory.mktemp("data"))
    records = json.loads(path.read_text())
    too_long = {**records[3], "id": "too-long", "conversations": [
        {"from": "human", "value": "<image>\n" + "Is there a red square here? " * 60}, {"from": "gpt", "value": "yes"}]}
    records.insert(4, too_long)
    records.insert(9, {**records[0], "id": "no-image", "image": "images/missing.png"})
    records.insert(15, dict(records[1]))
    path.write_text(json.dumps(records))
    return path


def _expected_ids(data_file) -> list[str]:
    ids = [f"{r['id']}#0" for r in json.loads(data_file.read_text())]
    return [i for i in ids if ids.count(i) == 1 and i not in ("too-long#0", "no-image#0")]


def _args(data_file, out) -> list[str]:
    return ["cache-teacher", "--preset", "tiny", "--data", str(data_file), "--output_dir", str(out),
            "--per_device_eval_batch_size", "5", "--shard-bytes", CAP]


@pytest.fixture(scope="module")
def one_process(data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "cache"
    return out, run_cli(_args(data_file, out))


def test_cache_teacher_data_skips_and_records_bad_samples(data_file, one_process):
    out, stdout = one_process
    cache = TeacherCache(out)
    assert cache.sample_ids == _expected_ids(data_file) and len(cache) == N - 1
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    dup = f"{json.loads(data_file.read_text())[1]['id']}#0"
    assert [r["id"] for r in skipped] == ["no-image", dup, dup, "too-long#0"]  # reader, repeated ids, teacher
    assert "not found" in skipped[0]["reason"] and "too long" in skipped[3]["reason"]
    assert cache.meta["skipped"] == skipped and "skipped 4 bad sample(s)" in stdout
    with pytest.raises(ValueError, match="'too-long#0' \\(skipped: rejected, too long"):
        cache.indices(["too-long#0"])
    assert max(s["bytes"] for s in cache.meta["shards"]) <= parse_bytes(CAP)
    assert cache.meta["data"] == data_file.name and cache.files[0].get_slice("z_seq").get_dtype() == "BF16"


def test_cache_teacher_strict_fails_on_the_first_bad_sample(data_file, tmp_path):
    from minigenrecal.data.llava import SampleError
    with pytest.raises(SampleError, match="sample no-image: image file .* not found"):
        run_cli([*_args(data_file, tmp_path / "cache"), "--strict"])


LAUNCHES = {"ddp": ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"],
            "fsdp": ["--config_file", str(ROOT / "configs" / "fsdp.yaml")],
            "zero3": ["--config_file", str(ROOT / "configs" / "zero3.yaml")]}


@pytest.mark.parametrize("launch,port", [("ddp", 29561), ("fsdp", 29562), ("zero3", 29563)])
def test_two_processes_equal_one(data_file, one_process, tmp_path, launch, port):
    """`accelerate launch ... --num_processes 2` on CPU (gloo): 23 samples in batches of 5 are 5 batches,
    3 for rank 0 and 2 plus one padding forward for rank 1; the cache equals the one-process cache sample by sample.
    Under DDP each process holds the whole teacher; under FSDP2 and ZeRO-3 the teacher is sharded across the two
    (every forward a collective, hence the padding forward). FSDP2 gathers exact weights: bit-identical features.
    ZeRO-3's linear layers compute matmul-then-add: features within bf16 rounding of the one-process cache."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": str(ROOT)}
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *LAUNCHES[launch], "--num_processes", "2",
           "--main_process_port", str(port), "-m", "minigenrecal", *_args(data_file, out)]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert r.stdout.count("size estimate") == 1  # printed by rank 0 only
    one, two = TeacherCache(one_process[0]), TeacherCache(out)
    assert two.sample_ids == one.sample_ids and two.meta["skipped"] == one.meta["skipped"]
    for i, sid in enumerate(one.sample_ids):
        if launch == "zero3":
            for x, y in zip(one.sample(i), two.sample(two.indices([sid])[0])):
                torch.testing.assert_close(x.float(), y.float(), rtol=2e-2, atol=2e-2)
        else:
            _same_samples(one, i, two, two.indices([sid])[0])
    assert {s["rank"] for s in two.meta["shards"]} == {0, 1} and two.meta["world_size"] == 2
    assert all(f"-r{s['rank']:03d}-" in s["file"] for s in two.meta["shards"])
    ranks = [json.loads((out / f"rank-{r:03d}.json").read_text()) for r in (0, 1)]
    assert [d["forwards"] for d in ranks] == [3, 3] and ranks[1]["stop"] == 24  # rank 1: 2 batches + 1 padding
    assert torch.equal(one.head().weight, two.head().weight)


@pytest.mark.parametrize("store", [[], ["--store", "answers", "--reg-every", "16"]])
def test_size_estimate_within_10_percent(tmp_path, store):
    out = tmp_path / "cache"
    stdout = run_cli(["cache-teacher", "--preset", "tiny", "--n", "200", "--output_dir", str(out), "--shard-bytes",
                       "256KiB", *store])
    m = re.search(r"= ([\d,]+) B \(.*\) in (\d+) shard\(s\)", stdout)
    estimate, shards = int(m.group(1).replace(",", "")), int(m.group(2))
    assert f"over the first {C.ESTIMATE_SAMPLES} samples" in stdout
    written = sum(f.stat().st_size for f in out.iterdir() if f.name != "skipped.jsonl")
    assert abs(estimate - written) <= 0.1 * written, (estimate, written)
    assert abs(shards - len(TeacherCache(out).meta["shards"])) <= 1  # the mean size of the first samples vs greedy packing


def test_docs_size_table_is_the_arithmetic():
    """docs/cache.md's table for 1M samples: one row per preset, each number recomputed."""
    from minigenrecal.models.presets import PRESETS
    text = (ROOT / "docs" / "cache.md").read_text()
    rows = re.findall(r"^\| `([^`]+)` \| ([\d,]+) \| ([\d.,]+) \| ([\d.,]+) \| ([\d,]+) \| ([\d,]+) \| ([\d,]+) \| "
                      r"([\d,]+) \|", text, re.M)
    assert sorted(r[0] for r in rows) == sorted(PRESETS) and rows[0][0] == "tiny"
    num = lambda s: float(s.replace(",", ""))
    for name, d, lq, la, per, head, total, shards in rows:
        e = size_arithmetic(10 ** 6, num(lq), num(la), int(num(d)), int(num(head)))
        assert round(sample_bytes(num(lq), num(la), int(num(d)))) == num(per) == round(e["bytes_per_sample"]), name
        assert (e["total_bytes"], e["shards"]) == (num(total), num(shards)), name
    assert load_teacher()[0].get_output_embeddings().weight.shape[1] == int(num(rows[0][1]))  # tiny's d_l


def test_docs_answers_table_is_the_arithmetic():
    """docs/cache.md's `--store answers` table for 1M samples: K = 1, 16, 64 per preset, each number recomputed from
    the full table's token counts and heads."""
    from minigenrecal.models.presets import PRESETS
    text = (ROOT / "docs" / "cache.md").read_text()
    num = lambda s: float(s.replace(",", ""))
    dims = {r[0]: r[1:] for r in re.findall(r"^\| `([^`]+)` \| ([\d,]+) \| ([\d.,]+) \| ([\d.,]+) \| [\d,]+ \| "
                                           r"([\d,]+) \|", text, re.M)}
    rows = re.findall(r"^\| `([^`]+)` \| (\d+) \| ([\d,]+) \| ([\d,]+) \| ([\d,]+) \| ([\d.]+ [GT]iB) \| "
                      r"([\d.]+)% \|", text, re.M)
    assert sorted({r[0] for r in rows}) == sorted(PRESETS) and [int(r[1]) for r in rows] == [1, 16, 64] * len(PRESETS)
    for name, k, per, total, shards, human, share in rows:
        d, lq, la, head = dims[name]
        e = size_arithmetic(10 ** 6, num(lq), num(la), int(num(d)), int(num(head)), store="answers", reg_every=int(k))
        assert (round(e["bytes_per_sample"]), e["total_bytes"], e["shards"]) == (num(per), num(total), num(shards)), name
        assert C.format_bytes(e["total_bytes"]) == human, name
        full = size_arithmetic(10 ** 6, num(lq), num(la), int(num(d)), int(num(head)))["total_bytes"]
        assert f"{100 * e['total_bytes'] / full:.1f}" == share, name


def test_cache_then_train_recipe(data_file, one_process, tmp_path):
    """The README's recipe: cache the teacher over a data file, then train stages 1-2 from the cache over the same
    file. Samples are looked up by id, so the ones the build skipped are left out of training and recorded."""
    cache_dir, _ = one_process
    out = tmp_path / "run"
    stdout = run_cli(["train", "--preset", "tiny", "--data", str(data_file), "--cache", str(cache_dir),
                       "--stages", "1,2", "--max_steps", "1", "--per_device_train_batch_size", "4", "--quiet", "--save_steps", "0",
                       "--output_dir", str(out)])
    log = json.loads((out / "train_log.json").read_text())
    cache = TeacherCache(cache_dir)
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert log["samples"] == len(cache) and log["samples"] + len(skipped) >= N
    assert any(r["id"] == "too-long#0" and "not in the teacher cache" in r["reason"] and "too long" in r["reason"]
               for r in skipped)
    assert f"training on {len(cache)} samples" in stdout
    # a reordered subset of the records trains from the same cache
    records = json.loads(data_file.read_text())
    subset = tmp_path / "subset.json"
    subset.write_text(json.dumps(list(reversed(records))[:6]))
    stdout = run_cli(["train", "--preset", "tiny", "--data", str(subset), "--image-root", str(data_file.parent),
                       "--cache", str(cache_dir), "--stages", "1", "--max_steps", "1", "--per_device_train_batch_size", "2", "--quiet",
                       "--save_steps", "0", "--output_dir", str(tmp_path / "run2")])
    assert "training on" in stdout
