"""Markdown tables keep their columns: the table writer checks its own shape, and every table the repository ships
(READMEs, results reports, what notebook 06 displays) has as many cells per row as headers, as a renderer splits it."""
import json
import re
from pathlib import Path

import pytest

from minigenrecal.study import transfer
from minigenrecal.study.tables import count_cells, md_table, run_label
from minigenrecal.teach import viz

ROOT = Path(__file__).resolve().parent.parent


def tables_in(text: str) -> list[list[str]]:
    """Every markdown table in a text: runs of consecutive lines that start with `|`."""
    out, cur = [], []
    for line in text.splitlines() + [""]:
        if line.lstrip().startswith("|"):
            cur.append(line.strip())
        elif cur:
            out.append(cur)
            cur = []
    return out


def bad_rows(lines: list[str]) -> list[str]:
    n = count_cells(lines[0])
    return [f"{count_cells(line)} cells for {n}: {line[:90]}" for line in lines[1:] if count_cells(line) != n]


def test_a_bare_pipe_in_a_label_would_shift_the_row():
    """The defect itself: `noise0.5|genrecal` in a plain f-string table reads as two cells."""
    assert count_cells("| noise0.5|genrecal | 1 | 0.46 |") == 4
    assert count_cells(r"| noise0.5\|genrecal | 1 | 0.46 |") == 3
    assert count_cells("|---|---|---|") == 3


def test_md_table_escapes_pipes_and_keeps_the_width():
    lines = md_table(["run", "after stage", "grad"], [["noise0.5|genrecal", "2", 0.738], ["a|b|c", None, 1.0]])
    assert lines[2] == r"| noise0.5\|genrecal | 2 | 0.738 |"
    assert lines[3] == r"| a\|b\|c | - | 1.000 |"
    assert [count_cells(line) for line in lines] == [3, 3, 3, 3]


def test_md_table_refuses_a_row_of_the_wrong_width():
    with pytest.raises(ValueError, match=r"row 1 \('x'...\) has 2 cells for 3 headers"):
        md_table(["a", "b", "c"], [[1, 2, 3], ["x", 2]])


def test_run_labels_carry_no_pipe():
    assert run_label("noise0.5|genrecal") == "noise0.5 / genrecal"
    assert transfer.diagnosis_label("noise0.5|genrecal_kl_x4") == "noise 0.5: GenRecal, KL x4"


@pytest.mark.parametrize("folder", ["transfer", "transfer_long"])
def test_the_study_reports_keep_their_columns(folder):
    """Each of report_lines' tables (summary, comparisons, fractions of the control's gain when there are any, gains
    by question type, diagnosis) and the README's two: the right width, and the values under their headings (a hand-read cell
    of the comparisons and of the diagnosis table, the two tables that had shifted)."""
    res = json.loads((ROOT / "results" / folder / "transfer.json").read_text())
    lines = transfer.report_lines(res) + [""] + transfer.headline_lines(res) + [""] + transfer.mechanism_lines(res)
    tables = tables_in("\n".join(lines))
    fractions = bool(res["analysis"].get("fractions"))
    by_type = bool(res["analysis"].get("by_question_type"))
    assert len(tables) == 5 + fractions + by_type
    for t in tables:
        assert not bad_rows(t), bad_rows(t)
    comp, diag = tables[1], tables[2 + fractions + by_type]
    head = [h.strip() for h in comp[0].strip("|").split("|")]
    c = res["analysis"]["comparisons"][0]
    first = [x.strip() for x in re.split(r"(?<!\\)\|", comp[2].strip().strip("|"))]
    assert first[head.index("verdict")] == c["verdict"] and first[head.index("MDE (points)")] == f"{100 * c['mde']:.1f}"
    assert first[head.index("p")] == f"{c['p']:.2g}" and first[head.index("df")] == f"{c['df']:.0f}"
    head = [h.strip() for h in diag[0].strip("|").split("|")]
    run, d = next(iter(res["analysis"]["diagnosis"].items()))
    first = [x.strip() for x in diag[2].strip().strip("|").split("|")]
    assert first[head.index("when")] == "end of stage 1" and first[0] == run_label(run)
    assert first[head.index("grad_ce_student")] == f"{d['after_stage1']['grad_ce_student']:.3g}"


def test_the_ablation_variant_and_trace_tables_keep_their_columns():
    """The paper's ablations (two tables), our variants and the trace: the right width, and a hand-read cell of each
    under its heading."""
    res = json.loads((ROOT / "results" / "transfer" / "transfer.json").read_text())
    abl, var, trace = transfer.ablation_lines(res), transfer.variant_lines(res), transfer.trace_lines(res)
    tables = tables_in("\n".join(abl + [""] + var + [""] + trace))
    assert len(tables) == 4 and not any(bad_rows(t) for t in tables)
    cell = lambda t, col, row=2: [x.strip() for x in t[row].strip("|").split("|")][  # noqa: E731
        [h.strip() for h in t[0].strip("|").split("|")].index(col)]
    comps = {(c["a"], c["b"]): c for c in res["analysis"]["comparisons"]}
    c = comps[("noise0.5|genrecal", "noise0.5|genrecal_no_reg")]  # the first ablation row
    assert cell(tables[0], "ablation (b)") == "genrecal_no_reg" and cell(tables[0], "verdict (after stage 3)") == c["verdict"]
    assert cell(tables[0], "GenRecal - b after stage 3 (points)").startswith(f"{100 * c['diff']:+.1f} [")
    c = comps[("noise0.5|genrecal_ss_embeddings", "noise0.5|same_arch_sft")]  # the second variant row
    assert cell(tables[2], "variant", 3) == "genrecal_ss_embeddings"
    assert cell(tables[2], "a - SFT, 400 steps (points)", 3).startswith(f"{100 * c['diff']:+.1f} [")
    d = res["analysis"]["diagnosis"]["noise0.5|genrecal_no_reg"]["mid_stage2"]
    assert cell(tables[3], "when", 3) == "middle of stage 2"
    assert cell(tables[3], "distillation share of the student's gradient", 3) == f"{d['grad_distill_share']:.2f}"


def test_every_shipped_markdown_table_keeps_its_columns():
    """READMEs, docs and results reports: no row with more or fewer cells than its header."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "results").rglob("*.md"))]
    assert (ROOT / "results" / "transfer" / "README.md") in files
    bad = {str(f.relative_to(ROOT)): b for f in files for t in tables_in(f.read_text()) if (b := bad_rows(t))}
    assert not bad, bad


def test_viz_markdown_table_uses_the_checked_writer():
    text = viz.markdown_table([{"regime": "noise0.5|x", "acc (%)": 41.25}], digits=1)
    assert text.splitlines()[2] == r"| noise0.5\|x | 41.2 |"


def test_the_gold_table_keeps_its_columns():
    """TRL's GOLD beside SFT and GenRecal: one row per GOLD loss, then the two references, each cell under its heading."""
    res = json.loads((ROOT / "results" / "transfer" / "transfer.json").read_text())
    (table,) = tables_in("\n".join(transfer.gold_lines(res)))
    assert not bad_rows(table) and len(table) == 2 + len(transfer.GOLD_ROWS) + 2
    head = [h.strip() for h in table[0].strip("|").split("|")]
    rows = [[x.strip() for x in t.strip("|").split("|")] for t in table[2:]]
    assert [r[0] for r in rows] == [*transfer.GOLD_ROWS, "sft", "genrecal"]
    comps = {(c["a"], c["b"]): c for c in res["analysis"]["comparisons"]}
    c = comps[("noise0.5|gold_uld", "noise0.5|sft")]
    assert rows[0][head.index("a - SFT, 400 steps (points)")].startswith(f"{100 * c['diff']:+.1f} [")
    assert rows[0][head.index("verdict (a - SFT)")] == c["verdict"]
    s = res["analysis"]["summary"]["noise0.5|sft"]
    assert rows[2][head.index("accuracy (%)")] == f"{100 * s['accuracy_mean']:.1f} ± {100 * s['accuracy_sd']:.1f}"
