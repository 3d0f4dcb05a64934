"""Commands of the studies: reproduce, transfer, warm-start."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from minigenrecal.study.reproduce import STUDENT_BASELINES, difference_lines, reproduce
from minigenrecal.study.reproduce import write_report as write_reproduce_report
from minigenrecal.study.transfer import Plan, analyse, probe_budget, quick_plan, transfer, tune_lr, write_report
from minigenrecal.study.warmstart import KINDS, train_warm_start


# -- the command of minigenrecal.study.reproduce ------------------------------------------------------------------------
def add_reproduce_command(sub) -> None:
    r = sub.add_parser("reproduce", help="the scaled-down reproduction table on the tiny pair (CPU, offline)")
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (one row per seed)")
    r.add_argument("--out", default="results", help="output directory (tiny.json, README.md, plots)")
    r.add_argument("--quick", action="store_true", help="one seed, a few steps, few samples (a smoke test)")
    r.add_argument("--steps-scale", type=float, default=1.0, help="x the tiny preset's steps per stage")
    r.add_argument("--batch-size", type=int, default=32, help="batch size of every stage and baseline")
    r.add_argument("--n-train", type=int, default=1000, help="training samples of the main rows")
    r.add_argument("--sizes", type=int, nargs="+", default=[200, 1000, 4000], help="data-scale sweep sizes")
    r.add_argument("--n-test", type=int, default=300, help="evaluation samples")
    r.add_argument("--eval-split", default="test", choices=["test", "val"],
                   help="split to evaluate on (val for choosing knobs)")
    r.add_argument("--threads", type=int, default=2, help="torch CPU threads (1 if the machine is shared)")
    r.add_argument("--teacher-dir", default=None, help="a tiny teacher checkpoint other than the shipped one")

    r.add_argument("--report-only", action="store_true",
                   help="re-render OUT/README.md and the plots from an existing OUT/tiny.json (no training)")
    r.add_argument("--only", nargs="+", default=None, metavar="METHOD", choices=STUDENT_BASELINES,
                   help="train only these student baselines and append their rows to OUT/tiny.json at its budgets "
                        "and generation cut (every existing row kept as it is; a method and seed already there is "
                        "skipped), then re-render the report")

    def run(a):
        if a.report_only:
            res = json.loads((Path(a.out) / "tiny.json").read_text())
            write_reproduce_report(res, Path(a.out))
            print(f"wrote {a.out}/README.md from {a.out}/tiny.json")
            return
        torch.set_num_threads(a.threads)
        res = reproduce(a.seeds, a.out, quick=a.quick, teacher_dir=a.teacher_dir, steps_scale=a.steps_scale,
                        batch_size=a.batch_size, n_train=a.n_train, sizes=a.sizes, n_test=a.n_test,
                        eval_split=a.eval_split, only=a.only)
        done = f"added {', '.join(a.only)} rows to" if a.only else f"in {res['runtime_seconds'] / 60:.1f} min wrote"
        print(f"{done} {a.out}/tiny.json and {a.out}/README.md")
        for line in difference_lines(res):
            print(line)
    r.set_defaults(fn=run)


# -- the command of minigenrecal.study.transfer -------------------------------------------------------------------------
def add_transfer_command(sub) -> None:
    r = sub.add_parser("transfer", help="does the Recalibrator pass on what the teacher knows? (label-noise study)")
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5], help="training seeds (paired rows)")
    r.add_argument("--out", default="results/transfer", help="output directory (transfer.json, README.md, plot)")
    r.add_argument("--jobs", type=int, default=2, help="seeds run in parallel, one process and one thread each")
    r.add_argument("--eval-split", default="test", choices=["test", "val"], help="val for choosing knobs")
    r.add_argument("--n-test", type=int, default=2000, help="evaluation items (paired across methods and seeds)")
    r.add_argument("--lr", type=float, default=1e-3, help="peak LR of every row (chosen on val, see README)")
    r.add_argument("--rhos", type=float, nargs="+", default=[0.0, 0.3, 0.5], help="label-noise fractions")
    r.add_argument("--no-variants", action="store_true", help="skip the GenRecal variants")
    r.add_argument("--quick", action="store_true", help="two seeds, a few steps and items (a smoke test)")
    r.add_argument("--no-posterior", action="store_true", help="skip the posterior-task regime")
    r.add_argument("--no-bounds", action="store_true", help="skip sequence-level KD (SFT on the teacher's answers)")
    r.add_argument("--no-same-student", action="store_true",
                   help="skip the headline regime's rows on one student and one schedule (GenRecal on the "
                        "same-tokenizer student, logit KD on GenRecal's schedule, SFT at the after-stage-2 steps)")
    r.add_argument("--no-ablations", action="store_true",
                   help="skip the paper's ablations (no regularization, KL only, depth 1, NPE off) at --ablation-rho")
    r.add_argument("--ablation-rho", type=float, default=0.5,
                   help="the label noise of the ablations (0.5, chosen on val: the regime where GenRecal - SFT is largest, "
                        "results/transfer_val)")
    r.add_argument("--no-transfer-variants", action="store_true",
                   help="skip our variants on the same-tokenizer student (no leak, the student's own answer "
                        "positions, distillation through stage 3)")
    r.add_argument("--no-gold", action="store_true",
                   help="skip TRL's GOLD (ULD and hybrid losses) on the cross student, in the headline regime")
    r.add_argument("--steps", type=int, nargs=3, default=[100, 200, 200], metavar=("S1", "S2", "S3"),
                   help="steps of stages 1, 2, 3 (student-only rows get S2 + S3); default 100 200 200")
    r.add_argument("--tune-lr", type=float, nargs="+", default=None,
                   help="instead of the study: SFT at these peak LRs on val (with --eval-split val), pick the best")
    r.add_argument("--report-only", action="store_true",
                   help="recompute the analysis (intervals, verdicts) from the rows in transfer.json and re-render "
                        "README.md and the plots; nothing is retrained")
    r.add_argument("--probe-budget", type=int, nargs="+", default=None, metavar="STEPS",
                   help="instead of the study: SFT at these student-step budgets on val (with --eval-split val), "
                        "at noise 0 and the headline noise; writes OUT/val_budget.json")

    def run(a):
        out = Path(a.out)
        if a.report_only:
            if (out / "transfer.json").exists():
                res = json.loads((out / "transfer.json").read_text())
            else:  # an interrupted study: report the seeds that completed, and say so
                per = [json.loads(f.read_text()) for f in sorted(out.glob("seeds/seed*_*.json"))]
                plan = Plan(seeds=sorted({d["seed"] for d in per}), rhos=a.rhos, n_test=a.n_test, lr=a.lr,
                            eval_split=a.eval_split, variants=not a.no_variants, posterior=not a.no_posterior)
                res = {"plan": asdict(plan), "rows": [r for d in per for r in d["rows"]], "jobs": a.jobs,
                       "runtime_seconds": float("nan"), "partial": f"{len(per)} seed-block(s) completed"}
            res["analysis"] = analyse(res)
            (out / "transfer.json").write_text(json.dumps(res, indent=1) + "\n")
            write_report(res, out)
            print(f"wrote {out}/README.md")
            return
        plan = quick_plan(a.seeds) if a.quick else Plan(seeds=a.seeds, rhos=a.rhos, n_test=a.n_test, lr=a.lr,
                                                         eval_split=a.eval_split, variants=not a.no_variants,
                                                         posterior=not a.no_posterior, bounds=not a.no_bounds,
                                                         same_student=not a.no_same_student, steps=tuple(a.steps),
                                                         ablations=not a.no_ablations, ablation_rho=a.ablation_rho,
                                                         transfer_variants=not a.no_transfer_variants,
                                                         gold=not a.no_gold)
        if a.probe_budget:
            probe_budget(plan, a.probe_budget, out)
            return
        if a.tune_lr:
            print(json.dumps(tune_lr(plan, a.tune_lr, out)["chosen_lr"]))
            return
        res = transfer(plan, out, a.jobs)
        print(f"wrote {out}/transfer.json and {out}/README.md in {res['runtime_seconds'] / 60:.1f} min")
    r.set_defaults(fn=run)


# -- the command of minigenrecal.study.warmstart ------------------------------------------------------------------------
def add_warmstart_command(sub) -> None:
    w = sub.add_parser("make-warm-start", help="caption-pretrain the students' shared warm start and save it")
    w.add_argument("--kind", choices=[*KINDS, "both"], default="both", help="which student to pretrain")
    w.add_argument("--n", type=int, default=12000, help="captions in the pretraining pool")
    w.add_argument("--steps", type=int, default=1500, help="optimizer steps")
    w.add_argument("--seed", type=int, default=0, help="init, pool and data-order seed")
    w.add_argument("--threads", type=int, default=1, help="torch threads; the same count gives the same weights")
    w.add_argument("--out", default=None, help="directory (default data_samples/warm_start/KIND)")

    def run(a):
        for kind in (KINDS if a.kind == "both" else [a.kind]):
            out = None if a.out is None else Path(a.out) / kind
            print(json.dumps(train_warm_start(kind, out, n=a.n, steps=a.steps, seed=a.seed, threads=a.threads)))
    w.set_defaults(fn=run)
