"""Stages 1-3: exactly the intended parameters train; the teacher never changes; the student ships as plain transformers."""
import hashlib

import pytest
import torch

from minigenrecal.data.synthetic import make_split
from minigenrecal.recalibrator import Recalibrator
from minigenrecal.loop import PairData, train_stage
from minigenrecal.stages import StageConfig, stage_loss, student_groups, teacher_forward


def _digest(module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _snap(params):
    return [p.detach().clone() for p in params]


def _changed(before, params):
    return [not torch.equal(b, p.detach()) for b, p in zip(before, params)]


@pytest.fixture(scope="module")
def setup(tiny_pair):
    teacher, make_student = tiny_pair
    student = make_student(seed=3)
    train = make_split(0, "train", 16)
    data = PairData([student.encode(s) for s in train], [teacher.encode(s) for s in train])
    torch.manual_seed(0)
    recal = Recalibrator(teacher.d, student.text_config)
    return teacher, student, recal, data


EXPECTED = {1: {"recal"}, 2: {"recal", "llm", "projector"}, 3: {"llm", "projector"}}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_gradients_reach_exactly_the_intended_parameters(setup, stage):
    from minigenrecal.stages import set_trainable
    teacher, student, recal, data = setup
    set_trainable(stage, student.model, recal, teacher.model)
    s_batch = student.collate(data.s[:4])
    t = teacher_forward(teacher, teacher.collate(data.t[:4])) if stage < 3 else None
    for p in list(student.model.parameters()) + list(recal.parameters()) + list(teacher.model.parameters()):
        p.grad = None
    terms = stage_loss(stage, student, recal if stage < 3 else None, teacher.head, s_batch, t, StageConfig())
    terms["loss"].backward()
    expected_terms = {1: {"ce_main", "kl_main", "ce_reg", "kl_reg"},
                      2: {"ce_main", "kl_main", "ce_reg", "kl_reg", "ce_student"}, 3: {"ce_student"}}[stage]
    assert set(terms) - {"loss"} == expected_terms
    groups = {**student_groups(student.model), "recal": list(recal.parameters()), "teacher": list(teacher.model.parameters())}
    for name, params in groups.items():
        has = [p.grad is not None and p.grad.abs().sum() > 0 for p in params]
        if name in EXPECTED[stage]:
            assert sum(has) >= 0.9 * len(has), f"stage {stage}: {name} should get gradients"
        else:
            assert not any(has), f"stage {stage}: {name} must not get gradients"
    for p in groups["recal"] + list(student.model.parameters()):
        p.grad = None


def test_training_changes_exactly_the_intended_parameters_and_never_the_teacher(setup):
    teacher, student, recal, data = setup
    t_digest = _digest(teacher.model)
    groups = {**student_groups(student.model), "recal": list(recal.parameters())}
    history = {}
    for stage in (1, 2, 3):
        before = {k: _snap(v) for k, v in groups.items()}
        history[stage] = train_stage(stage, student, data, StageConfig(steps=2, batch_size=8, lr=1e-2),
                                     teacher=teacher, recal=recal, progress=False)
        for name, params in groups.items():
            ch = _changed(before[name], params)
            if name in EXPECTED[stage]:
                assert sum(ch) >= 0.9 * len(ch), f"stage {stage}: {name} should change"
            else:
                assert not any(ch), f"stage {stage}: {name} must not change"
    assert _digest(teacher.model) == t_digest
    assert all(not p.requires_grad for p in teacher.model.parameters())
    for stage, h in history.items():
        assert len(h) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in h)
        assert h[-1]["lr"] < h[0]["lr"]  # linear decay within the stage


def test_lr_decays_linearly_from_lr_to_lr_end(setup):
    _, student, _, data = setup
    h = train_stage(3, student, data, StageConfig(steps=4, batch_size=8, lr=1e-3, lr_end=1e-4), progress=False)
    lrs = [r["lr"] for r in h]  # lr after each optimizer step
    torch.testing.assert_close(torch.tensor(lrs), torch.tensor([1e-3 - 9e-4 * k / 4 for k in (1, 2, 3, 4)]))


def test_stage3_student_saves_and_reloads_as_plain_transformers(setup, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from minigenrecal.models.vlm import VLMView
    _, student, _, _ = setup
    student.model.save_pretrained(tmp_path)
    student.processor.save_pretrained(tmp_path)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path)
    proc = AutoProcessor.from_pretrained(tmp_path)
    assert type(model).__name__ == type(student.model).__name__
    for k, v in student.model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v)
    samples = make_split(5, "test", 3)
    reloaded = VLMView(model, proc, name="reloaded")
    assert reloaded.generate(samples, 6) == student.generate(samples, 6)
