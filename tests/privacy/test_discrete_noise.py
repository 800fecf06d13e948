"""Tests for secfedtl.privacy.discrete_noise (Skellam sampling) and secfedtl.crypto.stream.

The reference pmf is scipy's exponentially scaled Bessel function, an implementation independent
of the decimal recurrence the sampler's table comes from."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from scipy.special import ive

from secfedtl.crypto.stream import KeyStream
from secfedtl.errors import CryptoError, InputError
from secfedtl.privacy.discrete_noise import sampler_tv_bound, skellam_noise, skellam_table


def skellam_pmf(k: np.ndarray, mu: float) -> np.ndarray:
    return ive(np.abs(k), 2.0 * mu)  # exp(-2 mu) I_|k|(2 mu)


@pytest.mark.parametrize("mu", [0.05, 0.5, 3.0, 250.0, 12_345.6, 2.0e6])
def test_table_matches_the_skellam_pmf(mu: float) -> None:
    table = skellam_table(mu)
    k = np.arange(-table.half_width, table.half_width + 1)
    pmf = table.pmf()
    assert pmf.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.max(np.abs(pmf - skellam_pmf(k, mu))) < 1e-15
    # the table reaches far enough into the tails that the rest is negligible
    assert 1.0 - skellam_pmf(k, mu).sum() < 1e-15
    assert sampler_tv_bound(mu) < 2.0**-100


def test_the_documented_allowance_holds_for_every_allowed_mu() -> None:
    """docs/privacy.md: below 2**-106 per coordinate for any mu the sampler accepts."""
    from secfedtl.privacy.discrete_noise import MAX_SKELLAM_MU

    assert sampler_tv_bound(MAX_SKELLAM_MU) < 2.0**-106
    assert sampler_tv_bound(1e-9) < sampler_tv_bound(1.0) < sampler_tv_bound(MAX_SKELLAM_MU)


def goodness_of_fit(samples: np.ndarray, mu: float, min_expected: float = 20.0) -> float:
    """Chi-square p-value of ``samples`` against Sk(mu), bins merged until each expects enough."""
    lo, hi = int(samples.min()), int(samples.max())
    k = np.arange(lo, hi + 1)
    expected = skellam_pmf(k, mu) * samples.size
    expected[0] += skellam_pmf(np.arange(lo - 2000, lo), mu).sum() * samples.size
    expected[-1] += skellam_pmf(np.arange(hi + 1, hi + 2001), mu).sum() * samples.size
    observed = np.bincount(samples - lo, minlength=k.size).astype(float)
    obs_bins, exp_bins, o, e = [], [], 0.0, 0.0
    for ob, ex in zip(observed, expected):
        o, e = o + ob, e + ex
        if e >= min_expected:
            obs_bins.append(o)
            exp_bins.append(e)
            o = e = 0.0
    obs_bins[-1] += o
    exp_bins[-1] += e
    exp_arr = np.array(exp_bins) * (samples.size / np.sum(exp_bins))
    return float(stats.chisquare(obs_bins, exp_arr).pvalue)


@pytest.mark.parametrize("mu", [0.7, 40.0, 5000.0])
def test_samples_fit_the_distribution(mu: float) -> None:
    x = skellam_noise(400_000, mu=mu, stream=KeyStream.insecure_seeded(7))
    assert x.dtype == np.int64
    sd = math.sqrt(2 * mu)
    # mean 0, variance 2 mu, excess kurtosis 1/(2 mu): each within 5 standard errors
    assert abs(x.mean()) < 5 * sd / math.sqrt(x.size)
    assert x.var() == pytest.approx(2 * mu, rel=5 * math.sqrt(2 / x.size) * 1.1)
    assert stats.kurtosis(x) == pytest.approx(1 / (2 * mu), abs=5 * math.sqrt(24 / x.size))
    assert goodness_of_fit(x, mu) > 1e-4


def test_fresh_noise_fits_too_and_never_repeats() -> None:
    x = skellam_noise(200_000, mu=10.0, stream=KeyStream.fresh())
    assert goodness_of_fit(x, 10.0) > 1e-6  # fresh randomness: fails by chance once in a million runs
    assert not np.array_equal(x[:64], skellam_noise(64, mu=10.0, stream=KeyStream.fresh()))


def test_shares_sum_to_the_target_distribution() -> None:
    """Closure under summation: K parties' Sk(mu / K) shares add up to Sk(mu)."""
    mu, parties = 300.0, 7
    total = sum(skellam_noise(300_000, mu=mu / parties, stream=KeyStream.insecure_seeded(100 + i)) for i in range(parties))
    assert total.var() == pytest.approx(2 * mu, rel=0.015)
    assert goodness_of_fit(total, mu) > 1e-4
    # ... and not the distribution of a single share
    assert goodness_of_fit(total, mu / parties, min_expected=5.0) < 1e-12


def test_seeded_streams_are_reproducible_and_labelled() -> None:
    a = skellam_noise(1000, mu=5.0, stream=KeyStream.insecure_seeded(3))
    b = skellam_noise(1000, mu=5.0, stream=KeyStream.insecure_seeded(3))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, skellam_noise(1000, mu=5.0, stream=KeyStream.insecure_seeded(4)))
    assert KeyStream.insecure_seeded(3).label == "insecure_seeded" and not KeyStream.insecure_seeded(3).certified
    assert KeyStream.fresh().label == "csprng" and KeyStream.fresh().certified


def test_a_stream_never_returns_the_same_bits_twice() -> None:
    stream = KeyStream.insecure_seeded(1)
    first, second = stream.read(64), stream.read(64)
    assert first != second
    whole = KeyStream.insecure_seeded(1).read(128)
    assert whole == first + second
    u = KeyStream.fresh().uniform(100_000)
    assert 0.0 <= u.min() and u.max() < 1.0 and abs(u.mean() - 0.5) < 0.01


def test_fill_writes_the_bytes_read_would_return_in_place() -> None:
    """``fill`` (the encoding's rounding draws) is the same stream as ``read``: same bytes, same
    position afterwards, across its 1 MiB chunks and with an odd-sized tail."""
    size = (1 << 20) + 4099
    expected = KeyStream.insecure_seeded(6).read(2 * size + 16)
    stream = KeyStream.insecure_seeded(6)
    out = np.empty(size, dtype=np.uint16)
    assert stream.fill(out) is out
    assert out.tobytes() == expected[: 2 * size]
    assert stream.uint16(8).tobytes() == expected[2 * size :]
    with pytest.raises(CryptoError):
        stream.fill(np.empty((4, 4), dtype=np.uint16)[:, ::2])  # not contiguous
    frozen = np.zeros(4, dtype=np.uint16)
    frozen.setflags(write=False)
    with pytest.raises(CryptoError):
        stream.fill(frozen)


def test_lookup_resolves_ties_in_the_high_word() -> None:
    """The rare path: a uniform whose high 64 bits equal a threshold's must compare low words."""
    table = skellam_table(0.05)  # tiny mu: thresholds cluster near the top in the far tail
    hi, lo = table.thresholds_hi, table.thresholds_lo
    j = table.half_width + 3  # some threshold T_j
    u_hi = np.array([hi[j], hi[j], hi[j]], dtype=np.uint64)
    u_lo = np.array([lo[j], lo[j] - np.uint64(1) if lo[j] > 0 else lo[j], np.uint64(2**64 - 1)], dtype=np.uint64)
    got = table.lookup(u_hi, u_lo)
    full = [(int(h) << 64) | int(l_) for h, l_ in zip(hi, lo)]
    for value, uh, ul in zip(got, u_hi, u_lo):
        u = (int(uh) << 64) | int(ul)
        assert value == -table.half_width + sum(t <= u for t in full)


@pytest.mark.parametrize("mu", [0.0, -1.0, float("nan"), float("inf"), 2e9, True, "3"])
def test_bad_mu(mu: object) -> None:
    with pytest.raises(InputError):
        skellam_noise(3, mu=mu, stream=KeyStream.fresh())  # type: ignore[arg-type]


def test_bad_size_and_stream() -> None:
    with pytest.raises(InputError):
        skellam_noise(-1, mu=1.0, stream=KeyStream.fresh())
    with pytest.raises(InputError):
        skellam_noise(3, mu=1.0, stream=np.random.default_rng(0))  # type: ignore[arg-type]
    with pytest.raises(CryptoError):
        KeyStream.insecure_seeded(-1)
    assert skellam_noise(0, mu=1.0, stream=KeyStream.fresh()).shape == (0,)
