"""One-run empirical lower bound (Steinke, Nasr, Jagielski 2023): hand cases and properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy.stats import binom

from secfedtl.errors import InputError
from secfedtl.privacy.empirical import (audit_scores, audit_scores_gdp, epsilon_lower_bound, gdp_epsilon,
                                        gdp_lower_bound, gdp_mu_for_epsilon, gdp_rejects, guess_counts, guess_grid,
                                        k_grid, minimum_mass, one_run_p_value)


def test_all_correct_pure_dp_is_hand_computable():
    # delta = 0, r guesses all right: p = q^r, so the bound solves q^r = alpha, eps = logit(q).
    q = 0.05 ** (1 / 10)
    expected = math.log(q / (1 - q))  # 1.05187...
    got = epsilon_lower_bound(num_canaries=10, guesses=10, correct=10, delta=0.0, significance=0.05)
    assert expected - 1e-3 <= got <= expected
    assert one_run_p_value(num_canaries=10, guesses=10, correct=10, epsilon=expected, delta=0.0) == pytest.approx(0.05)


def test_p_value_is_the_binomial_tail_plus_the_delta_term():
    m, r, v, eps, delta = 100, 20, 15, 1.0, 1e-3
    q = math.exp(eps) / (1 + math.exp(eps))
    beta = binom.sf(v - 1, r, q)
    alpha = max((binom.sf(v - i - 1, r, q) - beta) / i for i in range(1, v + 1))
    expected = beta + 2 * m * delta * alpha
    assert one_run_p_value(num_canaries=m, guesses=r, correct=v, epsilon=eps, delta=delta) == pytest.approx(expected)
    # the delta term only ever adds
    assert expected > beta


def test_chance_level_guessing_gives_no_bound():
    assert epsilon_lower_bound(num_canaries=100, guesses=100, correct=50, delta=1e-5) == 0.0
    assert epsilon_lower_bound(num_canaries=100, guesses=10, correct=0, delta=1e-5) == 0.0


@settings(max_examples=60, deadline=None)
@given(r=st.integers(1, 200), frac=st.floats(0, 1), eps=st.floats(0, 8), delta=st.sampled_from([0.0, 1e-6, 1e-3]))
def test_p_value_monotone(r, frac, eps, delta):
    v = int(frac * r)
    m = 2 * r
    p = one_run_p_value(num_canaries=m, guesses=r, correct=v, epsilon=eps, delta=delta)
    assert 0 <= p <= 1
    # more privacy loss allowed -> the observation is less surprising
    assert one_run_p_value(num_canaries=m, guesses=r, correct=v, epsilon=eps + 0.5, delta=delta) >= p - 1e-12
    # more correct guesses -> more surprising
    if v < r:
        assert one_run_p_value(num_canaries=m, guesses=r, correct=v + 1, epsilon=eps, delta=delta) <= p + 1e-12


@settings(max_examples=40, deadline=None)
@given(r=st.integers(2, 300), frac=st.floats(0.5, 1))
def test_bound_monotone_in_correct_and_confidence(r, frac):
    v = int(frac * r)
    b = epsilon_lower_bound(num_canaries=r, guesses=r, correct=v, delta=1e-5)
    if v < r:
        assert epsilon_lower_bound(num_canaries=r, guesses=r, correct=v + 1, delta=1e-5) >= b
    assert epsilon_lower_bound(num_canaries=r, guesses=r, correct=v, delta=1e-5, significance=0.01) <= b
    assert epsilon_lower_bound(num_canaries=r, guesses=r, correct=v, delta=1e-2) <= b


def test_the_bound_is_a_rejection_at_its_level():
    b = epsilon_lower_bound(num_canaries=1000, guesses=200, correct=180, delta=1e-5)
    assert b > 1
    assert one_run_p_value(num_canaries=1000, guesses=200, correct=180, epsilon=b, delta=1e-5) < 0.05
    assert one_run_p_value(num_canaries=1000, guesses=200, correct=180, epsilon=b + 1e-3, delta=1e-5) >= 0.05


def test_guess_counts():
    scores = [0.1, 0.9, 0.5, 0.3, 0.8]
    inc = [False, True, False, True, True]
    # top 2: idx 1 (in), 4 (in); bottom 1: idx 0 (out)
    assert guess_counts(scores, inc, k_plus=2, k_minus=1) == (3, 3)
    # bottom 2: idx 0 (out), 3 (in) -> one wrong
    assert guess_counts(scores, inc, k_plus=0, k_minus=2) == (2, 1)
    with pytest.raises(InputError):
        guess_counts(scores, inc, k_plus=3, k_minus=3)
    with pytest.raises(InputError):
        guess_counts([0.1, float("nan")], [True, False], k_plus=1, k_minus=0)


def test_k_grid_depends_on_m_only_and_fits():
    for m in (2, 10, 16, 100, 1000):
        g = k_grid(m)
        assert g and all(1 <= k and 2 * k <= m for k in g)
        assert list(g) == sorted(set(g))


def test_audit_scores_false_alarm_rate_below_level_under_the_null():
    # Scores independent of the coins (an epsilon = 0 mechanism): any positive bound is a false
    # alarm; at 95% confidence they must be rare. 200 trials with a fixed seed.
    rng = np.random.default_rng(1)
    alarms = 0
    for _ in range(200):
        inc = rng.random(200) < 0.5
        if audit_scores(rng.normal(size=200), inc, delta=1e-5).epsilon_lower > 0:
            alarms += 1
    assert alarms <= 20  # expected <= 10 at level 0.05


def test_audit_scores_detects_a_perfect_separation():
    inc = np.array([True, False] * 500)
    res = audit_scores(inc.astype(float), inc, delta=1e-5)
    assert res.epsilon_lower > 4.5  # 1000 right guesses (22 (k+, k-) pairs share the 5%)
    assert res.correct == res.guesses
    # a fixed k: no Bonferroni split, so at least as high for that k
    fixed = audit_scores(inc.astype(float), inc, delta=1e-5, k=res.k_plus)
    assert fixed.epsilon_lower >= res.epsilon_lower


# --- f-DP (Gaussian) analysis, Mahloujifar, Melis and Chaudhuri 2025


def _lp_minimum_mass(m, k, c, mu, tau):
    """The least total mass of a linear relaxation of the same constraints (tangents of the convex
    B^-1): at most the true minimum, so the greedy must not exceed it."""
    from scipy.optimize import linprog
    from scipy.stats import norm

    g = lambda r: norm.cdf(norm.ppf(r) - mu)  # noqa: E731
    r0s = np.linspace(1e-4, 0.9999, 400)
    slopes = norm.pdf(norm.ppf(r0s) - mu) / norm.pdf(norm.ppf(r0s))
    j = np.arange(k + 1)
    a_ub, b_ub = [], []
    a_ub.append(-(j >= c).astype(float)); b_ub.append(-tau)  # P[C >= c] >= tau
    for t in range(1, k + 1):
        h_row = np.where(j >= t - 1, (k - j) / m, 0.0)
        r_row = np.where(j >= t, j / m, 0.0)
        for r0, s0 in zip(r0s, slopes):  # h_t >= g(r0) + s0 (r_t - r0)
            a_ub.append(-(h_row - s0 * r_row)); b_ub.append(-(g(r0) - s0 * r0))
    res = linprog(np.ones(k + 1), A_ub=np.array(a_ub), b_ub=np.array(b_ub), bounds=(0, None), method="highs")
    assert res.status == 0
    return res.fun


@pytest.mark.parametrize("m,k,c,mu", [(20, 10, 9, 1.0), (30, 12, 12, 2.0), (50, 20, 15, 0.5), (16, 8, 8, 3.0)])
def test_gdp_greedy_is_the_least_mass(m, k, c, mu):
    # Soundness of the rejection rule: the greedy never needs more mass than the constraints do.
    tau = 0.05
    from scipy.special import ndtr, ndtri

    greedy = minimum_mass(num_canaries=m, guesses=k, correct=c, tau=tau,
                          blow_up_inverse=lambda x: float(ndtr(ndtri(x) - mu)) if 0 < x < 1 else x)
    lp = _lp_minimum_mass(m, k, c, mu, tau)
    assert greedy <= lp + 1e-6
    assert greedy >= lp - 0.02  # and the relaxation is close to it: the greedy is the minimum


def test_gdp_epsilon_inverts_the_conversion():
    from secfedtl.privacy.empirical import _gdp_delta

    assert _gdp_delta(0.0, 1.0) == pytest.approx(0.3829249, abs=1e-6)  # Phi(1/2) - Phi(-1/2)
    for mu in (0.3, 1.0, 2.5):
        eps = gdp_epsilon(mu, 1e-5)
        assert _gdp_delta(eps, mu) == pytest.approx(1e-5, rel=1e-6)
        assert gdp_mu_for_epsilon(eps, 1e-5) == pytest.approx(mu, rel=1e-6)
    assert gdp_epsilon(0.0, 1e-5) == 0.0
    assert gdp_epsilon(1.0, 1e-5) < gdp_epsilon(2.0, 1e-5)


def test_gdp_rejection_is_monotone_in_mu():
    # a less private claim (larger mu) is harder to reject
    kw = dict(num_canaries=1000, guesses=100, correct=95, significance=0.05)
    mu = gdp_lower_bound(**kw)
    assert mu > 0.5
    assert gdp_rejects(mu=mu, **kw) and gdp_rejects(mu=mu / 2, **kw)
    assert not gdp_rejects(mu=mu + 0.01, **kw) and not gdp_rejects(mu=2 * mu, **kw)
    assert gdp_lower_bound(num_canaries=1000, guesses=100, correct=50) == 0.0


def test_gdp_false_alarms_on_a_gaussian_mechanism_are_rare():
    # Scores from an exactly mu-GDP mechanism (in: N(mu, 1), out: N(0, 1)): the bound exceeds mu
    # in at most about 5% of runs; and it is well above 0, since the canaries do leak.
    rng = np.random.default_rng(3)
    mu, above, bounds = 1.0, 0, []
    for _ in range(60):
        inc = rng.random(300) < 0.5
        b = audit_scores_gdp(rng.normal(size=300) + mu * inc, inc, delta=1e-5)
        above += b.mu_lower > mu
        bounds.append(b.mu_lower)
    assert above <= 8  # expected at most 3 at level 0.05
    assert np.median(bounds) > 0.3


def test_gdp_is_tighter_than_the_epsilon_delta_test_on_a_gaussian_mechanism():
    rng = np.random.default_rng(4)
    inc = rng.random(20000) < 0.5
    scores = rng.normal(size=20000) + 2.0 * inc
    eps_dp = audit_scores(scores, inc, delta=1e-5).epsilon_lower
    gdp = audit_scores_gdp(scores, inc, delta=1e-5)
    assert gdp.epsilon_lower > eps_dp
    assert gdp.epsilon_lower <= gdp_epsilon(2.0, 1e-5) + 0.5
    assert gdp.epsilon_lower == pytest.approx(gdp_epsilon(gdp.mu_lower, 1e-5))


def test_guess_grid_is_public_and_fits():
    for m in (2, 16, 1000, 100000):
        for kp, km in guess_grid(m):
            assert 1 <= kp and kp + km <= m and km in (0, kp)


def test_epsilon_delta_grid_spends_no_confidence_on_pairs_that_cannot_reject():
    # With M delta large (10^4 canaries at delta 1e-5: 2 M delta = 0.2) the delta term alone keeps
    # the p-value of a pair with few guesses above its share of the 5%, even with every guess
    # right. Such a pair can never give a bound, so splitting the 5% over it only weakens the
    # others. The pairs kept depend on (M, delta, confidence) only: public, chosen before any coin.
    m, delta = 10_000, 1e-5
    inc = np.zeros(m, dtype=bool)
    res = audit_scores(np.zeros(m), inc, delta=delta)
    share = 0.05 / len(res.grid)
    for kp, km in res.grid:
        assert epsilon_lower_bound(num_canaries=m, guesses=kp + km, correct=kp + km, delta=delta,
                                   significance=share) > 0
    assert set(res.grid) < set(guess_grid(m))
    # the pairs kept do not depend on the coins or the scores
    rng = np.random.default_rng(0)
    other = audit_scores(rng.normal(size=m), rng.random(m) < 0.5, delta=delta)
    assert other.grid == res.grid
    # with delta = 0 nothing is dropped
    assert audit_scores(np.zeros(m), inc, delta=0.0).grid == guess_grid(m)
