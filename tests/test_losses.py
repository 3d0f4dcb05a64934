"""The next-token boundary (docs/method.md decision 4) and every loss against a plain reference."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from minigenrecal.losses import answer_rows, head_losses, kl_from_logits, recal_path, split_teacher


class Spy(nn.Module):
    """A stand-in Recalibrator: d_s = d_l, proj_pre = identity, forward = right-padded concatenation."""

    def __init__(self):
        super().__init__()
        self.proj_pre = nn.Identity()
        self.seen = None

    def forward(self, z_q, z_a, a_pos=None):  # a_pos: read only with NPE off
        self.seen = [torch.cat([q, a]) for q, a in zip(z_q, z_a)]
        return nn.utils.rnn.pad_sequence(self.seen, batch_first=True)


def _coded(T, offset=0.0, d=1):
    """Features whose value is the position (plus an offset) so gathered rows can be read off."""
    return (torch.arange(T, dtype=torch.float32) + offset)[:, None].repeat(1, d)


def test_boundary_hand_built():
    # teacher: question q0..q4 (Lq_l = 5) then answer a0..a3 (La = 4); student question has Lq_s = 3
    Lq_l, La, Lq_s = 5, 4, 3
    t_ids = torch.tensor([[10, 11, 12, 13, 14, 20, 21, 22, 23]])
    z_l = _coded(9)[None]  # (1, 9, 1): value = teacher position
    t = split_teacher(z_l, t_ids, torch.tensor([Lq_l]), torch.tensor([La]))
    # teacher targets: logits at positions Lq_l-1 .. Lq_l+La-2 = 4..7, predicting a0..a3
    assert t.z_pred[:, 0].tolist() == [4, 5, 6, 7]
    assert t.labels.tolist() == [20, 21, 22, 23]
    # Recalibrator answer input: teacher features at answer tokens a0..a(La-2) = positions 5, 6, 7
    assert t.z_a[0][:, 0].tolist() == [5, 6, 7]
    assert t.z_q[0][:, 0].tolist() == [0, 1, 2, 3, 4]
    # main path: [z_qs (3), proj_pre(z_a) (3)] -> predictions at Lq_s-1 .. Lq_s+La-2 = 2..5
    z_qs = _coded(Lq_s, offset=100.0)  # student question features valued 100, 101, 102
    spy = Spy()
    out = spy([z_qs], t.z_a)
    assert out[0, :, 0].tolist() == [100, 101, 102, 5, 6, 7]
    h = answer_rows(out, torch.tensor([Lq_s]), torch.tensor([La]))
    # the LAST student-question position (102) predicts a0; answer feature of a_k predicts a_{k+1}
    assert h[:, 0].tolist() == [102, 5, 6, 7]
    # regularization path: teacher question instead -> the row for a0 is the teacher's last question feature
    out_reg = spy(t.z_q, t.z_a)
    h_reg = answer_rows(out_reg, torch.tensor([Lq_l]), torch.tensor([La]))
    assert h_reg[:, 0].tolist() == [4, 5, 6, 7]


def test_recal_path_pairs_rows_labels_and_teacher_logits():
    """With an identity head (d_l = V_l), recal_path must compare row k with label a_k and teacher row k."""
    V = 9
    head = nn.Linear(V, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(V))
    Lq_l, La, Lq_s = 3, 3, 2
    t_ids = torch.tensor([[0, 1, 2, 5, 7, 8]])
    z_l = torch.randn(1, 6, V)
    t = split_teacher(z_l, t_ids, torch.tensor([Lq_l]), torch.tensor([La]))
    z_qs = torch.randn(Lq_s, V)
    spy = Spy()
    ce, kl = recal_path(spy, [z_qs], t, head, tau=1.0)
    rows = torch.cat([z_qs[-1:], z_l[0, 3:5]])  # predicting rows: last student q, a0, a1
    ref_ce = F.cross_entropy(rows, torch.tensor([5, 7, 8]))
    ref_kl = kl_from_logits(rows, z_l[0, 2:5])  # teacher rows Lq_l-1 .. Lq_l+La-2
    torch.testing.assert_close(ce, ref_ce)
    torch.testing.assert_close(kl, ref_kl)


def test_kl_zero_when_logits_match_and_positive_otherwise():
    x = torch.randn(6, 11)
    for tau in (1.0, 2.0):
        assert kl_from_logits(x, x.clone(), tau).abs() < 1e-6
        assert kl_from_logits(x, x + 5.0, tau).abs() < 1e-5  # softmax is shift-invariant
    assert kl_from_logits(torch.randn(6, 11), x) > 0


def test_losses_match_plain_references():
    torch.manual_seed(0)
    N, d, V, tau = 7, 5, 13, 2.0
    head = nn.Linear(d, V)
    h, z_t = torch.randn(N, d, requires_grad=True), torch.randn(N, d)
    labels = torch.randint(0, V, (N,))
    ce, kl = head_losses(h, z_t, labels, head, tau)
    # plain reference, loop over tokens
    ref_ce, ref_kl = 0.0, 0.0
    for i in range(N):
        s = head.weight @ h[i] + head.bias
        t = head.weight @ z_t[i] + head.bias
        ref_ce += -(s[labels[i]] - torch.logsumexp(s, 0))
        p_t = torch.exp(t / tau - torch.logsumexp(t / tau, 0))
        log_p_s = s / tau - torch.logsumexp(s / tau, 0)
        ref_kl += (p_t * (torch.log(p_t) - log_p_s)).sum()
    torch.testing.assert_close(ce, ref_ce / N)
    torch.testing.assert_close(kl, ref_kl / N * tau ** 2)
    # gradients flow to the recalibrated features, never to the teacher head or features
    (ce + kl).backward()
    assert h.grad is not None and h.grad.abs().sum() > 0
    assert math.isfinite(float(ce)) and math.isfinite(float(kl))


def test_student_ce_matches_reference(tiny_pair, samples):
    _, make_student = tiny_pair
    s = make_student()
    encs = [s.encode(x) for x in samples[:3]]
    batch = s.collate(encs)
    with torch.no_grad():
        z = s.body(batch)
        got = s.student_ce(z, batch)
        logits = s.model(**{k: v for k, v in batch.items() if k not in ("q_lens", "a_lens")}).logits
    terms = []
    for b, e in enumerate(encs):
        for j in range(e.a_len):  # position Lq-1+j predicts answer token j
            terms.append(F.cross_entropy(logits[b, e.q_len - 1 + j][None], e.input_ids[e.q_len + j][None]))
    torch.testing.assert_close(got, torch.stack(terms).mean())
