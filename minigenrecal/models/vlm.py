"""A uniform view of any transformers VLM: the model as the paper splits it (`body`, `head`), its own CE, greedy
generation, and (inherited from `models.render.Renderer`) how it renders a QA sample."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from minigenrecal.data.llava import to_rgb
from minigenrecal.data.synthetic import Sample
from minigenrecal.losses import answer_rows
from minigenrecal.models.render import Renderer


class VLMView(Renderer):
    """Uniform access to a VLM: `encode` a sample, `collate` (the `Renderer`), `body` (post-final-norm features),
    `head`, the model's own CE on its answers, `generate`."""

    def __init__(self, model: nn.Module, processor, max_length: int = 256, name: str = "model"):
        self.model = model
        super().__init__(processor, model.config, model.generation_config, max_length, name)

    # -- the model, as the paper splits it --------------------------------------------------------------
    def to(self, device) -> "VLMView":
        """Move the model to `device` (the training loop places a replicated teacher this way); returns the view."""
        self.model.to(device)
        return self

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
        """Post-final-norm last hidden state, (B, T, d); head(body(x)) equals the model's logits. No KV cache: the
        config's `use_cache` (True for every checkpoint) would build one on each training and teacher forward."""
        inputs = {k: v for k, v in batch.items() if k not in ("q_lens", "a_lens", "labels")}
        return self.model.model(**inputs, use_cache=False).last_hidden_state

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Input (word) embeddings, (B, T, d)."""
        return self.model.get_input_embeddings()(input_ids)

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
        inputs = self.processor(text=prompts, images=images, return_tensors="pt", padding=True, padding_side="left",
                                add_special_tokens=self.adds_special_tokens(prompts[0]))
        inputs = {k: v.to(dev) for k, v in inputs.items() if k != "labels"}
        out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                  pad_token_id=self.pad_id, eos_token_id=sorted(self.eot_ids))
        new = out[:, inputs["input_ids"].shape[1]:]
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]
