"""The whole GenRecal pipeline on a pair: load, render, stages 1-3, evaluate."""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from minigenrecal.data.pairs import as_samples, encode_pairs, write_skip_report
from minigenrecal.data.synthetic import Sample, make_split
from minigenrecal.evaluation.exact_match import exact_match
from minigenrecal.loop import AfterStage, PairData, run_stages, train_stage
from minigenrecal.models.hub import load_hub_vlm
from minigenrecal.models.presets import Preset
from minigenrecal.models.tiny import TEACHER_DIR, build_student, load_teacher
from minigenrecal.models.vlm import VLMView
from minigenrecal.scale.checkpoint import Checkpointer, resolve_root, with_saved_tokenizer
from minigenrecal.scale.manifest import run_manifest, write_manifest
from minigenrecal.scale.model_card import write_model_card
from minigenrecal.scale.tracking import Tracking
from minigenrecal.stages import StageConfig


def load_pair(preset: Preset, student_seed: int = 0) -> tuple[VLMView, VLMView]:
    """(teacher view, student view). A 'tiny' side is offline; a hub id or local directory loads through hub.py
    (each side on its own, so `--teacher` / `--student` can replace either)."""
    if preset.teacher == "tiny":
        t_model, t_proc = load_teacher()
    else:
        t_model, t_proc = load_hub_vlm(preset.teacher, preset.dtype, preset.remote_code)
    if preset.student == "tiny":
        s_model, s_proc = build_student(student_seed)
    else:
        s_model, s_proc = load_hub_vlm(preset.student, preset.dtype, preset.remote_code)
    t_model.requires_grad_(False)
    return (VLMView(t_model, t_proc, preset.max_length, name="teacher"),
            VLMView(s_model, s_proc, preset.max_length, name="student"))


def run_genrecal(teacher: VLMView, student: VLMView, train: list[Sample], stages: dict[int, StageConfig],
                 depth: int = 2, answer_input: str = "features", until: int = 3, progress: bool = True,
                 seed: int = 0, callback=None, *, checkpoint: Checkpointer | None = None, strict: bool = False,
                 callbacks=()) -> dict:
    """Stages 1..`until`; returns the Recalibrator, per-stage histories and the skipped samples. The student is
    trained in place.

    A sample that either side cannot render is skipped, said so on stdout, and listed in the result's 'skipped'
    ({"id", "reason"} each); `strict=True` raises on the first one instead.
    With `checkpoint`, stages finished before its resume point are not rerun (nor is `callback` for them);
    `callbacks` (e.g. a tracker) run after the checkpoint and before `callback`."""
    skipped = None if strict else []
    train = as_samples(train, skipped)
    data = encode_pairs(teacher, student, train, skipped)
    if skipped:
        print(f"skipped {len(skipped)} of {len(train)} training samples that cannot be rendered "
              f"(first: {skipped[0]['id']}: {skipped[0]['reason']})")
    after = [AfterStage(lambda st: callback(st.stage, student))] if callback is not None else []
    recal, histories = run_stages({s: stages[s] for s in range(1, until + 1)}, student, data, teacher, depth=depth,
                                  seed=seed, answer_input=answer_input, progress=progress,
                                  callbacks=([checkpoint] if checkpoint is not None else []) + list(callbacks) + after)
    return {"recal": recal, "histories": histories, "skipped": skipped or []}


def run_sft(student: VLMView, train: list[Sample], cfg: StageConfig, progress: bool = True) -> list[dict]:
    """The SFT-only baseline: the student's own CE (stage 3 alone)."""
    return train_stage(3, student, PairData([student.encode(s) for s in train]), cfg, progress=progress)


def demo(preset: Preset, out: str, data_seed: int = 0, n_test: int = 500, progress: bool = True, log=print, *,
         checkpoint_every: int = 0, resume: str | None = None, seed: int = 0, tracking: dict | None = None) -> dict:
    """Teacher ready -> stages 1, 2, 3 -> evaluation; saves the final student to OUT/student, the numbers to
    OUT/summary.json, what produced them to OUT/manifest.json.

    `checkpoint_every` > 0 writes checkpoints to OUT/checkpoints (every that many optimizer steps and at each
    stage's end); `resume` (a run's OUT or its checkpoints/) continues from the latest complete one.
    `tracking` (report_to, run_name, logging_steps) sends each stage's loss terms and the accuracy after it to
    accelerate's trackers (scale/tracking.py); `seed` is the Recalibrator's init seed."""
    t_start = time.time()
    manifest = run_manifest({"preset": asdict(preset), "data_seed": data_seed, "n_test": n_test,
                             "checkpoint_every": checkpoint_every, "resume": resume}, seed=seed)
    write_manifest(out, manifest)
    ckpt = None
    if resume:
        ckpt = Checkpointer(resolve_root(resume), checkpoint_every, resume=True)
    elif checkpoint_every > 0:
        ckpt = Checkpointer(Path(out) / "checkpoints", checkpoint_every)
    teacher, student = load_pair(preset)
    if ckpt is not None and resume:
        student = with_saved_tokenizer(student, ckpt)
    train = make_split(data_seed, "train", preset.n_train)
    test = make_split(data_seed, "test", n_test)
    res = {"teacher": exact_match(teacher, test)["accuracy"], "student_before": exact_match(student, test)["accuracy"]}
    log(f"teacher accuracy {res['teacher']:.3f}; student before {res['student_before']:.3f}")
    tracker = Tracking(**(tracking or {"report_to": ["none"]}), output_dir=out, plan=preset.stages(),
                       config={"preset": asdict(preset), "data_seed": data_seed, "n_test": n_test, "seed": seed})
    tracker.log_eval(None, {"exact_match": res["student_before"], "teacher_exact_match": res["teacher"]})
    after = {int(k): v for k, v in (ckpt.extra.get("after", {}) if ckpt is not None else {}).items()}

    def evaluate(stage, _):
        after[stage] = exact_match(student, test)["accuracy"]
        tracker.log_eval(stage, {"exact_match": after[stage]})
        if ckpt is not None:
            ckpt.extra["after"] = after  # goes into the next checkpoint, so a resumed run keeps it
    run = run_genrecal(teacher, student, train, preset.stages(), preset.depth, progress=progress, callback=evaluate,
                       checkpoint=ckpt, seed=seed, callbacks=[tracker])
    tracker.finish()
    for st, acc in after.items():
        res[f"student_after_stage{st}"] = acc
    res["student_after"] = after[3]
    res["skipped"] = len(run["skipped"])  # ids and reasons in OUT/skipped.jsonl
    write_skip_report(out, run["skipped"])
    out_dir = Path(out) / "student"
    student.model.save_pretrained(out_dir)
    student.processor.save_pretrained(out_dir)
    write_model_card(out_dir, student=preset.student, teacher=preset.teacher, stages=preset.stages(), preset=preset.name,
                     data=f"the synthetic shapes task, train split (seed {data_seed}, {preset.n_train} samples)",
                     evaluation={"dataset": f"the synthetic shapes task, test split (seed {data_seed})", "n": n_test,
                                 "value": after[3]})
    res["seconds"] = time.time() - t_start
    res["manifest"] = manifest
    res.update(preset=preset.name, data_seed=data_seed, n_test=n_test, threads=torch.get_num_threads())
    if preset.teacher == "tiny":  # which shipped teacher produced these numbers
        res["teacher_file_sha256"] = hashlib.sha256((TEACHER_DIR / "model.safetensors").read_bytes()).hexdigest()
    (Path(out) / "summary.json").write_text(json.dumps(res, indent=1) + "\n")  # everything but the histories
    res["histories"] = run["histories"]
    return res
