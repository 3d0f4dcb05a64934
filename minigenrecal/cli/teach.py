"""Commands for course staff: grade, assignment."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat

from minigenrecal.teach.grading import SMOKE_ENV, exercise_names, grade_notebook, instructor_notebook, only_exercises


# -- the command of minigenrecal.teach.grading --------------------------------------------------------------------------
def cmd_grade(a):
    results = grade_notebook(a.notebook, a.timeout, a.smoke, a.exercises_only)
    for r in results:
        print(json.dumps(r.as_dict()))
    sys.exit(0 if results and all(r.passed for r in results) else 1)


def cmd_assignment(a):
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in a.notebooks:
        nb = nbformat.read(name, as_version=4)
        nb = instructor_notebook(only_exercises(nb) if a.exercises_only else nb)
        nbformat.write(nb, out / Path(name).name)
        print(f"{out / Path(name).name}: {', '.join(exercise_names(nb))}")


def add_grading_command(sub):
    g = sub.add_parser("grade", help="execute a filled-in notebook; print one JSON line per exercise (name, passed, "
                                     "hint); exit 1 unless all pass")
    g.add_argument("notebook", help="the filled-in notebook (.ipynb) to execute")
    g.add_argument("--smoke", action="store_true", help=f"run with {SMOKE_ENV}=1: fewer training steps, same checks")
    g.add_argument("--exercises-only", action="store_true", help="run only the exercise cells (seconds, not minutes)")
    g.add_argument("--timeout", type=int, default=600, help="seconds allowed per cell")
    g.set_defaults(fn=cmd_grade)
    s = sub.add_parser("assignment", help="write nbgrader source notebooks: reference solutions inside "
                                          "### BEGIN/END SOLUTION, check cells that raise on failure")
    s.add_argument("notebooks", nargs="+", help="reference notebooks (.ipynb) to turn into assignments")
    s.add_argument("--out", required=True, help="e.g. course/source/genrecal (nbgrader's source/<assignment>/)")
    s.add_argument("--exercises-only", action="store_true", help="keep the title and the coding exercises only")
    s.set_defaults(fn=cmd_assignment)
