"""One engine per run (loop.Engine): the stages switch what trains without preparing anything new.

- a run through one engine equals three one-stage engines (the per-stage optimizers of the paper's three runs),
  bit for bit;
- trainable parameters are fp32 master weights when the weights load in bf16, and a 1e-5-scale update survives;
- gradient accumulation comes from the stage config; a launch config that disagrees is refused with the reason;
- `python -m minigenrecal train` runs a launch whose saved student `evaluate` reads.
"""
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from minigenrecal.models.presets import get_preset
from minigenrecal.data.synthetic import make_split
from minigenrecal.loop import Engine, group_of
from minigenrecal.data.pairs import encode_pairs
from minigenrecal.models.tiny_pairs import build_tiny_pair
from minigenrecal.recalibrator import Recalibrator
from minigenrecal.scale.backends import _Distributed
from minigenrecal.stages import StageConfig
from minigenrecal.loop import train_stage

ROOT = Path(__file__).resolve().parent.parent
torch.set_num_threads(1)
CFGS = {1: StageConfig(steps=2, batch_size=4, lr=1e-3),
        2: StageConfig(steps=2, batch_size=4, grad_accum=2, warmup_steps=1, lr=1e-3, train_vision=True,
                       vision_lr_scale=0.1, weight_decay=0.01),
        3: StageConfig(steps=2, batch_size=4, lr=1e-3, train_vision=True)}


def _run(one_engine: bool):
    teacher, student = build_tiny_pair(get_preset("tiny"))
    data = encode_pairs(teacher, student, make_split(0, "train", 16))
    torch.manual_seed(0)
    recal = Recalibrator(teacher.d, student.text_config, 1)
    engine = Engine(student, recal, teacher.head, CFGS) if one_engine else None
    losses = [h["loss"] for s in (1, 2, 3)
              for h in train_stage(s, student, data, CFGS[s], teacher=teacher, recal=recal, progress=False, engine=engine)]
    params = {**{f"s.{k}": v.detach().clone() for k, v in student.model.state_dict().items()},
              **{f"r.{k}": v.detach().clone() for k, v in recal.state_dict().items()}}
    return losses, params, engine


@pytest.mark.slow
def test_one_engine_equals_per_stage_engines_bit_for_bit():
    (l1, p1, engine), (l3, p3, _) = _run(True), _run(False)
    assert l1 == l3 and p1.keys() == p3.keys()
    assert all(torch.equal(p1[k], p3[k]) for k in p1)
    # one optimizer with three groups; after stage 3 only the student's groups run at a nonzero LR
    assert [g["name"] for g in engine.opt.param_groups] == ["recal", "llm", "vision"]
    assert [g["lr"] > 0 for g in engine.opt.param_groups] == [False, True, True]
    assert engine.acc.gradient_accumulation_steps == CFGS[3].grad_accum


def test_trainable_parameters_are_fp32_master_weights_when_loaded_in_bf16():
    teacher, student = build_tiny_pair(get_preset("tiny"))
    student.model.to(torch.bfloat16)
    recal = Recalibrator(teacher.d, student.text_config, 1).to(torch.bfloat16)
    plan = {1: StageConfig(), 2: StageConfig(), 3: StageConfig()}  # the paper's: the vision encoder stays frozen
    engine = Engine(student, recal, teacher.head, plan)
    kinds = {}
    for name, p in engine.module.named_parameters():
        kinds.setdefault((group_of(name), p.requires_grad), set()).add(p.dtype)
    assert kinds[("recal", True)] == {torch.float32} and kinds[("llm", True)] == {torch.float32}
    assert kinds[("vision", False)] == {torch.bfloat16}  # frozen: left in the dtype it loaded in
    assert all(p.dtype == torch.float32 for g in engine.opt.param_groups for p in g["params"])
    # a 1e-5-scale AdamW update survives in fp32; the same update on a bf16 weight of ~0.05 rounds away
    engine.begin(2, StageConfig(lr=1e-5, lr_end=1e-5))
    w = engine.opt.param_groups[1]["params"][0]
    before = w.detach().clone()
    w.grad = torch.ones_like(w)
    engine.opt.step()
    step = (w.detach() - before).abs()
    assert torch.allclose(step, torch.full_like(step, 1e-5), rtol=1e-2)
    lost_in_bf16 = (before.bfloat16() == (before - 1e-5).bfloat16()).float().mean().item()
    assert lost_in_bf16 > 0.5, lost_in_bf16  # most of this weight's entries would not move at all in bf16


def test_grad_accum_comes_from_the_stage_and_a_disagreeing_launch_config_is_refused(monkeypatch):
    fake = types.SimpleNamespace(gradient_accumulation_steps=1, _micro=3)
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "8")
    _Distributed.set_grad_accum(fake, 8)
    assert fake.gradient_accumulation_steps == 8 and fake._micro == 0
    with pytest.raises(ValueError, match=r"fixes gradient_accumulation_steps at 8, but this stage asks for 16"):
        _Distributed.set_grad_accum(fake, 16)
    monkeypatch.delenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    _Distributed.set_grad_accum(fake, 16)
    assert fake.gradient_accumulation_steps == 16
    # the shipped ZeRO-3 config leaves accumulation to the stages
    import yaml
    ds = yaml.safe_load((ROOT / "configs" / "zero3.yaml").read_text())["deepspeed_config"]
    assert "gradient_accumulation_steps" not in ds and "gradient_clipping" not in ds


def test_python_m_minigenrecal_train_is_the_train_command(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    args = ["--preset", "tiny", "--tiny-random", "--stages", "1", "--max_steps", "1", "--n", "4", "--per_device_train_batch_size", "2",
            "--quiet", "--save_steps", "0"]
    logs = []
    for mod in (["minigenrecal", "train"],):
        out = tmp_path / mod[-1]
        r = subprocess.run([sys.executable, "-m", *mod, *args, "--output_dir", str(out)], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "training on 4 samples" in r.stdout
        logs.append(json.loads((out / "train_log.json").read_text())["stages"]["1"]["last"]["loss"])
    # the launch saved the processor beside the student: `evaluate` runs on it as it is
    r = subprocess.run([sys.executable, "-m", "minigenrecal", "evaluate", "--student", str(tmp_path / "train" / "student"),
                        "--data-seed", "1", "--n", "3"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    line = json.loads(r.stdout.strip().splitlines()[-1])
    assert line["n"] == 3 and 0.0 <= line["accuracy"] <= 1.0
    assert "Setting accelerator to CPU" not in r.stderr  # DeepSpeed's import stays quiet without a GPU


def test_a_stream_trains_in_order_and_restarts_at_its_end():
    """An IterableDataset (a streamed source, already this process's share) is read in order, batch by batch, and
    read again from its start when it runs out, as a map-style dataset's next epoch would be."""
    teacher, student = build_tiny_pair(get_preset("tiny"))
    data = encode_pairs(teacher, student, make_split(0, "train", 8))
    seen = []

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            for i in range(len(data)):
                seen.append(i)
                yield data[i]

        def sample_id(self, i):
            return data.sample_id(i)

    before = [p.detach().clone() for p in student.model.parameters()]
    hist = train_stage(3, student, Stream(), StageConfig(steps=5, batch_size=4, lr=1e-3), progress=False)
    assert len(hist) == 5 and all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    assert seen[:8] == list(range(8)) and len(seen) >= 20  # in order; 5 batches of 4 = 2.5 passes
    assert any(not torch.equal(b, p) for b, p in zip(before, student.model.parameters()))


def test_stages_as_separate_launches_continue_from_the_saved_recalibrator(tmp_path):
    """`--stages 1,2` saves the gathered student and Recalibrator; `--stages 3 --recal-in OUT --student OUT/student`
    continues in a new launch: it starts from exactly those weights and saves the Recalibrator it did not train."""
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    common = ["--preset", "tiny", "--max_steps", "1", "--n", "4", "--per_device_train_batch_size", "2", "--quiet", "--save_steps", "0"]
    first, second = tmp_path / "s12", tmp_path / "s3"
    for extra in (["--stages", "1,2", "--output_dir", str(first)],
                  ["--stages", "3", "--recal-in", str(first), "--student", str(first / "student"), "--output_dir", str(second),
                   "--state-out", str(tmp_path / "st")]):
        r = subprocess.run([sys.executable, "-m", "minigenrecal", "train", *common, *extra], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_file(str(first / "recalibrator.safetensors")), load_file(str(second / "recalibrator.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((first / "recalibrator.json").read_text())["depth"] >= 1
    saved = AutoModelForImageTextToText.from_pretrained(first / "student").state_dict()
    start = torch.load(tmp_path / "st" / "stage0-rank0.pt", weights_only=False)["params"]
    assert all(torch.equal(start["student." + k].float(), v.float()) for k, v in saved.items())  # where 1,2 ended
    assert "teacher_local_bytes" not in start  # stage 3 alone loads no teacher (and renders no teacher side)
    assert AutoModelForImageTextToText.from_pretrained(second / "student") is not None


def test_recal_in_without_the_saved_student_is_refused_naming_it(tmp_path):
    """Stage 3 after `--stages 1,2`: without `--student OUT/student` it would fine-tune the untrained student."""
    from argparse import Namespace
    from minigenrecal.models.presets import get_preset
    from minigenrecal.scale.launch import check_recal_in
    (tmp_path / "student").mkdir()
    with pytest.raises(ValueError, match=f"pass --student {tmp_path / 'student'}"):
        check_recal_in(Namespace(recal_in=str(tmp_path)), get_preset("tiny"))
    check_recal_in(Namespace(recal_in=str(tmp_path)), get_preset("tiny", student=str(tmp_path / "student")))
    check_recal_in(Namespace(recal_in=None), get_preset("tiny"))
    from minigenrecal.scale.launch import teacher_width
    assert teacher_width(Namespace(recal_in=None, tiny_random=False), get_preset("tiny")) == 192  # its config only


def test_run_genrecal_takes_a_datasets_dataset_with_an_image_column(capsys):
    """`run_genrecal(teacher, student, ds, ...)` with a `datasets.Dataset` (PIL images in an Image column, LLaVA
    conversations): the same samples as the list it was made from; a row without an image is skipped and said so."""
    import datasets
    from minigenrecal.data.pairs import as_samples
    from minigenrecal.study.pipeline import run_genrecal
    samples = make_split(0, "train", 5)
    rows = [{"id": s.id, "image": s.image,
             "conversations": [{"from": "human", "value": "<image>\n" + s.question}, {"from": "gpt", "value": s.answer}]}
            for s in samples]
    rows[2]["image"] = None
    ds = datasets.Dataset.from_list(rows, features=datasets.Features({
        "id": datasets.Value("string"), "image": datasets.Image(),
        "conversations": [{"from": datasets.Value("string"), "value": datasets.Value("string")}]}))
    skipped = []
    got = as_samples(ds, skipped)
    assert [s.id for s in got] == [f"{s.id}#0" for i, s in enumerate(samples) if i != 2] and len(skipped) == 1  # turn 0
    assert all(g.question == s.question and g.answer == s.answer for g, s in zip(got, samples[:2]))
    teacher, student = build_tiny_pair(get_preset("tiny"))
    run = run_genrecal(teacher, student, ds, {1: StageConfig(steps=1, batch_size=2)}, until=1, progress=False)
    assert [r["id"] for r in run["skipped"]] == [skipped[0]["id"]] and "skipped 1 of 4" in capsys.readouterr().out
