"""Memory-bounded teacher-head losses: CE + KL through the frozen head, chunk by chunk over tokens.

The naive path materialises (N, V_l) fp32 logits for the Recalibrator and for the teacher, plus their
softmaxes and the autograd copies: at V_l = 152,064 and N = 8192 that is tens of GiB. Here each chunk of
`chunk_size` rows computes its logits, both losses and both analytic gradients wrt h, then drops the logits.
Only the two (N, d_l) gradients survive until backward.

Gradients (rows r, logits s = h W^T + b, teacher logits t = z_t W^T + b, p = softmax):
    CE = mean_r [logsumexp(s_r) - s_r[y_r]]                 dCE/ds_r = (p(s_r) - onehot(y_r)) / N
    KL = tau^2 mean_r KL(p(t_r/tau) || p(s_r/tau))          dKL/ds_r = tau (p(s_r/tau) - p(t_r/tau)) / N
    dL/dh_r = dL/ds_r @ W                                    (the head is frozen: no gradient to W or b)
"""
from __future__ import annotations

import torch


class _ChunkedHeadLosses(torch.autograd.Function):
    """forward -> (ce, kl) scalars; stores only dCE/dh and dKL/dh, each (N, d_l) fp32."""

    @staticmethod
    def forward(ctx, h, z_t, labels, weight, bias, tau, chunk_size):
        N = h.shape[0]
        W = weight  # (V_l, d_l), any dtype; matmuls run in W's dtype, everything after them in fp32
        ce_sum = torch.zeros((), device=h.device, dtype=torch.float32)
        kl_sum = torch.zeros((), device=h.device, dtype=torch.float32)
        g_ce = torch.zeros(h.shape, device=h.device, dtype=torch.float32)  # (N, d_l)
        g_kl = torch.zeros(h.shape, device=h.device, dtype=torch.float32)  # (N, d_l)
        for i in range(0, N, chunk_size):
            hc, zc, yc = h[i: i + chunk_size], z_t[i: i + chunk_size], labels[i: i + chunk_size]
            s = (hc.to(W.dtype) @ W.T).float()  # (c, V_l) Recalibrator logits
            t = (zc.to(W.dtype) @ W.T).float()  # (c, V_l) teacher logits
            if bias is not None:
                s += bias.float()
                t += bias.float()
            # CE and its gradient: softmax(s) - onehot(y)
            lse = torch.logsumexp(s, -1)  # (c,)
            ce_sum += (lse - s.gather(1, yc[:, None]).squeeze(1)).sum()
            g = torch.sub(s, lse[:, None]).exp_()  # (c, V_l) softmax(s)
            g[torch.arange(len(yc), device=g.device), yc] -= 1.0
            g_ce[i: i + chunk_size] = (g.to(W.dtype) @ W).float() / N
            # KL at temperature tau: log p_t - log p_s, in place on s and t
            s.div_(tau)
            t.div_(tau)
            s.sub_(torch.logsumexp(s, -1, keepdim=True))  # log p_s
            t.sub_(torch.logsumexp(t, -1, keepdim=True))  # log p_t
            torch.sub(t, s, out=g)  # log p_t - log p_s
            t.exp_()  # p_t
            kl_sum += (g.mul_(t)).sum()
            s.exp_().sub_(t).mul_(tau)  # tau (p_s - p_t): d(tau^2 KL_r)/d s_r
            g_kl[i: i + chunk_size] = (s.to(W.dtype) @ W).float() / N
            del s, t, g
        ctx.save_for_backward(g_ce, g_kl)
        ctx.h_dtype = h.dtype
        return ce_sum / N, kl_sum * tau ** 2 / N

    @staticmethod
    def backward(ctx, d_ce, d_kl):
        g_ce, g_kl = ctx.saved_tensors
        grad_h = (g_ce * d_ce + g_kl * d_kl).to(ctx.h_dtype)
        return grad_h, None, None, None, None, None, None


def chunked_head_losses(h: torch.Tensor, z_t: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor | None, tau: float = 1.0, chunk_size: int = 1024
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE, KL) of h (N, d_l) read by the frozen head (weight (V_l, d_l), bias), equal to `losses.head_losses`.

    The teacher's logits come from z_t (N, d_l) without gradient. Gradients flow to h only; no (N, V_l) tensor
    is ever allocated, the largest is (chunk_size, V_l) fp32 (three of them at once).
    """
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("chunked_head_losses needs a frozen head (weight.requires_grad=False): it computes no "
                         "gradient for the head; freeze it with head.requires_grad_(False)")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if h.shape != z_t.shape or h.shape[0] != labels.shape[0]:
        raise ValueError(f"shape mismatch: h {tuple(h.shape)}, z_t {tuple(z_t.shape)}, labels {tuple(labels.shape)}")
    with torch.autocast(h.device.type, enabled=False):  # a head still inside a sharded teacher: scale.backends.gathered
        return _ChunkedHeadLosses.apply(h, z_t.detach(), labels, weight.detach(),
                                        None if bias is None else bias.detach(), float(tau), int(chunk_size))
