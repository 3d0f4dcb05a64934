"""What produced a result: config, package versions, the lock's digest, git commit, seed, thread count, device.

Every run (demo, train, reproduce) writes `manifest.json` beside its results, and its results file carries the same
dict under "manifest". Thread count matters: CPU kernels split their reductions by thread, so the same seed on
1 and 2 threads gives different floating-point sums, different trained weights and different accuracies
(docs/scaling.md, "Reproducibility").
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

PACKAGES = ("minigenrecal", "torch", "transformers", "accelerate", "tokenizers", "safetensors", "numpy", "pillow")
FIELDS = ("config", "seed", "versions", "environment", "git", "threads", "device", "command", "created")
LOCK = Path(__file__).resolve().parents[2] / "requirements.lock"  # the tested environment (README, "Environment")


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def git_state(*paths: str) -> dict:
    """The commit of the source tree this package runs from, and whether it has uncommitted changes (in `paths`,
    relative to the repository root, when given; anywhere in the tracked tree otherwise)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return {"commit": None, "dirty": None}
    try:
        def git(*args):
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        return {"commit": git("rev-parse", "HEAD") or None,
                "dirty": bool(git("status", "--porcelain", "--untracked-files=no", "--", *paths))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def lock_state(lock: Path = LOCK) -> dict:
    """The lock this run's environment is meant to be: its sha256, and the installed packages that differ from it
    (name: [locked, installed]; an empty dict means the run used exactly the locked versions)."""
    if not lock.exists():
        return {"lock": None, "lock_sha256": None, "differs_from_lock": None}
    differs = {}
    for line in lock.read_text().splitlines():
        if "==" not in line or line.lstrip().startswith("#"):
            continue
        name, want = (x.strip() for x in line.split("==", 1))
        have = _version(name)
        if have != want:
            differs[name] = [want, have]
    return {"lock": lock.name, "lock_sha256": hashlib.sha256(lock.read_bytes()).hexdigest(),
            "differs_from_lock": differs}


def versions() -> dict:
    """Python's version and those of the packages that change a result (None where one is not installed)."""
    return {"python": platform.python_version(), **{p: _version(p) for p in PACKAGES}}


def device_info() -> dict:
    if torch.cuda.is_available():
        return {"type": "cuda", "name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
                "cuda": torch.version.cuda}
    return {"type": "cpu", "name": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "capability": torch.backends.cpu.get_cpu_capability(),  # the SIMD kernels torch picked: they change floats
            **cpu_model()}


def cpu_model() -> dict:
    """The processor's model name, family and model number (Linux), or {}: two CPUs with the same SIMD capability can
    still round a matmul differently (the math libraries pick kernels per microarchitecture), which moves a few items
    of a rerun; this is what a rerun that does not match should compare first."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return {}
    info = {}
    for line in lines:
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    keys = {"model name": "cpu_model", "cpu family": "cpu_family", "model": "cpu_model_number"}
    return {name: info[k] for k, name in keys.items() if k in info}


def run_manifest(config: dict, seed) -> dict:
    """The manifest of a run: `config` (any JSON-able dict of what was asked for) and `seed`, plus the environment."""
    return {
        "config": json.loads(json.dumps(config, default=str)),
        "seed": seed,
        "versions": versions(),
        "environment": lock_state(),
        "git": git_state(),
        "threads": {"torch": torch.get_num_threads(), "interop": torch.get_num_interop_threads(),
                    **{k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}},
        "device": device_info(),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_manifest(out: str | Path, manifest: dict) -> dict:
    """Write OUT/manifest.json; returns the manifest, for the results file to carry."""
    path = Path(out) / "manifest.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest
