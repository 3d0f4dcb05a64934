"""CUDA checks (skipped without a GPU): stage 1 and 2 steps of a tiny pair in bf16 autocast; chunked == naive.

The checks are plain functions (`check_*`, listed in CASES) so that `benchmarks/gpu_check.py` can run them where
pytest is not installed, and on CPU for its dry run. Tiny pairs: the shipped one (Llava <- Idefics3) and
Llava <- Qwen2-VL. With transformers 5.17 and no torchvision, `Idefics3ImageProcessorPil` refuses to build; the
Idefics3 case then skips with that message, and the Qwen2-VL case (whose PIL processor needs no torchvision) still
runs the same stage steps.
"""
import torch
import torch.nn as nn

try:
    import pytest
except ImportError:  # benchmarks/gpu_check.py runs CASES directly
    pytest = None

STUDENT_FAMILIES = ("idefics3", "qwen2vl")


class CaseSkipped(Exception):
    """A check that cannot run in this environment (the message says why)."""


def tiny_pair(student_family: str):
    """(teacher view, student view): the tiny Llava teacher (random init) and a tiny student of `student_family`."""
    from minigenrecal.models.tiny import build_student, build_teacher
    from minigenrecal.models.families import build_tiny_vlm
    from minigenrecal.models.vlm import VLMView
    try:
        sm, sp = build_student(0) if student_family == "idefics3" else build_tiny_vlm(student_family, seed=0, d=64)
    except ImportError as e:  # e.g. Idefics3ImageProcessorPil without torchvision on transformers 5.17
        import transformers
        raise CaseSkipped(f"the {student_family} student cannot be built with transformers {transformers.__version__} "
                          f"here: {' '.join(str(e).split())[:240]}") from e
    tm, tp = build_teacher(1)
    return VLMView(tm.requires_grad_(False), tp, name="t"), VLMView(sm, sp, name="s")


def check_stage_step(stage: int, student_family: str = "idefics3", device: str = "cuda"):
    from minigenrecal.data.synthetic import make_split
    from minigenrecal.recalibrator import Recalibrator
    from minigenrecal.loop import PairData, get_accelerator, train_stage
    from minigenrecal.stages import StageConfig
    teacher, student = tiny_pair(student_family)
    acc = get_accelerator()
    assert acc.device.type == device
    if device == "cuda":
        assert acc.mixed_precision == "bf16"
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
    assert next(recal.parameters()).device.type == device
    assert all(not torch.equal(b.to(p.device), p) for b, p in zip(before, recal.parameters()))


def check_chunked_equals_naive(dtype: torch.dtype, device: str = "cuda"):
    """The fused, chunked teacher-head loss equals the naive one (values and the gradient wrt h)."""
    from minigenrecal.chunked import fused_head_loss
    from minigenrecal.losses import head_losses
    g = torch.Generator().manual_seed(0)
    N, d, V = 300, 256, 5000
    head = nn.Linear(d, V, bias=False).to(device, dtype).requires_grad_(False)
    with torch.no_grad():
        head.weight.copy_((torch.randn(V, d, generator=g) * d ** -0.5).to(dtype))
    z_t = torch.randn(N, d, generator=g).to(device)
    labels = torch.randint(0, V, (N,), generator=g).to(device)
    h0 = torch.randn(N, d, generator=g).to(device)
    res = []
    h = h0.clone().requires_grad_(True)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        ce, kl = head_losses(h, z_t, labels, head, 1.5)
    (ce + 0.5 * kl).backward()
    res.append((ce.detach(), kl.detach(), h.grad))
    for chunk in (64, 77):  # the fused loss: the same weighted sum, its (CE, KL) kept as a record
        h = h0.clone().requires_grad_(True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss, parts = fused_head_loss([h], z_t, labels, head.weight, None, 1.5, 1.0, 0.5, chunk)
        loss.backward()
        res.append((parts[0, 0], parts[0, 1], h.grad))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for ce, kl, gr in res[1:]:
        assert abs(ce - res[0][0]) / res[0][0] <= tol and abs(kl - res[0][1]) / res[0][1] <= tol
        assert ((gr - res[0][2]).norm() / res[0][2].norm()).item() <= tol


# (name, function, keyword arguments): what gpu_check.py runs without pytest
CASES = ([(f"stage_step[{fam}-{stage}]", check_stage_step, dict(stage=stage, student_family=fam))
          for fam in STUDENT_FAMILIES for stage in (1, 2)]
         + [(f"chunked_equals_naive[{str(dt).replace('torch.', '')}]", check_chunked_equals_naive, dict(dtype=dt))
            for dt in (torch.float32, torch.bfloat16)])

if pytest is not None:
    pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

    def _run(fn, **kw):
        try:
            fn(**kw)
        except CaseSkipped as e:
            pytest.skip(str(e))

    @pytest.mark.parametrize("student_family", STUDENT_FAMILIES)
    @pytest.mark.parametrize("stage", [1, 2])
    def test_tiny_pair_stage_step_cuda_bf16(stage, student_family):
        _run(check_stage_step, stage=stage, student_family=student_family)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
    def test_chunked_equals_naive_cuda(dtype):
        _run(check_chunked_equals_naive, dtype=dtype)
