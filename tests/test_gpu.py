"""CUDA checks (skipped without a GPU): stage 1 and 2 steps of the tiny pair in bf16 autocast; chunked == naive."""
import pytest
import torch
import torch.nn as nn

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("stage", [1, 2])
def test_tiny_pair_stage_step_cuda_bf16(stage):
    from minigenrecal.data import make_split
    from minigenrecal.recalibrator import Recalibrator
    from minigenrecal.stages import PairData, StageConfig, get_accelerator, train_stage
    from minigenrecal.tiny import build_student, build_teacher
    from minigenrecal.vlm import VLMView
    acc = get_accelerator()
    assert acc.device.type == "cuda" and acc.mixed_precision == "bf16"
    (tm, tp), (sm, sp) = build_teacher(1), build_student(0)
    teacher, student = VLMView(tm.requires_grad_(False), tp, name="t"), VLMView(sm, sp, name="s")
    samples = make_split(0, "train", 8)
    data = PairData([student.encode(s) for s in samples], [teacher.encode(s) for s in samples])
    torch.manual_seed(0)
    recal = Recalibrator(teacher.d, student.text_config)
    before = [p.detach().clone() for p in recal.parameters()]
    hist = train_stage(stage, student, data, StageConfig(steps=2, batch_size=4, lr=1e-3, chunk_size=5),
                       teacher=teacher, recal=recal, progress=False)
    for h in hist:
        for k in ("loss", "ce_main", "kl_main", "ce_reg", "kl_reg"):
            assert torch.isfinite(torch.tensor(h[k])), (k, h)
    assert next(recal.parameters()).device.type == "cuda"
    assert all(not torch.equal(b.cuda(), p) for b, p in zip(before, recal.parameters()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_equals_naive_cuda(dtype):
    from minigenrecal.losses import head_losses
    g = torch.Generator().manual_seed(0)
    N, d, V = 300, 256, 5000
    head = nn.Linear(d, V, bias=False).cuda().to(dtype).requires_grad_(False)
    with torch.no_grad():
        head.weight.copy_((torch.randn(V, d, generator=g) * d ** -0.5).to(dtype))
    z_t, labels = torch.randn(N, d, generator=g).cuda(), torch.randint(0, V, (N,), generator=g).cuda()
    h0 = torch.randn(N, d, generator=g).cuda()
    res = []
    for chunk in (None, 64, 77):
        h = h0.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            ce, kl = head_losses(h, z_t, labels, head, 1.5, chunk)
        (ce + 0.5 * kl).backward()
        res.append((ce.detach(), kl.detach(), h.grad))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for ce, kl, gr in res[1:]:
        assert abs(ce - res[0][0]) / res[0][0] <= tol and abs(kl - res[0][1]) / res[0][1] <= tol
        assert ((gr - res[0][2]).norm() / res[0][2].norm()).item() <= tol
