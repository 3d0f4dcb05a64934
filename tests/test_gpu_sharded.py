"""CUDA (skipped without a GPU): the FSDP2 and ZeRO-3 launches of `train` on one GPU, in bf16 compute.

Not part of `benchmarks/gpu_check.sh` (which runs tests/test_gpu.py in a fixed budget); run it on a GPU machine with
`python -m pytest -m gpu tests/test_gpu_sharded.py`. The pair is the Qwen2-VL preset's classes at tiny size, whose
processors need no torchvision. One process: the sharding is trivial, but the CUDA paths (nccl, FSDP2's
MixedPrecisionPolicy, DeepSpeed's bf16 engine, the replicated head on the GPU) run end to end.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("config", ["fsdp", "zero3"])
def test_sharded_launch_on_one_gpu(config, tmp_path):
    if config == "zero3" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed here")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs" / f"{config}.yaml"),
           "--num_processes", "1", "--main_process_port", "29551", "-m", "minigenrecal", "train",
           "--preset", "qwen2-vl-7b<-qwen2-vl-72b", "--tiny-random", "--stages", "1,2,3", "--max_steps", "2", "--n", "8",
           "--per_device_train_batch_size", "2", "--quiet", "--save_steps", "0", "--output_dir", str(out), "--state-out", str(out / "state")]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    log = json.loads((out / "train_log.json").read_text())
    assert log["backend"] == {"fsdp": "fsdp", "zero3": "deepspeed"}[config]
    for stage in ("1", "2", "3"):
        assert all(torch.isfinite(torch.tensor(h["loss"])) for h in log["stages"][stage]["history"])
    st = [torch.load(out / "state" / f"stage{s}-rank0.pt", weights_only=False) for s in range(4)]
    assert len({s["engine"] for s in st}) == 1
    # The master weights the optimizer steps are fp32 under both. FSDP2 keeps its sharded parameters in fp32 and casts
    # to bf16 for compute (MixedPrecisionPolicy); DeepSpeed's bf16 engine holds bf16 compute copies in the module and
    # the fp32 masters in its ZeRO-3 optimizer's flat partitions.
    compute = {"fsdp": "torch.float32", "zero3": "torch.bfloat16"}[config]
    assert set(st[0]["trainable_dtypes"].values()) == {compute}
    assert st[0]["master_dtype"] == "torch.float32"
