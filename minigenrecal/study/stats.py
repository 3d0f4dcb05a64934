"""Paired statistics over items and seeds: bootstrap intervals, McNemar, the smallest detectable effect, verdicts.

Inputs are correctness matrices of shape (seeds, items), 1 where a model answered an item right. Two methods are
compared on the SAME items and seeds, so the comparison is paired: what varies is the difference per (seed, item).
"""
from __future__ import annotations

import math

import numpy as np

Z_975, Z_80 = 1.959964, 0.841621  # two-sided 5% test, 80% power


def paired_bootstrap(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean of a - b with a 95% interval from a two-level bootstrap: resample seeds, then items (both with
    replacement). The interval therefore carries seed-to-seed spread AND test-set noise."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)  # (S, N)
    if d.ndim != 2 or d.shape != np.shape(b):
        raise ValueError(f"expected two (seeds, items) matrices of one shape, got {np.shape(a)} and {np.shape(b)}")
    S, N = d.shape
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for k in range(n_boot):
        rows = d[rng.integers(0, S, S)]  # (S, N)
        means[k] = rows[:, rng.integers(0, N, N)].mean()
    lo, hi = np.percentile(means, [2.5, 97.5])
    se = float(means.std(ddof=1))
    return {"diff": float(d.mean()), "ci95": [float(lo), float(hi)], "se": se, "mde": (Z_975 + Z_80) * se,
            "seeds": S, "items": N}


def mcnemar(a: np.ndarray, b: np.ndarray) -> dict:
    """McNemar on paired 0/1 outcomes pooled over seeds: b10 = a right and b wrong, b01 = the reverse;
    z = (b10 - b01) / sqrt(b10 + b01) (normal approximation, no continuity correction), two-sided p."""
    a, b = np.asarray(a).astype(bool).ravel(), np.asarray(b).astype(bool).ravel()
    b10, b01 = int((a & ~b).sum()), int((~a & b).sum())
    z = (b10 - b01) / math.sqrt(b10 + b01) if b10 + b01 else 0.0
    return {"b10": b10, "b01": b01, "z": z, "p": math.erfc(abs(z) / math.sqrt(2))}


def planned_mde(seeds: int, items: int, discordance: float, seed_sd: float) -> float:
    """Smallest true difference detected with 80% power at 5% (two-sided), before running: the variance of a
    paired mean difference is discordance / (seeds * items) (test-set noise) + seed_sd^2 / seeds (seed spread)."""
    return (Z_975 + Z_80) * math.sqrt(discordance / (seeds * items) + seed_sd ** 2 / seeds)


def verdict(ci: list[float], yardstick: float) -> str:
    """'holds' if the 95% interval lies above 0; 'does not hold' if it lies below `yardstick` (the effect the claim
    needs) and the design could have seen that effect; 'inconclusive' otherwise."""
    lo, hi = ci
    if lo > 0:
        return "holds"
    if hi < yardstick:
        return "does not hold" + (" (reversed)" if hi < 0 else "")
    return "inconclusive"
