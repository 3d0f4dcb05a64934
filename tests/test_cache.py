"""The teacher-feature cache gives exactly the live teacher's TeacherOut and losses; stage 1 trains from it alone."""
import copy

import pytest
import torch

from minigenrecal.scale.cache import TeacherCache, build_cache
from minigenrecal.recalibrator import Recalibrator
from minigenrecal.loop import PairData, train_stage
from minigenrecal.stages import StageConfig, stage_loss, teacher_forward

torch.set_num_threads(1)
N = 10


@pytest.fixture(scope="module")
def pair(cache_pair):
    return cache_pair


def _live(teacher, samples, idx, answer_input="features"):
    batch = teacher.collate([teacher.encode(samples[i]) for i in idx])
    return teacher_forward(teacher, batch, answer_input)


def _same(a, b, exact=True):
    tol = dict(rtol=0, atol=0) if exact else {}
    for x, y in zip(a.z_q + a.z_a + [a.z_pred], b.z_q + b.z_a + [b.z_pred]):
        torch.testing.assert_close(x, y, **tol)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.a_lens.cpu(), b.a_lens.cpu())


@pytest.mark.parametrize("answer_input", ["features", "embeddings"])
def test_cache_equals_live_fp32(pair, tmp_path, answer_input):
    teacher, student, samples = pair
    meta = build_cache(teacher, samples, tmp_path, batch_size=4, shard_size=3, dtype="float32", answer_input=answer_input)
    assert len(meta["shards"]) == 4 and meta["n"] == N  # 3 + 3 + 3 + 1 samples
    cache = TeacherCache(tmp_path)
    cache.check(samples)
    idx = [4, 5, 6, 7]  # the cache's second batch, read across two shards: bit-identical
    _same(cache.teacher_out(idx), _live(teacher, samples, idx, answer_input))
    idx = [7, 0, 9, 4]  # another batch composition (other padding): equal up to fp32 roundoff
    _same(cache.teacher_out(idx), _live(teacher, samples, idx, answer_input), exact=False)
    head = cache.head()
    assert torch.equal(head.weight, teacher.head.weight) and not head.weight.requires_grad


def test_cache_bf16_equals_rounded_live(pair, tmp_path):
    teacher, _, samples = pair
    build_cache(teacher, samples, tmp_path, batch_size=5, dtype="bfloat16")
    idx = [5, 6, 7, 8, 9]  # the cache's second batch
    rounded = _live(teacher, samples, idx).to("cpu", torch.bfloat16).to("cpu", torch.float32)
    _same(TeacherCache(tmp_path, dtype=torch.float32).teacher_out(idx), rounded)


def _fp32_cache_and_recal(teacher, student, samples, path):
    """An fp32 cache in batches of 4, and a Recalibrator with a fixed seed."""
    build_cache(teacher, samples, path, batch_size=4, dtype="float32")
    torch.manual_seed(0)
    return TeacherCache(path), Recalibrator(teacher.d, student.text_config)


def test_losses_from_cache_equal_live(pair, tmp_path):
    teacher, student, samples = pair
    cache, recal = _fp32_cache_and_recal(teacher, student, samples, tmp_path)
    idx = [4, 5, 6, 7]  # one of the cache's batches
    s_batch = student.collate([student.encode(samples[i]) for i in idx])
    for stage, cfg in [(1, StageConfig(tau=2.0)), (2, StageConfig(chunk_size=4))]:
        live = stage_loss(stage, student, recal, teacher.head, s_batch, _live(teacher, samples, idx), cfg)
        cached = stage_loss(stage, student, recal, cache.head(), s_batch, cache.teacher_out(idx), cfg)
        assert live.keys() == cached.keys() and len(live) == (5 if stage == 1 else 6)
        for k in live:
            torch.testing.assert_close(cached[k], live[k], rtol=1e-6, atol=0)


def test_stage1_trains_from_cache_without_teacher_body(pair, tmp_path):
    teacher, student, samples = pair
    cache, recal0 = _fp32_cache_and_recal(teacher, student, samples, tmp_path)
    r_live, r_cache = copy.deepcopy(recal0), copy.deepcopy(recal0)
    data = PairData([student.encode(s) for s in samples], [teacher.encode(s) for s in samples])
    cfg = StageConfig(steps=2, batch_size=4, lr=1e-3)
    h_live = train_stage(1, student, data, cfg, teacher=teacher, recal=r_live, progress=False)
    h_cache = train_stage(1, student, PairData(data.s), cfg, teacher=None, recal=r_cache, teacher_head=cache.head(),
                          teacher_fn=cache.teacher_fn, progress=False)
    for a, b in zip(h_live, h_cache):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    changed = [not torch.equal(p, q) for p, q in zip(r_cache.parameters(), recal0.parameters())]
    assert all(changed)
    for p, q in zip(r_cache.parameters(), r_live.parameters()):
        # fp32 roundoff of differently padded teacher batches, amplified by Adam where a gradient is ~0:
        # allowed up to a tenth of one step (lr 1e-3)
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-4)


def test_cache_teacher_cli(pair, tmp_path):
    from minigenrecal.cli import main
    teacher, _, samples = pair
    teacher.model.save_pretrained(tmp_path / "teacher")
    teacher.processor.save_pretrained(tmp_path / "teacher")
    main(["cache-teacher", "--preset", "tiny", "--n", "5", "--output_dir", str(tmp_path / "c"), "--teacher-dir",
          str(tmp_path / "teacher"), "--per_device_eval_batch_size", "2"])
    cache = TeacherCache(tmp_path / "c")
    assert len(cache) == 5 and cache.sample_ids == [s.id for s in samples[:5]]
    assert cache.files[0].get_slice("z_seq").get_dtype() == "BF16"
    with pytest.raises(ValueError, match="do not match"):
        cache.check(samples[1:4])
