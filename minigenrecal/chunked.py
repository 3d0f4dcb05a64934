"""The memory-bounded teacher-head loss: w_ce CE + w_kl KL through the frozen head, chunk by chunk over tokens.

The naive path (`losses.head_losses`) materialises (N, V_l) fp32 logits for the Recalibrator and for the teacher,
plus their softmaxes and the autograd copies: at V_l = 152,064 and N = 8192 that is tens of GiB. Here each chunk of
`chunk_size` rows computes its logits, both losses and the analytic gradient of their weighted sum wrt h, then drops
the logits. Only one (N, d_l) gradient per path survives until backward.

Gradients (rows r, logits s = h W^T + b, teacher logits t = z_t W^T + b, p = softmax):
    CE = mean_r [logsumexp(s_r) - s_r[y_r]]                 dCE/ds_r = (p(s_r) - onehot(y_r)) / N
    KL = tau^2 mean_r KL(p(t_r/tau) || p(s_r/tau))          dKL/ds_r = tau (p(s_r/tau) - p(t_r/tau)) / N
    dL/dh_r = (w_ce dCE/ds_r + w_kl dKL/ds_r) @ W            (the head is frozen: no gradient to W or b)
"""
from __future__ import annotations

import contextlib

import torch


IGNORE = -100  # a label that marks a row out of both terms (F.cross_entropy's ignore_index)


def rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_v a[r, v] b[r, v] for each row r, as one batched matmul (no (c, V) temporary): (c,)."""
    return (a.unsqueeze(1) @ b.unsqueeze(2)).view(-1)


class _FusedHeadLoss(torch.autograd.Function):
    """forward -> (loss, parts): loss = sum over paths of w_ce CE + w_kl KL, the only differentiable output; parts
    (P, 2) holds each path's (CE, KL) for the record. Stores one (N, d_l) fp32 gradient per path."""

    @staticmethod
    def forward(ctx, z_t, labels, weight, bias, tau, w_ce, w_kl, chunk_size, *hs):
        W = weight  # (V_l, d_l); matmuls in W's dtype, everything after them in fp32

        def logits(x):  # (c, d_l) -> (c, V_l) fp32
            out = (x.to(W.dtype) @ W.T).float()
            return out if bias is None else out.add_(bias.float())

        valid = labels != IGNORE  # (N,)
        y = labels.where(valid, 0)  # (N,) ignored rows read any label; their terms and gradients are zeroed
        parts = torch.zeros(len(hs), 2, device=z_t.device)  # per path: the sums of CE rows and of KL rows
        grads = [torch.empty(h.shape, device=h.device) for h in hs]  # (N, d_l) each: d(sum of row losses)/dh
        for i in range(0, z_t.shape[0], chunk_size):
            rows, yc, vc = slice(i, i + chunk_size), y[i: i + chunk_size], valid[i: i + chunk_size].float()
            t = logits(z_t[rows])  # (c, V_l) the teacher's logits: once per chunk, shared by every path
            t = t.div_(tau) if tau != 1.0 else t
            log_pt = t.sub_(t.logsumexp(-1, keepdim=True))  # (c, V_l) log p_t, in place
            p_t = log_pt.exp()  # (c, V_l)
            for k, h in enumerate(hs):
                s = logits(h[rows])  # (c, V_l)
                lse = s.logsumexp(-1, keepdim=True)  # (c, 1) the one softmax normaliser at tau = 1
                ce = lse.squeeze(1) - s.gather(1, yc[:, None]).squeeze(1)  # (c,) -log p[y]
                log_p = s.sub_(lse)  # (c, V_l) log softmax(s), in place
                log_ptau = log_p if tau == 1.0 else (log_p / tau).log_softmax(-1)  # at tau = 1 CE and KL share it
                kl = rowdot(p_t, log_pt - log_ptau)  # (c,) KL(p_t || p_tau) (the difference first: no cancellation)
                parts[k] += torch.stack([ce, kl]) @ vc
                # dL/ds = w_ce (p - onehot(y)) + w_kl tau (p_tau - p_t), in place on the chunk's buffers
                p_tau = None if tau == 1.0 else log_ptau.exp_()
                p = log_p.exp_()
                g = p.mul_(w_ce + w_kl) if tau == 1.0 else p.mul_(w_ce).add_(p_tau, alpha=w_kl * tau)
                g.sub_(p_t, alpha=w_kl * tau)
                g[torch.arange(len(yc), device=g.device), yc] -= w_ce
                grads[k][rows] = (g.to(W.dtype) @ W).float() * vc[:, None]  # the one gradient matmul of the path
        n = valid.sum().clamp_min(1)
        parts = parts / n * torch.tensor([1.0, tau ** 2], device=parts.device)  # means; KL scaled by tau^2
        loss = parts @ torch.tensor([w_ce, w_kl], device=parts.device)  # (P,)
        ctx.save_for_backward(n, *grads)
        ctx.mark_non_differentiable(parts)
        ctx.h_dtypes = [h.dtype for h in hs]
        return loss.sum(), parts

    @staticmethod
    def backward(ctx, d_loss, d_parts):
        n, *grads = ctx.saved_tensors
        return (None,) * 8 + tuple((g * (d_loss / n)).to(dt) for g, dt in zip(grads, ctx.h_dtypes))


def fused_head_loss(hs: list[torch.Tensor], z_t: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None, tau: float = 1.0, w_ce: float = 1.0, w_kl: float = 1.0,
                    chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, parts) for the paths hs (each (N, d_l), e.g. [main, regularization]) read by the frozen head against one
    teacher (z_t (N, d_l), labels (N,)): loss = sum_paths w_ce CE + w_kl KL, equal to the weighted `head_losses`;
    parts (P, 2) the detached (CE, KL) of each path. Rows labelled -100 count in neither term (both are means over
    the other rows). Per chunk: the teacher's logits and softmax once for all paths, then per path one logits
    matmul, one softmax at tau = 1, and one matmul for the weighted gradient. The largest tensors are (chunk, V_l)."""
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("fused_head_loss needs a frozen head (weight.requires_grad=False): it computes no "
                         "gradient for the head; freeze it with head.requires_grad_(False)")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    for k, h in enumerate(hs):
        if h.shape != z_t.shape or h.shape[0] != labels.shape[0]:
            raise ValueError(f"shape mismatch in path {k}: h {tuple(h.shape)}, z_t {tuple(z_t.shape)}, "
                             f"labels {tuple(labels.shape)}")
    dev = z_t.device.type
    with torch.autocast(dev, enabled=False) if torch.amp.is_autocast_available(dev) else contextlib.nullcontext():
        return _FusedHeadLoss.apply(z_t.detach(), labels, weight.detach(), None if bias is None else bias.detach(),
                                    float(tau), float(w_ce), float(w_kl), int(chunk_size), *hs)
