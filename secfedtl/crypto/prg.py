"""Mask expansion: AES-128-CTR keystreams added into preallocated integer buffers.

A 32-byte seed (a self-mask seed ``b_u`` or a pairwise secret ``s_uv``) is turned into a 128-bit
AES key with HKDF-SHA256; the keystream of AES-CTR under that key, read as little-endian
unsigned integers, is the mask. Arithmetic is modulo ``2**32`` (``uint32``) or ``2**64``
(``uint64``) and wraps for free; callers reduce to ``2**bits`` at the end (``2**bits`` divides
the word size, so reducing late gives the same result).

The keystream is produced in chunks of :data:`CHUNK_BYTES` into one scratch buffer, and every
mask of a call is applied to a chunk before moving on, so the accumulator chunk stays in cache.
No mask ever comes from numpy's or Python's random generators, and no seed is shorter than 256
bits.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from secfedtl.crypto.primitives import KEY_BYTES, hkdf_sha256
from secfedtl.errors import CryptoError

CHUNK_BYTES = 1 << 18
_PRG_INFO = b"secfedtl/v1/mask-prg/aes128-ctr"
_ZERO_IV = bytes(16)


def prg_key(seed: bytes) -> bytes:
    """The AES-128 key that expands ``seed``."""
    if len(seed) != KEY_BYTES:
        raise CryptoError(f"mask seeds are {KEY_BYTES} bytes, got {len(seed)}")
    return hkdf_sha256(seed, info=_PRG_INFO, length=16)


def add_masks(out: np.ndarray, seeds: Sequence[tuple[bytes, int]]) -> np.ndarray:
    """Add ``sign * PRG(seed)`` for every ``(seed, sign)`` into ``out`` in place (mod word size).

    ``out`` must be a C-contiguous ``uint32`` or ``uint64`` array; ``sign`` is ``+1`` or ``-1``.
    """
    if out.dtype not in (np.uint32, np.uint64) or out.ndim != 1 or not out.flags.c_contiguous:
        raise CryptoError("mask buffers are 1-D contiguous uint32/uint64 arrays")
    if not seeds or out.size == 0:
        return out
    itemsize = out.itemsize
    chunk_elems = CHUNK_BYTES // itemsize
    zeros = memoryview(bytes(CHUNK_BYTES))
    scratch = bytearray(CHUNK_BYTES + 16)  # update_into wants block_size - 1 spare bytes
    stream = np.frombuffer(scratch, dtype=out.dtype, count=chunk_elems)
    streams = []
    for seed, sign in seeds:
        if sign not in (1, -1):
            raise CryptoError("mask signs are +1 or -1")
        cipher = Cipher(algorithms.AES(prg_key(seed)), modes.CTR(_ZERO_IV))
        streams.append((cipher.encryptor(), sign > 0))
    n = out.size
    for start in range(0, n, chunk_elems):
        stop = min(n, start + chunk_elems)
        count = stop - start
        segment = out[start:stop]
        ks = stream[:count]
        for encryptor, positive in streams:
            encryptor.update_into(zeros[: count * itemsize], scratch)
            if positive:
                np.add(segment, ks, out=segment)
            else:
                np.subtract(segment, ks, out=segment)
    return out

