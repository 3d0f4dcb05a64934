"""The teacher build is reproducible: the same arguments and thread count give bit-identical weights."""
import json

import torch
from safetensors.torch import load_file

from minigenrecal.study.teacher import train_teacher, weights_digest
from minigenrecal.models.tiny import build_teacher

SHORT = dict(steps=3, n_train=48, batch_size=8, warmup=1, n_val=4, n_test=4, threads=1, log=lambda *_: None)


def test_short_build_twice_is_bit_identical(tmp_path):
    a = train_teacher(tmp_path / "a", seed=0, **SHORT)
    b = train_teacher(tmp_path / "b", seed=0, **SHORT)
    assert a["weights_sha256"] == b["weights_sha256"]
    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert all(wa[k].dtype == torch.float16 for k in wa)  # shipped as fp16
    # the training moved the weights, so the comparison above is not between two untouched inits
    assert a["weights_sha256"] != weights_digest(build_teacher(0)[0])
    # a different seed gives different weights: the digest can tell builds apart
    c = train_teacher(tmp_path / "c", seed=1, **SHORT)
    assert c["weights_sha256"] != a["weights_sha256"]


def test_build_records_its_manifest(tmp_path):
    train_teacher(tmp_path / "t", seed=0, **SHORT)
    info = json.loads((tmp_path / "t" / "training.json").read_text())
    assert info["threads"] == 1 and "--threads 1" in info["command"]
    assert info["versions"]["torch"] == torch.__version__ and info["cpu_capability"]
    assert {"transformers", "tokenizers", "accelerate", "python"} <= info["versions"].keys()
    assert "git_commit" in info and {"val_accuracy", "test_accuracy", "weights_sha256", "cpu_seconds"} <= info.keys()
