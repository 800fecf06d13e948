"""Argument checks shared by more than one module. Imports nothing of ours but :mod:`secfedtl.errors`."""

from __future__ import annotations

import math

from secfedtl.errors import ConfigError


def positive_finite(name: str, value: object) -> float:
    """``value`` as a float when it is a finite number > 0 (not a bool); else :class:`ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)
