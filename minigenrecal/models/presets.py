"""Named presets over ONE set of knobs, from the offline tiny pair to the paper's 8B <- 78B pairs.

Hub ids appear only here; nothing loads them unless a preset other than `tiny` is run on purpose.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from minigenrecal.stages import StageConfig


@dataclass
class Preset:
    name: str
    teacher: str  # hub id, or "tiny" for the shipped offline teacher
    student: str  # hub id, or "tiny" for the random-init tiny student
    dtype: str = "float32"  # weights' dtype; CUDA runs autocast to bf16 either way
    max_length: int = 256
    n_train: int = 1000  # training samples (synthetic task for tiny; first n of the dataset otherwise)
    stage1: StageConfig = field(default_factory=StageConfig)
    stage2: StageConfig = field(default_factory=StageConfig)
    stage3: StageConfig = field(default_factory=StageConfig)
    depth: int = 2  # Recalibrator blocks
    remote_code: bool = False  # InternVL2.5 hub checkpoints need trust_remote_code
    accelerate_config: str | None = None  # file under configs/ for `accelerate launch`
    note: str = ""
    # -- how a real launch loads and trains them (GPU-only effects; docs/scaling.md) --
    attn: str | None = None  # attention implementation of hub loads: 'sdpa' for the real presets (None: transformers')
    checkpointing: bool = False  # activation checkpointing of the student's layers (the real presets: on)
    teacher_revision: str | None = None  # the hub commit to load; required where remote code runs (hub.pinned)
    student_revision: str | None = None
    global_batch: tuple[int, int, int] | None = None  # per stage; a launch derives grad_accum from its world size
    # -- how `--lazy` / `--stream` data reaches the loop (data/feed.py; the command line's flags override them) --
    workers: int = 0  # render workers per process (--dataloader_num_workers)
    shuffle_buffer: int = 0  # a stream's shuffle buffer, in records (--shuffle_buffer)
    length_buckets: int = 0  # a stream's length buckets, in batches per window (--length_buckets)

    def stages(self) -> dict[int, StageConfig]:
        return {1: self.stage1, 2: self.stage2, 3: self.stage3}

    def stage_configs(self, world: int | None = 1, **over) -> dict[int, StageConfig]:
        """Each stage's config for a launch of `world` processes. `over` (not None) replaces fields first; then, with
        `global_batch` and no explicit grad_accum, grad_accum = global batch / (batch_size x world), so every world
        size trains at the paper's global batches (8,192 / 4,096 / 8,192). world=None keeps the per-GPU numbers."""
        over = {k: v for k, v in over.items() if v is not None}
        out = {}
        for stage, cfg in self.stages().items():
            cfg = replace(cfg, **over)
            if self.global_batch is not None and world is not None and "grad_accum" not in over:
                g, per = self.global_batch[stage - 1], cfg.batch_size * world
                if g % per:
                    raise ValueError(f"preset {self.name}: stage {stage}'s global batch {g} is not a multiple of "
                                     f"batch_size {cfg.batch_size} x {world} processes; pick a batch size or process "
                                     "count that divides it, or set the accumulation yourself (--gradient_accumulation_steps)")
                cfg = replace(cfg, grad_accum=g // per)
            out[stage] = cfg
        return out


def _paper(batch: int, accum: int, chunk: int | None = 512) -> StageConfig:
    # chunk 512 at V_l = 152k, d_l = 8192, N = 8192: three (512, V_l) fp32 buffers + two (N, d_l) fp32 grads, about
    # 1.4 GiB, i.e. under 4% of the naive 37.4 GiB (arithmetic; see docs/scaling.md)
    # Paper: AdamW, LR 1e-4 -> 1e-5 linear within each stage, ~1 epoch per stage. batch x accum is per GPU: on the
    # paper's 128 GPUs a cluster preset's 8x8 / 4x8 / 8x8 are its global batches; a launch on another number of
    # processes rederives accum from `global_batch` (Preset.stage_configs).
    # Clipping at global norm 1.0: the paper does not say; 1.0 is transformers' and TRL's default max_grad_norm.
    return StageConfig(steps=1000, batch_size=batch, grad_accum=accum, lr=1e-4, lr_end=1e-5, chunk_size=chunk,
                       max_grad_norm=1.0)


# The cluster presets: SDPA attention (eager's (B, heads, T, T) scores are about 23 GiB a layer for the 72B at
# InternVL's 3,468-token questions), activation checkpointing, and the paper's global batches on any world size.
CLUSTER = dict(attn="sdpa", checkpointing=True, global_batch=(8192, 4096, 8192))
# Their data: 4 render workers per process (InternVL's tiling and both tokenizers off the training process), a stream
# shuffled through 1,000 records (a JSONL record is a few KiB: text and an image path; `datasets` rows holding image
# bytes cost more), and length buckets of 8 batches (docs/scaling.md, item 9).
FEED = dict(workers=4, shuffle_buffer=1000, length_buckets=8)

PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("tiny", teacher="tiny", student="tiny", n_train=1000,
           # Tiny LRs are ours (from-scratch student): chosen on the val split, recorded here. The tiny student is
           # random-init, so its vision encoder trains in stages 2-3 (train_vision); real presets keep it frozen.
           stage1=StageConfig(steps=150, batch_size=32, lr=1e-3, lr_end=1e-4),
           stage2=StageConfig(steps=300, batch_size=32, lr=1e-3, lr_end=1e-4, train_vision=True),
           stage3=StageConfig(steps=300, batch_size=32, lr=1e-3, lr_end=1e-4, train_vision=True),
           note="offline, CPU, minutes"),
    Preset("smolvlm-256m<-qwen2-vl-2b", teacher="Qwen/Qwen2-VL-2B-Instruct", student="HuggingFaceTB/SmolVLM-256M-Instruct",
           dtype="bfloat16", max_length=2048, n_train=100_000,
           stage1=_paper(8, 4), stage2=_paper(8, 4), stage3=_paper(8, 4), accelerate_config="configs/single_gpu.yaml",
           attn="sdpa", checkpointing=True, **FEED,
           note="one GPU (80 GB); V_l = 151,936"),
    Preset("qwen2-vl-7b<-qwen2-vl-72b", teacher="Qwen/Qwen2-VL-72B-Instruct", student="Qwen/Qwen2-VL-7B-Instruct",
           dtype="bfloat16", max_length=4096, n_train=1_000_000,
           stage1=_paper(8, 8), stage2=_paper(4, 8), stage3=_paper(8, 8), accelerate_config="configs/zero3.yaml", **CLUSTER, **FEED,
           note="cluster; paper global batches 8192/4096/8192 (128 A100s)"),
    Preset("internvl2.5-8b<-internvl2.5-78b", teacher="OpenGVLab/InternVL2_5-78B", student="OpenGVLab/InternVL2_5-8B",
           dtype="bfloat16", max_length=4096, n_train=1_000_000, remote_code=True,
           stage1=_paper(8, 8), stage2=_paper(4, 8), stage3=_paper(8, 8), accelerate_config="configs/zero3.yaml", **CLUSTER, **FEED,
           note="cluster; paper: 3.1 + 10.4 + 5.3 h on 128 A100 80GB"),
    Preset("qwen2-vl-7b<-internvl2.5-78b", teacher="OpenGVLab/InternVL2_5-78B", student="Qwen/Qwen2-VL-7B-Instruct",
           dtype="bfloat16", max_length=4096, n_train=1_000_000, remote_code=True,
           stage1=_paper(8, 8), stage2=_paper(4, 8), stage3=_paper(8, 8), accelerate_config="configs/zero3.yaml", **CLUSTER, **FEED,
           note="cluster; cross-family, cross-tokenizer"),
]}


def get_preset(name: "str | Preset", **overrides) -> Preset:
    """The named preset (a Preset is taken as it is); `overrides` that are not None replace its fields, e.g.
    student="path/to/dir" (the command line's --teacher / --student)."""
    if not isinstance(name, Preset) and name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return replace(name if isinstance(name, Preset) else PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})
