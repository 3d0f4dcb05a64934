"""Every notebook opens with what a learner needs before Run All: its measured learner-mode time (equal to
results/timings/), what it assumes, what it needs, the numbers to expect, and a link to docs/glossary.md, which
explains the paper's terms and the tokenizer markers."""
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))
GLOSSARY = ROOT / "docs" / "glossary.md"


def first_cell(path: Path) -> str:
    cell = json.loads(path.read_text())["cells"][0]
    assert cell["cell_type"] == "markdown"
    return "".join(cell["source"])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_header_states_the_measured_time_and_what_to_expect(path):
    text = first_cell(path)
    head = text.split("**What you will learn**")[0]
    assert "**Before you start**" in head, path.name
    learner = json.loads((ROOT / "results" / "timings" / "notebooks_learner.json").read_text())["median_s"][path.name]
    smoke = json.loads((ROOT / "results" / "timings" / "notebooks_smoke.json").read_text())["median_s"][path.name]
    m = re.search(r"\*\*Time:\*\* (\d+) s (?:\(about (\d+) min\) )?in learner mode .* on a 2-core CPU", head)
    assert m and int(m.group(1)) == round(learner), (path.name, m and m.group(1), learner)
    assert m.group(2) is None or int(m.group(2)) == round(learner / 60)
    assert re.search(rf"; {round(smoke)} s in\s+smoke mode", head), (path.name, smoke)
    for item in ("**Needs:**", "**Assumes:**", "**Numbers to expect**", "**Words:**"):
        assert item in head, (path.name, item)
    assert "offline" in head and "no GPU" in head


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_first_cell_links_the_glossary(path):
    links = re.findall(r"\]\(([^)]+)\)", first_cell(path))
    assert "../docs/glossary.md" in links
    assert (path.parent / "../docs/glossary.md").resolve() == GLOSSARY.resolve() and GLOSSARY.exists()


def test_glossary_explains_the_terms_the_notebooks_use():
    text = GLOSSARY.read_text()
    entries = set(re.findall(r"^- \*\*([^*]+)\*\*", text, re.M))
    words = " ".join(entries)
    for term in ("body", "head", "Recalibrator", "NPE", "main path", "regularization path", "ULD", "MOT", "seq-KD",
                 "MDE", "JSD", "ECE", "`Ġ`", "`▁`", "`Ċ`", "`trained=True`", "points"):
        assert term in words, term


def test_no_notebook_uses_a_marker_the_glossary_lacks():
    """Any of the usual tokenizer markers a notebook mentions has its glossary entry."""
    glossary = GLOSSARY.read_text()
    for path in NOTEBOOKS:
        text = path.read_text()
        for marker in ("Ġ", "▁", "Ċ", "MOT", "ULD", "MDE", "ECE", "JSD", "NPE"):
            if marker in text:
                assert f"**{marker}**" in glossary or f"**`{marker}`**" in glossary, (path.name, marker)
