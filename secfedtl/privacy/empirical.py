"""Empirical lower bounds on epsilon from one training run (Steinke, Nasr, Jagielski, NeurIPS 2023).

The auditor inserts ``m`` canaries, each included independently with probability 1/2 by a coin
only the auditor knows. After the run an adversary scores every canary; it guesses "in" for the
``k_plus`` highest scores, "out" for the ``k_minus`` lowest, and abstains on the rest. If the run
is (epsilon, delta)-DP, the number ``W`` of correct guesses among the ``r = k_plus + k_minus``
guesses satisfies (their Theorem 5.2, with the delta term of their Proposition 5.7)

    P[W >= v] <= beta(v) + 2 m delta * max_{1 <= i <= v} (P[B >= v - i] - beta(v)) / i,
    beta(v) = P[B >= v],  B ~ Binomial(r, e^epsilon / (1 + e^epsilon)).

That right-hand side is the p-value of the claim "(epsilon, delta)-DP" given ``v`` correct
guesses (:func:`one_run_p_value`). It grows with epsilon, so the largest epsilon the observation
rejects at confidence ``1 - alpha`` is found by bisection (:func:`epsilon_lower_bound`).

**Choosing k.** The guesses must not be chosen after looking at the coins. :func:`audit_scores`
tries a fixed, public grid of ``(k_plus, k_minus)`` pairs (symmetric and one-sided; a function of
``m`` only) and splits ``alpha`` over them (Bonferroni), so the reported bound holds at the stated confidence
whichever ``k`` gives it. Pairs whose p-value the delta term alone keeps above their share of
``alpha`` (few guesses when ``m delta`` is large) are left out of the split: which ones depends on
``(m, delta, alpha)`` only. With one fixed ``k`` the grid has one point and no correction applies.

A lower bound says: *this run* is not (epsilon_lower, delta)-DP against *this adversary*, except
with probability at most ``alpha``. It is never evidence that the run *is* private at any epsilon
(docs/privacy.md, "Empirical auditing").

Cross-checked in its formula against google-deepmind/jax_privacy's one-run p-value (same
statistic; code not copied); the tests check hand-computable cases.

**The f-DP analysis** (Mahloujifar, Melis and Chaudhuri, "Auditing f-differential privacy in one
run", ICML 2025, arXiv 2410.22235). The (epsilon, delta) test above lets the mechanism be as
accurate as randomized response on every guess, which a Gaussian mechanism is not: at the same
(epsilon, delta) a Gaussian mechanism's confident guesses are right less often. The f-DP test asks
instead whether the run can be ``mu``-GDP (the trade-off curve of a Gaussian mechanism with
sensitivity over noise ``mu``). Our derivation of their bound, as implemented by
:func:`gdp_rejects`: let ``C`` be the number of right guesses and ``p_j = P[C = j]``. For canary
``i`` and fixed other coins, the events "guess ``i`` is +1 (or -1) and at least ``t - 1`` of the
other guesses are right" are computed from the output and the other coins, so ``mu``-GDP bounds
the probability of each under one value of coin ``i`` by ``B`` of its probability under the other,
``B(x) = Phi(Phi^-1(x) + mu)``; as ``B`` is concave, averaging over the two coin values gives
``P[guess i right and C >= t] <= B(P[guess i wrong and C >= t - 1])``, and averaging over the ``m``
canaries keeps it. So, for every ``t >= 1``

    (1/m) sum_{j >= t-1} (k - j) p_j  >=  B^-1( (1/m) sum_{j >= t} j p_j ),

and ``sum_j p_j = 1``. If ``P[C >= c] >= tau`` the cheapest way to meet these constraints puts mass
``tau`` at ``j = c`` and, going down from ``t = c`` to ``t = 1``, just enough mass at ``j = t - 1``
to meet constraint ``t``; when that needs a total mass above 1 no ``mu``-GDP run makes ``c`` right
guesses with probability ``tau``: the observation rejects ``mu``-GDP at level ``tau``. (A test
checks the greedy total against a linear program over the same constraints.) The largest ``mu``
rejected is :func:`gdp_lower_bound`; :func:`gdp_epsilon` turns it into the epsilon a ``mu``-GDP
mechanism has at a given delta. That epsilon is a lower bound on the (epsilon, delta) of the run
**only if its trade-off curve is Gaussian** (DP-SGD's many subsampled Gaussian steps are close to
it): what the test proves is "not ``mu_lower``-GDP".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.special import ndtr, ndtri
from scipy.stats import binom

from secfedtl.errors import InputError

__all__ = ["EmpiricalBound", "GDPBound", "audit_scores", "epsilon_lower_bound", "gdp_epsilon", "gdp_lower_bound",
           "audit_scores_gdp", "fdp_rejects", "guess_grid", "minimum_mass", "gdp_mu_for_epsilon", "gdp_rejects", "guess_counts", "k_grid", "one_run_p_value"]


def _check_counts(num_canaries: int, guesses: int, correct: int) -> None:
    for name, v in (("num_canaries", num_canaries), ("guesses", guesses), ("correct", correct)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise InputError(f"{name} must be a non-negative int, got {v!r}")
    if not correct <= guesses <= num_canaries:
        raise InputError(f"need correct <= guesses <= num_canaries, got {correct}, {guesses}, {num_canaries}")


def _largest_rejected(rejects: Callable[[float], bool], *, upper: float, tolerance: float) -> float:
    """The largest parameter in ``[0, upper]`` that ``rejects`` (monotone: true below a threshold,
    false above it), by bisection to ``tolerance``; 0 if it rejects nothing, ``upper`` if all."""
    if not rejects(0.0):
        return 0.0
    lo, hi = 0.0, upper
    if rejects(hi):
        return hi
    while hi - lo > tolerance:
        mid = (lo + hi) / 2
        if rejects(mid):
            lo = mid
        else:
            hi = mid
    return lo


def one_run_p_value(*, num_canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """Upper bound on P[at least ``correct`` of ``guesses`` guesses are right] for an
    (epsilon, delta)-DP run with ``num_canaries`` canaries (see the module docstring)."""
    _check_counts(num_canaries, guesses, correct)
    if not (math.isfinite(epsilon) and epsilon >= 0):
        raise InputError(f"epsilon must be finite and >= 0, got {epsilon!r}")
    if not 0 <= delta <= 1:
        raise InputError(f"delta must be in [0, 1], got {delta!r}")
    if correct == 0:
        return 1.0
    q = 1.0 / (1.0 + math.exp(-epsilon))
    beta = float(binom.sf(correct - 1, guesses, q))  # P[B >= correct]
    if delta == 0:
        return min(beta, 1.0)
    i = np.arange(1, correct + 1)
    tails = binom.sf(correct - i - 1, guesses, q) - beta  # P[B >= correct - i] - P[B >= correct]
    alpha = float(np.max(tails / i))
    return min(beta + 2.0 * num_canaries * delta * max(alpha, 0.0), 1.0)


def epsilon_lower_bound(*, num_canaries: int, guesses: int, correct: int, delta: float,
                        significance: float = 0.05, epsilon_max: float = 50.0, tolerance: float = 1e-4) -> float:
    """The largest epsilon (to ``tolerance``, rounded down) whose (epsilon, delta) claim the
    observation rejects at level ``significance``; 0.0 when even epsilon = 0 is not rejected."""
    if not 0 < significance < 1:
        raise InputError(f"significance must be in (0, 1), got {significance!r}")
    _check_counts(num_canaries, guesses, correct)

    def rejects(eps: float) -> bool:
        return one_run_p_value(num_canaries=num_canaries, guesses=guesses, correct=correct,
                               epsilon=eps, delta=delta) < significance

    if correct == 0:
        return 0.0
    return _largest_rejected(rejects, upper=epsilon_max, tolerance=tolerance)


def guess_counts(scores: Sequence[float], included: Sequence[bool], *, k_plus: int, k_minus: int) -> tuple[int, int]:
    """Guess "in" for the ``k_plus`` highest scores and "out" for the ``k_minus`` lowest (ties
    broken by canary index, which carries no information about the coins); returns
    ``(guesses, correct)``."""
    s = np.asarray(scores, dtype=float)
    inc = np.asarray(included, dtype=bool)
    if s.shape != inc.shape or s.ndim != 1:
        raise InputError("scores and included must be 1-D and of the same length")
    if not np.all(np.isfinite(s)):
        raise InputError("scores must be finite")
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > len(s):
        raise InputError(f"need 0 <= k_plus, k_minus and k_plus + k_minus <= {len(s)}")
    order = np.argsort(s, kind="stable")  # ascending
    low = order[:k_minus]
    high = order[len(s) - k_plus:] if k_plus else order[:0]
    correct = int(inc[high].sum()) + int((~inc[low]).sum())
    return k_plus + k_minus, correct


def k_grid(num_canaries: int) -> tuple[int, ...]:
    """The public grid of ``k`` (= k_plus = k_minus) tried for ``num_canaries`` canaries: fixed
    fractions of ``m`` (so chosen before any coin is seen)."""
    fractions = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
    ks = sorted({max(1, int(f * num_canaries)) for f in fractions if max(1, int(f * num_canaries)) * 2 <= num_canaries})
    return tuple(ks)


def guess_grid(num_canaries: int) -> tuple[tuple[int, int], ...]:
    """The public ``(k_plus, k_minus)`` pairs tried for ``num_canaries`` canaries: for every ``k``
    of :func:`k_grid`, the symmetric ``(k, k)`` and the one-sided ``(k, 0)`` (a canary that is in
    but was rarely sampled looks like one that is out, so the low scores carry less than the high
    ones)."""
    return tuple(p for g in k_grid(num_canaries) for p in ((g, g), (g, 0)))


def _pairs(m: int, k: int | None) -> tuple[tuple[int, int], ...]:
    pairs = ((k, k),) if k is not None else guess_grid(m)
    if not pairs or any(a < 1 or a + b > m for a, b in pairs):
        raise InputError(f"k must be in [1, {m // 2}]")
    return pairs


def _pairs_that_can_reject(m: int, pairs: tuple[tuple[int, int], ...], *, delta: float,
                           confidence: float) -> tuple[tuple[int, int], ...]:
    """The pairs of ``pairs`` that could give a positive (epsilon, delta) bound at their share of
    ``1 - confidence`` if every one of their guesses were right. The delta term keeps the p-value
    of ``r`` guesses at least about ``2 m delta / r`` (its ``i = r`` term), so with ``m delta`` large
    a pair with few guesses can never reject and its share of the confidence would be wasted.
    A function of ``(m, pairs, delta, confidence)`` only: public, fixed before any coin is seen.
    Pairs are dropped until every pair left can reject at the split it gets; if none can, all stay
    (the bound is then 0 whatever the guesses)."""
    kept = pairs
    while True:
        share = (1.0 - confidence) / len(kept)
        able = tuple(p for p in kept if epsilon_lower_bound(num_canaries=m, guesses=p[0] + p[1], correct=p[0] + p[1],
                                                             delta=delta, significance=share) > 0)
        if not able:
            return pairs
        if able == kept:
            return kept
        kept = able


@dataclass(frozen=True, kw_only=True)
class EmpiricalBound:
    """The result of :func:`audit_scores`."""

    epsilon_lower: float      #: the lower bound on epsilon at ``confidence``
    confidence: float
    delta: float
    num_canaries: int
    num_in: int
    k_plus: int               #: the k that gave the bound (0 when no k rejects epsilon = 0)
    k_minus: int
    guesses: int
    correct: int
    grid: tuple[tuple[int, int], ...]  #: the (k_plus, k_minus) tried (Bonferroni over len(grid))
    per_k: tuple[tuple[int, int, int, int, float], ...]  #: (k_plus, k_minus, guesses, correct, bound) each

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["grid"] = [list(x) for x in self.grid]
        d["per_k"] = [list(x) for x in self.per_k]
        return d


def audit_scores(scores: Sequence[float], included: Sequence[bool], *, delta: float, confidence: float = 0.95,
                 k: int | None = None) -> EmpiricalBound:
    """The one-run lower bound from canary ``scores`` (higher = more likely "in") and the
    auditor's secret ``included`` coins: the best over :func:`guess_grid` (or the one symmetric
    ``k`` given), at ``confidence`` after splitting the error over the pairs tried. Of the grid,
    only the pairs that could reject at all are tried (:func:`_pairs_that_can_reject`: a public
    rule, so the split stays valid)."""
    if not 0 < confidence < 1:
        raise InputError(f"confidence must be in (0, 1), got {confidence!r}")
    m = len(scores)
    if m < 2:
        raise InputError("need at least 2 canaries")
    grid = _pairs(m, k)
    if k is None and delta > 0:
        grid = _pairs_that_can_reject(m, grid, delta=delta, confidence=confidence)
    significance = (1.0 - confidence) / len(grid)
    best = (0.0, 0, 0, 0, 0)
    per_k = []
    for kp, km in grid:
        r, c = guess_counts(scores, included, k_plus=kp, k_minus=km)
        eps = epsilon_lower_bound(num_canaries=m, guesses=r, correct=c, delta=delta, significance=significance)
        per_k.append((kp, km, r, c, eps))
        if eps > best[0]:
            best = (eps, kp, km, r, c)
    return EmpiricalBound(epsilon_lower=best[0], confidence=confidence, delta=delta, num_canaries=m,
                          num_in=int(np.asarray(included, dtype=bool).sum()), k_plus=best[1], k_minus=best[2],
                          guesses=best[3], correct=best[4], grid=grid, per_k=tuple(per_k))


# --- f-DP (Gaussian trade-off) analysis: Mahloujifar, Melis and Chaudhuri (see the module docstring).

def _gdp_blow_up_inverse(x: float, mu: float) -> float:
    """``B^-1(x)`` for ``mu``-GDP: the least probability, under one coin value, of an event that has
    probability ``x`` under the other."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    return float(ndtr(ndtri(x) - mu))


def minimum_mass(*, num_canaries: int, guesses: int, correct: int, blow_up_inverse: Callable[[float], float],
                 tau: float) -> float:
    """The least total probability that the f-DP constraints need once ``P[C >= correct] >= tau``
    (the greedy of the module docstring); above 1 means the observation rejects the f-DP claim
    whose ``B^-1`` is ``blow_up_inverse`` at level ``tau``."""
    _check_counts(num_canaries, guesses, correct)
    m, k, c = num_canaries, guesses, correct
    r = tau * c / m          # (1/m) sum_{j >= t} j p_j
    h = tau * (k - c) / m    # (1/m) sum_{j >= t-1} (k - j) p_j, before mass at t - 1
    mass = tau
    for i in range(c - 1, -1, -1):  # constraint t = i + 1, met by mass at j = i
        need = blow_up_inverse(r)
        if need <= h:
            break  # r no longer grows, so no later constraint binds
        add = (need - h) * m / (k - i)  # p_i
        mass += add
        r += i * add / m
        h = need
    return mass


def fdp_rejects(*, num_canaries: int, guesses: int, correct: int, blow_up_inverse: Callable[[float], float],
                significance: float) -> bool:
    """Whether ``correct`` right guesses among ``guesses`` reject the f-DP claim at ``significance``."""
    if correct == 0:
        return False
    return minimum_mass(num_canaries=num_canaries, guesses=guesses, correct=correct,
                        blow_up_inverse=blow_up_inverse, tau=significance) > 1.0


def gdp_rejects(*, num_canaries: int, guesses: int, correct: int, mu: float, significance: float) -> bool:
    """Whether ``correct`` right guesses among ``guesses`` rejects ``mu``-GDP at ``significance``."""
    return fdp_rejects(num_canaries=num_canaries, guesses=guesses, correct=correct,
                       blow_up_inverse=lambda x: _gdp_blow_up_inverse(x, mu), significance=significance)


def gdp_lower_bound(*, num_canaries: int, guesses: int, correct: int, significance: float = 0.05,
                    mu_max: float = 20.0, tolerance: float = 1e-4) -> float:
    """The largest ``mu`` (to ``tolerance``, rounded down) whose ``mu``-GDP claim the observation
    rejects at ``significance``; 0.0 when none is."""
    if not 0 < significance < 1:
        raise InputError(f"significance must be in (0, 1), got {significance!r}")
    _check_counts(num_canaries, guesses, correct)

    def rejects(mu: float) -> bool:
        return gdp_rejects(num_canaries=num_canaries, guesses=guesses, correct=correct, mu=mu,
                           significance=significance)

    return _largest_rejected(rejects, upper=mu_max, tolerance=tolerance)


def _gdp_delta(epsilon: float, mu: float) -> float:
    # Dong, Roth and Su (2022), Corollary 2.13: mu-GDP is (epsilon, delta(epsilon))-DP for all epsilon.
    return float(ndtr(-epsilon / mu + mu / 2) - math.exp(epsilon) * ndtr(-epsilon / mu - mu / 2))


def gdp_epsilon(mu: float, delta: float) -> float:
    """The epsilon at ``delta`` of a ``mu``-GDP mechanism (0 for ``mu = 0``)."""
    if not 0 < delta < 1:
        raise InputError(f"delta must be in (0, 1), got {delta!r}")
    if mu <= 0 or _gdp_delta(0.0, mu) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while _gdp_delta(hi, mu) > delta:
        lo, hi = hi, 2 * hi
    for _ in range(100):
        mid = (lo + hi) / 2
        if _gdp_delta(mid, mu) > delta:
            lo = mid
        else:
            hi = mid
    return hi


def gdp_mu_for_epsilon(epsilon: float, delta: float) -> float:
    """The ``mu`` whose ``mu``-GDP mechanism has exactly ``epsilon`` at ``delta``."""
    if epsilon <= 0:
        return 0.0
    lo, hi = 0.0, 1.0
    while gdp_epsilon(hi, delta) < epsilon:
        lo, hi = hi, 2 * hi
    for _ in range(100):
        mid = (lo + hi) / 2
        if gdp_epsilon(mid, delta) < epsilon:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True, kw_only=True)
class GDPBound:
    """The f-DP result of :func:`audit_scores`: the run is not ``mu_lower``-GDP (at
    ``confidence``); ``epsilon_lower`` is the epsilon a ``mu_lower``-GDP mechanism has at ``delta``."""

    mu_lower: float
    epsilon_lower: float
    confidence: float
    delta: float
    k_plus: int
    k_minus: int
    guesses: int
    correct: int
    per_k: tuple[tuple[int, int, int, int, float | None], ...]  #: (k_plus, k_minus, guesses, correct, mu bound; None: below the best, not searched)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["per_k"] = [list(x) for x in self.per_k]
        return d


def audit_scores_gdp(scores: Sequence[float], included: Sequence[bool], *, delta: float, confidence: float = 0.95,
                     k: int | None = None) -> GDPBound:
    """The f-DP (Gaussian) one-run bound from the same guesses as :func:`audit_scores`: the best
    over :func:`guess_grid` (or the one symmetric ``k`` given), Bonferroni over the pairs tried."""
    if not 0 < confidence < 1:
        raise InputError(f"confidence must be in (0, 1), got {confidence!r}")
    m = len(scores)
    if m < 2:
        raise InputError("need at least 2 canaries")
    grid = _pairs(m, k)
    significance = (1.0 - confidence) / len(grid)
    best = (0.0, 0, 0, 0, 0)
    per_k = []
    for kp, km in grid:
        r, c = guess_counts(scores, included, k_plus=kp, k_minus=km)
        if best[0] > 0 and not gdp_rejects(num_canaries=m, guesses=r, correct=c, mu=best[0], significance=significance):
            per_k.append((kp, km, r, c, None))  # cannot beat the best so far (monotone in mu)
            continue
        mu = gdp_lower_bound(num_canaries=m, guesses=r, correct=c, significance=significance)
        per_k.append((kp, km, r, c, mu))
        if mu > best[0]:
            best = (mu, kp, km, r, c)
    return GDPBound(mu_lower=best[0], epsilon_lower=gdp_epsilon(best[0], delta), confidence=confidence, delta=delta,
                    k_plus=best[1], k_minus=best[2], guesses=best[3], correct=best[4], per_k=tuple(per_k))

