"""Gaussian noise from the operating system's CSPRNG, for mechanisms that release a noisy value.

:func:`secure_gaussian_array` is the one implementation: Box-Muller on 53-bit uniforms drawn from
``os.urandom``, four draws summed and halved (Opacus' secure-mode construction, the floating-point
attack mitigation of arXiv:2107.10138) so the low bits of one float do not reveal the sample.
DP-SGD's secure mode (:func:`secfedtl.training.dpsgd.secure_gaussian`), DP source-model selection
(:mod:`secfedtl.transfer.selection`) and DP feature centring (:mod:`secfedtl.transfer.centring`)
draw through it, the last two by :func:`add_gaussian_noise`. numpy only: no torch.
"""

from __future__ import annotations

import math
import os

import numpy as np

from secfedtl.errors import InputError

__all__ = ["add_gaussian_noise", "secure_gaussian_array"]

_MASK_53 = (1 << 53) - 1


def secure_gaussian_array(shape: int | tuple[int, ...], *, std: float) -> np.ndarray:
    """A float64 array of ``shape`` with i.i.d. ``N(0, std^2)`` entries drawn from ``os.urandom``.

    Raises:
        InputError: ``std`` is negative or not finite, or ``shape`` has a negative size.
    """
    if isinstance(shape, (int, np.integer)):
        dims: tuple = (shape,)
    elif isinstance(shape, (tuple, list)):
        dims = tuple(shape)
    else:
        raise InputError(f"shape must be an int or a tuple of ints, got {shape!r}")
    if any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 0 for d in dims):
        raise InputError(f"shape must be non-negative ints, got {shape!r}")
    if isinstance(std, bool) or not isinstance(std, (int, float)) or not (math.isfinite(std) and std >= 0):
        raise InputError(f"std must be a finite number >= 0, got {std!r}")
    n = math.prod(dims)
    if n == 0 or std == 0:
        return np.zeros(dims, dtype=np.float64)
    total = np.zeros(n, dtype=np.float64)
    for _ in range(4):
        raw = np.frombuffer(os.urandom(16 * n), dtype=np.uint64).reshape(2, n)
        u = ((raw >> np.uint64(11)) & np.uint64(_MASK_53)).astype(np.float64)
        u = (u + 0.5) / 2.0**53  # in (0, 1)
        total += np.sqrt(-2.0 * np.log(u[0])) * np.cos(2.0 * math.pi * u[1])
    return (total * (float(std) / 2.0)).reshape(dims)


def add_gaussian_noise(values: np.ndarray, std: float | np.ndarray, *,
                       rng: np.random.Generator | None = None) -> np.ndarray:
    """``values`` (a float64 vector) plus independent ``N(0, std^2)`` noise on every coordinate;
    ``std`` is one number or one per coordinate. The noise comes from ``os.urandom``
    (:func:`secure_gaussian_array`); ``rng`` makes it reproducible, for tests and experiments only.

    Raises:
        InputError: ``rng`` is neither None nor a numpy Generator.
    """
    if rng is None:
        noise = secure_gaussian_array(values.shape, std=1.0)
    elif isinstance(rng, np.random.Generator):
        noise = rng.standard_normal(values.shape)
    else:
        raise InputError(f"rng must be a numpy Generator or None, got {type(rng).__name__}")
    return values + noise * std
