"""benchmarks/gpu_check.py --dry-run: every step runs on CPU and leaves its JSON file with the fields the docs read."""
import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    rc = _gpu_check().main([str(out), "--dry-run", "--budget-s", "120"])
    return rc, out, lambda name: json.loads((out / name).read_text())


def test_dry_run_every_step_ok(dry_run):
    rc, out, load = dry_run
    summary = load("summary.json")
    assert [s["name"] for s in summary["steps"]] == ["env", "tests", "head_loss", "bench", "fit"]
    assert all(s["status"] == "ok" for s in summary["steps"]), summary["steps"]
    assert rc == 0 and summary["dry_run"] is True and 0 < summary["total_s"] < 120
    assert all(summary["versions"][k] for k in ("python", "torch", "transformers", "accelerate"))
    for name in ("env", "tests", "head_loss", "bench", "fit"):
        assert load(f"{name}.json")["status"] == "ok"


def test_dry_run_env_and_tests(dry_run):
    _, _, load = dry_run
    env = load("env.json")
    for k in ("torchvision", "pytest"):
        assert isinstance(env[k]["importable"], bool) and (env[k]["importable"] or env[k]["error"])
    assert env["cuda_available"] is False and "idefics3_pil_processor" in env
    tests = load("tests.json")
    assert tests["runner"] == "direct" and tests["device"] == "cpu" and tests["counts"]["failed"] == 0
    by_name = {c["name"]: c for c in tests["cases"]}
    assert {"stage_step[qwen2vl-1]", "stage_step[qwen2vl-2]", "stage_step[idefics3-1]",
            "chunked_equals_naive[bfloat16]"} <= set(by_name)
    assert all(by_name[n]["status"] == "passed" for n in by_name if "idefics3" not in n)  # need no torchvision
    assert all(c["status"] == "passed" or (c["status"] == "skipped" and c["message"]) for c in tests["cases"])


def test_dry_run_head_loss_bench_fit(dry_run):
    _, _, load = dry_run
    hl = load("head_loss.json")
    assert hl["size"] == "dry" and [r["variant"] for r in hl["rows"]] == \
        ["naive", "fused 32", "fused 64", "fused 128"]
    for r in hl["rows"]:
        assert r["ms"] > 0 and r["peak_gib"] > 0 and math.isclose(r["loss"], hl["rows"][0]["loss"], rel_tol=1e-4)
        assert r["chunk"] is None or {"ok_memory", "ok_time", "pct_of_naive_peak", "time_vs_naive"} <= set(r)
    assert isinstance(hl["goal_met_by"], list) and "liger" in hl["skipped"]  # no GPU in the dry run
    bench = load("bench.json")
    assert bench["preset"] == "smolvlm-256m<-qwen2-vl-2b" and [r["stage"] for r in bench["rows"]] == [1, 2]
    for r in bench["rows"]:
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and r["peak_gib"] > 0 and r["estimate_gib"] > 0
    fit = load("fit.json")
    best = fit["largest_fit"]
    assert best["preset"] == fit["candidates"][0]["preset"]  # no memory limit on CPU: the largest runs
    assert set(best["peak_gib"]) == {"1", "2"} and all(v > 0 for v in best["peak_gib"].values())
    estimates = [c["estimate_gib"]["2"] for c in fit["candidates"]]
    assert estimates == sorted(estimates, reverse=True)


def test_a_step_past_its_timeout_is_killed_and_recorded(tmp_path):
    rc = _gpu_check().main([str(tmp_path), "--dry-run", "--only", "head_loss", "--timeout", "head_loss=0.2"])
    doc = json.loads((tmp_path / "head_loss.json").read_text())
    assert rc == 1 and doc["status"] == "timeout" and "killed after" in doc["error"]
    assert json.loads((tmp_path / "summary.json").read_text())["steps"][1]["status"] == "timeout"


def test_fit_refuses_by_estimate_and_runs_what_fits(tmp_path, monkeypatch):
    import multiprocessing as mp
    import time
    gc = _gpu_check()
    (tmp_path / "env.json").write_text(json.dumps({"gpus": [{"name": "pretend", "total_gib": 80.0}]}))
    monkeypatch.setattr(gc, "fit_candidates", lambda o: [("internvl2.5-8b<-internvl2.5-78b", {1: 90.0, 2: 120.0}),
                                                         ("qwen2-vl-7b<-qwen2-vl-72b", {1: 50.0, 2: 100.0}),
                                                         ("smolvlm-256m<-qwen2-vl-2b", {1: 3.0, 2: 5.0})])
    o = {"dry_run": True, "sizes": gc.DRY, "tests_runner": "auto", "timeouts": gc.TIMEOUTS}
    fit = gc.run_fit(o, tmp_path, time.time() + 120, mp.get_context("fork"))
    refused, stage1_only, both = fit["candidates"]
    assert refused["status"] == "refused" and "rows" not in refused  # nothing built
    assert [r["stage"] for r in stage1_only["rows"]] == [1] and "stage 2 refused" in stage1_only["note"]
    assert [r["stage"] for r in both["rows"]] == [1, 2] and fit["status"] == "ok"
    assert fit["largest_stage1_fit"]["preset"] == "qwen2-vl-7b<-qwen2-vl-72b"
    assert fit["largest_fit"]["preset"] == "smolvlm-256m<-qwen2-vl-2b"
    assert json.loads((tmp_path / "fit.json").read_text()) == json.loads(json.dumps(fit))


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-CUDA path")
def test_without_cuda_the_gpu_steps_are_not_run_at_full_size(tmp_path):
    rc = _gpu_check().main([str(tmp_path), "--only", "bench", "--start-method", "fork"])
    doc = json.loads((tmp_path / "bench.json").read_text())
    assert rc == 1 and doc["status"] == "not run" and "--dry-run" in doc["error"]
