"""The Recalibrator: Proj-pre, N causal decoder blocks shaped like the student's, Proj-post, LayerNorm.

It has no embedding table and no LM head of its own: its output is read by the teacher's frozen head.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def text_dims(cfg) -> dict:
    """The student decoder's dimensions, read from a transformers text config."""
    d = cfg.hidden_size
    h = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or d // h
    rope = getattr(cfg, "rope_parameters", None) or {}
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    theta = theta or getattr(cfg, "rope_theta", None) or 10000.0
    return dict(d=d, n_heads=h, n_kv=getattr(cfg, "num_key_value_heads", None) or h, head_dim=head_dim,
                ffn=cfg.intermediate_size, eps=getattr(cfg, "rms_norm_eps", 1e-6), theta=float(theta),
                qkv_bias=bool(getattr(cfg, "attention_bias", False) or cfg.model_type in ("qwen2", "qwen2_vl_text", "qwen2_vl")))


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """1-D rotary embedding (rotate-half convention) at integer positions `pos` (T,)."""
    hd = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, device=x.device, dtype=torch.float32) / hd)
    ang = pos.float()[:, None] * inv[None]  # (T, hd/2)
    cos, sin = torch.cat([ang, ang], -1).cos().to(x.dtype), torch.cat([ang, ang], -1).sin().to(x.dtype)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Block(nn.Module):
    """Pre-norm causal decoder block: RMSNorm -> GQA attention with RoPE -> RMSNorm -> gated-SiLU FFN."""

    def __init__(self, d, n_heads, n_kv, head_dim, ffn, eps, theta, qkv_bias):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim, self.theta = n_heads, n_kv, head_dim, theta
        self.norm1, self.norm2 = RMSNorm(d, eps), RMSNorm(d, eps)
        self.q = nn.Linear(d, n_heads * head_dim, bias=qkv_bias)
        self.k = nn.Linear(d, n_kv * head_dim, bias=qkv_bias)
        self.v = nn.Linear(d, n_kv * head_dim, bias=qkv_bias)
        self.o = nn.Linear(n_heads * head_dim, d, bias=False)
        self.gate, self.up = nn.Linear(d, ffn, bias=False), nn.Linear(d, ffn, bias=False)
        self.down = nn.Linear(ffn, d, bias=False)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        h = self.norm1(x)
        q = self.q(h).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k(h).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v(h).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = rope(q, pos, self.theta), rope(k, pos, self.theta)
        rep = self.n_heads // self.n_kv
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hd)
        x = x + self.o(a.transpose(1, 2).reshape(B, T, -1))
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Recalibrator(nn.Module):
    """Proj-pre (d_l->d_s), `depth` student-shaped blocks with NPE, Proj-post (d_s->d_l), LayerNorm(d_l)."""

    def __init__(self, d_l: int, student_text_config, depth: int = 2):
        super().__init__()
        dims = text_dims(student_text_config)
        d_s = dims["d"]
        self.d_l, self.d_s = d_l, d_s
        self.proj_pre = nn.Linear(d_l, d_s)
        self.blocks = nn.ModuleList(Block(**dims) for _ in range(depth))
        self.proj_post = nn.Linear(d_s, d_l)
        self.norm = nn.LayerNorm(d_l)

    def concat(self, z_q: list[torch.Tensor], z_a: list[torch.Tensor]) -> torch.Tensor:
        """Per sample [z_q (Lq, d_s), proj_pre(z_a) (La-1, d_l->d_s)], right-padded: (B, T, d_s)."""
        seqs = [torch.cat([q, self.proj_pre(a)]) for q, a in zip(z_q, z_a)]
        return nn.utils.rnn.pad_sequence(seqs, batch_first=True)

    def forward(self, z_q: list[torch.Tensor], z_a: list[torch.Tensor]) -> torch.Tensor:
        """z_q: question features per sample already at d_s; z_a: teacher answer features (d_l). -> (B, T, d_l)."""
        x = self.concat(z_q, z_a)  # (B, T, d_s)
        pos = torch.arange(x.shape[1], device=x.device)  # NPE: 0..T-1 over the concatenation
        for block in self.blocks:
            x = block(x, pos)
        return self.norm(self.proj_post(x))  # (B, T, d_l), read by the teacher's frozen head


def count_parameters(d_l: int, student_text_config, depth: int = 2) -> int:
    """Parameter count from config dimensions alone (built on the meta device, no weights allocated)."""
    with torch.device("meta"):
        r = Recalibrator(d_l, student_text_config, depth)
    return sum(p.numel() for p in r.parameters())
