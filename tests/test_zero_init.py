"""The ZeRO-3 teacher is built under `deepspeed.zero.Init`; a transformers modeling module first imported inside it
loses the `__init__` of kernels' `use_kernelized_func` decorator and keeps its `forward`, so the next instance built
outside fails with "'LlamaAttention' object has no attribute '_kernel_funcs'" (transformers >= 5.25 with `kernels`).
`scale.backends.import_modeling_modules` imports every modeling module of the configs first (docs/scaling.md)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")
ROOT = Path(__file__).resolve().parent.parent

PROBE = r'''
import os, sys
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                  DS_ACCELERATOR="cpu")
import torch, deepspeed, torch._dynamo, transformers.modeling_utils
from transformers import LlamaConfig
deepspeed.init_distributed(dist_backend="gloo")
cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2)
if sys.argv[1] == "first":
    from minigenrecal.scale.backends import import_modeling_modules
    print("imported", import_modeling_modules(cfg))
with deepspeed.zero.Init(config_dict_or_path={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}):
    from transformers import LlamaForCausalLM  # the modeling module's first import, when not done before
    inside = LlamaForCausalLM(cfg)
outside = LlamaForCausalLM(cfg)
print("logits", tuple(outside(torch.tensor([[1, 2, 3]])).logits.shape))
'''


def probe(mode: str, port: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-c", PROBE, mode, str(port)], env=env, capture_output=True, text=True,
                          timeout=300)


def kernelized() -> bool:
    """Does this transformers decorate its attention classes with kernels' `use_kernelized_func` (5.25 on)?"""
    import importlib.util
    from transformers.models.llama import modeling_llama
    return importlib.util.find_spec("kernels") is not None and "use_kernelized_func" in open(modeling_llama.__file__).read()


def test_importing_modeling_modules_before_zero_init_keeps_later_instances_working():
    r = probe("first", 29561)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "imported ['transformers.models.llama.modeling_llama']" in r.stdout
    assert "logits (1, 3, 64)" in r.stdout


def test_the_cause_a_modeling_module_first_imported_inside_zero_init_breaks_later_instances():
    if not kernelized():
        pytest.skip("this transformers has no kernelized attention: the failure cannot occur")
    r = probe("inside", 29562)
    assert r.returncode != 0 and "no attribute '_kernel_funcs'" in r.stderr, (r.returncode, r.stderr[-2000:])


BF16 = r'''
import os, sys
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[3], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                  DS_ACCELERATOR="cpu")
import torch, torch.nn as nn
from transformers import LlamaForCausalLM
from transformers.integrations import HfDeepSpeedConfig
from minigenrecal.scale.backends import DeepSpeedBackend
backend = DeepSpeedBackend()
backend.bf16 = True  # what a CUDA launch sets; DeepSpeed's CPU accelerator runs bf16 too
if sys.argv[1] == "partitioned":
    alive = HfDeepSpeedConfig(backend.config(3))
    lm = LlamaForCausalLM.from_pretrained(sys.argv[2])
    del alive
    print("partitions", sorted({str(p.ds_tensor.dtype) for p in lm.parameters()}))
else:
    lm = LlamaForCausalLM.from_pretrained(sys.argv[2], dtype=torch.float32)
torch.manual_seed(1)
module = nn.ModuleDict({"lm": lm, "extra": nn.Linear(32, 32)})  # a student beside a module of its own (Recalibrator)
for p in module.parameters():  # loop.Engine's fp32 upcast of the trainable parameters
    if p.dtype != torch.float32:
        p.data = p.data.float()
engine, _, _ = backend.prepare_module(backend.wrap(module), torch.optim.AdamW(module.parameters(), lr=1e-2))
ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
for _ in range(3):
    h = engine.module["lm"].model(ids).last_hidden_state
    loss = (engine.module["extra"](h).float() ** 2).mean() + engine.module["lm"].lm_head(h).float().logsumexp(-1).mean()
    engine.backward(loss)
    engine.step()
    print("loss", loss.item())
print("dtypes", sorted({str(p.dtype) for p in module.parameters()}),
      sorted({str(t.dtype) for t in engine.optimizer.fp32_partitioned_groups_flat}))
backend.close()
'''


def test_a_bf16_student_partitioned_as_it_loads_trains_as_one_loaded_whole(tmp_path):
    """A CUDA launch's dtypes on CPU: a student loaded under `zero.Init` (`DeepSpeedBackend.load_student`) has bf16
    partitions, which DeepSpeed does not cast again; `wrap` casts the rest of the module to bf16 and undoes the loop's
    fp32 upcast of the partitions' placeholders. It trains as a student loaded whole and cast by DeepSpeed (bf16
    parameters, fp32 masters): the same losses, bit for bit."""
    from transformers import LlamaConfig, LlamaForCausalLM
    import torch
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = {}
    for mode, port in (("partitioned", 29563), ("whole", 29564)):
        r = subprocess.run([sys.executable, "-c", BF16, mode, str(tmp_path), str(port)], env=env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        out[mode] = [line for line in r.stdout.splitlines() if line.startswith(("loss", "dtypes", "partitions"))]
    assert out["partitioned"][0] == "partitions ['torch.bfloat16']"
    assert out["partitioned"][1:] == out["whole"] and len(out["whole"]) == 4
    assert out["whole"][-1] == "dtypes ['torch.bfloat16'] ['torch.float32']"
