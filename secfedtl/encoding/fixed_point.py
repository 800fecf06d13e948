"""Fixed-point quantisation into Z_2^b with unbiased stochastic rounding.

A client's update ``x`` (any length ``m``) and its integer weight ``w`` (sample count) become the
field vector ``[SR(w * clip(x) * scale), w]`` of length ``m + 1``; sums of such vectors modulo
``2**bits`` decode to ``(sum_k w_k x_k, sum_k w_k)`` exactly up to rounding, because the
encoding is chosen so that the true integer sum can never wrap:

    num_clients * (max_weight * clip * scale + 1) <= 2**(bits - 1) - 1.

``scale`` is a power of two (so ``x * scale`` is exact in floating point). Stochastic rounding is
unbiased (``E[SR(v)] = v``) and moves each coordinate by less than one unit, so the dequantised
total of ``n`` clients is within ``n / scale`` of the float sum in every coordinate, plus a
float64 rounding term that only matters at 64 bits (:meth:`FixedPointEncoding.error_bound`). The rounding randomness is not a secret; it comes from a
numpy generator the caller may seed for reproducibility.
"""

from __future__ import annotations

import math
from fractions import Fraction
from dataclasses import dataclass

import numpy as np

from secfedtl.errors import ConfigError, EncodingError

MIN_BITS = 8  # the field: distributed noise's integer sessions (no weight word) go this low
MAX_BITS = 64
#: A float update (local noise, selection statistics, a preparation's sums) needs at least this
#: many bits of field: the job file's check and every node refuse a fixed-point encoding below it
MIN_FIXED_POINT_BITS = 16


@dataclass(frozen=True, slots=True, kw_only=True)
class FixedPointEncoding:
    """How floats become elements of Z_2^bits (see the module docstring)."""

    clip: float
    bits: int
    num_clients: int
    max_weight: int = 1
    scale: float | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.bits, int) and MIN_BITS <= self.bits <= MAX_BITS):
            raise ConfigError(f"bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {self.bits!r}")
        if not (isinstance(self.clip, (int, float)) and math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError(f"clip must be a finite positive number, got {self.clip!r}")
        if not (isinstance(self.num_clients, int) and self.num_clients >= 1):
            raise ConfigError("num_clients must be a positive integer")
        if not (isinstance(self.max_weight, int) and self.max_weight >= 1):
            raise ConfigError("max_weight must be a positive integer")
        limit = (1 << (self.bits - 1)) - 1
        if self.num_clients * self.max_weight > limit:
            raise ConfigError("num_clients * max_weight does not fit in the field: raise bits")
        largest = (limit / self.num_clients - 1) / (self.max_weight * self.clip)
        if self.scale is None:
            if largest < 1:
                raise ConfigError(
                    f"{self.bits} bits cannot hold {self.num_clients} clients' values of magnitude "
                    f"{self.max_weight * self.clip} at any useful precision: raise bits")
            scale = float(2.0 ** math.floor(math.log2(largest)))
            while not self._fits(scale, limit):  # float rounding of ``largest`` (e.g. at 64 bits)
                scale /= 2.0
            object.__setattr__(self, "scale", scale)
        else:
            if not (math.isfinite(self.scale) and self.scale > 0):
                raise ConfigError("scale must be finite and positive")
            if not self._fits(self.scale, limit):
                raise ConfigError(
                    f"scale {self.scale} lets {self.num_clients} clipped values wrap modulo "
                    f"2**{self.bits}; the largest safe scale is {largest:.6g}")

    def _fits(self, scale: float, limit: int) -> bool:
        """The no-wrap rule, in exact rational arithmetic (floats round 2**63 - 1 up to 2**63)."""
        bound = Fraction(self.max_weight) * Fraction(self.clip) * Fraction(scale) + 1
        return self.num_clients * bound <= limit

    @property
    def dtype(self) -> type:
        return np.uint32 if self.bits <= 32 else np.uint64

    @property
    def modulus(self) -> int:
        return 1 << self.bits

    def error_bound(self, num_summed: int) -> float:
        """Largest absolute difference, per coordinate, between the dequantised total of
        ``num_summed`` clients and the float sum of their clipped, weighted inputs.

        ``num_summed / scale`` is the rounding to the grid; the second term covers float64
        rounding (2**-53 relative, at most three times: scaling, decoding, the reference sum),
        which exceeds one grid unit once ``bits`` > 53 (the 64-bit grid is finer than float64)."""
        return num_summed / self.scale + num_summed * self.max_weight * self.clip * 2.0 ** -51

    def encode(self, values: np.ndarray, *, weight: int = 1,
               rng: np.random.Generator | None = None) -> np.ndarray:
        """Clip, weight, quantise: returns a field vector of ``len(values) + 1`` words."""
        x = np.asarray(values)
        if x.ndim != 1:
            raise EncodingError(f"updates are 1-D vectors, got shape {x.shape}")
        if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
            raise EncodingError(f"updates are real numbers, got dtype {x.dtype}")
        x = x.astype(np.float64)
        if not np.all(np.isfinite(x)):
            raise EncodingError("update contains NaN or infinite values")
        if isinstance(weight, bool) or not isinstance(weight, (int, np.integer)):
            raise EncodingError("weight must be an integer sample count")
        if not 0 <= int(weight) <= self.max_weight:
            raise EncodingError(f"weight {weight} outside [0, {self.max_weight}]")
        rng = np.random.default_rng() if rng is None else rng
        scaled = np.clip(x, -self.clip, self.clip) * (int(weight) * self.scale)
        low = np.floor(scaled)
        rounded = low + (rng.random(scaled.shape) < (scaled - low))
        out = np.empty(x.size + 1, dtype=self.dtype)
        out[:-1] = rounded.astype(np.int64).astype(self.dtype)  # two's complement, wraps mod 2^word
        out[-1] = int(weight)
        return self.reduce(out)

    def reduce(self, field: np.ndarray) -> np.ndarray:
        """Reduce word-size integers modulo ``2**bits`` in place."""
        if self.bits not in (32, 64):
            np.bitwise_and(field, field.dtype.type(self.modulus - 1), out=field)
        return field

    def decode_sum(self, field_sum: np.ndarray) -> tuple[np.ndarray, int]:
        """``(sum_k w_k x_k, sum_k w_k)`` from a summed field vector."""
        field = np.asarray(field_sum)
        if field.ndim != 1 or field.size < 1 or field.dtype != self.dtype:
            raise EncodingError("field sums are 1-D vectors of the encoding's word type")
        if self.bits == 64:
            signed = field.view(np.int64).astype(np.float64)
        else:
            signed = field.astype(np.int64)
            signed = np.where(signed >= (1 << (self.bits - 1)), signed - self.modulus, signed)
            signed = signed.astype(np.float64)
        weight_total = int(field[-1])
        return signed[:-1] / self.scale, weight_total
