"""Shamir t-of-n secret sharing of 32-byte secrets over the prime field GF(2**521 - 1).

The field is larger than any 256-bit secret, so a raw 32-byte key is shared as one field element
(no PEM, no chunking). Share ``x`` coordinates are party ids plus one (never zero). Coefficients
come from :mod:`secrets`. Reconstruction uses exactly ``threshold`` shares and checks every
extra share against the interpolated polynomial, so a corrupted share is detected rather than
silently producing a wrong key.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

from secfedtl.errors import ReconstructionError

PRIME = (1 << 521) - 1  # Mersenne prime M521
SECRET_BYTES = 32
SHARE_BYTES = 66  # ceil(521 / 8)


def _eval(coeffs: Sequence[int], x: int) -> int:
    acc = 0
    for c in reversed(coeffs):
        acc = (acc * x + c) % PRIME
    return acc


def split(secret: bytes, *, threshold: int, xs: Sequence[int]) -> dict[int, bytes]:
    """Shares of ``secret`` for the points ``xs``; any ``threshold`` of them recover it."""
    if len(secret) != SECRET_BYTES:
        raise ReconstructionError(f"Shamir secrets are {SECRET_BYTES} bytes")
    if threshold < 1 or threshold > len(xs):
        raise ReconstructionError(f"threshold {threshold} impossible with {len(xs)} shares")
    if len(set(xs)) != len(xs) or any(x <= 0 or x >= PRIME for x in xs):
        raise ReconstructionError("share points must be distinct and non-zero")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return {x: _eval(coeffs, x).to_bytes(SHARE_BYTES, "big") for x in xs}


def _lagrange_at(points: Sequence[tuple[int, int]], x: int) -> int:
    total = 0
    for i, (xi, yi) in enumerate(points):
        num = 1
        den = 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (x - xj) % PRIME
                den = den * (xi - xj) % PRIME
        total = (total + yi * num * pow(den, -1, PRIME)) % PRIME
    return total


def _parse(shares: Mapping[int, bytes]) -> list[tuple[int, int]]:
    points = []
    for x, blob in shares.items():
        if len(blob) != SHARE_BYTES:
            raise ReconstructionError("malformed share")
        y = int.from_bytes(blob, "big")
        if not 0 < x < PRIME or y >= PRIME:
            raise ReconstructionError("share outside the field")
        points.append((x, y))
    return sorted(points)


def combine(shares: Mapping[int, bytes], *, threshold: int) -> bytes:
    """Recover the secret from at least ``threshold`` shares keyed by their ``x`` point.

    Raises :class:`ReconstructionError` with fewer than ``threshold`` shares, or when the
    shares beyond the first ``threshold`` are not on the same polynomial.
    """
    if len(shares) < threshold:
        raise ReconstructionError(f"need {threshold} shares, have {len(shares)}")
    points = _parse(shares)
    base, extra = points[:threshold], points[threshold:]
    for x, y in extra:
        if _lagrange_at(base, x) != y:
            raise ReconstructionError("inconsistent shares")
    secret = _lagrange_at(base, 0)
    if secret >> (8 * SECRET_BYTES):
        raise ReconstructionError("reconstructed value is not a 32-byte secret")
    return secret.to_bytes(SECRET_BYTES, "big")
