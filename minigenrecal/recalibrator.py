"""The Recalibrator: Proj-pre, N causal decoder blocks shaped like the student's, Proj-post, LayerNorm.

It has no embedding table and no LM head of its own: its output is read by the teacher's frozen head.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.activations import ACT2FN

# Decoders whose attention hard-codes a q/k/v bias (and no o_proj bias) whatever `attention_bias` says
QKV_BIAS_TYPES = ("qwen2", "qwen2_vl", "qwen2_vl_text", "qwen2_5_vl", "qwen2_5_vl_text")


def rope_theta(cfg) -> float:
    """RoPE base: `rope_parameters` (per layer type in Gemma3: its full-attention layers', as the Recalibrator
    attends over the whole sequence), else `rope_theta`, else 10000."""
    rope = getattr(cfg, "rope_parameters", None)
    rope = rope.get("full_attention", rope) if isinstance(rope, dict) else {}
    return float(rope.get("rope_theta") or getattr(cfg, "rope_theta", None) or 10000.0)


def text_dims(cfg) -> dict:
    """The student decoder's dimensions from its text config. Biases: q/k/v from `attention_bias` or a Qwen2 model
    type, o_proj from `attention_bias` (Llama's meaning), FFN from `mlp_bias`. Activation: `hidden_activation`
    (Gemma2/3) or `hidden_act`. `attn_scale`: `query_pre_attn_scalar ** -0.5` (Gemma2/3), else 1/sqrt(head_dim).
    RoPE scalings (linear, yarn, M-RoPE sections) are not copied: NPE is a fresh 1-D RoPE at the student's theta."""
    d, h = cfg.hidden_size, cfg.num_attention_heads
    attention_bias = bool(getattr(cfg, "attention_bias", False))
    scalar = getattr(cfg, "query_pre_attn_scalar", None)
    return dict(d=d, n_heads=h, n_kv=getattr(cfg, "num_key_value_heads", None) or h,
                head_dim=getattr(cfg, "head_dim", None) or d // h, ffn=cfg.intermediate_size,
                eps=getattr(cfg, "rms_norm_eps", 1e-6), theta=rope_theta(cfg),
                qkv_bias=attention_bias or cfg.model_type in QKV_BIAS_TYPES, o_bias=attention_bias,
                mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
                act=getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", None) or "silu",
                attn_scale=float(scalar) ** -0.5 if scalar else None)


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """1-D rotary embedding (rotate-half convention) at integer positions `pos`: (T,), or (B, T) per sample."""
    hd = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, device=x.device, dtype=torch.float32) / hd)
    ang = pos.float()[..., None] * inv  # (T, hd/2) or (B, T, hd/2)
    cos, sin = torch.cat([ang, ang], -1).cos().to(x.dtype), torch.cat([ang, ang], -1).sin().to(x.dtype)
    if pos.dim() == 2:  # per-sample positions (B, T) (NPE off): broadcast over the heads of x (B, H, T, hd)
        cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Block(nn.Module):
    """Pre-norm causal decoder block: RMSNorm -> GQA attention with RoPE -> RMSNorm -> gated FFN (`act`, the
    student's activation; SiLU for Llama and Qwen). Every size and bias comes from `text_dims`."""

    def __init__(self, d, n_heads, n_kv, head_dim, ffn, eps, theta, qkv_bias, o_bias=False, mlp_bias=False,
                 act="silu", attn_scale=None):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim, self.theta = n_heads, n_kv, head_dim, theta
        self.attn_scale = attn_scale  # None: 1/sqrt(head_dim)
        self.norm1, self.norm2 = RMSNorm(d, eps), RMSNorm(d, eps)
        self.q = nn.Linear(d, n_heads * head_dim, bias=qkv_bias)
        self.k = nn.Linear(d, n_kv * head_dim, bias=qkv_bias)
        self.v = nn.Linear(d, n_kv * head_dim, bias=qkv_bias)
        self.o = nn.Linear(n_heads * head_dim, d, bias=o_bias)
        self.gate, self.up = nn.Linear(d, ffn, bias=mlp_bias), nn.Linear(d, ffn, bias=mlp_bias)
        self.down = nn.Linear(ffn, d, bias=mlp_bias)
        self.act = ACT2FN[act]  # no parameters

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        h = self.norm1(x)
        q = self.q(h).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k(h).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v(h).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = rope(q, pos, self.theta), rope(k, pos, self.theta)
        rep = self.n_heads // self.n_kv
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.attn_scale)  # (B, H, T, hd)
        x = x + self.o(a.transpose(1, 2).reshape(B, T, -1))
        h = self.norm2(x)
        return x + self.down(self.act(self.gate(h)) * self.up(h))


class Recalibrator(nn.Module):
    """Proj-pre (d_l->d_s), `depth` student-shaped blocks with NPE, Proj-post (d_s->d_l), LayerNorm(d_l).

    `npe=False` is the paper's ablation, not the method: each part keeps its own model's position ids (the question
    0..Lq-1, the teacher's answer features from the teacher's Lq_l on), so the positions jump at the seam."""

    def __init__(self, d_l: int, student_text_config, depth: int = 2, npe: bool = True):
        super().__init__()
        dims = text_dims(student_text_config)
        d_s = dims["d"]
        self.d_l, self.d_s, self.npe = d_l, d_s, npe
        self.proj_pre = nn.Linear(d_l, d_s)
        self.blocks = nn.ModuleList(Block(**dims) for _ in range(depth))
        self.proj_post = nn.Linear(d_s, d_l)
        self.norm = nn.LayerNorm(d_l)

    def concat(self, z_q: list[torch.Tensor], z_a: list[torch.Tensor]) -> torch.Tensor:
        """Per sample [z_q (Lq, d_s), proj_pre(z_a) (La-1, d_l->d_s)], right-padded: (B, T, d_s)."""
        seqs = [torch.cat([q, self.proj_pre(a)]) for q, a in zip(z_q, z_a)]
        return nn.utils.rnn.pad_sequence(seqs, batch_first=True)

    def forward(self, z_q: list[torch.Tensor], z_a: list[torch.Tensor], predicting_only: bool = False,
                a_pos: list[int] | None = None) -> torch.Tensor:
        """z_q: question features per sample already at d_s; z_a: teacher answer features (d_l). -> (B, T, d_l);
        predicting_only: only the rows that predict the answer, Lq-1 .. Lq+La-2 of each sample, flattened: (N, d_l).
        a_pos: the teacher's position of each sample's first answer feature (its Lq_l), read only with npe=False."""
        return self.run(self.concat(z_q, z_a), [len(q) for q in z_q], [len(a) + 1 for a in z_a], predicting_only,
                        a_pos)

    def run(self, x: torch.Tensor, q_lens: list[int], a_lens: list[int], predicting_only: bool = False,
            a_pos: list[int] | None = None) -> torch.Tensor:
        """The blocks, Proj-post and the norm over concatenations x (B, T, d_s) of Lq + La - 1 real rows each."""
        pos = torch.arange(x.shape[1], device=x.device)  # NPE: 0..T-1 over the concatenation
        if not self.npe:
            if a_pos is None:
                raise ValueError("a Recalibrator with npe=False needs a_pos, the teacher's first answer position")
            pos = torch.stack([torch.cat([pos[:q], pos[: x.shape[1] - q] + p]) for q, p in zip(q_lens, a_pos)])
        for block in self.blocks:
            x = block(x, pos)
        if predicting_only:  # Proj-post and the norm on the N rows the losses read, not on all B x T
            x = torch.cat([x[b, q - 1: q + a - 1] for b, (q, a) in enumerate(zip(q_lens, a_lens))])  # (N, d_s)
        return self.norm(self.proj_post(x))  # read by the teacher's frozen head


def count_parameters(d_l: int, student_text_config, depth: int = 2) -> int:
    """Parameter count from config dimensions alone (built on the meta device, no weights allocated)."""
    with torch.device("meta"):
        r = Recalibrator(d_l, student_text_config, depth)
    return sum(p.numel() for p in r.parameters())
