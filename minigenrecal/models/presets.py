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

    def stages(self) -> dict[int, StageConfig]:
        return {1: self.stage1, 2: self.stage2, 3: self.stage3}


def _paper(batch: int, accum: int, chunk: int | None = 512) -> StageConfig:
    # chunk 512 at V_l = 152k, d_l = 8192, N = 8192: three (512, V_l) fp32 buffers + two (N, d_l) fp32 grads, about
    # 1.4 GiB, i.e. under 4% of the naive 37.4 GiB (arithmetic; see docs/scaling.md)
    # Paper: AdamW, LR 1e-4 -> 1e-5 linear within each stage, ~1 epoch per stage.
    return StageConfig(steps=1000, batch_size=batch, grad_accum=accum, lr=1e-4, lr_end=1e-5, chunk_size=chunk)


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
           note="one GPU (80 GB); V_l = 151,936"),
    Preset("qwen2-vl-7b<-qwen2-vl-72b", teacher="Qwen/Qwen2-VL-72B-Instruct", student="Qwen/Qwen2-VL-7B-Instruct",
           dtype="bfloat16", max_length=4096, n_train=1_000_000,
           stage1=_paper(8, 8), stage2=_paper(4, 16), stage3=_paper(8, 8), accelerate_config="configs/zero3.yaml",
           note="cluster; paper global batch 8192/4096/8192 on 128 A100s"),
    Preset("internvl2.5-8b<-internvl2.5-78b", teacher="OpenGVLab/InternVL2_5-78B", student="OpenGVLab/InternVL2_5-8B",
           dtype="bfloat16", max_length=4096, n_train=1_000_000, remote_code=True,
           stage1=_paper(8, 8), stage2=_paper(4, 16), stage3=_paper(8, 8), accelerate_config="configs/zero3.yaml",
           note="cluster; paper: 3.1 + 10.4 + 5.3 h on 128 A100 80GB"),
    Preset("qwen2-vl-7b<-internvl2.5-78b", teacher="OpenGVLab/InternVL2_5-78B", student="Qwen/Qwen2-VL-7B-Instruct",
           dtype="bfloat16", max_length=4096, n_train=1_000_000, remote_code=True,
           stage1=_paper(8, 8), stage2=_paper(4, 16), stage3=_paper(8, 8), accelerate_config="configs/zero3.yaml",
           note="cluster; cross-family, cross-tokenizer"),
]}


def get_preset(name: "str | Preset", **overrides) -> Preset:
    """The named preset (a Preset is taken as it is); `overrides` that are not None replace its fields, e.g.
    student="path/to/dir" (the command line's --teacher / --student)."""
    if not isinstance(name, Preset) and name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return replace(name if isinstance(name, Preset) else PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})
