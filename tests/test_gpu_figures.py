"""The GPU figures in docs/scaling.md and the README are the ones in the GPU check's files (results/gpu/h200/)."""
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "results" / "gpu" / "h200"


def _load(name: str) -> dict:
    return json.loads((RUN / name).read_text())


def _section() -> str:
    doc = (ROOT / "docs" / "scaling.md").read_text()
    start = doc.index("### GPU figures: measured on one NVIDIA H200")
    return doc[start:doc.index("\n## ", start)]


def _table_rows(text: str, first_cell: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.strip().startswith(f"| {first_cell}")]


def test_the_check_ran_whole_on_the_named_gpu():
    summary, env, sec = _load("summary.json"), _load("env.json"), _section()
    assert summary["dry_run"] is False and {s["status"] for s in summary["steps"]} == {"ok"}
    assert len(summary["steps"]) == 5
    assert env["gpus"][0]["name"] == "NVIDIA H200" == summary["gpu"]
    assert f"{env['gpus'][0]['total_gib']:.1f} GiB" in sec
    for k in ("torch", "transformers", "accelerate"):
        assert env[k] in sec, k
    assert f"{summary['total_s']:.0f} s in all" in sec
    counts = _load("tests.json")["counts"]
    assert f"{counts['passed']} passed, {counts['skipped']} skipped, {counts['failed']} failed" in sec
    assert counts == {"passed": 6, "skipped": 0, "failed": 0}


def test_head_loss_table_equals_its_file():
    hl, sec = _load("head_loss.json"), _section()
    assert (hl["V"], hl["d"], hl["N"]) == (152064, 8192, 8192)
    rows = {r[0]: r for r in _table_rows(sec, "naive") + _table_rows(sec, "chunked")}
    assert len(rows) == len(hl["rows"]) == 4
    for r in hl["rows"]:
        assert rows[r["variant"]][1:] == [f"{r['ms']:.1f}", f"{r['peak_gib']:.3f}", f"{r['pct_of_naive_peak']:.1f}%",
                                          f"{r['time_vs_naive']:.2f}"], r["variant"]
    # the doc's verdict is the file's: no chunk size meets both goals
    assert hl["goal_met_by_chunks"] == [] and "**Goal not met**" in sec
    assert len({f"{r['loss']:.5f}" for r in hl["rows"]}) == 1 and f"({hl['rows'][0]['loss']:.5f})" in sec


def _bench_rows(sec: str, rows: list[dict], after: str) -> None:
    part = sec[sec.index(after):]
    table = _table_rows(part, "1")[:1] + _table_rows(part, "2")[:1]
    assert len(table) == 2
    for r, t in zip(rows, table):
        assert t[0] == str(r["stage"])
        for fig in (f"{r['step_s']:.3f}", f"{r['tokens_per_s']:.0f}", f"{100 * r['mfu']:.1f}%", f"{r['peak_gib']:.2f}",
                    f"{r['estimate_gib']:.2f}"):
            assert fig in t, (r["stage"], fig, t)


def test_bench_and_fit_tables_equal_their_files():
    sec = _section()
    bench = _load("bench.json")
    assert bench["preset"] == "smolvlm-256m<-qwen2-vl-2b" and bench["peak_tflops"] == 989.0
    _bench_rows(sec, bench["rows"], "3. **Stage-1 and stage-2 step")
    assert max(r["mfu"] for r in bench["rows"]) < 0.40 and "**Goal (40% MFU) not met**" in sec
    fit = _load("fit.json")
    ok = [c for c in fit["candidates"] if c["status"] == "ok"]
    assert ok[0]["preset"] == "internvl2.5-8b<-internvl2.5-78b" and f"**`{ok[0]['preset']}`**" in sec
    _bench_rows(sec, ok[0]["rows"], "4. **The largest preset pair")


def test_readme_quotes_the_same_figures():
    readme = (ROOT / "README.md").read_text()
    hl = {r["variant"]: r for r in _load("head_loss.json")["rows"]}
    stage2 = _load("fit_0.json")["rows"][1]
    assert f"{hl['chunked 512']['pct_of_naive_peak']:.1f}% of the naive loss's peak memory at " \
           f"{hl['chunked 512']['time_vs_naive']:.2f}x its time" in readme
    assert f"stage 2: {stage2['peak_gib']:.1f} GiB, {100 * stage2['mfu']:.1f}% MFU" in readme
    assert re.search(r"all 8\s+passed", readme)
