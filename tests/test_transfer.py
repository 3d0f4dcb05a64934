"""The transfer study: label noise, the caption pool, paired statistics, and one quick end-to-end run."""
import dataclasses
import json

import pytest

from minigenrecal.data.synthetic import label_noise, make_caption_pool, make_split
from minigenrecal.data.synthetic import candidates, is_closed


# -- label noise ---------------------------------------------------------------------------------------------------
def test_label_noise_replaces_exactly_rho_n_answers_with_wrong_ones():
    train = make_split(0, "train", 60)
    noisy, idx = label_noise(train, 0.3, seed=4)
    assert len(idx) == 18 and len(set(idx)) == 18
    for i, (s, n) in enumerate(zip(train, noisy)):
        assert n.id == s.id and n.question == s.question and n.image is s.image
        if i in idx:
            assert n.answer != s.answer
            if is_closed(s):
                assert n.answer in candidates(s.question)
            else:  # a caption of another grid: four cells, each 'nothing' or '<colour> <shape>'
                assert len(n.answer.split(", ")) == 4
        else:
            assert n.answer == s.answer


def test_label_noise_is_deterministic_and_seeded():
    train = make_split(0, "train", 40)
    a, ia = label_noise(train, 0.5, seed=1)
    b, ib = label_noise(train, 0.5, seed=1)
    c, ic = label_noise(train, 0.5, seed=2)
    assert ia == ib and [s.answer for s in a] == [s.answer for s in b]
    assert ia != ic
    assert label_noise(train, 0.0, seed=1)[1] == []
    with pytest.raises(ValueError, match="rho"):
        label_noise(train, 1.0, seed=1)


def test_caption_pool_is_disjoint_from_the_splits():
    pool = make_caption_pool(0, 30)
    assert all(s.question == "Describe the grid." for s in pool)
    blank = "nothing, nothing, nothing, nothing"  # an empty grid looks the same in every pool
    train_pixels = {s.image.tobytes() for s in make_split(0, "train", 300)}
    assert not train_pixels & {s.image.tobytes() for s in pool if s.answer != blank}
    assert [s.answer for s in pool] == [s.answer for s in make_caption_pool(0, 30)]


# -- the warm start and one quick end-to-end study -----------------------------------------------------------------------
def test_warm_start_build_is_bit_identical_twice(tmp_path):
    from minigenrecal.study.warmstart import load_warm_start, train_warm_start
    kw = dict(n=8, steps=2, batch_size=4, warmup=1, n_eval=2, log=lambda m: None)
    a = train_warm_start("cross_tokenizer", tmp_path / "a", **kw)
    b = train_warm_start("cross_tokenizer", tmp_path / "b", **kw)
    assert a["weights_sha256"] == b["weights_sha256"]
    from minigenrecal.models.tiny import build_student
    from minigenrecal.study.teacher import weights_digest
    assert a["weights_sha256"] != weights_digest(build_student(0)[0])  # it trained
    model, proc = load_warm_start("cross_tokenizer", tmp_path / "a")
    assert weights_digest(model) == a["weights_sha256"] and proc.tokenizer.vocab_size > 0


def test_quick_transfer_study_end_to_end(tmp_path, monkeypatch):
    from minigenrecal.study import transfer as T
    from minigenrecal.models.tiny import TEACHER_DIR
    if not T.POSTERIOR_TEACHER_DIR.exists():  # the posterior teacher ships with the package; stand in if absent
        monkeypatch.setattr(T, "POSTERIOR_TEACHER_DIR", TEACHER_DIR)
    plan = T.quick_plan([0, 1])
    res = T.transfer(plan, tmp_path, jobs=1)
    got = {(r["regime"], r["method"], r["seed"]) for r in res["rows"]}
    noise = [("teacher_labels", "seq_kd")] + [("noise0.5", m) for m in ("sft", "same_arch_sft", "same_tokenizer_kd",
                                                                        "genrecal", "genrecal_after_stage2", *T.VARIANTS,
                                                                        *T.SAME_STUDENT)]
    traced = [*T.ABLATIONS, *T.TRANSFER_VARIANTS]  # the quick plan's ablations run at its one noise level, 0.5
    noise += [("noise0.5", m) for m in ("warm_start", "sft_stage2_steps", *traced, *(f"{v}_after_stage2" for v in traced))]
    noise += [("noise0.5", g) for g in T.GOLD_ROWS]  # TRL's GOLD on the cross student
    post = [("posterior", m) for m in ("sft", "same_arch_sft", "same_tokenizer_kd", "seq_kd", "oracle", "genrecal",
                                       "genrecal_after_stage2")]
    assert got == {(r, m, s) for r, m in noise + post for s in (0, 1)}
    for r in res["rows"]:
        assert len(r["correct"]) == plan.n_test and r["accuracy"] == r["correct"].count("1") / plan.n_test
        assert 0 <= r["ece"] <= 1  # kept for the paper's ECE claim
        if r["regime"] == "posterior":
            assert r["posterior_nll"] > 0 and 0 <= r["posterior_jsd"] <= 0.7
        one_stage = r["method"].endswith("_after_stage2")  # its diagnosis (where it has one) is stage 2's dict
        for d in ([r["diagnosis"]] if one_stage and "diagnosis" in r else [] if one_stage else r.get("diagnosis", {}).values()):
            assert d["grad_ce_reg"] == 0 and d["grad_kl_reg"] == 0  # the regularization path never reaches the student
            assert d["grad_kl_main"] > 0 and d["grad_ce_student"] > 0
            assert d["grad_distill_share"] > 0  # a ratio of norms: above 1 where distillation opposes the CE
    for r in res["rows"]:  # every traced run: the diagnosis at stage 2's start, middle and end, and the run's end
        if r["method"] in traced:
            assert list(r["diagnosis"]) == ["after_stage1", "mid_stage2", "after_stage2", "after_stage3"]
            assert {f"recal_acc_first_{t}" for t in ("caption", "cell", "count")} <= r["diagnosis"]["mid_stage2"].keys()
    # after stages 2 and 3 each; the stage-wise ordering (3, one of them also a one-student comparison: listed once)
    n_ablation = 2 * len(T.ABLATIONS) + 2
    assert len({(c["a"], c["b"]) for c in res["analysis"]["comparisons"]}) == len(res["analysis"]["comparisons"])
    n_variants = 3 * len(T.TRANSFER_VARIANTS) - 1  # 400 and 200 steps against SFT; against the method (not itself)
    n_gold = 2 * len(T.GOLD_ROWS)  # each against SFT and against GenRecal
    assert len(res["analysis"]["comparisons"]) == 5 + 2 * len(T.VARIANTS) + len(T.SAME_STUDENT_COMPARISONS) + 6 \
        + n_ablation + n_variants + n_gold
    for c in res["analysis"]["comparisons"]:  # every comparison: a crossed interval, a kind, a yardstick, a verdict
        assert c["seeds"] == 2 and c["items"] == plan.n_test and c["ci95"][0] <= c["diff"] <= c["ci95"][1]
        assert c["kind"] in ("control", "control on GenRecal's schedule", "transfer", "variant", "architecture",
                             "stage-wise", "ablation") \
            and c["verdict"]
        assert c["yardstick"] is None or c["yardstick"] > 0
    assert {f.name for f in (tmp_path / "seeds").iterdir()} == {f"seed{s}_{b}.json" for s in (0, 1) for b in T.blocks(plan)}
    text = (tmp_path / "README.md").read_text()
    assert "\n".join(T.report_lines(res)) in text and (tmp_path / "transfer.png").exists()
    for r in res["rows"]:  # GOLD trained the quick plan's student-only budget (its own log's last step)
        if r["method"] in T.GOLD_ROWS:
            assert r["gold_log"][-1]["step"] == plan.steps[1] + plan.steps[2]
    for lines in (T.ablation_lines(res), T.variant_lines(res), T.trace_lines(res), T.gold_lines(res)):  # each, whole
        assert lines and "\n".join(lines) in text
    assert (tmp_path / "trace.png").exists()
    saved = json.loads((tmp_path / "transfer.json").read_text())
    assert saved["analysis"] == json.loads(json.dumps(res["analysis"]))
    from minigenrecal.scale.manifest import FIELDS
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert set(FIELDS) <= manifest.keys() and saved["manifest"] == manifest and manifest["seed"] == [0, 1]
    n_blocks = 2 * len(T.blocks(plan))
    assert res["blocks"] == {"total": n_blocks, "read_back": 0} and f"training {n_blocks} of its {n_blocks}" in text
    again = T.transfer(plan, tmp_path, jobs=1)  # every seed file exists: read back, nothing retrained
    assert again["rows"] == res["rows"] and again["runtime_seconds"] < 5
    assert again["blocks"] == {"total": n_blocks, "read_back": n_blocks}
    assert len(again["invocations"]) == 1  # reading back trains nothing: no second invocation is recorded
    assert again["invocations"][0]["trained"] == sorted(T.blocks(plan))
    assert f"training 0 of its {n_blocks} seed-blocks;" in (tmp_path / "README.md").read_text()


def test_a_student_built_twice_has_one_vocabulary():
    from minigenrecal.models.tiny import STUDENT_TOKENIZER, build_student
    from minigenrecal.study.teacher import weights_digest
    (m1, p1), (m2, p2) = build_student(0), build_student(0)
    assert weights_digest(m1) == weights_digest(m2)
    assert p1.tokenizer.get_vocab() == p2.tokenizer.get_vocab()  # Unigram training alone would reorder the ids
    assert p1.tokenizer.backend_tokenizer.to_str() == p2.tokenizer.backend_tokenizer.to_str()
    assert STUDENT_TOKENIZER.exists()


def test_generation_budget_covers_every_answer_of_the_task():
    """Greedy evaluation truncated at max_new_tokens would mark long answers wrong whatever the model knows."""
    import inspect
    from minigenrecal.study.warmstart import load_warm_start
    from minigenrecal.models.tiny import load_teacher
    from minigenrecal.models.vlm import VLMView
    budget = inspect.signature(VLMView.generate).parameters["max_new_tokens"].default
    samples = make_split(0, "test", 300) + make_caption_pool(0, 100)
    for model, proc in (load_warm_start("cross_tokenizer"), load_teacher()):
        view = VLMView(model, proc)
        assert max(len(view.answer_ids(s)) for s in samples) <= budget


def test_one_student_fractions_are_the_ratio_of_the_paired_gains():
    """The one-student fractions (GenRecal's gain over SFT, divided by logit KD's, both on the same-tokenizer student;
    KD on either schedule) equal the ratio of the mean per-item differences, computed here by hand."""
    import numpy as np
    from minigenrecal.study import transfer as T
    rng = np.random.default_rng(0)
    n, seeds, r = 400, [0, 1, 2], "noise0.5"
    p = {"sft": 0.30, "same_arch_sft": 0.40, "same_tokenizer_kd": 0.60, "genrecal": 0.31,
         "genrecal_after_stage2": 0.28, "genrecal_same_student": 0.45, "kd_genrecal_schedule": 0.50,
         "genrecal_same_student_after_stage2": 0.42, "kd_genrecal_schedule_after_stage2": 0.55,
         "same_arch_sft_stage2_steps": 0.35, "sft_stage2_steps": 0.27}
    rows = []
    for s in seeds:
        base = rng.random(n)  # a shared item difficulty, so the paired differences are correlated as in the study
        for m, acc in p.items():
            c = "".join("1" if b < acc + 0.1 * (rng.random() - 0.5) else "0" for b in base)
            rows.append({"regime": r, "method": m, "seed": s, "correct": c, "accuracy": c.count("1") / n,
                         "train_acc_own_labels": 0.0, "train_acc_clean_labels": 0.0, "jsd_teacher": 0.0})
    plan = T.Plan(seeds=seeds, rhos=[0.5], n_test=n, variants=False, posterior=False, bounds=False, same_student=True)
    an = T.analyse({"plan": dataclasses.asdict(plan), "rows": rows})
    mean = lambda a, b: (T.matrix(rows, r, a, seeds) - T.matrix(rows, r, b, seeds)).mean()  # noqa: E731
    got = {(f["a"], f["control"]): f for f in an["fractions"]}
    for a, b, ca, cb in T.SAME_STUDENT_FRACTIONS:
        f = got[(f"{r}|{a}", f"{r}|{ca} - {r}|{cb}")]
        assert f["ratio"] == pytest.approx(mean(a, b) / mean(ca, cb), rel=1e-9)
        assert f["design"].startswith("one student") and f["ci95"][0] < f["ratio"] < f["ci95"][1]
    cross = [f for f in an["fractions"] if f["design"].startswith("cross")]
    assert {f["a"] for f in cross} == {f"{r}|genrecal", f"{r}|genrecal_after_stage2"}  # the old two-student rows
    assert {c["kind"] for c in an["comparisons"] if "kd_genrecal_schedule" in c["a"]} == {"control on GenRecal's schedule"}
    # by question type: the items of each type, and the mean difference over exactly those columns
    types = np.array(T.item_question_types("shapes", "test", n))
    bt = {c["type"]: c for c in an["by_question_type"] if c["a"] == f"{r}|genrecal" and c["b"] == f"{r}|sft"}
    assert sum(c["items"] for c in bt.values()) == n and set(bt) == set(types)
    for qt, c in bt.items():
        d = T.matrix(rows, r, "genrecal", seeds)[:, types == qt] - T.matrix(rows, r, "sft", seeds)[:, types == qt]
        assert c["items"] == (types == qt).sum() and c["diff"] == pytest.approx(d.mean(), abs=1e-12)


def test_committed_study_matches_its_reports():
    """results/transfer holds the full study; its report, the README's table and the recomputed analysis agree."""
    from minigenrecal.study import transfer as T
    from minigenrecal.models.tiny import ROOT
    out = ROOT / "results" / "transfer"
    res = json.loads((out / "transfer.json").read_text())
    plan = res["plan"]
    assert len(plan["seeds"]) >= 6 and plan["n_test"] >= 2000 and not plan["quick"] and plan["eval_split"] == "test"
    assert json.loads((out / "val_lr.json").read_text())["chosen_lr"] == plan["lr"]  # the one knob, chosen on val
    assert T.analyse(res) == res["analysis"]  # every figure is recomputed from the per-item rows
    assert "\n".join(T.report_lines(res)) in (out / "README.md").read_text()
    readme = (ROOT / "README.md").read_text()
    # the budget: every invocation that trained blocks into the folder (the first from an empty folder) ran within
    # 90 minutes on 2 cores, together they trained every block, and the README quotes each one's time
    inv = res["invocations"]
    assert inv[0]["blocks"]["read_back"] == 0 and res["jobs"] == 2
    assert all(i["runtime_seconds"] <= 90 * 60 and i["jobs"] == 2 for i in inv)
    assert sorted(b for i in inv for b in i["trained"]) == sorted(T.blocks(T.plan_of(res)))
    assert f"takes **{inv[0]['runtime_seconds'] / 60:.1f} min** on a 2-core CPU" in readme
    assert all(f"**{i['runtime_seconds'] / 60:.1f} min**" in readme for i in inv)
    assert f"its last invocation took {res['runtime_seconds'] / 60:.1f} min" in (out / "README.md").read_text()
    report = (out / "README.md").read_text()
    for lines in (T.ablation_lines(res), T.variant_lines(res), T.trace_lines(res), T.gold_lines(res)):
        assert lines and "\n".join(lines) in report  # the paper's ablations, our variants, the trace, GOLD: all in it
    for lines in (T.ablation_lines(res), T.variant_lines(res), T.gold_lines(res)):
        assert "\n".join(lines) in readme, "README's ablation, variant or GOLD table differs from the study"
    assert all(line in readme for line in T.headline_lines(res)), "README's transfer table differs from the study"
    assert all(line in readme for line in T.mechanism_lines(res)), "README's diagnosis table differs from the study"
    cells = json.loads((ROOT / "notebooks" / "06_evaluation_and_ablations.ipynb").read_text())["cells"]
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    assert 'assert "\\n".join(lines) in (T_DIR / "README.md").read_text()' in code  # notebook 06 asserts the same
    assert "lines = transfer.report_lines(study)" in code
    for f in ("ablation_lines", "variant_lines", "trace_lines", "gold_lines"):  # and shows each new table, checked
        assert f"{f}(study)" in code                                             # the same way
    assert code.count('in (T_DIR / "README.md").read_text()') >= 5


def test_the_ablation_noise_and_the_lead_variant_were_chosen_on_val():
    """results/transfer_val: a val-split run (seeds disjoint from test's) whose analysis is recomputed from its rows
    and whose choices (the ablations' noise, the variant and the GOLD row to lead with) are what the test study and
    README use."""
    from minigenrecal.study import transfer as T
    from minigenrecal.models.tiny import ROOT
    val = json.loads((ROOT / "results" / "transfer_val" / "transfer.json").read_text())
    res = json.loads((ROOT / "results" / "transfer" / "transfer.json").read_text())
    assert val["plan"]["eval_split"] == "val" and not set(val["plan"]["seeds"]) & set(res["plan"]["seeds"])
    assert T.analyse(val) == val["analysis"]
    ch = T.val_choices(val)
    assert ch == json.loads((ROOT / "results" / "transfer_val" / "choices.json").read_text())
    assert res["plan"]["ablation_rho"] == ch["ablation_rho"] == T.Plan(seeds=[0]).ablation_rho
    assert ch["genrecal_minus_sft_by_regime"][f"noise{ch['ablation_rho']:g}"] == max(ch["genrecal_minus_sft_by_regime"].values())
    assert ch["best_variant"] in T.TRANSFER_VARIANTS and f"`{ch['best_variant']}`" in (ROOT / "README.md").read_text()
    assert ch["gold_row"] in T.GOLD_ROWS and f"`{ch['gold_row']}`" in (ROOT / "README.md").read_text()
    assert val["plan"]["gold"] and res["plan"]["gold"]  # GOLD's two rows ran on val, then both on test
    with pytest.raises(ValueError, match="val"):
        T.val_choices(res)


def test_knob_probes_never_read_the_test_split(tmp_path):
    """Choosing the LR and probing the step budget run on val only; asked for the test split, both refuse."""
    from minigenrecal.study import transfer as T
    plan = T.quick_plan([0, 1])
    assert plan.eval_split == "test"
    with pytest.raises(ValueError, match="val split"):
        T.probe_budget(plan, [4], tmp_path)
    with pytest.raises(ValueError, match="val split"):
        T.tune_lr(plan, [1e-3], tmp_path)
    assert not list(tmp_path.iterdir())  # nothing trained, nothing written


def test_the_longer_budget_rerun_matches_its_reports():
    """results/transfer_long (both noisy regimes at the budget where SFT fits its training set, chosen on val in
    results/transfer/val_budget.json): its figures are recomputed from its rows, and the README quotes them."""
    from minigenrecal.study import transfer as T
    from minigenrecal.models.tiny import ROOT
    out = ROOT / "results" / "transfer_long"
    res = json.loads((out / "transfer.json").read_text())
    plan = res["plan"]
    assert len(plan["seeds"]) >= 6 and plan["n_test"] >= 2000 and plan["eval_split"] == "test"
    assert tuple(plan["steps"]) == (400, 800, 800) and plan["steps"][1] + plan["steps"][2] == 1600
    budget = json.loads((ROOT / "results" / "transfer" / "val_budget.json").read_text())
    fits = [int(k) for k, runs in budget["runs"]["noise0.5"].items() if min(r["train_acc_own_labels"] for r in runs) >= 0.99
            and min(r["train_acc_own_labels"] for r in budget["runs"]["noise0"][k]) >= 0.99]
    assert min(fits) == 1600 and budget["split"] == "val"  # the smallest budget at which SFT fits, on val
    assert T.analyse(res) == res["analysis"]
    assert "\n".join(T.report_lines(res)) in (out / "README.md").read_text()
    readme = (ROOT / "README.md").read_text()
    assert all(line in readme for line in T.headline_lines(res))
    # both noisy regimes, and at this budget SFT fits its own (noisy) training set on every seed
    assert {r["regime"] for r in res["rows"]} == {"noise0.3", "noise0.5"}
    assert all(r["train_acc_own_labels"] >= 0.99 for r in res["rows"] if r["method"] == "sft")
    assert res["blocks"]["total"] == 18  # 2 regimes and the one-student block, 6 seeds each
    assert all(i["runtime_seconds"] <= 90 * 60 for i in res["invocations"])  # each invocation within 90 minutes
    assert all(f"**{i['runtime_seconds'] / 60:.1f} min**" in readme for i in res["invocations"][1:])
    assert {r["method"] for r in res["rows"]} >= set(T.SAME_STUDENT)
