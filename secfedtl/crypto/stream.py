"""Uniform random bits from an AES-256-CTR keystream, for sampling private noise in bulk.

:class:`KeyStream` turns a 256-bit key into an unbounded stream of uniform bits (AES-256 in counter
mode encrypting zeros). Sampling a million Skellam coordinates needs 16 MB of randomness per call;
the keystream produces it at memory speed, and its security is that of AES: distinguishing it from
uniform bits without the key is as hard as breaking AES-256.

* :meth:`KeyStream.fresh` (the only constructor private noise may use): key and nonce from
  ``os.urandom``, never stored, never returned. Its :attr:`~KeyStream.label` is ``"csprng"``.
* :meth:`KeyStream.insecure_seeded` is for tests and reproducibility experiments only: the key is
  derived from a seed, so anyone who knows the seed knows every bit. Its label is
  ``"insecure_seeded"``; ledgers record the label and ``secfedtl audit`` never certifies it.

Imports nothing of ours but :mod:`secfedtl.errors`.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from secfedtl.errors import CryptoError

__all__ = ["KeyStream"]

_CHUNK = 1 << 20
_SEED_INFO = b"secfedtl/v1/insecure-seeded-keystream"


class KeyStream:
    """A one-way stream of uniform bits (see the module docstring). Build it with :meth:`fresh`
    or :meth:`insecure_seeded`; reading advances it, and no bit is ever returned twice."""

    __slots__ = ("_encryptor", "_label")

    def __init__(self, *, _key: bytes, _nonce: bytes, _label: str) -> None:
        if len(_key) != 32 or len(_nonce) != 16:
            raise CryptoError("a keystream needs a 32-byte key and a 16-byte nonce")
        if _label not in ("csprng", "insecure_seeded"):
            raise CryptoError(f"unknown keystream label {_label!r}")
        self._encryptor = Cipher(algorithms.AES(_key), modes.CTR(_nonce)).encryptor()
        self._label = _label

    @classmethod
    def fresh(cls) -> KeyStream:
        """A stream keyed from ``os.urandom``: nobody, the caller included, can predict it."""
        return cls(_key=os.urandom(32), _nonce=os.urandom(16), _label="csprng")

    @classmethod
    def insecure_seeded(cls, seed: int) -> KeyStream:
        """TESTS ONLY: a stream anyone who knows ``seed`` can reproduce (label ``insecure_seeded``)."""
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise CryptoError(f"seed must be a non-negative int, got {seed!r}")
        key = hashlib.sha256(_SEED_INFO + seed.to_bytes((seed.bit_length() + 8) // 8, "big")).digest()
        return cls(_key=key, _nonce=bytes(16), _label="insecure_seeded")

    @property
    def label(self) -> str:
        """``"csprng"`` or ``"insecure_seeded"``: what a ledger entry records about this stream."""
        return self._label

    @property
    def certified(self) -> bool:
        """Whether DP accounting may certify noise drawn from this stream."""
        return self._label == "csprng"

    def read(self, nbytes: int) -> bytes:
        """The next ``nbytes`` bytes of the stream."""
        if isinstance(nbytes, bool) or not isinstance(nbytes, (int, np.integer)) or nbytes < 0:
            raise CryptoError(f"nbytes must be a non-negative int, got {nbytes!r}")
        return self.fill(np.empty(int(nbytes), dtype=np.uint8)).tobytes()

    def fill(self, out: np.ndarray) -> np.ndarray:
        """Overwrite the C-contiguous array ``out`` with the next ``out.nbytes`` bytes of the stream
        (what :meth:`read` returns too), in place, without intermediate copies; returns ``out``."""
        if not isinstance(out, np.ndarray) or not out.flags.c_contiguous or not out.flags.writeable:
            raise CryptoError("fill needs a writable, C-contiguous numpy array")
        view = memoryview(out.reshape(-1).view(np.uint8))
        nbytes = view.nbytes
        zeros = bytes(min(nbytes, _CHUNK))
        for start in range(0, nbytes, _CHUNK):
            stop = min(nbytes, start + _CHUNK)
            try:
                self._encryptor.update_into(zeros[: stop - start], view[start:])
            except ValueError:  # versions of cryptography that want block-size slack after the output
                view[start:stop] = self._encryptor.update(zeros[: stop - start])
        return out

    def uint16(self, count: int) -> np.ndarray:
        """``count`` independent uniform 16-bit words (a fresh, writable ``uint16`` array)."""
        return self.fill(np.empty(int(count), dtype=np.uint16))

    def uint64(self, count: int) -> np.ndarray:
        """``count`` independent uniform 64-bit words (a fresh, writable ``uint64`` array)."""
        return self.fill(np.empty(int(count), dtype="<u8")).astype(np.uint64, copy=False)

    def uint32(self, count: int) -> np.ndarray:
        """``count`` independent uniform 32-bit words (a fresh, writable ``uint32`` array)."""
        return self.fill(np.empty(int(count), dtype="<u4")).astype(np.uint32, copy=False)

    def uniform(self, count: int) -> np.ndarray:
        """``count`` independent uniforms on the grid ``{k / 2**53 : 0 <= k < 2**53}`` (float64,
        in ``[0, 1)``, exact: every value is a multiple of ``2**-53``)."""
        return (self.uint64(count) >> np.uint64(11)).astype(np.float64) * 2.0**-53

    def __repr__(self) -> str:
        return f"KeyStream(label={self._label!r})"
