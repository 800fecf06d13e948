"""Differentially private centring of frozen features.

Sentence embeddings (and many frozen features) share a large common direction: for MiniLM on the
radiology reports the mean embedding has norm 0.78 while every embedding has norm 1. Under DP-SGD
that common part fills most of each per-sample gradient's clipping norm without telling the
classes apart. Subtracting the mean (and scaling the rest up by a public constant) lets the clipped
gradient carry the part that matters -- but the mean depends on the private data, so it must be
released with DP and charged to each client's budget like any other release.

Each client releases, once, the vector

    (sum over its records x of clip(x), n * R)          clip(x) = x * min(1, R / ||x||_2)

with Gaussian noise. One record moves it by at most ``||(clip(x), R)||_2 <= R * sqrt(2)``, so noise
of standard deviation ``noise_multiplier * R * sqrt(2)`` on every coordinate is the Gaussian
mechanism with that noise multiplier: the ledger event
``PoissonGaussianEvent(sample_rate=1.0, noise_multiplier=noise_multiplier, steps=1)``, exactly as
for DP source selection (:mod:`secfedtl.transfer.selection`). Every client adds the *full* noise to
its own vector; secure aggregation sums them and the server divides the summed feature sums by the
summed count (:func:`noisy_mean`), which is post-processing. Every client then maps each of its
records on its own through :class:`CentreScale` (a fixed function of the public noisy mean and the
record alone), so DP-SGD on the centred features keeps its usual per-record guarantee.

Order of :func:`private_feature_sum` (as for a training round): checks of the public arguments,
then ``guard.charge(event)`` (refuses with ``PrivacyBudgetExceeded`` or writes the pending ledger
entry), and only then are the private features read (even their checks), the sum computed and
the noise drawn.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from secfedtl._checks import positive_finite
from secfedtl.errors import InputError
from secfedtl.privacy.accountants import calibrate_gaussian_sum
from secfedtl.privacy.events import PoissonGaussianEvent, gaussian_sum_event
from secfedtl.privacy.noise import add_gaussian_noise

__all__ = ["CentreScale", "MeanMechanism", "clipped_feature_sum", "noisy_mean", "private_feature_sum"]



def _check_dim(dim: object) -> int:
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise InputError(f"dim must be an int >= 1, got {dim!r}")
    return int(dim)


def _check_features(features: object, dim: int | None = None) -> np.ndarray:
    try:
        arr = np.asarray(features, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError("features must be a 2-D array of numbers") from exc
    if arr.ndim != 2 or arr.shape[0] < 1:
        raise InputError(f"features must be a non-empty 2-D array, got shape {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise InputError(f"features have {arr.shape[1]} columns, the mechanism expects {dim}")
    if not np.isfinite(arr).all():
        raise InputError("features must be finite")
    return arr


def _private_features(features: object, dim: int) -> np.ndarray:
    """The private features as a ``(n, dim)`` float array, read inside the charged block: a row
    that is not finite contributes zero (its count term stays, within the sensitivity), and no
    rows give an empty array; neither is an error the server could see. A wrong number of
    columns (a property of the pipeline, not of a record) still raises."""
    try:
        arr = np.asarray(features, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError("features must be a 2-D array of numbers") from exc
    if arr.ndim != 2 or (arr.shape[0] and arr.shape[1] != dim):
        raise InputError(f"features must be a 2-D array with {dim} columns, got shape {arr.shape}")
    return np.where(np.isfinite(arr).all(axis=1, keepdims=True), arr, 0.0).reshape(-1, dim)


@dataclass(frozen=True, slots=True, kw_only=True)
class MeanMechanism:
    """The Gaussian mechanism one client runs on its ``(sum of clipped features, n * R)`` vector.

    Args:
        dim: feature dimension ``d`` (the vector has ``d + 1`` coordinates).
        noise_multiplier: noise standard deviation in units of the L2 sensitivity ``R * sqrt(2)``.
        row_clip: ``R``: every feature vector is scaled down to L2 norm at most ``R`` (default 1,
            a no-op for L2-normalised embeddings, but it is what makes the sensitivity hold).

    Raises:
        InputError: ``dim`` is not an int >= 1.
        ConfigError: ``noise_multiplier`` or ``row_clip`` is not a finite number > 0.
    """

    dim: int
    noise_multiplier: float
    row_clip: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "dim", _check_dim(self.dim))
        object.__setattr__(self, "noise_multiplier", positive_finite("noise_multiplier", self.noise_multiplier))
        object.__setattr__(self, "row_clip", positive_finite("row_clip", self.row_clip))

    @classmethod
    def calibrate(cls, *, dim: int, target_epsilon: float, target_delta: float, row_clip: float = 1.0,
                  accountant: str = "rdp", prior_events: Iterable[PoissonGaussianEvent] = ()) -> MeanMechanism:
        """The mechanism with the smallest noise whose epsilon (after ``prior_events``) is at most
        ``target_epsilon``.

        Raises:
            AccountingError: no noise multiplier up to 1e4 meets the target.
        """
        sigma = calibrate_gaussian_sum(target_epsilon=target_epsilon, target_delta=target_delta,
                                       accountant=accountant, prior_events=prior_events)
        return cls(dim=dim, noise_multiplier=sigma, row_clip=row_clip)

    @property
    def vector_length(self) -> int:
        """``d + 1``: the feature sums and the count."""
        return self.dim + 1

    @property
    def sensitivity(self) -> float:
        """L2 sensitivity ``R * sqrt(2)`` of the vector (the count in units of ``R``)."""
        return self.row_clip * math.sqrt(2.0)

    @property
    def noise_std(self) -> float:
        """Noise standard deviation on every coordinate of the released vector."""
        return self.noise_multiplier * self.sensitivity

    def event(self) -> PoissonGaussianEvent:
        """The ledger event: a Gaussian mechanism on a sum, run once."""
        return gaussian_sum_event(self.noise_multiplier)

    def ledger_fields(self) -> dict[str, Any]:
        """What, besides the event, an auditor needs to check the calibration."""
        return {"task": "feature_mean", "dim": self.dim, "row_clip": self.row_clip, "sensitivity": self.sensitivity}

    def options(self) -> dict[str, Any]:
        """The mechanism as announced in a task request (plain JSON values)."""
        return {"dim": self.dim, "noise_multiplier": self.noise_multiplier, "row_clip": self.row_clip}

    def release(self, statistics: np.ndarray, *, rng: np.random.Generator | None = None) -> np.ndarray:
        """Add the noise to a vector from :func:`clipped_feature_sum`.

        The sharp, lower-level step: it charges no budget; call :func:`private_feature_sum` unless
        you account for the event yourself. Noise comes from ``os.urandom``; ``rng`` makes it
        reproducible and is for tests and experiments only.

        Raises:
            InputError: ``statistics`` is not a finite vector of length ``d + 1``.
        """
        stats = np.asarray(statistics, dtype=np.float64)
        if stats.shape != (self.vector_length,) or not np.isfinite(stats).all():
            raise InputError(f"statistics must be a finite vector of length {self.vector_length}")
        return add_gaussian_noise(stats, self.noise_std, rng=rng)


def clipped_feature_sum(features: np.ndarray, *, row_clip: float = 1.0) -> np.ndarray:
    """Not private: ``(sum of rows scaled to L2 norm <= R, n * R)`` of a ``(n, d)`` array.

    Raises:
        InputError: ``features`` is not a finite, non-empty 2-D array.
        ConfigError: ``row_clip`` is not a finite number > 0.
    """
    clip = positive_finite("row_clip", row_clip)
    x = _check_features(features)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x * np.minimum(1.0, clip / np.maximum(norms, 1e-12))
    return np.concatenate([x.sum(axis=0), [x.shape[0] * clip]])


def private_feature_sum(*, features: np.ndarray, mechanism: MeanMechanism, guard: Any, round: int,  # noqa: A002
                        model_hash: str, rng: np.random.Generator | None = None) -> np.ndarray:
    """One client's DP release of its clipped feature sum and count, charged to its budget first.

    ``guard`` is a :class:`~secfedtl.privacy.budget.BudgetGuard` (anything with ``charge``). The
    ledger entry (event plus :meth:`MeanMechanism.ledger_fields`) is written before the private
    sum is computed; with an exhausted budget ``PrivacyBudgetExceeded`` is raised and nothing is
    written or computed. ``rng``: see :meth:`MeanMechanism.release`.

    Raises:
        PrivacyBudgetExceeded: the event would exceed the client's budget (nothing changed).
        InputError: bad arguments (checked before the charge), or features that are not a 2-D
            array of ``dim`` columns (checked after it: nothing about the private features is
            read before the charge). Non-finite rows contribute zero and empty features give
            zeros: no refusal depends on a record.
    """
    if not isinstance(mechanism, MeanMechanism):
        raise InputError("mechanism must be a MeanMechanism")
    if rng is not None and not isinstance(rng, np.random.Generator):
        raise InputError(f"rng must be a numpy Generator or None, got {type(rng).__name__}")
    if not callable(getattr(guard, "charge", None)):
        raise InputError("guard must provide charge(event, *, round, model_hash)")
    # Charge first: the features (even their shape) are read only inside the charged block.
    with guard.charge(mechanism.event(), round=round, model_hash=model_hash, release="feature_mean",
                      randomness="csprng" if rng is None else "insecure_seeded", params=mechanism.ledger_fields()):
        x = _private_features(features, mechanism.dim)
        stats = clipped_feature_sum(x, row_clip=mechanism.row_clip) if len(x) else np.zeros(mechanism.vector_length)
        return mechanism.release(stats, rng=rng)


def noisy_mean(aggregate: np.ndarray, *, mechanism: MeanMechanism, min_count: float = 1.0) -> np.ndarray:
    """The mean feature from the summed releases: feature sums over the count (post-processing).

    Raises:
        InputError: ``aggregate`` is not a finite vector of length ``d + 1``, or the noisy count is
            below ``min_count`` (the ratio would mean nothing).
    """
    vec = np.asarray(aggregate, dtype=np.float64)
    if vec.shape != (mechanism.vector_length,) or not np.isfinite(vec).all():
        raise InputError(f"aggregate must be a finite vector of length {mechanism.vector_length}")
    count = float(vec[-1]) / mechanism.row_clip
    if count < min_count:
        raise InputError(f"noisy count {count:.3g} is below {min_count}: no mean")
    return vec[:-1] / count


@dataclass(frozen=True, slots=True, kw_only=True)
class CentreScale:
    """``x -> (x - centre) * scale`` row by row: a fixed, public map once ``centre`` is released.

    Raises:
        InputError: ``centre`` is not a finite 1-D vector.
        ConfigError: ``scale`` is not a finite number > 0.
    """

    centre: tuple[float, ...]
    scale: float = 1.0

    def __post_init__(self) -> None:
        c = np.asarray(self.centre, dtype=np.float64)
        if c.ndim != 1 or c.size < 1 or not np.isfinite(c).all():
            raise InputError("centre must be a non-empty, finite 1-D vector")
        object.__setattr__(self, "centre", tuple(float(v) for v in c))
        object.__setattr__(self, "scale", positive_finite("scale", self.scale))

    def __call__(self, features: np.ndarray) -> np.ndarray:
        x = _check_features(features, len(self.centre))
        out = (x - np.asarray(self.centre)) * self.scale
        dtype = features.dtype if isinstance(features, np.ndarray) and features.dtype.kind == "f" else np.float64
        return out.astype(dtype)
