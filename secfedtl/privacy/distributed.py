"""Distributed DP: each hospital adds a share of the noise; secure aggregation reveals only the sum.

The pieces, for one distributed DP-SGD step (docs/privacy.md, "Distributed noise"):

* :class:`CollusionPolicy` -- what a hospital assumes about the others: at least
  ``min_survivors`` roster parties' inputs are in every sum it contributes to (it refuses to help
  unmask a smaller one), and at most ``colluders`` of them collude with the server. The noise of the
  remaining ``honest_parties = min_survivors - colluders`` is what the guarantee counts.
* :func:`calibrate_distributed` -- the :class:`~secfedtl.privacy.events.PoissonSkellamEvent` with the
  smallest per-party noise share meeting a target epsilon, for a given encoding and policy: the
  ledger records exactly this event.
* :func:`plan_distributed` -- both at once: the encoding (bit width given, scale by the rule of
  :func:`~secfedtl.encoding.distributed.plan_encoding`) and the calibrated event, consistent with
  each other (the plan's wrap bound assumes at least the noise the event adds).
* :func:`noisy_share` -- one hospital's field vector for one step: encode its sampled examples
  (:class:`~secfedtl.encoding.distributed.DistributedEncoding`), add its Skellam share
  (:func:`~secfedtl.privacy.discrete_noise.skellam_noise`), wrap. It refuses an event that does
  not describe this encoding, so what is charged is what runs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from secfedtl.crypto.stream import KeyStream
from secfedtl.encoding.distributed import DEFAULT_ROUNDING_BETA, DistributedEncoding, EncodingPlan, plan_encoding
from secfedtl.errors import ConfigError, TooFewSurvivorsError
from secfedtl.privacy.accountants import calibrate_skellam_share
from secfedtl.privacy.discrete_noise import skellam_noise
from secfedtl.privacy.events import DpEvent, PoissonSkellamEvent

__all__ = ["CollusionPolicy", "calibrate_distributed", "noisy_share", "plan_distributed"]


@dataclass(frozen=True, slots=True, kw_only=True)
class CollusionPolicy:
    """A hospital's worst case: ``min_survivors`` parties in every sum, ``colluders`` of them
    possibly colluding with the server.

    Raises:
        ConfigError: not ints, ``min_survivors < 1``, ``colluders < 0``, or no honest party left.
    """

    min_survivors: int
    colluders: int

    def __post_init__(self) -> None:
        for name in ("min_survivors", "colluders"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name} must be an int, got {value!r}")
        if self.min_survivors < 1 or self.colluders < 0:
            raise ConfigError("min_survivors must be >= 1 and colluders >= 0")
        if self.honest_parties < 1:
            raise ConfigError(
                f"min_survivors {self.min_survivors} minus colluders {self.colluders} leaves no honest party's "
                "noise: distributed DP cannot protect anyone under this policy")

    @classmethod
    def for_secagg(cls, config: object, *, colluders: int) -> CollusionPolicy:
        """The policy a secure aggregation configuration supports: ``min_survivors`` is the
        configuration's (its clients already refuse to unmask a smaller sum), and ``colluders``
        may not exceed what the protocol tolerates against an active server (``2t - k - 1``),
        since the guarantee assumes secure aggregation holds against them.

        Raises:
            ConfigError: ``config`` is not a SecAggConfig, or it tolerates fewer colluders.
        """
        from secfedtl.secagg.config import SecAggConfig  # noqa: PLC0415

        if not isinstance(config, SecAggConfig):
            raise ConfigError(f"config must be a SecAggConfig, got {type(config).__name__}")
        if isinstance(colluders, bool) or not isinstance(colluders, int):
            raise ConfigError(f"colluders must be an int, got {colluders!r}")
        if colluders > max(0, config.tolerated_colluders):
            raise ConfigError(
                f"this secure aggregation (degree {config.degree}, threshold {config.threshold}) tolerates "
                f"{max(0, config.tolerated_colluders)} colluders against an active server, not {colluders}")
        return cls(min_survivors=config.min_survivors, colluders=colluders)  # type: ignore[arg-type]

    @property
    def honest_parties(self) -> int:
        """Parties whose noise the guarantee counts: ``min_survivors - colluders``."""
        return self.min_survivors - self.colluders

    def check_survivors(self, included: int) -> None:
        """Refuse (never under-noise) a sum with fewer than ``min_survivors`` parties' inputs.

        Raises:
            TooFewSurvivorsError: ``included < min_survivors``.
        """
        if isinstance(included, bool) or not isinstance(included, int):
            raise ConfigError(f"included must be an int, got {included!r}")
        if included < self.min_survivors:
            raise TooFewSurvivorsError(
                f"only {included} parties' inputs would be in the sum; this hospital's noise share assumes at "
                f"least {self.min_survivors} (of which {self.colluders} may collude): refusing the round")


def calibrate_distributed(*, encoding: DistributedEncoding, policy: CollusionPolicy, target_epsilon: float,
                          target_delta: float, sample_rate: float, steps: int, tolerance: float = 0.01,
                          prior_events: Iterable[DpEvent] = ()) -> PoissonSkellamEvent:
    """The event to charge and run: per-party noise share for ``target_epsilon`` after
    ``prior_events``, counting only ``policy.honest_parties`` parties' noise (see
    :func:`secfedtl.privacy.accountants.calibrate_skellam_share`)."""
    if not isinstance(encoding, DistributedEncoding) or not isinstance(policy, CollusionPolicy):
        raise ConfigError("calibrate_distributed needs a DistributedEncoding and a CollusionPolicy")
    return calibrate_skellam_share(
        target_epsilon=target_epsilon, target_delta=target_delta, sample_rate=sample_rate, steps=steps,
        honest_parties=policy.honest_parties, l2_bound=encoding.l2_bound, l1_bound=encoding.l1_bound,
        dimension=encoding.padded_dimension, scale=float(encoding.scale), bits=encoding.bits,
        tolerance=tolerance, prior_events=prior_events)


def plan_distributed(*, dimension: int, clip_norm: float, bits: int, policy: CollusionPolicy, num_parties: int,
                     max_batch: int, target_epsilon: float, target_delta: float, sample_rate: float, steps: int,
                     wrap_probability: float = 1e-6, rotate: bool = True,
                     rounding_beta: float = DEFAULT_ROUNDING_BETA,
                     prior_events: Iterable[DpEvent] = ()) -> tuple[EncodingPlan, PoissonSkellamEvent]:
    """The encoding for ``bits`` and the event to charge, consistent with each other.

    The scale depends on the noise (it must fit in the field) and the noise on the scale (through
    the inflated norm bound), so: calibrate at a provisional encoding, plan the encoding for that
    noise multiplier (total honest noise std over ``l2_bound``), recalibrate for the planned
    encoding, and repeat with a larger multiplier until the event's noise is no more than the plan
    assumed (it converges in one or two rounds: the multiplier hardly depends on the scale once
    ``scale * clip_norm`` dwarfs ``sqrt(dimension)``).

    Raises:
        ConfigError: the bit width cannot hold the noise, or invalid arguments.
        AccountingError: the target epsilon cannot be met.
    """
    if not isinstance(policy, CollusionPolicy):
        raise ConfigError("policy must be a CollusionPolicy")
    prior = list(prior_events)
    common = dict(dimension=dimension, clip_norm=clip_norm, num_parties=num_parties,
                  honest_parties=policy.honest_parties, max_batch=max_batch, bits=bits,
                  wrap_probability=wrap_probability, rotate=rotate, rounding_beta=rounding_beta)
    calibrate = dict(policy=policy, target_epsilon=target_epsilon, target_delta=target_delta,
                     sample_rate=sample_rate, steps=steps, prior_events=prior)
    provisional = plan_encoding(noise_multiplier=1.0, **common)  # type: ignore[arg-type]
    event = calibrate_distributed(encoding=provisional.encoding, **calibrate)  # type: ignore[arg-type]
    multiplier = _multiplier(event)
    for _ in range(8):
        plan = plan_encoding(noise_multiplier=multiplier * 1.001, **common)  # type: ignore[arg-type]
        event = calibrate_distributed(encoding=plan.encoding, **calibrate)  # type: ignore[arg-type]
        if _multiplier(event) <= plan.noise_multiplier:
            return plan, event
        multiplier = _multiplier(event)
    raise ConfigError("the encoding plan and the noise calibration did not agree after 8 rounds")


def _multiplier(event: PoissonSkellamEvent) -> float:
    """Honest parties' total noise standard deviation over the sensitivity."""
    return (2.0 * event.total_mu) ** 0.5 / event.l2_bound


def _check_event_matches(encoding: DistributedEncoding, event: PoissonSkellamEvent) -> None:
    mismatches = [
        name for name, ours in (("l2_bound", encoding.l2_bound), ("l1_bound", encoding.l1_bound),
                                ("dimension", encoding.padded_dimension), ("scale", float(encoding.scale)),
                                ("bits", encoding.bits))
        if getattr(event, name) != ours
    ]
    if mismatches:
        raise ConfigError(f"the event does not describe this encoding ({', '.join(mismatches)} differ): "
                          "what is charged must be what runs")


def noisy_share(encoding: DistributedEncoding, gradients: np.ndarray, *, event: PoissonSkellamEvent,
                rotation_seed: bytes, stream: KeyStream) -> np.ndarray:
    """One hospital's field vector for one step: the integer sum of its sampled, clipped, rotated,
    rounded examples (``gradients``: one row per example of its Poisson batch) plus
    ``Sk(event.share_variance / 2)`` per coordinate, modulo ``2**bits``.

    Raises:
        ConfigError: ``event`` does not describe ``encoding``.
        EncodingError / InputError: bad gradients or stream.
    """
    if not isinstance(event, PoissonSkellamEvent):
        raise ConfigError(f"event must be a PoissonSkellamEvent, got {type(event).__name__}")
    _check_event_matches(encoding, event)
    total = encoding.encode_examples(gradients, rotation_seed=rotation_seed, stream=stream)
    total += skellam_noise(encoding.padded_dimension, mu=event.share_variance / 2.0, stream=stream)
    return encoding.wrap(total)
