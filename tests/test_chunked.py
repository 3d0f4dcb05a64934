"""The fused, chunked teacher-head loss equals the naive one (values and grad wrt h) and never holds (N, V_l)."""
import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from minigenrecal.chunked import fused_head_loss
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


def _loss_and_grad(h, z_t, labels, head, tau):
    """The naive (CE, KL) and the gradient of their sum."""
    h = h.detach().clone().requires_grad_(True)
    ce, kl = head_losses(h, z_t, labels, head, tau)
    (ce + kl).backward()
    return ce.detach(), kl.detach(), h.grad


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_rows_in_another_dtype_than_the_head():
    """Naive: bf16 rows (FSDP2's / DeepSpeed's bf16 compute) read by an fp32 head: the matmul runs in the head's dtype,
    the gradient comes back in the rows' dtype, and the values equal the fp32 computation on the same bf16 rows."""
    head, h, z_t, labels = _case(seed=2)
    h16 = h.detach().to(torch.bfloat16).requires_grad_(True)
    ce, kl = head_losses(h16, z_t.to(torch.bfloat16), labels, head, 1.5)
    (ce + kl).backward()
    ce0, kl0, g0 = _loss_and_grad(h16.detach().float(), z_t.to(torch.bfloat16).float(), labels, head, 1.5)
    assert h16.grad.dtype == torch.bfloat16
    assert abs(ce.item() - ce0.item()) / ce0.item() <= 1e-5 and abs(kl.item() - kl0.item()) / kl0.item() <= 1e-5
    assert _rel(h16.grad.float(), g0) <= 1e-2  # the gradient rounded once to bf16


def test_no_grad_to_teacher_features():
    head, h, z_t, labels = _case(N=10)
    z = z_t.clone().requires_grad_(True)
    fused_head_loss([h], z, labels, head.weight, None, 1.0, 1.0, 1.0, 4)[0].backward()
    assert z.grad is None and h.grad is not None


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


def test_the_naive_loss_holds_n_by_v():
    """What the fused loss avoids (so `test_fused_memory_bounded` can fail): the naive path saves and creates (N, V)."""
    head, h, z_t, labels = _case(N=64, d=16, V=300)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t), \
            _Biggest() as mode:
        sum(head_losses(h, z_t, labels, head, 1.0)).backward()
    assert max(saved) >= 64 * 300 and mode.biggest >= 64 * 300


# -- the fused loss: loss weights at forward time, one gradient per path, the teacher's logits shared --------------
def _fused_and_naive(paths, tau, w_ce, w_kl, chunk, bias=False, ignore=()):
    """Fused over `paths` (main, regularization) against the naive weighted sum on the rows not ignored."""
    head, _, z_t, labels = _case(bias=bias)
    hs = [h.detach().clone().requires_grad_(True) for h in paths]
    labels = labels.clone()
    labels[list(ignore)] = -100
    loss, parts = fused_head_loss(hs, z_t, labels, head.weight, head.bias, tau, w_ce, w_kl, chunk)
    loss.backward()
    keep = labels != -100
    refs = [h.detach().clone().requires_grad_(True) for h in paths]
    terms = [head_losses(r[keep], z_t[keep], labels[keep], head, tau) for r in refs]
    ref = sum(w_ce * ce + w_kl * kl for ce, kl in terms)
    ref.backward()
    return (loss, parts, [h.grad for h in hs]), (ref.detach(), torch.stack([torch.stack(t) for t in terms]).detach(),
                                                 [r.grad for r in refs])


def _paths(n=2, N=37, d=24, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(N, d, generator=g) * 2 for _ in range(n)]


@pytest.mark.parametrize("chunk", [1, 5, 16, 40])
@pytest.mark.parametrize("tau", [1.0, 2.5, 0.7])
@pytest.mark.parametrize("w_ce,w_kl", [(1.0, 1.0), (0.7, 1.3), (0.0, 1.0), (1.0, 0.0)])
def test_fused_equals_naive(chunk, tau, w_ce, w_kl):
    """fp32: the weighted loss, each path's (CE, KL) and both paths' gradients equal the naive loss's."""
    (loss, parts, grads), (ref, ref_parts, ref_grads) = _fused_and_naive(_paths(), tau, w_ce, w_kl, chunk,
                                                                         bias=chunk == 5)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(parts, ref_parts, rtol=1e-5, atol=0)
    for g, r in zip(grads, ref_grads):
        assert _rel(g, r) <= 1e-5
    assert ref_parts.min() > 0.1 and not parts.requires_grad  # a non-trivial case; the parts are only a record


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_fused_ignores_rows_labelled_minus_100(tau):
    """An ignored row counts in neither term (means over the other rows) and gets exactly zero gradient."""
    ignore = (0, 3, 17, 36)
    (loss, parts, grads), (ref, ref_parts, ref_grads) = _fused_and_naive(_paths(1), tau, 0.6, 1.4, 8, ignore=ignore)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(parts, ref_parts, rtol=1e-5, atol=0)
    keep = torch.ones(37, dtype=torch.bool)
    keep[list(ignore)] = False
    assert grads[0][~keep].abs().max() == 0
    assert _rel(grads[0][keep], ref_grads[0][keep]) <= 1e-5


def test_fused_rows_in_another_dtype_than_the_head():
    """bf16 rows read by an fp32 head: gradients come back in bf16, values equal the fp32 computation."""
    head, h, z_t, labels = _case(seed=2)
    h16 = h.detach().to(torch.bfloat16).requires_grad_(True)
    loss, _ = fused_head_loss([h16], z_t, labels, head.weight, None, 1.5, 1.0, 1.0, 8)
    loss.backward()
    ce0, kl0, g0 = _loss_and_grad(h16.detach().float(), z_t, labels, head, 1.5)
    assert h16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ce0 + kl0, rtol=1e-5, atol=0)
    assert _rel(h16.grad.float(), g0) <= 1e-2  # the gradient rounded once to bf16


def test_fused_refuses_a_trainable_head_and_bad_shapes():
    head, h, z_t, labels = _case(N=10)
    with pytest.raises(ValueError, match="shape mismatch in path 1"):
        fused_head_loss([h, h[:9]], z_t, labels, head.weight, None)
    head.requires_grad_(True)
    with pytest.raises(ValueError, match="frozen head"):
        fused_head_loss([h], z_t, labels, head.weight, None)


class _HeadOps(TorchDispatchMode):
    """Counts the matmuls that read the head (an operand of V x d elements) and the softmax normalisations."""

    def __init__(self, Vd):
        super().__init__()
        self.Vd, self.matmuls, self.softmaxes = Vd, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "matmul") and any(isinstance(a, torch.Tensor) and a.numel() == self.Vd for a in args):
            self.matmuls += 1
        self.softmaxes += name in ("logsumexp", "_log_softmax", "_softmax")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("tau,paths,matmuls,softmaxes", [(1.0, 1, 3, 2), (1.0, 2, 5, 3), (2.0, 2, 5, 5)])
def test_fused_runs_three_head_matmuls_per_path_and_one_softmax_at_tau_1(tau, paths, matmuls, softmaxes):
    """Per chunk, forward and backward together: the teacher's logits once for all paths, then one logits matmul and
    one gradient matmul per path; one softmax for the teacher and one per path at tau = 1 (a second per path at
    another tau)."""
    head, _, z_t, labels = _case(N=16, d=8, V=50)
    hs = [h.requires_grad_(True) for h in _paths(paths, N=16, d=8)]
    with _HeadOps(50 * 8) as ops:
        fused_head_loss(hs, z_t, labels, head.weight, None, tau, 0.5, 2.0, 8)[0].backward()
    assert (ops.matmuls, ops.softmaxes) == (2 * matmuls, 2 * softmaxes)  # 2 chunks


def test_fused_memory_bounded():
    """Nothing saved beyond one (N, d) gradient per path; no op output over (chunk, V)."""
    head, _, z_t, labels = _case(N=64, d=16, V=300)
    hs = [h.requires_grad_(True) for h in _paths(2, N=64, d=16)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t), \
            _Biggest() as mode:
        fused_head_loss(hs, z_t, labels, head.weight, None, 1.0, 1.0, 1.0, 16)[0].backward()
    assert max(saved) <= 64 * 16 and mode.biggest <= 16 * 300


def test_fused_kl_is_precise_when_the_paths_nearly_agree():
    """KL near 0 (the Recalibrator close to the teacher, late in training): the fused record stays within 3e-4 of a
    float64 reference at KL ~ 4e-4 (1.2e-4 measured; a difference of two entropies, computed first, lost 8e-4)."""
    g = torch.Generator().manual_seed(0)
    head = nn.Linear(64, 2000, bias=False).requires_grad_(False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(2000, 64, generator=g) / 8)
    z = torch.randn(64, 64, generator=g) * 3
    h, y = z + 0.03 * torch.randn(64, 64, generator=g), torch.randint(0, 2000, (64,), generator=g)
    _, parts = fused_head_loss([h], z, y, head.weight, None, 1.0, 1.0, 1.0, 16)
    ref = head_losses(h.double(), z.double(), y, head.double(), 1.0)[1]
    assert 1e-4 < ref < 1e-3 and abs(parts[0, 1].item() / ref.item() - 1) <= 3e-4
