"""Mutation tests for the exercise checkers: every reference passes, typical wrong answers fail with the right hint,
and `grade` on a filled-in notebook reports exactly the exercise that is wrong."""
import json
import math
from pathlib import Path

import nbformat
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from minigenrecal.teach import exercises, grading
from minigenrecal import recalibrator, stages
from minigenrecal.teach.exercises import EXERCISES

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _learner_mode(monkeypatch):
    """Checks here must see the function under test, not the reference solutions CI switches on for notebooks."""
    monkeypatch.delenv(exercises.SOLUTIONS_ENV, raising=False)
    monkeypatch.delenv(exercises.RESULTS_ENV, raising=False)


# -- wrong answers a learner might write, each with the hint it must get --------------------------------------
def _npe_teacher_positions(q_len, a_len, teacher_q_len):
    return torch.cat([torch.arange(q_len), teacher_q_len + torch.arange(a_len - 1)])


def _npe_whole_answer(q_len, a_len, teacher_q_len):
    return torch.arange(q_len + a_len)


def _npe_restart(q_len, a_len, teacher_q_len):
    return torch.tensor(list(range(q_len)) + list(range(a_len - 1)))


def _rows_answer_positions(x, q_lens, a_lens):  # rows of the answer tokens themselves: off by one
    return torch.cat([x[b, q: q + a] for b, (q, a) in enumerate(zip(q_lens.tolist(), a_lens.tolist()))])


def _rows_padded_to_longest(x, q_lens, a_lens):  # La_max rows from every sample
    n = int(a_lens.max())
    return torch.cat([x[b, q - 1: q - 1 + n] for b, q in enumerate(q_lens.tolist())])


def _rows_first_lengths(x, q_lens, a_lens):
    q, a = int(q_lens[0]), int(a_lens[0])
    return x[:, q - 1: q + a - 1].reshape(-1, x.shape[-1])


def _rows_stacked(x, q_lens, a_lens):
    rows = [x[b, q - 1: q + a - 1] for b, (q, a) in enumerate(zip(q_lens.tolist(), a_lens.tolist()))]
    return nn.utils.rnn.pad_sequence(rows, batch_first=True)


def _sdpa_block(causal=True, rope=True, interleave=True):
    def block_fn(block, x, pos):
        B, T, _ = x.shape
        h = block.norm1(x)
        q = block.q(h).view(B, T, block.n_heads, block.head_dim).transpose(1, 2)
        k = block.k(h).view(B, T, block.n_kv, block.head_dim).transpose(1, 2)
        v = block.v(h).view(B, T, block.n_kv, block.head_dim).transpose(1, 2)
        if rope:
            q, k = recalibrator.rope(q, pos, block.theta), recalibrator.rope(k, pos, block.theta)
        rep = block.n_heads // block.n_kv
        if interleave:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        else:  # tile the KV heads: query head i gets KV head i % n_kv
            k, v = torch.cat([k] * rep, dim=1), torch.cat([v] * rep, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        x = x + block.o(a.transpose(1, 2).reshape(B, T, -1))
        h = block.norm2(x)
        return x + block.down(F.silu(block.gate(h)) * block.up(h))
    return block_fn


def _block_post_norm(block, x, pos):
    B, T, _ = x.shape
    q = recalibrator.rope(block.q(x).view(B, T, block.n_heads, block.head_dim).transpose(1, 2), pos, block.theta)
    k = recalibrator.rope(block.k(x).view(B, T, block.n_kv, block.head_dim).transpose(1, 2), pos, block.theta)
    v = block.v(x).view(B, T, block.n_kv, block.head_dim).transpose(1, 2)
    rep = block.n_heads // block.n_kv
    a = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=True)
    x = block.norm1(x + block.o(a.transpose(1, 2).reshape(B, T, -1)))
    return block.norm2(x + block.down(F.silu(block.gate(x)) * block.up(x)))


def _kl_div(reverse=False, tau_sq=True, reduction="batchmean", detach=False):
    def kl(student_logits, teacher_logits, tau):
        s = student_logits.detach() if detach else student_logits
        log_s, log_t = F.log_softmax(s / tau, -1), F.log_softmax(teacher_logits / tau, -1)
        out = (F.kl_div(log_t, log_s.exp(), reduction=reduction) if reverse
               else F.kl_div(log_s, log_t.exp(), reduction=reduction))
        return out * (tau ** 2 if tau_sq else 1.0)
    return kl


def _kl_naive_log(student_logits, teacher_logits, tau):
    p_t, p_s = (teacher_logits / tau).softmax(-1), (student_logits / tau).softmax(-1)
    return (p_t * (p_t.log() - p_s.log())).sum(-1).mean() * tau ** 2


def _ce_probs(h, labels, head):
    return F.cross_entropy(F.softmax(head(h), dim=-1), labels)


def _ce_sum(h, labels, head):
    return -F.log_softmax(head(h), -1).gather(1, labels[:, None]).sum()


def _ce_no_grad(h, labels, head):
    with torch.no_grad():
        return F.cross_entropy(head(h), labels)


def _ce_unfreezes_head(h, labels, head):
    head.requires_grad_(True)
    return F.cross_entropy(head(h), labels)


def _reg_main_path(recal, z_qs, t):
    return z_qs


def _reg_no_proj(recal, z_qs, t):
    return [z for z in t.z_q]


def _reg_detached(recal, z_qs, t):
    with torch.no_grad():
        return [recal.proj_pre(z) for z in t.z_q]


def _reg_padded(recal, z_qs, t):
    return recal.proj_pre(nn.utils.rnn.pad_sequence(t.z_q, batch_first=True))


def _trainable(freeze_first=True, freeze_teacher=True, recal_in_stage3=False, vision=False, projector=True,
               by_name=False):
    def set_trainable(stage, student, recal, teacher):
        if freeze_first:
            for m in (student, recal) + ((teacher,) if freeze_teacher else ()):
                m.requires_grad_(False)
        if stage in (1, 2) or (stage == 3 and recal_in_stage3):
            recal.requires_grad_(True)
        if stage in (2, 3):
            for name, p in student.named_parameters():
                is_vision = "vision" in name and "connector" not in name if by_name else None
                if by_name:
                    p.requires_grad_(not is_vision and (projector or "connector" not in name))
            if not by_name:
                g = stages.student_groups(student)
                for p in g["llm"] + (g["projector"] if projector else []) + (g["vision"] if vision else []):
                    p.requires_grad_(True)
    return set_trainable


def _jsd_kl(p, q):
    return float((p * (p / q).log()).sum())


def _jsd_bits(p, q):
    m = (p + q) / 2
    return float(0.5 * (torch.xlogy(p, p) - torch.xlogy(p, m)).sum() / math.log(2)
                 + 0.5 * (torch.xlogy(q, q) - torch.xlogy(q, m)).sum() / math.log(2))


def _jsd_nan(p, q):
    m = (p + q) / 2
    return float(0.5 * (p * (p / m).log()).sum() + 0.5 * (q * (q / m).log()).sum())


def _jsd_unweighted(p, q):
    m = (p + q) / 2
    return float((torch.xlogy(p, p / m)).sum() + (torch.xlogy(q, q / m)).sum())


WRONG = {
    "npe_positions": [(_npe_teacher_positions, "teacher's own positions"), (_npe_whole_answer, "one position too many"),
                      (_npe_restart, "restarts at 0")],
    "answer_rows": [(_rows_answer_positions, "prediction rows are shifted by one: the last question position must "
                                             "predict a_0"),
                    (_rows_padded_to_longest, "padded positions got into the rows, so they would change the loss"),
                    (_rows_first_lengths, "first sample's Lq and La"), (_rows_stacked, "concatenated over the batch")],
    "block": [(_sdpa_block(causal=False), "not causal"), (_sdpa_block(rope=False), "no rotary embedding"),
              (_sdpa_block(interleave=False), "repeat_interleave"), (_block_post_norm, "pre-norm")],
    "kl": [(_kl_div(reverse=True), "this is KL(p_s || p_t), the reverse direction"),
           (_kl_div(tau_sq=False), "missing the tau^2 factor"), (_kl_div(reduction="mean"), "every vocabulary entry"),
           (_kl_div(detach=True), "no gradient reaches the student's logits"), (_kl_naive_log, "F.log_softmax")],
    "head_ce": [(_ce_probs, "raw logits"), (_ce_sum, "summed over rows"), (_ce_no_grad, "no gradient reaches h"),
                (_ce_unfreezes_head, "head must stay frozen")],
    "reg_input": [(_reg_main_path, "main path's input"), (_reg_no_proj, "missing proj_pre"),
                  (_reg_detached, "no gradient reaches proj_pre"), (_reg_padded, "not a padded batch")],
    "trainable": [(_trainable(recal_in_stage3=True), "stage 3 removes the Recalibrator"),
                  (_trainable(vision=True), "vision encoder stays frozen"),
                  (_trainable(freeze_first=False), "freeze every module first"),
                  (_trainable(freeze_teacher=False), "teacher (body and head) must stay frozen"),
                  (_trainable(projector=False), "vision projector"),
                  (_trainable(by_name=True), "stages.student_groups")],
    "jsd": [(_jsd_kl, "this is KL(p || q)"), (_jsd_bits, "in bits"), (_jsd_nan, "0 * log 0"),
            (_jsd_unweighted, "missing the 0.5 weights")],
}
CASES = [(name, fn, hint) for name, wrong in WRONG.items() for fn, hint in wrong]


def test_every_exercise_has_mutants():
    assert set(WRONG) == set(EXERCISES) and all(len(w) >= 2 for w in WRONG.values())


@pytest.mark.parametrize("name", list(EXERCISES))
def test_reference_solution_passes(name, capsys):
    r = EXERCISES[name].check(EXERCISES[name].solution)
    assert r.passed and r.hint == "" and r.name == name
    assert capsys.readouterr().out.startswith(f"PASS · {name}")


@pytest.mark.parametrize("name,fn,hint", CASES, ids=[f"{n}-{f.__name__}" for n, f, _ in CASES])
def test_wrong_answer_fails_with_its_hint(name, fn, hint, capsys):
    r = EXERCISES[name].check(fn)
    assert not r.passed and r.attempted
    assert hint in r.hint, r.hint
    assert "failing case:" in r.hint
    assert capsys.readouterr().out.startswith(f"FAIL · {name}: ")


def _rows_by_mask(x, q_lens, a_lens):
    pos = torch.arange(x.shape[1])[None]  # (1, T)
    keep = (pos >= q_lens[:, None] - 1) & (pos < (q_lens + a_lens)[:, None] - 1)  # (B, T)
    return x[keep]


def _block_sdpa_gqa(block, x, pos):
    B, T, _ = x.shape
    h = block.norm1(x)
    q = recalibrator.rope(block.q(h).view(B, T, -1, block.head_dim).transpose(1, 2), pos, block.theta)
    k = recalibrator.rope(block.k(h).view(B, T, -1, block.head_dim).transpose(1, 2), pos, block.theta)
    v = block.v(h).view(B, T, -1, block.head_dim).transpose(1, 2)
    a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    x = x + block.o(a.transpose(1, 2).flatten(2))
    h = block.norm2(x)
    return x + block.down(F.silu(block.gate(h)) * block.up(h))


OTHER_RIGHT_ANSWERS = [
    ("npe_positions", lambda q_len, a_len, teacher_q_len: list(range(q_len + a_len - 1))),
    ("answer_rows", _rows_by_mask),
    ("block", _block_sdpa_gqa),
    ("kl", lambda s, t, tau: F.kl_div(F.log_softmax(s / tau, -1), F.log_softmax(t / tau, -1), log_target=True,
                                      reduction="batchmean") * tau * tau),
    ("head_ce", lambda h, labels, head: F.nll_loss(F.log_softmax(head(h), -1), labels)),
    ("reg_input", lambda recal, z_qs, t: tuple(map(recal.proj_pre, t.z_q))),
    ("jsd", lambda p, q: 0.5 * F.kl_div(((p + q) / 2).log(), p, reduction="sum")
     + 0.5 * F.kl_div(((p + q) / 2).log(), q, reduction="sum")),
]


@pytest.mark.parametrize("name,fn", OTHER_RIGHT_ANSWERS, ids=[n for n, _ in OTHER_RIGHT_ANSWERS])
def test_other_right_answers_pass(name, fn):
    """No false alarms: correct answers written another way (lists, masks, F.kl_div, SDPA with GQA) pass."""
    r = EXERCISES[name].check(fn)
    assert r.passed, r.hint


def test_package_functions_pass_their_own_checks():
    """The checkers' references are the package's code: the package itself passes."""
    assert exercises.check_kl(lambda s, t, tau: __import__("minigenrecal").losses.kl_from_logits(s, t, tau)).passed
    assert exercises.check_answer_rows(lambda x, q, a: __import__("minigenrecal").losses.answer_rows(x, q, a)).passed
    assert exercises.check_block(lambda block, x, pos: block(x, pos)).passed
    assert exercises.check_trainable(lambda st, s, r, t: stages.set_trainable(st, s, r, t)).passed


def _stub(*args):
    raise NotImplementedError("fill me in")


def test_not_attempted_is_reported_without_raising(capsys):
    r = exercises.check_kl(_stub)
    assert not r.passed and not r.attempted and "NotImplementedError" in r.hint
    assert capsys.readouterr().out.startswith("not attempted yet · kl")
    with pytest.raises(AssertionError, match="not attempted"):
        exercises.check_kl(_stub, strict=True)


def test_a_learner_error_becomes_a_hint():
    r = exercises.check_head_ce(lambda h, labels, head: head(h) @ labels)
    assert not r.passed and "your function raised RuntimeError" in r.hint


def test_checks_leave_the_learners_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    exercises.check_block(EXERCISES["block"].solution)
    assert torch.equal(torch.rand(3), expected)


def test_solutions_switch_checks_the_reference(monkeypatch, capsys):
    monkeypatch.setenv(exercises.SOLUTIONS_ENV, "1")
    for ex in EXERCISES.values():
        assert ex.check(_stub).passed
    assert "reference solution" in capsys.readouterr().out


def test_results_file_gets_one_json_line_per_check(monkeypatch, tmp_path):
    monkeypatch.setenv(exercises.RESULTS_ENV, str(tmp_path / "r.jsonl"))
    exercises.check_kl(_kl_div(reverse=True))
    exercises.check_jsd(EXERCISES["jsd"].solution)
    lines = [json.loads(l) for l in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [(l["name"], l["passed"]) for l in lines] == [("kl", False), ("jsd", True)]
    assert "reverse direction" in lines[0]["hint"] and set(lines[0]) == {"name", "passed", "hint"}


# -- the notebooks: stubs, check cells and nbgrader metadata ------------------------------------------------
NOTEBOOKS = sorted({e.notebook for e in EXERCISES.values()})


def _load(stem):
    return nbformat.read(ROOT / "notebooks" / f"{stem}.ipynb", as_version=4)


@pytest.mark.parametrize("stem", NOTEBOOKS)
def test_notebook_exercise_cells_match_the_registry(stem):
    nb = _load(stem)
    exs = exercises.for_notebook(stem)
    assert grading.exercise_names(nb) == [e.name for e in exs]
    by_id = {c.metadata["nbgrader"]["grade_id"]: c for c in nb.cells if "nbgrader" in c.metadata}
    for e in exs:
        stub, check = by_id[f"{e.name}_solution"], by_id[e.name]
        assert stub.source == e.stub() and stub.metadata.nbgrader["solution"] and not stub.metadata.nbgrader["grade"]
        assert check.source == e.check_source()
        assert check.metadata.nbgrader["grade"] and check.metadata.nbgrader["points"] == e.points
        assert check.metadata.nbgrader["locked"] and not check.metadata.nbgrader["solution"]


@pytest.mark.parametrize("stem", NOTEBOOKS)
def test_filled_stubs_pass_in_the_notebooks_namespace(stem, capsys):
    """The reference bodies, put into the notebook's stubs and run after its setup cell, pass their checks."""
    nb = grading.instructor_notebook(_load(stem))
    ns = {}
    start = next(i for i, c in enumerate(nb.cells) if c.get("id") == "ex-setup")
    for cell in nb.cells[start:]:
        if cell.cell_type == "code":
            assert "### BEGIN SOLUTION" in cell.source or "nbgrader" not in cell.metadata or \
                not cell.metadata.nbgrader["solution"]
            exec(compile(cell.source, stem, "exec"), ns)
    out = capsys.readouterr().out
    assert out.count("PASS · ") == len(exercises.for_notebook(stem)) and "FAIL" not in out


def test_instructor_notebook_has_solution_regions_and_strict_checks():
    nb = grading.instructor_notebook(_load("03_stage1_losses"))
    stub = next(c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") == "kl_solution")
    assert "### BEGIN SOLUTION" in stub.source and "### END SOLUTION" in stub.source
    assert "NotImplementedError" not in stub.source and stub.source.startswith("def my_kl(")
    check = next(c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") == "kl")
    assert check.source == "exercises.check_kl(my_kl, strict=True);"


def test_grade_reports_exactly_the_wrong_exercise(tmp_path, capsys):
    """A filled-in notebook 02 with one wrong answer (the boundary shifted by one): only that exercise fails."""
    from minigenrecal import cli
    nb = _load("02_embedding_alignment")
    bodies = {e.name: e.solution_body() for e in exercises.for_notebook("02_embedding_alignment")}
    bodies["answer_rows"] = ("return torch.cat([x[b, q: q + a] for b, (q, a) in "
                             "enumerate(zip(q_lens.tolist(), a_lens.tolist()))])")
    path = tmp_path / "02_filled.ipynb"
    nbformat.write(grading.fill(nb, bodies), path)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["grade", str(path), "--smoke", "--exercises-only", "--timeout", "300"])
    assert exit_.value.code == 1
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert [(r["name"], r["passed"]) for r in lines] == [("npe_positions", True), ("answer_rows", False),
                                                         ("block", True)], lines
    assert "prediction rows are shifted by one" in lines[1]["hint"] and lines[0]["hint"] == ""


@pytest.mark.filterwarnings("ignore")  # nbgrader's own SQLAlchemy warnings
def test_nbgrader_autogrades_an_assignment(tmp_path, monkeypatch):
    """The exercises of notebook 02 as an nbgrader assignment: generate, submit one wrong answer, autograde."""
    import os
    import sys

    from nbgrader.api import Gradebook
    from nbgrader.apps import NbGraderAPI
    from traitlets.config import Config
    bin_dir = str(Path(sys.executable).parent)
    monkeypatch.setenv("PATH", bin_dir + os.pathsep + os.environ["PATH"])  # nbgrader runs alembic from there
    monkeypatch.setenv("JUPYTER_CONFIG_DIR", str(tmp_path / "jupyter"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "source" / "ps02").mkdir(parents=True)
    nb = grading.instructor_notebook(grading.only_exercises(_load("02_embedding_alignment")))
    nbformat.write(nb, tmp_path / "source" / "ps02" / "02.ipynb")
    cfg = Config()
    cfg.CourseDirectory.root, cfg.CourseDirectory.course_id = str(tmp_path), "genrecal"
    cfg.Execute.timeout = 300  # seconds per cell (nbgrader's default, 30, is tight for the first imports on a busy CPU)
    api = NbGraderAPI(config=cfg)
    assert api.generate_assignment("ps02", force=True)["success"]
    released = nbformat.read(tmp_path / "release" / "ps02" / "02.ipynb", as_version=4)
    text = nbformat.writes(released)
    assert "### BEGIN SOLUTION" not in text and "def my_block(block, x, pos):" in text
    bodies = {e.name: e.solution_body() for e in exercises.for_notebook("02_embedding_alignment")}
    bodies["block"] = "return block(x, torch.arange(x.shape[1]))"  # ignores the `pos` argument
    (tmp_path / "submitted" / "alice" / "ps02").mkdir(parents=True)
    nbformat.write(grading.fill(released, bodies), tmp_path / "submitted" / "alice" / "ps02" / "02.ipynb")
    assert api.autograde("ps02", "alice", force=True, create=True)["success"]
    with Gradebook(f"sqlite:///{tmp_path / 'gradebook.db'}") as gb:
        scores = {g: gb.find_grade(g, "02", "ps02", "alice").score for g in ("npe_positions", "answer_rows", "block")}
    assert scores == {"npe_positions": 1.0, "answer_rows": 1.0, "block": 0.0}


def test_grade_says_why_a_check_never_ran():
    """Without executing anything: the error outputs of an executed notebook name the cell that stopped a check."""
    nb = _load("02_embedding_alignment")
    error = lambda name: [{"output_type": "error", "ename": name, "evalue": "...", "traceback": []}]
    for c in nb.cells:
        gid = c.metadata.get("nbgrader", {}).get("grade_id")
        c.outputs = error("SyntaxError") if gid == "block_solution" else (error("NameError") if gid == "block" else [])
    assert grading._why_not_run(nb, "block").startswith("its stub cell raised SyntaxError")
    nb.cells[2].outputs = error("RuntimeError")
    assert "cell 2 raised RuntimeError" in grading._why_not_run(nb, "npe_positions")
