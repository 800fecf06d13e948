"""Differentially private source-model selection.

Given ``K`` candidate source models, every client evaluates each of them on its own validation
data and releases, with Gaussian noise, the vector

    (S_1, ..., S_K, n)      S_k = sum over its records x of min(max(loss_k(x), 0), C)

of clipped per-sample loss sums and its record count. The clients' vectors are summed by secure
aggregation; the server picks the candidate with the lowest noisy mean loss (:func:`select_candidate`).

Sensitivity (add/remove one record; derivation in docs/privacy.md). Count the record count in units
of ``C``: one record then adds ``u(x) = (clip(loss_1(x)), ..., clip(loss_K(x)), C)``, a vector in
``[0, C]^(K+1)``, so the released sum moves by at most ``||u(x)||_2 <= C * sqrt(K + 1)``, reached by
a record whose every loss is clipped at ``C``. Gaussian noise of standard deviation
``noise_multiplier * C * sqrt(K + 1)`` on every coordinate of that vector is the Gaussian mechanism
with noise multiplier ``noise_multiplier``: the ledger event
``PoissonGaussianEvent(sample_rate=1.0, noise_multiplier=noise_multiplier, steps=1)``. Back in
natural units the loss sums carry noise of standard deviation ``noise_multiplier * C * sqrt(K+1)``
and the count ``noise_multiplier * sqrt(K+1)``.

Every client adds the *full* noise to its own vector: its release is DP on its own, whatever the
server or the other clients do, and secure aggregation adds nothing to the guarantee (as for
training; see docs/privacy.md for why we do not split the noise between clients).

Order of :func:`private_selection_statistics` (as for a training round): checks of the public
arguments, then ``guard.charge(event)`` refuses (``PrivacyBudgetExceeded``) or writes the pending
ledger entry, and only then is the private data read (even its length), the losses computed and
the noise drawn. A record whose loss is not finite counts as the clipped maximum, never as an
error: whether a private record breaks a model is information about the data, and a failure
would show it to the server.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from secfedtl._checks import positive_finite
from secfedtl.errors import InputError
from secfedtl.privacy.accountants import calibrate_gaussian_sum
from secfedtl.privacy.events import PoissonGaussianEvent, gaussian_sum_event
from secfedtl.privacy.noise import add_gaussian_noise
from secfedtl.transfer.distillation import cross_entropy_loss

__all__ = [
    "SelectionMechanism",
    "SelectionResult",
    "clipped_loss_sums",
    "private_selection_statistics",
    "select_candidate",
]



def _check_num_candidates(num_candidates: object) -> int:
    if isinstance(num_candidates, bool) or not isinstance(num_candidates, (int, np.integer)):
        raise InputError(f"num_candidates must be an int, got {type(num_candidates).__name__}")
    if num_candidates < 1:
        raise InputError("there must be at least one candidate")
    return int(num_candidates)


@dataclass(frozen=True, slots=True, kw_only=True)
class SelectionMechanism:
    """The Gaussian mechanism one client runs on its ``(S_1..S_K, n)`` vector.

    Args:
        num_candidates: ``K``, the number of candidate models (>= 1).
        loss_clip: ``C``: every per-sample loss is clipped to ``[0, C]``.
        noise_multiplier: noise standard deviation in units of the L2 sensitivity.

    Raises:
        InputError: ``num_candidates`` is not an int >= 1.
        ConfigError: ``loss_clip`` or ``noise_multiplier`` is not a finite number > 0.
    """

    num_candidates: int
    loss_clip: float
    noise_multiplier: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "num_candidates", _check_num_candidates(self.num_candidates))
        object.__setattr__(self, "loss_clip", positive_finite("loss_clip", self.loss_clip))
        object.__setattr__(self, "noise_multiplier", positive_finite("noise_multiplier", self.noise_multiplier))

    @classmethod
    def calibrate(
        cls,
        *,
        num_candidates: int,
        loss_clip: float,
        target_epsilon: float,
        target_delta: float,
        accountant: str = "rdp",
        prior_events: Iterable[PoissonGaussianEvent] = (),
    ) -> SelectionMechanism:
        """The mechanism with the smallest noise whose epsilon (after ``prior_events``) is at most
        ``target_epsilon`` (:func:`~secfedtl.privacy.accountants.calibrate_gaussian_sum`).

        Raises:
            AccountingError: no noise multiplier up to 1e4 meets the target (for example a target
                below the RDP floor of about 0.103 at delta = 1e-5).
        """
        sigma = calibrate_gaussian_sum(target_epsilon=target_epsilon, target_delta=target_delta,
                                       accountant=accountant, prior_events=prior_events)
        return cls(num_candidates=num_candidates, loss_clip=loss_clip, noise_multiplier=sigma)

    @property
    def vector_length(self) -> int:
        """``K + 1``: the loss sums and the count."""
        return self.num_candidates + 1

    @property
    def sensitivity(self) -> float:
        """L2 sensitivity ``C * sqrt(K + 1)`` of the vector with the count in units of ``C``."""
        return self.loss_clip * math.sqrt(self.num_candidates + 1)

    @property
    def loss_noise_std(self) -> float:
        """Noise standard deviation on each loss sum."""
        return self.noise_multiplier * self.sensitivity

    @property
    def count_noise_std(self) -> float:
        """Noise standard deviation on the count (natural units)."""
        return self.noise_multiplier * math.sqrt(self.num_candidates + 1)

    def noise_std(self) -> np.ndarray:
        """Per-coordinate noise standard deviations of the released vector."""
        std = np.full(self.vector_length, self.loss_noise_std)
        std[-1] = self.count_noise_std
        return std

    def event(self) -> PoissonGaussianEvent:
        """The ledger event: a Gaussian mechanism on a sum, run once."""
        return gaussian_sum_event(self.noise_multiplier)

    def ledger_fields(self) -> dict[str, Any]:
        """What, besides the event, an auditor needs to check the calibration."""
        return {"task": "select", "num_candidates": self.num_candidates, "loss_clip": self.loss_clip,
                "sensitivity": self.sensitivity}

    def release(self, statistics: np.ndarray, *, rng: np.random.Generator | None = None) -> np.ndarray:
        """Add the noise to a client's ``(S_1..S_K, n)`` vector from :func:`clipped_loss_sums`.

        This is the sharp, lower-level step: it charges no budget. Call
        :func:`private_selection_statistics` unless you account for the event yourself. Noise comes
        from ``os.urandom``; ``rng`` makes it reproducible and is for tests and experiments only.

        Raises:
            InputError: ``statistics`` is not a finite vector of length ``K + 1``.
        """
        stats = _check_vector("statistics", statistics, self.vector_length)
        return add_gaussian_noise(stats, self.noise_std(), rng=rng)


def _check_vector(name: str, value: object, length: int) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} must be a vector of numbers") from exc
    if arr.shape != (length,):
        raise InputError(f"{name} must have shape ({length},), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise InputError(f"{name} must be finite")
    return arr.copy()


def _check_candidates(candidates: Sequence[nn.Module]) -> list[nn.Module]:
    if isinstance(candidates, nn.Module) or not isinstance(candidates, Sequence):
        raise InputError("candidates must be a sequence of models")
    if len(candidates) == 0:
        raise InputError("there must be at least one candidate model")
    for k, model in enumerate(candidates):
        if not isinstance(model, nn.Module):
            raise InputError(f"candidate {k} is a {type(model).__name__}, not an nn.Module")
    return list(candidates)


def _check_data(data: Dataset, *, allow_empty: bool = False) -> int:
    try:
        n = len(data)  # type: ignore[arg-type]
    except TypeError as exc:
        raise InputError("data must have a length") from exc
    if n < 1 and not allow_empty:
        raise InputError("cannot evaluate candidates on an empty dataset")
    return n


@torch.no_grad()
def clipped_loss_sums(
    candidates: Sequence[nn.Module],
    data: Dataset,
    *,
    loss_clip: float,
    loss_fn: Any = cross_entropy_loss,
    batch_size: int = 256,
) -> np.ndarray:
    """Not private: ``(S_1, ..., S_K, n)`` with ``S_k`` the sum of ``loss_k`` clipped to ``[0, C]``.

    ``loss_fn(model, inputs, targets)`` returns one loss per example (default: cross entropy of
    the logits). Every candidate runs in eval mode; its previous mode is restored.

    A non-finite per-sample loss counts as ``loss_clip``; empty data gives zeros.

    Raises:
        InputError: no candidates, or a loss that is not one value per example (a model whose
            output does not fit the targets).
        ConfigError: ``loss_clip`` is not a finite number > 0.
    """
    models = _check_candidates(candidates)
    clip = positive_finite("loss_clip", loss_clip)
    n = _check_data(data, allow_empty=True)
    sums = np.zeros(len(models) + 1, dtype=np.float64)
    if n == 0:
        return sums
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        for x, y in DataLoader(data, batch_size=batch_size, shuffle=False):
            y = torch.as_tensor(y)
            for k, model in enumerate(models):
                device = next((p.device for p in model.parameters()), torch.device("cpu"))
                try:
                    losses = loss_fn(model, x.to(device), y.to(device))
                except (RuntimeError, ValueError, IndexError) as exc:
                    raise InputError(f"candidate {k} cannot be evaluated on this data: {exc}") from exc
                if not isinstance(losses, torch.Tensor) or losses.shape != (len(y),):
                    shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
                    raise InputError(f"candidate {k}: the loss must give one value per example, got {shape}")
                # A non-finite loss counts as the largest clipped loss: whether some record breaks a
                # candidate must not show as an error (the server would see it), and the sum's
                # sensitivity stays loss_clip.
                losses = torch.where(torch.isfinite(losses), losses.double(), torch.full_like(losses, clip, dtype=torch.float64))
                sums[k] += float(losses.clamp(0.0, clip).sum())
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    sums[-1] = n
    return sums


def private_selection_statistics(
    *,
    candidates: Sequence[nn.Module],
    data: Dataset,
    mechanism: SelectionMechanism,
    guard: Any,
    round: int,  # noqa: A002 - the ledger field is called "round"
    model_hash: str,
    loss_fn: Any = cross_entropy_loss,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """One client's DP release ``(S_1..S_K, n) + noise``, charged to its budget first.

    ``guard`` is a :class:`~secfedtl.privacy.budget.BudgetGuard` (anything with ``charge``). The
    ledger entry (event plus :meth:`SelectionMechanism.ledger_fields`) is written before any
    private value is computed; with an exhausted budget ``PrivacyBudgetExceeded`` is raised and
    nothing is written or computed. ``rng``: see :meth:`SelectionMechanism.release`.

    Raises:
        PrivacyBudgetExceeded: the event would exceed the client's budget (nothing changed).
        InputError: bad arguments (before the charge). Empty data and non-finite losses are not
            errors (zeros, and the clipped maximum): a refusal that depends on the data would
            tell the server something no charge covers.
    """
    if not isinstance(mechanism, SelectionMechanism):
        raise InputError("mechanism must be a SelectionMechanism")
    models = _check_candidates(candidates)
    if len(models) != mechanism.num_candidates:
        raise InputError(f"{len(models)} candidate models for a mechanism of {mechanism.num_candidates}")
    if rng is not None and not isinstance(rng, np.random.Generator):
        raise InputError(f"rng must be a numpy Generator or None, got {type(rng).__name__}")
    if not callable(getattr(guard, "charge", None)):
        raise InputError("guard must provide charge(event, *, round, model_hash)")
    # Charge first: the data (even its length) is read only inside the charged block.
    with guard.charge(mechanism.event(), round=round, model_hash=model_hash, release="selection_statistics",
                      randomness="csprng" if rng is None else "insecure_seeded", params=mechanism.ledger_fields()):
        stats = clipped_loss_sums(models, data, loss_clip=mechanism.loss_clip, loss_fn=loss_fn)
        return mechanism.release(stats, rng=rng)


@dataclass(frozen=True, slots=True, kw_only=True)
class SelectionResult:
    """What the server learns and decides from the aggregated noisy vector.

    ``mean_losses`` is ``None`` when the noisy count is below ``min_count`` (a ratio with a tiny or
    negative denominator means nothing); the choice does not depend on it.
    """

    index: int
    noisy_loss_sums: tuple[float, ...]
    noisy_count: float
    mean_losses: tuple[float, ...] | None

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "noisy_loss_sums": list(self.noisy_loss_sums),
                "noisy_count": self.noisy_count,
                "mean_losses": None if self.mean_losses is None else list(self.mean_losses)}


def select_candidate(aggregate: np.ndarray, *, num_candidates: int, min_count: float = 1.0) -> SelectionResult:
    """Pick the candidate with the lowest noisy mean loss from the summed ``(S_1..S_K, n)``.

    Every candidate's mean is its noisy sum over the *same* noisy count, so for a positive count
    the lowest mean is the lowest sum. The choice is therefore the argmin of the noisy sums (the
    first one on ties), which stays meaningful when noise drives the count to zero or below, where
    dividing would reverse the order. Post-processing: costs no privacy.

    Raises:
        InputError: ``aggregate`` is not a finite vector of length ``num_candidates + 1``, or
            ``num_candidates`` / ``min_count`` are invalid.
    """
    k = _check_num_candidates(num_candidates)
    if isinstance(min_count, bool) or not isinstance(min_count, (int, float)) or not (
        math.isfinite(min_count) and min_count > 0
    ):
        raise InputError(f"min_count must be a finite number > 0, got {min_count!r}")
    vec = _check_vector("aggregate", aggregate, k + 1)
    sums, count = vec[:-1], float(vec[-1])
    index = int(np.argmin(sums))
    means = tuple(float(s / count) for s in sums) if count >= min_count else None
    return SelectionResult(index=index, noisy_loss_sums=tuple(float(s) for s in sums), noisy_count=count,
                           mean_losses=means)
