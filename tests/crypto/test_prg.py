"""secfedtl.crypto.prg: masks cancel, seeds give distinct streams, chunking is invisible,
the output is the AES-128-CTR keystream under HKDF(seed) read as little-endian words."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from secfedtl.crypto import prg
from secfedtl.errors import CryptoError


def _mask(seed: bytes, length: int, dtype: type) -> np.ndarray:
    """The mask ``PRG(seed)`` of ``length`` words."""
    return prg.add_masks(np.zeros(length, dtype=dtype), [(seed, 1)])


SEEDS = st.binary(min_size=32, max_size=32)
DTYPES = st.sampled_from([np.uint32, np.uint64])


def _reference(seed: bytes, length: int, dtype) -> np.ndarray:
    itemsize = np.dtype(dtype).itemsize
    enc = Cipher(algorithms.AES(prg.prg_key(seed)), modes.CTR(bytes(16))).encryptor()
    raw = enc.update(bytes(length * itemsize)) + enc.finalize()
    return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype)


def _lengths_around_chunks(dtype):
    per = prg.CHUNK_BYTES // np.dtype(dtype).itemsize
    return [1, 3, per - 1, per, per + 1, 2 * per - 1, 2 * per, 2 * per + 5]


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
def test_matches_aes_ctr_keystream_across_chunk_boundaries(dtype):
    seed = bytes(range(32))
    lengths = _lengths_around_chunks(dtype)
    longest = _reference(seed, max(lengths), dtype)
    for n in lengths:
        got = _mask(seed, n, dtype)
        assert got.dtype == dtype and got.shape == (n,)
        np.testing.assert_array_equal(got, longest[:n])


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
def test_many_masks_in_one_call_cross_chunks(dtype):
    seeds = [bytes([i]) * 32 for i in range(3)]
    n = _lengths_around_chunks(dtype)[-1]
    base = np.arange(n, dtype=dtype)
    out = prg.add_masks(base.copy(), [(seeds[0], 1), (seeds[1], -1), (seeds[2], 1)])
    expect = base + _reference(seeds[0], n, dtype) - _reference(seeds[1], n, dtype) + _reference(seeds[2], n, dtype)
    np.testing.assert_array_equal(out, expect)


@settings(max_examples=30, deadline=None)
@given(SEEDS, st.integers(0, 3000), DTYPES, st.integers(0, 2**32 - 1))
def test_plus_and_minus_cancel(seed, n, dtype, fill):
    x = np.full(n, fill, dtype=dtype)
    out = prg.add_masks(x.copy(), [(seed, 1), (seed, -1)])
    np.testing.assert_array_equal(out, x)
    masked = prg.add_masks(x.copy(), [(seed, 1)])
    np.testing.assert_array_equal(prg.add_masks(masked, [(seed, -1)]), x)


@settings(max_examples=30, deadline=None)
@given(SEEDS, SEEDS, DTYPES)
def test_different_seeds_give_different_streams(a, b, dtype):
    if a == b:
        return
    assert not np.array_equal(_mask(a, 64, dtype), _mask(b, 64, dtype))


def test_stream_is_not_constant_and_uint64_is_not_uint32_widened():
    seed = b"\x07" * 32
    m32 = _mask(seed, 1000, np.uint32)
    m64 = _mask(seed, 500, np.uint64)
    assert len(set(m32.tolist())) > 990
    # the same keystream bytes, read as 64-bit words: lo | hi << 32
    np.testing.assert_array_equal(m64, m32[0::2].astype(np.uint64) | (m32[1::2].astype(np.uint64) << np.uint64(32)))


def test_rejects_bad_buffers_seeds_and_signs():
    with pytest.raises(CryptoError):
        prg.add_masks(np.zeros(4, dtype=np.int64), [(bytes(32), 1)])
    with pytest.raises(CryptoError):
        prg.add_masks(np.zeros((2, 2), dtype=np.uint32), [(bytes(32), 1)])
    with pytest.raises(CryptoError):
        prg.add_masks(np.zeros(8, dtype=np.uint32)[::2], [(bytes(32), 1)])
    with pytest.raises(CryptoError):
        prg.add_masks(np.zeros(4, dtype=np.uint32), [(bytes(16), 1)])
    with pytest.raises(CryptoError):
        prg.add_masks(np.zeros(4, dtype=np.uint32), [(bytes(32), 2)])


def test_empty_inputs_are_no_ops():
    x = np.arange(5, dtype=np.uint32)
    np.testing.assert_array_equal(prg.add_masks(x.copy(), []), x)
    assert prg.add_masks(np.zeros(0, dtype=np.uint32), [(bytes(32), 1)]).size == 0
