"""environment.yml stays in step with pyproject.toml; the README quickstart is what CI runs."""
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_matches_pyproject():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    pip = [p for p in pip if not p.startswith("-e")]
    py = {_name(d): d.replace(" ", "") for d in deps}
    conda = {_name(d): d.replace(" ", "") for d in pip}
    assert set(py) == set(conda), set(py) ^ set(conda)
    for name, spec in py.items():
        if name == "torch":  # pyproject admits a range; the conda spec pins the CPU-friendly release
            assert conda[name] == "torch==2.13.0" and spec.startswith("torch>=")
        else:
            assert conda[name] == spec, (name, conda[name], spec)
    py_req = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert any(str(d).startswith("python") and py_req.lstrip(">=") in str(d) for d in env["dependencies"])


def test_readme_quickstart_commands_are_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    quick = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^(make \w+)\s*(?:#.*)?$", quick, re.M)
    assert commands == ["make demo", "make test"], commands
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "python -m minigenrecal demo" in makefile.replace("$(PY)", "python")
