"""Loading a preset's student and teacher for a launch: the tiny pair, tiny random builds of a preset's classes,
or hub ids / local directories, and the teacher as a `load(meta)` function a backend can call on the meta device."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from minigenrecal.models.families import load_processor
from minigenrecal.models.hub import is_remote_internvl, load_hub_vlm, pinned
from minigenrecal.models.tiny import TEACHER_DIR, build_student, load_teacher
from minigenrecal.models.tiny_pairs import build_tiny_pair
from minigenrecal.models.vlm import VLMView


def hub_config(hub_id: str, revision: str | None, remote_code: bool):
    """A hub checkpoint's config without its weights (remote code: at its pinned revision)."""
    pin = pinned(hub_id, revision, remote_code and is_remote_internvl(hub_id))
    return AutoConfig.from_pretrained(hub_id, trust_remote_code=remote_code, **pin)


def load_student_only(preset, tiny_random: bool):
    if tiny_random:
        return build_tiny_pair(preset)[1]
    if preset.student == "tiny":
        model, proc = build_student(0)
    else:
        model, proc = load_hub_vlm(preset.student, preset.dtype, preset.remote_code, preset.attn, preset.student_revision)
        if preset.checkpointing:
            checkpoint_activations(model)
    return VLMView(model, proc, preset.max_length, name="student")


def student_loader(preset, tiny_random: bool):
    """load() -> the student (`load_student_only`), for a backend to call. `load.pretrained`: it reads saved weights
    (`from_pretrained`; the tiny students are random-init builds); `load.config()`: its config, without its weights."""
    def load():
        return load_student_only(preset, tiny_random)

    def config():
        return hub_config(preset.student, preset.student_revision, preset.remote_code)

    load.pretrained = not tiny_random and preset.student != "tiny"
    load.config = config
    return load


def checkpoint_activations(model: torch.nn.Module) -> list[str]:
    """Activation checkpointing on every layer stack of `model` that supports it (non-reentrant: frozen inputs and a
    student body run under no_grad in stage 1 need no special case); returns the names of the modules it switched
    on. An InternVL2.5 adapter's LLM is the remote model's `language_model`, whose own save keys stay untouched.
    InternLM2's and InternViT's remote code call `torch.utils.checkpoint` themselves, reentrant whatever is asked:
    loss and gradients stay bit-identical there (benchmarks/check_internvl_remote_code.py, check d), since the
    student's LLM trains in the stages that checkpoint."""
    target = model.chat.language_model if hasattr(model, "chat") else model
    target.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    names = [n for n, m in model.named_modules() if getattr(m, "gradient_checkpointing", False) is True]
    if not names:
        raise ValueError(f"{type(target).__name__} has no layer stack that supports activation checkpointing")
    return names


def teacher_loader(preset, tiny_random: bool, teacher_dir: str | Path | None = None):
    """load(meta) -> (teacher model, processor). meta=True builds the same model on the meta device without
    reading weights (the FSDP backend's ranks > 0 receive their shards from rank 0). `teacher_dir`: the tiny
    preset's teacher from another checkpoint than the shipped one."""
    def load(meta: bool):
        ctx = torch.device("meta") if meta else contextlib.nullcontext()
        if tiny_random:
            with ctx:
                view = build_tiny_pair(preset)[0]
            return view.model, view.processor
        if preset.teacher == "tiny":
            path = teacher_dir or TEACHER_DIR
            if not meta:
                return load_teacher(path)
            with ctx:
                model = LlavaForConditionalGeneration(LlavaConfig.from_pretrained(path))
            return model.eval(), LlavaProcessor.from_pretrained(path)
        if not meta:
            return load_hub_vlm(preset.teacher, preset.dtype, preset.remote_code, preset.attn, preset.teacher_revision)
        if preset.remote_code:
            raise ValueError(f"{preset.teacher} loads through remote code, which cannot be built on the meta device "
                             "for FSDP: launch with configs/zero3.yaml instead")
        pin = pinned(preset.teacher, preset.teacher_revision, False)
        config = AutoConfig.from_pretrained(preset.teacher, **pin)
        with ctx:
            model = AutoModelForImageTextToText.from_config(config, dtype=getattr(torch, preset.dtype),
                                                            attn_implementation=preset.attn)
        return model.eval(), load_processor(preset.teacher, config.model_type, **pin)

    def config():
        """The teacher's config, without reading its weights (a meta-device build; remote code: its config.json)."""
        if preset.remote_code and not tiny_random:
            return hub_config(preset.teacher, preset.teacher_revision, True)
        return load(True)[0].config

    load.config = config
    return load
