"""Symmetric Skellam noise for distributed DP, sampled with integer arithmetic from a CSPRNG.

The symmetric Skellam distribution ``Sk(mu)`` is the law of ``P1 - P2`` for independent
``P1, P2 ~ Poisson(mu)``: integer-valued, mean 0, variance ``2 mu``, pmf
``p(k) = exp(-2 mu) I_|k|(2 mu)`` (``I`` the modified Bessel function of the first kind). It is
closed under summation, *exactly*: the sum of independent ``Sk(mu_1), ..., Sk(mu_K)`` is
``Sk(mu_1 + ... + mu_K)``. So when K hospitals each add ``Sk(mu / K)`` to their integer-encoded
update, the secure sum carries exactly ``Sk(mu)``, the noise a central curator would have added
(Agarwal, Kairouz, Liu, "The Skellam Mechanism for Differentially Private Federated Learning",
NeurIPS 2021). The discrete Gaussian has no such closure (Kairouz, Liu, Steinke, ICML 2021 bound
how far a sum of discrete Gaussians is from one), which is why secfedtl uses Skellam.

How a sample is drawn, and how exact it is
------------------------------------------
Sampling is inverse-CDF against a table, with integer arithmetic only:

1. Once per ``mu`` (cached): the pmf on ``[-K, K]`` by Miller's backward recurrence for
   ``I_k(2 mu)`` in 60-digit decimal arithmetic, normalised by its own sum, and its CDF rounded
   down to 128-bit integers ``T_j = floor(2**128 F(j))``. ``K`` is chosen so that
   ``P(|Sk(mu)| > K) <= 2**-140`` (Bernstein's inequality for centred Poisson variables), and the
   recurrence starts where the pmf is below ``2**-250``, so its truncation error is below that.
2. Per coordinate: 128 uniform bits ``u`` from a :class:`~secfedtl.crypto.stream.KeyStream`
   (AES-256-CTR keyed from ``os.urandom``); the sample is ``-K + #{j : T_j <= u}``. No floating
   point touches a sample, so there is no floating-point attack surface (Mironov 2012).

The distribution sampled is therefore not ``Sk(mu)`` itself but the table's distribution, whose
total variation distance from ``Sk(mu)`` is at most :func:`sampler_tv_bound` per coordinate:
``(2K + 1) 2**-128`` for the rounding of the table, plus ``2**-139`` for the tails, plus ``2**-150``
for the decimal arithmetic (a generous allowance: 60 digits is about ``2**-199`` relative per
operation). For ``K <= 10**6`` this is below ``2**-106`` per coordinate. A mechanism within total
variation ``eta`` of an ``(epsilon, delta)``-DP one is ``(epsilon, delta + (1 + e^epsilon) eta)``-DP
(not ``delta + eta``), and only the ``h = honest_parties`` shares the guarantee counts need their
exact law, so over ``T`` steps of ``d`` coordinates the sampler adds at most
``(1 + e^epsilon) h T d 2**-106`` to delta: below ``1e-17 (1 + e^epsilon) h`` for ``T d <= 10**15``.
The accountant reports the ideal mechanism's epsilon and docs/privacy.md states this allowance;
it is far below any delta in use.

:func:`skellam_noise` takes the stream explicitly: production code passes
``KeyStream.fresh()`` (label ``"csprng"``); tests may pass ``KeyStream.insecure_seeded(seed)``,
whose label says it is not private.
"""

from __future__ import annotations

import decimal
import functools
import math
from dataclasses import dataclass

import numpy as np

from secfedtl.crypto.stream import KeyStream
from secfedtl.errors import InputError

__all__ = ["MAX_SKELLAM_MU", "SkellamTable", "sampler_tv_bound", "skellam_noise", "skellam_table"]

#: Largest ``mu`` the sampler accepts (standard deviation about 4.5e4; table of about 1.3e6 rows).
MAX_SKELLAM_MU = 1.0e9
_TABLE_TAIL_BITS = 140  # P(|X| > K) <= 2**-140
_START_TAIL_BITS = 250  # the recurrence starts where the pmf is below 2**-250
_DIGITS = 60
_TWO_128 = 1 << 128
_MASK_64 = (1 << 64) - 1


def _tail_index(mu: float, bits: int) -> int:
    """Smallest t with 2 exp(-t^2 / (2 (2 mu + t / 3))) <= 2**-bits (Bernstein, centred Poisson)."""
    log_target = (bits + 1) * math.log(2.0)  # t^2 / (2 (2mu + t/3)) >= log_target
    b = 2.0 * log_target / 3.0
    t = (b + math.sqrt(b * b + 8.0 * log_target * 2.0 * mu)) / 2.0
    return int(math.ceil(t)) + 1


@dataclass(frozen=True, slots=True, eq=False)
class SkellamTable:
    """The inverse-CDF table of ``Sk(mu)`` on ``[-K, K]`` (see the module docstring)."""

    mu: float
    half_width: int  # K
    thresholds_hi: np.ndarray  # high 64 bits of T_j, j = 0 .. 2K - 1 (T_j is the CDF at -K + j)
    thresholds_lo: np.ndarray  # low 64 bits

    def pmf(self) -> np.ndarray:
        """The probabilities the sampler actually uses for ``-K .. K`` (float64, for tests)."""
        t = [0] + [(int(h) << 64) | int(lo) for h, lo in zip(self.thresholds_hi, self.thresholds_lo)] + [_TWO_128]
        return np.array([(b - a) / _TWO_128 for a, b in zip(t[:-1], t[1:])])

    def lookup(self, u_hi: np.ndarray, u_lo: np.ndarray) -> np.ndarray:
        """Samples for 128-bit uniforms ``(u_hi, u_lo)``: ``-K + #{j : T_j <= u}`` (int64)."""
        below = np.searchsorted(self.thresholds_hi, u_hi, side="left")
        through = np.searchsorted(self.thresholds_hi, u_hi, side="right")
        count = below.astype(np.int64)
        for i in np.flatnonzero(through != below):  # u_hi equals some T_j's high word: compare low words
            lo_block = self.thresholds_lo[below[i] : through[i]]
            count[i] += int(np.searchsorted(lo_block, u_lo[i], side="right"))
        return count - self.half_width


def _check_mu(mu: object) -> float:
    if isinstance(mu, bool) or not isinstance(mu, (int, float)):
        raise InputError(f"mu must be a real number, got {type(mu).__name__}")
    value = float(mu)
    if not (math.isfinite(value) and 0.0 < value <= MAX_SKELLAM_MU):
        raise InputError(f"mu must be in (0, {MAX_SKELLAM_MU:g}], got {mu!r}")
    return value


@functools.lru_cache(maxsize=16)
def _table(mu: float) -> SkellamTable:
    k_max = _tail_index(mu, _TABLE_TAIL_BITS)
    start = max(_tail_index(mu, _START_TAIL_BITS), k_max + 16)
    ctx = decimal.Context(prec=_DIGITS, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN)
    inv_mu = ctx.divide(decimal.Decimal(1), decimal.Decimal(mu))  # 2k / x with x = 2 mu
    # Miller: y_{k-1} = y_{k+1} + (k / mu) y_k from y_{start+1} = 0, y_start = 1; y_k is
    # proportional to I_k(2 mu) (the minimal solution), for k = 0 .. k_max.
    y_next, y = decimal.Decimal(0), decimal.Decimal(1)
    kept: list[decimal.Decimal] = [decimal.Decimal(0)] * (k_max + 1)
    for k in range(start, 0, -1):
        if k <= k_max:
            kept[k] = y
        y_next, y = y, ctx.add(y_next, ctx.multiply(ctx.multiply(decimal.Decimal(k), inv_mu), y))
    kept[0] = y
    # CDF over [-K, K] of the normalised pmf, as 128-bit integers.
    body = kept[0] + 2 * sum(kept[1:], decimal.Decimal(0))
    two128 = decimal.Decimal(_TWO_128)
    factor = ctx.divide(two128, body)
    thresholds = []
    running = decimal.Decimal(0)
    for j in range(2 * k_max):  # CDF at -K + j for j = 0 .. 2K-1
        running = ctx.add(running, kept[abs(j - k_max)])
        thresholds.append(int(ctx.multiply(running, factor).to_integral_value(rounding=decimal.ROUND_FLOOR)))
    thresholds = [min(t, _TWO_128 - 1) for t in thresholds]
    hi = np.array([t >> 64 for t in thresholds], dtype=np.uint64)
    lo = np.array([t & _MASK_64 for t in thresholds], dtype=np.uint64)
    hi.setflags(write=False)
    lo.setflags(write=False)
    return SkellamTable(mu=mu, half_width=k_max, thresholds_hi=hi, thresholds_lo=lo)


def skellam_table(mu: float) -> SkellamTable:
    """The (cached) sampling table of ``Sk(mu)``.

    Raises:
        InputError: ``mu`` not in ``(0, MAX_SKELLAM_MU]``.
    """
    return _table(_check_mu(mu))


def sampler_tv_bound(mu: float) -> float:
    """Upper bound on the total variation distance, per coordinate, between what
    :func:`skellam_noise` samples and ``Sk(mu)`` (see the module docstring)."""
    k_max = _tail_index(_check_mu(mu), _TABLE_TAIL_BITS)
    return (2 * k_max + 1) * 2.0**-128 + 2.0**-139 + 2.0**-150


def skellam_noise(size: int, *, mu: float, stream: KeyStream) -> np.ndarray:
    """``size`` independent ``Sk(mu)`` samples (int64; variance ``2 mu``), from ``stream``.

    Pass ``KeyStream.fresh()`` for private noise; :meth:`KeyStream.insecure_seeded` only in tests.

    Raises:
        InputError: ``size`` not a non-negative int, ``mu`` out of range, or ``stream`` not a
            :class:`KeyStream`.
    """
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 0:
        raise InputError(f"size must be a non-negative int, got {size!r}")
    if not isinstance(stream, KeyStream):
        raise InputError(f"stream must be a KeyStream, got {type(stream).__name__}")
    table = skellam_table(mu)
    out = np.empty(int(size), dtype=np.int64)
    chunk = 1 << 18
    for start in range(0, int(size), chunk):
        n = min(chunk, int(size) - start)
        words = stream.uint64(2 * n)
        out[start : start + n] = table.lookup(words[:n], words[n:])
    return out
