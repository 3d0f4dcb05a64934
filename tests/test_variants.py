"""Our variants of the method (study/variants.py): what each main path reads, and where its gradient goes."""
import pytest
import torch

from minigenrecal.losses import answer_rows
from minigenrecal.recalibrator import Recalibrator
from minigenrecal.stages import GenRecal, StageConfig, teacher_forward
from minigenrecal.study.variants import StudentAnswers


@pytest.fixture(scope="module")
def same_pair(tiny_pair, samples):
    """The tiny teacher and a same-tokenizer student (the transfer study's positive-control student), one batch."""
    from minigenrecal.models.vlm import VLMView
    from minigenrecal.study.baselines import build_same_tokenizer_student
    teacher, _ = tiny_pair
    student = VLMView(*build_same_tokenizer_student(0), name="teacher")  # renders exactly as the teacher does
    batch = samples[:4]
    s_batch = student.collate([student.encode(s) for s in batch])
    t = teacher_forward(teacher, teacher.collate([teacher.encode(s) for s in batch]))
    torch.manual_seed(0)
    recal = Recalibrator(teacher.d, student.text_config, depth=1)
    return teacher, student, recal, s_batch, t


def test_student_answers_reads_the_students_own_sequence(same_pair):
    """Main rows = the Recalibrator over the student's own features up to its last answer-predicting row, at the
    rows Lq-1 .. Lq+La-2: by hand, sample by sample."""
    teacher, student, recal, s_batch, t = same_pair
    m = StudentAnswers(student, recal, teacher.head)
    with torch.no_grad():
        z_s = student.body(s_batch)
        q, a = s_batch["q_lens"].tolist(), s_batch["a_lens"].tolist()
        h = m.main_rows([z_s[b, :n] for b, n in enumerate(q)], z_s, s_batch, t)
        ref = torch.cat([recal.run(z_s[b: b + 1, : q[b] + a[b] - 1], [q[b]], [a[b]])[0, q[b] - 1: q[b] + a[b] - 1]
                         for b in range(len(q))])
    assert h.shape == (sum(a), teacher.d)
    torch.testing.assert_close(h, ref, rtol=1e-4, atol=1e-5)


def test_student_answers_reaches_the_students_answer_positions_and_genrecal_does_not(same_pair):
    """The main path's KL reaches the student's answer features only in the variant: the method's main path reads
    the teacher's answer features there."""
    teacher, student, recal, s_batch, t = same_pair
    cfg = StageConfig(w_ce=0.0, reg=False, w_student=0.0)
    grads = {}
    for cls in (GenRecal, StudentAnswers):
        z = student.body(s_batch).detach().requires_grad_(True)
        m = cls(student, recal, teacher.head)
        zq = [z[b, :n] for b, n in enumerate(s_batch["q_lens"].tolist())]
        from minigenrecal.losses import head_losses
        _, kl = head_losses(m.main_rows(zq, z, s_batch, t), t.z_pred, t.labels, teacher.head)
        g, = torch.autograd.grad(kl, z, allow_unused=True)
        grads[cls.__name__] = answer_rows(g, s_batch["q_lens"], s_batch["a_lens"] - 1, shift=0).abs().sum()
    assert grads["GenRecal"] == 0 and grads["StudentAnswers"] > 0


def test_student_answers_refuses_a_cross_tokenizer_batch_naming_the_sample(same_pair):
    teacher, student, recal, s_batch, t = same_pair
    bad = dict(s_batch, a_lens=s_batch["a_lens"].clone())
    bad["a_lens"][2] += 1
    z_s = torch.zeros(*bad["input_ids"].shape, student.d)
    with pytest.raises(ValueError, match="sample 2 of the batch"):
        StudentAnswers(student, recal, teacher.head).main_rows([z_s[0, :3]] * 4, z_s, bad, t)
    with pytest.raises(ValueError, match="chunk_size=None"):
        StudentAnswers(student, recal, teacher.head)(2, s_batch, t, StageConfig(chunk_size=64))
