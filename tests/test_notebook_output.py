"""What a learner sees when the notebooks run: executed in smoke mode (MINIGENRECAL_SMOKE=1, a fresh kernel each,
offline), no cell leaves a library progress bar, a warning or stderr output unless it is tagged to expect it, and
every figure fits JupyterLab's output area (benchmarks/render_figures.py writes them to a folder to look at)."""
import importlib.util
import os
import re
import sys
import tempfile
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))
EXPECT_STDERR = "expect-stderr"  # a cell tag: this cell's stderr output is part of the lesson
PROGRESS = re.compile(r"\d+%\|| \d+/\d+ \[|it/s\]|Loading weights|Writing model shards|Fetching \d+ files")
# the kit's own bars (loop.train_stage, exact_match; leave=False, so they vanish when done) are the sign of life a
# learner wants; the libraries' are not
KIT_BAR = re.compile(r"^(stage \d|evaluate|teacher cache):")
WARNING = re.compile(r"\b\w*Warning\b|warnings\.warn|^WARNING", re.M)


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return mod


@pytest.fixture(scope="module")
def executed():
    """{notebook stem: the notebook executed in smoke mode}, each in a fresh kernel, as CI runs them."""
    timing = _load("time_notebooks")
    saved = dict(os.environ)
    timing.jupyter_env(smoke=True)
    out = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for path in NOTEBOOKS:
                timing.run_one(path, Path(tmp), timeout=600)
                out[path.stem] = nbformat.read(Path(tmp) / path.name, as_version=4)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return out


def stray_output(cell) -> list[str]:
    """What in one executed code cell's outputs a learner should not see (empty when the cell is clean)."""
    tags = cell.get("metadata", {}).get("tags", [])
    found = []
    for o in cell.get("outputs", []):
        kind = o["output_type"]
        if kind == "stream":
            text = o["text"]
            if o["name"] == "stderr" and EXPECT_STDERR not in tags:
                found.append(f"stderr: {text[:120]!r}")
        elif kind == "error":
            if "raises-exception" not in tags:
                found.append(f"error: {o['ename']}")
            continue
        else:
            text = str(o.get("data", {}).get("text/plain", ""))
        if PROGRESS.search(text) and not KIT_BAR.match(text):
            found.append(f"progress bar: {text[:120]!r}")
        if WARNING.search(text) and EXPECT_STDERR not in tags:
            found.append(f"warning: {text[:120]!r}")
    return found


def test_the_scan_catches_bars_warnings_and_stderr():
    stream = lambda name, text: {"output_type": "stream", "name": name, "text": text}
    widget = {"output_type": "display_data",
              "data": {"text/plain": "Loading weights: 100%|##########| 82/82 [00:00<00:00]"}}
    dirty = {"metadata": {}, "outputs": [stream("stderr", "x"), widget,
                                         stream("stdout", "/a.py:3: FutureWarning: `x` is deprecated")]}
    assert [f.split(":")[0] for f in stray_output(dirty)] == ["stderr", "progress bar", "warning"]
    kit_bar = {"output_type": "display_data", "data": {"text/plain": "stage 1:   0%|          | 0/6 [00:00<?, ?it/s]"}}
    clean = {"metadata": {}, "outputs": [stream("stdout", "stage 1 done: ce_main 1.234\n"), kit_bar,
                                         {"output_type": "display_data", "data": {"text/plain": "<Figure 960x340>"}}]}
    assert stray_output(clean) == []
    assert stray_output({"metadata": {"tags": [EXPECT_STDERR]}, "outputs": [stream("stderr", "expected")]}) == []


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_no_stray_output(executed, path):
    nb = executed[path.stem]
    bad = {i: found for i, cell in enumerate(nb.cells) if cell.cell_type == "code" and (found := stray_output(cell))}
    assert not bad, f"{path.name}: {bad}"
    assert sum(1 for c in nb.cells if c.cell_type == "code" and c.outputs) >= 3  # it really ran and printed


@pytest.mark.slow
def test_every_figure_fits_the_output_area(executed, tmp_path):
    """Figures drawn wider than JupyterLab's output area are shrunk, text and all; none may be."""
    render = _load("render_figures")
    rows = render.render(executed, tmp_path)
    per_notebook = {stem: sum(r["file"].startswith(stem) for r in rows) for stem in executed}
    assert all(n >= 1 for n in per_notebook.values()), per_notebook
    shrunk = [(r["file"], r["drawn"]) for r in rows if r["shrunk"]]
    assert not shrunk, shrunk
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(r["file"] for r in rows)
