"""Loading real pairs from the Hugging Face hub: the only module that touches the network. Tests use it on local
directories only.

A model is named by a hub id or a local directory (`--teacher` / `--student`). Native transformers classes load
through `AutoModelForImageTextToText` + `families.load_processor` (AutoProcessor, or the family's processor without
its video processor where torchvision is absent). InternVL2.5's hub
checkpoints (OpenGVLab/InternVL2_5-*) are remote-code `InternVLChatModel`s with another layout:
    LLM  model.language_model (InternLM2ForCausalLM for 8B, Qwen2ForCausalLM for 78B), head = its get_output_embeddings()
    ViT  model.vision_model, projector model.mlp1, `model.extract_feature(pixel_values)` -> (tiles, 256, d_llm)
    image token <IMG_CONTEXT>, 256 per 448-px tile, wrapped as <img>...</img>; dynamic tiling up to 12 tiles + thumbnail
`InternVLChatAdapter` wraps one so it looks like a native VLM to `VLMView` (`.model(...)`, heads, config,
generate), and `InternVLTileProcessor` renders its prompts. What of this cannot be checked offline is listed in
docs/scaling.md.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn
from transformers import (AutoModel, AutoModelForImageTextToText, AutoTokenizer, GenerationConfig,
                          GotOcr2ImageProcessorPil)

from minigenrecal.models.families import SimpleProcessor, load_processor, model_type_of_dir

TILE_PROCESSOR_FILE = "tile_processor.json"  # InternVLTileProcessor's settings beside a saved student
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
INTERNVL_SYSTEM = ("你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的"
                   "多模态大语言模型。")
# InternVL2.5's 'internvl2_5' conversation template as a Jinja chat template; the image goes before the question
# as '<img><IMG_CONTEXT></img>\n' (the processor expands <IMG_CONTEXT> to 256 x tiles), as `model.chat` does.
INTERNVL25_TEMPLATE = (
    "<|im_start|>system\n" + INTERNVL_SYSTEM + "<|im_end|>\n"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<img><IMG_CONTEXT></img>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


class InternVLTileProcessor(SimpleProcessor):
    """Tokenizer + tiling image processor; each image's <IMG_CONTEXT> becomes image_seq_length x its tile count."""

    def __init__(self, tokenizer, image_processor, image_seq_length: int = 256, image_token: str = "<IMG_CONTEXT>"):
        super().__init__(tokenizer, image_processor, "internvl", image_token, image_seq_length)

    def save_pretrained(self, path) -> None:
        """Tokenizer (with the chat template), the tiling image processor and TILE_PROCESSOR_FILE: what
        `load_hub_vlm` reads back from a saved student's directory."""
        path = Path(path)
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)
        (path / TILE_PROCESSOR_FILE).write_text(json.dumps({"image_seq_length": self.image_seq_length,
                                                            "image_token": self.image_token}) + "\n")

    @classmethod
    def from_saved(cls, path, tokenizer) -> "InternVLTileProcessor | None":
        """The processor `save_pretrained` wrote in `path` (None where there is none, e.g. a hub checkpoint)."""
        path = Path(path)
        if not (path / TILE_PROCESSOR_FILE).is_file():
            return None
        cfg = json.loads((path / TILE_PROCESSOR_FILE).read_text())
        return cls(tokenizer, GotOcr2ImageProcessorPil.from_pretrained(path), cfg["image_seq_length"], cfg["image_token"])


def internvl_image_processor(tile: int = 448, max_tiles: int = 12):
    """InternVL2.5's dynamic tiling (closest aspect-ratio grid of `tile`-px tiles, + a thumbnail), ImageNet norm."""
    return GotOcr2ImageProcessorPil(size={"height": tile, "width": tile}, crop_to_patches=True, min_patches=1,
                                    max_patches=max_tiles, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))


class _InternVLChatBody(nn.Module):
    """`.model(input_ids, attention_mask, pixel_values)` of the adapter: post-final-norm LLM features."""

    def __init__(self, chat_model: nn.Module):
        super().__init__()
        self.chat = chat_model

    def forward(self, input_ids, attention_mask=None, pixel_values=None, **_):
        chat = self.chat
        emb = chat.language_model.get_input_embeddings()(input_ids)  # (B, T, d)
        if pixel_values is not None:
            vit = chat.extract_feature(pixel_values.to(next(chat.vision_model.parameters()).dtype))  # (tiles, 256, d)
            mask = (input_ids == chat.img_context_token_id)[..., None]  # (B, T, 1)
            n_tok = int(mask.sum())
            if n_tok != vit.shape[0] * vit.shape[1]:
                raise ValueError(f"{n_tok} <IMG_CONTEXT> tokens but {vit.shape[0]} tiles x {vit.shape[1]} features")
            emb = emb.masked_scatter(mask, vit.to(emb.dtype))
        # use_cache=False: a training forward reads only the features; a KV cache would be built and thrown away
        out = chat.language_model.model(inputs_embeds=emb, attention_mask=attention_mask, use_cache=False)
        return SimpleNamespace(last_hidden_state=out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0])


class _ChatConfig:
    """The remote InternVLChatConfig, with `get_text_config()` giving its `llm_config`."""

    def __init__(self, cfg):
        self._cfg = cfg

    def __getattr__(self, k):
        if k == "_cfg" or k.startswith("__"):  # copy.copy/deepcopy probe dunders before _cfg exists
            raise AttributeError(k)
        return getattr(self._cfg, k)

    def get_text_config(self, *a, **k):
        return self._cfg.llm_config


CHAT_PREFIX = "model.chat."  # where the adapter holds the remote model: `.model` (the body) -> `.chat`


class InternVLChatAdapter(nn.Module):
    """A remote-code InternVLChatModel seen through the native-VLM interface that `VLMView` uses."""

    def __init__(self, chat_model: nn.Module, img_context_token_id: int):
        super().__init__()
        chat_model.img_context_token_id = img_context_token_id  # the remote model expects the caller to set it
        self.model = _InternVLChatBody(chat_model)
        self.config = _ChatConfig(chat_model.config)
        self.generation_config = chat_model.generation_config

    @property
    def chat(self) -> nn.Module:
        return self.model.chat

    def get_output_embeddings(self) -> nn.Linear:
        return self.chat.language_model.get_output_embeddings()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.chat.language_model.get_input_embeddings()

    def forward(self, input_ids, attention_mask=None, pixel_values=None, **_):
        z = self.model(input_ids, attention_mask, pixel_values).last_hidden_state
        return SimpleNamespace(logits=self.get_output_embeddings()(z))

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, pixel_values=None, **kw):
        """The remote generate returns only new tokens; prepend the prompt as native VLMs do."""
        new = self.chat.generate(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, **kw)
        return torch.cat([input_ids, new.to(input_ids.device)], 1)

    def chat_state_dict(self, state_dict: dict) -> dict:
        """The adapter's keys (`model.chat.language_model.…`) as InternVLChatModel's own (`language_model.…`)."""
        other = sorted(k for k in state_dict if not k.startswith(CHAT_PREFIX))
        if other:
            raise ValueError(f"{len(other)} keys are not the chat model's (no {CHAT_PREFIX!r} prefix), e.g. {other[:3]}")
        return {k[len(CHAT_PREFIX):]: v for k, v in state_dict.items()}

    def save_pretrained(self, path, state_dict: dict | None = None, **k):
        """The remote model's own save, with a given state dict's keys renamed to its layout, so the directory
        reloads with `AutoModel.from_pretrained(path, trust_remote_code=True)` (and `load_hub_vlm`)."""
        sd = None if state_dict is None else self.chat_state_dict(state_dict)
        return self.chat.save_pretrained(path, state_dict=sd, **k)


def is_remote_internvl(hub_id: str) -> bool:
    """OpenGVLab/InternVL2_5-* (or a local copy: model type 'internvl_chat') are remote code; the '-hf' conversions
    load natively."""
    kind = model_type_of_dir(hub_id)
    if kind is not None:
        return kind == "internvl_chat"
    return hub_id.startswith("OpenGVLab/InternVL") and not hub_id.endswith("-hf")


def pinned(hub_id: str, revision: str | None, remote_code: bool) -> dict:
    """`from_pretrained` keywords that pin what is loaded. Remote code is Python from the model's repository and runs
    on every rank: a hub id loaded with it must name a `revision` (a commit hash, set in the preset); a local
    directory is already fixed and takes none."""
    if Path(hub_id).is_dir():
        return {}
    if remote_code and not revision:
        raise ValueError(f"{hub_id} loads with trust_remote_code, which runs the repository's own Python: pin the "
                         "commit you have read (the preset's teacher_revision / student_revision), or pass a local "
                         "copy of the checkpoint as --teacher / --student")
    return {"revision": revision} if revision else {}


def for_transformers5(chat: nn.Module) -> None:
    """What InternVL2.5's remote code, written for transformers 4, needs on transformers 5 (each found by
    `benchmarks/check_internvl_remote_code.py` on tiny models built from that code):
    - a `generation_config`: transformers 5 gives one only to a class that can generate, and a second load of the
      same remote class in one process gets none;
    - InternLM2's rotary tables (`inv_freq`, `cos_cached`, `sin_cached`): not in the checkpoint and skipped by its
      weight init, so they load uninitialised (NaN features in that check): rebuilt from the config;
    - `_tied_weights_keys` as a list (transformers 4's form), on which transformers 5's save calls `.keys()`: an
      untied model (InternVL2.5's LLMs are) ties nothing, `{}`."""
    if getattr(chat, "generation_config", None) is None:
        chat.generation_config = GenerationConfig.from_model_config(chat.config.llm_config)
    for m in chat.language_model.modules():
        if hasattr(m, "_init_rope"):
            m._init_rope()
    for m in chat.modules():
        if isinstance(getattr(m, "_tied_weights_keys", None), list):
            if getattr(getattr(m, "config", None), "tie_word_embeddings", False):
                raise ValueError(f"{type(m).__name__} ties its embeddings and lists `_tied_weights_keys` in "
                                 "transformers 4's form: map each tied key to its source for transformers 5")
            m._tied_weights_keys = {}


def prefer_sdpa(lm: nn.Module) -> str:
    """Switch a loaded LLM off eager attention where its class allows SDPA; returns the implementation it runs.
    The 78B's Qwen2 LLM is a transformers class and runs SDPA (on transformers 5 it loads with SDPA already: the
    remote code's 'eager' setting no longer reaches it); the 8B's InternLM2 remote code has only 'eager' and
    'flash_attention_2', so it needs flash-attn on the GPU machines (docs/scaling.md)."""
    impl = getattr(lm.config, "_attn_implementation", None) or "eager"
    if impl == "eager" and getattr(lm, "_supports_sdpa", False):
        lm.set_attn_implementation("sdpa")
        impl = lm.config._attn_implementation
    if impl == "eager":
        warnings.warn(f"{type(lm).__name__} runs eager attention, whose (B, heads, T, T) scores do not fit at "
                      "InternVL's real lengths: install flash-attn on the GPU machines")
    return impl


def load_hub_vlm(hub_id: str, dtype: str = "bfloat16", remote_code: bool = False, attn: str | None = None,
                 revision: str | None = None):
    """(model, processor) of a hub id or local directory. With `remote_code`, InternVL2.5 loads wrapped in
    `InternVLChatAdapter` (a preset's flag covers both sides; a native model on the other side still loads natively).
    `attn`: the attention implementation ('sdpa', 'flash_attention_2'; None: transformers' default); `revision`: the
    commit to load (required for remote code from the hub, see `pinned`)."""
    dt = getattr(torch, dtype)
    remote = remote_code and is_remote_internvl(hub_id)
    pin = pinned(hub_id, revision, remote)
    if not remote:
        model = AutoModelForImageTextToText.from_pretrained(hub_id, dtype=dt, attn_implementation=attn, **pin).eval()
        return model, load_processor(hub_id, model.config.model_type, **pin)
    # use_flash_attn: the remote code takes flash-attn where it is installed (its ViT too), else 'eager'
    chat = AutoModel.from_pretrained(hub_id, dtype=dt, trust_remote_code=True, low_cpu_mem_usage=True,
                                     use_flash_attn=attn != "eager", **pin).eval()
    for_transformers5(chat)
    if attn != "eager":
        prefer_sdpa(chat.language_model)
    tok = AutoTokenizer.from_pretrained(hub_id, trust_remote_code=True, use_fast=False, **pin)
    tok.chat_template = INTERNVL25_TEMPLATE
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    tok.eos_token = "<|im_end|>"
    chat.generation_config.eos_token_id = eos
    proc = (InternVLTileProcessor.from_saved(hub_id, tok) if Path(hub_id).is_dir() else None) or \
        InternVLTileProcessor(tok, internvl_image_processor(), image_seq_length=chat.num_image_token)
    return InternVLChatAdapter(chat, tok.convert_tokens_to_ids("<IMG_CONTEXT>")), proc
