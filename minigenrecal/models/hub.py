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

from types import SimpleNamespace

import torch
import torch.nn as nn

from minigenrecal.models.families import SimpleProcessor, load_processor, model_type_of_dir

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


def internvl_image_processor(tile: int = 448, max_tiles: int = 12):
    """InternVL2.5's dynamic tiling (closest aspect-ratio grid of `tile`-px tiles, + a thumbnail), ImageNet norm."""
    from transformers import GotOcr2ImageProcessorPil
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
        out = chat.language_model.model(inputs_embeds=emb, attention_mask=attention_mask)
        return SimpleNamespace(last_hidden_state=out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0])


class _ChatConfig:
    """The remote InternVLChatConfig, with `get_text_config()` giving its `llm_config`."""

    def __init__(self, cfg):
        self._cfg = cfg

    def __getattr__(self, k):
        return getattr(self._cfg, k)

    def get_text_config(self, *a, **k):
        return self._cfg.llm_config


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

    def save_pretrained(self, *a, **k):
        return self.chat.save_pretrained(*a, **k)


def is_remote_internvl(hub_id: str) -> bool:
    """OpenGVLab/InternVL2_5-* (or a local copy: model type 'internvl_chat') are remote code; the '-hf' conversions
    load natively."""
    kind = model_type_of_dir(hub_id)
    if kind is not None:
        return kind == "internvl_chat"
    return hub_id.startswith("OpenGVLab/InternVL") and not hub_id.endswith("-hf")


def load_hub_vlm(hub_id: str, dtype: str = "bfloat16", remote_code: bool = False):
    """(model, processor) of a hub id or local directory. With `remote_code`, InternVL2.5 loads wrapped in
    `InternVLChatAdapter` (a preset's flag covers both sides; a native model on the other side still loads natively)."""
    from transformers import AutoModel, AutoModelForImageTextToText, AutoTokenizer
    dt = getattr(torch, dtype)
    if not (remote_code and is_remote_internvl(hub_id)):
        model = AutoModelForImageTextToText.from_pretrained(hub_id, dtype=dt).eval()
        return model, load_processor(hub_id, model.config.model_type)
    chat = AutoModel.from_pretrained(hub_id, dtype=dt, trust_remote_code=True, low_cpu_mem_usage=True,
                                     use_flash_attn=False).eval()
    tok = AutoTokenizer.from_pretrained(hub_id, trust_remote_code=True, use_fast=False)
    tok.chat_template = INTERNVL25_TEMPLATE
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    tok.eos_token = "<|im_end|>"
    chat.generation_config.eos_token_id = eos
    proc = InternVLTileProcessor(tok, internvl_image_processor(), image_seq_length=chat.num_image_token)
    return InternVLChatAdapter(chat, tok.convert_tokens_to_ids("<IMG_CONTEXT>")), proc
