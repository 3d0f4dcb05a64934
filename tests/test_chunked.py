"""The chunked teacher-head losses equal the unchunked ones (values and grad wrt h) and never hold (N, V_l)."""
import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from minigenrecal.chunked import chunked_head_losses
from minigenrecal.losses import head_losses

torch.set_num_threads(1)


def _case(N=37, d=24, V=101, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(d, V, bias=bias)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, d, generator=g) * 0.3)
        if bias:
            head.bias.copy_(torch.randn(V, generator=g))
    head.requires_grad_(False)
    h = (torch.randn(N, d, generator=g) * 2).requires_grad_(True)
    z_t = torch.randn(N, d, generator=g) * 2
    labels = torch.randint(0, V, (N,), generator=g)
    return head, h, z_t, labels


def _loss_and_grad(h, z_t, labels, head, tau, chunk, w_ce=1.0, w_kl=1.0):
    h = h.detach().clone().requires_grad_(True)
    ce, kl = head_losses(h, z_t, labels, head, tau, chunk)
    (w_ce * ce + w_kl * kl).backward()
    return ce.detach(), kl.detach(), h.grad


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("chunk", [1, 5, 8, 16, 36])
@pytest.mark.parametrize("tau", [1.0, 2.5, 0.7])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_equals_unchunked(chunk, tau, bias):
    head, h, z_t, labels = _case(bias=bias)
    ce0, kl0, g0 = _loss_and_grad(h, z_t, labels, head, tau, None, 0.7, 1.3)
    ce1, kl1, g1 = _loss_and_grad(h, z_t, labels, head, tau, chunk, 0.7, 1.3)
    assert abs(ce1 - ce0) / ce0 <= 1e-5
    assert abs(kl1 - kl0) / kl0 <= 1e-5
    assert _rel(g1, g0) <= 1e-5
    assert kl0 > 0.1 and ce0 > 1.0  # a non-trivial case


@pytest.mark.parametrize("chunk", [None, 8])
def test_rows_in_another_dtype_than_the_head(chunk):
    """bf16 rows (FSDP2's / DeepSpeed's bf16 compute) read by an fp32 head: the matmul runs in the head's dtype, the
    gradient comes back in the rows' dtype, and the values equal the fp32 computation on the same bf16 rows."""
    head, h, z_t, labels = _case(seed=2)
    h16 = h.detach().to(torch.bfloat16).requires_grad_(True)
    ce, kl = head_losses(h16, z_t.to(torch.bfloat16), labels, head, 1.5, chunk)
    (ce + kl).backward()
    ce0, kl0, g0 = _loss_and_grad(h16.detach().float(), z_t.to(torch.bfloat16).float(), labels, head, 1.5, None)
    assert h16.grad.dtype == torch.bfloat16
    assert abs(ce.item() - ce0.item()) / ce0.item() <= 1e-5 and abs(kl.item() - kl0.item()) / kl0.item() <= 1e-5
    assert _rel(h16.grad.float(), g0) <= 1e-2  # the gradient rounded once to bf16


def test_each_output_grad_separately():
    """CE alone and KL alone give the right gradient (backward gets one output's grad as zero)."""
    head, h, z_t, labels = _case(N=20, seed=1)
    for which in (0, 1):
        hs = [h.detach().clone().requires_grad_(True) for _ in range(2)]
        head_losses(hs[0], z_t, labels, head, 2.0, None)[which].backward()
        head_losses(hs[1], z_t, labels, head, 2.0, 7)[which].backward()
        assert _rel(hs[1].grad, hs[0].grad) <= 1e-5


def test_no_grad_to_teacher_features_and_frozen_head_required():
    head, h, z_t, labels = _case(N=10)
    z = z_t.clone().requires_grad_(True)
    ce, kl = chunked_head_losses(h, z, labels, head.weight, None, 1.0, 4)
    (ce + kl).backward()
    assert z.grad is None and h.grad is not None
    head.requires_grad_(True)
    with pytest.raises(ValueError, match="frozen head"):
        chunked_head_losses(h, z_t, labels, head.weight, None, 1.0, 4)


class _Biggest(TorchDispatchMode):
    """Records the largest tensor any op produced while active."""

    def __init__(self):
        super().__init__()
        self.biggest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(o, torch.Tensor):
                self.biggest = max(self.biggest, o.numel())
        return out


def _saved_and_biggest(chunk):
    head, h, z_t, labels = _case(N=64, d=16, V=300)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t), \
            _Biggest() as mode:
        ce, kl = head_losses(h, z_t, labels, head, 1.0, chunk)
        (ce + kl).backward()
    return max(saved), mode.biggest, 64 * 300, 64 * 16


def test_memory_bounded():
    """Naive: (N, V) tensors are saved and created. Chunked: nothing saved beyond (N, d); nothing over (c, V)."""
    saved, biggest, NV, Nd = _saved_and_biggest(None)
    assert saved >= NV and biggest >= NV  # the check can fail: the naive path does hold (N, V)
    saved, biggest, NV, Nd = _saved_and_biggest(16)
    assert saved <= Nd
    assert biggest <= 16 * 300
