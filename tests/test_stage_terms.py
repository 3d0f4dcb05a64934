"""Each stage's loss terms against an independent composition, where each term's gradient goes in stage 2, and
`train_stage` against a hand-written AdamW loop."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from minigenrecal.losses import TeacherOut, recal_path
from minigenrecal.recalibrator import Recalibrator
from minigenrecal.loop import PairData, train_stage
from minigenrecal.stages import StageConfig, set_trainable, stage_loss, student_groups, teacher_forward

TERMS = ("ce_main", "kl_main", "ce_reg", "kl_reg", "ce_student")


class FeatureSpy:
    """A student view that keeps its body's output (B, T_s, d_s), so the gradient at each feature can be read."""

    def __init__(self, view):
        self.view, self.model, self.z = view, view.model, None

    def body(self, batch):
        self.z = self.view.body(batch)
        if self.z.requires_grad:
            self.z.retain_grad()
        return self.z

    def student_ce(self, z, batch):
        return self.view.student_ce(z, batch)


def _model_inputs(batch):
    return {k: v for k, v in batch.items() if k not in ("q_lens", "a_lens")}


def _answer_ce_from_logits(logits, batch):
    """The student's CE from its own full-model logits: position Lq-1+j predicts answer token j."""
    rows, labels = [], []
    for b, (q, a) in enumerate(zip(batch["q_lens"].tolist(), batch["a_lens"].tolist())):
        rows.append(logits[b, q - 1: q + a - 1])
        labels.append(batch["input_ids"][b, q: q + a])
    return F.cross_entropy(torch.cat(rows).float(), torch.cat(labels))


def _ce_kl_reference(h, t, head, tau):
    """CE of head(h) against the labels, and tau^2 * mean_r KL(p_teacher(r) || p_h(r)) at temperature tau."""
    s = h @ head.weight.T + head.bias  # (N, V_l)
    z = t.z_pred @ head.weight.T + head.bias  # (N, V_l) the teacher's logits
    ce = -s.log_softmax(-1).gather(1, t.labels[:, None]).mean()
    log_pt, log_ps = (z / tau).log_softmax(-1), (s / tau).log_softmax(-1)
    return ce, (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean() * tau ** 2


# -- 1. the loss of a stage equals the weighted sum of independently composed terms ------------------------
@pytest.fixture(scope="module")
def handmade(tiny_pair, samples):
    """A real tiny student, a Recalibrator on an EQUAL-width teacher (d_l = d_s, so a skipped proj_pre cannot
    crash), a hand-made frozen head with bias and a hand-made TeacherOut."""
    _, make_student = tiny_pair
    student = make_student(seed=1)
    s_batch = student.collate([student.encode(s) for s in samples[:2]])
    d, V_l, Lq_l, La = student.d, 23, (5, 3), (3, 4)
    g = torch.Generator().manual_seed(0)
    t = TeacherOut(z_q=[torch.randn(q, d, generator=g) for q in Lq_l],
                   z_a=[torch.randn(a - 1, d, generator=g) for a in La],
                   z_pred=torch.randn(sum(La), d, generator=g) * 3,
                   labels=torch.randint(0, V_l, (sum(La),), generator=g),
                   a_lens=torch.tensor(La))
    torch.manual_seed(0)
    recal = Recalibrator(d, student.text_config).eval()
    head = nn.Linear(d, V_l).requires_grad_(False)
    return student, recal, head, s_batch, t


@pytest.mark.parametrize("stage", [1, 2])
def test_stage_loss_is_the_weighted_sum_of_independently_composed_terms(handmade, stage):
    student, recal, head, s_batch, t = handmade
    cfg = StageConfig(w_ce=0.3, w_kl=1.7, w_student=0.6, tau=2.0)
    with torch.no_grad():
        got = stage_loss(stage, student, recal, head, s_batch, t, cfg)
        # main path, one sample at a time (no padding): [z_qs, proj_pre(z_a)] -> rows Lq_s-1 .. Lq_s+La-2
        z_s = student.model.model(**_model_inputs(s_batch)).last_hidden_state
        h = []
        for b, (Lq_s, La) in enumerate(zip(s_batch["q_lens"].tolist(), t.a_lens.tolist())):
            out = recal([z_s[b, :Lq_s]], [t.z_a[b]])[0]  # (Lq_s + La - 1, d_l)
            h.append(out[Lq_s - 1: Lq_s + La - 1])
        ce_main, kl_main = _ce_kl_reference(torch.cat(h), t, head, cfg.tau)
        # regularization path: the TEACHER's question, brought to d_s by proj_pre
        ce_reg, kl_reg = recal_path(recal, [recal.proj_pre(q) for q in t.z_q], t, head, cfg.tau)
        ce_student = _answer_ce_from_logits(student.model(**_model_inputs(s_batch)).logits, s_batch)
    ref = {"ce_main": ce_main, "kl_main": kl_main, "ce_reg": ce_reg, "kl_reg": kl_reg}
    if stage == 2:
        ref["ce_student"] = ce_student
    assert set(got) == set(ref) | {"loss"}
    for k, v in ref.items():
        torch.testing.assert_close(got[k], v, msg=f"stage {stage}: {k} differs from its reference composition")
    loss = cfg.w_ce * (ce_main + ce_reg) + cfg.w_kl * (kl_main + kl_reg)
    loss = loss + (cfg.w_student * ce_student if stage == 2 else 0)
    torch.testing.assert_close(got["loss"], loss, msg="loss != w_ce (CE main+reg) + w_kl (KL main+reg) + w_student CE")


def test_each_weight_scales_only_its_own_terms(handmade):
    """Setting one weight to 0 removes exactly its terms from the loss (the KL-only ablation has no CE)."""
    student, recal, head, s_batch, t = handmade
    with torch.no_grad():
        full = stage_loss(2, student, recal, head, s_batch, t, StageConfig())
        owned = (("w_ce", ("ce_main", "ce_reg")), ("w_kl", ("kl_main", "kl_reg")), ("w_student", ("ce_student",)))
        for w, terms in owned:
            got = stage_loss(2, student, recal, head, s_batch, t, StageConfig(**{w: 0.0}))["loss"]
            torch.testing.assert_close(got, full["loss"] - sum(full[k] for k in terms), msg=f"{w}=0 must drop {terms}")
        no_reg = stage_loss(2, student, recal, head, s_batch, t, StageConfig(reg=False))
    assert set(no_reg) == {"ce_main", "kl_main", "ce_student", "loss"}


# -- 2. stage 2: each term's gradient on its own --------------------------------------------------------
@pytest.fixture(scope="module")
def stage2(tiny_pair, samples):
    teacher, make_student = tiny_pair
    student = make_student(seed=2)
    torch.manual_seed(0)
    recal = Recalibrator(teacher.d, student.text_config)
    set_trainable(2, student.model, recal, teacher.model)
    s_batch = student.collate([student.encode(s) for s in samples[:3]])
    t = teacher_forward(teacher, teacher.collate([teacher.encode(s) for s in samples[:3]]))
    return teacher, student, recal, s_batch, t


# the fused loss (chunk_size set) makes the weighted head terms one loss and keeps their values as a record only:
# there a term is isolated by the weights, and the regularization path as the loss with it minus the loss without it
ISOLATE = {"ce_main": dict(w_kl=0.0, w_student=0.0, reg=False), "kl_main": dict(w_ce=0.0, w_student=0.0, reg=False),
           "ce_student": dict(w_ce=0.0, w_kl=0.0, reg=False), "ce_reg": dict(w_kl=0.0, w_student=0.0),
           "kl_reg": dict(w_ce=0.0, w_student=0.0)}


def _raw_grads(stage2, cfg, term):
    """Backpropagate `term` of a stage-2 loss; the gradients (None where none) of each group and at the features."""
    teacher, student, recal, s_batch, t = stage2
    everything = list(student.model.parameters()) + list(recal.parameters()) + list(teacher.model.parameters())
    for p in everything:
        p.grad = None
    spy = FeatureSpy(student)
    stage_loss(2, spy, recal, teacher.head, s_batch, t, cfg)[term].backward()
    layers = [p for n, p in student.model.named_parameters() if ".layers." in n and "vision" not in n]
    grab = lambda ps: [None if p.grad is None else p.grad.clone() for p in ps]  # noqa: E731
    res = {"llm_layers": grab(layers), "projector": grab(student_groups(student.model)["projector"]),
           "recal": grab(recal.parameters()), "teacher": grab(teacher.model.parameters()),
           "z_grad": None if spy.z.grad is None else spy.z.grad.clone()}
    for p in everything:
        p.grad = None
    return res


def _backward_one_term(stage2, term, chunk_size):
    """Backpropagate one stage-2 term alone; returns the gradient at the student features and who got gradients."""
    if chunk_size is None:
        g = _raw_grads(stage2, StageConfig(), term)
    else:
        g = _raw_grads(stage2, StageConfig(chunk_size=chunk_size, **ISOLATE[term]), "loss")
        if term in ("ce_reg", "kl_reg"):
            g0 = _raw_grads(stage2, StageConfig(chunk_size=chunk_size, **{**ISOLATE[term], "reg": False}), "loss")
            sub = lambda a, b: None if a is None and b is None else (a if b is None else a - b)  # noqa: E731
            g = {k: sub(g[k], g0[k]) if k == "z_grad" else [sub(a, b) for a, b in zip(g[k], g0[k])] for k in g}
    got = lambda ps: [p is not None and bool(p.abs().sum() > 0) for p in ps]  # noqa: E731
    return {"llm_layers": got(g["llm_layers"]), "projector": got(g["projector"]), "recal": got(g["recal"]),
            "teacher": [p is not None for p in g["teacher"]],
            "z_grad": None if g["z_grad"] is None else g["z_grad"].norm(dim=-1)}  # (B, T_s)


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("term", ["ce_main", "kl_main"])
def test_stage2_distillation_terms_reach_the_student_llm_and_its_question_features(stage2, term, chunk_size):
    g = _backward_one_term(stage2, term, chunk_size)
    assert all(g["llm_layers"]), f"{term} must reach every student decoder layer"
    assert all(g["projector"]), f"{term} must reach the student's vision projector (image tokens are in the question)"
    assert all(g["recal"]), f"{term} must reach the Recalibrator"
    assert g["z_grad"] is not None, f"{term} must reach the student's features"
    for b, q in enumerate(stage2[3]["q_lens"].tolist()):
        assert (g["z_grad"][b, :q] > 0).all(), f"{term}: every student question feature gets gradient"
        assert (g["z_grad"][b, q:] == 0).all(), f"{term}: no student answer feature gets gradient"


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_stage2_student_ce_reaches_the_student_at_its_answer_predicting_rows(stage2, chunk_size):
    g = _backward_one_term(stage2, "ce_student", chunk_size)
    assert all(g["llm_layers"]) and all(g["projector"]), "the student's own CE must reach the student"
    assert not any(g["recal"]), "the student's own CE never reaches the Recalibrator"
    s_batch = stage2[3]
    for b, (q, a) in enumerate(zip(s_batch["q_lens"].tolist(), s_batch["a_lens"].tolist())):
        rows = torch.zeros_like(g["z_grad"][b], dtype=torch.bool)
        rows[q - 1: q + a - 1] = True  # Lq-1 .. Lq+La-2 predict the answer tokens
        assert (g["z_grad"][b][rows] > 0).all() and (g["z_grad"][b][~rows] == 0).all()


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("term", ["ce_reg", "kl_reg"])
def test_stage2_regularization_terms_reach_the_recalibrator_and_not_the_student(stage2, term, chunk_size):
    g = _backward_one_term(stage2, term, chunk_size)
    assert all(g["recal"]), f"{term} must reach the Recalibrator"
    assert not any(g["llm_layers"]) and not any(g["projector"]), f"{term} reads the teacher's question only"
    assert g["z_grad"] is None or (g["z_grad"] == 0).all()


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_no_stage2_term_reaches_the_teacher_or_its_head(stage2, chunk_size):
    teacher, _, _, _, t = stage2
    assert not any(x.requires_grad for x in [*t.z_q, *t.z_a, t.z_pred]), "the teacher's features carry no graph"
    for term in TERMS:
        g = _backward_one_term(stage2, term, chunk_size)
        assert not any(g["teacher"]), f"{term} reached the teacher"
        assert teacher.head.weight.grad is None and not teacher.head.weight.requires_grad, f"{term} reached the head"


# -- 5. the answer input the Recalibrator reads ---------------------------------------------------------
def test_teacher_forward_answer_embeddings_are_the_teachers_input_embeddings(tiny_pair, samples):
    teacher, _ = tiny_pair
    encs = [teacher.encode(s) for s in samples[:3]]
    batch = teacher.collate(encs)
    emb = teacher_forward(teacher, batch, answer_input="embeddings")
    feat = teacher_forward(teacher, batch)
    table = teacher.model.get_input_embeddings().weight  # (V_l, d_l)
    for b, e in enumerate(encs):
        a_ids = e.input_ids[e.q_len: e.q_len + e.a_len - 1]  # a_0 .. a_{La-2}
        torch.testing.assert_close(emb.z_a[b], table[a_ids], msg="z_a must be the embedding rows of a_0..a_{La-2}")
        assert not torch.allclose(feat.z_a[b], table[a_ids])
    # only the answer input changes: the targets, labels and question features are the same
    torch.testing.assert_close(emb.z_pred, feat.z_pred)
    assert torch.equal(emb.labels, feat.labels)
    for qe, qf in zip(emb.z_q, feat.z_q):
        torch.testing.assert_close(qe, qf)


# -- 3. train_stage is AdamW on the stage loss, with the LR schedule and accumulation it promises ----------
def _adamw_reference(model, micro_batches, lrs, weight_decay, betas=(0.9, 0.999), eps=1e-8):
    """Stage 3 by hand: per step the micro-batches' answer CEs weighted by their answer tokens (the mean over every
    answer token of the window), then AdamW with decoupled weight decay, on every student parameter but the vision
    encoder's. Returns the loss of each step's first micro-batch."""
    params = [p for n, p in model.named_parameters() if "vision_model" not in n]
    m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    losses, tokens = [], [int(mb["a_lens"].sum()) for mb in micro_batches]
    for k, lr in enumerate(lrs, 1):
        grads = [torch.zeros_like(p) for p in params]
        for i, mb in enumerate(micro_batches):
            loss = _answer_ce_from_logits(model(**_model_inputs(mb)).logits, mb)
            losses += [loss.item()] if i == 0 else []
            for g, d in zip(grads, torch.autograd.grad(loss, params)):
                g += d * tokens[i] / sum(tokens)
        with torch.no_grad():
            for p, g, mk, vk in zip(params, grads, m, v):
                mk.mul_(betas[0]).add_((1 - betas[0]) * g)
                vk.mul_(betas[1]).add_((1 - betas[1]) * g * g)
                p.mul_(1 - lr * weight_decay)
                p -= lr * (mk / (1 - betas[0] ** k)) / ((vk / (1 - betas[1] ** k)).sqrt() + eps)
    return losses


def test_train_stage_equals_a_hand_written_adamw_loop(tiny_pair, samples):
    """3 optimizer steps of stage 3 on two samples. grad_accum=1: one full batch per step. grad_accum=2: batches
    of one sample, so each step weights both samples' CEs by their answer tokens whatever the shuffle order."""
    import copy
    _, make_student = tiny_pair
    cases = [  # grad_accum, batch size, warmup steps, the LR of each step (lr 1e-2 -> lr_end 1e-3 over 3 steps)
        (1, 2, 0, [1e-2, 7e-3, 4e-3]),
        (2, 1, 2, [5e-3, 1e-2, 4e-3]),  # warmup 1/2, 2/2, then the linear decay's value at step 2
    ]
    for accum, batch_size, warmup, lrs in cases:
        student = make_student(seed=5)
        data = PairData([student.encode(s) for s in samples[:2]])
        ref = copy.deepcopy(student.model)
        init = {n: p.detach().clone() for n, p in ref.named_parameters()}
        cfg = StageConfig(steps=3, batch_size=batch_size, grad_accum=accum, lr=1e-2, lr_end=1e-3,
                          warmup_steps=warmup, weight_decay=0.1)
        hist = train_stage(3, student, data, cfg, progress=False)
        micro = [student.collate(data.s)] if accum == 1 else [student.collate([e]) for e in data.s]
        ref_losses = _adamw_reference(ref, micro, lrs, cfg.weight_decay)
        if accum == 1:
            torch.testing.assert_close(torch.tensor([h["loss"] for h in hist]), torch.tensor(ref_losses),
                                       msg="the recorded loss of each step")
        # Adam divides by sqrt(v): float-order noise in tiny gradients shows up at ~1e-3 of the distance travelled
        trained = dict(student.model.named_parameters())
        for n, p in ref.named_parameters():
            off, travel = (trained[n] - p).abs().max(), (p - init[n]).abs().max()
            assert off <= 1e-2 * travel + 1e-7, (f"grad_accum={accum}, warmup={warmup}: {n} is {off:.2e} off "
                                                 f"hand-written AdamW (it moved {travel:.2e})")


def test_grad_accum_steps_once_per_window_even_across_an_epochs_end(tiny_pair, samples, monkeypatch):
    """3 samples, batches of 1, grad_accum=2: the second window straddles the epoch's end. Still exactly one
    optimizer step and one LR step per requested step (lr 1e-3 -> 1e-4 over 4 steps, written out)."""
    _, make_student = tiny_pair
    student = make_student(seed=6)
    data = PairData([student.encode(s) for s in samples[:3]])
    n_steps, real_step = [], torch.optim.AdamW.step

    def counted(self, *args, **kwargs):
        n_steps.append(1)
        return real_step(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.AdamW, "step", counted)
    hist = train_stage(3, student, data, StageConfig(steps=4, batch_size=1, grad_accum=2, lr=1e-3, lr_end=1e-4),
                       progress=False)
    assert len(n_steps) == 4, f"{len(n_steps)} optimizer steps for 4 requested"
    torch.testing.assert_close(torch.tensor([h["lr"] for h in hist]), torch.tensor([7.75e-4, 5.5e-4, 3.25e-4, 1e-4]))
