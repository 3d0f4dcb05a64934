"""Every preset's pair at tiny size: the same transformers model classes, random init, offline.

| hub id family            | class at tiny size                         | note                                        |
|--------------------------|--------------------------------------------|---------------------------------------------|
| Qwen/Qwen2-VL-*          | Qwen2VLForConditionalGeneration            | same class as the hub checkpoints           |
| HuggingFaceTB/SmolVLM-*  | Idefics3ForConditionalGeneration           | SmolVLM is the Idefics3 architecture        |
| OpenGVLab/InternVL2_5-*  | InternVLForConditionalGeneration (native)  | stands in for the remote-code InternVLChatModel |
| tiny                     | Llava teacher / Idefics3 student           | the offline pair's classes                  |

Any other family of `families.FAMILIES` (Qwen2.5-VL, Gemma3, PaliGemma, Mistral3, LLaVA-NeXT, SmolVLM2), named by a
hub id or by a local directory's config.json, builds with the table's own tiny builder.
"""
from __future__ import annotations

from minigenrecal.models.families import FAMILIES, build_tiny_vlm, family_of_type, model_type_of_dir
from minigenrecal.models.presets import Preset
from minigenrecal.models.vlm import VLMView

TINY_VLM_FAMILIES = ("llava", "idefics3", "qwen2vl", "internvl")  # built by families.build_tiny_vlm
# hub-id substrings, most specific first
HUB_NAMES = (("qwen2.5-vl", "qwen25vl"), ("qwen2-vl", "qwen2vl"), ("smolvlm2", "smolvlm"), ("smolvlm", "idefics3"),
             ("idefics3", "idefics3"), ("internvl", "internvl"), ("paligemma", "paligemma"), ("gemma-3", "gemma3"),
             ("mistral-small-3", "mistral3"), ("llava-v1.6", "llavanext"), ("llava-next", "llavanext"),
             ("llava", "llava"))


def family_of(hub_id: str, side: str) -> str:
    """The family that stands in for a hub id or a local directory ('tiny': llava teacher, idefics3 student)."""
    if hub_id == "tiny":
        return "llava" if side == "teacher" else "idefics3"
    kind = model_type_of_dir(hub_id)
    if kind is not None:
        fam = family_of_type(kind)
        if fam is None:
            raise ValueError(f"no tiny stand-in family for {hub_id!r} (model type {kind!r})")
        return fam.key
    low = hub_id.lower()
    for key, fam in HUB_NAMES:
        if key in low:
            return fam
    raise ValueError(f"no tiny stand-in family for {hub_id!r}")


def tiny_width(family: str, d: int) -> int:
    """Qwen sides are always 64 wide: their M-RoPE sections [2, 3, 3] fix head_dim 16 (4 heads)."""
    return FAMILIES[family].width or d


def build_tiny(family: str, seed: int, d: int, layers: int):
    """(model, processor) of `family` at tiny size, random init."""
    d = tiny_width(family, d)
    if family in TINY_VLM_FAMILIES:
        return build_tiny_vlm(family, seed=seed, d=d, layers=layers)
    return FAMILIES[family].build(seed=seed, d=d, layers=layers)


def build_tiny_pair(preset: Preset, d_l: int = 96, d_s: int = 48, layers: int = 2, seed: int = 0,
                    max_length: int = 256) -> tuple[VLMView, VLMView]:
    """(teacher view, student view) of `preset`'s model classes at tiny size; the teacher is frozen."""
    ft, fs = family_of(preset.teacher, "teacher"), family_of(preset.student, "student")
    t_model, t_proc = build_tiny(ft, seed + 1, d_l, layers)
    s_model, s_proc = build_tiny(fs, seed, d_s, layers)
    t_model.requires_grad_(False)
    return (VLMView(t_model, t_proc, max_length, name="teacher"), VLMView(s_model, s_proc, max_length, name="student"))
