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
tries a fixed, public grid of symmetric ``k_plus = k_minus`` values (a function of ``m`` only) and
splits ``alpha`` over them (Bonferroni), so the reported bound holds at the stated confidence
whichever ``k`` gives it. With one fixed ``k`` the grid has one point and no correction applies.

A lower bound says: *this run* is not (epsilon_lower, delta)-DP against *this adversary*, except
with probability at most ``alpha``. It is never evidence that the run *is* private at any epsilon
(docs/privacy.md, "Empirical auditing").

Cross-checked in its formula against google-deepmind/jax_privacy's one-run p-value (same
statistic; code not copied); the tests check hand-computable cases.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.stats import binom

from secfedtl.errors import InputError

__all__ = ["EmpiricalBound", "audit_scores", "epsilon_lower_bound", "guess_counts", "k_grid", "one_run_p_value"]


def _check_counts(num_canaries: int, guesses: int, correct: int) -> None:
    for name, v in (("num_canaries", num_canaries), ("guesses", guesses), ("correct", correct)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise InputError(f"{name} must be a non-negative int, got {v!r}")
    if not correct <= guesses <= num_canaries:
        raise InputError(f"need correct <= guesses <= num_canaries, got {correct}, {guesses}, {num_canaries}")


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

    if correct == 0 or not rejects(0.0):
        return 0.0
    lo, hi = 0.0, epsilon_max
    if rejects(hi):
        return hi
    while hi - lo > tolerance:
        mid = (lo + hi) / 2
        if rejects(mid):
            lo = mid
        else:
            hi = mid
    return lo


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
    fractions = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
    ks = sorted({max(1, int(f * num_canaries)) for f in fractions if max(1, int(f * num_canaries)) * 2 <= num_canaries})
    return tuple(ks)


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
    grid: tuple[int, ...]     #: the k tried (Bonferroni over len(grid))
    per_k: tuple[tuple[int, int, int, float], ...]  #: (k, guesses, correct, bound) for each k

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["grid"] = list(self.grid)
        d["per_k"] = [list(x) for x in self.per_k]
        return d


def audit_scores(scores: Sequence[float], included: Sequence[bool], *, delta: float, confidence: float = 0.95,
                 k: int | None = None) -> EmpiricalBound:
    """The one-run lower bound from canary ``scores`` (higher = more likely "in") and the
    auditor's secret ``included`` coins: the best over :func:`k_grid` (or the one ``k`` given),
    at ``confidence`` after splitting the error over the k tried."""
    if not 0 < confidence < 1:
        raise InputError(f"confidence must be in (0, 1), got {confidence!r}")
    m = len(scores)
    if m < 2:
        raise InputError("need at least 2 canaries")
    grid = (k,) if k is not None else k_grid(m)
    if not grid or any(g < 1 or 2 * g > m for g in grid):
        raise InputError(f"k must be in [1, {m // 2}]")
    significance = (1.0 - confidence) / len(grid)
    best = (0.0, 0, 0, 0)
    per_k = []
    for g in grid:
        r, c = guess_counts(scores, included, k_plus=g, k_minus=g)
        eps = epsilon_lower_bound(num_canaries=m, guesses=r, correct=c, delta=delta, significance=significance)
        per_k.append((g, r, c, eps))
        if eps > best[0]:
            best = (eps, g, r, c)
    return EmpiricalBound(epsilon_lower=best[0], confidence=confidence, delta=delta, num_canaries=m,
                          num_in=int(np.asarray(included, dtype=bool).sum()), k_plus=best[1], k_minus=best[1],
                          guesses=best[2], correct=best[3], grid=tuple(grid), per_k=tuple(per_k))
