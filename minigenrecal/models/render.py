"""Rendering a QA sample the way one model reads it: its chat template, its tokenizer and its image pipeline.

Rendering decision: the question part is the chat template's prompt with `add_generation_prompt=True`
(image tokens expanded by the model's own processor); the answer part is the text the template puts after
that prompt for the assistant turn, tokenized on its own and cut just after the first end-of-turn/EOS token.
Tokenizing the two parts separately mirrors generation, where the model continues from the prompt.

`Renderer` needs the model's config and generation config only (which token holds the image, which ids end a turn,
which family it is); `models.vlm.VLMView` adds the model itself.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from functools import cached_property

import torch
import torch.nn.functional as F

from minigenrecal.data.llava import (  # SampleError: a sample that cannot be used, named in the message
    SampleError,
    to_rgb,
)
from minigenrecal.data.synthetic import Sample
from minigenrecal.models.families import Family, family_of_type

_log = logging.getLogger(__name__)


@dataclass
class Encoded:
    """One sample rendered by one side: ids = question span + answer span. `vision` holds the processor's other
    outputs: per image (pixel_values etc., leading dim = images or tiles) as returned, and per token (the family's
    `PerToken` outputs) over the question only, (Lq,): `collate` completes them with the family's meaning."""

    input_ids: torch.Tensor  # (Lq + La,)
    q_len: int
    a_len: int
    vision: dict = field(default_factory=dict)
    id: str = "?"
    answer: str | None = None  # the sample's answer text, which `a_offsets` index
    a_offsets: list[tuple[int, int]] | None = None  # (La,): each answer token's (start, end) in `answer` (see
    # `Renderer.answer_offsets`); None where the tokenizer gives no offsets. Only text-aligned losses read the two.


def _image_token_id(config, processor) -> int:
    """The token the model fills with image features: its config's, else the processor's (Gemma3's processor
    names <start_of_image> there, which only opens the image)."""
    for obj in (config, processor):
        for name in ("image_token_id", "image_token_index"):
            v = getattr(obj, name, None)
            if isinstance(v, int):
                return v
    tok = getattr(processor, "tokenizer", processor)
    return tok.convert_tokens_to_ids(getattr(processor, "image_token", "<image>"))


def cat_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Join per-image tensors along dim 0, zero-padding every other dim to the largest (equal sizes: plain cat)."""
    shape = [max(t.shape[i] for t in tensors) for i in range(1, tensors[0].dim())]
    padded = []
    for t in tensors:
        pad = [p for i in reversed(range(1, t.dim())) for p in (0, shape[i - 1] - t.shape[i])]
        padded.append(F.pad(t, pad) if any(pad) else t)
    return torch.cat(padded)


class Renderer:
    """One model's rendering: `encode` a sample into question + answer spans (every failure named), `collate`."""

    def __init__(self, processor, config, generation_config, max_length: int = 256, name: str = "model"):
        self.processor, self.config, self.max_length, self.name = processor, config, max_length, name
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.chat_template = getattr(processor, "chat_template", None) or self.tokenizer.chat_template
        if not self.chat_template:
            raise ValueError(f"{name}: the tokenizer has no chat template; set `tokenizer.chat_template` "
                             "(a Jinja string) so question and answer spans can be rendered")
        self.image_token_id = _image_token_id(config, processor)
        eos = generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self.eot_ids = {i for i in eos + [self.tokenizer.eos_token_id] if i is not None}
        self._check_template_end()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.family: Family | None = family_of_type(getattr(config, "model_type", None))  # families.FAMILIES
        self.per_token = self.family.per_token if self.family is not None else {}

    def _messages(self, s: Sample, with_answer: bool) -> list[dict]:
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.question}]}]
        if with_answer:
            msgs.append({"role": "assistant", "content": [{"type": "text", "text": s.answer}]})
        return msgs

    def prompt(self, s: Sample) -> str:
        return self.tokenizer.apply_chat_template(self._messages(s, False), chat_template=self.chat_template,
                                                  add_generation_prompt=True, tokenize=False)

    def answer_suffix(self, s: Sample) -> str:
        """The text the chat template writes after the prompt for the assistant turn (the answer if it cannot tell)."""
        prompt = self.prompt(s)
        full = self.tokenizer.apply_chat_template(self._messages(s, True), chat_template=self.chat_template,
                                                  tokenize=False)
        return full[len(prompt):] if full.startswith(prompt) else s.answer

    def answer_ids(self, s: Sample) -> list[int]:
        """Answer tokens, cut just after the first end-of-turn/EOS token (appended if the template has none)."""
        ids = self.tokenizer(self.answer_suffix(s), add_special_tokens=False)["input_ids"]
        for j, t in enumerate(ids):
            if t in self.eot_ids:
                return ids[: j + 1]
        return ids + [self.tokenizer.eos_token_id]

    def answer_offsets(self, s: Sample, ids: list[int]) -> list[tuple[int, int]] | None:
        """Each answer token's (start, end) character span in `s.answer`'s coordinates, (La,), for `ids` =
        `answer_ids(s)`: template text before the answer gives negative offsets (a Metaspace tokenizer's leading
        '▁' piece ends at 0), the end-of-turn token and any template text after the answer start at or after
        len(s.answer); an EOS that `answer_ids` appended sits at the end of the template's text. None where the
        tokenizer is not a fast one (no offsets) or the template does not write the answer verbatim."""
        suffix = self.answer_suffix(s)
        start = suffix.find(s.answer)
        if not getattr(self.tokenizer, "is_fast", False) or start < 0:
            return None
        enc = self.tokenizer(suffix, add_special_tokens=False, return_offsets_mapping=True)
        n = min(len(ids), len(enc["input_ids"]))
        if enc["input_ids"][:n] != ids[:n]:  # the same text and tokenizer give the same ids; guard all the same
            return None
        spans = [(a - start, b - start) for a, b in enc["offset_mapping"][:n]]
        return spans + [(len(suffix) - start,) * 2] * (len(ids) - n)  # the appended EOS: after everything

    def _template_tail(self) -> str:
        """What the chat template writes after an answer (e.g. '<|im_end|>\\n'); '' if it cannot be told apart."""
        probe = Sample(None, "Q", "ANSWER")
        prompt = self.prompt(probe)
        full = self.tokenizer.apply_chat_template(self._messages(probe, True), chat_template=self.chat_template,
                                                  tokenize=False)
        return full[len(prompt):].partition("ANSWER")[2] if full.startswith(prompt) else ""

    def _check_template_end(self) -> None:
        """A template whose end-of-turn is not EOS would train answers as '... <|im_end|>\\n</s>' (end-of-turn, a
        newline, then EOS, which generation then needs to stop). A one-token end-of-turn that is a special token is
        taken as end-of-turn too (answers end with it, generation stops at it); any other end is only warned about."""
        ids = self.tokenizer(self._template_tail().strip(), add_special_tokens=False)["input_ids"]
        if not ids or ids[0] in self.eot_ids:
            return
        end, eos = self.tokenizer.convert_ids_to_tokens(ids[0]), self.tokenizer.eos_token
        added = getattr(self.tokenizer, "added_tokens_decoder", {}).get(ids[0])
        if ids[0] in self.tokenizer.all_special_ids or getattr(added, "special", False):
            self.eot_ids.add(ids[0])
            _log.warning(f"{self.name}: the chat template ends a turn with {end!r}, not the EOS {eos!r}; {end!r} is "
                         f"taken as end-of-turn (answers are trained to end with it, generation stops at it). Set "
                         f"generation_config.eos_token_id to include its id ({ids[0]}) for generation outside this kit")
        else:
            _log.warning(f"{self.name}: the chat template ends a turn with {self._template_tail().strip()!r}, which "
                         f"is not the EOS {eos!r} nor one special token: answers are trained to end with it and "
                         f"then {eos!r}")

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

    def adds_special_tokens(self, prompt: str) -> bool:
        """Whether the tokenizer may add its special tokens to a rendered prompt: not when the prompt already starts
        with BOS (the rule of transformers' `processor.apply_chat_template(tokenize=True)`), so a tokenizer that
        adds BOS itself never gives two."""
        bos = self.tokenizer.bos_token
        return not (bos and prompt.startswith(bos))

    def _vision_inputs(self, s: Sample, prompt: str) -> dict:
        try:
            return dict(self.processor(text=[prompt], images=[[s.image]], return_tensors="pt",
                                       add_special_tokens=self.adds_special_tokens(prompt)))
        except Exception as e:  # the processor's own check, re-raised with the sample's name
            raise SampleError(f"sample {s.id}: {self.name} processor rejected it: {e}") from e

    def _split_outputs(self, out: dict, q_len: int) -> dict:
        """Processor outputs minus the ids and mask: per-image ones as they are, per-token ones as (Lq,)."""
        vision = {}
        for k, v in out.items():
            if k in self.per_token:
                vision[k] = torch.as_tensor(v)[0]  # (Lq,); collate completes it over answer and padding
            elif torch.is_tensor(v) and v.shape == (1, q_len):
                raise ValueError(f"{self.name}: the processor returns the per-token output {k!r}, which "
                                 f"minigenrecal/models/families.py does not describe for model type "
                                 f"{self.config.model_type!r}; add the family there")
            else:
                vision[k] = v
        return vision

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
        out = self._split_outputs(out, len(q))
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
        return Encoded(torch.cat([q, a]), len(q), len(a), out, s.id, s.answer, self.answer_offsets(s, a.tolist()))

    def expected_image_tokens(self, vis: dict) -> int | None:
        """How many image tokens the model's vision tower will produce for these pixels (None: a family the table
        does not describe)."""
        if self.family is None or "pixel_values" not in vis:
            return None
        return self.family.image_tokens(self.config, vis)

    def collate(self, encs: list[Encoded]) -> dict:
        """Right-pad to one batch; q_lens and a_lens ride along as (B,) tensors.

        Per-image outputs are joined along their first dim (zero-padded where sizes differ, e.g. LLaVA-NeXT's tile
        counts). Per-token outputs take the family's meaning: the processor's values over the question, the family's
        answer value (or the answer ids) over the answer, its pad value at padding: (B, T) like input_ids.
        """
        T = max(len(e.input_ids) for e in encs)
        ids = torch.full((len(encs), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(encs), T), dtype=torch.long)
        for b, e in enumerate(encs):
            ids[b, : len(e.input_ids)] = e.input_ids
            mask[b, : len(e.input_ids)] = 1
        batch = {"input_ids": ids, "attention_mask": mask,
                 "q_lens": torch.tensor([e.q_len for e in encs]), "a_lens": torch.tensor([e.a_len for e in encs])}
        for k in encs[0].vision:
            if k in self.per_token:
                batch[k] = self._per_token(k, encs, ids)
            else:
                batch[k] = cat_padded([e.vision[k] for e in encs])
        return batch

    def _per_token(self, key: str, encs: list[Encoded], ids: torch.Tensor) -> torch.Tensor:
        """(B, T): question values from the processor, the family's answer value, its pad value after."""
        spec = self.per_token[key]
        out = torch.full(ids.shape, spec.pad, dtype=encs[0].vision[key].dtype)
        for b, e in enumerate(encs):
            out[b, : e.q_len] = e.vision[key]
            answer = ids[b, e.q_len: e.q_len + e.a_len]
            out[b, e.q_len: e.q_len + e.a_len] = answer if spec.answer is None else spec.answer
        return out
