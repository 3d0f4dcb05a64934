"""`reproduce --quick` end to end: the JSON schema, every method row, and the report's claim lines (differences, no verdicts)."""
import json
import math

import pytest

from minigenrecal.study import reproduce as R


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    from minigenrecal.cli import main
    out = tmp_path_factory.mktemp("results")
    main(["reproduce", "--quick", "--seeds", "7", "--out", str(out)])
    return out, json.loads((out / "tiny.json").read_text()), (out / "README.md").read_text()


@pytest.mark.slow
def test_quick_json_schema(quick_run):
    out, res, _ = quick_run
    from minigenrecal.scale.manifest import FIELDS
    assert set(FIELDS) <= res["manifest"].keys() and json.loads((out / "manifest.json").read_text()) == res["manifest"]
    assert set(res) >= {"rows", "budgets", "runtime_seconds", "quick"}
    assert res["quick"] is True and res["complete"] is True
    assert isinstance(res["runtime_seconds"], float) and res["runtime_seconds"] > 0
    methods = {r["method"] for r in res["rows"]}
    assert methods == set(R.MAIN_ROWS)
    for r in res["rows"]:
        assert set(r) >= {"method", "seed", "train_size", "accuracy", "jsd", "ece", "seconds"}
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["ece"] <= 1.0
        assert 0.0 <= r["jsd"] <= math.log(2) + 1e-9
        assert isinstance(r["seconds"], float)
        if r["method"] != "teacher":
            assert r["seed"] == 7 and isinstance(r["train_size"], int)
    b = res["budgets"]
    sizes = {r["train_size"] for r in res["rows"] if r["method"] in ("sft", "genrecal")}
    assert len(sizes) >= 3 and sizes == set(b["sweep_sizes"])
    # the same student budget for GenRecal (stages 2 + 3) and every baseline
    assert b["baseline"]["steps"] == b["stage2"]["steps"] + b["stage3"]["steps"]
    assert all(r["student_steps"] == b["baseline"]["steps"] for r in res["rows"]
               if r["method"] in ("sft", "uld", "linear_projector", "same_tokenizer_kd", "genrecal"))
    assert [r["jsd"] for r in res["rows"] if r["method"] == "teacher"] == [0.0]
    assert (out / "accuracy.png").stat().st_size > 0 and (out / "data_scale.png").stat().st_size > 0


@pytest.mark.slow
def test_quick_report_has_table_and_claims(quick_run):
    _, res, text = quick_run
    for claim, _ in R.CLAIMS:
        assert f"- {claim}: " in text
    assert R.NO_VERDICTS in text and "VERDICT" not in text and "holds" not in text
    assert "genrecal_answer_embeddings (our extension)" in text and "Quick smoke run" in text
    assert sum(line.startswith("| ") for line in text.splitlines()) >= len(R.MAIN_ROWS) + 2


def test_the_clean_label_table_states_differences_not_verdicts():
    """Each claim is mean(a) - mean(b) with the pooled seed SD, computed here by hand; no verdict word appears."""
    res = {"rows": [{"method": m, "seed": s, "train_size": 10, "accuracy": a, "jsd": 0.1, "ece": 0.1}
                    for s in (0, 1) for m, a in (("genrecal", 0.90 + s / 100), ("genrecal_no_reg", 0.50 + 2 * s / 100),
                                                 ("sft", 0.95 + s / 100))],
           "budgets": {"n_train": 10, "sweep_sizes": [10]}}
    lines = R.difference_lines(res)
    # genrecal 0.90, 0.91 (sd 0.00707); no_reg 0.50, 0.52 (sd 0.01414): diff +39.5, pooled sqrt((0.5 + 2) / 2) 1.1
    assert lines[0] == ("regularization helps: genrecal - genrecal_no_reg = +39.5 points (pooled seed SD 1.1)")
    assert "GenRecal > SFT: genrecal - sft = -5.0 points (pooled seed SD 0.7)" in lines
    assert "depth 1 < depth 2: genrecal - genrecal_depth1 = n/a (not in this run)" in lines
    assert not any(w in " ".join(lines) for w in ("holds", "reproduce", "inconclusive", "VERDICT"))


def test_only_appends_new_baseline_rows_and_keeps_every_existing_row(tmp_path, monkeypatch):
    """`reproduce --only`: new rows at the table's budgets, the existing rows byte for byte, no row twice."""
    from minigenrecal.cli import main
    monkeypatch.setattr(R, "check_same_teacher", lambda cal, result, path: None)  # its own test below
    plan = R.make_plan([7], quick=True)
    old = {"method": "uld", "seed": 7, "train_size": plan.n_train, "accuracy": 0.125, "jsd": 0.2, "ece": 0.3,
           "candidate_accuracy": 0.5, "n_closed": 10, "seconds": 1.0, "student_steps": plan.baseline.steps,
           "sweep": False}
    table = {"rows": [old], "budgets": plan.budgets(), "runtime_seconds": 60.0, "quick": True, "complete": True,
             "teacher": "trained (shipped tiny teacher)"}
    (tmp_path / "tiny.json").write_text(json.dumps(table, indent=1) + "\n")
    before = (tmp_path / "tiny.json").read_text()
    main(["reproduce", "--quick", "--seeds", "7", "--out", str(tmp_path), "--only", "uld", "uld_text"])
    res = json.loads((tmp_path / "tiny.json").read_text())
    assert res["rows"][0] == old and [r["method"] for r in res["rows"]] == ["uld", "uld_text"]  # uld: already there
    assert (tmp_path / "tiny.json").read_text().startswith(before[: before.index("\n ],")])  # the old row, as it was
    assert res["added_rows"][0]["methods"] == ["uld", "uld_text"] and res["added_rows"][0]["max_new_tokens"] == 12
    assert res["rows"][1]["student_steps"] == plan.baseline.steps and 0.0 <= res["rows"][1]["accuracy"] <= 1.0
    text = (tmp_path / "README.md").read_text()
    assert "| uld_text | 32 |" in text and "added later by `--only uld uld_text`" in text
    with pytest.raises(ValueError, match=r"budgets differ from the table's in \['eval_split'\]"):
        R.add_baseline_rows(["linear_projector_text"], [7], tmp_path, quick=True, eval_split="val")


def test_budget_differences_compare_what_the_table_records():
    table = {"seeds": [0], "baseline": {"steps": 600, "lr": 0.001}, "n_train": 1000}
    ours = {"seeds": [0, 1], "baseline": {"steps": 600, "lr": 0.002, "max_grad_norm": 0.0}, "n_train": 1000}
    assert R.budget_differences(ours, table) == ["baseline.lr"]  # seeds and fields newer than the table not compared


def test_check_same_teacher_compares_with_the_tables_teacher_row(tmp_path):
    result = {"rows": [{"method": "teacher", "ece": 0.034, "candidate_accuracy": 0.9}]}
    R.check_same_teacher({"ece": 0.03405, "candidate_accuracy": 0.9}, result, tmp_path)  # within 1e-4
    with pytest.raises(ValueError, match="its teacher row has ECE 0.0340, candidate accuracy 0.9000; this run's "
                                         "teacher 0.0200, 0.9000: another teacher"):
        R.check_same_teacher({"ece": 0.02, "candidate_accuracy": 0.9}, result, tmp_path)
