"""Grading the notebooks' coding exercises.

- `grade_notebook(path)`: execute a filled-in notebook and collect one `exercises.Result` per exercise
  (`python -m minigenrecal grade NOTEBOOK` prints them as JSON lines).
- `instructor_notebook(nb)`: the nbgrader source version of a notebook: reference solutions inside
  `### BEGIN SOLUTION` / `### END SOLUTION`, check cells that raise when a check fails
  (`python -m minigenrecal assignment NOTEBOOK... --out DIR`).
- `fill(nb, bodies)`: put code into the stubs (what a learner does by hand).

Exercise cells are found by their nbgrader metadata: a stub is a solution cell with grade_id `<name>_solution`,
its check an autograded test cell with grade_id `<name>` and its points.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import tempfile
import textwrap
from pathlib import Path

import nbformat

from minigenrecal.teach.exercises import EXERCISES, RESULTS_ENV, SOLUTIONS_ENV, Result

STUB = re.compile(r"^(?P<indent>[ \t]*)# YOUR CODE HERE\n(?P=indent)raise NotImplementedError\(.*\)[ \t]*$", re.M)
SMOKE_ENV = "MINIGENRECAL_SMOKE"


def _nbgrader(cell) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {})


def exercise_names(nb) -> list[str]:
    """The exercises a notebook checks, in order: the grade_ids of its autograded test cells."""
    return [_nbgrader(c)["grade_id"] for c in nb["cells"] if c["cell_type"] == "code" and _nbgrader(c).get("grade")]


def fill(nb, bodies: dict[str, str], markers: bool = False):
    """A copy of `nb` whose stubs named in `bodies` hold that code (markers: inside an nbgrader solution region)."""
    nb = copy.deepcopy(nb)
    for cell in nb["cells"]:
        meta = _nbgrader(cell)
        name = meta.get("grade_id", "").removesuffix("_solution")
        if not meta.get("solution") or name not in bodies:
            continue
        src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        m = STUB.search(src)
        if m is None:
            raise ValueError(f"exercise {name!r}: no '# YOUR CODE HERE' stub left in its cell")
        body = textwrap.indent(textwrap.dedent(bodies[name]).strip("\n"), m["indent"])
        if markers:
            body = f"{m['indent']}### BEGIN SOLUTION\n{body}\n{m['indent']}### END SOLUTION"
        cell["source"] = src[: m.start()] + body + src[m.end():]
    return nb


def only_exercises(nb):
    """A copy of `nb` with its title cell and its (self-contained) coding exercises only: a short assignment."""
    nb = copy.deepcopy(nb)
    start = next((i for i, c in enumerate(nb["cells"]) if _nbgrader(c)), len(nb["cells"]))
    start -= start > 0 and nb["cells"][start - 1]["cell_type"] == "markdown"  # the coding exercises' introduction
    nb["cells"] = nb["cells"][:1] + nb["cells"][max(start, 1):]
    return nb


def instructor_notebook(nb):
    """The nbgrader source version: reference solutions in solution regions, strict (raising) check cells."""
    names = exercise_names(nb)
    nb = fill(nb, {n: EXERCISES[n].solution_body() for n in names}, markers=True)
    for cell in nb["cells"]:
        if cell["cell_type"] == "code" and _nbgrader(cell).get("grade"):
            cell["source"] = EXERCISES[_nbgrader(cell)["grade_id"]].check_source(strict=True)
    return nb


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _why_not_run(nb, name: str) -> str:
    """Why an exercise's check never reported: its check cell's error, or the first error before it."""
    first_error = None
    for i, cell in enumerate(nb["cells"]):
        errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
        if cell["cell_type"] == "code" and _nbgrader(cell).get("grade_id") == f"{name}_solution" and errors:
            return f"its stub cell raised {errors[0]['ename']}: {errors[0]['evalue']}"[:300]
        if cell["cell_type"] == "code" and _nbgrader(cell).get("grade_id") == name:
            if errors:
                return f"its check cell raised {errors[0]['ename']}: {errors[0]['evalue']}"[:300]
            break
        if errors and first_error is None:
            first_error = f"cell {i} raised {errors[0]['ename']}: {errors[0]['evalue']}"[:300]
    return f"the check did not run ({first_error or 'the notebook stopped before it'})"


def grade_notebook(path: str | Path, timeout: int = 600, smoke: bool = False,
                   exercises_only: bool = False) -> list[Result]:
    """Execute a filled-in notebook top to bottom (errors do not stop it) and return one Result per exercise.

    `exercises_only` runs the title and the coding exercises only (`only_exercises`): seconds, not minutes."""
    from nbclient import NotebookClient  # optional: only grading runs notebooks
    path = Path(path).resolve()
    nb = nbformat.read(path, as_version=4)
    names = exercise_names(nb)
    if exercises_only:
        nb = only_exercises(nb)
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "results.jsonl"
        env = {RESULTS_ENV: str(out), SOLUTIONS_ENV: "0", **({SMOKE_ENV: "1"} if smoke else {})}
        with _environ(env):
            NotebookClient(nb, timeout=timeout, allow_errors=True, kernel_name=nb.metadata.kernelspec.name,
                           resources={"metadata": {"path": str(path.parent)}}).execute()
        reported = {}
        for line in (out.read_text().splitlines() if out.exists() else []):
            r = json.loads(line)
            reported[r["name"]] = r
    return [Result(n, reported[n]["passed"], reported[n]["hint"]) if n in reported else
            Result(n, False, _why_not_run(nb, n)) for n in names]


# -- command line ----------------------------------------------------------------------------------------
