"""Renyi DP of the Poisson-subsampled Gaussian mechanism, in pure Python (no torch import).

Written from the analysis in Mironov, Talwar, Zhang, "Renyi Differential Privacy of the Sampled
Gaussian Mechanism" (2019), section 3.3, with the (epsilon, delta) conversion of Balle et al.,
"Hypothesis Testing Interpretations and Renyi Differential Privacy" (2020), Theorem 21. Opacus
implements the same formulas; the test suite cross-checks the two to 1e-9 relative.

It lives apart from Opacus so that ``secfedtl audit`` (RDP only) does not import torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["epsilon_from_rdp", "rdp_poisson_gaussian"]


def _log_add(a: float, b: float) -> float:
    """log(exp(a) + exp(b))."""
    hi, lo = max(a, b), min(a, b)
    if lo == -math.inf:
        return hi
    return hi + math.log1p(math.exp(lo - hi))


def _log_sub(a: float, b: float) -> float:
    """log(exp(a) - exp(b)) for a >= b."""
    if b == -math.inf:
        return a
    if a <= b:
        return -math.inf  # the terms cancelled (within rounding)
    diff = a - b
    if diff > 700:  # exp(diff) - 1 == exp(diff) in floating point
        return a
    return math.log(math.expm1(diff)) + b


def _log_erfc(x: float) -> float:
    """log(erfc(x)), accurate also where erfc underflows."""
    if x < 20.0:
        value = math.erfc(x)
        if value > 0.0:
            return math.log(value)
    # Asymptotic series erfc(x) ~ exp(-x^2) / (x sqrt(pi)) * (1 - 1/(2x^2) + 3/(4x^4) - 15/(8x^6))
    x2 = x * x
    series = 1.0 - 1.0 / (2 * x2) + 3.0 / (4 * x2 * x2) - 15.0 / (8 * x2 * x2 * x2)
    return -x2 - math.log(x) - 0.5 * math.log(math.pi) + math.log(series)


def _log_a_integer(q: float, sigma: float, alpha: int) -> float:
    """log A_alpha for integer alpha (binomial expansion, MTZ19 section 3.3)."""
    log_a = -math.inf
    for i in range(alpha + 1):
        term = (
            math.log(math.comb(alpha, i))
            + i * math.log(q)
            + (alpha - i) * math.log1p(-q)
            + (i * i - i) / (2.0 * sigma * sigma)
        )
        log_a = _log_add(log_a, term)
    return log_a


def _log_a_fractional(q: float, sigma: float, alpha: float) -> float:
    """log A_alpha for fractional alpha (two-sided series, MTZ19 section 3.3)."""
    log_a0 = log_a1 = -math.inf
    z0 = sigma * sigma * math.log(1.0 / q - 1.0) + 0.5
    coef = 1.0  # binom(alpha, i), built up term by term
    i = 0
    while True:
        j = alpha - i
        log_coef = math.log(abs(coef))
        log_t0 = log_coef + i * math.log(q) + j * math.log1p(-q)
        log_t1 = log_coef + j * math.log(q) + i * math.log1p(-q)
        log_e0 = math.log(0.5) + _log_erfc((i - z0) / (math.sqrt(2.0) * sigma))
        log_e1 = math.log(0.5) + _log_erfc((z0 - j) / (math.sqrt(2.0) * sigma))
        log_s0 = log_t0 + (i * i - i) / (2.0 * sigma * sigma) + log_e0
        log_s1 = log_t1 + (j * j - j) / (2.0 * sigma * sigma) + log_e1
        if coef > 0:
            log_a0 = _log_add(log_a0, log_s0)
            log_a1 = _log_add(log_a1, log_s1)
        else:
            log_a0 = _log_sub(log_a0, log_s0)
            log_a1 = _log_sub(log_a1, log_s1)
        if max(log_s0, log_s1) < -30:
            break
        coef *= (alpha - i) / (i + 1)
        i += 1
    return _log_add(log_a0, log_a1)


def rdp_poisson_gaussian(sample_rate: float, noise_multiplier: float, order: float) -> float:
    """RDP at ``order`` of ONE step of the Poisson-subsampled Gaussian mechanism."""
    if math.isinf(order):
        return math.inf
    if sample_rate == 1.0:
        return order / (2.0 * noise_multiplier**2)
    if float(order).is_integer():
        log_a = _log_a_integer(sample_rate, noise_multiplier, int(order))
    else:
        log_a = _log_a_fractional(sample_rate, noise_multiplier, order)
    return log_a / (order - 1.0)


def epsilon_from_rdp(orders: Sequence[float], rdp: Sequence[float], delta: float) -> float:
    """Smallest epsilon over ``orders`` (Balle et al. 2020, Theorem 21)."""
    best = math.inf
    for order, value in zip(orders, rdp, strict=True):
        if order <= 1 or math.isnan(value):
            continue
        eps = (
            value
            - (math.log(delta) + math.log(order)) / (order - 1.0)
            + math.log((order - 1.0) / order)
        )
        best = min(best, eps)
    return max(best, 0.0)
