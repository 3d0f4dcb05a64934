"""Two-process CPU launches (gloo) of the README's sharded commands: FSDP2 and DeepSpeed ZeRO-3 run stages
1 -> 2 -> 3 in one launch on the tiny pair, with the teacher sharded for inference.

Each launch is the command docs/scaling.md gives, with `--num_processes 2` and a tiny budget:
    accelerate launch --config_file configs/{fsdp,zero3}.yaml --num_processes 2 -m minigenrecal train --preset tiny ...
and is compared with the same run under DDP (the `accelerate` backend), whose teacher is replicated.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minigenrecal.losses import head_losses

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["--preset", "tiny", "--stages", "1,2,3", "--max_steps", "2", "--n", "8", "--per_device_train_batch_size", "2", "--quiet",
        "--save_steps", "0"]
LAUNCH = {"fsdp": ["--config_file", str(ROOT / "configs" / "fsdp.yaml")],
          "zero3": ["--config_file", str(ROOT / "configs" / "zero3.yaml")],
          "ddp": ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no", "--num_machines", "1"]}
PORTS = {"fsdp": 29541, "zero3": 29542, "ddp": 29543}


def launch(kind: str, out: Path, extra: tuple = (), port: int | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *LAUNCH[kind], "--num_processes", "2",
           "--main_process_port", str(port or PORTS[kind]), "-m", "minigenrecal", "train", *ARGS, *extra,
           "--output_dir", str(out), "--state-out", str(out / "state")]
    r = subprocess.run(cmd, cwd=out.parent, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    st = {(s, k): torch.load(out / "state" / f"stage{s}-rank{k}.pt", weights_only=False)
          for s in range(4) for k in (0, 1)}
    st["out"] = out
    return st


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return {k: launch(k, tmp_path_factory.mktemp(k) / "out") for k in ("fsdp", "zero3", "ddp")}


@pytest.fixture(scope="module")
def zero3_saved_student(tmp_path_factory):
    """The ZeRO-3 launch with the tiny student's weights read from a directory (`--student DIR`, as a hub student
    loads) instead of built at random: the same weights as the other launches' student."""
    from minigenrecal.models.tiny import build_student
    saved = tmp_path_factory.mktemp("student")
    model, proc = build_student(0)
    model.save_pretrained(saved)
    proc.save_pretrained(saved)
    st = launch("zero3", tmp_path_factory.mktemp("zero3_saved") / "out", ("--student", str(saved)), port=29544)
    st["total"] = sum(p.numel() * p.element_size() for p in model.parameters())
    return st


@pytest.fixture(scope="module")
def shipped_teacher():
    from minigenrecal.models.tiny import load_teacher
    return load_teacher()[0]


@pytest.mark.slow
@pytest.mark.parametrize("kind,engine_type", [("fsdp", "FSDPGenRecal"), ("zero3", "DeepSpeedEngine")])
def test_sharded_launch(runs, shipped_teacher, kind, engine_type):
    st = runs[kind]
    # the teacher is sharded: each rank holds half of its parameter bytes, and together exactly all of them
    total = sum(p.numel() * p.element_size() for p in shipped_teacher.parameters())
    local = [st[(0, k)]["teacher_local_bytes"] for k in (0, 1)]
    assert sum(local) == total and all(abs(b - total / 2) < 0.01 * total for b in local), (local, total)
    if kind == "zero3":  # loaded under zero.Init: the DeepSpeed config was alive before from_pretrained
        assert st[(0, 0)]["loaded_partitioned"] is True and st[(0, 1)]["loaded_partitioned"] is True
    # ... and bit-identical to the shipped teacher at the end (gathered)
    full = {k.removeprefix("model."): v for k, v in st[(3, 0)]["teacher_full"].items()}
    ref = shipped_teacher.state_dict()
    assert full.keys() == ref.keys()
    assert all(torch.equal(full[k], v) for k, v in ref.items())
    # the chunked teacher-head losses through the sharded head equal the unsharded head's, and the replica's
    c, head = st[(0, 0)]["chunked"], shipped_teacher.get_output_embeddings()
    expect = [x.item() for x in head_losses(c["h"], c["z"], c["y"], head.requires_grad_(False), 2.0)]  # naive
    assert c["sharded"] == pytest.approx(c["replicated"], rel=1e-6)  # the gathered head is the replica
    assert c["replicated"] == pytest.approx(expect, rel=1e-5)  # fused vs naive: other summation order
    assert torch.equal(st[(0, 1)]["head"]["weight"], head.weight.detach())  # rank 1's replica is the whole head
    # one engine steps every stage; trainable parameters are fp32 master weights
    assert len({st[(s, k)]["engine"] for s in range(4) for k in (0,)}) == 1
    assert st[(0, 0)]["engine_type"] == engine_type
    assert set(st[(0, 0)]["trainable_dtypes"].values()) == {"torch.float32"} and st[(0, 0)]["master_dtype"] == "torch.float32"
    # each stage trains what it should: 1 the Recalibrator, 2 both, 3 the student
    p = [st[(s, 0)]["params"] for s in range(4)]
    recal = [k for k in p[0] if k.startswith("recal.")]
    llm = [k for k in p[0] if k.startswith("student.model.text_model.layers")]
    assert recal and llm
    moved = lambda s, keys: sum(not torch.equal(p[s - 1][k], p[s][k]) for k in keys)  # noqa: E731
    assert (moved(1, recal), moved(1, llm)) == (len(recal), 0)
    assert (moved(2, recal), moved(2, llm)) == (len(recal), len(llm))
    assert (moved(3, recal), moved(3, llm)) == (0, len(llm))
    # the same run as DDP with a replicated teacher: the same losses, stage after stage. FSDP2 agrees to
    # roundoff. ZeRO-3's first forward agrees to 1e-7 (its linear layers run matmul-then-add), and its optimizer
    # steps flat fp32 partitions; AdamW amplifies such roundoff on near-zero gradients, hence 2e-3 there.
    tol = 1e-5 if kind == "fsdp" else 2e-3
    for s in (1, 2, 3):
        assert st[(s, 0)]["loss"] == pytest.approx(runs["ddp"][(s, 0)]["loss"], rel=tol), s
        assert p[s].keys() == runs["ddp"][(s, 0)]["params"].keys()


@pytest.mark.slow
def test_zero3_student_from_pretrained_is_partitioned_as_it_loads(runs, zero3_saved_student):
    """Under ZeRO-3 a student read from saved weights loads under `zero.Init` (its engine's config is alive during
    `from_pretrained`): right after loading each rank holds half of its bytes, where the random-init tiny student is
    built whole; and the launch trains exactly as the one whose student loaded whole."""
    st, total = zero3_saved_student, zero3_saved_student["total"]
    local = [st[(0, k)]["student_local_bytes"] for k in (0, 1)]
    assert sum(local) == total and all(abs(b - total / 2) < 0.02 * total for b in local), (local, total)
    assert st[(0, 0)]["student_loaded_partitioned"] is True and st[(0, 1)]["student_loaded_partitioned"] is True
    assert [runs["zero3"][(0, k)]["student_local_bytes"] for k in (0, 1)] == [total, total]  # built whole
    assert set(st[(0, 0)]["trainable_dtypes"].values()) == {"torch.float32"} and st[(0, 0)]["master_dtype"] == "torch.float32"
    for s in (1, 2, 3):
        assert st[(s, 0)]["loss"] == pytest.approx(runs["zero3"][(s, 0)]["loss"], rel=1e-6), s
        assert st[(s, 0)]["loss"] == pytest.approx(runs["ddp"][(s, 0)]["loss"], rel=2e-3), s
    whole, part = runs["zero3"][(3, 0)]["params"], st[(3, 0)]["params"]
    assert whole.keys() == part.keys() and all(torch.allclose(whole[k], part[k], rtol=1e-5, atol=1e-7) for k in whole)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fsdp", "zero3"])
def test_sharded_launch_saves_the_gathered_student_and_recalibrator(runs, kind):
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText, AutoProcessor
    out = runs[kind]["out"]
    gathered = torch.load(out / "state" / "saved_gathered.pt")
    model = AutoModelForImageTextToText.from_pretrained(out / "student")
    AutoProcessor.from_pretrained(out / "student")
    sd = model.state_dict()
    student = {k.removeprefix("student."): v for k, v in gathered.items() if k.startswith("student.")}
    assert sd.keys() == student.keys()
    assert all(torch.equal(sd[k], v) for k, v in student.items())
    assert torch.equal(gathered["student.model.text_model.norm.weight"],
                       runs[kind][(3, 0)]["params"]["student.model.text_model.norm.weight"])
    recal = load_file(str(out / "recalibrator.safetensors"))
    assert recal.keys() and all(torch.equal(recal[k], gathered["recal." + k]) for k in recal)
    # rank 1 wrote no gathered copy: the state dict is gathered onto rank 0 only
    assert runs[kind][(3, 1)]["params"] == {}


def test_the_readme_and_notebook_05_give_the_commands_these_tests_launch():
    import json
    readme = (ROOT / "README.md").read_text()
    for name in ("fsdp", "zero3"):
        cmd = f"accelerate launch --config_file configs/{name}.yaml --num_processes 2 -m minigenrecal train {' '.join(ARGS)}"
        assert cmd in readme and cmd in (ROOT / "docs" / "scaling.md").read_text(), cmd
        assert Path(LAUNCH[name][1]).name == f"{name}.yaml"
    nb = json.loads((ROOT / "notebooks" / "05_scaled_down_run.ipynb").read_text())
    text = "".join("".join(c["source"]) for c in nb["cells"])
    assert "accelerate launch --config_file configs/zero3.yaml -m minigenrecal train --preset" in text


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["--stream", "--lazy"])
def test_sharded_launch_reads_its_share_of_a_jsonl_lazily(tmp_path, mode):
    """FSDP2 on 2 processes with `--data FILE.jsonl --stream` / `--lazy`: each process reads its own share (record r
    to process r % 2) and renders images as batches are drawn; the bad record one process meets is skipped, and
    the report gathers every process's skips."""
    import json
    from minigenrecal.data.synthetic import make_split
    from minigenrecal.data.llava import write_llava_json
    path = write_llava_json(make_split(0, "train", 9), tmp_path)
    records = json.loads(path.read_text())
    records[3]["image"] = "missing.png"  # process 1's second record
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": str(ROOT)}
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *LAUNCH["fsdp"], "--num_processes", "2",
           "--main_process_port", str(29545 + (mode == "--lazy")), "-m", "minigenrecal", "train", "--preset", "tiny",
           "--data", str(data), mode, "--stages", "1,3", "--max_steps", "3", "--per_device_train_batch_size", "2", "--quiet",
           "--save_steps", "0", "--output_dir", str(out)]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    log = json.loads((out / "train_log.json").read_text())
    assert log["backend"] == "fsdp" and log["world_size"] == 2
    assert log["samples"] == (None if mode == "--stream" else 5)  # process 0's share: records 0, 2, 4, 6, 8
    report = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [x["id"] for x in report] == [records[3]["id"]] and "not found" in report[0]["reason"]
    assert "skipped 1 bad sample(s) while training" in r.stdout
