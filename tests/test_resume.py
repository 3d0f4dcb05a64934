"""A run that survives: SIGKILL mid-stage or mid-checkpoint-write, resume, and get exactly the uninterrupted run's
numbers; a non-finite loss or gradient skips the step and K in a row stop the run; every output carries a manifest."""
import copy
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minigenrecal.scale.checkpoint import FAULT_ENV, complete_checkpoints
from minigenrecal.scale.manifest import FIELDS

ROOT = Path(__file__).resolve().parent.parent
# Qwen2-VL classes at tiny size on both sides: byte-level BPE tokenizers, identical in every process
TRAIN = ["-m", "minigenrecal", "train", "--preset", "qwen2-vl-7b<-qwen2-vl-72b", "--tiny-random", "--stages", "1,2,3",
         "--max_steps", "4", "--n", "12", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--quiet"]  # 3 batches an epoch


def train(out, *extra, fault=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": str(ROOT)}
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    return subprocess.run([sys.executable, *TRAIN, "--output_dir", str(out), *extra], env=env, cwd=out.parent,
                          capture_output=True, text=True, timeout=300)


def losses(out):
    log = json.loads((out / "train_log.json").read_text())
    return {st: [{k: v for k, v in h.items() if k != "stage_seconds"} for h in s["history"]]
            for st, s in log["stages"].items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, without checkpoints."""
    out = tmp_path_factory.mktemp("ref") / "run"
    r = train(out, "--save_steps", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (out / "checkpoints").exists()
    return out


def _same_run(out, reference):
    assert losses(out) == losses(reference)  # every loss term, lr and skip flag of every step, bit for bit
    a, b = (load_file(o / "student" / "model.safetensors") for o in (out, reference))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # three short training processes (the reference is shared)
def test_sigkill_mid_stage_then_resume_gives_the_uninterrupted_run(reference, tmp_path):
    out = tmp_path / "run"
    r = train(out, "--save_steps", "2", fault="kill step 2 3")  # SIGKILL after stage 2's step 3
    assert r.returncode == -signal.SIGKILL
    assert not (out / "train_log.json").exists()
    assert [p.name for p in complete_checkpoints(out / "checkpoints")] == ["stage2-step0000002"]  # step 3 is lost
    r = train(out, "--save_steps", "2", "--resume_from_checkpoint", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    _same_run(out, reference)
    assert [p.name for p in complete_checkpoints(out / "checkpoints")] == ["stage3-step0000004"]  # only the latest


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_resumes_from_the_previous_one(reference, tmp_path):
    out = tmp_path / "run"
    # writes: stage 1 steps 2, 4; stage 2 steps 2, 4 <- killed after the weights are written, before the rename
    r = train(out, "--save_steps", "2", fault="kill checkpoint 4")
    assert r.returncode == -signal.SIGKILL
    ck = out / "checkpoints"
    partial = ck / ".tmp-stage2-step0000004"
    assert (partial / "module.pt").exists() and not (partial / "state.json").exists()
    assert [p.name for p in complete_checkpoints(ck)] == ["stage2-step0000002"]  # the previous one survived
    r = train(out, "--save_steps", "2", "--resume_from_checkpoint", str(ck))
    assert r.returncode == 0, r.stderr[-3000:]
    assert not partial.exists()
    _same_run(out, reference)


def test_every_train_output_carries_the_manifest(reference):
    m = json.loads((reference / "manifest.json").read_text())
    assert set(FIELDS) <= set(m)
    assert m["seed"] == 0 and m["threads"]["torch"] == 1 and m["device"]["type"] == "cpu"
    assert m["versions"]["torch"] == torch.__version__.split("+")[0] or m["versions"]["torch"] == torch.__version__
    assert m["config"]["preset"] == "qwen2-vl-7b<-qwen2-vl-72b" and m["config"]["stage_configs"]["2"]["steps"] == 4
    assert len(m["git"]["commit"] or "0" * 40) == 40
    assert json.loads((reference / "train_log.json").read_text())["manifest"] == m


# -- the NaN/inf guard (in-process) ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair_data(tiny_pair, samples):
    from minigenrecal.loop import PairData
    teacher, make_student = tiny_pair
    student = make_student(seed=3)
    return teacher, student, PairData([student.encode(s) for s in samples], [teacher.encode(s) for s in samples])


def _poisoned(teacher, bad_calls):
    """teacher_fn whose k-th call (0-based, one per step) returns NaN features for the calls in `bad_calls`."""
    from minigenrecal.stages import teacher_forward
    calls = []

    def fn(t_batch, idx):
        t = teacher_forward(teacher, t_batch)
        if len(calls) in bad_calls:
            t.z_pred = t.z_pred * float("nan")
        calls.append(idx.tolist())
        return t
    return fn, calls


def test_a_non_finite_loss_skips_the_step(pair_data):
    from minigenrecal.recalibrator import Recalibrator
    from minigenrecal.stages import StageConfig
    from minigenrecal.loop import train_stage
    teacher, student, data = pair_data
    torch.manual_seed(0)
    recal = Recalibrator(teacher.d, student.text_config)
    snaps = []
    fn, calls = _poisoned(teacher, {2})

    def spy(tb, idx):
        snaps.append([p.detach().clone() for p in recal.parameters()])
        return fn(tb, idx)
    h = train_stage(1, student, data, StageConfig(steps=4, batch_size=4, lr=1e-2), teacher=teacher, recal=recal,
                    teacher_fn=spy, progress=False)
    assert [r["skipped"] for r in h] == [False, False, True, False]
    assert not torch.isfinite(torch.tensor(h[2]["loss"])) and torch.isfinite(torch.tensor(h[3]["loss"]))
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(a, b))
    assert not same(snaps[1], snaps[2]) and same(snaps[2], snaps[3])  # step 1 updated; the skipped step 2 did not
    assert h[2]["lr"] == h[1]["lr"] and h[3]["lr"] < h[2]["lr"]  # the LR does not advance on a skipped step
    assert all(torch.isfinite(p).all() for p in recal.parameters())


def test_a_non_finite_gradient_skips_the_step(pair_data):
    from minigenrecal.stages import StageConfig
    from minigenrecal.loop import train_stage
    _, student, data = pair_data
    student = copy.deepcopy(student)
    step = {"n": 0}
    p = student.model.get_output_embeddings().weight.requires_grad_(True)  # trained in stage 3
    p.register_hook(lambda g: g * float("inf") if step["n"] == 1 else g)
    before, h = [], []
    for k in range(3):
        step["n"] = k
        before.append(p.detach().clone())
        h += train_stage(3, student, data, StageConfig(steps=1, batch_size=4, lr=1e-2), progress=False)
    after = p.detach().clone()
    assert [r["skipped"] for r in h] == [False, True, False]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in h)  # the loss was finite; the gradient was not
    assert not torch.equal(before[0], before[1]) and torch.equal(before[1], before[2])
    assert torch.isfinite(after).all()


def test_k_non_finite_steps_in_a_row_stop_the_run_naming_the_samples(pair_data):
    from minigenrecal.recalibrator import Recalibrator
    from minigenrecal.loop import NonFiniteError
    from minigenrecal.stages import StageConfig
    from minigenrecal.loop import train_stage
    teacher, student, data = pair_data
    recal = Recalibrator(teacher.d, student.text_config)
    fn, calls = _poisoned(teacher, {1, 3, 4, 5, 6, 7})
    with pytest.raises(NonFiniteError) as e:
        train_stage(1, student, data, StageConfig(steps=8, batch_size=4, lr=1e-2), teacher=teacher, recal=recal,
                    teacher_fn=fn, progress=False, max_skips=3)
    assert len(calls) == 6  # steps 0..5: the lone skip at 1 is forgiven, 3, 4, 5 in a row stop it
    msg = str(e.value)
    assert "stage 1, step 5" in msg and "3 steps in a row" in msg
    assert all(data.s[i].id in msg for i in calls[-1])


# -- the demo (in-process): a failure mid-stage, then --resume; and its manifest ------------------------------
def test_demo_resumes_mid_stage_and_writes_its_manifest(tmp_path, monkeypatch):
    from dataclasses import replace
    from minigenrecal.models.presets import get_preset
    from minigenrecal.study.pipeline import demo
    tiny = get_preset("tiny")
    preset = replace(tiny, n_train=12, **{f"stage{s}": replace(getattr(tiny, f"stage{s}"), steps=3, batch_size=4)
                                          for s in (1, 2, 3)})
    run = lambda out, **kw: demo(preset, str(out), n_test=4, progress=False, log=lambda *_: None, **kw)
    ref = run(tmp_path / "ref")
    assert not (tmp_path / "ref" / "checkpoints").exists()
    monkeypatch.setenv(FAULT_ENV, "raise step 2 1")  # an exception after stage 2's first step (in-process)
    with pytest.raises(RuntimeError, match="injected fault"):
        run(tmp_path / "run", checkpoint_every=2)
    monkeypatch.delenv(FAULT_ENV)
    assert [p.name for p in complete_checkpoints(tmp_path / "run" / "checkpoints")] == ["stage1-step0000003"]
    res = run(tmp_path / "run", checkpoint_every=2, resume=str(tmp_path / "run"))
    strip = lambda hs: {s: [{k: v for k, v in r.items() if k != "stage_seconds"} for r in h] for s, h in hs.items()}
    assert strip(res["histories"]) == strip(ref["histories"])
    assert [res[f"student_after_stage{s}"] for s in (1, 2, 3)] == [ref[f"student_after_stage{s}"] for s in (1, 2, 3)]
    for out, r in ((tmp_path / "ref", ref), (tmp_path / "run", res)):
        m = json.loads((out / "manifest.json").read_text())
        assert set(FIELDS) <= set(m) and m == r["manifest"]
        assert m["config"]["preset"]["stage2"]["steps"] == 3 and m["threads"]["torch"] == torch.get_num_threads()
        if (out / "summary.json").exists():
            assert json.loads((out / "summary.json").read_text())["manifest"] == m


# -- resume jumps to the data position: nothing before it is rendered again (in-process) ------------------------
@pytest.mark.parametrize("mode", ["stream", "lazy"])
def test_resume_renders_only_the_batches_after_the_resume_point(tiny_pair, tmp_path, monkeypatch, mode):
    """A stage of 6 steps over a JSONL read lazily (shuffled) or as a stream, with a bad record before the resume
    point: stopped after step 3, resumed from the step-2 checkpoint, it renders exactly the 4 batches after step 2
    and gives the uninterrupted history and skip report."""
    from minigenrecal.data.llava import write_llava_json
    from minigenrecal.data.sources import LazyPairData, StreamPairData, open_source
    from minigenrecal.data.synthetic import make_split
    from minigenrecal.loop import train_stage
    from minigenrecal.recalibrator import Recalibrator
    from minigenrecal.scale.checkpoint import Checkpointer, StreamPosition
    from minigenrecal.stages import StageConfig
    records = json.loads(write_llava_json(make_split(0, "train", 11), tmp_path).read_text())
    records[1]["image"] = "missing.png"  # 10 good records: 5 batches a pass, and a bad one in the first batch
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    teacher, make_student = tiny_pair
    cfg, steps_before = StageConfig(steps=6, batch_size=2, lr=1e-2), 2

    def run(callbacks=()):
        student = make_student(seed=3)
        renders = []
        encode = student.encode
        monkeypatch.setattr(student, "encode", lambda s: renders.append(s.id) or encode(s))
        source = open_source(path)
        data = (StreamPairData(StreamPosition(source), student, teacher, skipped=[]) if mode == "stream"
                else LazyPairData(source, student, teacher, skipped=[]))
        torch.manual_seed(0)
        recal = Recalibrator(teacher.d, student.text_config)
        try:
            history = train_stage(1, student, data, cfg, teacher=teacher, recal=recal, progress=False,
                                  callbacks=callbacks)
        except RuntimeError:
            history = None
        return history, renders, data.skipped

    ref, ref_renders, ref_skipped = run()
    assert len(ref_renders) == cfg.steps * cfg.batch_size and len(ref_skipped) == 1
    monkeypatch.setenv(FAULT_ENV, "raise step 1 3")
    assert run([Checkpointer(tmp_path / "ck", every=steps_before)])[0] is None
    monkeypatch.delenv(FAULT_ENV)
    assert [p.name for p in complete_checkpoints(tmp_path / "ck")] == ["stage1-step0000002"]
    history, renders, skipped = run([Checkpointer(tmp_path / "ck", every=steps_before, resume=True)])
    assert history == ref  # every loss term, lr and skip flag, bit for bit
    assert renders == ref_renders[steps_before * cfg.batch_size:]  # exactly the batches after step 2, in order
    assert skipped == ref_skipped  # the bad record met before the resume point is still reported
