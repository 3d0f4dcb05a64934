"""`python -m minigenrecal train`: stages 1-3 for a preset, launchable by `accelerate launch`.

    accelerate launch --config_file configs/single_gpu.yaml -m minigenrecal train --preset "smolvlm-256m<-qwen2-vl-2b" --data train.json
    accelerate launch --config_file configs/zero3.yaml -m minigenrecal train --preset "internvl2.5-8b<-internvl2.5-78b" --cache CACHE --data train.json
    accelerate launch --multi_gpu --num_processes 2 -m minigenrecal train --preset tiny --tiny-random --steps 1   # CPU, gloo

Pair: the preset's hub ids; `--tiny-random` builds the preset's model classes at tiny size instead (offline smoke
runs of a launch config). Data: the synthetic train split, or `--data` LLaVA conversation JSON/JSONL. `--cache DIR`
(from `cache-teacher` over the same samples) trains stages 1-2 without the teacher body: only its head is loaded.

A sample that cannot be read or rendered is skipped and recorded (id and reason) in OUT/skipped.jsonl, and the
count is printed; `--strict` fails on the first one instead.

Checkpoints go to OUT/checkpoints every `--checkpoint-every` optimizer steps and at each stage's end;
`--resume OUT` continues the run from the latest complete one, mid-stage, with the same numbers as an
uninterrupted run. OUT/manifest.json and OUT/train_log.json record what produced the run.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch


def load_student_only(preset, tiny_random: bool):
    from .vlm import VLMView
    if tiny_random:
        from .presets_tiny import build_tiny_pair
        return build_tiny_pair(preset)[1]
    if preset.student == "tiny":
        from .tiny import build_student
        model, proc = build_student(0)
    else:
        from .hub import load_hub_vlm
        model, proc = load_hub_vlm(preset.student, preset.dtype, preset.remote_code)
    return VLMView(model, proc, preset.max_length, name="student")


def _params(student, recal) -> dict[str, torch.Tensor]:
    out = {f"student.{k}": v.detach().cpu().float() for k, v in student.model.named_parameters()}
    out.update({f"recal.{k}": v.detach().cpu().float() for k, v in recal.named_parameters()})
    return out


def run(a) -> dict:
    from .checkpoint import Checkpointer, resolve_root, with_saved_tokenizer
    from .config import get_preset
    from .manifest import run_manifest, write_manifest
    from .data import make_split, read_llava_json
    from .recalibrator import Recalibrator
    from .stages import get_accelerator, train_stage

    preset = get_preset(a.preset)
    torch.manual_seed(a.seed)
    skipped = None if a.strict else []  # bad samples: left out and recorded in OUT/skipped.jsonl, or fail fast
    samples = (read_llava_json(a.data, a.image_root, multi_turn=a.multi_turn, skipped=skipped) if a.data
               else make_split(a.data_seed, "train", a.n or preset.n_train))
    teacher, cache = None, None
    if a.cache:
        from .cache import TeacherCache
        cache = TeacherCache(a.cache)
        samples = samples[: len(cache)]
        cache.check(samples)
        student = load_student_only(preset, a.tiny_random)
        head, d_l = cache.head(), cache.meta["d_l"]
    elif a.tiny_random:
        from .presets_tiny import build_tiny_pair
        teacher, student = build_tiny_pair(preset)
        head, d_l = teacher.head, teacher.d
    else:
        from .pipeline import load_pair
        teacher, student = load_pair(preset)
        head, d_l = teacher.head, teacher.d
    out = Path(a.out or (resolve_root(a.resume).parent if a.resume else "runs/train"))
    ckpt = None
    if a.resume:
        ckpt = Checkpointer(resolve_root(a.resume), a.checkpoint_every, resume=True)
        student = with_saved_tokenizer(student, ckpt)
    elif a.checkpoint_every > 0 and not a.no_save:
        ckpt = Checkpointer(out / "checkpoints", a.checkpoint_every)
    from .pipeline import encode_pairs, write_skip_report
    # a teacher cache is indexed by position: with one, a sample the student cannot render must fail the run
    data = encode_pairs(teacher, student, samples, None if cache is not None else skipped)
    torch.manual_seed(a.seed)
    recal = Recalibrator(d_l, student.text_config, preset.depth)
    acc = get_accelerator()
    if a.state_out:  # every rank writes its parameters before and after each stage, so a test can compare ranks
        Path(a.state_out).mkdir(parents=True, exist_ok=True)
        torch.save({"params": _params(student, recal)}, Path(a.state_out) / f"stage0-rank{acc.process_index}.pt")
    stages = [int(s) for s in a.stages.split(",")]
    over = {k: v for k, v in dict(steps=a.steps, batch_size=a.batch_size, grad_accum=a.grad_accum).items() if v}
    cfgs = {stage: replace(preset.stages()[stage], **over) for stage in stages}
    config = {k: v for k, v in vars(a).items() if k != "fn"}
    manifest = run_manifest({**config, "stage_configs": {k: asdict(c) for k, c in cfgs.items()},
                             "world_size": acc.num_processes}, a.seed)
    log = {"preset": preset.name, "world_size": acc.num_processes, "manifest": manifest, "stages": {},
           "samples": len(data), "skipped": len(skipped or [])}
    if acc.is_main_process:
        if not a.no_save:
            write_skip_report(out, skipped or [])
        print(f"training on {len(data)} samples; skipped {len(skipped or [])} bad sample(s)"
              + (f", ids and reasons in {out / 'skipped.jsonl'}" if skipped and not a.no_save else ""))
    if acc.is_main_process and not a.no_save:
        write_manifest(out, manifest)
    for stage in stages:
        t0 = time.time()
        hist = train_stage(stage, student, data, cfgs[stage], teacher=teacher, recal=recal, teacher_head=head,
                           teacher_fn=cache.teacher_fn if cache is not None and stage in (1, 2) else None,
                           progress=not a.quiet, checkpoint=ckpt, max_skips=a.max_skips)
        log["stages"][stage] = {"seconds": time.time() - t0, "last": hist[-1], "history": hist,
                                "skipped": sum(h.get("skipped", False) for h in hist)}
        if a.state_out:
            torch.save({"params": _params(student, recal), "loss": hist[-1]["loss"]},
                       Path(a.state_out) / f"stage{stage}-rank{acc.process_index}.pt")
    acc.wait_for_everyone()
    if acc.is_main_process and not a.no_save:
        out.mkdir(parents=True, exist_ok=True)
        acc.unwrap_model(student.model).save_pretrained(out / "student")
        (out / "train_log.json").write_text(json.dumps(log, indent=1, default=str) + "\n")
    return log


def add_command(sub) -> None:
    from .cli import add_preset_option
    from .data import MULTI_TURN
    t = sub.add_parser("train", help="stages 1-3 for a preset (launch with `accelerate launch -m minigenrecal train`)")
    add_preset_option(t)
    t.add_argument("--stages", default="1,2,3", help="comma-separated, e.g. 1,2")
    t.add_argument("--data", default=None, help="LLaVA conversation records, a .json list or a .jsonl file "
                                                "(default: the synthetic train split)")
    t.add_argument("--image-root", default=None, help="folder the records' image names are relative to "
                                                      "(default: the data file's folder)")
    t.add_argument("--multi-turn", default="reject", choices=list(MULTI_TURN),
                   help="records with several question/answer pairs: reject them (default), 'context' (each answer "
                        "with the earlier turns as text), or 'split' (each pair on its own, earlier turns dropped)")
    t.add_argument("--strict", action="store_true",
                   help="fail on the first bad sample instead of skipping it (skipped ones go to OUT/skipped.jsonl)")
    t.add_argument("--n", type=int, default=None, help="synthetic samples (default: the preset's n_train)")
    t.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic train split")
    t.add_argument("--cache", default=None, help="teacher cache dir: stages 1-2 without the teacher body")
    t.add_argument("--tiny-random", action="store_true", help="the preset's model classes at tiny size, random init")
    t.add_argument("--steps", type=int, default=None, help="override every stage's steps")
    t.add_argument("--batch-size", type=int, default=None, help="override every stage's batch size")
    t.add_argument("--grad-accum", type=int, default=None, help="override every stage's gradient accumulation steps")
    t.add_argument("--seed", type=int, default=0, help="Recalibrator init and data-order seed")
    t.add_argument("--out", default=None, help="default: runs/train, or the resumed run's directory")
    t.add_argument("--no-save", action="store_true", help="write nothing under OUT (no student, no checkpoints)")
    t.add_argument("--checkpoint-every", type=int, default=100,
                   help="optimizer steps between checkpoints in OUT/checkpoints (also at each stage's end); 0: none")
    t.add_argument("--resume", default=None, metavar="DIR",
                   help="continue from the latest complete checkpoint of a run (its OUT, or OUT/checkpoints)")
    t.add_argument("--max-skips", type=int, default=3,
                   help="stop after this many steps in a row with a non-finite loss or gradient (each is skipped)")
    t.add_argument("--state-out", default=None, help=argparse_hidden())
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(fn=run)


def argparse_hidden():
    import argparse
    return argparse.SUPPRESS
