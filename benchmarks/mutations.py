"""Plant one-line bugs that would silently change the method and check that a test names what each one breaks.

Each bug is planted alone in a temporary copy of the package (the working tree is never touched); the tests that
should catch it then run against that copy. Prints, per bug, the tests that failed and how (an AssertionError from
a property check, or a crash). A first, unmutated run shows that the same tests pass on the real code.

    python benchmarks/mutations.py              # the unmutated run, then all nine bugs
    python benchmarks/mutations.py --only 1 5   # some of them
    python benchmarks/mutations.py --ref HEAD   # the committed code instead of the working tree
"""
from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGE_TESTS = ["tests/test_stage_terms.py", "tests/test_stages.py"]
RECAL_TESTS = ["tests/test_recalibrator.py"]

# (what the bug does, file, the exact line fragment, its replacement, the tests to run)
MUTATIONS = [
    ("stage 2: the distillation terms detached from the student (z_qs detached)", "stages.py",
     'z_qs = [z_s[b, :q] for b, q in enumerate(s_batch["q_lens"].tolist())]',
     'z_qs = [z_s[b, :q].detach() for b, q in enumerate(s_batch["q_lens"].tolist())]', STAGE_TESTS),
    ("stage 2: the student CE computed on detached features", "stages.py",
     'terms["ce_student"] = self.student_view.student_ce(z_s, s_batch)',
     'terms["ce_student"] = self.student_view.student_ce(z_s.detach(), s_batch)', STAGE_TESTS),
    ("the regularization path fed the student's question instead of the teacher's", "stages.py",
     "z_ql = [self.recal.proj_pre(q) for q in t.z_q]", "z_ql = z_qs", STAGE_TESTS),
    ("w_ce ignored on the main path (the KL-only ablation keeps CE)", "stages.py",
     '"ce_main": cfg.w_ce,', '"ce_main": 1.0,', STAGE_TESTS),
    ("opt.zero_grad() removed from train_stage", "stages.py", "opt.zero_grad()", "pass", STAGE_TESTS),
    ('teacher_forward ignores answer_input="embeddings"', "stages.py",
     'emb = teacher.embed(t_batch["input_ids"]).to(z.dtype) if answer_input == "embeddings" else None',
     "emb = None", STAGE_TESTS),
    ("the regularization path skips proj_pre", "stages.py",
     "z_ql = [self.recal.proj_pre(q) for q in t.z_q]", "z_ql = list(t.z_q)", STAGE_TESTS),
    ("the Recalibrator's final LayerNorm skipped", "recalibrator.py",
     "return self.norm(self.proj_post(x))", "return self.proj_post(x)", RECAL_TESTS),
    ("NPE positions all zero", "recalibrator.py",
     "pos = torch.arange(x.shape[1], device=x.device)",
     "pos = torch.zeros(x.shape[1], dtype=torch.long, device=x.device)", RECAL_TESTS),
]


def make_copy(dest: Path, ref: str | None = None) -> None:
    """The package and the tests (from the working tree, or from git commit `ref`); the shipped data linked."""
    if ref:
        archive = subprocess.run(["git", "archive", ref, "minigenrecal", "tests", "pyproject.toml"], cwd=ROOT,
                                 capture_output=True, check=True).stdout
        dest.mkdir(parents=True)
        tarfile.open(fileobj=io.BytesIO(archive)).extractall(dest, filter="data")
    else:
        skip = shutil.ignore_patterns("__pycache__", "*.pyc")
        shutil.copytree(ROOT / "minigenrecal", dest / "minigenrecal", ignore=skip)
        shutil.copytree(ROOT / "tests", dest / "tests", ignore=skip)
        shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    for name in ("data_samples", "configs"):
        if (ROOT / name).exists():
            (dest / name).symlink_to(ROOT / name)


def plant(dest: Path, file: str, old: str, new: str) -> None:
    path = dest / "minigenrecal" / file
    text = path.read_text()
    if text.count(old) != 1:
        raise SystemExit(f"{file}: expected exactly one {old!r}, found {text.count(old)}; update this mutation")
    path.write_text(text.replace(old, new))


def run_tests(dest: Path, tests: list[str]) -> tuple[list[tuple[str, str]], int, float]:
    """Run `tests` inside the copy; returns ([(failed test, how)], n passed, seconds)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MINIGENRECAL_SMOKE": "1",
           "PYTHONPATH": str(dest), "COLUMNS": "400"}  # wide, so the summary keeps each failure's message
    check = subprocess.run([sys.executable, "-c", "import minigenrecal; print(minigenrecal.__file__)"], cwd=dest,
                           env=env, capture_output=True, text=True)
    if not check.stdout.strip().startswith(str(dest)):
        raise SystemExit(f"the copy is not the package imported: {check.stdout or check.stderr}")
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", *tests], cwd=dest,
                         env=env, capture_output=True, text=True).stdout
    failed = [(m.group(1), m.group(2) or "") for m in re.finditer(r"^FAILED (\S+)(?: - (.*))?$", out, re.M)]
    passed = re.search(r"(\d+) passed", out)
    return failed, int(passed.group(1)) if passed else 0, time.time() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", type=int, nargs="*", help="mutation numbers (1-based); default all")
    ap.add_argument("--ref", default=None, help="a git commit to copy instead of the working tree, e.g. HEAD")
    a = ap.parse_args(argv)
    chosen = [(i, m) for i, m in enumerate(MUTATIONS, 1) if not a.only or i in a.only]
    survived = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "unmutated"
        make_copy(base, a.ref)
        tests = sorted({t for _, m in chosen for t in m[4]})
        failed, passed, secs = run_tests(base, tests)
        print(f"unmutated: {passed} passed, {len(failed)} failed in {secs:.0f} s ({', '.join(tests)})")
        if failed:
            raise SystemExit("the tests fail on the real code: " + "; ".join(f for f, _ in failed))
        for i, (what, file, old, new, tests) in chosen:
            dest = Path(tmp) / f"mutant{i}"
            make_copy(dest, a.ref)
            plant(dest, file, old, new)
            failed, passed, secs = run_tests(dest, tests)
            print(f"\n[{i}] {what}\n    {file}: {old}  ->  {new}\n    {len(failed)} failed, {passed} passed "
                  f"in {secs:.0f} s")
            for name, how in failed:
                print(f"    CAUGHT by {name}  ({how.split(':')[0] or 'failed'})")
            if not failed:
                survived.append(i)
                print("    SURVIVED: no test failed")
    print(f"\n{len(chosen) - len(survived)} of {len(chosen)} planted bugs caught" +
          (f"; survived: {survived}" if survived else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
