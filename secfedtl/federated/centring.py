"""DP centring of frozen features (:mod:`secfedtl.transfer.centring`) as one secure round of the
``"mean"`` statistic (:class:`~secfedtl.federated.statistic.FeatureMean`): the server's side,
:func:`secure_feature_mean`, returns the noisy mean. A hospital's side is a
:class:`~secfedtl.federated.statistic.StatisticTask` on its own (training) features.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from secfedtl.errors import AggregationError, InputError
from secfedtl.federated.federation import Federation
from secfedtl.federated.statistic import FeatureMean, secure_statistic
from secfedtl.transfer.centring import MeanMechanism, noisy_mean

__all__ = ["secure_feature_mean"]


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
