"""TRL's GOLD (`trl.experimental.gold.GOLDTrainer`, cross-tokenizer distillation) as rows of the transfer study.

GOLD trains the cross-tokenizer student from the study's warm start on the same noisy labels, for the student-only
rows' budget (stages 2 + 3's steps, batch 32), with the study's optimizer and LR schedule; the study's `evaluate` then
scores it on the same test items. Only the loss and the trainer are GOLD's:

- off-policy (`lmbda=0`): the noisy labels are the completions, the student generates nothing, as in every row;
- ULD (`gold_uld`): the student's CE on the labels plus ULD's sorted-probability distance to the teacher, with GOLD's
  span merging between the two tokenizations; hybrid (`gold_hybrid`): tokens both vocabularies share (119 of the
  student's 165 here) get a JSD on their probabilities instead, the rest ULD. Both weights are 1, as CE and KL are in
  GenRecal and logit KD. Which of the two leads the report was chosen on val (`choose_gold`).

What differs from the kit's own rows, by construction: GOLD's data order (the Trainer's sampler), and its completion
ends with the chat template's newline after `<end_of_utterance>` (TRL renders the whole turn; the kit stops at
end-of-turn). Prompt and answer tokens are otherwise the kit's own (`tests/test_gold.py`). The student's vision
encoder stays frozen, as in the kit's stage 3. Pinned: trl 1.16.0 (requirements.lock); the API is experimental.
"""
from __future__ import annotations

import os
import tempfile

import datasets
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, PrinterCallback

from minigenrecal.data.synthetic import Sample
from minigenrecal.loop import reset_accelerator
from minigenrecal.models.vlm import VLMView
from minigenrecal.stages import StageConfig, param_kind

GOLD_ROWS = {"gold_uld": {"hybrid": False}, "gold_hybrid": {"hybrid": True}}


def records(samples: list[Sample]) -> datasets.Dataset:
    """Samples as GOLD's conversational prompt/completion records with an `images` column (its VLM format)."""
    return datasets.Dataset.from_list([
        {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.question}]}],
         "completion": [{"role": "assistant", "content": [{"type": "text", "text": s.answer}]}],
         "images": [s.image]} for s in samples])


def gold_config(cfg: StageConfig, out: str, hybrid: bool):
    """GOLD's config for one run with the study's budget and optimizer: AdamW, LR linear from `lr` to `lr_end` over
    the steps (transformers' polynomial schedule with power 1 is the kit's `decay_fn`), no warmup, no clipping."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gold import GOLDConfig  # a 3 s import (experimental API), paid only by the GOLD rows
    return GOLDConfig(output_dir=out, max_steps=cfg.steps, per_device_train_batch_size=cfg.batch_size,
                      gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr, weight_decay=cfg.weight_decay,
                      lr_scheduler_type="polynomial", lr_scheduler_kwargs={"lr_end": cfg.lr_end, "power": 1.0},
                      warmup_steps=cfg.warmup_steps, optim="adamw_torch", max_grad_norm=cfg.max_grad_norm,
                      seed=cfg.seed, use_cpu=not torch.cuda.is_available(), report_to="none", save_strategy="no",
                      logging_steps=max(cfg.steps // 4, 1), disable_tqdm=True, max_length=512,
                      lmbda=0.0, use_uld_loss=True, uld_crossentropy_weight=1.0, uld_distillation_weight=1.0,
                      uld_use_hybrid_loss=hybrid)


def train_gold(student_dir, teacher_dir, samples: list[Sample], cfg: StageConfig, hybrid: bool,
               trainer_hook=None) -> tuple[VLMView, list[dict]]:
    """Train the student saved in `student_dir` with GOLD against the teacher in `teacher_dir`; returns the student
    (as the kit's view, ready for `evaluate`) and GOLD's log history. `trainer_hook(trainer)` runs before training."""
    from trl.experimental.gold import GOLDTrainer  # a 3 s import, paid only by the GOLD rows
    model = AutoModelForImageTextToText.from_pretrained(student_dir, dtype=torch.float32)
    proc = AutoProcessor.from_pretrained(student_dir)
    for name, p in model.named_parameters():  # the kit's stage 3: LLM + projector train, the vision encoder does not
        p.requires_grad_(param_kind(name) != "vision")
    reset_accelerator()  # the Trainer builds its own Accelerator: neither may inherit the other's shared state
    with tempfile.TemporaryDirectory() as tmp:
        trainer = GOLDTrainer(model=model, teacher_model=str(teacher_dir), args=gold_config(cfg, tmp, hybrid),
                              train_dataset=records(samples), processing_class=proc)
        trainer.remove_callback(PrinterCallback)  # GOLD's losses stay in its log history, not on stdout
        if trainer_hook is not None:
            trainer_hook(trainer)
        trainer.train()
    reset_accelerator()
    model = trainer.model.eval()
    return VLMView(model, proc, name="cross"), trainer.state.log_history


def gold_minus_sft(result: dict) -> dict[str, float]:
    """Each GOLD row's gap to SFT in a transfer study's analysis (fractions of items)."""
    return {c["a"].split("|")[1]: c["diff"] for c in result["analysis"]["comparisons"]
            if c["a"].split("|")[1] in GOLD_ROWS and c["b"].endswith("|sft")}


def choose_gold(val: dict) -> str | None:
    """The GOLD row to lead with, chosen on a val run: the larger GOLD - SFT gap (both rows still run on test)."""
    gaps = gold_minus_sft(val)
    return max(gaps, key=gaps.get) if gaps else None
