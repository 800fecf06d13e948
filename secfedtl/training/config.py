"""Configuration of local DP-SGD training."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from secfedtl.errors import ConfigError

__all__ = ["DPTrainingConfig"]


def _positive_int(name: str, value: object, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive int, got {value!r}")


def _positive_float(name: str, value: object, *, allow_none: bool = False, upper: float = math.inf) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if not (0 < float(value) < upper):
        raise ConfigError(f"{name} must be in (0, {upper}), got {value!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class DPTrainingConfig:
    """Local DP-SGD settings of one client, validated when built.

    Exactly one of ``epochs`` and ``steps`` sets the local work per round. Exactly one of
    ``noise_multiplier`` and ``target_epsilon`` sets the noise: with ``target_epsilon`` (plus
    ``target_delta`` and ``planned_rounds``) the noise multiplier is calibrated once, up front, so
    that ``planned_rounds`` rounds of the local steps reach at most ``target_epsilon``.

    Every mechanism parameter is a function of these public fields only, never of the private
    data: ``public_dataset_size`` is the record count the data holder *declares* public (exact, or
    a round figure near it; it need not match the data), and the Poisson sample rate is
    ``min(1, expected_batch_size / public_dataset_size)``, the steps per round and the calibrated
    noise follow from it. ``expected_batch_size`` is also the divisor of the noisy gradient sum,
    whatever the actual batch size. Two datasets that differ in one record therefore run exactly
    the same mechanism (add/remove neighbouring relation).

    There is no seed: Poisson batches and noise come from the client's
    :class:`~secfedtl.privacy.randomness.Randomness` (``os.urandom``; every noise sample from
    ``os.urandom`` when ``secure_mode`` is set).
    """

    lr: float
    expected_batch_size: int
    max_grad_norm: float
    epochs: int | None = None
    steps: int | None = None
    optimizer: Literal["sgd", "adam"] = "sgd"
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    target_delta: float | None = None
    planned_rounds: int | None = None
    clipping: Literal["flat", "ghost"] = "flat"
    secure_mode: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    public_dataset_size: int | None = None
    momentum: float = 0.0
    accountant: Literal["rdp", "prv"] = "rdp"

    def __post_init__(self) -> None:
        if (self.epochs is None) == (self.steps is None):
            raise ConfigError("set exactly one of epochs and steps")
        _positive_int("epochs", self.epochs, allow_none=True)
        _positive_int("steps", self.steps, allow_none=True)
        _positive_float("lr", self.lr)
        _positive_int("expected_batch_size", self.expected_batch_size)
        _positive_float("max_grad_norm", self.max_grad_norm)
        if self.optimizer not in ("sgd", "adam"):
            raise ConfigError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if self.clipping not in ("flat", "ghost"):
            raise ConfigError(f"clipping must be 'flat' or 'ghost', got {self.clipping!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if self.accountant not in ("rdp", "prv"):
            raise ConfigError(f"accountant must be 'rdp' or 'prv', got {self.accountant!r}")
        if not isinstance(self.secure_mode, bool):
            raise ConfigError("secure_mode must be a bool")
        _positive_int("public_dataset_size", self.public_dataset_size, allow_none=True)
        if isinstance(self.momentum, bool) or not isinstance(self.momentum, (int, float)) or not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum!r}")
        calibrating = (self.target_epsilon, self.target_delta, self.planned_rounds)
        if self.noise_multiplier is not None:
            if any(v is not None for v in calibrating):
                raise ConfigError(
                    "give either noise_multiplier or target_epsilon/target_delta/planned_rounds, not both"
                )
            _positive_float("noise_multiplier", self.noise_multiplier)
        else:
            if any(v is None for v in calibrating):
                raise ConfigError(
                    "without noise_multiplier, set target_epsilon, target_delta and planned_rounds"
                )
            _positive_float("target_epsilon", self.target_epsilon)
            _positive_float("target_delta", self.target_delta, upper=1.0)
            _positive_int("planned_rounds", self.planned_rounds)

    @property
    def sample_rate(self) -> float:
        """The public Poisson sample rate ``min(1, expected_batch_size / public_dataset_size)``.

        Raises:
            ConfigError: no ``public_dataset_size`` was declared.
        """
        if self.public_dataset_size is None:
            raise ConfigError(
                "declare public_dataset_size: the sample rate, the steps and the noise must not "
                "depend on the private record count"
            )
        return min(1.0, self.expected_batch_size / self.public_dataset_size)

    def local_steps(self, *, sample_rate: float | None = None) -> int:
        """DP-SGD steps per round: ``steps``, or ``ceil(epochs / sample_rate)`` (default: the
        public :attr:`sample_rate`)."""
        if self.steps is not None:
            return self.steps
        assert self.epochs is not None
        rate = self.sample_rate if sample_rate is None else sample_rate
        return max(1, math.ceil(self.epochs / rate - 1e-9))

    def resolve_device(self) -> str:
        """The torch device to train on: ``auto`` picks CUDA when available."""
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device='cuda' but CUDA is not available")
        return self.device
