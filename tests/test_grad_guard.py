"""The non-finite guard and gradient clipping see the gradient under every backend: under DeepSpeed ZeRO-3
`p.grad` is None (each rank holds a partition in the optimizer), so the guard reads the partitions, and DeepSpeed
clips inside its own step at the stage's `max_grad_norm`."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minigenrecal.loop import all_finite, clip_gradients, grad_norm

ROOT = Path(__file__).resolve().parent.parent

PROBE = r'''
import copy, os, sys
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                  DS_ACCELERATOR="cpu", ACCELERATE_DEEPSPEED_ZERO_STAGE="3")
import torch
from minigenrecal.loop import all_finite, clip_gradients, grad_norm, scale_gradients
from minigenrecal.scale.backends import DeepSpeedBackend

b = DeepSpeedBackend()
torch.manual_seed(0)
ref = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
module = copy.deepcopy(ref)
# a large eps makes AdamW's first update nearly linear in the gradient, so clipping shows in the weights
engine, opt, _ = b.prepare_module(module, torch.optim.AdamW(module.parameters(), lr=0.1, eps=1e3))
unclipped = copy.deepcopy(ref)
ref_opt, un_opt = (torch.optim.AdamW(m.parameters(), lr=0.1, eps=1e3) for m in (ref, unclipped))
b.set_grad_accum(1)
x = torch.randn(5, 4)


def backward(model, kind):
    y = model(x)
    # "inf": a finite loss (0) whose gradient is not finite: d sqrt(|u|) / du at u = 0
    loss = (y - y.detach()).abs().sqrt().sum() if kind == "inf" else y.pow(2).sum()
    return loss


with b.accumulate(engine):
    b.backward(backward(engine, "ok"))
backward(ref, "ok").backward()
backward(unclipped, "ok").backward()
un_opt.step()
ref_norm = torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()])
print("grads_none", all(p.grad is None for p in engine.module.parameters()))
torch.testing.assert_close(grad_norm(b, engine), ref_norm)
scale_gradients(b, engine, torch.tensor(2.0))  # the token normalisation's scaling reaches the partitions
torch.testing.assert_close(grad_norm(b, engine), 2 * ref_norm)
scale_gradients(b, engine, torch.tensor(0.5))
print("scaled", True)
print("finite", all_finite(b, torch.tensor(True), engine))
clip_gradients(b, engine, float(ref_norm) / 4)
opt.step()
torch.nn.utils.clip_grad_norm_(list(ref.parameters()), float(ref_norm) / 4)
ref_opt.step()
full = b.full_state_dict(engine)
for k, v in ref.state_dict().items():
    torch.testing.assert_close(full[k], v)
    assert not torch.allclose(full[k], unclipped.state_dict()[k])
print("clipped_step_equal", True)
opt.zero_grad()
with b.accumulate(engine):
    loss = backward(engine, "inf")
    b.backward(loss)
print("loss_finite", bool(torch.isfinite(loss)), "guard", all_finite(b, torch.isfinite(loss), engine))
b.close()
'''


def test_zero3_guard_sees_partitioned_gradients_and_deepspeed_clips():
    pytest.importorskip("deepspeed")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, "-c", PROBE, "29571"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "scaled True" in r.stdout
    assert "grads_none True" in r.stdout  # what a guard reading p.grad would see: nothing
    assert "finite True" in r.stdout and "clipped_step_equal True" in r.stdout
    assert "loss_finite True guard False" in r.stdout  # a finite loss with a non-finite gradient is caught


class _Acc:
    """The part of a one-process accelerator the guard uses."""
    device, num_processes = torch.device("cpu"), 1


def test_clip_gradients_scales_to_the_limit_and_zero_is_off():
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 3)
    m(torch.randn(5, 4)).pow(2).sum().backward()
    before = [p.grad.clone() for p in m.parameters()]
    norm = grad_norm(_Acc(), m)
    clip_gradients(_Acc(), m, 0.0)
    assert all(torch.equal(a, p.grad) for a, p in zip(before, m.parameters()))
    clip_gradients(_Acc(), m, float(norm) / 2)
    torch.testing.assert_close(grad_norm(_Acc(), m), norm / 2, rtol=1e-5, atol=0)
    for a, p in zip(before, m.parameters()):
        torch.testing.assert_close(p.grad, a * (float(norm) / 2) / (float(norm) + 1e-6))
    m.weight.grad[0, 0] = float("nan")
    assert not all_finite(_Acc(), torch.tensor(True), m)


def test_loss_is_normalised_by_the_windows_answer_tokens(tiny_pair):
    """Two micro-batches of one sample each (answers of different lengths) give the gradient of the token mean over
    both answers, i.e. of the same two samples as one batch, not the mean of the two per-sample means."""
    from minigenrecal.data.synthetic import make_split
    from minigenrecal.loop import Engine, PairData, train_stage
    from minigenrecal.stages import StageConfig
    _, make_student = tiny_pair
    samples = [s for s in make_split(0, "train", 40)]
    student = make_student(0)
    encs = [student.encode(s) for s in samples]
    a, b = next((x, y) for x in encs for y in encs if x.a_len != y.a_len)
    data = PairData([a, b])
    cfg = StageConfig(steps=1, batch_size=1, grad_accum=2, lr=1e-3)
    engine = Engine(student, None, None, {3: cfg})
    seen = {}
    step = engine.opt.step

    def record():
        seen.update({n: p.grad.clone() for n, p in student.model.named_parameters() if p.grad is not None})
        step()
    engine.opt.step = record
    ref = make_student(0)
    ref.model.train()
    batch = ref.collate([a, b])
    ref.student_ce(ref.body(batch), batch).backward()  # one batch: the mean over all its answer tokens
    train_stage(3, student, data, cfg, engine=engine, progress=False)
    grads = dict(ref.model.named_parameters())
    assert len(seen) > 10 and all("vision_model" not in n for n in seen)  # stage 3 trains the LLM
    for n, g in seen.items():
        torch.testing.assert_close(g, grads[n].grad, rtol=1e-4, atol=1e-7)


def test_zero3_config_is_sized_from_the_hidden_size(monkeypatch):
    """ZeRO-3's buckets from d (TRL's prepare_deepspeed rule), overlapped communication, two 72B layers live."""
    from minigenrecal.scale import backends
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    t = backends.zero3_tuning(3, 8192)
    assert t["reduce_bucket_size"] == 8192 ** 2 and t["stage3_prefetch_bucket_size"] == int(0.9 * 8192 ** 2)
    assert t["stage3_param_persistence_threshold"] == 81920 and t["overlap_comm"] is True
    layer_72b = 8192 * (8192 + 2 * 1024 + 8192) + 3 * 8192 * 29568  # q, k, v, o (8 KV heads of 128) + gated MLP
    assert t["stage3_max_live_parameters"] >= 2 * layer_72b > 10 ** 9
    assert backends.zero3_tuning(2, 8192) == {} and backends.zero3_tuning(3, None) == {}
