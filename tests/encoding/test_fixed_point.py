"""secfedtl.encoding.fixed_point: sums decode within the stated error bound, stochastic
rounding is unbiased, bad inputs raise EncodingError, wrap-around configs raise ConfigError."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secfedtl.encoding import FixedPointEncoding
from secfedtl.errors import ConfigError, EncodingError

BITS = [16, 20, 32, 48, 64]
FINITE = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)


@st.composite
def problems(draw):
    bits = draw(st.sampled_from(BITS))
    n = draw(st.integers(1, 12))
    max_weight = draw(st.sampled_from([1, 3, 100]))
    clip = draw(st.sampled_from([0.01, 1.0, 3.5, 100.0]))
    try:
        enc = FixedPointEncoding(clip=clip, bits=bits, num_clients=n, max_weight=max_weight)
    except ConfigError:
        enc = FixedPointEncoding(clip=clip, bits=64, num_clients=n, max_weight=max_weight)
    m = draw(st.integers(1, 8))
    xs = [np.array(draw(st.lists(FINITE, min_size=m, max_size=m))) for _ in range(n)]
    ws = [draw(st.integers(0, max_weight)) for _ in range(n)]
    return enc, xs, ws


def _exact_clipped_weighted_sum(enc, xs, ws):
    m = xs[0].size
    out = [Fraction(0)] * m
    for x, w in zip(xs, ws):
        for i in range(m):
            v = min(max(float(x[i]), -enc.clip), enc.clip)
            out[i] += Fraction(v) * w
    return out


@settings(max_examples=150, deadline=None)
@given(problems(), st.integers(0, 2**32))
def test_decoded_sum_within_error_bound(problem, seed):
    enc, xs, ws = problem
    rng = np.random.default_rng(seed)
    total = np.zeros(xs[0].size + 1, dtype=enc.dtype)
    for x, w in zip(xs, ws):
        field = enc.encode(x, weight=w, rng=rng)
        assert field.dtype == enc.dtype and field.shape == (x.size + 1,)
        if enc.bits < np.dtype(enc.dtype).itemsize * 8:
            assert int(field.max()) < enc.modulus
        total += field  # wraps mod the word size
    enc.reduce(total)
    decoded, weight_total = enc.decode_sum(total)
    assert weight_total == sum(ws)
    bound = enc.error_bound(len(xs))
    exact = _exact_clipped_weighted_sum(enc, xs, ws)
    for i, ref in enumerate(exact):
        # against the exact rational sum, and against the correctly rounded float sum
        assert abs(Fraction(float(decoded[i])) - ref) <= Fraction(bound), (i, enc)
        assert abs(float(decoded[i]) - float(ref)) <= bound


@pytest.mark.parametrize("bits", BITS)
def test_extreme_inputs_do_not_wrap(bits):
    n = 5
    enc = FixedPointEncoding(clip=2.0, bits=bits, num_clients=n, max_weight=4)
    rng = np.random.default_rng(1)
    for sign in (1.0, -1.0):
        x = np.full(3, sign * 1e300)  # clipped to +-clip
        total = sum(enc.encode(x, weight=4, rng=rng) for _ in range(n))
        total = enc.reduce(np.asarray(total, dtype=enc.dtype))
        decoded, wt = enc.decode_sum(total)
        assert wt == 4 * n
        np.testing.assert_allclose(decoded, sign * 2.0 * 4 * n, atol=enc.error_bound(n))


@pytest.mark.parametrize("bits", [16, 32])
def test_stochastic_rounding_is_unbiased(bits):
    enc = FixedPointEncoding(clip=1.0, bits=bits, num_clients=3)
    unit = 1.0 / enc.scale
    # values that sit 0.1, 0.5 and 0.9 of the way between two grid points
    x = np.array([0.1 * unit, 0.5 * unit, 0.9 * unit, -0.3 * unit, 17.25 * unit])
    rng = np.random.default_rng(12345)
    trials = 20000
    acc = np.zeros(x.size)
    for _ in range(trials):
        f = enc.encode(x, rng=rng)
        acc += enc.decode_sum(f)[0]
    mean = acc / trials
    # each coordinate: Bernoulli(p) * unit; std of the mean <= 0.5 unit / sqrt(trials)
    tol = 6 * 0.5 * unit / math.sqrt(trials)
    np.testing.assert_allclose(mean, x, atol=tol)
    # rounding to nearest would give 0, 0 or 1, 1, 0, 17: the mean must differ from that
    assert abs(mean[0] - 0.1 * unit) < abs(mean[0] - 0.0) and abs(mean[2] - 0.9 * unit) < abs(mean[2] - unit)


def test_every_encoding_is_within_one_unit():
    enc = FixedPointEncoding(clip=1.0, bits=20, num_clients=4)
    rng = np.random.default_rng(7)
    x = rng.uniform(-1, 1, 1000)
    decoded = enc.decode_sum(enc.encode(x, rng=rng))[0]
    assert np.all(np.abs(decoded - x) < 1 / enc.scale)


@pytest.mark.parametrize("bad", [
    np.array([0.0, np.nan]), np.array([np.inf]), np.array([-np.inf, 1.0]),
    np.zeros((2, 2)), np.float64(1.0), np.array(["a"]), np.array([1 + 1j]),
])
def test_bad_values_raise(bad):
    enc = FixedPointEncoding(clip=1.0, bits=32, num_clients=3)
    with pytest.raises(EncodingError):
        enc.encode(bad, rng=np.random.default_rng(0))


@pytest.mark.parametrize("weight", [-1, 3, 1.0, True, "1", None])
def test_bad_weights_raise(weight):
    enc = FixedPointEncoding(clip=1.0, bits=32, num_clients=3, max_weight=2)
    with pytest.raises(EncodingError):
        enc.encode(np.zeros(3), weight=weight, rng=np.random.default_rng(0))


def test_numpy_integer_weight_is_accepted():
    enc = FixedPointEncoding(clip=1.0, bits=32, num_clients=3, max_weight=2)
    assert int(enc.encode(np.zeros(3), weight=np.int64(2))[-1]) == 2


def test_decode_rejects_wrong_shapes_and_dtypes():
    enc = FixedPointEncoding(clip=1.0, bits=32, num_clients=3)
    for bad in (np.zeros(3, dtype=np.uint64), np.zeros((2, 2), dtype=np.uint32), np.zeros(0, dtype=np.uint32)):
        with pytest.raises(EncodingError):
            enc.decode_sum(bad)


@pytest.mark.parametrize("bits", BITS)
def test_accepted_bit_widths(bits):
    enc = FixedPointEncoding(clip=1.0, bits=bits, num_clients=10)
    assert enc.modulus == 2**bits
    assert enc.dtype == (np.uint32 if bits <= 32 else np.uint64)
    assert math.log2(enc.scale).is_integer()
    limit = 2 ** (bits - 1) - 1
    assert 10 * (enc.clip * enc.scale + 1) <= limit  # chosen scale cannot wrap
    assert 10 * (enc.clip * enc.scale * 2 + 1) > limit  # and it is the largest power of two


@pytest.mark.parametrize("kwargs", [
    dict(clip=1.0, bits=7, num_clients=3),
    dict(clip=1.0, bits=65, num_clients=3),
    dict(clip=1.0, bits=32.0, num_clients=3),
    dict(clip=0.0, bits=32, num_clients=3),
    dict(clip=-1.0, bits=32, num_clients=3),
    dict(clip=math.inf, bits=32, num_clients=3),
    dict(clip=math.nan, bits=32, num_clients=3),
    dict(clip=1.0, bits=32, num_clients=0),
    dict(clip=1.0, bits=32, num_clients=3, max_weight=0),
    dict(clip=1.0, bits=16, num_clients=40000),  # even the weights wrap
    dict(clip=1e9, bits=16, num_clients=100),    # no useful precision
    dict(clip=1.0, bits=32, num_clients=3, scale=0.0),
    dict(clip=1.0, bits=32, num_clients=3, scale=math.inf),
])
def test_bad_configs_raise(kwargs):
    with pytest.raises(ConfigError):
        FixedPointEncoding(**kwargs)


@pytest.mark.parametrize("bits", BITS)
def test_explicit_scale_that_would_wrap_is_refused(bits):
    n, clip, w = 7, 1.5, 3
    auto = FixedPointEncoding(clip=clip, bits=bits, num_clients=n, max_weight=w)
    FixedPointEncoding(clip=clip, bits=bits, num_clients=n, max_weight=w, scale=auto.scale)
    with pytest.raises(ConfigError):
        FixedPointEncoding(clip=clip, bits=bits, num_clients=n, max_weight=w, scale=auto.scale * 4)
    limit = 2 ** (bits - 1) - 1
    # the smallest scale that lets n clipped values wrap
    # the smallest float scale at which n clipped values can wrap, found in exact arithmetic
    from fractions import Fraction

    wrap_scale = (limit / n) / (w * clip)
    while n * (Fraction(w) * Fraction(clip) * Fraction(wrap_scale) + 1) <= limit:
        wrap_scale = math.nextafter(wrap_scale, math.inf)
    with pytest.raises(ConfigError):
        FixedPointEncoding(clip=clip, bits=bits, num_clients=n, max_weight=w, scale=wrap_scale)



def test_automatic_scale_never_wraps_at_64_bits_with_one_client():
    """Found by hypothesis: float rounding made the automatic scale 2**63 for one client at
    64 bits, so a value at the clip wrapped to the opposite sign."""
    enc = FixedPointEncoding(clip=1.0, bits=64, num_clients=1, max_weight=1)
    values = np.array([1.0, -1.0, 0.5])
    total, weight = enc.decode_sum(enc.encode(values, weight=1, rng=np.random.default_rng(0)))
    assert weight == 1 and np.max(np.abs(total - values)) <= enc.error_bound(1)
