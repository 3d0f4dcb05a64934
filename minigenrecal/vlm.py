"""A uniform view of any transformers VLM: render a QA sample into question/answer spans, `body`, `head`.

Rendering decision: the question part is the chat template's prompt with `add_generation_prompt=True`
(image tokens expanded by the model's own processor); the answer part is the text the template puts after
that prompt for the assistant turn, tokenized on its own and cut just after the first end-of-turn/EOS token.
Tokenizing the two parts separately mirrors generation, where the model continues from the prompt.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import Sample, SampleError, to_rgb  # SampleError: a sample that cannot be used, named in the message
from .losses import answer_rows


@dataclass
class Encoded:
    """One sample rendered by one side: ids = question span + answer span."""

    input_ids: torch.Tensor  # (Lq + La,)
    q_len: int
    a_len: int
    vision: dict = field(default_factory=dict)  # pixel_values etc., each with a leading dim of 1 image-group
    id: str = "?"


class SimpleProcessor:
    """Tokenizer + image processor + an image-token expansion rule, for processors that need torchvision.

    `Qwen2VLProcessor` and `InternVLProcessor` require a video processor (and so torchvision); this stands in
    for them offline with exactly their expansion rule. `family` is 'qwen2vl' or 'internvl'.
    """

    def __init__(self, tokenizer, image_processor, family: str, image_token: str, image_seq_length: int = 0):
        self.tokenizer, self.image_processor, self.family = tokenizer, image_processor, family
        self.image_token, self.image_seq_length = image_token, image_seq_length
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.chat_template = tokenizer.chat_template

    def tokens_per_image(self, vis: dict, k: int, tiles: list[int]) -> int:
        """Image tokens for image k: Qwen2-VL's merged grid, or InternVL's fixed count per tile."""
        if self.family == "qwen2vl":
            return int(vis["image_grid_thw"][k].prod()) // self.image_processor.merge_size ** 2
        return self.image_seq_length * tiles[k]

    def __call__(self, text, images=None, return_tensors="pt", padding=False, padding_side="right"):
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
                out += self.image_token * self.tokens_per_image(vis, k, tiles) + p
                k += 1
            expanded.append(out)
        if k != len(flat):
            raise ValueError(f"{len(flat)} images but {k} {self.image_token} placeholders")
        enc = dict(self.tokenizer(expanded, return_tensors=return_tensors, padding=padding,
                                  padding_side=padding_side, add_special_tokens=False))
        if self.family == "qwen2vl":
            enc["mm_token_type_ids"] = (enc["input_ids"] == self.image_token_id).long()
        return {**enc, **vis}


def _image_token_id(model, processor) -> int:
    for obj in (processor, model.config):
        for name in ("image_token_id", "image_token_index"):
            v = getattr(obj, name, None)
            if isinstance(v, int):
                return v
    tok = getattr(processor, "tokenizer", processor)
    return tok.convert_tokens_to_ids(getattr(processor, "image_token", "<image>"))


class VLMView:
    """Uniform access to a VLM: `encode` a sample, `collate`, `body` (post-final-norm features), `head`."""

    def __init__(self, model: nn.Module, processor, max_length: int = 256, name: str = "model"):
        self.model, self.processor, self.max_length, self.name = model, processor, max_length, name
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.chat_template = getattr(processor, "chat_template", None) or self.tokenizer.chat_template
        if not self.chat_template:
            raise ValueError(f"{name}: the tokenizer has no chat template; set `tokenizer.chat_template` "
                             "(a Jinja string) so question and answer spans can be rendered")
        self.image_token_id = _image_token_id(model, processor)
        eos = model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self.eot_ids = {i for i in eos + [self.tokenizer.eos_token_id] if i is not None}
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    # -- the model, as the paper splits it --------------------------------------------------------------
    @property
    def head(self) -> nn.Linear:
        return self.model.get_output_embeddings()

    @property
    def d(self) -> int:
        return self.head.weight.shape[1]

    @property
    def V(self) -> int:
        return self.head.weight.shape[0]

    @property
    def text_config(self):
        return self.model.config.get_text_config()

    def body(self, batch: dict) -> torch.Tensor:
        """Post-final-norm last hidden state, (B, T, d); head(body(x)) equals the model's logits."""
        inputs = {k: v for k, v in batch.items() if k not in ("q_lens", "a_lens", "labels")}
        return self.model.model(**inputs).last_hidden_state

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Input (word) embeddings, (B, T, d)."""
        return self.model.get_input_embeddings()(input_ids)

    # -- rendering -------------------------------------------------------------------------------------
    def _messages(self, s: Sample, with_answer: bool) -> list[dict]:
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.question}]}]
        if with_answer:
            msgs.append({"role": "assistant", "content": [{"type": "text", "text": s.answer}]})
        return msgs

    def prompt(self, s: Sample) -> str:
        return self.tokenizer.apply_chat_template(self._messages(s, False), chat_template=self.chat_template,
                                                  add_generation_prompt=True, tokenize=False)

    def answer_ids(self, s: Sample) -> list[int]:
        """Answer tokens, cut just after the first end-of-turn/EOS token (appended if the template has none)."""
        prompt = self.prompt(s)
        full = self.tokenizer.apply_chat_template(self._messages(s, True), chat_template=self.chat_template,
                                                  tokenize=False)
        suffix = full[len(prompt):] if full.startswith(prompt) else s.answer
        ids = self.tokenizer(suffix, add_special_tokens=False)["input_ids"]
        for j, t in enumerate(ids):
            if t in self.eot_ids:
                return ids[: j + 1]
        return ids + [self.tokenizer.eos_token_id]

    @cached_property
    def end_of_turn_strings(self) -> list[str]:
        """Text that ends a turn: the end-of-turn/EOS tokens, and what the chat template writes after an answer."""
        ends = {t for t in self.tokenizer.convert_ids_to_tokens(sorted(self.eot_ids)) if t}
        probe = Sample(None, "Q", "ANSWER")
        prompt = self.prompt(probe)
        full = self.tokenizer.apply_chat_template(self._messages(probe, True), chat_template=self.chat_template,
                                                  tokenize=False)
        tail = full[len(prompt):].partition("ANSWER")[2].strip() if full.startswith(prompt) else ""
        return sorted(ends | ({tail} if tail else set()))

    def check_text(self, s: Sample) -> None:
        """Reject an answer holding an image placeholder, or a question/answer holding an end-of-turn string."""
        for tag in sorted({getattr(self.processor, "image_token", None) or "<image>", "<image>"}):
            if tag in s.answer:
                raise SampleError(f"sample {s.id}: the answer contains the image placeholder {tag!r} "
                                  "(the image belongs to the question)")
        for end in self.end_of_turn_strings:
            for part, text in (("answer", s.answer), ("question", s.question)):
                if end in text:
                    raise SampleError(f"sample {s.id}: the {part} contains the end-of-turn string {end!r} "
                                      f"of {self.name}, which would end the turn inside it")

    def _vision_inputs(self, s: Sample, prompt: str) -> dict:
        try:
            return dict(self.processor(text=[prompt], images=[[s.image]], return_tensors="pt"))
        except Exception as e:  # the processor's own check, re-raised with the sample's name
            raise SampleError(f"sample {s.id}: {self.name} processor rejected it: {e}") from e

    def encode(self, s: Sample) -> Encoded:
        """Render one sample with this model's own chat template and image pipeline; checks every failure mode."""
        if s.image is None:
            raise SampleError(f"sample {s.id}: no image (every GenRecal sample needs one)")
        if not s.answer or not s.answer.strip():
            raise SampleError(f"sample {s.id}: empty answer")
        self.check_text(s)
        s = replace(s, image=to_rgb(s.image, s.id))  # 8-bit RGB, converted faithfully (16-bit, palette, alpha)
        prompt = self.prompt(s)
        n_placeholders = prompt.count(getattr(self.processor, "image_token", "<image>"))
        if n_placeholders != 1:
            raise SampleError(f"sample {s.id}: {n_placeholders} image placeholders in the {self.name} prompt "
                              "but the sample has 1 image")
        out = self._vision_inputs(s, prompt)
        q = out.pop("input_ids")[0]
        out.pop("attention_mask", None)
        n_img = int((q == self.image_token_id).sum())
        expected = self.expected_image_tokens(out)
        if expected is not None and n_img != expected:
            raise SampleError(f"sample {s.id}: {n_img} image tokens in the {self.name} input but its image "
                              f"features need {expected}")
        a = torch.tensor(self.answer_ids(s), dtype=torch.long)
        if len(a) < 2:
            raise SampleError(f"sample {s.id}: the answer renders to no token before end-of-turn")
        if len(q) + len(a) > self.max_length:
            raise SampleError(f"sample {s.id}: rejected, too long for max_length={self.max_length} ({self.name}: "
                              f"question {len(q)} + answer {len(a)} tokens); raise max_length or shorten it")
        mm = out.pop("mm_token_type_ids", None)
        if mm is not None:
            out["mm_token_type_ids"] = mm[0]  # per-token; re-padded in collate
        return Encoded(torch.cat([q, a]), len(q), len(a), out, s.id)

    def expected_image_tokens(self, vis: dict) -> int | None:
        """How many image tokens the model's vision tower will produce for these pixels (None if unknown)."""
        cfg = self.model.config
        if "image_grid_thw" in vis:  # Qwen2-VL
            return int(vis["image_grid_thw"].prod(-1).sum()) // cfg.vision_config.spatial_merge_size ** 2
        pv = vis.get("pixel_values")
        if pv is None:
            return None
        kind = cfg.model_type
        if kind == "llava":
            vc = cfg.vision_config
            return pv.shape[0] * (vc.image_size // vc.patch_size) ** 2
        if kind in ("idefics3", "smolvlm"):
            vc = cfg.vision_config
            n_img = int(vis["pixel_attention_mask"].flatten(2).any(-1).sum()) if "pixel_attention_mask" in vis else pv.shape[1]
            return n_img * int((vc.image_size // vc.patch_size) ** 2 / cfg.scale_factor ** 2)
        if kind == "internvl":
            vc = cfg.vision_config
            per = int((vc.image_size[0] // vc.patch_size[0]) ** 2 * cfg.downsample_ratio ** 2)
            return pv.shape[0] * per
        return None

    def collate(self, encs: list[Encoded]) -> dict:
        """Right-pad to one batch; q_lens and a_lens ride along as (B,) tensors."""
        T = max(len(e.input_ids) for e in encs)
        ids = torch.full((len(encs), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(encs), T), dtype=torch.long)
        for b, e in enumerate(encs):
            ids[b, : len(e.input_ids)] = e.input_ids
            mask[b, : len(e.input_ids)] = 1
        batch = {"input_ids": ids, "attention_mask": mask,
                 "q_lens": torch.tensor([e.q_len for e in encs]), "a_lens": torch.tensor([e.a_len for e in encs])}
        for k in encs[0].vision:
            if k == "mm_token_type_ids":
                mm = torch.zeros((len(encs), T), dtype=torch.long)
                for b, e in enumerate(encs):
                    mm[b, : len(e.vision[k])] = e.vision[k]
                batch[k] = mm
            else:
                batch[k] = torch.cat([e.vision[k] for e in encs])
        return batch

    # -- spans -----------------------------------------------------------------------------------------
    def answer_labels(self, batch: dict) -> torch.Tensor:
        return answer_rows(batch["input_ids"], batch["q_lens"], batch["a_lens"], shift=0)

    def student_ce(self, z: torch.Tensor, batch: dict) -> torch.Tensor:
        """The model's ordinary next-token CE on its own answer tokens (EOS included)."""
        rows = answer_rows(z, batch["q_lens"], batch["a_lens"])  # (N, d)
        return F.cross_entropy(self.head(rows).float(), self.answer_labels(batch))

    # -- generation ------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, samples: list[Sample], max_new_tokens: int = 48) -> list[str]:
        """Greedy answers for a list of samples (left-padded batch). `max_new_tokens` must cover the longest answer
        in THIS model's tokenizer: a caption is 26 tokens for the tiny student (test_vlm checks the bound)."""
        prompts = [self.prompt(s) for s in samples]
        dev = next(self.model.parameters()).device
        images = [[to_rgb(s.image, s.id)] for s in samples]
        inputs = self.processor(text=prompts, images=images, return_tensors="pt", padding=True, padding_side="left")
        inputs = {k: v.to(dev) for k, v in inputs.items()}
        out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                  pad_token_id=self.pad_id, eos_token_id=sorted(self.eot_ids))
        new = out[:, inputs["input_ids"].shape[1]:]
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]
