#!/usr/bin/env bash
# The GPU checks in one short script (about 5-8 minutes on an H100): CUDA tests, the chunked-loss benchmark at the
# 152k-vocabulary size, and the stage-1/2 benchmark of the single-GPU pair. Run from the repository root.
set -uo pipefail
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
pip install -q --no-deps -e . 2>/dev/null || true
timeout 240 python -m pytest -q -m gpu tests/test_gpu.py
timeout 180 python benchmarks/bench_head_loss.py
timeout 180 python -m minigenrecal bench --preset "smolvlm-256m<-qwen2-vl-2b" --random-weights
