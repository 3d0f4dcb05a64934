"""The saved student's model card: OUT/student/README.md in the Hub's format (YAML front matter, then prose).

The front matter is `huggingface_hub.ModelCardData`: `base_model` (the student's hub id; absent for a tiny
random-init student, which has none), `library_name: transformers`, `pipeline_tag: image-text-to-text`, tags, and a
`model-index` with the exact match when the run evaluated the student. The prose names the teacher, each stage
with its steps, batch, accumulation and LR, the data, and how to evaluate the directory again.
"""
from __future__ import annotations

from pathlib import Path

from huggingface_hub import EvalResult, ModelCardData

from minigenrecal.stages import StageConfig

STAGE_NAMES = {1: "alignment (Recalibrator, teacher head)", 2: "distillation (student + Recalibrator)",
               3: "SFT (student)"}


def _is_hub_id(name: str) -> bool:
    return name != "tiny" and "/" in name and not Path(name).exists()


def model_card(*, student: str, teacher: str, stages: dict[int, StageConfig], data: str,
               evaluation: dict | None = None, preset: str | None = None) -> str:
    """The card's text. `evaluation`: {"metric": "exact_match", "value": ..., "dataset": ..., "n": ...}."""
    results = []
    if evaluation is not None:
        results = [EvalResult(task_type="visual-question-answering", dataset_type="minigenrecal-synthetic",
                              dataset_name=evaluation["dataset"], metric_type=evaluation.get("metric", "exact_match"),
                              metric_value=evaluation["value"])]
    meta = ModelCardData(base_model=student if _is_hub_id(student) else None, library_name="transformers",
                         pipeline_tag="image-text-to-text", model_name="student",
                         tags=["minigenrecal", "genrecal", "distillation", "vision-language"], eval_results=results or None)
    rows = "\n".join(f"| {s} | {STAGE_NAMES.get(s, '')} | {c.steps} | {c.batch_size} | {c.grad_accum} | "
                     f"{c.lr:g} -> {c.lr_end:g} |" for s, c in sorted(stages.items()))
    teacher_txt = f"[{teacher}](https://huggingface.co/{teacher})" if _is_hub_id(teacher) else f"`{teacher}`"
    base_txt = f"[{student}](https://huggingface.co/{student})" if _is_hub_id(student) else f"`{student}`"
    ev = ("Not evaluated by this run: `python -m minigenrecal evaluate --student DIR` scores it (exact match)."
          if evaluation is None else
          f"Exact match {evaluation['value']:.3f} on {evaluation['dataset']} ({evaluation['n']} items, "
          "`python -m minigenrecal evaluate`).")
    return f"""---
{meta.to_yaml()}
---

# GenRecal student

A vision-language model distilled with GenRecal (Generation after Recalibration, arXiv 2506.15681) by minigenrecal:
a Recalibrator let the teacher's frozen LM head read this model's features; the Recalibrator is not part of it.
It is a plain transformers directory (`AutoModelForImageTextToText` and `AutoProcessor` load it).

- **Base model (student):** {base_txt}
- **Teacher:** {teacher_txt}
- **Preset:** `{preset or "-"}`
- **Data:** {data}

| stage | what trains | steps | batch per device | accumulation | LR |
|---|---|---|---|---|---|
{rows}

## Evaluation

{ev}
"""


def write_model_card(student_dir: str | Path, **info) -> Path:
    """Write `model_card(**info)` as README.md in the saved student's directory; returns its path."""
    path = Path(student_dir) / "README.md"
    path.write_text(model_card(**info))
    return path
