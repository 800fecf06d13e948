"""Tests for secfedtl.encoding.distributed: rotation, conditional rounding, wrap, decode, the bit rule."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.linalg import hadamard

from secfedtl.crypto.stream import KeyStream
from secfedtl.encoding.distributed import (
    DistributedEncoding,
    _hadamard,
    choose_bits,
    inflated_l2_bound,
    plan_encoding,
    rotation_signs,
    step_rotation_seed,
)
from secfedtl.errors import ConfigError, EncodingError

SEED = b"job-seed|round=3|step=17"


def clipped(grads: np.ndarray, clip: float) -> np.ndarray:
    norms = np.linalg.norm(grads, axis=1, keepdims=True)
    return grads * np.minimum(1.0, clip / np.maximum(norms, 1e-300))


def test_hadamard_matches_the_matrix_and_rotation_is_orthogonal() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 16))
    assert np.allclose(_hadamard(x.copy()), x @ hadamard(16).T)
    enc = DistributedEncoding(dimension=11, clip_norm=1.0, scale=1.0, bits=32)
    signs = rotation_signs(16, SEED)
    rows = rng.normal(size=(4, 11))
    rotated = enc._rotate_rows(rows, signs)
    assert rotated.shape == (4, 16)
    assert np.allclose(np.linalg.norm(rotated, axis=1), np.linalg.norm(rows, axis=1))


def test_rotation_signs_are_public_and_per_seed() -> None:
    a = rotation_signs(1 << 12, SEED)
    assert np.array_equal(a, rotation_signs(1 << 12, SEED))
    assert not np.array_equal(a, rotation_signs(1 << 12, SEED + b"!"))
    assert set(np.unique(a)) == {-1.0, 1.0} and abs(a.mean()) < 0.1
    with pytest.raises(EncodingError):
        rotation_signs(8, b"")


@settings(max_examples=40, deadline=None)
@given(
    dimension=st.integers(1, 300),
    batch=st.integers(1, 20),
    clip=st.floats(0.01, 10.0),
    scale=st.floats(0.5, 500.0),
    rotate=st.booleans(),
    seed=st.integers(0, 2**32),
)
def test_every_rounded_example_respects_the_norm_bound(dimension, batch, clip, scale, rotate, seed) -> None:
    enc = DistributedEncoding(dimension=dimension, clip_norm=clip, scale=scale, bits=40, rotate=rotate)
    rng = np.random.default_rng(seed)
    grads = rng.normal(size=(batch, dimension)) * rng.uniform(0.01, 100.0)
    rows = enc._rotate_rows(clipped(grads, clip) * scale, rotation_signs(enc.padded_dimension, SEED) if rotate else None)
    rounded, _ = enc.round_examples(rows, KeyStream.insecure_seeded(seed))
    norms_sq = np.einsum("ij,ij->i", rounded, rounded)
    assert np.all(norms_sq <= enc.l2_bound**2 + 1e-9)
    assert np.all(np.abs(rounded - rows) < 1.0)  # each coordinate is rounded to a neighbour
    assert np.all(np.abs(rounded).sum(axis=1) <= enc.l1_bound + 1e-9)


def test_failed_draws_fall_back_to_rounding_toward_zero() -> None:
    # beta close to 1: the bound barely exceeds the norm, most unconditional draws fail
    enc = DistributedEncoding(dimension=256, clip_norm=1.0, scale=8.0, bits=32, rotate=False,
                              rounding_beta=0.999999, max_tries=1)
    rows = np.full((50, 256), 0.5)  # norm 8: E|rounded|^2 = 64 + 256/4, right at the bound
    rounded, fallbacks = enc.round_examples(rows, KeyStream.insecure_seeded(5))
    assert 5 < fallbacks < 45
    assert np.all(np.einsum("ij,ij->i", rounded, rounded) <= enc.l2_bound**2)
    assert np.sum(np.all(rounded == 0, axis=1)) == fallbacks  # rounded toward zero


def test_tiny_negative_values_round_to_zero_not_minus_one() -> None:
    """floor(-1e-20) = -1 and its fraction is exactly 1.0 in float64: the threshold must be capped
    below 2**32 (a cast of 2**32 to uint32 is 0, which rounded every such value to -1: a bias of
    -1 on every near-zero negative coordinate of a rotated, well-fitted example)."""
    enc = DistributedEncoding(dimension=64, clip_norm=100.0, scale=1.0, bits=32, rotate=False)
    row = np.full((3, 64), -1e-20)
    with np.errstate(invalid="raise"):
        rounded, _ = enc.round_examples(row, KeyStream.insecure_seeded(4))
    assert np.count_nonzero(rounded) == 0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_norm_check_is_exact_on_the_integer_vector(dtype) -> None:
    """``_squared_norms(rows, b) > b`` decides ``sum r_j^2 > bound`` exactly (Python integers as the reference), for
    rows whose squares are far beyond float32's exact range, right at the bound, and for a bound
    above 2**53 (the int64 branch, within the 2**62 that ``__post_init__`` guarantees)."""
    rng = np.random.default_rng(3)
    for high, width in ((2**12, 4096), (2**23, 64), (2**28, 16)):  # the last: bound above 2**53
        rows = rng.integers(-high, high, size=(40, width)).astype(dtype)
        exact = [sum(int(v) ** 2 for v in row) for row in rows.astype(np.int64)]
        for bound_sq in (int(np.median(exact)), exact[0], exact[0] - 1, exact[1] + 1):
            got = DistributedEncoding._squared_norms(rows, bound_sq) > bound_sq
            assert got.tolist() == [e > bound_sq for e in exact]


def test_every_summed_vector_is_within_the_l1_bound_exactly() -> None:
    """``l1_bound = min(l2^2, sqrt(n) l2)`` is a float and can land one ulp below the L1 norm of an
    integer vector the exact L2 check accepts: here (n = 6, no rotation) ``(1056,) * 6`` has
    squared L2 norm exactly ``floor(l2_bound^2)`` and L1 norm 6336, one ulp above
    ``l1_bound = 6335.999999999999``; rows at the clip round to it about a quarter of the time.
    The ledger's l1_bound must bound every summed vector exactly (Python integers as the reference)."""
    enc = DistributedEncoding(dimension=6, clip_norm=1.0, scale=2586.1606900123425, bits=40, rotate=False)
    assert 6 * 1056**2 <= math.floor(Fraction(enc.l2_bound) ** 2) and Fraction(enc.l1_bound) < 6 * 1056
    grads = np.full((200, 6), 1.0 / math.sqrt(6.0))  # norm 1: at the clip
    rows = enc._rotate_rows(grads, None, factor=enc._clip_factors(grads))
    rounded, _ = enc.round_examples(rows, KeyStream.insecure_seeded(6))
    l1, bound_sq = Fraction(enc.l1_bound), math.floor(Fraction(enc.l2_bound) ** 2)
    for row in rounded.tolist():
        assert sum(abs(v) for v in row) <= l1
        assert sum(v * v for v in row) <= bound_sq
    assert np.all(np.abs(rounded - rows) < 1.0)  # still rounded to neighbours
    total = enc.encode_examples(grads, rotation_seed=SEED, stream=KeyStream.insecure_seeded(6))
    assert np.array_equal(total, rounded.sum(axis=0))  # and that is what the share sums


def test_encode_examples_rounds_exactly_as_round_examples() -> None:
    """The production path (chunked, preallocated, float32) sums the same integer vectors that
    ``round_examples`` returns for the same rows and the same stream, so the bound tests above
    are tests of what is sent."""
    enc = DistributedEncoding(dimension=300, clip_norm=1.0, scale=5000.0, bits=32)
    rng = np.random.default_rng(8)
    grads = (rng.normal(size=(12, 300)) * rng.uniform(0.01, 3.0, size=(12, 1))).astype(np.float32)
    total = enc.encode_examples(grads, rotation_seed=SEED, stream=KeyStream.insecure_seeded(2))
    signs = rotation_signs(enc.padded_dimension, SEED)
    rows = enc._rotate_rows(grads, signs, factor=enc._clip_factors(grads))
    assert rows.dtype == np.float32
    rounded, _ = enc.round_examples(rows, KeyStream.insecure_seeded(2))
    assert np.array_equal(total, rounded.sum(axis=0))
    assert np.all(np.einsum("ij,ij->i", rounded, rounded) <= enc.l2_bound**2)
    assert np.all(np.abs(rounded).sum(axis=1) <= enc.l1_bound)
    # several chunks (the work arrays are reused): the sum is still within rounding of the truth
    many = (rng.normal(size=(200, 300)) * 0.05).astype(np.float32)
    total = enc.encode_examples(many, rotation_seed=SEED, stream=KeyStream.insecure_seeded(4))
    decoded = enc.decode_sum(enc.wrap(total), rotation_seed=SEED)
    assert np.linalg.norm(decoded - clipped(many.astype(np.float64), 1.0).sum(axis=0)) * enc.scale <= 200 * math.sqrt(512)


def test_large_coordinates_round_to_a_neighbour_within_the_bound() -> None:
    """Coordinates near 2**20 (float32 keeps only 3 fraction bits there): still an integer
    neighbour, still within the bound, and unbiased to within float32's resolution."""
    enc = DistributedEncoding(dimension=4, clip_norm=1.0, scale=2.0**21, bits=40, rotate=False)
    row = np.array([[2.0**20 + 0.25, -(2.0**20) - 0.625, 1000.5, -0.125]], dtype=np.float32)
    stream = KeyStream.insecure_seeded(11)
    draws = np.array([enc.round_examples(row, stream)[0][0] for _ in range(3000)])
    assert np.all(np.abs(draws - row[0].astype(np.float64)) < 1.0)
    assert np.all(np.einsum("ij,ij->i", draws, draws) <= enc.l2_bound**2)
    assert np.allclose(draws.mean(axis=0), row[0], atol=0.04)


def test_rounding_is_unbiased() -> None:
    enc = DistributedEncoding(dimension=8, clip_norm=100.0, scale=1.0, bits=32, rotate=False)
    row = np.array([[0.25, -0.75, 3.5, -2.1, 0.0, 7.9, -0.01, 1.0]])
    stream = KeyStream.insecure_seeded(9)
    mean = np.mean([enc.round_examples(row, stream)[0][0] for _ in range(4000)], axis=0)
    assert np.allclose(mean, row[0], atol=0.03)


@pytest.mark.parametrize("rotate", [True, False])
def test_decode_of_the_sum_recovers_the_clipped_sum(rotate: bool) -> None:
    rng = np.random.default_rng(1)
    enc = DistributedEncoding(dimension=1000, clip_norm=1.0, scale=400.0, bits=24, rotate=rotate)
    parts = [rng.normal(size=(30, 1000)) * 0.1 for _ in range(4)]  # four hospitals
    fields = [enc.wrap(enc.encode_examples(p, rotation_seed=SEED, stream=KeyStream.insecure_seeded(i)))
              for i, p in enumerate(parts)]
    total = fields[0]
    for f in fields[1:]:
        total = enc.wrap((total.astype(np.int64) + f.astype(np.int64)))  # what secure aggregation sums
    decoded = enc.decode_sum(total, rotation_seed=SEED)
    truth = sum(clipped(p, 1.0).sum(axis=0) for p in parts)
    # each example's rounding error has norm < sqrt(n) integer units; the rotation preserves norms
    assert np.linalg.norm(decoded - truth) * enc.scale <= 120 * math.sqrt(enc.padded_dimension)
    assert np.abs(decoded - truth).max() < 0.05
    # a wrong rotation seed decodes to garbage
    if rotate:
        assert np.abs(enc.decode_sum(total, rotation_seed=b"other") - truth).max() > 0.5


@pytest.mark.parametrize("bits", [8, 16, 31, 32, 33, 63, 64])
def test_wrap_and_unwrap_are_inverse_on_the_centred_range(bits: int) -> None:
    enc = DistributedEncoding(dimension=6, clip_norm=1.0, scale=1.0, bits=bits, rotate=False)
    half = 1 << (bits - 1)
    ints = np.array([0, 1, -1, half - 1, -half, 7], dtype=np.int64)
    field = enc.wrap(ints)
    assert field.dtype == enc.dtype and np.all(field.astype(object) < (1 << bits))
    assert np.array_equal(enc.unwrap(field), ints)
    # one past the range wraps to the other end: modular clipping
    over = enc.unwrap(enc.wrap(np.array([half - 1, 0, 0, 0, 0, 0], dtype=np.int64) + np.array([1, 0, 0, 0, 0, 0])))
    assert over[0] == -half


def test_the_plan_keeps_a_worst_case_sum_inside_the_field() -> None:
    """All examples identical (the signal adds up fully): the planned scale never wraps, and a
    scale several times larger does."""
    kwargs = dict(dimension=2000, clip_norm=1.0, noise_multiplier=1.0, num_parties=5, honest_parties=4,
                  max_batch=200, bits=16, wrap_probability=1e-6)
    plan = plan_encoding(**kwargs)
    enc = plan.encoding
    rng = np.random.default_rng(3)
    direction = rng.normal(size=2000)
    grads = np.tile(direction / np.linalg.norm(direction), (40, 1))  # 40 examples per party, aligned
    share_mu = plan.share_variance / 2
    from secfedtl.privacy.discrete_noise import skellam_noise

    def run(encoding: DistributedEncoding) -> tuple[int, float]:
        """(largest |coordinate| of the true integer sum, max difference between the decoded sum
        and the decode of the same sum in a 64-bit field, where nothing wraps)."""
        total = np.zeros(encoding.padded_dimension, dtype=np.int64)
        for party in range(5):
            stream = KeyStream.insecure_seeded(party)
            total += encoding.encode_examples(grads, rotation_seed=SEED, stream=stream)
            total += skellam_noise(encoding.padded_dimension, mu=share_mu, stream=stream)
        wide = DistributedEncoding(dimension=2000, clip_norm=1.0, scale=encoding.scale, bits=64)
        unwrapped = wide.decode_sum(wide.wrap(total), rotation_seed=SEED)
        decoded = encoding.decode_sum(encoding.wrap(total), rotation_seed=SEED)
        return int(np.abs(total).max()), float(np.abs(decoded - unwrapped).max())

    largest, diff = run(enc)
    assert largest <= plan.range_needed <= 2**15 - 1 and diff == 0.0
    largest, diff = run(DistributedEncoding(dimension=2000, clip_norm=1.0, scale=enc.scale * 16, bits=16))
    assert largest > 2**15 and diff > 1.0  # wrapped: that sum is garbage


def test_plan_reports_and_more_bits_help() -> None:
    kwargs = dict(dimension=100_000, clip_norm=1.0, noise_multiplier=1.0, num_parties=10, honest_parties=8,
                  max_batch=512)
    plans = [plan_encoding(bits=b, **kwargs) for b in (14, 16, 18)]
    scales = [p.encoding.scale for p in plans]
    assert scales == sorted(scales)
    overheads = [p.encoding_overhead for p in plans]
    assert overheads == sorted(overheads, reverse=True) and overheads[-1] < 1.001
    for p in plans:
        assert p.range_needed <= 2 ** (p.encoding.bits - 1) - 1
        assert p.share_variance == pytest.approx((p.noise_multiplier * p.encoding.l2_bound) ** 2 / 8)
        assert p.norm_inflation >= 1.0
    chosen = choose_bits(max_overhead=0.01, **kwargs)
    assert chosen.encoding_overhead <= 1.01
    assert plan_encoding(bits=chosen.encoding.bits - 1, **kwargs).encoding_overhead > 1.01


def test_too_few_bits_and_bad_configurations_are_refused() -> None:
    with pytest.raises(ConfigError):
        plan_encoding(dimension=10**6, clip_norm=1.0, noise_multiplier=1.0, num_parties=10, honest_parties=8,
                      max_batch=512, bits=8)
    with pytest.raises(ConfigError):
        plan_encoding(dimension=100, clip_norm=1.0, noise_multiplier=1.0, num_parties=3, honest_parties=4,
                      max_batch=5, bits=16)
    for bad in (dict(dimension=0), dict(clip_norm=0.0), dict(scale=float("nan")), dict(bits=65), dict(bits=1),
                dict(rotate=1), dict(max_tries=0), dict(rounding_beta=1.0), dict(scale=2.0**40)):
        with pytest.raises(ConfigError):
            DistributedEncoding(**{**dict(dimension=10, clip_norm=1.0, scale=1.0, bits=16), **bad})  # type: ignore[arg-type]


def test_bad_inputs_raise_encoding_errors() -> None:
    enc = DistributedEncoding(dimension=4, clip_norm=1.0, scale=10.0, bits=16)
    stream = KeyStream.insecure_seeded(0)
    for bad in (np.zeros(4), np.zeros((2, 5)), np.array([[0.0, np.nan, 0.0, 0.0]]), np.array([["a"] * 4])):
        with pytest.raises(EncodingError):
            enc.encode_examples(bad, rotation_seed=SEED, stream=stream)
    with pytest.raises(EncodingError):
        enc.encode_examples(np.zeros((1, 4)), rotation_seed=SEED, stream=np.random.default_rng(0))  # type: ignore[arg-type]
    with pytest.raises(EncodingError):
        enc.wrap(np.zeros(3, dtype=np.int64))
    with pytest.raises(EncodingError):
        enc.unwrap(np.zeros(4, dtype=np.uint64))  # 16 bits: the field words are uint32


def test_inflated_bound_formula() -> None:
    # KLS21 / TFF: sqrt(c^2 + d/4 + sqrt(2 ln(1/beta)) (c + sqrt(d)/2)), capped by c + sqrt(d)
    c, d, beta = 1000.0, 4096, math.exp(-0.5)
    assert inflated_l2_bound(c, d, beta) == pytest.approx(math.sqrt(c * c + d / 4 + 1.0 * (c + 32.0)))
    assert inflated_l2_bound(1000.0, 4, 1e-10) == pytest.approx(1000.0 + 2.0)  # the deterministic cap binds


def test_step_rotation_seed_depends_on_every_public_value() -> None:
    base = dict(job_seed=7, job_id="job-a", round=2, step=5)
    seed = step_rotation_seed(**base)
    assert seed == step_rotation_seed(**base) and len(seed) == 32
    for change in (dict(job_seed=8), dict(job_id="job-b"), dict(round=3), dict(step=6), dict(job_id="job-a2", round=2)):
        assert step_rotation_seed(**{**base, **change}) != seed
    # length prefixes: no two tuples share an encoding
    assert step_rotation_seed(job_seed=1, job_id="1", round=1, step=1) != step_rotation_seed(
        job_seed=11, job_id="", round=1, step=1)
    with pytest.raises(EncodingError):
        step_rotation_seed(**{**base, "step": -1})
