"""Peak memory of building a teacher cache and of training stage 1 from it, at N and 4N samples (tiny preset).

    OMP_NUM_THREADS=1 python benchmarks/bench_cache_memory.py [--n 200] [--factor 4] [--image-size 256]

A synthetic JSONL of factor x N records with PNG images of image-size x image-size pixels (the tiny task's grids,
scaled up, so that a decoded image weighs what a real one does relative to the rest) is written once. Each row
then runs in a fresh subprocess, which prints its peak resident set: VmHWM of /proc/self/status, the high-water mark
of the process's own memory since it started. (`getrusage(RUSAGE_SELF).ru_maxrss`, printed beside it, is not
usable here: Linux carries it across fork and exec, so a child of a large process reports at least the parent's
size at the fork; the test runs the children from inside pytest, which holds the tiny models.) The runs:
- `build --stream`: `cache-teacher --stream` over the first N records (one batch rendered at a time);
- `build`: `cache-teacher` over the same records (every sample decoded up front);
- `train --stream`: stage 1 from a streamed cache of all the records, `train --stream --cache`, for as many steps
  as one pass over N samples takes.
A bounded pipeline's peak is flat in N; the eager build's grows by about N x a decoded image.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BATCH = 8


def write_data(out: Path, n: int, image_size: int) -> Path:
    """n records of the tiny task as train.jsonl, each image saved at image_size x image_size."""
    sys.path.insert(0, str(ROOT))
    from minigenrecal.data.synthetic import make_split
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for s in make_split(0, "train", n):
        rel = f"images/{s.id}.png"
        s.image.resize((image_size, image_size)).save(out / rel)
        lines.append(json.dumps({"id": s.id, "image": rel, "conversations": [
            {"from": "human", "value": f"<image>\n{s.question}"}, {"from": "gpt", "value": s.answer}]}) + "\n")
    path = out / "train.jsonl"
    path.write_text("".join(lines))
    return path


def peak_rss_mib(argv: list[str]) -> float:
    """Run `python -m minigenrecal ARGV` in a fresh subprocess; its peak RSS (VmHWM) in MiB."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, __file__, "--child", *argv], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])["vm_hwm_kib"] / 1024


def build_args(data: Path, out: Path, n: int, stream: bool) -> list[str]:
    return ["cache-teacher", "--preset", "tiny", "--data", str(data), "--n", str(n), "--output_dir", str(out),
            "--per_device_eval_batch_size", str(BATCH), "--shard-bytes", "1MiB"] + (["--stream"] if stream else [])


def train_args(data: Path, cache: Path, out: Path, n: int) -> list[str]:
    return ["train", "--preset", "tiny", "--data", str(data), "--stream", "--cache", str(cache), "--stages", "1",
            "--max_steps", str(n // BATCH), "--per_device_train_batch_size", str(BATCH), "--quiet", "--save_steps",
            "0", "--no-save", "--output_dir", str(out)]


def measure(n: int, factor: int = 4, image_size: int = 256, train: bool = True, eager: bool = True) -> dict:
    """{row: {N: peak RSS in MiB}} for the rows above, at N = n and factor x n."""
    sizes = (n, factor * n)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_data(tmp / "data", sizes[-1], image_size)
        rows["build --stream"] = {k: peak_rss_mib(build_args(data, tmp / f"s{k}", k, True)) for k in sizes}
        if eager:
            rows["build"] = {k: peak_rss_mib(build_args(data, tmp / f"e{k}", k, False)) for k in sizes}
        if train:
            cache = tmp / f"s{sizes[-1]}"
            rows["train --stream"] = {k: peak_rss_mib(train_args(data, cache, tmp / f"t{k}", k)) for k in sizes}
    return rows


def child(argv: list[str]) -> None:
    sys.path.insert(0, str(ROOT))
    import contextlib
    import io

    from minigenrecal.cli import main
    with contextlib.redirect_stdout(io.StringIO()):
        main(argv)
    status = Path("/proc/self/status").read_text()
    hwm = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
    print(json.dumps({"vm_hwm_kib": hwm, "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        sys.exit(0)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--factor", type=int, default=4)
    p.add_argument("--image-size", type=int, default=256)
    a = p.parse_args()
    rows = measure(a.n, a.factor, a.image_size)
    sizes = (a.n, a.factor * a.n)
    print(f"peak RSS (MiB), tiny preset, {a.image_size}x{a.image_size} PNG images, batch {BATCH}")
    print(f"| run | N = {sizes[0]} | N = {sizes[1]} | growth |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        print(f"| `{name}` | {r[sizes[0]]:.1f} | {r[sizes[1]]:.1f} | {r[sizes[1]] - r[sizes[0]]:+.1f} |")
