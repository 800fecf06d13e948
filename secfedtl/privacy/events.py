"""Mechanisms as data: immutable descriptions of what was run, which any accountant can interpret.

The habit comes from ``dp_accounting/dp_event.py``: record the mechanism (sample rate, noise
multiplier, steps), not only the epsilon that came out, so an auditor can recompute the privacy
loss with another accountant.

Two mechanisms exist:

* :class:`PoissonGaussianEvent`, the Poisson-subsampled Gaussian mechanism that DP-SGD runs with
  local noise. A plain Gaussian mechanism on a sum is the special case ``sample_rate=1.0, steps=1``.
* :class:`PoissonSkellamEvent`, distributed DP-SGD: the Poisson-subsampled Skellam mechanism on
  integer-encoded gradients, its noise split across hospitals and summed by secure aggregation
  (:mod:`secfedtl.privacy.discrete_noise`, :mod:`secfedtl.encoding.distributed`).

Serialisation goes through a FIXED registry (:data:`EVENT_TYPES`): the ``mechanism`` string of a
dict selects one of the classes listed here, never a class imported by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from secfedtl.errors import AccountingError

__all__ = ["EVENT_TYPES", "DpEvent", "PoissonGaussianEvent", "PoissonSkellamEvent", "event_from_dict",
           "gaussian_sum_event"]


def _as_float(name: str, value: object) -> float:
    """Return ``value`` as a float; refuse bools, strings and anything that is not a real number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AccountingError(f"{name} must be a real number, got {type(value).__name__}")
    result = float(value)
    if not math.isfinite(result):
        raise AccountingError(f"{name} must be finite, got {value!r}")
    return result


def _as_int(name: str, value: object, *, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise AccountingError(f"{name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        raise AccountingError(f"{name} must be in [{low}, {high if high is not None else 'inf'}], got {value}")
    return value


def _as_positive(name: str, value: object) -> float:
    result = _as_float(name, value)
    if not result > 0.0:
        raise AccountingError(f"{name} must be > 0, got {value!r}")
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


@dataclass(frozen=True, slots=True, kw_only=True)
class PoissonSkellamEvent:
    """``steps`` self-compositions of the Poisson-subsampled distributed Skellam mechanism.

    Each step samples every record independently with probability ``sample_rate``; each sampled
    record's clipped gradient is scaled, optionally rotated, and rounded to an integer vector of
    L2 norm at most ``l2_bound`` (and so L1 norm at most ``l1_bound``; both in integer units, the
    rounding inflation included); every hospital adds ``Sk(share_variance / 2)`` noise to each of
    the ``dimension`` coordinates of its integer sum, and secure aggregation reveals only the
    sum modulo ``2**bits``. The accountant assumes that ``honest_parties`` hospitals' noise is
    present and unknown to the adversary, so the sum carries at least
    ``Sk(honest_parties * share_variance / 2)`` (Skellam is closed under summation). ``scale``
    (integer units per unit of gradient) and ``bits`` describe the encoding for the auditor; the
    privacy loss depends only on ``sample_rate``, ``steps``, the honest noise and the two norms.

    Raises:
        AccountingError: a field outside its range, or ``l1_bound`` below what integrality
            guarantees, ``min(l2_bound**2, sqrt(dimension) * l2_bound)`` (a smaller L1 bound is
            never enforced by the encoder, so recording it would under-charge).
    """

    mechanism: ClassVar[str] = "poisson_skellam"

    sample_rate: float
    steps: int
    share_variance: float
    honest_parties: int
    l2_bound: float
    l1_bound: float
    dimension: int
    scale: float
    bits: int

    def __post_init__(self) -> None:
        sample_rate = _as_float("sample_rate", self.sample_rate)
        if not 0.0 < sample_rate <= 1.0:
            raise AccountingError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        _as_int("steps", self.steps, low=1)
        _as_int("honest_parties", self.honest_parties, low=1)
        _as_int("dimension", self.dimension, low=1)
        _as_int("bits", self.bits, low=2, high=64)
        floats = {name: _as_positive(name, getattr(self, name))
                  for name in ("share_variance", "l2_bound", "l1_bound", "scale")}
        guaranteed = min(floats["l2_bound"] ** 2, math.sqrt(self.dimension) * floats["l2_bound"])
        if floats["l1_bound"] < guaranteed * (1.0 - 1e-12):
            raise AccountingError(
                f"l1_bound {floats['l1_bound']!r} is below min(l2_bound**2, sqrt(dimension) * l2_bound) = "
                f"{guaranteed!r}, which is all the encoding guarantees")
        object.__setattr__(self, "sample_rate", sample_rate)
        for name, value in floats.items():
            object.__setattr__(self, name, value)

    @property
    def total_mu(self) -> float:
        """Skellam parameter of the honest parties' summed noise (per coordinate: ``Sk(mu)``,
        variance ``2 mu``)."""
        return self.honest_parties * self.share_variance / 2.0

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict; :func:`event_from_dict` inverts it exactly."""
        return {"mechanism": self.mechanism, **{name: getattr(self, name) for name in _SKELLAM_FIELDS}}

    @classmethod
    def _from_fields(cls, data: Mapping[str, Any]) -> PoissonSkellamEvent:
        expected = {"mechanism", *_SKELLAM_FIELDS}
        if set(data) != expected:
            raise AccountingError(
                f"{cls.mechanism} event needs exactly the fields {sorted(expected)}, "
                f"got {sorted(map(str, data))}"
            )
        return cls(**{name: data[name] for name in _SKELLAM_FIELDS})


_SKELLAM_FIELDS = ("sample_rate", "steps", "share_variance", "honest_parties", "l2_bound", "l1_bound",
                   "dimension", "scale", "bits")

#: Any mechanism the ledger and the accountants know.
DpEvent = PoissonGaussianEvent | PoissonSkellamEvent

#: The fixed registry of event types, keyed by their ``mechanism`` string.
#: Never remove or reuse a key: a new mechanism gets a new name.
EVENT_TYPES: Mapping[str, type[PoissonGaussianEvent] | type[PoissonSkellamEvent]] = {
    PoissonGaussianEvent.mechanism: PoissonGaussianEvent,
    PoissonSkellamEvent.mechanism: PoissonSkellamEvent,
}


def gaussian_sum_event(noise_multiplier: float) -> PoissonGaussianEvent:
    """The ledger event of a Gaussian mechanism run once on a sum: ``poisson_gaussian`` with
    sample rate 1 and one step."""
    return PoissonGaussianEvent(sample_rate=1.0, noise_multiplier=noise_multiplier, steps=1)


def event_from_dict(data: Mapping[str, Any]) -> DpEvent:
    """Rebuild an event from the ``to_dict`` output of any registered event type.

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
