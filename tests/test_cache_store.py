"""`cache-teacher --store answers --reg-every K`: the answer-predicting rows of every sample, the question features of
one sample in K. K=1 is lossless; with K>1 the regularization path trains on the samples that kept them."""
from dataclasses import replace

import pytest
import torch

from minigenrecal.losses import recal_path
from minigenrecal.recalibrator import Recalibrator
from minigenrecal.scale.cache import TeacherCache, build_cache, sample_bytes
from minigenrecal.stages import StageConfig, stage_loss, teacher_forward

torch.set_num_threads(1)
N = 10


@pytest.fixture(scope="module")
def pair(cache_pair):
    return cache_pair


@pytest.fixture(scope="module")
def caches(pair, tmp_path_factory):
    """fp32 caches in batches of 4: full, answers K=1, answers K=3."""
    teacher, _, samples = pair
    root = tmp_path_factory.mktemp("caches")
    kw = dict(batch_size=4, dtype="float32", shard_bytes=20_000)
    build_cache(teacher, samples, root / "full", **kw)
    build_cache(teacher, samples, root / "k1", store="answers", reg_every=1, **kw)
    build_cache(teacher, samples, root / "k3", store="answers", reg_every=3, **kw)
    return {k: TeacherCache(root / k) for k in ("full", "k1", "k3")}


def _live(teacher, samples, idx):
    return teacher_forward(teacher, teacher.collate([teacher.encode(samples[i]) for i in idx]))


def _recal(teacher, student):
    torch.manual_seed(0)
    return Recalibrator(teacher.d, student.text_config)


CFGS = [StageConfig(tau=2.0), StageConfig(chunk_size=4)]  # unfused and fused


def test_answers_k1_holds_every_feature_of_the_full_cache(caches):
    full, k1 = caches["full"], caches["k1"]
    assert k1.meta["store"] == "answers" and k1.meta["reg_every"] == 1 and "store" not in full.meta
    assert len(k1.meta["shards"]) > 1  # read across shards
    for i in range(N):
        assert k1.has_q(i)
        for x, y in zip(full.sample(i), k1.sample(i)):
            assert torch.equal(x, y)


@pytest.mark.parametrize("cfg", CFGS)
def test_answers_k1_losses_equal_live(pair, caches, cfg):
    """Stage 1 on one of the cache's batches: the teacher's tensors bit-identical to the live ones, every loss term
    equal up to the last bit of fp32 (as test_cache.py's full cache: a matmul's last bit depends on where its
    input lies in memory; the full cache shows such 1-ulp differences in its KL on this very batch)."""
    teacher, student, samples = pair
    recal, idx = _recal(teacher, student), [4, 5, 6, 7]
    s_batch = student.collate([student.encode(samples[i]) for i in idx])
    live = stage_loss(1, student, recal, teacher.head, s_batch, _live(teacher, samples, idx), cfg)
    cached = stage_loss(1, student, recal, caches["k1"].head(), s_batch, caches["k1"].teacher_out(idx), cfg)
    t, live_t = caches["k1"].teacher_out(idx), _live(teacher, samples, idx)
    for x, y in zip(t.z_q + t.z_a + [t.z_pred, t.labels], live_t.z_q + live_t.z_a + [live_t.z_pred, live_t.labels]):
        assert torch.equal(x, y)
    assert live.keys() == cached.keys() and len(live) == 5
    for k in live:
        torch.testing.assert_close(cached[k], live[k], rtol=1e-6, atol=0)


@pytest.mark.parametrize("cfg", CFGS)
def test_answers_k3_without_reg_equals_live(pair, caches, cfg):
    teacher, student, samples = pair
    recal, idx = _recal(teacher, student), [4, 5, 6, 7]
    cfg = replace(cfg, reg=False)
    s_batch = student.collate([student.encode(samples[i]) for i in idx])
    live = stage_loss(1, student, recal, teacher.head, s_batch, _live(teacher, samples, idx), cfg)
    cached = stage_loss(1, student, recal, caches["k3"].head(), s_batch, caches["k3"].teacher_out(idx), cfg)
    assert set(live) == set(cached) == {"ce_main", "kl_main", "loss"}
    for k in live:
        torch.testing.assert_close(cached[k], live[k], rtol=1e-6, atol=0)


@pytest.mark.parametrize("cfg", CFGS)
def test_answers_k3_reg_terms_are_the_live_ones_on_the_subsample(pair, caches, cfg):
    """Batch 4..7 of a K=3 cache: positions 6 keeps z_q (6 % 3 == 0), the others do not. The main terms equal the
    live ones; the reg terms equal the live reg path on sample 6 alone, sliced here by hand from the live batch."""
    teacher, student, samples = pair
    recal, idx = _recal(teacher, student), [4, 5, 6, 7]
    k3 = caches["k3"]
    assert [k3.has_q(i) for i in range(N)] == [i % 3 == 0 for i in range(N)]
    s_batch = student.collate([student.encode(samples[i]) for i in idx])
    live_t = _live(teacher, samples, idx)
    t = k3.teacher_out(idx)
    assert [q.shape[1] for q in t.z_q] == [0, 0, teacher.d, 0] and t.q_lens.tolist() == live_t.q_lens.tolist()
    cached = stage_loss(1, student, recal, k3.head(), s_batch, t, cfg)
    live = stage_loss(1, student, recal, teacher.head, s_batch, live_t, replace(cfg, reg=False))
    a = live_t.a_lens.tolist()
    rows = list(range(a[0] + a[1], a[0] + a[1] + a[2]))  # sample 6's answer rows in the flattened batch
    sub = type(live_t)([live_t.z_q[2]], [live_t.z_a[2]], live_t.z_pred[rows], live_t.labels[rows], live_t.a_lens[2:3])
    ce, kl = recal_path(recal, [recal.proj_pre(sub.z_q[0])], sub, teacher.head, cfg.tau)
    for k in ("ce_main", "kl_main"):
        torch.testing.assert_close(cached[k], live[k], rtol=1e-6, atol=0)
    torch.testing.assert_close(cached["ce_reg"], ce, rtol=1e-5, atol=0)
    torch.testing.assert_close(cached["kl_reg"], kl, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(cached["loss"], live["loss"] + ce + kl, rtol=1e-5, atol=0)


@pytest.mark.parametrize("cfg", CFGS)
def test_a_batch_without_question_features_has_zero_reg_terms(pair, caches, cfg):
    teacher, student, samples = pair
    recal, idx = _recal(teacher, student), [4, 5, 7]  # none divisible by 3
    s_batch = student.collate([student.encode(samples[i]) for i in idx])
    cached = stage_loss(1, student, recal, caches["k3"].head(), s_batch, caches["k3"].teacher_out(idx), cfg)
    full = stage_loss(1, student, recal, caches["full"].head(), s_batch, caches["full"].teacher_out(idx),
                      replace(cfg, reg=False))
    assert set(cached) == {"ce_main", "kl_main", "ce_reg", "kl_reg", "loss"}
    assert cached["ce_reg"].item() == cached["kl_reg"].item() == 0.0
    torch.testing.assert_close(cached["loss"], full["loss"], rtol=1e-6, atol=0)


def test_answers_bytes_are_the_arithmetic(caches):
    """The stored features and labels of an answers cache: sample_bytes per sample, summed, exactly."""
    for name, k in (("k1", 1), ("k3", 3)):
        c = caches[name]
        tensors = 0
        for f in c.files.paths:
            from safetensors import safe_open
            with safe_open(str(f), framework="pt") as g:
                tensors += sum(g.get_tensor(key).nbytes for key in g.keys())
        expect = 0
        for i in range(len(c)):
            _, _, _, _, Lq, La, _, has = c.where[i]
            expect += sample_bytes(Lq, La, c.meta["d_l"], "float32", store="answers", reg_every=1 if has else 10 ** 9)
        assert tensors == round(expect), name
    full = sample_bytes(20, 4, 8, "bfloat16")
    assert sample_bytes(20, 4, 8, "bfloat16", store="answers") == full + 8  # K=1: the same rows, one more int


def test_store_settings_are_checked(pair, tmp_path):
    teacher, _, samples = pair
    with pytest.raises(ValueError, match="reg_every must be >= 1, and 1 with store='full'"):
        build_cache(teacher, samples[:2], tmp_path, store="full", reg_every=4)
    with pytest.raises(ValueError, match="store must be one of"):
        build_cache(teacher, samples[:2], tmp_path, store="fp8")
