#!/usr/bin/env bash
# The GPU check in one command, for an offline GPU machine whose Python already has torch, transformers and
# accelerate (pytest and torchvision optional): nothing is installed, the package is imported from this checkout.
#
#   bash benchmarks/gpu_check.sh OUT              # CUDA tests, head-loss and stage-1/2 benchmarks, largest pair
#   bash benchmarks/gpu_check.sh OUT --dry-run    # the same steps on CPU at reduced sizes
#
# Results: OUT/*.json (one file per step, and summary.json); the whole check ends within 7 minutes.
# Any further options go to benchmarks/gpu_check.py (see its --help).
set -u
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    echo "usage: bash benchmarks/gpu_check.sh OUT_DIR [--dry-run] [gpu_check.py options]" >&2
    exit 2
fi
case "$1" in /*) OUT="$1" ;; *) OUT="$PWD/$1" ;; esac
shift
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PIP_NO_INDEX=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# 400 s for the steps (gpu_check.py --budget-s), 420 s at the outside
exec timeout -k 5 420 "$PY" benchmarks/gpu_check.py "$OUT" --budget-s 400 "$@"
