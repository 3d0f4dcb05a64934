"""Mid-stage checkpoints under FSDP2 and DeepSpeed ZeRO-3, in two-process CPU launches (gloo) of the tiny pair: both
ranks SIGKILLed after stage 2's first step, the launch resumed from the last complete checkpoint gives the
uninterrupted launch's loss histories and gathered student and Recalibrator bit for bit; and the checkpoint is
sharded: each rank wrote its own half of the weights and AdamW moments, not a gathered copy."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minigenrecal.scale.checkpoint import FAULT_ENV, SHARDS, complete_checkpoints

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["--preset", "tiny", "--stages", "1,2,3", "--max_steps", "2", "--n", "8", "--per_device_train_batch_size", "2",
        "--quiet"]
CONFIG = {"fsdp": "fsdp.yaml", "zero3": "zero3.yaml"}
PORTS = {"fsdp": 29581, "zero3": 29582}
SHARD = {"fsdp": "__{}_0.distcp", "zero3": "zero_pp_rank_{}_mp_rank_00_optim_states.pt"}  # rank r's own file


def launch(kind: str, out: Path, *extra: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": str(ROOT)}
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs" / CONFIG[kind]),
           "--num_processes", "2", "--main_process_port", str(PORTS[kind]), "-m", "minigenrecal", "train", *ARGS,
           "--output_dir", str(out), *extra]
    return subprocess.run(cmd, cwd=out.parent, env=env, capture_output=True, text=True, timeout=600)


def losses(out: Path) -> dict:
    log = json.loads((out / "train_log.json").read_text())
    return {st: [{k: v for k, v in h.items() if k != "stage_seconds"} for h in s["history"]]
            for st, s in log["stages"].items()}


def gathered(out: Path) -> dict[str, torch.Tensor]:
    """The launch's saved (gathered) student and Recalibrator."""
    return {**{"student." + k: v for k, v in load_file(out / "student" / "model.safetensors").items()},
            **{"recal." + k: v for k, v in load_file(out / "recalibrator.safetensors").items()}}


def tensor_bytes_per_rank(kind: str, shards: Path) -> list[int]:
    """The tensor bytes each rank's own file holds. ZeRO-3: the file (a few flat fp32 partitions: its size). FSDP2:
    the chunks torch.distributed.checkpoint's metadata places in it (each tensor is serialized on its own there, and
    the per-tensor framing of the tiny pair's ~300 small tensors would blur the size)."""
    if kind == "zero3":
        return [(shards / SHARD[kind].format(rank)).stat().st_size for rank in (0, 1)]
    from torch.distributed.checkpoint import FileSystemReader
    md, per = FileSystemReader(str(shards)).read_metadata(), {SHARD[kind].format(rank): 0 for rank in (0, 1)}
    for idx, where in md.storage_data.items():
        meta = md.state_dict_metadata[idx.fqn]
        if hasattr(meta, "chunks"):  # a tensor (else pickled objects: the param groups)
            chunk = next(c for c in meta.chunks if tuple(c.offsets) == tuple(idx.offset))
            per[where.relative_path] += math.prod(chunk.sizes) * meta.properties.dtype.itemsize
    return list(per.values())


@pytest.mark.slow  # three launches per backend
@pytest.mark.parametrize("kind", ["zero3", "fsdp"])
def test_sharded_sigkill_mid_stage_then_resume_gives_the_uninterrupted_launch(tmp_path, kind):
    ref = tmp_path / "ref"
    r = launch(kind, ref, "--save_steps", "0")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    out = tmp_path / "run"
    r = launch(kind, out, "--save_steps", "1", fault="kill step 2 1")  # both ranks SIGKILLed after stage 2's step 1
    assert r.returncode != 0 and "SIGKILL" in r.stdout + r.stderr, r.stderr[-4000:]
    assert not (out / "train_log.json").exists()
    ck = out / "checkpoints"
    assert [p.name for p in complete_checkpoints(ck)] == ["stage2-step0000001"]
    # sharded: in stage 2 everything trains, so the whole is the fp32 weights and AdamW's two moments (3 x 4 bytes a
    # parameter); each rank's own file holds half of it (ZeRO-3: its flat partition; FSDP2: its dim-0 shards)
    whole = 3 * sum(v.numel() * v.element_size() for v in gathered(ref).values())
    own = tensor_bytes_per_rank(kind, ck / "stage2-step0000001" / SHARDS)
    assert all(abs(b - whole / 2) < 0.01 * whole / 2 for b in own), (own, whole)
    r = launch(kind, out, "--save_steps", "1", "--resume_from_checkpoint", str(out))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert losses(out) == losses(ref)  # every loss term, lr and skip flag of every step, bit for bit
    a, b = gathered(out), gathered(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [p.name for p in complete_checkpoints(ck)] == ["stage3-step0000002"]  # only the latest
    assert not list(ck.glob(".tmp-*"))
