"""What differs between VLM families, in one table: the image-token count, per-token processor outputs, the
processor stand-in where the family's own processor needs torchvision, and a tiny random-init offline build.

`VLMView` reads this table (`family_of_model`) and never branches on a model type itself. A family that is not in
the table still works when its processor returns nothing per token; its image-token count is then unchecked.

    python -m minigenrecal families --markdown    # the README's family block, rendered from FAMILIES
"""
from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import transformers as tf
from tokenizers import processors
from transformers import (
    GotOcr2ImageProcessorPil,
    Idefics3ForConditionalGeneration,
    InternVLConfig,
    InternVLForConditionalGeneration,
    LlavaForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)
from transformers.image_processing_utils import select_best_resolution
from transformers.utils import cached_file

from minigenrecal.models.tiny import (
    CHATML,
    _finish,
    student_config,
    student_processor,
    teacher_config,
    teacher_processor,
    train_tokenizer,
)


# == processors ==================================================================================================
def images_only(cls: type) -> type:
    """`cls` (a transformers processor) without its video processor, which needs torchvision: the same class, the
    same text and image rendering, under the same name (so `save_pretrained` records `cls` for AutoProcessor)."""

    class ImagesOnly(cls):
        @classmethod
        def get_attributes(cls_):  # the sub-processors that are built, checked, saved and loaded
            return [a for a in super().get_attributes() if a != "video_processor"]

    ImagesOnly.__name__ = ImagesOnly.__qualname__ = cls.__name__
    return ImagesOnly


def _expand_qwen2vl(proc, vis: dict, k: int, tiles: list[int]) -> str:
    """Qwen2-VL: one token per merged grid cell of image k."""
    return proc.image_token * (int(vis["image_grid_thw"][k].prod()) // proc.image_processor.merge_size ** 2)


def _expand_internvl(proc, vis: dict, k: int, tiles: list[int]) -> str:
    """InternVL: a fixed count per tile."""
    return proc.image_token * (proc.image_seq_length * tiles[k])


def _expand_pixtral(proc, vis: dict, k: int, tiles: list[int]) -> str:
    """Pixtral (Mistral3): rows of [IMG] (one per merged patch), each ended by [IMG_BREAK], the last by [IMG_END]."""
    patch = proc.image_processor.patch_size["height"]  # the vision patch times the spatial merge
    h, w = (int(x) // patch for x in vis["image_sizes"][k])
    return ((proc.image_token * w + "[IMG_BREAK]") * h)[: -len("[IMG_BREAK]")] + "[IMG_END]"


EXPANSIONS = {"qwen2vl": _expand_qwen2vl, "internvl": _expand_internvl, "pixtral": _expand_pixtral}


class SimpleProcessor:
    """Tokenizer + image processor + one family's image-token expansion rule (`EXPANSIONS[family]`).

    Stands in where the family's processor cannot be built (PixtralProcessor needs torchvision) or renders another
    template (InternVL2.5's remote code). Same call as a transformers processor: text in, ids and pixels out.
    """

    def __init__(self, tokenizer, image_processor, family: str, image_token: str, image_seq_length: int = 0):
        self.tokenizer, self.image_processor, self.family = tokenizer, image_processor, family
        self.image_token, self.image_seq_length = image_token, image_seq_length
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.chat_template = tokenizer.chat_template

    def __call__(self, text, images=None, return_tensors="pt", padding=False, padding_side="right",
                 add_special_tokens=True):
        flat = [im for group in (images or []) for im in (group if isinstance(group, (list, tuple)) else [group])]
        vis = dict(self.image_processor(flat, return_tensors="pt")) if flat else {}
        tiles = [int(n) for n in vis.pop("num_patches", [1] * len(flat))]  # InternVL: tiles per image
        k, expanded = 0, []
        for t in text:
            parts = t.split(self.image_token)
            if k + len(parts) - 1 > len(flat):
                raise ValueError(f"more {self.image_token} placeholders than images ({len(flat)})")
            out = parts[0]
            for p in parts[1:]:
                out += EXPANSIONS[self.family](self, vis, k, tiles) + p
                k += 1
            expanded.append(out)
        if k != len(flat):
            raise ValueError(f"{len(flat)} images but {k} {self.image_token} placeholders")
        enc = dict(self.tokenizer(expanded, return_tensors=return_tensors, padding=padding,
                                  padding_side=padding_side, add_special_tokens=add_special_tokens))
        if self.family == "qwen2vl":
            enc["mm_token_type_ids"] = (enc["input_ids"] == self.image_token_id).long()
        return {**enc, **vis}


# == image tokens: how many the vision tower fills, from the model's config and the processor's pixels ===========
def _n_images(vis: dict) -> int:
    return vis["pixel_values"].shape[0]


def _grid(vc) -> int:
    """Patches per side of a square vision input (InternVL writes sizes as [h, w])."""
    side = lambda v: v[0] if isinstance(v, (list, tuple)) else v
    return side(vc.image_size) // side(vc.patch_size)


def _llava_tokens(cfg, vis: dict) -> int:
    full = cfg.vision_feature_select_strategy == "full"  # 'full' keeps the CLS feature
    return _n_images(vis) * (_grid(cfg.vision_config) ** 2 + full)


def _llava_next_tokens(cfg, vis: dict) -> int:
    """Base image + the tiles' features unpadded to the image's aspect ratio, one newline feature per row."""
    vc, side = cfg.vision_config, _grid(cfg.vision_config)
    total = 0
    for h, w in vis["image_sizes"].tolist():
        bh, bw = select_best_resolution([h, w], cfg.image_grid_pinpoints)
        rows, cols = side * bh // vc.image_size, side * bw // vc.image_size
        if w / h > cols / rows:
            rows -= 2 * ((rows - int(round(h * cols / w, 7))) // 2)
        else:
            cols -= 2 * ((cols - int(round(w * rows / h, 7))) // 2)
        total += side * side + (cfg.vision_feature_select_strategy == "full") + rows * cols + rows
    return total


def _idefics3_tokens(cfg, vis: dict) -> int:
    mask = vis.get("pixel_attention_mask")
    n_img = int(mask.flatten(2).any(-1).sum()) if mask is not None else vis["pixel_values"].shape[1]
    return n_img * int(_grid(cfg.vision_config) ** 2 / cfg.scale_factor ** 2)


def _qwen_tokens(cfg, vis: dict) -> int:
    return int(vis["image_grid_thw"].prod(-1).sum()) // cfg.vision_config.spatial_merge_size ** 2


def _internvl_tokens(cfg, vis: dict) -> int:
    return _n_images(vis) * int(_grid(cfg.vision_config) ** 2 * cfg.downsample_ratio ** 2)


def _gemma3_tokens(cfg, vis: dict) -> int:
    return _n_images(vis) * cfg.mm_tokens_per_image


def _paligemma_tokens(cfg, vis: dict) -> int:
    return _n_images(vis) * _grid(cfg.vision_config) ** 2


def _mistral3_tokens(cfg, vis: dict) -> int:
    patch = cfg.vision_config.patch_size * cfg.spatial_merge_size
    return sum((h // patch) * (w // patch) for h, w in vis["image_sizes"].tolist())


# == the table ====================================================================================================
@dataclass(frozen=True)
class PerToken:
    """A processor output with one value per token, as the family means it: `answer` over the answer span (None:
    the answer's token ids), `pad` at right padding. `encode` keeps the question part; `collate` adds the rest."""

    answer: int | None
    pad: int
    meaning: str


@dataclass(frozen=True)
class Family:
    """One VLM family: how to count its image tokens, what its processor returns per token, its stand-in, a tiny
    offline build, and what the README says about it."""

    key: str
    model_class: str
    model_types: tuple[str, ...]  # config.model_type values of this family
    processor: str  # the family's own processor class
    image_tokens: Callable[[object, dict], int]  # (model config, processor vision outputs) -> image tokens
    build: Callable[..., tuple]  # (seed, d, layers) -> (tiny random-init model, processor), offline
    stand_in: str = ""  # what renders instead of `processor` without torchvision ("" if it builds)
    per_token: dict[str, PerToken] = field(default_factory=dict)
    standard_layer: bool = True  # the text decoder layer is the Recalibrator block's shape (tested equal)
    width: int | None = None  # a fixed tiny hidden size (Qwen's M-RoPE sections need head_dim 16)
    note: str = ""

    def tested(self) -> str:
        """What tests/test_families.py checks for this family beyond what it checks for all (README table)."""
        parts = [f"`{k}`: {p.meaning}" for k, p in self.per_token.items()]
        parts.append("Recalibrator block = its decoder layer" if self.standard_layer
                     else "Recalibrator dimensions from its config")
        return "; ".join(parts + ([self.note] if self.note else []))


# == tiny builds ==================================================================================================
def _tokenizer(special: list[str], template: str, eos: str, pad: str, bos: str | None = None, **named):
    """The synthetic task's byte-BPE with the family's special tokens. `bos`: the tokenizer adds it itself (as
    Gemma, Llama and Mistral tokenizers do); `named`: attributes such as `tok.boi_token` that processors read."""
    base = train_tokenizer("bpe", 320, special, template, eos=eos, pad=pad)
    backend = base.backend_tokenizer
    if bos is not None:
        bos_id = backend.token_to_id(bos)
        backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                               special_tokens=[(bos, bos_id)])
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, pad_token=pad, bos_token=bos,
                                     extra_special_tokens=named or None)
    tok.chat_template = template
    return tok


def _text(tok, d: int, layers: int, **kw) -> dict:
    """A tiny text decoder over `tok`'s vocabulary."""
    return dict(vocab_size=len(tok), hidden_size=d, intermediate_size=2 * d, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, **kw)


VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=32,
              patch_size=8)  # a 4 x 4 patch grid


def _model(cls_name: str, cfg, tok, seed: int, eos: list[int] | None = None):
    torch.manual_seed(seed)
    model = _finish(getattr(tf, cls_name)(cfg), tok)
    if eos is not None:
        model.generation_config.eos_token_id = eos
    return model


def build_llava(seed=0, d=64, layers=2):
    return build_tiny_vlm("llava", seed, d, layers)


def build_idefics3(seed=0, d=64, layers=2):
    return build_tiny_vlm("idefics3", seed, d, layers)


MISTRAL_INST = ("{% for m in messages %}{% if m['role'] == 'user' %}[INST] "
                "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
                "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
                " [/INST]{% else %} {{ m['content'][0]['text'] }}</s>{% endif %}{% endfor %}")


def build_llava_next(seed=0, d=64, layers=2):
    """LLaVA-NeXT (v1.6, Mistral template): any-resolution tiles of 32 px; the tokenizer adds BOS itself."""
    tok = _tokenizer(["<unk>", "<s>", "</s>", "<pad>", "<image>"], MISTRAL_INST, eos="</s>", pad="<pad>", bos="<s>")
    pins = [[32, 32], [32, 64], [64, 32]]
    ip = tf.LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                       image_grid_pinpoints=pins)
    proc = tf.LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=8, chat_template=MISTRAL_INST,
                                 vision_feature_select_strategy="default", num_additional_image_tokens=1)
    cfg = tf.LlavaNextConfig(vision_config=dict(model_type="clip_vision_model", projection_dim=32, **VISION),
                             text_config=dict(model_type="mistral", **_text(tok, d, layers)),
                             image_token_id=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pins,
                             vision_feature_layer=-1, vision_feature_select_strategy="default")
    return _model("LlavaNextForConditionalGeneration", cfg, tok, seed), proc


def build_smolvlm(seed=0, d=64, layers=2):
    """SmolVLM with the tiny student's tokenizer and template; Idefics3Processor renders it (same expansion)."""
    proc = student_processor()
    tok = proc.tokenizer
    cfg = tf.SmolVLMConfig(vision_config=dict(VISION, image_size=48),  # 6 x 6 patches, pixel shuffle x 2: 9 tokens
                           text_config=dict(model_type="llama", **_text(tok, d, layers)), scale_factor=2,
                           image_token_id=tok.convert_tokens_to_ids("<image>"), pad_token_id=tok.pad_token_id)
    return _model("SmolVLMForConditionalGeneration", cfg, tok, seed), proc


def _qwen_processor(cls_name: str, stand_in):
    return images_only(getattr(tf, cls_name))(image_processor=stand_in.image_processor, tokenizer=stand_in.tokenizer,
                                              chat_template=CHATML_QWEN)


def build_qwen2vl(seed=0, d=64, layers=2):
    model, stand_in = build_tiny_vlm("qwen2vl", seed, d, layers)
    return model, _qwen_processor("Qwen2VLProcessor", stand_in)


def build_qwen25vl(seed=0, d=64, layers=2):
    """Qwen2.5-VL over the tiny Qwen2-VL's tokenizer and text config; its own windowed vision tower."""
    qwen2, stand_in = build_tiny_vlm("qwen2vl", seed, d, layers)
    text = {k: v for k, v in qwen2.config.text_config.to_dict().items() if k not in ("model_type", "architectures")}
    ids = {k: getattr(qwen2.config, k) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                                  "vision_end_token_id")}
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=d, patch_size=8,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[0])
    cfg = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    return _model("Qwen2_5_VLForConditionalGeneration", cfg, stand_in.tokenizer, seed), \
        _qwen_processor("Qwen2_5_VLProcessor", stand_in)


CHATML_INTERNVL_HF = CHATML.replace("<image>\n", "<IMG_CONTEXT>\n")  # the native processor adds <img> ... </img>


def build_internvl(seed=0, d=64, layers=2):
    """Native InternVL (the '-hf' checkpoints' class) with its own processor: 4 tokens per 32-px tile."""
    tok = _tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"],
                     CHATML_INTERNVL_HF, eos="<|im_end|>", pad="<|endoftext|>", start_image_token="<img>",
                     end_image_token="</img>", context_image_token="<IMG_CONTEXT>", video_token="<video>")
    ip = tf.GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=False)
    proc = images_only(tf.InternVLProcessor)(image_processor=ip, tokenizer=tok, image_seq_length=4,
                                             chat_template=CHATML_INTERNVL_HF)
    vision = dict(VISION, image_size=[32, 32], patch_size=[8, 8])
    cfg = tf.InternVLConfig(text_config=dict(model_type="qwen2", **_text(tok, d, layers)), vision_config=vision,
                            image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), downsample_ratio=0.5,
                            projector_hidden_act="gelu", vision_feature_layer=-1)
    return _model("InternVLForConditionalGeneration", cfg, tok, seed), proc


GEMMA3 = ("{{ bos_token }}{% for m in messages %}"
          "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{% for c in m['content'] %}"
          "{% if c['type'] == 'image' %}<start_of_image>{% else %}{{ c['text'] | trim }}{% endif %}{% endfor %}"
          "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def build_gemma3(seed=0, d=64, layers=2):
    """Gemma3: template starts with BOS and the tokenizer adds one too; 4 soft tokens per image between
    <start_of_image> and <end_of_image>; turns end with <end_of_turn>, EOS is <eos>."""
    special = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
               "<image_soft_token>"]
    tok = _tokenizer(special, GEMMA3, eos="<eos>", pad="<pad>", bos="<bos>", boi_token="<start_of_image>",
                     eoi_token="<end_of_image>", image_token="<image_soft_token>")
    ip = tf.Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    proc = tf.Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=4, chat_template=GEMMA3)
    text = _text(tok, d, layers, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                 layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"])
    cfg = tf.Gemma3Config(text_config=text, vision_config=dict(model_type="siglip_vision_model", **VISION),
                          mm_tokens_per_image=4, image_token_id=tok.image_token_id, boi_token_id=tok.boi_token_id,
                          eoi_token_id=tok.eoi_token_id)
    end = tok.convert_tokens_to_ids("<end_of_turn>")
    return _model("Gemma3ForConditionalGeneration", cfg, tok, seed, eos=[tok.eos_token_id, end]), proc


PALIGEMMA = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
             "{% elif m['role'] == 'user' %}{{ c['text'] }}{% else %}{{ c['text'] }}<eos>{% endif %}{% endfor %}"
             "{% endfor %}")


def build_paligemma(seed=0, d=64, layers=2):
    """PaliGemma: '<image> x 16, <bos>, question, newline' is the bidirectional prefix (the processor inserts the BOS
    and the newline); the answer and <eos> are the causal suffix."""
    tok = _tokenizer(["<pad>", "<eos>", "<bos>", "<image>"], PALIGEMMA, eos="<eos>", pad="<pad>", bos="<bos>")
    ip = tf.SiglipImageProcessorPil(size={"height": 32, "width": 32})
    ip.image_seq_length = 16
    proc = tf.PaliGemmaProcessor(image_processor=ip, tokenizer=tok, chat_template=PALIGEMMA)  # adds 1152 loc/seg
    cfg = tf.PaliGemmaConfig(text_config=dict(model_type="gemma", **_text(tok, d, layers, head_dim=16)),
                             vision_config=dict(model_type="siglip_vision_model", projection_dim=d, **VISION),
                             image_token_id=tok.convert_tokens_to_ids("<image>"), projection_dim=d,
                             vocab_size=len(tok))
    return _model("PaliGemmaForConditionalGeneration", cfg, tok, seed), proc


MISTRAL3 = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST]{% for c in m['content'] %}"
            "{% if c['type'] == 'image' %}[IMG]{% else %}{{ c['text'] }}{% endif %}{% endfor %}[/INST]"
            "{% else %}{{ m['content'][0]['text'] }}</s>{% endif %}{% endfor %}")


def build_mistral3(seed=0, d=64, layers=2):
    """Mistral3 (Pixtral vision, 8-px patches merged 2 x 2): the tokenizer adds BOS and the template writes it."""
    tok = _tokenizer(["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"],
                     MISTRAL3, eos="</s>", pad="<pad>", bos="<s>")
    ip = tf.PixtralImageProcessorPil(size={"longest_edge": 32}, patch_size={"height": 16, "width": 16})
    proc = SimpleProcessor(tok, ip, "pixtral", "[IMG]")
    vision = dict(VISION, model_type="pixtral", head_dim=8)
    cfg = tf.Mistral3Config(vision_config=vision, text_config=dict(model_type="mistral", **_text(tok, d, layers)),
                            image_token_id=tok.convert_tokens_to_ids("[IMG]"), spatial_merge_size=2,
                            vision_feature_layer=-1)
    return _model("Mistral3ForConditionalGeneration", cfg, tok, seed), proc


SAME_CLASS = "the same class without its video processor (`families.images_only`)"
MROPE = {"mm_token_type_ids": PerToken(0, 0, "marks image tokens (M-RoPE)")}
FAMILIES: dict[str, Family] = {f.key: f for f in [
    Family("llava", "LlavaForConditionalGeneration", ("llava",), "LlavaProcessor", _llava_tokens, build_llava),
    Family("llavanext", "LlavaNextForConditionalGeneration", ("llava_next",), "LlavaNextProcessor",
           _llava_next_tokens, build_llava_next, note="any-resolution tiles; the tokenizer adds BOS"),
    Family("idefics3", "Idefics3ForConditionalGeneration", ("idefics3",), "Idefics3Processor", _idefics3_tokens,
           build_idefics3),
    Family("smolvlm", "SmolVLMForConditionalGeneration", ("smolvlm",), "SmolVLMProcessor", _idefics3_tokens,
           build_smolvlm, stand_in="`Idefics3Processor` (the same image expansion; SmolVLMProcessor also needs "
                                   "num2words)"),
    Family("qwen2vl", "Qwen2VLForConditionalGeneration", ("qwen2_vl",), "Qwen2VLProcessor", _qwen_tokens,
           build_qwen2vl, stand_in=SAME_CLASS, width=64, per_token=MROPE),
    Family("qwen25vl", "Qwen2_5_VLForConditionalGeneration", ("qwen2_5_vl",), "Qwen2_5_VLProcessor", _qwen_tokens,
           build_qwen25vl, stand_in=SAME_CLASS, width=64, per_token=MROPE),
    Family("internvl", "InternVLForConditionalGeneration", ("internvl",), "InternVLProcessor", _internvl_tokens,
           build_internvl, stand_in=SAME_CLASS),
    Family("gemma3", "Gemma3ForConditionalGeneration", ("gemma3",), "Gemma3Processor", _gemma3_tokens, build_gemma3,
           per_token={"token_type_ids": PerToken(0, 0, "marks image tokens (bidirectional within an image)")},
           standard_layer=False, note="image token `<image_soft_token>`, not `<start_of_image>`; its layer has "
                                      "q/k norms and sandwich norms, the Recalibrator keeps its standard block"),
    Family("paligemma", "PaliGemmaForConditionalGeneration", ("paligemma",), "PaliGemmaProcessor",
           _paligemma_tokens, build_paligemma,
           per_token={"token_type_ids": PerToken(1, 1, "0 = bidirectional prefix, answer and padding 1 (causal)"),
                      "labels": PerToken(None, -100, "answer ids, -100 elsewhere")}),
    Family("mistral3", "Mistral3ForConditionalGeneration", ("mistral3",), "PixtralProcessor", _mistral3_tokens,
           build_mistral3, stand_in="`SimpleProcessor` with Pixtral's rows of [IMG], [IMG_BREAK], [IMG_END]"),
]}


def family_of_type(model_type: str | None) -> Family | None:
    """The table's entry for a `config.model_type` (None: a family the table does not describe)."""
    return next((f for f in FAMILIES.values() if model_type in f.model_types), None)


def family_of_model(model) -> Family | None:
    return family_of_type(getattr(getattr(model, "config", None), "model_type", None))


def model_type_of_dir(path: str | Path) -> str | None:
    """`model_type` in a local model directory's config.json (None if there is none)."""
    cfg = Path(path) / "config.json"
    return json.loads(cfg.read_text()).get("model_type") if cfg.is_file() else None


# == loading a processor where torchvision is absent ==============================================================
def load_processor(name_or_path: str, model_type: str | None = None, **kw):
    """`AutoProcessor.from_pretrained`, or, where the family's own processor cannot be built (torchvision absent),
    its stand-in: `STAND_INS[model_type]`, read from the same files."""
    try:
        return tf.AutoProcessor.from_pretrained(name_or_path, **kw)
    except (ImportError, AttributeError, TypeError, ValueError, OSError) as e:
        stand_in = STAND_INS.get(model_type or model_type_of_dir(name_or_path) or "")
        if stand_in is None:
            raise
        try:
            return stand_in(name_or_path, **kw)
        except Exception as e2:
            raise e2 from e


def _pixtral_from_pretrained(name_or_path: str, **kw) -> SimpleProcessor:
    """A saved PixtralProcessor (processor_config.json: patch_size, spatial_merge_size) as its stand-in."""
    cfg = json.loads(Path(cached_file(name_or_path, "processor_config.json", **kw)).read_text())
    patch = cfg.get("patch_size", 16) * cfg.get("spatial_merge_size", 1)
    ip = tf.PixtralImageProcessorPil.from_pretrained(name_or_path, **kw)
    ip.patch_size = {"height": patch, "width": patch}  # what PixtralProcessor passes its image processor
    tok = tf.AutoTokenizer.from_pretrained(name_or_path, **kw)
    return SimpleProcessor(tok, ip, "pixtral", cfg.get("image_token", "[IMG]"))


# model type -> (path, **kw) -> the stand-in processor, for families whose processor needs torchvision
STAND_INS: dict[str, Callable] = {
    "qwen2_vl": lambda path, **kw: images_only(tf.Qwen2VLProcessor).from_pretrained(path, **kw),
    "qwen2_5_vl": lambda path, **kw: images_only(tf.Qwen2_5_VLProcessor).from_pretrained(path, **kw),
    "internvl": lambda path, **kw: images_only(tf.InternVLProcessor).from_pretrained(path, **kw),
    "smolvlm": lambda path, **kw: tf.Idefics3Processor.from_pretrained(path, **kw),
    "mistral3": _pixtral_from_pretrained,
}


# == the README table =============================================================================================
ALL_TESTED = ("Every family below is built tiny, random-init and offline, and `tests/test_families.py` checks for "
              "each: head(body(x)) equals the logits and the spans decode; the question equals the family's own "
              "processor and chat template rendering for generation, with one BOS; the image-token count; padding "
              "changes nothing and no token attends forward; stages 1-3, one step each at batch 3.")


def markdown_table() -> str:
    """The README's family block: what is tested, the table (class, processor, what else is tested) and which
    processors are stood in for without torchvision."""
    rows = ["| family | class | processor | what else differs (tested) |", "|---|---|---|---|"]
    rows += [f"| `{f.key}` | `{f.model_class}` | `{f.processor}`{' *' if f.stand_in else ''} | {f.tested()} |"
             for f in FAMILIES.values()]
    groups: dict[str, list[str]] = {}
    for f in FAMILIES.values():
        if f.stand_in:
            groups.setdefault(f.stand_in, []).append(f"`{f.processor}`")
    stood_in = "; ".join(f"{', '.join(procs)} by {how}" for how, procs in groups.items())
    note = (f"* Without torchvision, transformers cannot build these processors and `families.load_processor` stands "
            f"in for them: {stood_in}. Every other processor above is the family's own, with a PIL image processor.")
    wrap = lambda text: textwrap.fill(text, width=116, break_on_hyphens=False, break_long_words=False)
    return wrap(ALL_TESTED) + "\n\n" + "\n".join(rows) + "\n\n" + wrap(note) + "\n"


# -- tiny random-init instances of other VLM families (for tests and preset smoke runs) -------------------
CHATML_QWEN = CHATML.replace("<image>\n", "<|vision_start|><|image_pad|><|vision_end|>")
CHATML_INTERNVL = CHATML.replace("<image>\n", "<img><IMG_CONTEXT></img>\n")


def build_tiny_vlm(family: str, seed: int = 0, d: int = 64, layers: int = 2):
    """A random-init tiny VLM of `family` ('llava', 'idefics3', 'qwen2vl', 'internvl') and its processor."""
    torch.manual_seed(seed)
    if family == "llava":
        proc = teacher_processor()
        cfg = teacher_config(proc.tokenizer)
        cfg.text_config.update(dict(hidden_size=d, num_hidden_layers=layers, intermediate_size=2 * d))
        return _finish(LlavaForConditionalGeneration(cfg), proc.tokenizer), proc
    if family == "idefics3":
        proc = student_processor()
        cfg = student_config(proc.tokenizer)
        cfg.text_config.update(dict(hidden_size=d, num_hidden_layers=layers, intermediate_size=2 * d))
        return _finish(Idefics3ForConditionalGeneration(cfg), proc.tokenizer), proc
    text = dict(hidden_size=d, intermediate_size=2 * d, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, bos_token_id=None)
    if family == "qwen2vl":
        tok = train_tokenizer("bpe", 320, ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                                           "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"], CHATML_QWEN,
                              eos="<|im_end|>", pad="<|endoftext|>")
        ip = Qwen2VLImageProcessorPil(patch_size=8, merge_size=2, temporal_patch_size=2,
                                      min_pixels=32 * 32, max_pixels=32 * 32)
        proc = SimpleProcessor(tok, ip, "qwen2vl", "<|image_pad|>")
        ids = {k: tok.convert_tokens_to_ids(v) for k, v in [("image_token_id", "<|image_pad|>"),
               ("video_token_id", "<|video_pad|>"), ("vision_start_token_id", "<|vision_start|>"),
               ("vision_end_token_id", "<|vision_end|>")]}
        cfg = Qwen2VLConfig(text_config=dict(vocab_size=len(tok), **text, eos_token_id=tok.eos_token_id,
                                             rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                              "rope_theta": 10000.0}),
                            vision_config=dict(depth=2, embed_dim=32, hidden_size=d, num_heads=4, patch_size=8,
                                               spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                                               mlp_ratio=2),
                            **ids)
        return _finish(Qwen2VLForConditionalGeneration(cfg), tok), proc
    if family == "internvl":
        tok = train_tokenizer("bpe", 320, ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>",
                                           "<IMG_CONTEXT>"], CHATML_INTERNVL, eos="<|im_end|>", pad="<|endoftext|>")
        ip = GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=False)
        proc = SimpleProcessor(tok, ip, "internvl", "<IMG_CONTEXT>", image_seq_length=4)
        cfg = InternVLConfig(text_config=dict(model_type="qwen2", vocab_size=len(tok), **text,
                                                         eos_token_id=tok.eos_token_id),
                             vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, image_size=[32, 32], patch_size=[8, 8]),
                             image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), downsample_ratio=0.5,
                             projector_hidden_act="gelu", vision_feature_layer=-1)
        return _finish(InternVLForConditionalGeneration(cfg), tok), proc
    raise ValueError(f"unknown family {family!r}")
