"""Shamir t-of-n secret sharing of 32-byte secrets over the prime field GF(2**521 - 1).

The field is larger than any 256-bit secret, so a raw 32-byte key is shared as one field element
(no PEM, no chunking). Share ``x`` coordinates are party ids plus one (never zero). Coefficients
come from :mod:`secrets`. Reconstruction uses exactly ``threshold`` shares and checks every
extra share against the interpolated polynomial, so a corrupted share is detected rather than
silently producing a wrong key.

:func:`recover` is the form for shares from parties that may lie: it treats a malformed share
(wrong length, outside the field) as missing, and corrects up to ``(m - t) // 2`` wrong shares
among ``m`` well-formed ones (Berlekamp-Welch decoding of the Reed-Solomon code that Shamir
shares form), naming the points whose shares it rejected. More wrong shares than that, or a
result that is not a 32-byte secret, raise :class:`ReconstructionError`; it never returns a
secret that fewer than ``t + e`` shares agree on, where ``e`` is the number it rejected.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

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


# --- decoding shares from parties that may lie -----------------------------------------------


@dataclass(frozen=True, slots=True)
class Recovery:
    """What :func:`recover` found: the ``secret`` and the share points it ``rejected`` (malformed,
    or not on the polynomial that the others agree on)."""

    secret: bytes
    rejected: frozenset[int]

    def __repr__(self) -> str:  # never print the secret
        return f"Recovery(secret=<hidden>, rejected={sorted(self.rejected)})"


def _horner(coeffs: Sequence[int], x: int) -> int:
    """Value at ``x`` of the polynomial with coefficients ``coeffs`` (lowest degree first)."""
    acc = 0
    for c in reversed(coeffs):
        acc = (acc * x + c) % PRIME
    return acc


def _interpolate(points: Sequence[tuple[int, int]]) -> list[int]:
    """Coefficients (lowest first) of the polynomial of degree < len(points) through them."""
    size = len(points)
    whole = [1]  # prod (X - x_i), lowest degree first
    for xi, _ in points:
        nxt = [0] * (len(whole) + 1)
        for k, c in enumerate(whole):
            nxt[k + 1] = (nxt[k + 1] + c) % PRIME
            nxt[k] = (nxt[k] - xi * c) % PRIME
        whole = nxt
    coeffs = [0] * size
    for xi, yi in points:
        quotient = [0] * size  # whole / (X - xi) by synthetic division
        carry = whole[size]
        for k in range(size - 1, -1, -1):
            quotient[k] = carry
            carry = (whole[k] + carry * xi) % PRIME
        weight = yi * pow(_horner(quotient, xi), -1, PRIME) % PRIME
        for k in range(size):
            coeffs[k] = (coeffs[k] + weight * quotient[k]) % PRIME
    return coeffs


def _solve(rows: list[list[int]], unknowns: int) -> list[int] | None:
    """One solution of the augmented linear system ``rows`` over GF(PRIME) (free unknowns 0),
    or None when it has none."""
    rows = [r[:] for r in rows]
    pivots: list[int] = []
    r = 0
    for col in range(unknowns):
        pivot = next((i for i in range(r, len(rows)) if rows[i][col]), None)
        if pivot is None:
            continue
        rows[r], rows[pivot] = rows[pivot], rows[r]
        inv = pow(rows[r][col], -1, PRIME)
        rows[r] = [v * inv % PRIME for v in rows[r]]
        for i in range(len(rows)):
            if i != r and rows[i][col]:
                f = rows[i][col]
                rows[i] = [(a - f * b) % PRIME for a, b in zip(rows[i], rows[r])]
        pivots.append(col)
        r += 1
        if r == len(rows):
            break
    if any(row[unknowns] for row in rows[r:]):
        return None
    solution = [0] * unknowns
    for i, col in enumerate(pivots):
        solution[col] = rows[i][unknowns]
    return solution


def _berlekamp_welch(points: Sequence[tuple[int, int]], threshold: int, errors: int) -> list[int] | None:
    """The polynomial of degree < threshold that all but at most ``errors`` points lie on, when
    ``len(points) >= threshold + 2 * errors``; None when there is none."""
    q_len = threshold + errors
    unknowns = q_len + errors
    rows = []
    for x, y in points:
        powers = [1]
        for _ in range(q_len):
            powers.append(powers[-1] * x % PRIME)
        # Q(x) - y * (E(x) - x^e) = y * x^e, with E monic of degree ``errors``
        rows.append(powers[:q_len] + [(-y * p) % PRIME for p in powers[:errors]] + [y * powers[errors] % PRIME])
    solution = _solve(rows, unknowns)
    if solution is None:
        return None
    q = solution[:q_len]
    e = solution[q_len:] + [1]
    quotient = [0] * (len(q) - errors)  # Q / E by long division (E is monic)
    rest = q[:]
    for k in range(len(quotient) - 1, -1, -1):
        c = rest[k + errors]
        quotient[k] = c
        for j in range(errors + 1):
            rest[k + j] = (rest[k + j] - c * e[j]) % PRIME
    if any(rest[:errors]):
        return None
    return quotient[:threshold]


def recover(shares: Mapping[int, bytes], *, threshold: int) -> Recovery:
    """The secret behind ``shares`` (keyed by their ``x`` point), from parties that may lie.

    A malformed share is set aside; among the ``m`` well-formed ones up to ``(m - threshold) // 2``
    wrong shares are found and set aside too (both kinds are in ``Recovery.rejected``). Raises
    :class:`ReconstructionError` with fewer than ``threshold`` well-formed shares, with more wrong
    shares than can be corrected, or when the result is not a 32-byte secret.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
        raise ReconstructionError("threshold must be a positive integer")
    points: list[tuple[int, int]] = []
    malformed: set[int] = set()
    for x, blob in shares.items():
        if isinstance(x, bool) or not isinstance(x, int) or not 0 < x < PRIME:
            raise ReconstructionError("share points must be non-zero field elements")
        y = int.from_bytes(blob, "big") if isinstance(blob, bytes) and len(blob) == SHARE_BYTES else PRIME
        if y >= PRIME:
            malformed.add(x)
        else:
            points.append((x, y))
    points.sort()
    if len(points) < threshold:
        raise ReconstructionError(f"{len(points)} well-formed shares, {threshold} required")
    poly = _interpolate(points[:threshold])
    wrong = {x for x, y in points[threshold:] if _horner(poly, x) != y}
    if wrong:
        errors = (len(points) - threshold) // 2
        if not errors:
            raise ReconstructionError(f"inconsistent shares, and {len(points)} are too few to tell which are wrong")
        found = _berlekamp_welch(points, threshold, errors)
        if found is None:
            raise ReconstructionError(f"inconsistent shares, more wrong ones than the {errors} that "
                                      f"{len(points)} shares can correct")
        poly = found
        wrong = {x for x, y in points if _horner(poly, x) != y}
        if len(wrong) > errors:  # pragma: no cover - Berlekamp-Welch guarantees it
            raise ReconstructionError("inconsistent shares, too many to correct")
    secret = poly[0]
    if secret >> (8 * SECRET_BYTES):
        raise ReconstructionError("reconstructed value is not a 32-byte secret")
    return Recovery(secret=secret.to_bytes(SECRET_BYTES, "big"), rejected=frozenset(malformed | wrong))
