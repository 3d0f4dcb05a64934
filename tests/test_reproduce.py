"""`reproduce --quick` end to end: the JSON schema, every method row, and the report's verdict lines."""
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
def test_quick_report_has_table_and_verdicts(quick_run):
    _, res, text = quick_run
    for claim, _ in R.CLAIMS:
        assert f"VERDICT {claim}:" in text
    assert "genrecal_answer_embeddings (our extension)" in text and "Quick smoke run" in text
    assert sum(line.startswith("| ") for line in text.splitlines()) >= len(R.MAIN_ROWS) + 2


def test_verdict_rule():
    assert R.verdict([0.8, 0.82, 0.81], [0.7, 0.71, 0.69])[0] == "holds"
    assert R.verdict([0.7, 0.71, 0.69], [0.8, 0.82, 0.81])[0].startswith("does not reproduce")
    assert R.verdict([0.7, 0.8, 0.6], [0.71, 0.69, 0.7])[0] == "inconclusive"
    assert R.verdict([0.9], [0.1])[0].startswith("inconclusive")
    res = {"rows": [{"method": m, "seed": s, "train_size": 10, "accuracy": a, "jsd": 0.1, "ece": 0.1}
                    for s in (0, 1) for m, a in (("genrecal", 0.9 + s / 100), ("genrecal_no_reg", 0.5 + s / 100),
                                                 ("sft", 0.95 + s / 100))],
           "budgets": {"n_train": 10, "sweep_sizes": [10]}}
    lines = R.verdict_lines(res)
    assert lines[0].startswith("VERDICT regularization helps: holds")
    assert any(line.startswith("VERDICT GenRecal > SFT: does not reproduce") for line in lines)
