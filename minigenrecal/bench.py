"""`python -m minigenrecal bench --preset NAME --random-weights`: stage 1 and 2 step time, tokens/s, peak memory, MFU.

Models are built from the config dimensions below (facts from the checkpoints' config.json; nothing is
downloaded), random init, bf16 on CUDA (fp32 on CPU). What is timed is the real loss path (`stages.GenRecal`:
teacher forward -> Recalibrator main + regularization paths through the frozen teacher head, chunked -> student CE)
plus backward and a fused AdamW step. Only the language models are built: image tokens are ordinary positions of
the question and the frozen vision encoders are left out (they run once per sample, frozen, in every stage).
`--cache` drops the teacher body (features come from a teacher cache; the read itself is not timed).

MFU = model FLOPs per step / step time / peak dense bf16 FLOP/s (989e12 for an H100 SXM, `--peak-tflops`), with
    model FLOPs = 6 * P * tokens   for every part that trains (forward + backward)
                + 2 * P * tokens   for every frozen part that runs forward only
                + 4 * P * tokens   for a frozen part that gradients flow through (the student body in stage 1 does
                                   not; the teacher head does: forward + backward to its input)
P counts matmul weights (embedding tables excluded), tokens are the positions each part processes (teacher body:
B * T_l; student body: B * T_s; Recalibrator: both paths' concatenations; teacher head: the N answer rows of each
path, twice (Recalibrator logits + teacher logits)). Attention's T^2 term is not counted.
tokens/s = student tokens (B * T_s) per second.
"""
from __future__ import annotations

import math
import resource
import statistics
import time
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

H100_BF16_PEAK = 989e12


@dataclass(frozen=True)
class TextDims:
    """A decoder LM's dimensions (config.json of the released checkpoint)."""

    name: str
    arch: str  # 'qwen2' (q/k/v biases) or 'llama' (no biases; InternLM2 has the same shapes)
    d: int
    layers: int
    heads: int
    kv: int
    ffn: int
    vocab: int
    tied: bool

    def scaled(self, s: float) -> "TextDims":
        if s >= 1:
            return self
        heads = max(2, round(self.d * s / 64))
        kv = max(1, heads * self.kv // self.heads)
        kv = kv if heads % kv == 0 else 1
        return replace(self, d=heads * 64, heads=heads, kv=kv, layers=max(1, round(self.layers * s)),
                       ffn=max(64, int(self.ffn * s)), vocab=max(512, int(self.vocab * s)))


# Language-model dimensions of the preset checkpoints (facts; read off their config.json files).
DIMS = {
    "Qwen/Qwen2-VL-2B-Instruct": TextDims("Qwen2-VL-2B (Qwen2-1.5B LM)", "qwen2", 1536, 28, 12, 2, 8960, 151936, True),
    "HuggingFaceTB/SmolVLM-256M-Instruct": TextDims("SmolVLM-256M (SmolLM2-135M LM)", "llama", 576, 30, 9, 3, 1536, 49280, True),
    "Qwen/Qwen2-VL-7B-Instruct": TextDims("Qwen2-VL-7B (Qwen2-7B LM)", "qwen2", 3584, 28, 28, 4, 18944, 152064, False),
    "Qwen/Qwen2-VL-72B-Instruct": TextDims("Qwen2-VL-72B (Qwen2-72B LM)", "qwen2", 8192, 80, 64, 8, 29568, 152064, False),
    "OpenGVLab/InternVL2_5-8B": TextDims("InternVL2.5-8B (InternLM2.5-7B LM)", "llama", 4096, 32, 32, 8, 14336, 92553, False),
    "OpenGVLab/InternVL2_5-78B": TextDims("InternVL2.5-78B (Qwen2.5-72B LM)", "qwen2", 8192, 80, 64, 8, 29568, 151674, False),
}


def build_lm(dims: TextDims, dtype, device) -> nn.Module:
    """A random-init causal LM with these dimensions (transformers' Qwen2 or Llama class)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    kw = dict(vocab_size=dims.vocab, hidden_size=dims.d, num_hidden_layers=dims.layers, num_attention_heads=dims.heads,
              num_key_value_heads=dims.kv, intermediate_size=dims.ffn, tie_word_embeddings=dims.tied,
              max_position_embeddings=32768, attn_implementation="sdpa")
    cls, cfg = (Qwen2ForCausalLM, Qwen2Config(**kw)) if dims.arch == "qwen2" else (LlamaForCausalLM, LlamaConfig(**kw))
    with torch.device(device):
        return cls(cfg).to(dtype)


class TextView:
    """The part of `VLMView` that `stages.GenRecal` uses, for a text-only LM."""

    def __init__(self, model):
        self.model = model

    @property
    def head(self):
        return self.model.get_output_embeddings()

    @property
    def text_config(self):
        return self.model.config

    def body(self, batch):
        return self.model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state

    def student_ce(self, z, batch):
        from .losses import answer_rows
        rows = answer_rows(z, batch["q_lens"], batch["a_lens"])
        return F.cross_entropy(self.head(rows).float(), answer_rows(batch["input_ids"], batch["q_lens"], batch["a_lens"], 0))


def _matmul_params(m: nn.Module) -> int:
    return sum(p.numel() for n, p in m.named_parameters() if p.dim() == 2 and "embed" not in n)


def _batch(B, Lq, La, V, device):
    ids = torch.randint(0, V, (B, Lq + La), device=device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "q_lens": torch.full((B,), Lq),
            "a_lens": torch.full((B,), La)}


def bench(preset_name: str, scale: float = 1.0, batch: int = 4, lq: int = 768, la: int = 256, lq_l: int | None = None,
          steps: int = 5, chunk: int | None = 1024, use_cache: bool = False, stages=(1, 2),
          peak_flops: float = H100_BF16_PEAK) -> list[dict]:
    """Time stages 1 and 2 of a preset's pair built from DIMS (scaled by `scale`); one row per stage."""
    from .config import get_preset
    from .losses import split_teacher
    from .recalibrator import Recalibrator
    from .stages import GenRecal, StageConfig, set_trainable
    preset = get_preset(preset_name)
    cuda = torch.cuda.is_available()
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    td, sd = DIMS[preset.teacher].scaled(scale), DIMS[preset.student].scaled(scale)
    lq_l = lq_l or lq
    rows = []
    torch.manual_seed(0)
    teacher = build_lm(td, dtype, dev).eval().requires_grad_(False)
    t_head = teacher.get_output_embeddings()
    t_body_params = _matmul_params(teacher.model)
    if use_cache:  # the teacher body is not needed: keep its head only
        teacher.model = None
    student = TextView(build_lm(sd, dtype, dev))
    recal = Recalibrator(td.d, student.text_config).to(dev, dtype)
    for stage in stages:
        params = set_trainable(stage, student.model, recal)
        module = GenRecal(student, recal, t_head)
        opt = torch.optim.AdamW(params, lr=1e-5, fused=cuda)
        cfg = StageConfig(chunk_size=chunk)
        s_batch = _batch(batch, lq, la, sd.vocab, dev)
        t_batch = _batch(batch, lq_l, la, td.vocab, dev)
        if use_cache:  # what a cache read would give (already on the device)
            z_cached = torch.randn(batch, lq_l + la, td.d, device=dev, dtype=dtype)
        times = []
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        for it in range(steps + 1):
            t0 = time.perf_counter()
            with torch.no_grad():
                z_t = z_cached if use_cache else teacher.model(input_ids=t_batch["input_ids"]).last_hidden_state
            t = split_teacher(z_t, t_batch["input_ids"], t_batch["q_lens"], t_batch["a_lens"])
            terms = module(stage, s_batch, t, cfg)
            terms["loss"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            if it:  # the first step is a warm-up
                times.append(time.perf_counter() - t0)
        step = statistics.median(times)
        peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        # model FLOPs (see the module docstring)
        N = batch * la
        T_s, T_l, T_r = batch * (lq + la), batch * (lq_l + la), batch * (lq + la - 1) + batch * (lq_l + la - 1)
        P_s, P_r, P_h = _matmul_params(student.model.model), _matmul_params(recal), t_head.weight.numel()
        P_sh = student.model.get_output_embeddings().weight.numel()
        flops = 0 if use_cache else 2 * t_body_params * T_l
        flops += (6 if stage == 2 else 2) * P_s * T_s + 6 * P_r * T_r + 2 * 6 * P_h * N
        flops += 6 * P_sh * N if stage == 2 else 0
        rows.append(dict(preset=preset.name, stage=stage, scale=scale, device=torch.cuda.get_device_name() if cuda else "cpu",
                         cache=use_cache, batch=batch, T_s=lq + la, T_l=lq_l + la, step_s=step,
                         tokens_per_s=batch * (lq + la) / step, peak_gib=peak / 2 ** 30,
                         tflops=flops / step / 1e12, mfu=flops / step / peak_flops, loss=terms["loss"].item(),
                         teacher=td.name, student=sd.name, d_l=td.d, d_s=sd.d))
        del opt
        if cuda:
            torch.cuda.empty_cache()
    return rows


def print_table(rows: list[dict]) -> None:
    print("| preset | stage | device | scale | cache | B x T_s | step s | tokens/s | peak GiB | TFLOP/s | MFU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['stage']} | {r['device']} | {r['scale']} | {'yes' if r['cache'] else 'no'} | "
              f"{r['batch']} x {r['T_s']} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['peak_gib']:.2f} | "
              f"{r['tflops']:.2f} | {100 * r['mfu']:.1f}% |")


def add_command(sub) -> None:
    b = sub.add_parser("bench", help="stage 1/2 step time, tokens/s, peak memory and MFU from config dimensions")
    b.add_argument("--preset", default="smolvlm-256m<-qwen2-vl-2b")
    b.add_argument("--random-weights", action="store_true", help="required: models are random-init from DIMS")
    b.add_argument("--scale", type=float, default=None, help="shrink widths/depths/vocab (default 1 on CUDA, 0.05 on CPU)")
    b.add_argument("--batch", type=int, default=None)
    b.add_argument("--lq", type=int, default=None, help="question tokens (student; teacher uses the same)")
    b.add_argument("--la", type=int, default=None, help="answer tokens")
    b.add_argument("--steps", type=int, default=5)
    b.add_argument("--chunk", type=int, default=1024, help="teacher-head loss chunk (0: naive)")
    b.add_argument("--cache", action="store_true", help="no teacher body (stages 1-2 from a teacher cache)")
    b.add_argument("--stages", default="1,2")
    b.add_argument("--peak-tflops", type=float, default=989.0)

    def run(a):
        if not a.random_weights:
            raise SystemExit("bench builds random-init models from config dimensions: pass --random-weights")
        cuda = torch.cuda.is_available()
        rows = bench(a.preset, scale=a.scale or (1.0 if cuda else 0.05), batch=a.batch or (4 if cuda else 2),
                     lq=a.lq or (768 if cuda else 48), la=a.la or (256 if cuda else 16), steps=a.steps,
                     chunk=a.chunk or None, use_cache=a.cache, stages=[int(s) for s in a.stages.split(",")],
                     peak_flops=a.peak_tflops * 1e12)
        print_table(rows)
    b.set_defaults(fn=run)
