"""Renyi DP of the Poisson-subsampled multi-dimensional Skellam mechanism, in pure Python.

Three steps (docs/privacy.md, "The theorems the accountant uses", has the proofs):

* **Skellam** (Agarwal, Kairouz, Liu, "The Skellam Mechanism for Differentially Private Federated
  Learning", NeurIPS 2021, Theorem 3.5): adding i.i.d. ``Sk(mu)`` noise (``Poisson(mu) -
  Poisson(mu)``, variance ``2 mu``) to each coordinate of an integer vector whose neighbouring
  values differ by at most ``l2`` in L2 norm and ``l1`` in L1 norm is ``(alpha, eps(alpha))``-RDP
  for every ``alpha > 1`` with

      eps(alpha) = alpha l2^2 / (4 mu) + min(((2 alpha - 1) l2^2 + 6 l1) / (16 mu^2), 3 l1 / (4 mu)).

  The first term is the Gaussian mechanism's RDP at variance ``2 mu``; the second is what the
  discrete, heavier-tailed noise costs, and vanishes as ``mu`` grows.
* **The record's presence, exactly** (the binomial expansion of Mironov, Talwar, Zhang, "Renyi
  Differential Privacy of the Sampled Gaussian Mechanism", 2019, Section 3, which holds for any
  pair of distributions): with ``P`` the output law without the record and ``Q`` the law with it
  sampled, at integer ``alpha >= 2``

      exp((alpha-1) D_alpha((1-q) P + q Q || P)) = sum_{l=0}^{alpha} C(alpha, l) (1-q)^(alpha-l) q^l E_P[(Q/P)^l]

  and ``E_P[(Q/P)^l] = exp((l-1) D_l(Q || P)) <= exp((l-1) eps(l))`` for ``l >= 2`` (1 for
  ``l = 0, 1``). Every term is positive, so bounding each term bounds the sum.
* **The record's absence is never worse** (:func:`absent_never_worse` checks the elementary case):
  for a *symmetric* pair -- a measure-preserving involution swaps ``P`` and ``Q``; for noise
  symmetric about 0 it is ``x -> Delta - x`` -- ``D_alpha(P || (1-q) P + q Q) <= D_alpha((1-q) P + q Q || P)``
  for every ``alpha > 1`` and ``q`` in [0, 1]. Proof: the privacy-loss law of a symmetric pair is a
  mixture of randomized-response laws (atoms ``+l, -l`` with weights ``1 : e^l``); both sides are
  linear in that law; for one randomized-response component, with ``Y = 1 - q + q Q/P`` taking the
  values ``x >= 1 >= y`` (``x y >= 1``, mean 1), the difference of the two sides is proportional
  to ``h(y) = (1 - y) f(x) + (x - 1) f(y)`` with ``f(z) = z^alpha - z^(1-alpha)``, which is 0 at
  ``y = 1/x`` and ``y = 1`` and concave in between (``f'' < 0`` on (0, 1)), hence ``>= 0``.

We also use ``eps_q(alpha) <= eps(alpha)`` (Renyi divergence is jointly quasi-convex). RDP is
nondecreasing in the order, so at a fractional order ``a`` we report the integer order
``ceil(a)``'s value (a valid, slightly loose bound). The conversion to ``(epsilon, delta)`` is the
same as for the Gaussian (Balle et al. 2020, Theorem 21; :func:`secfedtl.privacy._rdp.epsilon_from_rdp`).

Until this module's first revision was replaced, the subsampling step used Zhu and Wang's general
theorem (ICML 2019, Theorem 6: a factor 3 on every term ``l >= 3``), which needed twice the noise
of the Gaussian at sample rates near 0.1; the bound here is never larger than that one (term by
term), so ledgers charged under it stay valid, with room to spare.
"""

from __future__ import annotations

import math

from secfedtl.privacy._rdp import _log_add

__all__ = ["absent_never_worse", "rdp_poisson_skellam", "rdp_poisson_subsampled", "rdp_skellam"]


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
    """RDP at integer ``order >= 2`` of a Poisson-subsampled mechanism whose neighbouring output
    laws form a symmetric pair (see the module docstring); ``base[l]`` is the mechanism's RDP at
    integer order ``l`` (``base[0]``, ``base[1]`` unused)."""
    q = sample_rate
    if q >= 1.0:
        return base[order]
    log_1q = math.log1p(-q)
    log_q = math.log(q)
    # l = 0 and l = 1 together: (1-q)^alpha + alpha q (1-q)^(alpha-1) = (1-q)^(alpha-1) (1 + (alpha-1) q)
    total = (order - 1) * log_1q + math.log1p((order - 1) * q)
    for ell in range(2, order + 1):
        total = _log_add(total, _log_comb(order, ell) + ell * log_q + (order - ell) * log_1q + (ell - 1) * base[ell])
    return min(total / (order - 1), base[order])


def rdp_poisson_skellam(sample_rate: float, order: float, *, mu: float, l2: float, l1: float) -> float:
    """RDP at ``order`` of ONE step of the Poisson-subsampled Skellam mechanism (see the module
    docstring; fractional orders use the next integer order)."""
    if math.isinf(order):
        return math.inf
    alpha = max(2, math.ceil(order))
    base = [math.nan, math.nan] + [rdp_skellam(ell, mu=mu, l2=l2, l1=l1) for ell in range(2, alpha + 1)]
    return rdp_poisson_subsampled(alpha, sample_rate, base)


def absent_never_worse(order: float, sample_rate: float, privacy_loss: float) -> tuple[float, float]:
    """The lemma's elementary case, computed directly: for the randomized-response pair with
    privacy loss ``l = privacy_loss >= 0`` (``P = (1, e^l) / (1 + e^l)``, ``Q`` its mirror image),
    returns ``(log E_P[Y^alpha], log E_P[Y^(1-alpha)])`` with ``Y = 1 - q + q Q/P``: ``(alpha - 1)``
    times the divergence with the record present and absent. The lemma says the first is never
    smaller; tests check it on a grid, independently of the proof."""
    q, a, u = sample_rate, float(order), math.exp(privacy_loss)
    log_x = math.log1p(q * (u - 1.0))  # Y where Q/P = u (P-probability 1 / (1 + u))
    log_y = math.log1p(q * (1.0 / u - 1.0))  # Y where Q/P = 1/u (P-probability u / (1 + u))
    norm = math.log1p(u)
    present = _log_add(a * log_x, privacy_loss + a * log_y) - norm
    absent = _log_add((1.0 - a) * log_x, privacy_loss + (1.0 - a) * log_y) - norm
    return present, absent
