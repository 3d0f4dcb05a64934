"""Every preset's pair at tiny size: the same transformers model classes, random init, offline.

| hub id family            | class at tiny size                         | note                                        |
|--------------------------|--------------------------------------------|---------------------------------------------|
| Qwen/Qwen2-VL-*          | Qwen2VLForConditionalGeneration            | same class as the hub checkpoints           |
| HuggingFaceTB/SmolVLM-*  | Idefics3ForConditionalGeneration           | SmolVLM is the Idefics3 architecture        |
| OpenGVLab/InternVL2_5-*  | InternVLForConditionalGeneration (native)  | stands in for the remote-code InternVLChatModel |
| tiny                     | Llava teacher / Idefics3 student           | the offline pair's classes                  |
"""
from __future__ import annotations

from .config import Preset
from .tiny import build_tiny_vlm
from .vlm import VLMView


def family_of(hub_id: str, side: str) -> str:
    """The `tiny.build_tiny_vlm` family that stands in for a hub id ('tiny': llava teacher, idefics3 student)."""
    if hub_id == "tiny":
        return "llava" if side == "teacher" else "idefics3"
    low = hub_id.lower()
    for key, fam in (("qwen2-vl", "qwen2vl"), ("smolvlm", "idefics3"), ("idefics3", "idefics3"),
                     ("internvl", "internvl"), ("llava", "llava")):
        if key in low:
            return fam
    raise ValueError(f"no tiny stand-in family for {hub_id!r}")


QWEN2VL_TINY_D = 64  # tiny.build_tiny_vlm fixes Qwen2-VL's M-RoPE sections [2, 3, 3] for head_dim 16 (4 heads)


def tiny_width(family: str, d: int) -> int:
    return QWEN2VL_TINY_D if family == "qwen2vl" else d


def build_tiny_pair(preset: Preset, d_l: int = 96, d_s: int = 48, layers: int = 2, seed: int = 0,
                    max_length: int = 256) -> tuple[VLMView, VLMView]:
    """(teacher view, student view) of `preset`'s model classes at tiny size; the teacher is frozen.
    Qwen2-VL sides are always 64 wide (see QWEN2VL_TINY_D)."""
    ft, fs = family_of(preset.teacher, "teacher"), family_of(preset.student, "student")
    t_model, t_proc = build_tiny_vlm(ft, seed=seed + 1, d=tiny_width(ft, d_l), layers=layers)
    s_model, s_proc = build_tiny_vlm(fs, seed=seed, d=tiny_width(fs, d_s), layers=layers)
    t_model.requires_grad_(False)
    return (VLMView(t_model, t_proc, max_length, name="teacher"), VLMView(s_model, s_proc, max_length, name="student"))
