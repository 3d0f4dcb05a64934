"""TRL's GOLDTrainer (cross-tokenizer ULD distillation, `trl.experimental.gold`) on the kit's tiny pair: a probe.

    pip install --no-deps trl==1.16.0          # not in requirements.lock: the study's GOLD row is not built yet
    OMP_NUM_THREADS=1 python benchmarks/gold_tiny_pair.py --max_steps 2

Saves the shipped tiny teacher (Llava, byte-BPE) and the random-init tiny student (Idefics3, Unigram) as transformers
directories, turns synthetic samples into GOLD's conversational prompt/completion records with an `images` column
(a `messages` dataset is refused by its VLM path with KeyError: 'prompt'), and trains off-policy (`lmbda=0`, no
student generation) with the ULD loss, each model with its own processor. With trl 1.16.0, transformers 5.25,
accelerate 1.16 and torch 2.13 (CPU) two steps run and print GOLD's losses. What a transfer-study row still needs:
the study's warm start as the student, its noisy-label data, its student-step budget and the same evaluation.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import datasets
from transformers import AutoModelForImageTextToText, AutoProcessor

from minigenrecal.data.synthetic import make_split
from minigenrecal.models.tiny import build_student, load_teacher


def records(n: int, seed: int = 0) -> datasets.Dataset:
    """Synthetic samples as GOLD's conversational prompt/completion records, one image each."""
    rows = [{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.question}]}],
             "completion": [{"role": "assistant", "content": [{"type": "text", "text": s.answer}]}],
             "images": [s.image]} for s in make_split(seed, "train", n)]
    return datasets.Dataset.from_list(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max_steps", type=int, default=2)
    ap.add_argument("--n", type=int, default=16, help="training samples")
    ap.add_argument("--per_device_train_batch_size", type=int, default=2)
    a = ap.parse_args()
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gold import GOLDConfig, GOLDTrainer  # optional: installed on purpose (see the docstring)
    with tempfile.TemporaryDirectory() as tmp:
        teacher_dir, student_dir = Path(tmp) / "teacher", Path(tmp) / "student"
        for (model, proc), d in ((load_teacher(), teacher_dir), (build_student(0), student_dir)):
            model.save_pretrained(d)
            proc.save_pretrained(d)
        cfg = GOLDConfig(output_dir=str(Path(tmp) / "out"), max_steps=a.max_steps, report_to="none", use_cpu=True,
                         per_device_train_batch_size=a.per_device_train_batch_size, logging_steps=1,
                         save_strategy="no", max_length=256, lmbda=0.0, use_uld_loss=True,
                         teacher_tokenizer_name_or_path=str(teacher_dir))
        trainer = GOLDTrainer(model=AutoModelForImageTextToText.from_pretrained(student_dir),
                              teacher_model=AutoModelForImageTextToText.from_pretrained(teacher_dir), args=cfg,
                              train_dataset=records(a.n), processing_class=AutoProcessor.from_pretrained(student_dir))
        print(trainer.train())


if __name__ == "__main__":
    main()
