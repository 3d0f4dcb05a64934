"""Time the notebooks top to bottom, the way CI runs them: `python benchmarks/time_notebooks.py [--smoke] [--repeat N]`.

Each run executes a fresh kernel with nbclient (cells tagged `raises-exception` may raise), keeps Jupyter and
matplotlib state under .cache/, stays offline, and prints one line per notebook plus the median over repeats.
Executed copies go to a temp dir (or --keep DIR) and never over the committed notebooks.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent


def jupyter_env(smoke: bool) -> None:
    cache = ROOT / ".cache"
    os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(cache / "hf"),
                       "MPLCONFIGDIR": str(cache / "mpl"), "IPYTHONDIR": str(cache / "ipython"),
                       "JUPYTER_CONFIG_DIR": str(cache / "jupyter/config"),
                       "JUPYTER_DATA_DIR": str(cache / "jupyter/data"),
                       "JUPYTER_RUNTIME_DIR": str(cache / "jupyter/runtime")})
    if smoke:
        os.environ["MINIGENRECAL_SMOKE"] = "1"
    else:
        os.environ.pop("MINIGENRECAL_SMOKE", None)


def run_one(path: Path, keep: Path | None, timeout: int) -> float:
    nb = nbformat.read(path, as_version=4)
    t0 = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    dt = time.perf_counter() - t0
    if keep is not None:
        nbformat.write(nb, keep / path.name)
    return dt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("notebooks", nargs="*", help="default: notebooks/[0-9]*.ipynb")
    p.add_argument("--smoke", action="store_true", help="MINIGENRECAL_SMOKE=1 (the CI setting)")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    p.add_argument("--keep", type=Path, help="write executed copies here (default: a temp dir, deleted)")
    p.add_argument("--json", type=Path, help="also write the medians, every run and the machine's load here "
                                             "(results/timings/notebooks_{learner,smoke}.json back the README table)")
    a = p.parse_args(argv)
    jupyter_env(a.smoke)
    paths = [Path(n).resolve() for n in a.notebooks] or sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))
    times: dict[str, list[float]] = {p.name: [] for p in paths}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        keep = a.keep or Path(tmp)
        keep.mkdir(parents=True, exist_ok=True)
        for r in range(a.repeat):
            for path in paths:
                dt = run_one(path, keep, a.timeout)
                times[path.name].append(dt)
                print(f"run {r + 1}  {path.name:40} {dt:7.1f} s", flush=True)
    mode = "smoke" if a.smoke else "learner"
    print(f"\n| notebook | {mode} median (s) | runs |\n|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.0f} | {len(ts)} |")
    print(f"| all | {sum(statistics.median(ts) for ts in times.values()):.0f} | |")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({
            "mode": mode, "command": "python benchmarks/time_notebooks.py" + (" --smoke" if a.smoke else ""),
            "median_s": {n: round(statistics.median(ts), 1) for n, ts in times.items()},
            "runs_s": {n: [round(t, 1) for t in ts] for n, ts in times.items()},
            "cpus": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
