"""DP centring of frozen features (:mod:`secfedtl.transfer.centring`) as one secure round of the
``"mean"`` statistic (:class:`~secfedtl.federated.statistic.FeatureMean`): the server's side,
:func:`secure_feature_mean`, returns the noisy mean. A hospital's side is a
:class:`~secfedtl.federated.statistic.StatisticTask` on its own (training) features. As a job's
preparation (:class:`~secfedtl.federated.job.Preparation`): :func:`centring`, with a
:class:`Centring` module below the head.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from secfedtl.errors import AggregationError, ConfigError, InputError, RemoteProtocolError
from secfedtl.federated.config import JobConfig
from secfedtl.federated.federation import Federation
from secfedtl.federated.job import HospitalData, Preparation, SourceModel
from secfedtl.federated.statistic import FeatureMean, secure_statistic
from secfedtl.transfer.centring import MeanMechanism, noisy_mean

__all__ = ["Centring", "centring", "secure_feature_mean"]


def secure_feature_mean(server: Federation, mechanism: MeanMechanism, *, round: int,  # noqa: A002
                        max_samples: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Run the ``"mean"`` task on every client of ``server.pool`` in one secure round and return
    the noisy mean and a record of the round (status, who was included, noise).

    Each coordinate of a client's vector is at most ``max_samples * R`` in size plus noise; the
    encoding clips the noisy vector to that public bound plus ten noise deviations
    (post-processing).

    Raises:
        AggregationError: the secure round failed, or its noisy count is too small for a mean.
    """
    outcome = secure_statistic(server, FeatureMean(mechanism), round=round, max_samples=max_samples)
    record = {"status": outcome.status, "reason": outcome.reason, "included": list(outcome.included),
              "refused": list(outcome.refused), "noise_multiplier": mechanism.noise_multiplier,
              "sensitivity": mechanism.sensitivity, "row_clip": mechanism.row_clip}
    if outcome.status != "ok" or outcome.total is None:
        raise AggregationError(f"the secure feature-mean round failed: {outcome.reason or outcome.status}")
    try:
        mean = noisy_mean(outcome.total, mechanism=mechanism)
    except InputError as exc:  # the noisy count is too small
        raise AggregationError(str(exc)) from exc
    record["noisy_count"] = float(outcome.total[-1]) / mechanism.row_clip
    record["aggregate_noise_std"] = mechanism.noise_std * float(np.sqrt(len(outcome.included)))
    return mean, record


class Centring(nn.Module):
    """``x -> (x - centre) * scale``, the centre a buffer (zero until the DP mean arrives): put it
    below the head of a job whose :class:`~secfedtl.federated.job.Preparation` is
    :func:`centring`. The scale is public, from the job file."""

    def __init__(self, dim: int, *, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = float(scale)
        self.register_buffer("centre", torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.centre) * self.scale


def centring(mechanism: Callable[[JobConfig], MeanMechanism], features: Callable[[HospitalData], np.ndarray], *,
             layer: str = "backbone") -> Preparation:
    """DP centring as a job's preparation: every hospital releases its noisy (clipped feature sum,
    count) (``mechanism(config)``, on ``features(its data)``), the server divides the summed
    releases and projects the mean onto the ball of radius ``row_clip`` (a mean of rows clipped
    to that norm lies in it: post-processing), every hospital checks the vector it receives
    (length, finite, in that ball) and the source model's :class:`Centring` submodule ``layer``
    takes it as its centre."""

    def result(total: np.ndarray, statistic: FeatureMean) -> np.ndarray:
        try:
            mean = noisy_mean(total, mechanism=statistic.mechanism)
        except InputError as exc:  # the noisy count is too small
            raise AggregationError(str(exc)) from exc
        norm = float(np.linalg.norm(mean))
        radius = statistic.mechanism.row_clip
        return mean * (radius / norm) if norm > radius else mean

    def check(vector: np.ndarray, statistic: FeatureMean) -> np.ndarray:
        v = np.asarray(vector, dtype=np.float64)
        if (v.shape != (statistic.mechanism.dim,) or not np.isfinite(v).all()
                or float(np.linalg.norm(v)) > statistic.mechanism.row_clip * (1 + 1e-9)):
            raise RemoteProtocolError("the centre is not a finite vector of the mechanism's dimension in its ball")
        return v

    def apply(source: SourceModel, vector: np.ndarray) -> SourceModel:
        model = copy.deepcopy(source.model)
        centre = model.get_submodule(layer)
        if not isinstance(centre, Centring):
            raise ConfigError(f"the source model's {layer!r} is not a Centring module")
        with torch.no_grad():
            centre.centre.copy_(torch.as_tensor(vector, dtype=centre.centre.dtype))
        return dataclasses.replace(source, model=model, info={**source.info, "centred": True})

    return Preparation(statistic=lambda config: FeatureMean(mechanism(config)), data=features, result=result,
                       check=check, apply=apply)
