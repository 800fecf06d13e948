"""Mechanisms as data: immutable descriptions of what was run, which any accountant can interpret.

The habit comes from ``dp_accounting/dp_event.py``: record the mechanism (sample rate, noise
multiplier, steps), not only the epsilon that came out, so an auditor can recompute the privacy
loss with another accountant.

Only one mechanism exists today, the Poisson-subsampled Gaussian mechanism that DP-SGD runs. A
plain Gaussian mechanism on a sum is the special case ``sample_rate=1.0, steps=1``.

Serialisation goes through a FIXED registry (:data:`EVENT_TYPES`): the ``mechanism`` string of a
dict selects one of the classes listed here, never a class imported by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from secfedtl.errors import AccountingError

__all__ = ["EVENT_TYPES", "PoissonGaussianEvent", "event_from_dict", "gaussian_sum_event"]


def _as_float(name: str, value: object) -> float:
    """Return ``value`` as a float; refuse bools, strings and anything that is not a real number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AccountingError(f"{name} must be a real number, got {type(value).__name__}")
    result = float(value)
    if not math.isfinite(result):
        raise AccountingError(f"{name} must be finite, got {value!r}")
    return result


@dataclass(frozen=True, slots=True, kw_only=True)
class PoissonGaussianEvent:
    """``steps`` self-compositions of the Poisson-subsampled Gaussian mechanism.

    Each step samples every record independently with probability ``sample_rate``, clips each
    per-sample gradient to norm ``C`` and adds Gaussian noise of standard deviation
    ``noise_multiplier * C`` to the sum (DP-SGD, Abadi et al. 2016).

    Raises:
        AccountingError: ``sample_rate`` outside ``(0, 1]``, ``noise_multiplier`` not a positive
            finite number, or ``steps`` not an integer ``>= 1``.
    """

    mechanism: ClassVar[str] = "poisson_gaussian"

    sample_rate: float
    noise_multiplier: float
    steps: int

    def __post_init__(self) -> None:
        sample_rate = _as_float("sample_rate", self.sample_rate)
        if not 0.0 < sample_rate <= 1.0:
            raise AccountingError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        noise_multiplier = _as_float("noise_multiplier", self.noise_multiplier)
        if not noise_multiplier > 0.0:
            raise AccountingError(f"noise_multiplier must be > 0, got {noise_multiplier!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int):
            raise AccountingError(f"steps must be an int, got {type(self.steps).__name__}")
        if self.steps < 1:
            raise AccountingError(f"steps must be >= 1, got {self.steps}")
        # Normalise ints to floats so equal events compare and hash equal.
        object.__setattr__(self, "sample_rate", sample_rate)
        object.__setattr__(self, "noise_multiplier", noise_multiplier)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict; :func:`event_from_dict` inverts it exactly."""
        return {
            "mechanism": self.mechanism,
            "sample_rate": self.sample_rate,
            "noise_multiplier": self.noise_multiplier,
            "steps": self.steps,
        }

    @classmethod
    def _from_fields(cls, data: Mapping[str, Any]) -> PoissonGaussianEvent:
        expected = {"mechanism", "sample_rate", "noise_multiplier", "steps"}
        if set(data) != expected:
            raise AccountingError(
                f"{cls.mechanism} event needs exactly the fields {sorted(expected)}, "
                f"got {sorted(map(str, data))}"
            )
        return cls(
            sample_rate=data["sample_rate"],
            noise_multiplier=data["noise_multiplier"],
            steps=data["steps"],
        )


#: The fixed registry of event types, keyed by their ``mechanism`` string.
#: Never remove or reuse a key: a new mechanism gets a new name.
EVENT_TYPES: Mapping[str, type[PoissonGaussianEvent]] = {
    PoissonGaussianEvent.mechanism: PoissonGaussianEvent,
}


def gaussian_sum_event(noise_multiplier: float) -> PoissonGaussianEvent:
    """The ledger event of a Gaussian mechanism run once on a sum: ``poisson_gaussian`` with
    sample rate 1 and one step."""
    return PoissonGaussianEvent(sample_rate=1.0, noise_multiplier=noise_multiplier, steps=1)


def event_from_dict(data: Mapping[str, Any]) -> PoissonGaussianEvent:
    """Rebuild an event from :meth:`PoissonGaussianEvent.to_dict` output.

    Raises:
        AccountingError: ``data`` is not a mapping, names an unknown mechanism, has missing or
            extra fields, or carries invalid values.
    """
    if not isinstance(data, Mapping):
        raise AccountingError(f"an event must be a mapping, got {type(data).__name__}")
    mechanism = data.get("mechanism")
    if not isinstance(mechanism, str) or mechanism not in EVENT_TYPES:
        raise AccountingError(f"unknown mechanism {mechanism!r}; known: {sorted(EVENT_TYPES)}")
    return EVENT_TYPES[mechanism]._from_fields(data)
