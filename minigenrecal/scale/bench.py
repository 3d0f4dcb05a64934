"""`python -m minigenrecal bench --preset NAME --random-weights`: stage 1 and 2 step time, tokens/s, peak memory, MFU.

Models are built from the config dimensions below (facts from the checkpoints' config.json; nothing is
downloaded), random init, directly in bf16 on CUDA (fp32 on CPU). What is timed is the real loss path (`stages.GenRecal`:
teacher forward -> Recalibrator main + regularization paths through the frozen teacher head, chunked -> student CE)
plus backward and a fused AdamW step. Only the language models are built: image tokens are ordinary positions of
the question and the frozen vision encoders are left out (they run once per sample, frozen, in every stage).
`--cache`: no teacher body is built at all, only its head (features come from a teacher cache; the read itself is
not timed).

Before building anything, `bench` prints an arithmetic memory estimate per GPU (`estimate_memory`) and refuses,
with the estimate, when it exceeds the GPU's memory (`--force` builds anyway). `--estimate-only --gpus N` prints the
estimate of every preset for N GPUs (weights, gradients and optimizer states sharded N ways as under ZeRO-3).

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

import contextlib
import functools
import re
import resource
import statistics
import time
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from minigenrecal.losses import answer_rows, split_teacher
from minigenrecal.models.presets import PRESETS, get_preset
from minigenrecal.recalibrator import Recalibrator, count_parameters
from minigenrecal.stages import GenRecal, StageConfig, set_trainable

H100_BF16_PEAK = 989e12
GiB = 2 ** 30


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


@contextlib.contextmanager
def _default_dtype(dtype):
    """Create parameters directly in `dtype` (no fp32 copy first)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def lm_config(dims: TextDims):
    kw = dict(vocab_size=dims.vocab, hidden_size=dims.d, num_hidden_layers=dims.layers, num_attention_heads=dims.heads,
              num_key_value_heads=dims.kv, intermediate_size=dims.ffn, tie_word_embeddings=dims.tied,
              max_position_embeddings=32768, attn_implementation="sdpa")
    return Qwen2Config(**kw) if dims.arch == "qwen2" else LlamaConfig(**kw)


def _lm(dims: TextDims) -> nn.Module:
    return (Qwen2ForCausalLM if dims.arch == "qwen2" else LlamaForCausalLM)(lm_config(dims))


def build_lm(dims: TextDims, dtype, device) -> nn.Module:
    """A random-init causal LM with these dimensions (transformers' Qwen2 or Llama class), created in `dtype`."""
    with torch.device(device), _default_dtype(dtype):
        return _lm(dims).to(dtype)


def build_head(dims: TextDims, dtype, device) -> nn.Linear:
    """The LM head alone (what stages 1-2 need from a cached teacher), random init like the model's."""
    with torch.device(device), _default_dtype(dtype):
        head = nn.Linear(dims.d, dims.vocab, bias=False)
        nn.init.normal_(head.weight, std=0.02)
    return head


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
        return self.model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                use_cache=False).last_hidden_state

    def student_ce(self, z, batch):
        rows = answer_rows(z, batch["q_lens"], batch["a_lens"])
        return F.cross_entropy(self.head(rows).float(), answer_rows(batch["input_ids"], batch["q_lens"], batch["a_lens"], 0))


def _matmul_params(m: nn.Module) -> int:
    return sum(p.numel() for n, p in m.named_parameters() if p.dim() == 2 and "embed" not in n)


def _batch(B, Lq, La, V, device):
    ids = torch.randint(0, V, (B, Lq + La), device=device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "q_lens": torch.full((B,), Lq),
            "a_lens": torch.full((B,), La)}


def dims_of(hub_id: str) -> "TextDims":
    """The language model's dimensions of a checkpoint `bench` knows (DIMS); a clear error for any other id."""
    if hub_id not in DIMS:
        raise ValueError(f"bench has no dimensions for {hub_id!r} (a --teacher/--student override?): it knows "
                         f"{', '.join(sorted(DIMS))}; add its TextDims to bench.DIMS")
    return DIMS[hub_id]


# -- memory: arithmetic estimate before building, measured peak after ------------------------------------
@functools.lru_cache(maxsize=None)
def _param_counts(dims: TextDims) -> tuple[int, int]:
    """(all parameters, LM-head parameters) of the LM, counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        m = _lm(dims)
    return sum(p.numel() for p in m.parameters()), m.get_output_embeddings().weight.numel()


def estimate_memory(preset_name: str, stage: int, batch: int = 4, lq: int = 768, la: int = 256, lq_l: int | None = None,
                    use_cache: bool = False, chunk: int | None = 1024, gpus: int = 1, scale: float = 1.0,
                    weight_bytes: int = 2, master_fp32: bool = False, checkpointing: bool = False) -> dict:
    """Arithmetic estimate (GiB per GPU) of what `bench` allocates for one stage; not a measurement.

    Weights `weight_bytes` each (2: bf16 on CUDA), gradients and both AdamW states in the weights' dtype (as `bench`
    trains), all three sharded `gpus` ways (ZeRO-3); the teacher head is whole on every GPU (gathered for the loss).
    Activations kept for backward per token and layer: about (18 d + 4 ffn) values (attention inputs/outputs, the
    gated MLP's three ffn-wide tensors, fp32 norm inputs). Teacher-head loss: chunked, two (N, d_l) fp32 gradients per
    path plus three (chunk, V_l) fp32 buffers; naive, about eight (N, V_l) fp32 tensors per path. + 1 GiB for the CUDA
    context and allocator slack.
    `master_fp32` (what `train` does, loop.py): each trainable parameter also keeps an fp32 master copy, an fp32
    gradient and two fp32 AdamW states (16 bytes, sharded) instead of gradient + states in the weights' dtype, and
    from stage 1 on, since one engine serves the whole run (ZeRO-3 allocates them at start-up).
    `checkpointing` (the real presets' activation checkpointing of the student's layers): in stage 2 each student
    layer keeps only its input, (T, d_s) values, and one layer's activations exist again while its backward
    recomputes them; the Recalibrator (two layers of the kit's own) keeps all of its activations either way.
    """
    preset = get_preset(preset_name)
    td, sd = dims_of(preset.teacher).scaled(scale), dims_of(preset.student).scaled(scale)
    lq_l = lq_l or lq
    wb = weight_bytes
    P_t, P_th = _param_counts(td)
    P_s, _ = _param_counts(sd)
    P_r = count_parameters(td.d, lm_config(sd))
    trained = P_r + (P_s if stage == 2 or master_fp32 else 0)
    T_s, T_l, N = batch * (lq + la), batch * (lq_l + la), batch * la
    T_r = batch * (lq + la - 1) + batch * (lq_l + la - 1)
    act = lambda T, d, ffn, layers: T * layers * (18 * d + 4 * ffn) * wb
    student_act = (T_s * sd.layers * sd.d * wb + act(T_s, sd.d, sd.ffn, 1)) if checkpointing else \
        act(T_s, sd.d, sd.ffn, sd.layers)
    parts = {
        "teacher body": 0 if use_cache else (P_t - P_th) * wb / gpus,
        "teacher head": P_th * wb,
        "student": P_s * wb / gpus,
        "recalibrator": P_r * wb / gpus,
        "grads + AdamW": trained * (16 if master_fp32 else 3 * wb) / gpus,
        "activations": (student_act if stage == 2 else T_s * (4 * sd.d + 3 * sd.ffn) * wb)
                       + act(T_r, sd.d, sd.ffn, 2) + (0 if use_cache else T_l * (4 * td.d + 3 * td.ffn) * wb),
        "head loss": 2 * (2 * N * td.d * 4 + 3 * min(chunk, N) * td.vocab * 4) if chunk else 2 * 8 * N * td.vocab * 4,
        "student CE": 3 * N * sd.vocab * 4 if stage == 2 else 0,
        "overhead": GiB,
    }
    out = {k: v / GiB for k, v in parts.items()}
    out["total"] = sum(out.values())
    return out


def print_estimate(preset_name: str, stages, gpus: int = 1, **kw) -> dict[int, dict]:
    est = {s: estimate_memory(preset_name, s, gpus=gpus, **kw) for s in stages}
    keys = list(next(iter(est.values())))
    print(f"memory estimate per GPU ({gpus} GPU(s), arithmetic, GiB) for {preset_name}"
          f"{' from a teacher cache' if kw.get('use_cache') else ''}:")
    print("| stage | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for s, e in est.items():
        print(f"| {s} | " + " | ".join(f"{e[k]:.2f}" for k in keys) + " |")
    return est


TRAIN_GPUS = {"smolvlm-256m<-qwen2-vl-2b": (1, 2, 8)}  # the cluster presets: CLUSTER_GPUS
CLUSTER_GPUS = (8, 16, 64, 128)
TABLE_PARTS = ("teacher body", "teacher head", "student", "recalibrator", "grads + AdamW")


def training_memory_table(lq: int = 768, la: int = 256, chunk: int = 1024) -> list[str]:
    """docs/scaling.md's table: GiB per GPU of a `train` launch (FSDP2 or ZeRO-3), arithmetic, per preset, GPU
    count and stage, at each stage's per-GPU batch from the preset, a live sharded teacher, fp32 master weights."""
    lines = ["| preset | GPUs | stage | batch/GPU | teacher body | teacher head | student | Recalibrator | "
             "fp32 master + grads + AdamW | activations + losses | total |", "|---" * 11 + "|"]
    for name, preset in PRESETS.items():
        if name == "tiny":
            continue
        for gpus in TRAIN_GPUS.get(name, CLUSTER_GPUS):
            for stage in (1, 2):
                batch = preset.stages()[stage].batch_size
                e = estimate_memory(name, stage, batch=batch, lq=lq, la=la, chunk=chunk, gpus=gpus, master_fp32=True)
                rest = e["total"] - sum(e[k] for k in TABLE_PARTS)
                lines.append(f"| `{name}` | {gpus} | {stage} | {batch} | "
                             + " | ".join(f"{e[k]:.1f}" for k in TABLE_PARTS) + f" | {rest:.1f} | {e['total']:.1f} |")
    return lines


# Tokens of one real training sample per family: a 1,024 x 768 image and about 140 text tokens of question, a
# 256-token answer (arithmetic from each processor's defaults, not measured). InternVL2.5: 12 tiles of 448 px (the
# 4 x 3 grid, max_num 12) + a thumbnail, 256 tokens each = 3,328. Qwen2-VL: 28 px per merged token, the image
# resized to 1,036 x 756 = 37 x 27 = 999. SmolVLM: the longest edge resized to 2,048, 4 x 3 tiles of 512 px + the
# global image, 64 tokens each = 832.
REAL_QUESTION_TOKENS = {"OpenGVLab/InternVL2_5": 3328 + 140, "Qwen/Qwen2-VL": 999 + 140, "HuggingFaceTB/SmolVLM": 832 + 140}
REAL_ANSWER_TOKENS = 256
REAL_GPUS = (8, 16, 128)


def real_question_tokens(hub_id: str) -> int:
    return next(n for prefix, n in REAL_QUESTION_TOKENS.items() if hub_id.startswith(prefix))


def real_length_memory_table(chunk: int = 1024) -> list[str]:
    """docs/scaling.md's table at each preset's real sequence lengths (`REAL_QUESTION_TOKENS`): GiB per GPU of a
    `train` launch, stage 2 (the peak), at the preset's per-GPU batch, without and with activation checkpointing
    (the real presets train with it)."""
    lines = ["| preset | question tokens: student / teacher | GPUs | batch/GPU | weights + fp32 master + AdamW | "
             "activations + losses, no checkpointing | total, no checkpointing | activations + losses, "
             "checkpointing | total, checkpointing |", "|---" * 9 + "|"]
    for name, preset in PRESETS.items():
        if name in ("tiny", *TRAIN_GPUS):  # the one-GPU pair's lengths are the first table's
            continue
        lq, lq_l = real_question_tokens(preset.student), real_question_tokens(preset.teacher)
        batch = preset.stages()[2].batch_size
        for gpus in REAL_GPUS:
            kw = dict(batch=batch, lq=lq, la=REAL_ANSWER_TOKENS, lq_l=lq_l, chunk=chunk, gpus=gpus, master_fp32=True)
            off, on = estimate_memory(name, 2, **kw), estimate_memory(name, 2, checkpointing=True, **kw)
            fixed = sum(off[k] for k in TABLE_PARTS)
            lines.append(f"| `{name}` | {lq} / {lq_l} | {gpus} | {batch} | {fixed:.1f} | {off['total'] - fixed:.1f} | "
                         f"{off['total']:.1f} | {on['total'] - fixed:.1f} | {on['total']:.1f} |")
    return lines


class WillNotFit(RuntimeError):
    """Raised before building when the memory estimate exceeds the device's memory."""


def _cpu_peak_reset() -> None:
    """Reset this process's peak resident set (Linux); `_cpu_peak` then reports the peak since this call."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _cpu_peak() -> int:
    try:
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def bench(preset_name: str, scale: float = 1.0, batch: int = 4, lq: int = 768, la: int = 256, lq_l: int | None = None,
          steps: int = 5, chunk: int | None = 1024, use_cache: bool = False, stages=(1, 2),
          peak_flops: float = H100_BF16_PEAK, capacity_gib: float | None = None, force: bool = False,
          on_row=None, verbose: bool = False) -> list[dict]:
    """Time stages 1 and 2 of a preset's pair built from DIMS (scaled by `scale`); one row per stage.

    Refuses (`WillNotFit`) before building when the memory estimate exceeds `capacity_gib` (default: the GPU's
    memory; no limit on CPU) unless `force`. `on_row(row)` is called as each stage's row is ready.
    """
    preset = get_preset(preset_name)
    cuda = torch.cuda.is_available()
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    td, sd = dims_of(preset.teacher).scaled(scale), dims_of(preset.student).scaled(scale)
    lq_l = lq_l or lq
    est_kw = dict(batch=batch, lq=lq, la=la, lq_l=lq_l, use_cache=use_cache, chunk=chunk, scale=scale,
                  weight_bytes=dtype.itemsize)
    est = (print_estimate(preset_name, stages, **est_kw) if verbose
           else {s: estimate_memory(preset_name, s, **est_kw) for s in stages})
    need = max(e["total"] for e in est.values())
    if capacity_gib is None and cuda:
        capacity_gib = torch.cuda.mem_get_info()[1] / GiB
    if capacity_gib is not None and need > capacity_gib and not force:
        raise WillNotFit(f"{preset_name} (stages {','.join(map(str, stages))}, batch {batch} x {lq + la} tokens"
                         f"{', from a teacher cache' if use_cache else ''}) needs about {need:.1f} GiB by the estimate, "
                         f"more than the {capacity_gib:.1f} GiB available: not building it. Use --cache, fewer "
                         f"--stages, a smaller --batch, several GPUs, or --force to try anyway")
    rows = []
    torch.manual_seed(0)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        _cpu_peak_reset()
    if use_cache:  # the teacher body is not needed: build its head only
        teacher, t_head, t_body_params = None, build_head(td, dtype, dev).requires_grad_(False), 0
    else:
        teacher = build_lm(td, dtype, dev).eval().requires_grad_(False)
        t_head, t_body_params = teacher.get_output_embeddings(), _matmul_params(teacher.model)
    student = TextView(build_lm(sd, dtype, dev))
    with torch.device(dev), _default_dtype(dtype):
        recal = Recalibrator(td.d, student.text_config)
    built_gib = (torch.cuda.memory_allocated() if cuda else _cpu_peak()) / GiB
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
        peak = torch.cuda.max_memory_allocated() if cuda else _cpu_peak()
        # model FLOPs (see the module docstring)
        N = batch * la
        T_s, T_l, T_r = batch * (lq + la), batch * (lq_l + la), batch * (lq + la - 1) + batch * (lq_l + la - 1)
        P_s, P_r, P_h = _matmul_params(student.model.model), _matmul_params(recal), t_head.weight.numel()
        P_sh = student.model.get_output_embeddings().weight.numel()
        flops = 0 if use_cache else 2 * t_body_params * T_l
        flops += (6 if stage == 2 else 2) * P_s * T_s + 6 * P_r * T_r + 2 * 6 * P_h * N
        flops += 6 * P_sh * N if stage == 2 else 0
        row = dict(preset=preset.name, stage=stage, scale=scale, device=torch.cuda.get_device_name() if cuda else "cpu",
                   dtype=str(dtype).replace("torch.", ""), cache=use_cache, batch=batch, T_s=lq + la, T_l=lq_l + la,
                   chunk=chunk, steps=steps, step_s=step, tokens_per_s=batch * (lq + la) / step, peak_gib=peak / GiB,
                   built_gib=built_gib, estimate_gib=est[stage]["total"], tflops=flops / step / 1e12,
                   mfu=flops / step / peak_flops, loss=terms["loss"].item(), teacher=td.name, student=sd.name,
                   d_l=td.d, d_s=sd.d)
        rows.append(row)
        if on_row is not None:
            on_row(row)
        del opt, terms, t
        if cuda:
            torch.cuda.empty_cache()
    return rows


def print_table(rows: list[dict]) -> None:
    print("| preset | stage | device | scale | cache | B x T_s | step s | tokens/s | peak GiB | est. GiB | TFLOP/s | MFU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['stage']} | {r['device']} | {r['scale']} | {'yes' if r['cache'] else 'no'} | "
              f"{r['batch']} x {r['T_s']} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['peak_gib']:.2f} | "
              f"{r['estimate_gib']:.2f} | {r['tflops']:.2f} | {100 * r['mfu']:.1f}% |")
