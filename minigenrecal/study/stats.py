"""Paired statistics over seeds x items: a crossed random-effects interval, its test, the MDE, verdicts.

Inputs are correctness matrices of shape (seeds, items), 1 where a model answered an item right. Two methods are
compared on the SAME items and seeds, so the comparison is paired: what is analysed is d = a - b per (seed, item),
a value in {-1, 0, 1}. Its mean estimates the expected gap over training seeds AND test items, both drawn at random:

    d[s, i] = mu + alpha_s + beta_i + e[s, i]      seed effect, item effect, seed x item residual (all mean 0)

The layout is balanced (every seed scores every item), so the two-way ANOVA mean squares give an unbiased variance
of the mean, Var(mean d) = sigma_seed^2 / S + sigma_item^2 / N + sigma_res^2 / (S N), and Satterthwaite's degrees
of freedom turn it into a t interval. With few seeds and a real seed spread the degrees of freedom fall towards S - 1
and the interval widens as it must; with no seed spread they grow towards the item count. Resampling seeds and
items independently (a two-level bootstrap) would put the residual into both levels and count it about three times;
a pooled McNemar would treat the S x N pairs as independent. Neither is used; `tests/test_stats.py` checks the
coverage of this interval by simulation.
"""
from __future__ import annotations

import math

import numpy as np

ALPHA, POWER = 0.05, 0.80  # two-sided 5% tests, 80% power for the smallest detectable effect


# -- the t distribution (no SciPy in the dependencies) -------------------------------------------------------------
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((qam + 2 * m) * (a + 2 * m)),
                    -(a + m) * (qab + m) * x / ((a + 2 * m) * (qap + 2 * m))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with `df` (real, > 0) degrees of freedom."""
    if math.isinf(df):
        return 0.5 * math.erfc(t / math.sqrt(2))
    tail = 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1.0 - tail


def t_pdf(t: float, df: float) -> float:
    """Density of Student's t with `df` degrees of freedom."""
    if math.isinf(df):
        return math.exp(-t * t / 2) / math.sqrt(2 * math.pi)
    return math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
                    - (df + 1) / 2 * math.log1p(t * t / df))


def t_ppf(q: float, df: float) -> float:
    """The q-quantile of Student's t: Newton steps on `t_sf` inside a bisection bracket (1e-12 absolute)."""
    if not 0 < q < 1:
        raise ValueError(f"quantile level must lie in (0, 1), got {q}")
    if q < 0.5:
        return -t_ppf(1 - q, df)
    lo, hi = 0.0, 1.0
    while t_sf(hi, df) > 1 - q:
        lo, hi = hi, 2 * hi
    t = (lo + hi) / 2
    for _ in range(200):
        f = (1 - q) - t_sf(t, df)  # increasing in t
        lo, hi = (t, hi) if f < 0 else (lo, t)
        step = f / t_pdf(t, df)
        t_new = t - step
        t_new = t_new if lo < t_new < hi else (lo + hi) / 2
        if abs(t_new - t) < 1e-12:
            return t_new
        t = t_new
    return t


# -- the crossed interval ------------------------------------------------------------------------------------------
def _check(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"expected two (seeds, items) matrices of one shape, got {a.shape} and {b.shape}")
    if a.shape[0] < 2 or a.shape[1] < 2:
        raise ValueError(f"a crossed interval needs at least 2 seeds and 2 items, got {a.shape[0]} x {a.shape[1]}")
    return a - b  # (S, N)


def components(d: np.ndarray) -> dict:
    """Two-way ANOVA of a (seeds, items) difference matrix: mean squares, variance components (negative estimates
    set to 0), the variance of the mean and its Satterthwaite degrees of freedom."""
    S, N = d.shape
    m, ms, mi = d.mean(), d.mean(1), d.mean(0)  # grand, per seed (S,), per item (N,)
    df_s, df_i, df_r = S - 1, N - 1, (S - 1) * (N - 1)
    msq_s = N * ((ms - m) ** 2).sum() / df_s
    msq_i = S * ((mi - m) ** 2).sum() / df_i
    msq_r = ((d - ms[:, None] - mi[None, :] + m) ** 2).sum() / df_r
    v_seed, v_item = max(0.0, (msq_s - msq_r) / N), max(0.0, (msq_i - msq_r) / S)
    # Var(mean) = v_seed / S + v_item / N + msq_r / (S N) = sum_k c_k MS_k / (S N); Satterthwaite's df from the c_k
    keep_s, keep_i = float(v_seed > 0), float(v_item > 0)
    parts = [((1 - keep_s - keep_i) * msq_r, df_r), (keep_s * msq_s, df_s), (keep_i * msq_i, df_i)]
    var = sum(x for x, _ in parts) / (S * N)
    den = sum(x * x / f for x, f in parts)
    df = (var * S * N) ** 2 / den if den > 0 else math.inf
    return {"ms_seed": float(msq_s), "ms_item": float(msq_i), "ms_residual": float(msq_r),
            "sd_seed": math.sqrt(v_seed), "sd_item": math.sqrt(v_item), "sd_residual": math.sqrt(msq_r),
            "se": math.sqrt(max(var, 0.0)), "df": float(df)}


def crossed_interval(a: np.ndarray, b: np.ndarray, level: float = 0.95) -> dict:
    """Mean of a - b with a `level` t interval from the crossed seed x item model; also the test of 'no gap'
    (t and two-sided p), the 90% interval (for equivalence) and the smallest gap this design detects (MDE)."""
    d = _check(a, b)
    c = components(d)
    diff, se, df = float(d.mean()), c["se"], c["df"]
    q = t_ppf(0.5 + level / 2, df)
    q90 = t_ppf(0.95, df)
    t = diff / se if se > 0 else (0.0 if diff == 0 else math.copysign(math.inf, diff))
    return {"diff": diff, f"ci{round(100 * level)}": [diff - q * se, diff + q * se],
            "ci90": [diff - q90 * se, diff + q90 * se], "se": se, "df": df, "t": t,
            "p": 2 * t_sf(abs(t), df) if math.isfinite(t) else 0.0,
            "mde": mde(se, df), "seeds": d.shape[0], "items": d.shape[1],
            "per_seed": [float(x) for x in d.mean(1)],
            **{k: c[k] for k in ("sd_seed", "sd_item", "sd_residual")}}


def ratio_interval(num: np.ndarray, den: np.ndarray, level: float = 0.95, bound: float = 10.0) -> dict:
    """mean(num) / mean(den) for two (seeds, items) difference matrices on the same seeds and items (e.g. what
    GenRecal gains over SFT, over what logit KD gains over its control), with Fieller's interval under the crossed
    model: every R for which num - R * den has a mean that the crossed t test does not reject at 1 - level.
    An end that does not close within +-`bound` is None (the denominator's interval reaches 0)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    if num.shape != den.shape:
        raise ValueError(f"numerator and denominator differ in shape: {num.shape} vs {den.shape}")
    r_hat = float(num.mean() / den.mean())

    def inside(r: float) -> bool:
        c = crossed_interval(num - r * den, np.zeros_like(num), level)
        return c[f"ci{round(100 * level)}"][0] <= 0 <= c[f"ci{round(100 * level)}"][1]

    ends = []
    for far in (-bound, bound):
        if inside(far):
            ends.append(None)
            continue
        lo, hi = r_hat, far  # inside at r_hat, outside at far
        for _ in range(50):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if inside(mid) else (lo, mid)
        ends.append((lo + hi) / 2)
    return {"ratio": r_hat, f"ci{round(100 * level)}": ends}


def mde(se: float, df: float) -> float:
    """Smallest true gap detected with 80% power by a two-sided 5% t test whose standard error is `se`."""
    return (t_ppf(1 - ALPHA / 2, df) + t_ppf(POWER, df)) * se


def planned_mde(seeds: int, items: int, discordance: float, seed_sd: float, item_sd: float) -> float:
    """The MDE before running. Per (seed, item) the difference has variance ~ `discordance` (the share of pairs on
    which the two methods disagree), of which seed_sd^2 is the seed component and item_sd^2 the item component (the
    same test items repeat across seeds, so their effect does not average out over seeds); the rest is residual.
    Degrees of freedom by Satterthwaite from the expected mean squares, as the analysis computes them."""
    res = discordance - seed_sd ** 2 - item_sd ** 2
    if res <= 0:
        raise ValueError(f"seed and item variances ({seed_sd ** 2:.4g} + {item_sd ** 2:.4g}) exceed the variance of "
                         f"a paired 0/1 difference with discordance {discordance}")
    e_s, e_i = res + items * seed_sd ** 2, res + seeds * item_sd ** 2  # expected mean squares
    var = (e_s + e_i - res) / (seeds * items)
    den = e_s ** 2 / (seeds - 1) + e_i ** 2 / (items - 1) + res ** 2 / ((seeds - 1) * (items - 1))
    return mde(math.sqrt(var), (var * seeds * items) ** 2 / den)


# -- verdicts -----------------------------------------------------------------------------------------------------
def verdict(c: dict, yardstick: float | None) -> str:
    """What the intervals of one comparison say about the claim 'a > b', against `yardstick`, the smallest gap that
    matters for it (in accuracy units). Checked in this order:
    'holds' (95% interval above 0), 'holds, at least the yardstick' (above the yardstick), 'holds, smaller than the
    yardstick' (above 0 and below it); 'reversed' (below 0); 'equivalent to 0 within +-yardstick' (TOST at 5%: the
    90% interval inside (-yardstick, +yardstick)); 'smaller than the yardstick' (below it, sign unresolved);
    otherwise 'inconclusive', with '(underpowered: MDE > yardstick)' when the design could not have resolved a gap
    of the yardstick's size with 80% power. Without a yardstick (None) only the sign: 'holds', 'reversed' or
    'inconclusive'."""
    (lo, hi), (lo90, hi90) = c["ci95"], c["ci90"]
    if yardstick is None:
        return "holds" if lo > 0 else "reversed" if hi < 0 else "inconclusive"
    if lo > 0:
        return "holds, at least the yardstick" if lo >= yardstick else \
            "holds, smaller than the yardstick" if hi < yardstick else "holds"
    if hi < 0:
        return "reversed"
    if -yardstick < lo90 and hi90 < yardstick:
        return "equivalent to 0 within +-yardstick"
    if hi < yardstick:
        return "smaller than the yardstick"
    return "inconclusive" + (" (underpowered: MDE > yardstick)" if c["mde"] > yardstick else "")
