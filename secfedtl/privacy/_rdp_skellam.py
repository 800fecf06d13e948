"""Renyi DP of the Poisson-subsampled multi-dimensional Skellam mechanism, in pure Python.

Two published bounds, composed:

* **Skellam** (Agarwal, Kairouz, Liu, "The Skellam Mechanism for Differentially Private Federated
  Learning", NeurIPS 2021, Theorem 3.5): adding i.i.d. ``Sk(mu)`` noise (``Poisson(mu) -
  Poisson(mu)``, variance ``2 mu``) to each coordinate of an integer vector whose neighbouring
  values differ by at most ``l2`` in L2 norm and ``l1`` in L1 norm is ``(alpha, eps(alpha))``-RDP
  for every ``alpha > 1`` with

      eps(alpha) = alpha l2^2 / (4 mu) + min(((2 alpha - 1) l2^2 + 6 l1) / (16 mu^2), 3 l1 / (4 mu)).

  The first term is the Gaussian mechanism's RDP at variance ``2 mu``; the second is what the
  discrete, heavier-tailed noise costs, and vanishes as ``mu`` grows.
* **Poisson subsampling for a general mechanism** (Zhu, Wang, "Poisson Subsampled Renyi
  Differential Privacy", ICML 2019, Theorem 6): if a mechanism is ``(l, eps(l))``-RDP for every
  integer ``l >= 2``, running it on a Poisson sample of rate ``q`` is RDP at every integer
  ``alpha >= 2`` with

      eps_q(alpha) <= log((1-q)^(alpha-1) (alpha q - q + 1)
                          + C(alpha, 2) q^2 (1-q)^(alpha-2) e^eps(2)
                          + 3 sum_{l=3}^{alpha} C(alpha, l) q^l (1-q)^(alpha-l) e^((l-1) eps(l))) / (alpha - 1),

  for add/remove neighbours in both directions. We also use ``eps_q(alpha) <= eps(alpha)`` (Renyi
  divergence is jointly quasi-convex, so subsampling never costs more than the mechanism itself).

RDP is nondecreasing in the order, so at a fractional order ``a`` we report the integer order
``ceil(a)``'s value (a valid, slightly loose bound). The conversion to ``(epsilon, delta)`` is the
same as for the Gaussian (Balle et al. 2020, Theorem 21; :func:`secfedtl.privacy._rdp.epsilon_from_rdp`).
"""

from __future__ import annotations

import math

from secfedtl.privacy._rdp import _log_add

__all__ = ["rdp_poisson_skellam", "rdp_skellam"]


def rdp_skellam(order: float, *, mu: float, l2: float, l1: float) -> float:
    """AKL21 Theorem 3.5: RDP at ``order > 1`` of ``Sk(mu)`` noise on sensitivities ``l2``, ``l1``."""
    if math.isinf(order):
        return math.inf
    gaussian = order * l2 * l2 / (4.0 * mu)
    extra = min(((2.0 * order - 1.0) * l2 * l2 + 6.0 * l1) / (16.0 * mu * mu), 3.0 * l1 / (4.0 * mu))
    return gaussian + extra


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def rdp_poisson_subsampled(order: int, sample_rate: float, base: list[float]) -> float:
    """Zhu-Wang 2019 Theorem 6 at integer ``order >= 2``; ``base[l]`` is the mechanism's RDP at
    integer order ``l`` (``base[0]``, ``base[1]`` unused)."""
    q = sample_rate
    if q >= 1.0:
        return base[order]
    log_1q = math.log1p(-q)
    log_q = math.log(q)
    total = (order - 1) * log_1q + math.log(order * q - q + 1.0)
    total = _log_add(total, _log_comb(order, 2) + 2 * log_q + (order - 2) * log_1q + base[2])
    for ell in range(3, order + 1):
        term = math.log(3.0) + _log_comb(order, ell) + ell * log_q + (order - ell) * log_1q + (ell - 1) * base[ell]
        total = _log_add(total, term)
    return min(total / (order - 1), base[order])


def rdp_poisson_skellam(sample_rate: float, order: float, *, mu: float, l2: float, l1: float) -> float:
    """RDP at ``order`` of ONE step of the Poisson-subsampled Skellam mechanism (see the module
    docstring; fractional orders use the next integer order)."""
    if math.isinf(order):
        return math.inf
    alpha = max(2, math.ceil(order))
    base = [math.nan, math.nan] + [rdp_skellam(ell, mu=mu, l2=l2, l1=l1) for ell in range(2, alpha + 1)]
    return rdp_poisson_subsampled(alpha, sample_rate, base)
