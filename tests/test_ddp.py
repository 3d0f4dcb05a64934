"""Two-process DDP on CPU (gloo) through `accelerate launch`: after a stage-1 and a stage-2 step the parameters
are identical on both ranks, though each rank saw its own batch; the shipped accelerate configs parse."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def test_two_process_ddp_cpu(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
           "-m", "minigenrecal", "train", "--preset", "tiny", "--tiny-random", "--stages", "1,2", "--max_steps", "1",
           "--n", "8", "--per_device_train_batch_size", "2", "--no-save", "--quiet", "--state-out", str(tmp_path)]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    st = {(s, k): torch.load(tmp_path / f"stage{s}-rank{k}.pt") for s in (0, 1, 2) for k in (0, 1)}
    for s in (0, 1, 2):
        a, b = st[(s, 0)]["params"], st[(s, 1)]["params"]
        assert a.keys() == b.keys() and len(a) > 10
        for k in a:
            assert torch.equal(a[k], b[k]), f"stage {s}: {k} differs across ranks"
    # each rank computed its loss on a different shard of the data ...
    assert st[(1, 0)]["loss"] != st[(1, 1)]["loss"]
    # ... and the steps did train what each stage trains
    p0, p1, p2 = (st[(s, 0)]["params"] for s in (0, 1, 2))
    recal = [k for k in p0 if k.startswith("recal.")]
    llm = [k for k in p0 if k.startswith("student.model.text_model.layers")]
    assert recal and llm
    assert all(not torch.equal(p0[k], p1[k]) for k in recal) and all(torch.equal(p0[k], p1[k]) for k in llm)
    assert all(not torch.equal(p1[k], p2[k]) for k in recal) and any(not torch.equal(p1[k], p2[k]) for k in llm)


@pytest.mark.parametrize("name,kind", [("single_gpu", "NO"), ("ddp", "MULTI_GPU"), ("fsdp", "FSDP"),
                                       ("zero3", "DEEPSPEED")])
def test_accelerate_configs_parse(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file
    from minigenrecal.models.presets import PRESETS
    c = load_config_from_file(str(ROOT / "configs" / f"{name}.yaml"))
    assert c.distributed_type.value == kind and c.mixed_precision == "bf16"
    if kind == "DEEPSPEED":
        assert c.deepspeed_config["zero_stage"] == 3
    for p in PRESETS.values():
        assert p.accelerate_config is None or (ROOT / p.accelerate_config).exists()
