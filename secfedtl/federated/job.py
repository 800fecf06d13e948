"""Describe a federated transfer job once; run it in process, in worker processes, behind a
node agent or on Flower without changing it.

A :class:`FederatedJob` is three functions and a config class:

* ``source(config, spec) -> SourceModel``: the public source/transfer model, built the same way
  on the server and on every hospital (its whole-model hash is checked in every task): a torch
  module whose ``head`` submodule is trained and the rest frozen, and whether the frozen part's
  features may be cached. ``spec`` is one of :meth:`JobConfig.source_specs` (the ``[model]``
  section, or a ``[selection]`` candidate);
* ``data(config, name) -> HospitalData``: one hospital's own data (a torch ``Dataset`` to train
  on, the splits it evaluates on locally), loaded by the hospital's own code on its own machine.
  The server never calls it;
* ``metric(model, dataset)``: the score a hospital computes locally (default: accuracy);
* ``config_type``: the :class:`~secfedtl.federated.config.JobConfig` (sub)class of its job file,
  the public hyperparameters (budget, declared counts, rounds, secure-aggregation settings).

What a server sends a node never names code: a node runs the job its own operator installed and
configured (``secfedtl node --job MODULE:ATTR``, :func:`load_job`), on the job file its operator
holds, with every mechanism parameter from that file; the trained parameters' names and the
source model's hash are in every training request, and the node checks them. (Requests do not
carry the job id: the node's ledger entries carry its own, a hash of its job file unless it names one.) This module builds the pieces from a description: a hospital's
node (:func:`build_client_node`), the server (:func:`build_server`) and DP source selection
(:func:`select_source`); :mod:`secfedtl.federated.run` runs the rounds;
:mod:`secfedtl.runtime.local` puts them together in one process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from secfedtl.aggregation import make_server_optimizer
from secfedtl.crypto.primitives import SigningKey
from secfedtl.encoding.fixed_point import MIN_FIXED_POINT_BITS
from secfedtl.errors import AccountingError, AggregationError, ConfigError, RemoteProtocolError
from secfedtl.federated.config import JobConfig
from secfedtl.federated.distributed import STEP_TASK, DistributedPlan, DistributedStepTask, plan_for, settings_for
from secfedtl.federated.federation import Federation
from secfedtl.federated import wire
from secfedtl.federated.node import ClientNode, LocalReports, Metric, Task, TaskOutput, standard_tasks
from secfedtl.federated.pool import ClientPool
from secfedtl.federated.roster import NodePolicy, Roster
from secfedtl.federated.statistic import CandidateLosses, StatisticTask, secure_statistic, selection_options
from secfedtl.privacy.accountants import calibrate_noise_multiplier
from secfedtl.privacy.budget import BudgetGuard
from secfedtl.privacy.events import PoissonGaussianEvent
from secfedtl.privacy.randomness import Randomness
from secfedtl.privacy.state import PrivacyState, data_fingerprint
from secfedtl.training import (DPTrainingConfig, PrivateClient, evaluate, flatten_params, model_with_params,
                               unflatten_params)
from secfedtl.transfer.freezing import HeadOnly
from secfedtl.transfer.models import state_hash
from secfedtl.transfer.regularizers import L2SP
from secfedtl.transfer.selection import SelectionMechanism, select_candidate

__all__ = ["FederatedJob", "Hospital", "HospitalData", "SourceModel", "build_client_node", "build_selection_node",
           "DEFAULT_JOB", "Preparation", "build_server", "declaration", "default_state_root", "distributed_plan", "job_id", "load_job", "node_policy",
           "open_hospital_state", "planned_prior_events", "prepare_source", "select_source", "selection_mechanism", "selection_options", "state_root"]


@dataclass(frozen=True, kw_only=True)
class SourceModel:
    """The public source/transfer model of a job: ``model`` with its submodule ``head`` trainable
    and everything else frozen (:class:`~secfedtl.transfer.freezing.HeadOnly` is applied when it
    is built). ``cache_features``: the frozen part is deterministic, so each hospital may compute
    its features once and train the head on them, ``feature_batch_size`` rows at a time (a backbone
    with a large fixed cost per call, such as a wavelet scattering, wants large batches).
    ``info``: public facts about how it was built (recorded in metrics.json)."""

    model: nn.Module
    head: str = "head"
    cache_features: bool = True
    info: Mapping[str, Any] = field(default_factory=dict)
    feature_batch_size: int = 64

    def __post_init__(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise ConfigError(f"a source model must be a torch nn.Module, not {type(self.model).__name__}")
        size = self.feature_batch_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"feature_batch_size must be a positive int, got {size!r}")
        HeadOnly(head=self.head).apply(self.model)

    @property
    def head_state(self) -> dict[str, torch.Tensor]:
        """The trainable parameters (the global model the federation averages), by name."""
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    @property
    def frozen_hash(self) -> str:
        """Hash of the whole source model; clients refuse tasks announcing another one."""
        return state_hash(self.model)

    def with_params(self, params: np.ndarray) -> nn.Module:
        """A copy of the model with ``params`` (a flat vector) as its trainable weights."""
        return model_with_params(self.model, unflatten_params(params, self.head_state))


@dataclass(frozen=True, kw_only=True)
class HospitalData:
    """One hospital's data, as its own code loads it on its own machine: ``train`` (a torch
    ``Dataset`` of ``(input, label)``; DP-SGD trains on it), ``evaluation`` (named splits, scored
    locally with the job's metric; a ``"validation"`` split is what DP source selection scores
    candidates on) and ``fingerprint`` (what the hospital's privacy state is bound to: default, a
    hash of every tensor of ``train`` and ``evaluation``). ``feature_buffer`` (optional, for a
    simulation that plays several hospitals in one process): where the node caches the features
    of ``train`` when the source model caches features, a float32 tensor of shape
    ``(len(train), d)``, e.g. a row slice of one buffer holding every hospital's features (see
    :class:`~secfedtl.training.PrivateClient`); it is not part of the fingerprint."""

    train: Dataset
    evaluation: Mapping[str, Dataset] = field(default_factory=dict)
    fingerprint: str = ""
    feature_buffer: torch.Tensor | None = None

    def __post_init__(self) -> None:
        try:
            size = len(self.train)  # type: ignore[arg-type]
        except TypeError as exc:
            raise ConfigError("HospitalData.train must be a torch Dataset with a length") from exc
        if size < 1:
            raise ConfigError("HospitalData.train is empty")
        if not self.fingerprint:
            object.__setattr__(self, "fingerprint", data_fingerprint(_tensors(self.train, *self.evaluation.values())))

    @classmethod
    def from_tensors(cls, x: Any, y: Any, *, evaluation: Mapping[str, tuple[Any, Any]] | None = None) -> HospitalData:
        """From arrays or tensors: inputs ``x`` (float32) and integer labels ``y``; ``evaluation``
        maps split names to ``(x, y)``."""
        return cls(train=tensor_dataset(x, y),
                   evaluation={k: tensor_dataset(*xy) for k, xy in (evaluation or {}).items()})


def tensor_dataset(x: Any, y: Any) -> TensorDataset:
    """A ``TensorDataset`` of float32 inputs and int64 labels from arrays or tensors."""
    return TensorDataset(torch.tensor(np.asarray(x), dtype=torch.float32),
                         torch.tensor(np.asarray(y), dtype=torch.long))


def _tensors(*datasets: Dataset) -> list[Any]:
    out: list[Any] = []
    for data in datasets:
        if isinstance(data, TensorDataset):
            out.extend(data.tensors)
        else:  # any other Dataset: every item, in order
            for k in range(len(data)):  # type: ignore[arg-type]
                out.extend(t for t in data[k] if hasattr(t, "shape") or isinstance(t, (int, float)))
    return out


@dataclass(frozen=True, kw_only=True)
class Preparation:
    """A DP statistic every hospital releases once before training (one secure round), whose
    public result the trained model is then built with. DP centring of frozen features is one
    (:func:`secfedtl.federated.centring.centring`).

    * ``statistic(config)``: the :class:`~secfedtl.federated.statistic.Statistic`, public, from
      the job file alone (its event is charged before the release and is a prior event of the
      training noise);
    * ``data(hospital_data)``: what a hospital releases it on (at the hospital);
    * ``result(total, statistic)``: the server's post-processing of the securely summed releases
      into the public vector it sends every hospital (raise
      :class:`~secfedtl.errors.AggregationError` when the sum is unusable);
    * ``check(vector, statistic)``: what a hospital accepts from the server (a vector the server
      could have computed: right length, finite, within the public bounds; raise
      :class:`~secfedtl.errors.RemoteProtocolError` otherwise);
    * ``apply(source, vector)``: the source model the job trains, on the server and at every
      hospital (the same vector gives the same model, and the same hash in every task).
    """

    statistic: Callable[[JobConfig], Any]
    data: Callable[[HospitalData], Any]
    result: Callable[[np.ndarray, Any], np.ndarray]
    check: Callable[[np.ndarray, Any], np.ndarray]
    apply: Callable[[SourceModel, np.ndarray], SourceModel]


@dataclass(frozen=True, kw_only=True)
class FederatedJob:
    """A federated transfer job (see the module docstring). ``prepare``: an optional DP
    statistic released before training (:class:`Preparation`)."""

    name: str
    source: Callable[[JobConfig, Mapping[str, Any]], SourceModel]
    data: Callable[[JobConfig, str], HospitalData]
    metric: Metric = evaluate
    config_type: type[JobConfig] = JobConfig
    prepare: Preparation | None = None

    def prior_events(self, config: JobConfig) -> list[PoissonGaussianEvent]:
        """What every hospital spends in this job before training, from the job file alone: the
        selection event (``[selection]``) and the preparation's."""
        events = planned_prior_events(config)
        if self.prepare is not None:
            events.append(self.prepare.statistic(config).event())
        return events

    def load_config(self, path: str | os.PathLike[str] | None = None) -> JobConfig:
        return self.check(self.config_type.load(path))

    def check(self, config: JobConfig) -> JobConfig:
        """``config`` as this job's config class (re-validated if it is another class). A job with a
        preparation runs it as a fixed-point secure round in the job's field, so its ``[secagg]
        bits`` must be at least :data:`~secfedtl.encoding.fixed_point.MIN_FIXED_POINT_BITS` even
        with distributed noise (refused here, before any folder or state exists)."""
        checked = config if isinstance(config, self.config_type) else self.config_type.from_mapping(config.to_dict())
        if self.prepare is not None and checked["secagg"]["bits"] < MIN_FIXED_POINT_BITS:
            raise ConfigError(f"[secagg] bits must be at least {MIN_FIXED_POINT_BITS} for job {self.name!r}: its "
                              f"preparation is a fixed-point secure round in the same field, got "
                              f"{checked['secagg']['bits']}")
        return checked

    def build_source(self, config: JobConfig, spec: Mapping[str, Any] | None = None) -> SourceModel:
        source = self.source(config, config.source_specs()[0] if spec is None else spec)
        if not isinstance(source, SourceModel):
            raise ConfigError(f"job {self.name!r}: source() must return a SourceModel, not {type(source).__name__}")
        return source

    def load_data(self, config: JobConfig, name: str) -> HospitalData:
        if name not in config["job"]["clients"]:
            raise ConfigError(f"{name!r} is not one of the job's clients {config['job']['clients']}")
        data = self.data(config, name)
        if not isinstance(data, HospitalData):
            raise ConfigError(f"job {self.name!r}: data() must return a HospitalData, not {type(data).__name__}")
        return data


#: The job a node, a server or `secfedtl run` runs unless its operator names another.
DEFAULT_JOB = "secfedtl.jobs.heart:HEART"


def load_job(ref: str | None = None) -> FederatedJob:
    """The job ``MODULE:ATTR`` names, imported from this machine's own installation. Only a node's
    or server's *own* configuration (command line, node config) may name one, never a message.
    ``None``: :data:`DEFAULT_JOB`."""
    ref = DEFAULT_JOB if ref is None or ref == "" else ref
    module, sep, attr = ref.partition(":")
    if not sep or not module or not attr:
        raise ConfigError(f"a job is named MODULE:ATTR (e.g. secfedtl.jobs.heart:HEART), got {ref!r}")
    try:
        job = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load the job {ref!r}: {exc}") from exc
    if not isinstance(job, FederatedJob):
        raise ConfigError(f"{ref!r} is a {type(job).__name__}, not a FederatedJob")
    return job


# -- public identifiers and node-local settings ------------------------------------------------


def job_id(config: JobConfig) -> str:
    """The job's public identifier: ``[job] id``, else a hash of the resolved configuration (so
    every node of a deployment that reads the same job file agrees on it). `secfedtl run` gives
    each new run a random id, kept in its config.json for ``--resume``."""
    given = config["job"]["id"]
    if given:
        return given
    canonical = json.dumps(config.to_dict(), sort_keys=True, separators=(",", ":")).encode("utf-8")
    return "cfg-" + hashlib.sha256(canonical).hexdigest()[:24]


def default_state_root() -> Path:
    """Where hospitals' privacy states live unless the node's own ``--state-dir`` says otherwise:
    ``$SECFEDTL_STATE_DIR``, else ``~/.local/share/secfedtl/privacy``. This is node-local
    configuration: a job file cannot set it (a job could otherwise point a hospital at a fresh
    state with a new budget)."""
    env = os.environ.get("SECFEDTL_STATE_DIR")
    return Path(env) if env else Path.home() / ".local" / "share" / "secfedtl" / "privacy"


def state_root(override: Path | None = None) -> Path:
    return override if override is not None else default_state_root()


def node_policy(config: JobConfig, job: FederatedJob | None = None, **kwargs: Any) -> NodePolicy:
    """What a node of this job accepts: one secure session per training round (and one for the
    preparation, if any), and no more tasks (each may charge) than the job plans (its rounds, one
    more with personalisation, two more with a preparation: its release and its result)."""
    rounds = config["job"]["rounds"]
    prepared = job is not None and job.prepare is not None
    if config.noise() == "distributed":  # one secure session (and one charged task) per DP step
        steps = settings_for(config).total_steps
        return NodePolicy(**{"max_sessions": steps + int(prepared), "max_tasks": steps + 2 * int(prepared), **kwargs})
    planned = rounds + int(config["privacy"]["personalise"]) + 2 * int(prepared)
    return NodePolicy(**{"max_sessions": rounds + int(prepared), "max_tasks": planned, **kwargs})


def open_hospital_state(config: JobConfig, name: str, data: HospitalData, root: Path) -> PrivacyState:
    """Hospital ``name``'s persistent privacy state in ``root/name``, for the budget of the job's
    ``[privacy]`` section, fingerprinted with ``data.fingerprint``."""
    priv = config["privacy"]
    return PrivacyState.open(root / name, client=name, epsilon=priv["epsilon"], delta=priv["delta"],
                             accountant=priv["accountant"], fingerprint=data.fingerprint)


def declaration(config: JobConfig, name: str) -> dict[str, Any]:
    """What hospital ``name`` declares public about itself (recorded in every ledger entry)."""
    return {"records": config["declared"]["records"][name], "participation": True}


# -- a hospital's node ---------------------------------------------------------------------------


@dataclass(kw_only=True)
class Hospital:
    """One private client's objects (they stay at that client). With a preparation, ``client``
    is built when the preparation's result arrives (in the node's own process)."""

    name: str
    node: ClientNode
    client: PrivateClient
    guard: BudgetGuard
    evaluation: dict[str, Dataset]
    reports: LocalReports


def _node_seed(config: JobConfig, name: str) -> int:
    return config["job"]["seed"] * 1000 + config["job"]["clients"].index(name)


def build_client_node(job: FederatedJob, config: JobConfig, name: str, source: SourceModel, data: HospitalData,
                      state: PrivacyState, *, identity: SigningKey, roster: Roster,
                      policy: NodePolicy | None = None, job_ref: str | None = None) -> Hospital:
    """The node of one private hospital: its budget guard (on its persistent ``state``) and DP
    client on ``data.train``, with the ``train``, ``evaluate`` and (if ``[privacy] personalise``)
    ``personalise`` tasks (the last two score ``data.evaluation`` with the job's metric and report locally, into
    ``state.directory/reports/<job id>``), its signing key ``identity`` and the federation's
    ``roster`` pinned (with ``policy``). ``job_ref`` overrides the job id (tests).

    Every mechanism parameter comes from public configuration: the sample rate is
    ``expected_batch_size / [declared] records``, the steps and noise follow from it, and the
    noise is calibrated so that what the hospital spent in other jobs, the selection event (if
    any) and every planned round of this job stay within its budget."""
    priv, tcfg = config["privacy"], config["training"]
    jid = job_id(config) if job_ref is None else job_ref
    guard = state.guard(job_id=jid, declaration=declaration(config, name))
    if config.noise() == "distributed":
        return _distributed_node(job, config, name, source, data, state, guard, jid, identity=identity,
                                 roster=roster, policy=policy)
    planned = config["job"]["rounds"] + (1 if priv["personalise"] else 0)
    dp = DPTrainingConfig(lr=tcfg["lr"], expected_batch_size=tcfg["expected_batch_size"],
                          max_grad_norm=tcfg["max_grad_norm"], epochs=tcfg["epochs"],
                          optimizer=tcfg["optimizer"], target_epsilon=priv["epsilon"],
                          target_delta=priv["delta"], planned_rounds=planned, device="auto",
                          secure_mode=priv["secure_mode"], accountant=priv["accountant"],
                          public_dataset_size=config["declared"]["records"][name])
    earlier = state.events_before(jid)
    try:
        dp = _calibrated_after(dp, earlier + job.prior_events(config))
    except ConfigError as exc:
        spent = f"{len(earlier)} releases of earlier jobs in {os.fspath(state.ledger.path)!r}; " if earlier else ""
        raise ConfigError(f"hospital {name!r} has too little privacy budget left for this job ({spent}"
                          f"budget epsilon {priv['epsilon']:g}): {exc}") from exc
    hospital, seed, randomness = _hospital(config, name, data, state, guard, jid)
    # the tasks this job plans: "personalise" (a charged DP round) only where the job file asks for it
    planned_tasks = ("train", "evaluate", "personalise") if priv["personalise"] else ("train", "evaluate")

    def client_tasks(model_source: SourceModel) -> dict[str, Task]:
        hospital.client = _private_client(name, model_source, data, dp, guard, randomness,
                                          regularizer=L2SP(strength=tcfg["l2sp"], source=model_source.head_state))
        tasks = standard_tasks(hospital.client, hospital.evaluation, frozen_hash=model_source.frozen_hash,
                               reports=hospital.reports, metric=job.metric)
        return {t: tasks[t] for t in planned_tasks}

    tasks = _node_tasks(job, config, source, data, guard, client_tasks, planned_tasks)
    hospital.node = ClientNode(name=name, tasks=tasks, seed=seed, identity=identity, roster=roster, policy=policy)
    return hospital


def _hospital(config: JobConfig, name: str, data: HospitalData, state: PrivacyState, guard: BudgetGuard,
              jid: str) -> tuple[Hospital, int, Randomness]:
    """The parts every node builder shares: the hospital record (no node or client yet, its
    local reports under ``state.directory/reports/<jid>``), the node's public rounding seed and
    the DP randomness (the OS CSPRNG unless the job file asks for insecure reproducibility)."""
    priv = config["privacy"]
    seed = _node_seed(config, name)
    randomness = (Randomness.insecure_seeded(seed) if priv["insecure_reproducible"]
                  else Randomness.secure(secure_mode=priv["secure_mode"]))
    hospital = Hospital(name=name, node=None, client=None, guard=guard, evaluation=dict(data.evaluation),  # type: ignore[arg-type]
                        reports=LocalReports(state.directory / "reports" / jid))
    return hospital, seed, randomness


def _private_client(name: str, model_source: SourceModel, data: HospitalData, dp: DPTrainingConfig,
                    guard: BudgetGuard, randomness: Randomness, *, regularizer: Any = None) -> PrivateClient:
    """The hospital's DP client on ``data.train`` for ``model_source`` (its features cached when
    the source says so)."""
    return PrivateClient(client_id=name, model=model_source.model, train_data=data.train, config=dp, guard=guard,
                         regularizer=regularizer, head=model_source.head, cache_features=model_source.cache_features,
                         feature_buffer=data.feature_buffer if model_source.cache_features else None,
                         cache_batch_size=model_source.feature_batch_size, randomness=randomness)


def _node_tasks(job: FederatedJob, config: JobConfig, source: SourceModel, data: HospitalData, guard: BudgetGuard,
                client_tasks: Callable[[SourceModel], dict[str, Task]], planned: Sequence[str]) -> dict[str, Task]:
    """The node's task table: ``client_tasks(source)`` directly, or, with a preparation, its
    statistic task and ``prepare`` first and the ``planned`` tasks refused until the prepared
    source model is built (:class:`_Prepared`)."""
    if job.prepare is None:
        return client_tasks(source)
    statistic = job.prepare.statistic(config)
    later = _Prepared(job.prepare, statistic, source, client_tasks)
    return {statistic.task: StatisticTask(statistic, data=job.prepare.data(data), guard=guard),
            "prepare": later.prepare, **{t: later.deferred(t) for t in planned}}


class _Prepared:
    """A node's tasks that wait for the preparation's result: ``prepare`` checks the vector the
    server sends (:attr:`Preparation.check`), builds the source model with it and the client's
    tasks; until then (or after a refused vector) every deferred task is refused."""

    def __init__(self, preparation: Preparation, statistic: Any, source: SourceModel,
                 client_tasks: Callable[[SourceModel], dict[str, Task]]) -> None:
        self._preparation = preparation
        self._statistic = statistic
        self._source = source
        self._client_tasks = client_tasks
        self._tasks: dict[str, Task] | None = None

    def prepare(self, request: wire.TaskRequest, digest: str) -> TaskOutput:
        if self._tasks is not None:
            raise RemoteProtocolError("this node is already prepared")
        vector = self._preparation.check(request.weights(), self._statistic)
        self._tasks = self._client_tasks(self._preparation.apply(self._source, vector))
        return TaskOutput()

    def deferred(self, task: str) -> Task:
        def run(request: wire.TaskRequest, digest: str) -> TaskOutput:
            if self._tasks is None:
                raise RemoteProtocolError(f"task {task!r} before the preparation's result")
            return self._tasks[task](request, digest)

        return run


def _distributed_node(job: FederatedJob, config: JobConfig, name: str, source: SourceModel, data: HospitalData,
                      state: PrivacyState, guard: BudgetGuard, jid: str, *, identity: SigningKey, roster: Roster,
                      policy: NodePolicy | None) -> Hospital:
    """A hospital's node of a distributed-noise job: the ``"step"`` task (one DP-SGD step's
    noisy integer share per request, charged as ``poisson_skellam``) and ``"evaluate"``. The plan
    (encoding, noise share, sample rate, policy) comes from this hospital's own job file
    (:func:`distributed_plan`). With a preparation, its statistic task and ``prepare`` come first,
    as in a local-noise job, and ``"step"`` and ``"evaluate"`` are refused until the prepared
    source model is built (the plan does not depend on it: only on the trainable dimension)."""
    priv, tcfg = config["privacy"], config["training"]
    # The client's DP-SGD settings are unused here (no local training); its noise_multiplier is a
    # placeholder that no task of this node charges.
    dp = DPTrainingConfig(lr=tcfg["lr"], expected_batch_size=tcfg["expected_batch_size"],
                          max_grad_norm=tcfg["max_grad_norm"], epochs=tcfg["epochs"], noise_multiplier=1.0,
                          device="cpu", secure_mode=priv["secure_mode"], accountant=priv["accountant"],
                          public_dataset_size=config["declared"]["records"][name])
    hospital, seed, randomness = _hospital(config, name, data, state, guard, jid)
    plan = distributed_plan(job, config, source)

    def client_tasks(model_source: SourceModel) -> dict[str, Task]:
        hospital.client = _private_client(name, model_source, data, dp, guard, randomness)
        tasks = standard_tasks(hospital.client, hospital.evaluation, frozen_hash=model_source.frozen_hash,
                               reports=hospital.reports, metric=job.metric)
        return {STEP_TASK: DistributedStepTask(hospital.client, plan, frozen_hash=model_source.frozen_hash),
                "evaluate": tasks["evaluate"]}

    # with a preparation, its release is charged (and its result applied) before any step
    node_tasks = _node_tasks(job, config, source, data, guard, client_tasks, (STEP_TASK, "evaluate"))
    # its step sessions may be set up before their steps (checked against its own plan), unless its
    # own job file says [secagg] prekeyed = false
    prekey = (STEP_TASK, plan.check_session) if config.prekeyed() else None
    hospital.node = ClientNode(name=name, tasks=node_tasks, seed=seed, identity=identity, roster=roster, policy=policy,
                               prekey=prekey)
    return hospital


def distributed_plan(job: FederatedJob | None, config: JobConfig, source: SourceModel) -> DistributedPlan:
    """The plan of a distributed-noise job (:func:`~secfedtl.federated.distributed.plan_for`), the
    same on the server and at every hospital: from the job file, the source model's trainable
    dimension, and the job's public releases before training (:meth:`FederatedJob.prior_events`:
    its preparation's event), never from what a hospital spent elsewhere."""
    prior = job.prior_events(config) if job is not None else planned_prior_events(config)
    return plan_for(config, sum(t.numel() for t in source.head_state.values()), job_id=job_id(config),
                    prior_events=prior)


def _calibrated_after(dp: DPTrainingConfig, prior: list[PoissonGaussianEvent]) -> DPTrainingConfig:
    """``dp`` with its noise multiplier calibrated so that ``prior`` plus ``planned_rounds`` rounds
    reach at most ``target_epsilon`` (by the config's accountant), from public values only."""
    assert dp.target_epsilon is not None and dp.target_delta is not None and dp.planned_rounds is not None
    rate = dp.sample_rate
    try:
        sigma = calibrate_noise_multiplier(target_epsilon=dp.target_epsilon, target_delta=dp.target_delta,
                                           sample_rate=rate, steps=dp.planned_rounds * dp.local_steps(),
                                           accountant=dp.accountant, prior_events=prior)
    except AccountingError as exc:
        raise ConfigError(f"no training noise fits what is left of the budget after {len(prior)} releases "
                          f"spent or planned before training: {exc}") from exc
    return dataclasses.replace(dp, noise_multiplier=sigma, target_epsilon=None, target_delta=None,
                               planned_rounds=None)


# -- the server ------------------------------------------------------------------------------------


def build_server(config: JobConfig, source: SourceModel, pool: ClientPool, roster: Roster, *,
                 job: FederatedJob | None = None) -> Federation:
    """The server side: global model (the source head), optimizer and secure-aggregation settings;
    ``roster`` holds the clients' signing public keys. ``job``: the job whose preparation (if any)
    a distributed-noise plan is calibrated after (the hospitals' nodes do the same; a server that
    left it out would announce a smaller share than theirs, and every step would be refused)."""
    head = source.head_state
    server = config["server"]
    momentum = {"momentum": server["momentum"]} if "momentum" in server else {}
    distributed, colluders = None, None
    if config.noise() == "distributed":  # sessions must tolerate the colluders the hospitals' noise assumes
        distributed = distributed_plan(job, config, source)
        colluders = distributed.settings.policy.colluders
    return Federation(distributed=distributed, colluders=colluders, prekeyed=config.prekeyed(),
        ema=server.get("ema", 0.0), pool=pool, roster=roster, names=list(head), global_params=flatten_params(head), frozen_hash=source.frozen_hash,
        optimizer=make_server_optimizer(server["optimizer"], server_lr=server["lr"], **momentum),
        clip=config["secagg"]["clip"], bits=config["secagg"]["bits"], max_samples=config["secagg"]["max_samples"],
        seed=config["job"]["seed"])


# -- DP source selection ([selection]) -------------------------------------------------------------


def selection_mechanism(config: JobConfig) -> SelectionMechanism:
    """The Gaussian mechanism every hospital runs for source selection (``[selection]``), calibrated
    on its own to the selection's epsilon (RDP, the budget's delta)."""
    sel, priv = config["selection"], config["privacy"]
    try:
        return SelectionMechanism.calibrate(num_candidates=len(sel["candidates"]), loss_clip=sel["loss_clip"],
                                            target_epsilon=sel["epsilon"], target_delta=priv["delta"])
    except AccountingError as exc:
        raise ConfigError(f"[selection] epsilon {sel['epsilon']} cannot be met: {exc}") from exc


def planned_prior_events(config: JobConfig) -> list[PoissonGaussianEvent]:
    """What every hospital spends before training (public, from the config alone, so a resumed
    run calibrates the same training noise): the selection event, if there is a selection."""
    return [selection_mechanism(config).event()] if "selection" in config.sections else []


def build_selection_node(config: JobConfig, name: str, candidates: Sequence[SourceModel], data: HospitalData,
                         state: PrivacyState, *, identity: SigningKey, roster: Roster,
                         job_ref: str | None = None) -> ClientNode:
    """One hospital's node for source selection: the ``select`` task on its ``validation`` split
    (selection noise from ``os.urandom``, whatever ``secure_mode`` says: it is one small draw)."""
    if "validation" not in data.evaluation:
        raise ConfigError(f"{name}: DP source selection scores the candidates on a 'validation' split; "
                          "this hospital's data has none")
    jid = job_id(config) if job_ref is None else job_ref
    guard = state.guard(job_id=jid, declaration=declaration(config, name))
    statistic = CandidateLosses(selection_mechanism(config), [c.model for c in candidates])
    task = StatisticTask(statistic, data=data.evaluation["validation"], guard=guard)
    return ClientNode(name=name, tasks={statistic.task: task}, seed=_node_seed(config, name), identity=identity,
                      roster=roster)


def select_source(config: JobConfig, out: Path, candidates: Sequence[SourceModel], pool: ClientPool,
                  roster: Roster) -> dict[str, Any]:
    """Run DP source selection over ``pool`` (the hospitals' selection nodes: one secure round of
    the ``select`` task) and return the record written to ``out/selection.json``. If the secure
    round fails, the first candidate is kept and the record says why. Closes ``pool``."""
    mechanism = selection_mechanism(config)
    max_samples = config["secagg"]["max_samples"]
    # The server of this one round has no model: secure_round only needs a pool and the encoding.
    server = Federation(pool=pool, roster=roster, names=["selection"], global_params=np.zeros(1),
                        optimizer=make_server_optimizer("fedavg", server_lr=1.0), bits=config["secagg"]["bits"],
                        max_samples=max_samples, seed=config["job"]["seed"])
    # Every coordinate of a hospital's vector is at most max_samples * C plus noise; clipping the
    # noisy vector to a public bound is post-processing.
    try:
        outcome = secure_statistic(server, CandidateLosses(mechanism, [c.model for c in candidates]), round=0,
                                   max_samples=max_samples)
    finally:
        pool.close()
    record: dict[str, Any] = {
        "candidates": config.source_specs(), "status": outcome.status, "reason": outcome.reason,
        "included": list(outcome.included), "refused": list(outcome.refused),
        "epsilon": config["selection"]["epsilon"], "loss_clip": mechanism.loss_clip,
        "noise_multiplier": mechanism.noise_multiplier, "sensitivity": mechanism.sensitivity,
        "source_validation_loss": [c.info.get("validation_loss") for c in candidates]}
    if outcome.status == "ok" and outcome.total is not None:
        result = select_candidate(outcome.total, num_candidates=mechanism.num_candidates)
        record.update(result.to_dict())
        record["aggregate_noise_std"] = mechanism.loss_noise_std * math.sqrt(len(outcome.included))
    else:
        record.update(index=0, noisy_loss_sums=None, noisy_count=None, mean_losses=None)
    (out / "selection.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    return record


def saved_selection(config: JobConfig, out: Path) -> dict[str, Any] | None:
    """The selection record of an earlier run in ``out`` (``--resume``), if any."""
    path = out / "selection.json"
    if not path.exists():
        return None
    saved: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    if saved.get("candidates") != config.source_specs():
        raise ConfigError(f"{path} was written for other candidates")
    return saved


# -- the preparation (server side) ---------------------------------------------------------------


def prepare_source(job: FederatedJob, config: JobConfig, source: SourceModel, pool: ClientPool, roster: Roster,
                   out: Path) -> tuple[SourceModel, dict[str, Any] | None]:
    """Run ``job``'s preparation over ``pool`` (one secure round of its statistic, then the
    ``prepare`` task with the public result) and return the source model the job trains, and the
    record written to ``out/preparation.json``. A run that finds that file (``--resume``) sends
    the saved result again without a new release. Without a preparation: ``source`` as it is.

    Raises:
        AggregationError: the secure round failed, or its sum is unusable.
    """
    if job.prepare is None:
        return source, None
    statistic = job.prepare.statistic(config)
    path = out / "preparation.json"
    server = Federation(pool=pool, roster=roster, names=["prepare"], global_params=np.zeros(1),
                        optimizer=make_server_optimizer("fedavg", server_lr=1.0), bits=config["secagg"]["bits"],
                        max_samples=config["secagg"]["max_samples"], seed=config["job"]["seed"])
    if path.exists():
        record: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        if record.get("statistic") != statistic.options():
            raise ConfigError(f"{path} was written for another statistic")
        result = np.asarray(record["result"], dtype=np.float64)
    else:
        outcome = secure_statistic(server, statistic, round=0, max_samples=config["secagg"]["max_samples"])
        record = {"task": statistic.task, "statistic": statistic.options(), "status": outcome.status,
                  "reason": outcome.reason, "included": list(outcome.included), "refused": list(outcome.refused)}
        if outcome.status != "ok" or outcome.total is None:
            raise AggregationError(f"the preparation's secure round failed: {outcome.reason or outcome.status}")
        result = job.prepare.check(job.prepare.result(outcome.total, statistic), statistic)
        record["result"] = [float(v) for v in result]
        path.write_text(json.dumps(record, indent=2), encoding="utf-8")
    answers = server.query("prepare", weights=result, round=0)
    record = {**record, "prepared": sorted(n for n, a in answers.items() if a.get("status") == "done")}
    return job.prepare.apply(source, result), record
