"""Coding exercises for notebooks 02-06 and their checkers.

`check_<name>(fn)` runs a learner's function against the package's own code on random inputs and edge cases
(padding, different lengths, tau != 1, a batch of one) and prints PASS or a hint that names the likely mistake.
Every checker returns a `Result` (name, passed, hint). A wrong answer is diagnosed by matching it against typical
wrong implementations (reverse KL, a missing tau^2, a boundary shifted by one, ...), then by its shape and values.

Switches: MINIGENRECAL_SOLUTIONS=1 checks the reference solutions instead of the stubs (CI runs every check cell
that way); MINIGENRECAL_GRADE_FILE=path appends one JSON line per check (`python -m minigenrecal grade` uses it).
"""
from __future__ import annotations

import ast
import contextlib
import inspect
import json
import math
import os
import sys
import textwrap
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable
from unittest import mock

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import LlamaConfig

from minigenrecal import losses, recalibrator, stages
from minigenrecal.evaluation import metrics
from minigenrecal.models.families import build_tiny_vlm
from minigenrecal.models.tiny import build_student

SOLUTIONS_ENV = "MINIGENRECAL_SOLUTIONS"
RESULTS_ENV = "MINIGENRECAL_GRADE_FILE"


def solutions_enabled() -> bool:
    """True when MINIGENRECAL_SOLUTIONS=1: every check runs the reference solution in place of the stub."""
    return os.environ.get(SOLUTIONS_ENV, "").strip().lower() in ("1", "true", "yes")


@dataclass
class Result:
    """One check: `passed`, and a `hint` naming the likely mistake when it did not pass ('' when it did)."""

    name: str
    passed: bool
    hint: str = ""
    attempted: bool = True

    def as_dict(self) -> dict:
        return {"name": self.name, "passed": self.passed, "hint": self.hint}

    def __str__(self) -> str:
        title = EXERCISES[self.name].title if self.name in EXERCISES else self.name
        if self.passed:
            return f"PASS · {self.name}: {title}"
        return f"{'FAIL' if self.attempted else 'not attempted yet'} · {self.name}: {self.hint}"


@dataclass
class Case:
    label: str  # what a learner reads when this case fails
    make: Callable[[], tuple]  # fresh, deterministic arguments on every call
    group: int = 0  # a wrong answer is diagnosed on the first group where it fails


_RAISED = object()  # a run that raised


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- comparisons: None when equal, else a short description ---------------------------------------------------
def _close(a, b, rtol: float = 1e-4, atol: float = 1e-5) -> str | None:
    if not torch.is_tensor(a) or not torch.is_tensor(b):
        return f"got {type(a).__name__}, expected a tensor"
    if a.shape != b.shape:
        return f"shape {tuple(a.shape)}, expected {tuple(b.shape)}"
    a, b = a.detach().double(), b.detach().double()
    if torch.allclose(a, b, rtol, atol, equal_nan=True):
        return None
    return f"values differ (max |diff| {float((a - b).abs().nan_to_num(float('inf')).max()):.3g})"


def _as_tensor(out) -> torch.Tensor | None:
    try:
        t = torch.as_tensor(out.detach() if torch.is_tensor(out) else out)
    except (TypeError, ValueError, RuntimeError):
        return None
    return t.reshape(()) if t.numel() == 1 and t.dim() > 0 else t


def _value_grad(got: dict, want: dict) -> str | None:
    if got["value"] is None:
        return "not a number or tensor"
    if (d := _close(got["value"], want["value"])) is not None:
        return d
    if want.get("grad") is not None:
        if got.get("grad") is None:
            return "no gradient"
        if (d := _close(got["grad"], want["grad"])) is not None:
            return f"gradient {d}"
    if not got.get("frozen_ok", True):
        return "head changed"
    return None


def _scalar_with_grad(out, wrt: torch.Tensor) -> dict:
    """A scalar output and the gradient it sends to `wrt` (None when it sends none)."""
    grad = None
    if torch.is_tensor(out) and out.requires_grad:
        grad = torch.autograd.grad(out.sum(), wrt, allow_unused=True)[0]
    return {"value": _as_tensor(out), "grad": grad}


# -- the engine --------------------------------------------------------------------------------------------
def _safe(run, fn, case):
    try:
        return run(fn, case.make())
    except Exception:
        return _RAISED


def _diagnose(run, fn, case, cases, mutants, compare, explain, got, want, diff, early=None) -> str:
    if early is not None and (hint := early(case.make(), got, want, diff)):
        return hint
    group = [c for c in cases if c.group == case.group]
    learner = [_safe(run, fn, c) for c in group]
    for hint, mutant in mutants:
        outs = [_safe(run, mutant, c) for c in group]
        if all((a is _RAISED) == (b is _RAISED) and (a is _RAISED or compare(a, b) is None)
               for a, b in zip(learner, outs)):
            return hint
    if explain is not None and (hint := explain(case.make(), got, want, diff)):
        return hint
    return f"does not match the package's reference: {diff}"


def _evaluate(name: str, fn, cases: list[Case], run, reference, mutants, compare, explain=None, early=None) -> Result:
    """Run every case; on the first mismatch, diagnose: `early` hints, then mutants, then `explain`."""
    func = EXERCISES[name].func if name in EXERCISES else "your function"
    if not callable(fn):
        return Result(name, False, f"expected a function, got {type(fn).__name__}")
    for i, case in enumerate(cases):
        try:
            got = run(fn, case.make())
        except NotImplementedError:
            if i == 0:
                return Result(name, False, f"`{func}` still raises NotImplementedError: fill in its stub above",
                              attempted=False)
            return Result(name, False, f"raised NotImplementedError (failing case: {case.label})")
        except Exception as e:  # the learner's own error, reported as a hint
            msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
            return Result(name, False, f"your function raised {type(e).__name__}: {msg} (failing case: {case.label})")
        want = run(reference, case.make())
        if (diff := compare(got, want)) is not None:
            hint = _diagnose(run, fn, case, cases, mutants, compare, explain, got, want, diff, early)
            return Result(name, False, f"{hint} (failing case: {case.label})")
    return Result(name, True, "")


def _finish(result: Result, strict: bool, note: str = "") -> Result:
    print(f"{result}{note}")
    if path := os.environ.get(RESULTS_ENV):
        with open(path, "a") as f:
            f.write(json.dumps(result.as_dict()) + "\n")
    if strict and not result.passed:
        raise AssertionError(str(result))
    return result


def _check(name: str, fn, strict: bool, **spec) -> Result:
    note = ""
    if solutions_enabled() and not strict and not os.environ.get(RESULTS_ENV):  # never while grading
        fn, note = EXERCISES[name].solution, f"  (reference solution: {SOLUTIONS_ENV}=1)"
    with torch.random.fork_rng(devices=[]):  # the cases seed torch; the learner's global RNG state is left alone
        result = _evaluate(name, fn, **spec)
    return _finish(result, strict, note)


# == 02 · NPE positions =========================================================================================
def _npe_reference(q_len: int, a_len: int, teacher_q_len: int) -> torch.Tensor:
    """The position ids the package's Recalibrator really passes to its blocks, captured by a hook."""
    recal = _small_recal()
    seen = []
    hook = recal.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[1].clone()))
    try:
        with torch.no_grad():
            recal([torch.zeros(q_len, recal.d_s)], [torch.zeros(a_len - 1, recal.d_l)])
    finally:
        hook.remove()
    return seen[0]


def _npe_case(q, a, ql):
    return Case(f"Lq={q}, La={a}, teacher Lq_l={ql}", lambda: (q, a, ql))


def check_npe_positions(fn, strict: bool = False) -> Result:
    """fn(q_len, a_len, teacher_q_len) -> the position ids of the Recalibrator's input [z_q, ProjPre(z_a)]."""
    cases = [_npe_case(7, 4, 10), _npe_case(9, 3, 5), _npe_case(4, 6, 4), _npe_case(5, 1, 8), _npe_case(1, 2, 3)]
    run = lambda f, args: _as_tensor(f(*args))
    ar = torch.arange
    mutants = [
        ("kept the teacher's own positions for the answer features (Lq_l, Lq_l+1, ...): NPE numbers the whole "
         "concatenation afresh, 0 .. T-1", lambda q, a, ql: torch.cat([ar(q), ar(ql, ql + a - 1)])),
        ("the answer part restarts at 0: NPE counts on from the question, 0 .. T-1 without a restart",
         lambda q, a, ql: torch.cat([ar(q), ar(a - 1)])),
        ("one position too many: the last answer token a_{La-1} is never an input, so T = Lq + La - 1",
         lambda q, a, ql: ar(q + a)),
        ("the positions start at 1: NPE counts from 0", lambda q, a, ql: ar(1, q + a)),
    ]

    def explain(args, got, want, diff):
        if got is not None and got.dim() == 1 and got.numel() != want.numel():
            return f"expected T = Lq + La - 1 = {want.numel()} positions, got {got.numel()}"
    return _check("npe_positions", fn, strict, cases=cases, run=run, reference=_npe_reference, mutants=mutants,
                  compare=lambda a, b: _close(a, b) if a is not None else "not a tensor", explain=explain)


# == 02 · the boundary rows ======================================================================================
_PAD = 1e6  # right padding is filled with this, so rows taken from it are recognisable
_PADDED = ("padded positions got into the rows, so they would change the loss: take exactly La rows per sample, "
           "never the right padding after them")


def _rows_case(label, q_lens, a_lens, seed, d=3):
    def make():  # like the Recalibrator's output: Lq + La - 1 real rows per sample, then right padding
        T = max(q + a - 1 for q, a in zip(q_lens, a_lens)) + 1
        x = torch.full((len(q_lens), T, d), _PAD)
        g = _gen(seed)
        for b, (q, a) in enumerate(zip(q_lens, a_lens)):
            x[b, : q + a - 1, 0] = b * 100 + torch.arange(q + a - 1)  # channel 0 codes (sample, position)
            x[b, : q + a - 1, 1:] = torch.randn(q + a - 1, d - 1, generator=g)
        return x, torch.tensor(q_lens), torch.tensor(a_lens)
    return Case(label, make)


def check_answer_rows(fn, strict: bool = False) -> Result:
    """fn(x, q_lens, a_lens) -> the rows of x (B, T, d) that predict a_0..a_{La-1}, concatenated: (sum La, d)."""
    cases = [_rows_case("2 samples, same lengths (Lq=4, La=3)", [4, 4], [3, 3], 0),
             _rows_case("2 samples, Lq=5,3 and La=3,4, right-padded", [5, 3], [3, 4], 1),
             _rows_case("batch of 1, Lq=4, La=1", [4], [1], 2),
             _rows_case("3 samples, Lq=2,8,6 and La=5,2,1, right-padded", [2, 8, 6], [5, 2, 1], 3)]
    run = lambda f, args: _as_tensor(f(*args))
    rows = lambda lo, hi, same=False: (lambda x, q_lens, a_lens: torch.cat(
        [x[b, lo(q, a): hi(q, a)] for b, (q, a) in enumerate(zip(
            [q_lens[0].item()] * len(q_lens) if same else q_lens.tolist(),
            [a_lens[0].item()] * len(a_lens) if same else a_lens.tolist()))]))
    shifted = ("prediction rows are shifted by one: the last question position must predict a_0, so take rows "
               "Lq-1 .. Lq+La-2 (logits at position i predict token i+1)")
    mutants = [
        (shifted, rows(lambda q, a: q, lambda q, a: q + a)),
        (shifted, rows(lambda q, a: q - 2, lambda q, a: q + a - 2)),
        ("used the first sample's Lq and La for every sample: each sample has its own lengths",
         rows(lambda q, a: q - 1, lambda q, a: q + a - 1, same=True)),
        (_PADDED, rows(lambda q, a: q - 1, lambda q, a: None)),
        ("one row short per sample: La rows predict a_0 .. a_{La-1} (the last one predicts the end-of-turn token)",
         rows(lambda q, a: q - 1, lambda q, a: q + a - 2)),
    ]

    def explain(args, got, want, diff):
        if got is None:
            return "return a tensor of rows"
        if got.dim() == args[0].dim() and got.shape[0] == args[0].shape[0]:
            return "return the rows concatenated over the batch, shape (sum La, d), not a padded block per sample"
        if (got == _PAD).any():
            return _PADDED
        if got.dim() == 2 and got.shape[-1] == want.shape[-1]:
            return (f"you took the rows coded (100 x sample + position) {got[:, 0].long().tolist()}; the "
                    f"predicting rows are {want[:, 0].long().tolist()}")
    return _check("answer_rows", fn, strict, cases=cases, run=run, reference=losses.answer_rows, mutants=mutants,
                  compare=lambda a, b: _close(a, b) if a is not None else "not a tensor", explain=explain)


# == 02 · one Recalibrator block ================================================================================
def _block_case(label, dims, B, T, pos_fn, seed, group):
    def make():
        torch.manual_seed(seed)
        block = recalibrator.Block(**dims)
        with torch.no_grad():
            for norm in (block.norm1, block.norm2):
                norm.weight.add_(0.3 * torch.randn(norm.weight.shape))
        return block, torch.randn(B, T, dims["d"], generator=_gen(seed)), pos_fn(T)
    return Case(label, make, group)


def _block_variant(block, x, pos, causal=True, rope="pos", kv="interleave", scale=True, prenorm=True,
                   residual=True, swap_gate=False):
    """Block.forward with explicit attention, and switches for the typical mistakes."""
    B, T, _ = x.shape
    h = block.norm1(x) if prenorm else x
    q = block.q(h).view(B, T, block.n_heads, block.head_dim).transpose(1, 2)  # (B, H, T, hd)
    k = block.k(h).view(B, T, block.n_kv, block.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
    v = block.v(h).view(B, T, block.n_kv, block.head_dim).transpose(1, 2)
    p = pos if rope != "arange" else torch.arange(T)
    if rope != "none":
        q = recalibrator.rope(q, p, block.theta)
        k = recalibrator.rope(k, p, block.theta) if rope != "q" else k
    rep = block.n_heads // block.n_kv
    if kv == "interleave":
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    else:
        k, v = k.repeat(1, rep, 1, 1), v.repeat(1, rep, 1, 1)
    s = q @ k.transpose(-1, -2) / (math.sqrt(block.head_dim) if scale else 1.0)  # (B, H, T, T)
    if causal:
        s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    a = block.o((s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1))
    x = x + a if residual else a
    x = x if prenorm else block.norm1(x)
    h = block.norm2(x) if prenorm else x
    gate, up = (block.up, block.gate) if swap_gate else (block.gate, block.up)
    f = block.down(F.silu(gate(h)) * up(h))
    x = x + f if residual else f
    return x if prenorm else block.norm2(x)


def check_block(fn, strict: bool = False) -> Result:
    """fn(block, x, pos) -> one Recalibrator block's output, using the weights of `block` (a recalibrator.Block)."""
    gqa = dict(d=32, n_heads=4, n_kv=2, head_dim=8, ffn=48, eps=1e-6, theta=10000.0, qkv_bias=True)
    mqa = dict(d=24, n_heads=3, n_kv=1, head_dim=8, ffn=40, eps=1e-5, theta=500.0, qkv_bias=False)
    ar = torch.arange
    cases = [_block_case("GQA (4 heads, 2 KV heads), B=2, T=7, pos=0..T-1", gqa, 2, 7, ar, 0, 0),
             _block_case("batch of 1, 3 heads sharing 1 KV head, T=5, pos=0..T-1", mqa, 1, 5, ar, 1, 0),
             _block_case("GQA, B=2, T=6, pos=3, 5, 7, ... (not 0..T-1)", gqa, 2, 6, lambda T: 3 + 2 * ar(T), 2, 1)]

    def run(f, args):
        with torch.no_grad():
            return _as_tensor(f(*args))
    V = _block_variant
    mutants = [
        ("attention is not causal: a position saw later ones, so right padding would change real positions; mask "
         "the scores above the diagonal (or is_causal=True)", lambda b, x, p: V(b, x, p, causal=False)),
        ("no rotary embedding: apply recalibrator.rope to q and k at `pos` before the scores",
         lambda b, x, p: V(b, x, p, rope="none")),
        ("RoPE must rotate both q and k (not q alone)", lambda b, x, p: V(b, x, p, rope="q")),
        ("RoPE used the positions 0..T-1 instead of the `pos` argument (NPE decides the positions)",
         lambda b, x, p: V(b, x, p, rope="arange")),
        ("query heads are paired with the wrong KV heads: with GQA, query head h uses KV head "
         "h // (n_heads // n_kv), i.e. repeat_interleave, not repeat", lambda b, x, p: V(b, x, p, kv="repeat")),
        ("the attention scores are not scaled by 1/sqrt(head_dim)", lambda b, x, p: V(b, x, p, scale=False)),
        ("norm placement: the block is pre-norm, x + attn(norm1(x)), then x + ffn(norm2(x))",
         lambda b, x, p: V(b, x, p, prenorm=False)),
        ("missing the residual connections: x = x + attention(...), then x = x + ffn(...)",
         lambda b, x, p: V(b, x, p, residual=False)),
        ("gate and up are swapped: the FFN is down(silu(gate(h)) * up(h))", lambda b, x, p: V(b, x, p, swap_gate=True)),
    ]

    def explain(args, got, want, diff):
        if got is not None and got.shape == want.shape and torch.isfinite(got).all():
            block, x, pos = args
            x2 = x.clone()
            x2[:, -1] += 1.0  # change the last position only: a causal block's earlier outputs must not move
            with torch.no_grad():
                later = _as_tensor(fn(block, x2, pos))
            if later is not None and not torch.allclose(later[:, :-1], got[:, :-1], atol=1e-5):
                return ("attention is not causal: changing the last position changed earlier outputs; mask the "
                        "scores above the diagonal (or is_causal=True)")
    return _check("block", fn, strict, cases=cases, run=run, reference=lambda b, x, p: b(x, p), mutants=mutants,
                  compare=lambda a, b: _close(a, b) if a is not None else "not a tensor", explain=explain)


# == 03 · forward KL with temperature =========================================================================
def _kl_rows(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, from logits."""
    lp, lq = F.log_softmax(p_logits, -1), F.log_softmax(q_logits, -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def _logits_case(label, n, v, tau, seed, group, scale=1.0):
    def make():
        g = _gen(seed)
        return 2 * scale * torch.randn(n, v, generator=g), 3 * scale * torch.randn(n, v, generator=g), tau
    return Case(label, make, group)


def check_kl(fn, strict: bool = False) -> Result:
    """fn(student_logits, teacher_logits, tau) -> forward KL(p_teacher || p_student) at tau, times tau^2, row mean."""
    cases = [_logits_case("8 rows x 11 classes, tau=1", 8, 11, 1.0, 0, 0),
             _logits_case("one row (batch of 1), tau=1", 1, 7, 1.0, 1, 0),
             _logits_case("5 rows x 9 classes, tau=2", 5, 9, 2.0, 2, 1),
             _logits_case("6 rows x 7 classes, tau=0.5", 6, 7, 0.5, 3, 1),
             _logits_case("large logits (x50), tau=1", 4, 9, 1.0, 4, 2, scale=50.0)]

    def run(f, args):
        s, t, tau = args
        s = s.clone().requires_grad_(True)
        return _scalar_with_grad(f(s, t, tau), s)
    mutants = [
        ("this is KL(p_s || p_t), the reverse direction: GenRecal's KL is forward, KL(p_t || p_s) = "
         "sum p_t (log p_t - log p_s)", lambda s, t, tau: _kl_rows(s / tau, t / tau).mean() * tau ** 2),
        ("this is the cross-entropy H(p_t, p_s), not the KL: subtract the teacher's entropy, "
         "KL = sum p_t (log p_t - log p_s)",
         lambda s, t, tau: -(F.softmax(t / tau, -1) * F.log_softmax(s / tau, -1)).sum(-1).mean() * tau ** 2),
        ("missing the tau^2 factor: multiply the KL by tau**2 (softened targets scale its gradients by 1/tau^2)",
         lambda s, t, tau: _kl_rows(t / tau, s / tau).mean()),
        ("scaled by tau, not by tau^2", lambda s, t, tau: _kl_rows(t / tau, s / tau).mean() * tau),
        ("the logits are not divided by tau: soften both distributions with logits / tau before the softmax",
         lambda s, t, tau: _kl_rows(t, s).mean() * tau ** 2),
        ("only the teacher's logits are divided by tau: divide both",
         lambda s, t, tau: _kl_rows(t / tau, s).mean() * tau ** 2),
        ("only the student's logits are divided by tau: divide both",
         lambda s, t, tau: _kl_rows(t, s / tau).mean() * tau ** 2),
        ("summed over rows: average over the answer positions (rows) instead",
         lambda s, t, tau: _kl_rows(t / tau, s / tau).sum() * tau ** 2),
        ("averaged over every vocabulary entry too (F.kl_div's reduction='mean' divides by rows x V): average "
         "over rows only (reduction='batchmean')",
         lambda s, t, tau: _kl_rows(t / tau, s / tau).sum() / s.numel() * tau ** 2),
    ]

    def explain(args, got, want, diff):
        if diff == "no gradient":
            return ("no gradient reaches the student's logits: don't detach them or compute the loss under "
                    "torch.no_grad()")
        if got["value"] is not None and not torch.isfinite(got["value"]).all():
            return "nan or inf on large logits: use F.log_softmax, not softmax(...).log()"
        if got["value"] is not None and got["value"].dim() == 1:
            return "returned one value per row: average over rows to a scalar"
    return _check("kl", fn, strict, cases=cases, run=run, reference=losses.kl_from_logits, mutants=mutants,
                  compare=_value_grad, explain=explain)


# == 03 · CE through the frozen head ============================================================================
def _head_case(label, n, d_l, v, bias, seed):
    def make():
        torch.manual_seed(seed)
        head = nn.Linear(d_l, v, bias=bias).requires_grad_(False)
        g = _gen(seed)
        return torch.randn(n, d_l, generator=g), torch.randint(0, v, (n,), generator=g), head
    return Case(label, make)


def check_head_ce(fn, strict: bool = False) -> Result:
    """fn(h, labels, head) -> CE of the frozen teacher head reading h (N, d_l), against labels (N,)."""
    cases = [_head_case("6 rows, d_l=16, V_l=23", 6, 16, 23, False, 0),
             _head_case("one row (batch of 1), d_l=8, V_l=11", 1, 8, 11, False, 1),
             _head_case("5 rows, d_l=12, V_l=17, head with a bias", 5, 12, 17, True, 2)]

    def run(f, args):
        h, labels, head = args
        before = [p.detach().clone() for p in head.parameters()]
        h = h.clone().requires_grad_(True)
        out = _scalar_with_grad(f(h, labels, head), h)
        out["frozen_ok"] = all(not p.requires_grad and torch.equal(p, b) for p, b in zip(head.parameters(), before))
        return out
    mutants = [
        ("F.cross_entropy takes raw logits (it applies log_softmax itself); you passed probabilities",
         lambda h, y, head: F.cross_entropy(head(h).softmax(-1), y)),
        ("F.nll_loss expects log-probabilities: use F.cross_entropy on the logits",
         lambda h, y, head: F.nll_loss(head(h), y)),
        ("summed over rows: average over the answer tokens instead",
         lambda h, y, head: F.cross_entropy(head(h), y, reduction="sum")),
        ("shifted by one: row i of h already predicts labels[i] (the boundary was applied before the head); "
         "don't shift again", lambda h, y, head: F.cross_entropy(head(h)[:-1], y[1:])),
    ]

    def explain(args, got, want, diff):
        if diff == "no gradient":
            return ("no gradient reaches h: only the head is frozen; the features it reads must carry gradients back "
                    "to the Recalibrator (don't detach h or use torch.no_grad())")
        if diff == "head changed":
            return "the teacher's head must stay frozen: your function changed its weights or turned its gradients on"
    return _check("head_ce", fn, strict, cases=cases, run=run,
                  reference=lambda h, y, head: losses.head_losses(h, h.detach(), y, head)[0], mutants=mutants,
                  compare=_value_grad, explain=explain)


# == 04 · the regularization path's input =========================================================================
@lru_cache(maxsize=None)
def _student_text_config(d_s: int = 8):
    return LlamaConfig(hidden_size=d_s, intermediate_size=2 * d_s, num_attention_heads=2, num_key_value_heads=1)


def _small_recal(d_l: int = 12, seed: int = 0) -> recalibrator.Recalibrator:
    torch.manual_seed(seed)
    return recalibrator.Recalibrator(d_l, _student_text_config(), depth=1)


def _reg_case(label, lq_s, lq_l, a_lens, seed):
    def make():
        recal, g = _small_recal(seed=seed), _gen(seed)
        B, d_s, d_l = len(a_lens), recal.d_s, recal.d_l
        z_s = torch.randn(B, max(lq_s) + max(a_lens), d_s, generator=g)
        z_l = torch.randn(B, max(q + a for q, a in zip(lq_l, a_lens)), d_l, generator=g)
        ids = torch.randint(0, 50, z_l.shape[:2], generator=g)
        t = losses.split_teacher(z_l, ids, torch.tensor(lq_l), torch.tensor(a_lens))
        return recal, [z_s[b, :q] for b, q in enumerate(lq_s)], t
    return Case(label, make)


def _reg_reference(recal, z_qs, t):
    """The regularization path's input exactly as stages.GenRecal.forward builds it, captured from its call."""
    seen = []
    def spy(recal_, z_q, t_, head, tau, chunk_size=None):
        seen.append(z_q)
        return torch.zeros(()), torch.zeros(())
    B = len(z_qs)
    z_s = nn.utils.rnn.pad_sequence(list(z_qs), batch_first=True)  # (B, Lq_s max, d_s)
    view = type("StudentView", (), {"model": nn.Identity(), "body": lambda self, batch: z_s})()
    cfg = stages.StageConfig(reg=True)
    no_head = lambda h, z_t, labels, head, tau: (torch.zeros(()), torch.zeros(()))  # noqa: E731 (the main path's loss)
    with mock.patch.object(stages, "recal_path", spy), mock.patch.object(stages, "head_losses", no_head):
        stages.GenRecal(view, recal, None)(1, {"q_lens": torch.tensor([len(q) for q in z_qs])}, t, cfg)
    assert len(seen) == 1 and len(seen[0]) == B  # the regularization path's input (the main path reads main_rows)
    return seen[0]


def check_reg_input(fn, strict: bool = False) -> Result:
    """fn(recal, z_qs, t) -> the regularization path's question input: one (Lq_l, d_s) tensor per sample."""
    cases = [_reg_case("2 samples, Lq_s=5,3, Lq_l=7,4, La=3,2", [5, 3], [7, 4], [3, 2], 0),
             _reg_case("batch of 1, Lq_s=6, Lq_l=4, La=2", [6], [4], [2], 1)]

    def run(f, args):
        recal = args[0]
        out = f(*args)
        if torch.is_tensor(out) or not isinstance(out, (list, tuple)):
            return {"values": out, "grad": None}
        total = sum(o.sum() for o in out if torch.is_tensor(o))
        grad = None
        if torch.is_tensor(total) and total.requires_grad:
            grad = torch.autograd.grad(total, recal.proj_pre.weight, allow_unused=True)[0]
        return {"values": [o.detach() if torch.is_tensor(o) else o for o in out], "grad": grad}

    def compare(got, want):
        if not isinstance(got["values"], list):
            return "not a list"
        if len(got["values"]) != len(want["values"]):
            return f"{len(got['values'])} tensors for {len(want['values'])} samples"
        for a, b in zip(got["values"], want["values"]):
            if (d := _close(a, b)) is not None:
                return d
        if want["grad"] is None or got["grad"] is None:
            return None if want["grad"] is got["grad"] else "no gradient"
        return _close(got["grad"], want["grad"])
    mutants = [
        ("this is the main path's input (the student's question): the regularization path uses the teacher's "
         "question t.z_q, brought down by recal.proj_pre", lambda recal, z_qs, t: list(z_qs)),
        ("missing proj_pre: the teacher's question features are d_l wide; the blocks expect d_s, so apply "
         "recal.proj_pre", lambda recal, z_qs, t: list(t.z_q)),
        ("included the teacher's answer: the Recalibrator appends ProjPre(z_a) itself; pass the question part only",
         lambda recal, z_qs, t: [recal.proj_pre(torch.cat([q, a])) for q, a in zip(t.z_q, t.z_a)]),
        ("t.z_pred are the rows whose logits are the teacher's targets, not its question: use t.z_q",
         lambda recal, z_qs, t: [recal.proj_pre(r) for r in t.z_pred.split(t.a_lens.tolist())]),
    ]

    def explain(args, got, want, diff):
        if diff == "not a list":
            return "return a list with one (Lq_l, d_s) tensor per sample, not a padded batch"
        if diff == "no gradient":
            return ("no gradient reaches proj_pre: the regularization path trains the Recalibrator, proj_pre "
                    "included (don't detach or use torch.no_grad())")
    return _check("reg_input", fn, strict, cases=cases, run=run, reference=_reg_reference,
                  mutants=mutants, compare=compare, explain=explain)


# == 05 · each stage's trainable set ============================================================================
GROUPS = ("teacher", "student vision encoder", "Recalibrator", "student LLM", "student vision projector")


@contextlib.contextmanager
def _quiet_fds():
    """Silence file descriptors 1 and 2 (the tokenizer trainer's progress output comes from native code)."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(os.devnull, "w") as null:
        try:
            for fd in (1, 2):
                os.dup2(null.fileno(), fd)
            yield
        finally:
            for fd, s in zip((1, 2), saved):
                os.dup2(s, fd)
                os.close(s)


@lru_cache(maxsize=None)
def _trainable_modules(family: str):
    """(student, Recalibrator, teacher): tiny random-init models, built once."""
    with _quiet_fds():
        student = build_student(0)[0] if family == "idefics3" else build_tiny_vlm(family, d=32, layers=1)[0]
        teacher = build_tiny_vlm("llava", d=32, layers=1)[0]
    torch.manual_seed(0)
    recal = recalibrator.Recalibrator(32, student.config.get_text_config(), depth=1)
    return student, recal, teacher


def _state(params) -> str:
    flags = [p.requires_grad for p in params]
    return "trainable" if all(flags) else ("frozen" if not any(flags) else "partly trainable")


def _group_states(student, recal, teacher) -> dict[str, str]:
    g = stages.student_groups(student)
    return {"teacher": _state(teacher.parameters()), "student vision encoder": _state(g["vision"]),
            "Recalibrator": _state(recal.parameters()), "student LLM": _state(g["llm"]),
            "student vision projector": _state(g["projector"])}


def _trainable_case(family, label):
    return Case(label, lambda: _trainable_modules(family), group=0 if family == "idefics3" else 1)


def _trainable_run(f, modules) -> list[dict]:
    """Every parameter starts trainable (a freshly built model); then stages 1, 2, 3 in a row, as in a run."""
    student, recal, teacher = modules
    for m in modules:
        m.requires_grad_(True)
    out = []
    for stage in (1, 2, 3):
        before = _group_states(student, recal, teacher)
        f(stage, student, recal, teacher)
        out.append({"stage": stage, "before": before, "after": _group_states(student, recal, teacher)})
    return out


def _trainable_hint(stage: int, group: str, got: str, want: str, before: str) -> str:
    if got == "partly trainable":
        hint = (f"stage {stage}: only part of the {group} is trainable; split the student by name with "
                "stages.student_groups(student) (the names differ between VLM families)")
    elif group == "teacher":
        hint = "the teacher (body and head) must stay frozen in every stage"
    elif group == "student vision encoder":
        hint = ("the student's vision encoder stays frozen in every stage (the paper's rule; only the random-init "
                "tiny preset trains it, through train_vision)")
    elif stage == 1 and want == "frozen":
        hint = "stage 1 trains the Recalibrator only: the student stays frozen"
    elif group == "Recalibrator" and want == "frozen":
        hint = "stage 3 removes the Recalibrator: it must be frozen (only the student trains)"
    elif group == "Recalibrator":
        hint = f"stage {stage} trains the whole Recalibrator"
    elif group == "student LLM":
        hint = f"stage {stage} trains the student's LLM"
    else:
        hint = f"stage {stage} trains the student's vision projector as well as its LLM"
    if want == "frozen" and got != "frozen" and before != "frozen" and (stage == 1 or group == "teacher"):
        hint += " (it was still trainable from before: freeze every module first, then unfreeze what the stage trains)"
    return hint


def _trainable_compare(got, want) -> str | None:
    for g, w in zip(got, want):
        for group in GROUPS:
            if g["after"][group] != w["after"][group]:
                return f"stage {g['stage']}: {group} is {g['after'][group]}, expected {w['after'][group]}"
    return None


def check_trainable(fn, strict: bool = False) -> Result:
    """fn(stage, student, recal, teacher) sets requires_grad for `stage`; checked after stages 1, 2, 3 in a row."""
    cases = [_trainable_case("idefics3", "the tiny pair (Idefics3 student, LLaVA teacher), stages 1, 2, 3"),
             _trainable_case("qwen2vl", "a Qwen2-VL-family student (other parameter names), stages 1, 2, 3")]

    def explain(args, got, want, diff):
        for g, w in zip(got, want):
            for group in GROUPS:
                if g["after"][group] != w["after"][group]:
                    hint = _trainable_hint(g["stage"], group, g["after"][group], w["after"][group], g["before"][group])
                    if args[0] is not _trainable_modules("idefics3")[0]:  # the tiny pair passed; this family did not
                        hint += ("; it was right on the tiny pair, so check how you split the student: the parameter "
                                 "names differ between VLM families, and stages.student_groups(student) knows them")
                    return hint
    return _check("trainable", fn, strict, cases=cases, run=_trainable_run,
                  reference=lambda stage, s, r, t: stages.set_trainable(stage, s, r, t), mutants=[],
                  compare=_trainable_compare, explain=explain)


# == 06 · Jensen-Shannon divergence ==============================================================================
def _dist_case(label, p, q, group):
    return Case(label, lambda: (torch.tensor(p, dtype=torch.float64), torch.tensor(q, dtype=torch.float64)), group)


def _kl_probs(p, q):
    return (p * (p.log() - q.log())).sum()


def check_jsd(fn, strict: bool = False) -> Result:
    """fn(p, q) -> the Jensen-Shannon divergence in nats between two probability vectors."""
    cases = [_dist_case("p=(0.5, 0.3, 0.2), q=(0.2, 0.2, 0.6)", [0.5, 0.3, 0.2], [0.2, 0.2, 0.6], 0),
             _dist_case("5 candidates, q peaked", [0.1, 0.2, 0.3, 0.25, 0.15], [0.01, 0.02, 0.9, 0.03, 0.04], 0),
             _dist_case("identical distributions (JSD = 0)", [0.25, 0.25, 0.5], [0.25, 0.25, 0.5], 0),
             _dist_case("zeros in p and in q", [0.0, 0.5, 0.5, 0.0], [0.4, 0.0, 0.3, 0.3], 1),
             _dist_case("disjoint supports (JSD = ln 2)", [1.0, 0.0], [0.0, 1.0], 1)]
    def run(f, args):
        out = _as_tensor(f(*args))
        return out.double() if out is not None else None
    m = lambda p, q: (p + q) / 2
    mutants = [
        ("this is KL(p || q): JSD compares p and q each with their mixture m = (p + q) / 2, and is symmetric",
         lambda p, q: _kl_probs(p, q)),
        ("that is the symmetrised KL, not JSD: compare p and q each with their mixture m = (p + q) / 2",
         lambda p, q: 0.5 * (_kl_probs(p, q) + _kl_probs(q, p))),
        ("only KL(p || m): JSD = 0.5 KL(p || m) + 0.5 KL(q || m)", lambda p, q: 0.5 * _kl_probs(p, m(p, q))),
        ("missing the 0.5 weights: JSD = 0.5 KL(p || m) + 0.5 KL(q || m)",
         lambda p, q: _kl_probs(p, m(p, q)) + _kl_probs(q, m(p, q))),
        ("in bits (log base 2): the kit reports nats (natural log)", lambda p, q: metrics.jsd(p, q) / math.log(2)),
    ]

    def early(args, got, want, diff):
        if got is not None and not torch.isfinite(got).all():
            return "nan where a probability is 0: a term 0 * log 0 counts as 0 (torch.xlogy(p, p) does that)"
    return _check("jsd", fn, strict, cases=cases, run=run, reference=lambda p, q: torch.tensor(metrics.jsd(p, q)),
                  mutants=mutants, compare=lambda a, b: _close(a, b, atol=1e-7) if a is not None else "not a number",
                  early=early)


# == reference solutions (what a learner would write; the stubs' bodies in an instructor notebook) ===============
def _solve_npe_positions(q_len, a_len, teacher_q_len):
    return torch.arange(q_len + a_len - 1)  # one count over [z_q (q_len), ProjPre(z_a) (a_len - 1)]


def _solve_answer_rows(x, q_lens, a_lens):
    rows = [x[b, q - 1: q + a - 1] for b, (q, a) in enumerate(zip(q_lens.tolist(), a_lens.tolist()))]
    return torch.cat(rows)  # (sum La, d)


def _solve_block(block, x, pos):
    B, T, _ = x.shape
    h = block.norm1(x)
    q = block.q(h).view(B, T, block.n_heads, block.head_dim).transpose(1, 2)  # (B, H, T, hd)
    k = block.k(h).view(B, T, block.n_kv, block.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
    v = block.v(h).view(B, T, block.n_kv, block.head_dim).transpose(1, 2)
    q, k = recalibrator.rope(q, pos, block.theta), recalibrator.rope(k, pos, block.theta)
    k = k.repeat_interleave(block.n_heads // block.n_kv, dim=1)  # query head i uses KV head i // rep
    v = v.repeat_interleave(block.n_heads // block.n_kv, dim=1)
    scores = q @ k.transpose(-1, -2) / block.head_dim ** 0.5  # (B, H, T, T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    attn = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v  # (B, H, T, hd)
    x = x + block.o(attn.transpose(1, 2).reshape(B, T, -1))
    h = block.norm2(x)
    return x + block.down(F.silu(block.gate(h)) * block.up(h))


def _solve_kl(student_logits, teacher_logits, tau):
    log_p_t = F.log_softmax(teacher_logits / tau, dim=-1)
    log_p_s = F.log_softmax(student_logits / tau, dim=-1)
    per_row = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)  # KL(p_t || p_s) for each row
    return per_row.mean() * tau ** 2


def _solve_head_ce(h, labels, head):
    return F.cross_entropy(head(h), labels)  # the head is frozen; gradients still flow into h


def _solve_reg_input(recal, z_qs, t):
    return [recal.proj_pre(z_q) for z_q in t.z_q]  # the teacher's question, (Lq_l, d_l) -> (Lq_l, d_s)


def _solve_trainable(stage, student, recal, teacher):
    for module in (student, recal, teacher):
        module.requires_grad_(False)
    groups = stages.student_groups(student)
    if stage in (1, 2):
        recal.requires_grad_(True)
    if stage in (2, 3):
        for p in groups["llm"] + groups["projector"]:
            p.requires_grad_(True)


def _solve_jsd(p, q):
    m = (p + q) / 2
    kl_pm = (torch.xlogy(p, p) - torch.xlogy(p, m)).sum()  # xlogy: 0 * log 0 = 0
    kl_qm = (torch.xlogy(q, q) - torch.xlogy(q, m)).sum()
    return float(0.5 * kl_pm + 0.5 * kl_qm)


# == the registry: one row per exercise ===========================================================================
@dataclass(frozen=True)
class Exercise:
    name: str  # the nbgrader grade_id and the JSON name
    notebook: str
    title: str
    func: str  # the learner's function
    doc: str  # its one-line docstring: inputs -> output
    task: str  # the one-line task its stub raises
    checks: str  # what the checker tries (docs/teaching.md)
    check: Callable[..., Result]
    solution: Callable
    points: int = 1

    @property
    def params(self) -> str:
        return ", ".join(inspect.signature(self.solution).parameters)

    def stub(self) -> str:
        """The learner's stub cell."""
        return (f"def {self.func}({self.params}):\n    \"\"\"{self.doc}\"\"\"\n    # YOUR CODE HERE\n"
                f"    raise NotImplementedError({self.task!r})")

    def check_source(self, strict: bool = False) -> str:
        """The check cell (strict: an nbgrader test cell, which must raise when the check fails)."""
        return f"exercises.check_{self.name}({self.func}{', strict=True' if strict else ''});"

    def solution_body(self) -> str:
        """The reference solution's body, dedented (what goes between the solution markers)."""
        src = textwrap.dedent(inspect.getsource(self.solution))
        body = ast.parse(src).body[0].body
        lines = src.splitlines()
        return textwrap.dedent("\n".join(lines[body[0].lineno - 1: body[-1].end_lineno]))


_EX = [
    Exercise("npe_positions", "02_embedding_alignment", "NPE positions", "my_npe_positions",
             "Position ids of the Recalibrator's input [z_q (q_len rows), ProjPre(z_a) (a_len - 1 rows)].",
             "return the new position ids (NPE) of the concatenated input, a 1-D integer tensor",
             "question and answer lengths of several sizes, a teacher question shorter and longer than the student's, "
             "a single answer token; the reference is the `pos` the package's Recalibrator passes to its blocks",
             check_npe_positions, _solve_npe_positions),
    Exercise("answer_rows", "02_embedding_alignment", "the boundary rows", "my_answer_rows",
             "Rows of x (B, T, d) that predict a_0 .. a_{La-1}, concatenated over the batch: (sum La, d).",
             "return the predicting rows of every sample (the last question position predicts a_0)",
             "right-padded batches with different Lq and La, a batch of 1, a single answer token; padding holds a "
             "sentinel; the reference is losses.answer_rows",
             check_answer_rows, _solve_answer_rows),
    Exercise("block", "02_embedding_alignment", "one Recalibrator block", "my_block",
             "One Recalibrator block's forward, written out with the weights of `block` (a recalibrator.Block).",
             "compute RMSNorm -> causal GQA attention with RoPE at pos -> residual -> RMSNorm -> gated-SiLU FFN "
             "-> residual",
             "GQA (4 heads, 2 KV heads) with q/k/v biases, 3 heads sharing one KV head, a batch of 1, positions that "
             "are not 0..T-1, norms with non-unit weights; the reference is recalibrator.Block with the same weights",
             check_block, _solve_block),
    Exercise("kl", "03_stage1_losses", "forward KL with temperature", "my_kl",
             "Forward KL(p_teacher || p_student) at temperature tau, times tau**2, averaged over rows: a scalar.",
             "return the forward KL of the (N, V_l) logits at temperature tau, scaled by tau**2, mean over rows",
             "tau = 1, 2 and 0.5, a batch of 1 row, logits of magnitude ~100, and the gradient reaching the "
             "student's logits; the reference is losses.kl_from_logits",
             check_kl, _solve_kl),
    Exercise("head_ce", "03_stage1_losses", "CE through the frozen head", "my_head_ce",
             "Cross-entropy of the frozen teacher head reading h (N, d_l), against labels (N,): a scalar.",
             "return the CE of head(h) against labels, averaged over rows, with gradients flowing into h",
             "heads with and without a bias, a batch of 1, the gradient reaching h, and the head left unchanged and "
             "frozen; the reference is the CE of losses.head_losses",
             check_head_ce, _solve_head_ce),
    Exercise("reg_input", "04_stage2", "the regularization path's input", "my_reg_input",
             "The regularization path's question input: one (Lq_l, d_s) tensor per sample.",
             "return the teacher's question features brought down to d_s, one tensor per sample",
             "two samples whose student and teacher questions differ in length, a batch of 1, and the gradient "
             "reaching proj_pre; the reference is captured from stages.GenRecal.forward",
             check_reg_input, _solve_reg_input),
    Exercise("trainable", "05_scaled_down_run", "each stage's trainable set", "my_set_trainable",
             "Set requires_grad for `stage` (1, 2 or 3) on the student, the Recalibrator and the teacher.",
             "freeze everything, then unfreeze exactly what this stage trains",
             "stages 1, 2, 3 in a row starting from an all-trainable model, on the tiny pair and on a Qwen2-VL-family "
             "student (other parameter names); per group: teacher, vision encoder, Recalibrator, LLM, projector; "
             "the reference is stages.set_trainable",
             check_trainable, _solve_trainable),
    Exercise("jsd", "06_evaluation_and_ablations", "Jensen-Shannon divergence", "my_jsd",
             "Jensen-Shannon divergence in nats between two probability vectors p and q: a float.",
             "return 0.5 KL(p || m) + 0.5 KL(q || m) with m = (p + q) / 2, in nats",
             "random distributions, identical ones (0), zeros in p and in q, disjoint supports (ln 2); the "
             "reference is metrics.jsd",
             check_jsd, _solve_jsd),
]
EXERCISES: dict[str, Exercise] = {e.name: e for e in _EX}


def for_notebook(stem: str) -> list[Exercise]:
    """The exercises of one notebook (its file name without .ipynb), in order."""
    return [e for e in _EX if e.notebook == stem]
