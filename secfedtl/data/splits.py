"""Record-stable splits: a record's split depends on the record alone.

A seeded permutation (:func:`secfedtl.data.heart.validation_split`) moves many records between
fit and validation when one record is added: neighbouring datasets would then differ in many
records downstream. :func:`record_split` instead puts each record in validation when a keyed hash
of its bytes (HMAC-SHA256 under a public split key) falls below ``fraction``: adding or removing
one record moves only that record. Identical records share a split. The key is public (the split
is not a secret: DP protects each record wherever it lands); use one key per job.
"""

from __future__ import annotations

import hashlib
import hmac
import math

import numpy as np

from secfedtl.errors import ConfigError, InputError

__all__ = ["in_validation", "record_split", "split_key"]


def split_key(seed: int, purpose: str = "validation") -> bytes:
    """The public split key of a job seed (and a purpose, so different splits are independent)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be a non-negative int, got {seed!r}")
    return hashlib.sha256(f"secfedtl.split/1|{purpose}|{seed}".encode()).digest()


def _record_bytes(x: np.ndarray, y: object) -> bytes:
    return np.ascontiguousarray(x, dtype="<f8").tobytes() + b"|" + np.asarray(y, dtype="<i8").tobytes()


def in_validation(x: np.ndarray, y: object, fraction: float, key: bytes) -> bool:
    """Whether the record ``(x, y)`` goes to validation under ``key``: the rule of
    :func:`record_split`, for one record (it depends on nothing else)."""
    digest = hmac.new(key, _record_bytes(np.asarray(x), y), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") < int(fraction * (1 << 64))


def record_split(x: np.ndarray, y: np.ndarray, fraction: float, key: bytes
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_fit, y_fit, x_val, y_val)``: each row goes to validation when
    ``HMAC-SHA256(key, row) / 2**256 < fraction``, in its original order within each split.

    Raises:
        InputError: ``x`` and ``y`` disagree in length, or a split comes out empty.
        ConfigError: ``fraction`` outside (0, 1) or a key that is not bytes.
    """
    x_arr, y_arr = np.asarray(x), np.asarray(y)
    if x_arr.ndim < 1 or y_arr.ndim != 1 or x_arr.shape[0] != y_arr.shape[0]:
        raise InputError(f"x and y must have the same number of rows, got {x_arr.shape}, {y_arr.shape}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not (
            math.isfinite(fraction) and 0.0 < fraction < 1.0):
        raise ConfigError(f"fraction must lie in (0, 1), got {fraction!r}")
    if not isinstance(key, bytes) or len(key) < 16:
        raise ConfigError("the split key must be at least 16 bytes")
    val = np.array([in_validation(x_arr[i], y_arr[i], fraction, key) for i in range(x_arr.shape[0])], dtype=bool)
    if val.all() or not val.any():
        raise InputError(f"the keyed split of {x_arr.shape[0]} rows left one side empty")
    return x_arr[~val].copy(), y_arr[~val].copy(), x_arr[val].copy(), y_arr[val].copy()
