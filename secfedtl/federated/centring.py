"""The ``"mean"`` task: DP centring of frozen features (:mod:`secfedtl.transfer.centring`) as
one secure-aggregation round.

Client side, :class:`FeatureMeanTask`: the hospital's noisy ``(clipped feature sum, count)``,
charged to its budget (ledger entry first), contributed with weight 1. Server side,
:func:`secure_feature_mean`: one secure round of that task, then the noisy mean.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from secfedtl.errors import AggregationError, InputError, RemoteProtocolError
from secfedtl.federated import wire
from secfedtl.federated.federation import Federation
from secfedtl.federated.node import TaskOutput
from secfedtl.transfer.centring import MeanMechanism, noisy_mean, private_feature_sum

__all__ = ["FeatureMeanTask", "secure_feature_mean"]


class FeatureMeanTask:
    """The ``"mean"`` task on the client's own (training) features. A request announcing another
    mechanism is refused, so the server cannot ask for less noise than the client calibrated."""

    def __init__(self, *, features: np.ndarray, mechanism: MeanMechanism, guard: Any,
                 rng: np.random.Generator | None = None) -> None:
        self._features = features
        self._mechanism = mechanism
        self._guard = guard
        self._rng = rng

    def __call__(self, request: wire.TaskRequest, digest: str) -> TaskOutput:
        if request.options.get("mechanism") != self._mechanism.options():
            raise RemoteProtocolError("the request announces another feature-mean mechanism")
        vector = private_feature_sum(features=self._features, mechanism=self._mechanism, guard=self._guard,
                                     round=request.round, model_hash=digest, rng=self._rng)
        return TaskOutput(vector=vector, weight=1)


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
    clip = max_samples * mechanism.row_clip + 10.0 * mechanism.noise_std
    outcome = server.secure_round("mean", round=round, cohort=sorted(server.pool.names),
                                  vector_length=mechanism.vector_length, clip=clip, max_weight=1,
                                  weights=np.zeros(0), options={"mechanism": mechanism.options()})
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
