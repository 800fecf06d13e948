"""One secure-statistic task, parameterised by its mechanism.

Before training, a job may ask every hospital for one DP release of a public mechanism, summed in
one secure-aggregation round: the noisy per-candidate losses of DP source selection
(:mod:`secfedtl.transfer.selection`) or the noisy feature sum of DP centring
(:mod:`secfedtl.transfer.centring`). Both are a :class:`Statistic`: the same public object on the
server and at every hospital, with

* ``task``: the task name (``"select"``, ``"mean"``);
* :meth:`Statistic.options`: the mechanism exactly as a request must announce it. A node refuses
  a request announcing anything else (another noise multiplier, other candidates) before it
  touches its data or its budget, so a server cannot ask for less noise than the node calibrated;
* ``vector_length`` and :meth:`Statistic.clip`: the contribution's length and the public bound
  each coordinate is clipped to (a bound on the noiseless value plus ten noise deviations:
  clipping the noisy vector is post-processing);
* :meth:`Statistic.release`: the hospital's release on its own data, charged to its budget
  (ledger entry written) before anything is computed.

:class:`StatisticTask` is the node side (weight 1: the count is inside the vector);
:func:`secure_statistic` the server side (one secure round over every client of the pool).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from torch import nn
from torch.utils.data import Dataset

from secfedtl.errors import PrivacyBudgetExceeded, RemoteProtocolError, ReplayError
from secfedtl.federated import wire
from secfedtl.federated.federation import Federation, SecureSum
from secfedtl.federated.node import TaskOutput
from secfedtl.transfer.centring import MeanMechanism, private_feature_sum
from secfedtl.transfer.models import state_hash
from secfedtl.transfer.selection import SelectionMechanism, private_selection_statistics

__all__ = ["CandidateLosses", "FeatureMean", "Statistic", "StatisticTask", "secure_statistic"]


class Statistic(Protocol):
    task: str

    @property
    def vector_length(self) -> int: ...

    def event(self) -> Any: ...

    def options(self) -> dict[str, Any]: ...

    def clip(self, max_samples: int) -> float: ...

    def release(self, data: Any, *, guard: Any, round: int, model_hash: str,  # noqa: A002
                rng: np.random.Generator | None = None) -> np.ndarray: ...


@dataclass(frozen=True)
class FeatureMean:
    """DP centring: the hospital's noisy ``(clipped feature sum, count)`` (data: its features)."""

    mechanism: MeanMechanism
    task: str = "mean"

    @property
    def vector_length(self) -> int:
        return self.mechanism.vector_length

    def options(self) -> dict[str, Any]:
        return {"mechanism": self.mechanism.options()}

    def event(self) -> Any:
        return self.mechanism.event()

    def clip(self, max_samples: int) -> float:
        return max_samples * self.mechanism.row_clip + 10.0 * self.mechanism.noise_std

    def release(self, data: np.ndarray, *, guard: Any, round: int, model_hash: str,  # noqa: A002
                rng: np.random.Generator | None = None) -> np.ndarray:
        return private_feature_sum(features=data, mechanism=self.mechanism, guard=guard, round=round,
                                   model_hash=model_hash, rng=rng)


def selection_options(mechanism: SelectionMechanism) -> dict[str, Any]:
    return {"num_candidates": mechanism.num_candidates, "loss_clip": mechanism.loss_clip,
            "noise_multiplier": mechanism.noise_multiplier}


@dataclass(frozen=True)
class CandidateLosses:
    """DP source selection: the hospital's noisy ``(clipped loss sum per candidate, count)`` on
    its validation data (data: a ``Dataset``). The candidates are public models, named in the
    request by their hashes."""

    mechanism: SelectionMechanism
    candidates: Sequence[nn.Module]
    task: str = "select"
    hashes: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "hashes", tuple(state_hash(m) for m in self.candidates))

    @property
    def vector_length(self) -> int:
        return self.mechanism.vector_length

    def options(self) -> dict[str, Any]:
        return {"candidates": list(self.hashes), "mechanism": selection_options(self.mechanism)}

    def event(self) -> Any:
        return self.mechanism.event()

    def clip(self, max_samples: int) -> float:
        return max_samples * self.mechanism.loss_clip + 10.0 * self.mechanism.loss_noise_std

    def release(self, data: Dataset, *, guard: Any, round: int, model_hash: str,  # noqa: A002
                rng: np.random.Generator | None = None) -> np.ndarray:
        return private_selection_statistics(candidates=list(self.candidates), data=data, mechanism=self.mechanism,
                                            guard=guard, round=round, model_hash=model_hash, rng=rng)


class StatisticTask:
    """A node's task for ``statistic`` on its own ``data``, charged to ``guard``; contributes the
    release with weight 1. A request whose options differ from :meth:`Statistic.options` in any
    key is refused before anything is charged or computed. The statistic is released once: the
    job plans (and calibrates its training noise for) one release, so a second request, in any
    round, is refused (:class:`~secfedtl.errors.ReplayError`) before anything is charged."""

    def __init__(self, statistic: Statistic, *, data: Any, guard: Any, rng: np.random.Generator | None = None) -> None:
        self._statistic = statistic
        self._data = data
        self._guard = guard
        self._rng = rng
        self._released = False

    def __call__(self, request: wire.TaskRequest, digest: str) -> TaskOutput:
        for key, value in self._statistic.options().items():
            if request.options.get(key) != value:  # server-chosen JSON: compare, never convert
                raise RemoteProtocolError(f"the request announces another {self._statistic.task!r} {key}")
        if self._released:
            raise ReplayError(f"this node already released its {self._statistic.task!r} statistic")
        self._released = True  # before the release: a charge followed by a failure still counts
        try:
            vector = self._statistic.release(self._data, guard=self._guard, round=request.round, model_hash=digest,
                                             rng=self._rng)
        except PrivacyBudgetExceeded:
            self._released = False  # refused before anything was charged
            raise
        return TaskOutput(vector=vector, weight=1)


def secure_statistic(server: Federation, statistic: Statistic, *, round: int,  # noqa: A002
                     max_samples: int) -> SecureSum:
    """One secure round of ``statistic``'s task on every client of ``server.pool``. Never raises
    for clients' misbehaviour: a failed round says why."""
    return server.secure_round(statistic.task, round=round, cohort=sorted(server.pool.names),
                               vector_length=statistic.vector_length, clip=statistic.clip(max_samples),
                               max_weight=1, weights=np.zeros(0), options=statistic.options())
