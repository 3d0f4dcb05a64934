"""The transfer study's statistics: the t distribution, the crossed seed x item interval (by hand and by simulated
coverage at the study's own variance structure), the planned MDE and the verdict rule."""
import math

import numpy as np
import pytest

from minigenrecal.study import stats


# -- the t distribution ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("q, df, want", [(0.975, 1, 12.706205), (0.975, 5, 2.570582), (0.975, 10, 2.228139),
                                         (0.975, 30, 2.042272), (0.8, 5, 0.919544), (0.95, 5, 2.015048),
                                         (0.975, math.inf, 1.959964), (0.025, 5, -2.570582)])
def test_t_quantiles_match_the_printed_tables(q, df, want):
    assert stats.t_ppf(q, df) == pytest.approx(want, abs=2e-6)
    assert stats.t_sf(stats.t_ppf(q, df), df) == pytest.approx(1 - q, abs=1e-10)


# -- the crossed interval by hand ----------------------------------------------------------------------------------------
def test_crossed_components_by_hand():
    # d = a - b on 3 seeds x 4 items, chosen so every mean square is easy to compute
    d = np.array([[1, -1, 0, 1], [0, -1, -1, -1], [0, 0, -1, 1]], dtype=float)
    m, ms, mi = d.mean(), d.mean(1), d.mean(0)  # -1/6; (1/4, -3/4, 0); (1/3, -2/3, -2/3, 1/3)
    msq_s = 4 * ((ms - m) ** 2).sum() / 2
    msq_i = 3 * ((mi - m) ** 2).sum() / 3
    msq_r = ((d - ms[:, None] - mi + m) ** 2).sum() / 6
    # by hand: SS_total = 8 - 12 / 36, SS_seed = 4 * 78 / 144, SS_item = 3 * 4 / 4, SS_res = the rest = 5 / 2
    assert (msq_s, msq_i, msq_r) == pytest.approx((13 / 12, 1, 5 / 12))
    c = stats.crossed_interval(d, np.zeros_like(d))
    # both components positive: Var(mean) = (MS_seed + MS_item - MS_res) / (S N)
    var = (msq_s + msq_i - msq_r) / 12
    df = (var * 12) ** 2 / (msq_s ** 2 / 2 + msq_i ** 2 / 3 + msq_r ** 2 / 6)
    assert c["se"] == pytest.approx(math.sqrt(var)) and c["df"] == pytest.approx(df)
    assert c["ci95"] == pytest.approx([m - stats.t_ppf(0.975, df) * c["se"], m + stats.t_ppf(0.975, df) * c["se"]])
    assert c["sd_seed"] == pytest.approx(math.sqrt((msq_s - msq_r) / 4))
    assert c["per_seed"] == pytest.approx([0.25, -0.75, 0.0])
    assert c["p"] == pytest.approx(2 * stats.t_sf(abs(m) / c["se"], df))


def test_a_negative_component_is_dropped_with_its_degrees_of_freedom():
    # every seed has the same row: no seed spread, MS_seed = 0 < MS_res = 0 too; add a residual in one cell
    d = np.tile(np.array([1.0, 0.0, 0.0, 1.0, 0.0, 1.0]), (4, 1))
    d[0, 1] = 1.0
    c = stats.components(d)
    assert c["ms_seed"] < c["ms_residual"] and c["sd_seed"] == 0
    # seed dropped: Var(mean) = MS_item / (S N) on the item degrees of freedom
    assert c["se"] == pytest.approx(math.sqrt(c["ms_item"] / 24)) and c["df"] == pytest.approx(5)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="one shape"):
        stats.crossed_interval(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="at least 2 seeds"):
        stats.crossed_interval(np.zeros((1, 30)), np.zeros((1, 30)))


# -- coverage by simulation, at the study's variance structure --------------------------------------------------------
def simulate(rng, n: int, seeds: int, items: int, gap: float, discordance: float, seed_sd: float, item_w: float):
    """n studies of (seeds, items) paired differences in {-1, 0, 1} with a known mean `gap`: per cell, P(d = 1) =
    p + (g_s + h_i) / 2 and P(d = -1) = m - (g_s + h_i) / 2, with p - m = gap and p + m = discordance; g_s normal
    with sd `seed_sd` (cut at 3.5 sd, symmetric, so its mean stays 0), h_i uniform on +-item_w. Then
    E[d | s, i] = gap + g_s + h_i exactly, and the truth over seeds and items is `gap`."""
    p, m = (discordance + gap) / 2, (discordance - gap) / 2
    g = np.clip(rng.normal(0, seed_sd, (n, seeds, 1)), -3.5 * seed_sd, 3.5 * seed_sd)
    h = rng.uniform(-item_w, item_w, (n, 1, items))
    shift = (g + h) / 2
    assert (p + shift).min() >= 0 and (m - shift).min() >= 0  # valid probabilities in every cell
    u = rng.random((n, seeds, items))
    return (u < p + shift).astype(np.float64) - (u >= 1 - (m - shift)).astype(np.float64)


SIMS = 1500  # binomial sd of a 95% coverage over 1500 studies: 0.56 points


@pytest.mark.parametrize("case, seed_sd", [("no seed effect (long-budget rows)", 0.0),
                                           ("seed sd 2.9 points, 6 seeds (short-budget rows)", 0.029)])
def test_the_crossed_interval_covers_at_the_studys_variance_structure(case, seed_sd):
    """6 seeds x 2000 items, 25% discordant pairs, a true gap of 1.1 points, items with an sd of 6 points in their
    gap (the study's rows measure 0-17). Coverage of the 95% interval over 1500 seeded studies must lie in
    [0.933, 0.975]: the lower end is 3 binomial sds under 95% (an interval that undercovers fails); the upper end
    allows the conservatism of dropping a negative seed variance, which 6 seeds cannot tell from a small positive
    one (about 96-97% with no seed effect, docs/method.md).
    The standard error must track the true spread of the estimate within [0.9, 1.2]."""
    rng = np.random.default_rng(20)
    gap, hits, naive, ses, diffs = 0.011, 0, 0, [], []
    for _ in range(SIMS // 100):
        for d in simulate(rng, 100, 6, 2000, gap, 0.25, seed_sd, 0.104):
            c = stats.crossed_interval(d, np.zeros_like(d))
            hits += c["ci95"][0] <= gap <= c["ci95"][1]
            naive += abs(c["diff"] - gap) <= 1.959964 * d.std(ddof=1) / math.sqrt(d.size)  # cells independent
            ses.append(c["se"])
            diffs.append(c["diff"])
    coverage, ratio = hits / SIMS, np.mean(ses) / np.std(diffs, ddof=1)
    assert 0.933 <= coverage <= 0.975, (case, coverage)
    assert 0.9 <= ratio <= 1.2, (case, ratio)
    if seed_sd > 0:  # the check can fail: an interval that treats the 12,000 pairs as independent undercovers
        assert naive / SIMS < 0.7, naive / SIMS


def test_the_fraction_recovered_has_fieller_ends_that_the_crossed_test_just_accepts():
    rng = np.random.default_rng(3)
    ctl = simulate(rng, 1, 6, 2000, 0.20, 0.40, 0.02, 0.1)[0]  # a control gaining 20 points
    part = simulate(rng, 1, 6, 2000, 0.05, 0.30, 0.02, 0.1)[0]  # a method gaining 5
    r = stats.ratio_interval(part, ctl)
    lo, hi = r["ci95"]
    assert r["ratio"] == pytest.approx(part.mean() / ctl.mean()) and lo < r["ratio"] < hi
    for end in (lo, hi):  # at each end the crossed interval of part - R * ctl just touches 0
        just_in = stats.crossed_interval(part - end * ctl, np.zeros_like(ctl))["ci95"]
        assert min(abs(just_in[0]), abs(just_in[1])) < 1e-6
    assert 0.1 < lo and hi < 0.45  # the truth, 0.25, inside an interval of sensible width
    noise = simulate(rng, 1, 6, 2000, 0.0, 0.30, 0.02, 0.1)[0]  # a denominator with nothing in it
    assert None in stats.ratio_interval(part, noise)["ci95"]


# -- planning and verdicts ---------------------------------------------------------------------------------------------
def test_planned_mde_adds_the_item_component():
    S, N, disc, s_sd, i_sd = 6, 2000, 0.30, 0.02, 0.08
    res = disc - s_sd ** 2 - i_sd ** 2
    var = s_sd ** 2 / S + i_sd ** 2 / N + res / (S * N)
    e_s, e_i = res + N * s_sd ** 2, res + S * i_sd ** 2
    df = (var * S * N) ** 2 / (e_s ** 2 / 5 + e_i ** 2 / 1999 + res ** 2 / (5 * 1999))
    want = (stats.t_ppf(0.975, df) + stats.t_ppf(0.8, df)) * math.sqrt(var)
    assert stats.planned_mde(S, N, disc, s_sd, i_sd) == pytest.approx(want)
    # at a fixed discordance, variance moved from the residual to the items no longer averages out over seeds
    assert stats.planned_mde(S, N, disc, 0.0, 0.3) > 1.1 * stats.planned_mde(S, N, disc, 0.0, 0.0)
    with pytest.raises(ValueError, match="exceed"):
        stats.planned_mde(S, N, 0.01, 0.1, 0.1)


def _c(lo, hi, lo90=None, hi90=None, mde=0.02):
    return {"ci95": [lo, hi], "ci90": [lo90 if lo90 is not None else lo, hi90 if hi90 is not None else hi],
            "mde": mde}


def test_verdicts_use_the_yardstick_the_equivalence_bounds_and_the_mde():
    y = 0.05
    assert stats.verdict(_c(0.06, 0.09), y) == "holds, at least the yardstick"
    assert stats.verdict(_c(0.002, 0.021), y) == "holds, smaller than the yardstick"
    assert stats.verdict(_c(0.01, 0.08), y) == "holds"
    assert stats.verdict(_c(-0.05, -0.01), y) == "reversed"
    assert stats.verdict(_c(-0.06, 0.045, -0.049, 0.04), y) == "equivalent to 0 within +-yardstick"
    assert stats.verdict(_c(-0.08, 0.04, -0.07, 0.03), y) == "smaller than the yardstick"
    assert stats.verdict(_c(-0.02, 0.09, mde=0.04), y) == "inconclusive"
    assert stats.verdict(_c(-0.02, 0.09, mde=0.07), y) == "inconclusive (underpowered: MDE > yardstick)"
    assert [stats.verdict(_c(*ci), None) for ci in ((0.01, 0.2), (-0.2, -0.01), (-0.01, 0.01))] == \
        ["holds", "reversed", "inconclusive"]
