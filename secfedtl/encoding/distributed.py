"""Integer encoding for distributed DP: rotate, scale, round with a norm bound, wrap into Z_2^b.

This is the hospital side of one distributed DP-SGD step (Kairouz, Liu, Steinke, ICML 2021,
Algorithm 1; TFF's ``DistributedDpSumFactory``), for *record-level* DP:

1. **Clip** each example's gradient to L2 norm ``clip_norm`` (float).
2. **Scale** by ``scale`` (integer units per unit of gradient; a power of two is not required).
3. **Rotate** (optional) with a randomized Hadamard transform ``H D / sqrt(n)`` on the gradient
   zero-padded to ``n = 2**ceil(log2(dimension))`` coordinates. ``D`` is a diagonal of random
   signs from a PUBLIC seed (:func:`rotation_signs`), the same for every hospital in a step, fresh
   per step. It is public because the server must invert it to decode the sum, and every hospital
   must apply the same one for the sum to make sense; it need not be secret because the privacy
   argument holds for every fixed orthogonal rotation (the norm bound is enforced after rotating).
   What the rotation buys is utility: it spreads each vector over all coordinates, so the sum
   rarely wraps modulo ``2**bits`` (:func:`plan_encoding`). A hospital derives the seed itself from
   the public job seed, round and step (never takes it from the server unchecked).
4. **Round each example** to an integer vector by *conditional* stochastic rounding: unbiased
   randomized rounding per coordinate (private randomness, from a :class:`~secfedtl.crypto.stream.KeyStream`),
   redrawn until the rounded vector's L2 norm is at most :attr:`DistributedEncoding.l2_bound`, the
   clip inflated for rounding (:func:`inflated_l2_bound`, KLS21 Theorem 3 / TFF's rule); after
   ``max_tries`` failed draws the example is rounded toward zero, which never increases its norm.
   Rounding each example, not the hospital's sum, is what makes record-level sensitivity exact:
   adding or removing one record changes the hospital's integer sum by that record's rounded
   vector, whose L2 norm is at most ``l2_bound`` *with certainty*, and whose L1 norm is therefore
   at most ``l1_bound = min(l2_bound**2, sqrt(n) * l2_bound)`` (integer coordinates).
5. **Sum** the rounded examples of the hospital's Poisson batch (:meth:`DistributedEncoding.encode_examples`),
   **add** its share of Skellam noise (:mod:`secfedtl.privacy.distributed` does this step and the
   next), and **wrap** modulo ``2**bits`` (:meth:`DistributedEncoding.wrap`).

Secure aggregation sums the hospitals' field vectors modulo ``2**bits``; the server
:meth:`~DistributedEncoding.decode_sum`\\ s the result: the centred representative in
``[-2**(bits-1), 2**(bits-1))`` (unwrap), the inverse rotation, division by ``scale``. Modular
wrap-around is post-processing of the noisy integer sum, so it can cost accuracy but never privacy;
:func:`plan_encoding` chooses ``scale`` so that it happens with probability at most a stated bound.

numpy only; randomness only from a :class:`KeyStream` (rounding) and SHAKE-256 of a public seed
(rotation signs).

Cost: steps 1-4 run in float32 (float64 once a coordinate could reach ``2**24``), on chunks of a
few MiB with preallocated work arrays, and the rounding draws 16 bits per coordinate
(:meth:`DistributedEncoding._round_rows`). Float error and the ``2**-16`` rounding bias cost
accuracy only: what privacy needs, the bound on the integer vector that is summed, is checked
exactly on that vector (:meth:`DistributedEncoding._outside`: L2 and L1).
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from secfedtl.crypto.stream import KeyStream
from secfedtl.errors import ConfigError, EncodingError

__all__ = [
    "DEFAULT_ROUNDING_BETA",
    "DistributedEncoding",
    "EncodingPlan",
    "choose_bits",
    "inflated_l2_bound",
    "plan_encoding",
    "rotation_signs",
    "step_rotation_seed",
]

#: Conditional rounding's failure-probability parameter: TFF's default ``exp(-0.5)``. It only
#: sets how much the norm bound is inflated (the bound is enforced whatever beta is).
DEFAULT_ROUNDING_BETA = math.exp(-0.5)
_ROTATION_INFO = b"secfedtl/v1/distributed-dp/rotation-signs"
_CHUNK_BYTES = 1 << 21  # per work array: one chunk's passes stay in cache


def _padded(dimension: int) -> int:
    return 1 << max(0, (dimension - 1).bit_length())


def step_rotation_seed(*, job_seed: int, job_id: str, round: int, step: int) -> bytes:  # noqa: A002
    """The public rotation seed of one DP step, derived from public job values only: SHA-256 of
    a length-prefixed encoding of ``(job_seed, job_id, round, step)``. Every hospital computes it
    itself (so a server cannot pick the rotation), and the server computes the same to decode."""
    for name, value in (("job_seed", job_seed), ("round", round), ("step", step)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise EncodingError(f"{name} must be a non-negative int, got {value!r}")
    if not isinstance(job_id, str):
        raise EncodingError("job_id must be a string")
    parts = [str(job_seed).encode(), job_id.encode("utf-8"), str(round).encode(), str(step).encode()]
    return hashlib.sha256(b"".join(len(p).to_bytes(4, "big") + p for p in parts)).digest()


def rotation_signs(padded_dimension: int, seed: bytes) -> np.ndarray:
    """The public diagonal ``D`` of the randomized Hadamard transform: ``padded_dimension``
    signs (+1.0 / -1.0) from SHAKE-256 of ``seed``. Deterministic, the same on every machine."""
    if not isinstance(seed, (bytes, bytearray)) or not seed:
        raise EncodingError("the rotation seed must be non-empty bytes")
    digest = hashlib.shake_256(_ROTATION_INFO + len(seed).to_bytes(4, "big") + bytes(seed))
    bits = np.unpackbits(np.frombuffer(digest.digest((padded_dimension + 7) // 8), dtype=np.uint8))
    return 1.0 - 2.0 * bits[:padded_dimension].astype(np.float64)


@functools.lru_cache(maxsize=8)
def _rotation_signs_cached(padded_dimension: int, seed: bytes) -> np.ndarray:
    signs = rotation_signs(padded_dimension, seed)
    signs.setflags(write=False)
    return signs


@functools.lru_cache(maxsize=32)
def _hadamard_matrix(size: int, dtype: type = np.float64) -> np.ndarray:
    h = np.ones((1, 1), dtype=dtype)
    while h.shape[0] < size:
        h = np.block([[h, h], [h, -h]])
    h.setflags(write=False)
    return h


def _hadamard(x: np.ndarray, scratch: np.ndarray | None = None) -> np.ndarray:
    """Unnormalised Walsh-Hadamard transform of each row of ``x`` (length a power of two), in
    ``x``'s dtype (float32 or float64).

    ``H_n`` is the Kronecker product of small Hadamard matrices (``H_ab = H_a (x) H_b`` in
    Sylvester's ordering), so the row, viewed as a tensor with axes of size at most 16, is
    multiplied by a small ``H`` along each axis in turn: matrix products, which run at BLAS
    speed, instead of ``log2(n)`` memory-bound butterfly passes. With ``scratch`` (an array of
    ``x``'s shape and dtype) the products alternate between ``x`` and ``scratch`` and nothing is
    allocated (both are overwritten; the result is one of them); without it ``x`` is left as it was."""
    rows, n = x.shape
    k = n.bit_length() - 1
    parts = max(1, -(-k // 4))
    dims = [1 << (k // parts + (1 if i < k % parts else 0)) for i in range(parts)]
    dtype = x.dtype if x.dtype in (np.float32, np.float64) else np.dtype(np.float64)
    if scratch is None:
        x, scratch = np.array(x, dtype=dtype, order="C"), np.empty((rows, n), dtype=dtype)
    src, dst = x, scratch
    np.matmul(src.reshape(-1, dims[-1]), _hadamard_matrix(dims[-1], dtype.type), out=dst.reshape(-1, dims[-1]))
    src, dst = dst, src
    before = rows
    for size in dims[:-1]:  # other axes: H @ (size x after) blocks, no transposes
        after = n * rows // (before * size)
        np.matmul(_hadamard_matrix(size, dtype.type), src.reshape(before, size, after),
                  out=dst.reshape(before, size, after))
        src, dst = dst, src
        before *= size
    return src


def _rounding_work(rows: int, width: int, dtype: type) -> tuple[np.ndarray, ...]:
    """The work arrays of :meth:`DistributedEncoding._round_rows` for up to ``rows`` rows: rounded
    values and thresholds (``dtype``), 16-bit draws, round-up flags."""
    shape = (rows, width)
    return np.empty(shape, dtype), np.empty(shape, dtype), np.empty(shape, np.uint16), np.empty(shape, np.bool_)


def inflated_l2_bound(norm: float, dimension: int, beta: float = DEFAULT_ROUNDING_BETA) -> float:
    """The L2 norm bound conditional rounding enforces on an integer vector rounded from a real
    vector of norm at most ``norm`` in ``dimension`` coordinates (KLS21 Theorem 3; TFF):

        min(norm + sqrt(dimension),
            sqrt(norm^2 + dimension / 4 + sqrt(2 ln(1/beta)) (norm + sqrt(dimension) / 2))).

    The first is a deterministic bound; the second holds for unconditional stochastic rounding
    with probability at least ``1 - beta``, so conditional rounding rarely needs a second draw."""
    if not (0.0 < beta < 1.0):
        raise ConfigError(f"beta must be in (0, 1), got {beta!r}")
    sqrt_d = math.sqrt(dimension)
    squared = norm * norm + dimension / 4.0 + math.sqrt(2.0 * math.log(1.0 / beta)) * (norm + sqrt_d / 2.0)
    return min(norm + sqrt_d, math.sqrt(squared))


@dataclass(frozen=True, slots=True, kw_only=True)
class DistributedEncoding:
    """How one step's per-example gradients become a hospital's share in Z_2^bits (module docstring).

    Args:
        dimension: length of a gradient (the model's parameter count).
        clip_norm: per-example L2 clip, in gradient units.
        scale: integer units per gradient unit (choose it with :func:`plan_encoding`).
        bits: the field is ``Z_2^bits`` (2..64).
        rotate: apply the randomized Hadamard rotation (pads to a power of two).
        rounding_beta: conditional rounding's parameter (:func:`inflated_l2_bound`).
        max_tries: conditional rounding draws per example before rounding it toward zero.
    """

    dimension: int
    clip_norm: float
    scale: float
    bits: int
    rotate: bool = True
    rounding_beta: float = DEFAULT_ROUNDING_BETA
    max_tries: int = 32

    def __post_init__(self) -> None:
        if isinstance(self.dimension, bool) or not isinstance(self.dimension, int) or self.dimension < 1:
            raise ConfigError(f"dimension must be an int >= 1, got {self.dimension!r}")
        for name in ("clip_norm", "scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 64:
            raise ConfigError(f"bits must be an int in [2, 64], got {self.bits!r}")
        if not isinstance(self.rotate, bool):
            raise ConfigError("rotate must be a bool")
        if isinstance(self.max_tries, bool) or not isinstance(self.max_tries, int) or self.max_tries < 1:
            raise ConfigError(f"max_tries must be an int >= 1, got {self.max_tries!r}")
        inflated_l2_bound(1.0, 1, self.rounding_beta)  # validates beta
        worst = (self.clip_norm * self.scale + math.sqrt(self.padded_dimension)) ** 2
        if worst >= 2.0**62:
            raise ConfigError("clip_norm * scale is too large for exact int64 norm checks: lower scale")

    @property
    def padded_dimension(self) -> int:
        """Coordinates of the encoded vector: ``dimension`` rounded up to a power of two when
        rotating, else ``dimension``."""
        return _padded(self.dimension) if self.rotate else self.dimension

    @property
    def l2_bound(self) -> float:
        """Largest L2 norm of one example's rounded vector, in integer units (the sensitivity)."""
        return inflated_l2_bound(self.clip_norm * self.scale, self.padded_dimension, self.rounding_beta)

    @property
    def l1_bound(self) -> float:
        """Largest L1 norm of one example's rounded vector: ``min(l2^2, sqrt(n) l2)`` for integers."""
        l2 = self.l2_bound
        return min(l2 * l2, math.sqrt(self.padded_dimension) * l2)

    @property
    def modulus(self) -> int:
        return 1 << self.bits

    @property
    def dtype(self) -> type:
        """Word type of the field vectors (what secure aggregation sums)."""
        return np.uint32 if self.bits <= 32 else np.uint64

    @property
    def _work_dtype(self) -> type:
        """float32 while every rotated coordinate is below ``2**24`` in absolute value (so float32
        holds each rounded integer exactly and its precision, about ``1e-7`` of a coordinate, is far
        below the rounding step); float64 beyond."""
        return np.float32 if self.clip_norm * self.scale + 2.0 < 2.0**24 else np.float64

    def _clip_factors(self, rows: np.ndarray) -> np.ndarray:
        """Per row: ``min(1, clip_norm / norm) * scale`` (float64; the norm accumulated in float64)."""
        norms = np.sqrt(np.einsum("ij,ij->i", rows, rows, dtype=np.float64))
        return np.minimum(1.0, self.clip_norm / np.maximum(norms, 1e-300)) * self.scale

    def _rotate_rows(self, rows: np.ndarray, signs: np.ndarray | None, *, factor: np.ndarray | None = None,
                     out: np.ndarray | None = None, scratch: np.ndarray | None = None) -> np.ndarray:
        """Each row of ``rows`` times ``factor`` (per row; default 1), zero-padded to
        ``padded_dimension`` and rotated (``signs`` given, else only padded), in
        :attr:`_work_dtype`. ``out``/``scratch``: preallocated ``(len(rows), padded_dimension)``
        work arrays (overwritten; the result is one of them)."""
        n, d = self.padded_dimension, self.dimension
        dtype = self._work_dtype
        if out is None:
            out = np.empty((rows.shape[0], n), dtype=dtype)
        scale = np.ones(rows.shape[0]) if factor is None else np.asarray(factor, dtype=np.float64)
        if signs is not None:
            scale = scale / math.sqrt(n)
        np.multiply(rows, scale.astype(dtype)[:, None], out=out[:, :d], casting="same_kind")
        out[:, d:] = 0.0
        if signs is None:
            return out
        out *= signs.astype(dtype, copy=False)
        if scratch is None:
            scratch = np.empty_like(out)
        return _hadamard(out, scratch)

    @staticmethod
    def _squared_norms(rows: np.ndarray, bound_sq: int) -> np.ndarray:
        """The squared L2 norms of integer-valued ``rows``, exact wherever they are at most
        ``bound_sq`` and above it otherwise, so ``_squared_norms(rows, b) > b`` decides exactly.

        Below ``2**53`` the float64 sum of the squares is exact: every square and partial sum is an
        integer below ``2**53``, and once a (nonnegative) partial sum reaches ``2**53`` the computed
        one is at least ``2**53 > bound_sq`` whatever the summation order (rounding is monotone and
        ``2**53`` is a float64). Above it, int64 (``__post_init__`` keeps the squares below ``2**62``)."""
        if bound_sq < 2**53 - 1:
            return np.einsum("ij,ij->i", rows, rows, dtype=np.float64)
        ints = rows.astype(np.int64)
        return np.einsum("ij,ij->i", ints, ints)

    def _limits(self) -> tuple[int, int, int]:
        """``(floor(l2_bound^2), floor(l1_bound), t)``: the exact integer limits on a rounded row's
        squared L2 and L1 norms, and the squared L2 norm ``t`` below which its L1 norm cannot exceed
        ``floor(l1_bound)`` (Cauchy-Schwarz: ``L1^2 <= n L2^2``)."""
        l1 = math.floor(Fraction(self.l1_bound))
        return math.floor(Fraction(self.l2_bound) ** 2), l1, -(-((l1 + 1) ** 2) // self.padded_dimension)

    def _outside(self, rows: np.ndarray, limits: tuple[int, int, int]) -> np.ndarray:
        """Exactly which integer-valued rows break the L2 bound or the L1 bound (:meth:`_limits`).

        ``l1_bound`` is a float, ``min(l2^2, sqrt(n) l2)``, and can sit an ulp below the L1 norm of
        a row whose squared L2 norm is exactly ``floor(l2_bound^2)``; the ledger records that float,
        so it must bound every summed row too. Only rows with squared norm at least ``t`` can break
        it: their L1 norms are summed exactly (int64), the rest cost a comparison per row."""
        bound_sq, l1, l1_from = limits
        squares = self._squared_norms(rows, bound_sq)
        over = squares > bound_sq
        if l1_from <= bound_sq:  # exact comparisons: l1_from <= bound_sq (see _squared_norms)
            near = np.flatnonzero(~over & (squares >= l1_from))
            if near.size:
                over[near] = np.abs(rows[near].astype(np.int64)).sum(axis=1) > l1
        return over

    def _round_rows(self, scaled: np.ndarray, stream: KeyStream, work: tuple[np.ndarray, ...] | None = None,
                    ) -> tuple[np.ndarray, int]:
        """Conditional stochastic rounding of each row of ``scaled`` (float32 or float64): the rounded
        rows, integer-valued in ``scaled``'s dtype (``work[0]`` when ``work`` is given), and the
        number of rows rounded toward zero.

        A coordinate ``y = f + r`` (``f = floor(y)``, ``0 <= r <= 1`` as computed) is rounded up
        when ``u < 2**16 r`` for 16 fresh uniform bits ``u``: probability ``ceil(2**16 r) / 2**16``,
        within ``2**-16`` above ``r`` (exact comparison: ``u`` and ``2**16 r`` are exact floats).
        That bias, and any float error in ``y``, costs utility only: the bound is checked exactly
        on the integer vector that is summed (:meth:`_outside`, L2 and L1), whatever the draws were."""
        rows, width = scaled.shape
        dtype = scaled.dtype
        if work is None:
            work = _rounding_work(rows, width, dtype)
        out, thr, u, up = (a[:rows] for a in work)
        limits = self._limits()
        np.floor(scaled, out=out)
        np.subtract(scaled, out, out=thr)
        thr *= 65536.0
        np.less(stream.fill(u), thr, out=up)
        out += up  # out is now the rounded rows
        pending = np.flatnonzero(self._outside(out, limits))
        for _ in range(self.max_tries - 1):
            if pending.size == 0:
                break
            redraw = stream.uint16(pending.size * width).reshape(pending.size, width) < thr[pending]
            candidate = out[pending] - up[pending] + redraw
            ok = ~self._outside(candidate, limits)
            out[pending[ok]] = candidate[ok]
            up[pending[ok]] = redraw[ok]
            pending = pending[~ok]
        fallbacks = int(pending.size)
        if fallbacks:
            toward_zero = np.trunc(scaled[pending])
            # |trunc(y)| <= |y| <= clip * scale <= l2_bound up to float rounding of y; check exactly
            # anyway, and send a zero vector (always within the bound) should rounding ever exceed it
            toward_zero[self._outside(toward_zero, limits)] = 0.0
            out[pending] = toward_zero
        return out, fallbacks

    def round_examples(self, scaled: np.ndarray, stream: KeyStream) -> tuple[np.ndarray, int]:
        """Conditional stochastic rounding of each row of ``scaled`` (already clipped, scaled and
        rotated, e.g. by :meth:`_rotate_rows`; float32 or float64): ``(int64 rows, number of rows
        rounded toward zero)``. The same rounding :meth:`encode_examples` applies."""
        values = np.asarray(scaled)
        if values.dtype not in (np.float32, np.float64):
            values = values.astype(np.float64)
        rounded, fallbacks = self._round_rows(np.ascontiguousarray(values), stream)
        return rounded.astype(np.int64), fallbacks

    def encode_examples(self, gradients: np.ndarray, *, rotation_seed: bytes, stream: KeyStream) -> np.ndarray:
        """The integer sum (int64, ``padded_dimension`` long) of the rounded examples in
        ``gradients`` (one row per sampled example; clipped here). No noise, no wrap yet.

        Works through the rows in chunks of a few MiB with preallocated work arrays (every pass of
        a chunk stays in cache and nothing is allocated per chunk)."""
        grads = np.asarray(gradients)
        if grads.ndim != 2 or grads.shape[1] != self.dimension:
            raise EncodingError(f"gradients must be a (batch, {self.dimension}) array, got shape {grads.shape}")
        if not np.issubdtype(grads.dtype, np.floating) and not np.issubdtype(grads.dtype, np.integer):
            raise EncodingError(f"gradients must be real numbers, got dtype {grads.dtype}")
        if not np.all(np.isfinite(grads)):
            raise EncodingError("gradients contain NaN or infinite values")
        if not isinstance(stream, KeyStream):
            raise EncodingError(f"stream must be a KeyStream, got {type(stream).__name__}")
        signs = _rotation_signs_cached(self.padded_dimension, bytes(rotation_seed)) if self.rotate else None
        total = np.zeros(self.padded_dimension, dtype=np.int64)
        n, dtype = self.padded_dimension, self._work_dtype
        chunk = max(1, min(grads.shape[0], _CHUNK_BYTES // (n * np.dtype(dtype).itemsize)))
        if grads.shape[0] == 0:
            return total
        if not np.issubdtype(grads.dtype, np.floating):
            grads = grads.astype(np.float64)
        rotated, scratch = np.empty((chunk, n), dtype), np.empty((chunk, n), dtype)
        work = _rounding_work(chunk, n, dtype)
        for start in range(0, grads.shape[0], chunk):
            rows = grads[start : start + chunk]
            r = rows.shape[0]
            scaled = self._rotate_rows(rows, signs, factor=self._clip_factors(rows), out=rotated[:r],
                                       scratch=scratch[:r])
            rounded, _ = self._round_rows(scaled, stream, work)
            # exact: integers, each at most l2_bound < 2**31 in absolute value, fewer than 2**22 rows
            total += np.add.reduce(rounded, axis=0, dtype=np.float64).astype(np.int64)
        return total

    def wrap(self, integers: np.ndarray) -> np.ndarray:
        """Integers (int64) modulo ``2**bits``, as field words (:attr:`dtype`)."""
        ints = np.asarray(integers)
        if ints.ndim != 1 or ints.size != self.padded_dimension or ints.dtype != np.int64:
            raise EncodingError(f"expected an int64 vector of length {self.padded_dimension}")
        words = ints.astype(np.uint64)  # two's complement: modulo 2**64
        if self.bits < 64:
            words &= np.uint64(self.modulus - 1)
        return words.astype(self.dtype)

    def unwrap(self, field_sum: np.ndarray) -> np.ndarray:
        """The centred representatives in ``[-2**(bits-1), 2**(bits-1))`` of a summed field vector (int64)."""
        field = np.asarray(field_sum)
        if field.ndim != 1 or field.size != self.padded_dimension or field.dtype != self.dtype:
            raise EncodingError(f"field sums are {self.dtype.__name__} vectors of length {self.padded_dimension}")
        shift = np.uint64(64 - self.bits)  # sign-extend the low ``bits`` bits (any word beyond is dropped)
        return (field.astype(np.uint64) << shift).view(np.int64) >> shift.astype(np.int64)

    def decode_sum(self, field_sum: np.ndarray, *, rotation_seed: bytes) -> np.ndarray:
        """The noisy sum of clipped gradients (float64, ``dimension`` long) from the hospitals'
        summed field vectors: unwrap, inverse rotation, unscale."""
        values = self.unwrap(field_sum).astype(np.float64)[None, :]
        if self.rotate:
            values = _hadamard(values)
            values *= rotation_signs(self.padded_dimension, rotation_seed) / math.sqrt(self.padded_dimension)
        return values[0, : self.dimension] / self.scale


@dataclass(frozen=True, slots=True, kw_only=True)
class EncodingPlan:
    """What :func:`plan_encoding` chose and why (every field public)."""

    encoding: DistributedEncoding
    noise_multiplier: float  # target total noise std / l2_bound from the honest parties
    num_parties: int
    honest_parties: int
    max_batch: int
    share_variance: float  # per party, per coordinate, integer units^2
    wrap_probability: float  # bound on P(any coordinate of the sum wraps)
    range_needed: float  # the high-probability bound on |sum coordinate| that must fit

    @property
    def norm_inflation(self) -> float:
        """``l2_bound / (scale * clip_norm)``: how much rounding inflates the sensitivity."""
        enc = self.encoding
        return enc.l2_bound / (enc.scale * enc.clip_norm)

    @property
    def encoding_overhead(self) -> float:
        """Noise std per coordinate in gradient units, with rounding error, over the central
        mechanism's ``noise_multiplier * clip_norm`` (the honest parties' noise only): 1.0 is free."""
        enc = self.encoding
        rounding_var = self.max_batch / 4.0
        noise_var = (self.noise_multiplier * enc.l2_bound) ** 2
        return math.sqrt(noise_var + rounding_var) / (self.noise_multiplier * enc.scale * enc.clip_norm)


def _range_needed(*, scale: float, clip_norm: float, dimension: int, rotate: bool, num_parties: int,
                  honest_parties: int, max_batch: int, noise_multiplier: float, rounding_beta: float,
                  wrap_probability: float) -> tuple[float, float]:
    """(high-probability bound on |sum coordinate|, share_variance) for this scale."""
    n = _padded(dimension) if rotate else dimension
    log_term = math.log(4.0 * n / wrap_probability)  # each half of the failure budget, per coordinate
    signal_norm = scale * clip_norm * max_batch
    if rotate:  # Hoeffding over the public random signs
        signal = signal_norm * math.sqrt(2.0 * log_term / n)
    else:
        signal = signal_norm
    rounding = float(max_batch)  # each example moves a coordinate by less than 1
    l2 = inflated_l2_bound(scale * clip_norm, n, rounding_beta)
    share_variance = (noise_multiplier * l2) ** 2 / honest_parties
    variance = num_parties * share_variance  # every surviving party's share, up to num_parties
    # Bernstein for a centred Skellam sum: P(|N| >= t) <= 2 exp(-t^2 / (2 (variance + t / 3)))
    b = 2.0 * log_term / 3.0
    noise = (b + math.sqrt(b * b + 8.0 * log_term * variance)) / 2.0
    return signal + rounding + noise, share_variance


def plan_encoding(*, dimension: int, clip_norm: float, noise_multiplier: float, num_parties: int,
                  honest_parties: int, max_batch: int, bits: int, wrap_probability: float = 1e-6,
                  rotate: bool = True, rounding_beta: float = DEFAULT_ROUNDING_BETA) -> EncodingPlan:
    """The largest ``scale`` for which the sum of one step wraps modulo ``2**bits`` with
    probability at most ``wrap_probability``: the documented rule for bit width and scale.

    Per coordinate, the summed value is signal + rounding + noise, each bounded separately
    (union bound; half of ``wrap_probability`` to the signal, half to the noise, spread over the
    ``n`` coordinates):

    * signal: at most ``max_batch`` clipped examples, of total norm at most
      ``scale * clip_norm * max_batch``; after the public random rotation a coordinate exceeds
      ``norm * sqrt(2 ln(4n / p) / n)`` with probability at most ``p / (2n)`` (Hoeffding). Without
      rotation, the whole norm (worst case);
    * rounding: each example moves each coordinate by less than 1, so at most ``max_batch``;
    * noise: the sum of up to ``num_parties`` shares of variance ``share_variance`` (sized so the
      ``honest_parties`` alone give a standard deviation of ``noise_multiplier * l2_bound``);
      Bernstein's inequality for centred Skellam variables.

    The sum of these must be at most ``2**(bits-1) - 1``. ``max_batch`` is a public high-probability
    bound on the records summed in one step across all hospitals (with Poisson sampling, e.g.
    expected + 6 standard deviations); a larger batch only raises the wrap probability (utility),
    never the privacy loss.

    Raises:
        ConfigError: invalid arguments, or no scale fits (too few bits for the noise alone).
    """
    for name, value in (("dimension", dimension), ("num_parties", num_parties),
                        ("honest_parties", honest_parties), ("max_batch", max_batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
    if honest_parties > num_parties:
        raise ConfigError("honest_parties cannot exceed num_parties")
    if not (isinstance(bits, int) and 2 <= bits <= 64):
        raise ConfigError(f"bits must be an int in [2, 64], got {bits!r}")
    for name, value in (("clip_norm", clip_norm), ("noise_multiplier", noise_multiplier)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
    if not (0.0 < wrap_probability < 1.0):
        raise ConfigError(f"wrap_probability must be in (0, 1), got {wrap_probability!r}")
    limit = float((1 << (bits - 1)) - 1)
    kwargs = dict(clip_norm=clip_norm, dimension=dimension, rotate=rotate, num_parties=num_parties,
                  honest_parties=honest_parties, max_batch=max_batch, noise_multiplier=noise_multiplier,
                  rounding_beta=rounding_beta, wrap_probability=wrap_probability)
    n = _padded(dimension) if rotate else dimension
    cap = (math.sqrt(2.0**61) - math.sqrt(n)) / clip_norm  # DistributedEncoding's int64 limit
    lo, hi = 0.0, cap
    if _range_needed(scale=hi, **kwargs)[0] <= limit:
        lo = hi
    else:
        for _ in range(200):
            mid = (lo + hi) / 2.0
            if _range_needed(scale=mid, **kwargs)[0] <= limit:
                lo = mid
            else:
                hi = mid
            if hi - lo <= 1e-9 * hi:
                break
    if lo <= 0.0:
        raise ConfigError(f"{bits} bits cannot hold the noise of {num_parties} parties at any scale: raise bits")
    needed, share_variance = _range_needed(scale=lo, **kwargs)
    encoding = DistributedEncoding(dimension=dimension, clip_norm=float(clip_norm), scale=lo, bits=bits,
                                   rotate=rotate, rounding_beta=rounding_beta)
    return EncodingPlan(encoding=encoding, noise_multiplier=float(noise_multiplier), num_parties=num_parties,
                        honest_parties=honest_parties, max_batch=max_batch, share_variance=share_variance,
                        wrap_probability=float(wrap_probability), range_needed=needed)


def choose_bits(*, max_overhead: float = 0.01, min_bits: int = 8, max_bits: int = 62, **kwargs: object) -> EncodingPlan:
    """The plan with the smallest bit width whose :attr:`EncodingPlan.encoding_overhead` is at
    most ``1 + max_overhead`` (other arguments as :func:`plan_encoding`).

    Raises:
        ConfigError: no width up to ``max_bits`` meets it.
    """
    for bits in range(min_bits, max_bits + 1):
        try:
            plan = plan_encoding(bits=bits, **kwargs)  # type: ignore[arg-type]
        except ConfigError:
            continue
        if plan.encoding_overhead <= 1.0 + max_overhead:
            return plan
    raise ConfigError(f"no bit width up to {max_bits} keeps the encoding overhead within {max_overhead}")
