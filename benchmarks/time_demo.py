"""Wall time of the quickstart's demo: `python benchmarks/time_demo.py [--repeat 3] [--json results/timings/demo.json]`.

Runs `python -m minigenrecal demo --output_dir DIR` (a fresh temp DIR each time, what `make demo` runs after the install)
`--repeat` times in a row, prints each wall time and the median, and with --json writes them with the machine's
load before and after, which the README's wall-time sentence is checked against.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", type=Path, default=None, help="write the runs here")
    a = p.parse_args(argv)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    runs, load_before = [], os.getloadavg()
    for r in range(a.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "minigenrecal", "demo", "--output_dir", tmp], cwd=ROOT, env=env, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            runs.append(round(time.perf_counter() - t0, 1))
        print(f"run {r + 1}: {runs[-1]:.1f} s", flush=True)
    print(f"median {statistics.median(runs):.0f} s over {len(runs)} runs")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"command": "python -m minigenrecal demo --output_dir DIR", "runs_s": runs,
                                      "median_s": statistics.median(runs), "cpus": os.cpu_count(),
                                      "threads": os.environ.get("OMP_NUM_THREADS", "all"),
                                      "loadavg_before": load_before, "loadavg_after": os.getloadavg()}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
