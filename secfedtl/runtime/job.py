"""`secfedtl run CONFIG.toml`: a federated transfer-learning job described by a TOML file.

The bundled default (`secfedtl demo`) is ``secfedtl/configs/heart.toml``; the schema is in
docs/config.md. A job writes into its output directory:

* ``config.json``: the resolved job configuration (what `--resume` rebuilds from);
* ``ledger.jsonl``: the hash-chained privacy ledger of every hospital (`secfedtl audit`);
* ``budgets/<client>.json``: each hospital's accountant state;
* ``checkpoint.json``: server state after the last completed round;
* ``metrics.json`` and ``report.png``: results.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from secfedtl.aggregation import make_server_optimizer
from secfedtl.crypto.primitives import SigningKey
from secfedtl.data import load_fed_heart_disease, standardize, validation_split
from secfedtl.errors import AccountingError, ConfigError, RemoteProtocolError
from secfedtl.privacy.accountants import calibrate_noise_multiplier, compute_epsilon
from secfedtl.privacy.budget import BudgetGuard, PrivacyBudget
from secfedtl.privacy.ledger import Ledger
from secfedtl.privacy.events import PoissonGaussianEvent
from secfedtl.privacy.ledger import read_verified_ledger, spent_events
from secfedtl.runtime import wire
from secfedtl.runtime.federation import Federation, RoundReport
from secfedtl.runtime.node import ClientNode, TaskOutput, standard_tasks
from secfedtl.runtime.pool import ClientPool, LocalPool, ProcessPool
from secfedtl.runtime.roster import NodePolicy, Roster
from secfedtl.runtime.report import plot_epsilon_per_round
from secfedtl.training import DPTrainingConfig, PrivateClient, flatten_delta, unflatten_delta
from secfedtl.training.dpsgd import sample_rate_for
from secfedtl.transfer.freezing import HeadOnly
from secfedtl.transfer.models import state_hash
from secfedtl.transfer.regularizers import L2SP
from secfedtl.transfer.selection import SelectionMechanism, private_selection_statistics, select_candidate

_SECTIONS = {
    "job": {"dataset": str, "source": str, "clients": list, "rounds": int, "seed": int,
            "validation_fraction": float, "workers": int},
    "privacy": {"epsilon": float, "delta": float, "accountant": str, "personalise": bool, "secure_mode": bool,
                "insecure_reproducible_noise": bool},
    "model": {"kind": str, "hidden": int, "source_epochs": int, "source_lr": float, "source_weight_decay": float},
    "training": {"lr": float, "expected_batch_size": int, "max_grad_norm": float, "epochs": int,
                 "l2sp": float, "optimizer": str},
    "server": {"optimizer": str, "lr": float},
    "secagg": {"clip": float, "bits": int, "max_samples": int},
    "selection": {"candidates": list, "epsilon": float, "loss_clip": float},
}
#: Keys that may be left out, with their defaults (added after version 1 of the schema).
_OPTIONAL: dict[str, dict[str, Any]] = {"job": {"workers": 0},
                                       "privacy": {"secure_mode": True, "insecure_reproducible_noise": False},
                                       "model": {"kind": "mlp"}}
#: Sections that may be left out as a whole.
_OPTIONAL_SECTIONS = frozenset({"selection"})
#: Keys of one source-model candidate in ``[selection] candidates`` (all but ``kind`` optional:
#: they default to the ``[model]`` section's values).
_CANDIDATE_KEYS: dict[str, type] = {"kind": str, "hidden": int, "weight_decay": float}
SOURCE_KINDS = ("mlp", "linear")


@dataclass(kw_only=True)
class JobConfig:
    """A validated job configuration (sections and keys of docs/config.md)."""

    sections: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __getitem__(self, key: str) -> dict[str, Any]:
        return self.sections[key]

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> JobConfig:
        unknown = set(data) - set(_SECTIONS)
        if unknown:
            raise ConfigError(f"unknown config sections {sorted(unknown)}")
        sections: dict[str, dict[str, Any]] = {}
        for name, schema in _SECTIONS.items():
            if name in _OPTIONAL_SECTIONS and name not in data:
                continue
            given = {**_OPTIONAL.get(name, {}), **dict(data.get(name, {}))}
            extra = set(given) - set(schema)
            missing = set(schema) - set(given)
            if extra or missing:
                raise ConfigError(f"[{name}]: unknown keys {sorted(extra)}, missing keys {sorted(missing)}")
            for key, kind in schema.items():
                value = given[key]
                if kind is float and isinstance(value, int) and not isinstance(value, bool):
                    value = float(value)
                if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                    raise ConfigError(f"[{name}] {key} must be {kind.__name__}, got {value!r}")
                given[key] = value
            sections[name] = given
        job = sections["job"]
        if job["dataset"] != "uci_heart_disease":
            raise ConfigError("the only bundled dataset is 'uci_heart_disease'")
        if job["rounds"] < 1:
            raise ConfigError("rounds must be >= 1")
        if job["workers"] < 0:
            raise ConfigError("workers must be >= 0 (0: clients run in this process, one after the other)")
        if not 0 < job["validation_fraction"] < 0.5:
            raise ConfigError("validation_fraction must be in (0, 0.5)")
        if len(job["clients"]) < 3 or job["source"] in job["clients"]:
            raise ConfigError("at least 3 private clients, and the source is not one of them")
        if not sections["privacy"]["epsilon"] > 0 or not 0 < sections["privacy"]["delta"] < 1:
            raise ConfigError("epsilon must be > 0 and delta in (0, 1)")
        model = sections["model"]
        _check_source_spec({"kind": model["kind"], "hidden": model["hidden"],
                            "weight_decay": model["source_weight_decay"]}, "[model]")
        if "selection" in sections:
            sel = sections["selection"]
            if not sel["candidates"]:
                raise ConfigError("[selection] candidates must list at least one source model")
            sel["candidates"] = [_candidate_spec(c, model, k) for k, c in enumerate(sel["candidates"])]
            if not 0 < sel["epsilon"] < sections["privacy"]["epsilon"]:
                raise ConfigError("[selection] epsilon must be > 0 and below the [privacy] epsilon it is part of")
            if not (math.isfinite(sel["loss_clip"]) and sel["loss_clip"] > 0):
                raise ConfigError("[selection] loss_clip must be a finite number > 0")
        if sections["privacy"]["insecure_reproducible_noise"]:
            if sections["privacy"]["secure_mode"]:
                raise ConfigError("insecure_reproducible_noise needs secure_mode = false (tests only)")
            warnings.warn("privacy.insecure_reproducible_noise: the DP noise is drawn from a seeded generator and "
                          "is predictable from the job seed; for reproducibility tests only, never for real data",
                          stacklevel=2)
        return cls(sections=sections)

    @classmethod
    def load(cls, path: str | Path | None = None) -> JobConfig:
        if path is None:
            text = resources.files("secfedtl.configs").joinpath("heart.toml").read_text(encoding="utf-8")
        else:
            text = Path(path).read_text(encoding="utf-8")
        try:
            return cls.from_mapping(tomllib.loads(text))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"invalid TOML: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.sections)

    def source_specs(self) -> list[dict[str, Any]]:
        """The source-model candidates: ``[selection] candidates``, or the one ``[model]`` names."""
        if "selection" in self.sections:
            return copy.deepcopy(self.sections["selection"]["candidates"])
        model = self.sections["model"]
        return [{"kind": model["kind"], "hidden": model["hidden"] if model["kind"] == "mlp" else 0,
                 "weight_decay": model["source_weight_decay"]}]


def _check_source_spec(spec: dict[str, Any], where: str) -> None:
    if spec["kind"] not in SOURCE_KINDS:
        raise ConfigError(f"{where}: kind must be one of {SOURCE_KINDS}, got {spec['kind']!r}")
    if spec["kind"] == "mlp" and spec["hidden"] < 1:
        raise ConfigError(f"{where}: an mlp needs hidden >= 1")
    if not (math.isfinite(spec["weight_decay"]) and spec["weight_decay"] >= 0):
        raise ConfigError(f"{where}: weight_decay must be a finite number >= 0")


def _candidate_spec(value: Any, model: dict[str, Any], k: int) -> dict[str, Any]:
    """One ``[selection] candidates`` entry, completed from ``[model]`` and validated."""
    where = f"[selection] candidates[{k}]"
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a table such as {{kind = \"mlp\", hidden = 32}}")
    extra = set(value) - set(_CANDIDATE_KEYS)
    if extra or "kind" not in value:
        raise ConfigError(f"{where}: unknown keys {sorted(extra)}; kind is required")
    spec = {"kind": value["kind"], "hidden": value.get("hidden", model["hidden"]),
            "weight_decay": value.get("weight_decay", model["source_weight_decay"])}
    for key, kind in _CANDIDATE_KEYS.items():
        v = spec[key]
        if kind is float and isinstance(v, int) and not isinstance(v, bool):
            v = spec[key] = float(v)
        if not isinstance(v, kind) or isinstance(v, bool):
            raise ConfigError(f"{where}: {key} must be {kind.__name__}, got {v!r}")
    if spec["kind"] == "linear":
        spec["hidden"] = 0
    _check_source_spec(spec, where)
    return spec


class HeartNet(nn.Module):
    """A small MLP: ``backbone`` (Linear + ReLU, frozen after source training) and ``head``.

    ``hidden=0`` is logistic regression: the backbone is the identity and the head sees the inputs.
    """

    def __init__(self, num_features: int, hidden: int) -> None:
        super().__init__()
        if hidden > 0:
            self.backbone: nn.Module = nn.Sequential(nn.Linear(num_features, hidden), nn.ReLU())
        else:
            self.backbone = nn.Identity()
        self.head = nn.Linear(hidden if hidden > 0 else num_features, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _dataset(x: np.ndarray, y: np.ndarray) -> TensorDataset:
    return TensorDataset(torch.tensor(np.asarray(x), dtype=torch.float32), torch.tensor(np.asarray(y), dtype=torch.long))


def train_source(x: np.ndarray, y: np.ndarray, *, hidden: int, epochs: int, lr: float, weight_decay: float,
                 seed: int, validation_fraction: float) -> tuple[HeartNet, dict[str, float]]:
    """Non-private training on the public source centre, with the epoch count chosen on a
    validation split of the source's own training data (never a test split)."""
    torch.manual_seed(seed)
    x_fit, y_fit, x_val, y_val = validation_split(x, y, validation_fraction, seed)
    model = HeartNet(x.shape[1], hidden)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    xf, yf = torch.as_tensor(x_fit), torch.as_tensor(y_fit)
    xv, yv = torch.as_tensor(x_val), torch.as_tensor(y_val)
    best = (math.inf, 0, copy.deepcopy(model.state_dict()))
    for epoch in range(epochs):
        model.train()
        opt.zero_grad()
        nn.functional.cross_entropy(model(xf), yf).backward()
        opt.step()
        model.eval()
        with torch.no_grad():
            val = float(nn.functional.cross_entropy(model(xv), yv))
        if val < best[0]:
            best = (val, epoch + 1, copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[2])
    # Inputs that never vary in the source carry nothing learned there; their first-layer weights
    # would keep their random initial values and only add noise where the feature does vary (in
    # the 16-feature FLamby encoding, three restecg columns are always 0 at Cleveland). Standardised
    # with the source's own statistics they are 0 on every source row, so zeroing them changes
    # nothing on the source and removes that noise elsewhere. (For logistic regression these are
    # head weights: the private hospitals may still learn them.)
    constant = torch.as_tensor(np.ptp(x, axis=0) == 0)
    first = model.backbone[0] if hidden > 0 else model.head
    with torch.no_grad():
        first.weight[:, constant] = 0.0
    return model, {"validation_loss": best[0], "epochs": best[1], "constant_inputs_zeroed": int(constant.sum())}


@dataclass(kw_only=True)
class Source:
    """The public part of a job, the same on the server and at every client: the standardised
    centres (each client uses only its own) and the source model trained on the public centre."""

    centres: dict[str, Any]
    model: HeartNet
    info: dict[str, float]

    @property
    def head(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    @property
    def frozen_hash(self) -> str:
        """Hash of the whole source model; clients refuse tasks announcing another one."""
        return state_hash(self.model)


def build_source(config: JobConfig, spec: dict[str, Any] | None = None) -> Source:
    """Load the data and train the source model on the public centre (deterministic for a seed).
    ``spec`` (one of :meth:`JobConfig.source_specs`) defaults to the first candidate."""
    job, mcfg = config["job"], config["model"]
    spec = config.source_specs()[0] if spec is None else spec
    centres, _ = standardize(load_fed_heart_disease(), stats_from=job["source"])
    src = centres[job["source"]]
    model, info = train_source(src.x_train, src.y_train, hidden=spec["hidden"] if spec["kind"] == "mlp" else 0,
                               epochs=mcfg["source_epochs"], lr=mcfg["source_lr"], weight_decay=spec["weight_decay"],
                               seed=job["seed"], validation_fraction=job["validation_fraction"])
    HeadOnly(head="head").apply(model)
    return Source(centres=centres, model=model, info={**info, "spec": dict(spec)})


@dataclass(kw_only=True)
class Hospital:
    """One private client's objects (they stay at that client)."""

    name: str
    node: ClientNode
    client: PrivateClient
    guard: BudgetGuard


def _client_split(config: JobConfig, name: str, centres: dict[str, Any]) -> tuple[int, Any, tuple[np.ndarray, ...]]:
    job = config["job"]
    if name not in job["clients"]:
        raise ConfigError(f"{name!r} is not one of the job's clients {job['clients']}")
    k = job["clients"].index(name)
    c = centres[name]
    return k, c, validation_split(c.x_train, c.y_train, job["validation_fraction"], job["seed"] + k)


def build_client_node(config: JobConfig, name: str, source: Source, ledger: Ledger, budgets_dir: Path, *,
                      identity: SigningKey, roster: Roster, policy: NodePolicy | None = None) -> Hospital:
    """The node of one private hospital: its own data splits, budget guard (on ``ledger``) and
    DP client, with the ``train``, ``evaluate`` and ``personalise`` tasks, its signing key
    ``identity`` and the federation's ``roster`` pinned. With a ``[selection]``
    section the training noise is calibrated so that the selection event plus every planned
    round stay within the budget."""
    job, priv, tcfg = config["job"], config["privacy"], config["training"]
    k, c, (x_fit, y_fit, x_val, y_val) = _client_split(config, name, source.centres)
    budget = PrivacyBudget.from_ledger(ledger.entries, name, epsilon=priv["epsilon"], delta=priv["delta"],
                                       accountant=priv["accountant"])
    budgets_dir.mkdir(parents=True, exist_ok=True)
    guard = BudgetGuard(client=name, budget=budget, ledger=ledger, state_path=budgets_dir / f"{name}.json")
    planned = job["rounds"] + (1 if priv["personalise"] else 0)
    dp = DPTrainingConfig(lr=tcfg["lr"], expected_batch_size=min(tcfg["expected_batch_size"], len(y_fit)),
                          max_grad_norm=tcfg["max_grad_norm"], epochs=tcfg["epochs"],
                          optimizer=tcfg["optimizer"], target_epsilon=priv["epsilon"],
                          target_delta=priv["delta"], planned_rounds=planned, device="auto",
                          secure_mode=priv["secure_mode"], seed=job["seed"] * 1000 + k,
                          accountant=priv["accountant"])
    prior = planned_prior_events(config)
    if prior:
        dp = _calibrated_after(dp, prior, dataset_size=len(y_fit))
    noise = None
    if priv["insecure_reproducible_noise"]:  # tests only: the same noise in every runtime, for a seed
        noise = torch.Generator().manual_seed(job["seed"] * 1000 + k + 1)
    client = PrivateClient(client_id=name, model=source.model, train_data=_dataset(x_fit, y_fit), config=dp,
                           guard=guard, regularizer=L2SP(strength=tcfg["l2sp"], source=source.head),
                           head="head", cache_features=True, noise_generator=noise)
    evaluation = {"test": _dataset(c.x_test, c.y_test), "validation": _dataset(x_val, y_val)}
    node = ClientNode(name=name, tasks=standard_tasks(client, evaluation, frozen_hash=source.frozen_hash),
                      seed=job["seed"] * 1000 + k, identity=identity, roster=roster, policy=policy)
    return Hospital(name=name, node=node, client=client, guard=guard)


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


def _calibrated_after(dp: DPTrainingConfig, prior: list[PoissonGaussianEvent], *, dataset_size: int) -> DPTrainingConfig:
    """``dp`` with its noise multiplier calibrated so that ``prior`` plus ``planned_rounds`` rounds
    reach at most ``target_epsilon`` (by the config's accountant, as :class:`PrivateClient` calibrates)."""
    assert dp.target_epsilon is not None and dp.target_delta is not None and dp.planned_rounds is not None
    rate = sample_rate_for(expected_batch_size=dp.expected_batch_size, dataset_size=dataset_size)
    try:
        sigma = calibrate_noise_multiplier(target_epsilon=dp.target_epsilon, target_delta=dp.target_delta,
                                           sample_rate=rate, steps=dp.planned_rounds * dp.local_steps(sample_rate=rate),
                                           accountant=dp.accountant, prior_events=prior)
    except AccountingError as exc:
        raise ConfigError(f"no training noise fits the budget after source selection: {exc}") from exc
    return dataclasses.replace(dp, noise_multiplier=sigma, target_epsilon=None, target_delta=None,
                               planned_rounds=None)


class SelectTask:
    """The ``"select"`` task of DP source-model selection (:mod:`secfedtl.transfer.selection`):
    the hospital's noisy ``(clipped loss sum per candidate, count)`` on its validation split,
    charged to its budget (ledger entry first); contributes that vector with weight 1. A request
    naming other candidates (by hash) or another mechanism is refused."""

    def __init__(self, *, candidates: list[nn.Module], data: TensorDataset, mechanism: SelectionMechanism,
                 guard: BudgetGuard, rng: np.random.Generator | None = None) -> None:
        self._candidates = candidates
        self._hashes = [state_hash(m) for m in candidates]
        self._data = data
        self._mechanism = mechanism
        self._guard = guard
        self._rng = rng

    def __call__(self, request: wire.TaskRequest, digest: str) -> TaskOutput:
        opts = request.options
        if list(opts.get("candidates", [])) != self._hashes:
            raise RemoteProtocolError("the request names other source-model candidates")
        if opts.get("mechanism") != selection_options(self._mechanism):
            raise RemoteProtocolError("the request announces another selection mechanism")
        vector = private_selection_statistics(candidates=self._candidates, data=self._data,
                                              mechanism=self._mechanism, guard=self._guard,
                                              round=request.round, model_hash=digest, rng=self._rng)
        return TaskOutput(vector=vector, weight=1)


def selection_options(mechanism: SelectionMechanism) -> dict[str, Any]:
    return {"num_candidates": mechanism.num_candidates, "loss_clip": mechanism.loss_clip,
            "noise_multiplier": mechanism.noise_multiplier}


def build_selection_node(config: JobConfig, name: str, candidates: list[Source], ledger: Ledger,
                         budgets_dir: Path, *, identity: SigningKey, roster: Roster) -> ClientNode:
    """One hospital's node for source selection: the ``select`` task on its validation split
    (selection noise from ``os.urandom``, whatever ``secure_mode`` says: it is one small draw)."""
    job, priv = config["job"], config["privacy"]
    k, _, (_, _, x_val, y_val) = _client_split(config, name, candidates[0].centres)
    budget = PrivacyBudget.from_ledger(ledger.entries, name, epsilon=priv["epsilon"], delta=priv["delta"],
                                       accountant=priv["accountant"])
    budgets_dir.mkdir(parents=True, exist_ok=True)
    guard = BudgetGuard(client=name, budget=budget, ledger=ledger, state_path=budgets_dir / f"{name}.json")
    task = SelectTask(candidates=[c.model for c in candidates], data=_dataset(x_val, y_val),
                      mechanism=selection_mechanism(config), guard=guard)
    return ClientNode(name=name, tasks={"select": task}, seed=job["seed"] * 1000 + k, identity=identity,
                      roster=roster)


def select_source(config: JobConfig, out: Path, candidates: list[Source], *, workers: int,
                  keys: tuple[Roster, dict[str, SigningKey]] | None = None) -> dict[str, Any]:
    """Run DP source selection over the hospitals (one secure round of the ``select`` task) and
    return the record written to ``out/selection.json``. A run that finds that file (``--resume``)
    reuses it. If the secure round fails, the first candidate is kept and the record says why."""
    path = out / "selection.json"
    if path.exists():
        saved: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("candidates") != config.source_specs():
            raise ConfigError(f"{path} was written for other candidates")
        return saved
    mechanism = selection_mechanism(config)
    ledger = Ledger(out / "ledger.jsonl")
    roster, identities = Roster.generate(config["job"]["clients"]) if keys is None else keys
    nodes = {n: build_selection_node(config, n, candidates, ledger, out / "budgets", identity=identities[n],
                                     roster=roster) for n in config["job"]["clients"]}
    pool: ClientPool = ProcessPool(nodes, workers=workers) if workers > 0 else LocalPool(nodes)
    max_samples = config["secagg"]["max_samples"]
    # The server of this one round has no model: secure_round only needs a pool and the encoding.
    server = Federation(pool=pool, roster=roster, names=["selection"], global_params=np.zeros(1),
                        optimizer=make_server_optimizer("fedavg", server_lr=1.0), bits=config["secagg"]["bits"],
                        max_samples=max_samples, seed=config["job"]["seed"])
    # Every coordinate of a hospital's vector is at most max_samples * C plus noise; clipping the
    # noisy vector to a public bound is post-processing.
    clip = max_samples * mechanism.loss_clip + 10.0 * mechanism.loss_noise_std
    try:
        outcome = server.secure_round("select", round=0, cohort=sorted(pool.names), vector_length=mechanism.vector_length,
                                      clip=clip, max_weight=1, weights=np.zeros(0),
                                      options={"candidates": [state_hash(c.model) for c in candidates],
                                               "mechanism": selection_options(mechanism)})
    finally:
        pool.close()
    record: dict[str, Any] = {
        "candidates": config.source_specs(), "status": outcome.status, "reason": outcome.reason,
        "included": list(outcome.included), "refused": list(outcome.refused),
        "epsilon": config["selection"]["epsilon"], "loss_clip": mechanism.loss_clip,
        "noise_multiplier": mechanism.noise_multiplier, "sensitivity": mechanism.sensitivity,
        "source_validation_loss": [c.info["validation_loss"] for c in candidates]}
    if outcome.status == "ok" and outcome.total is not None:
        result = select_candidate(outcome.total, num_candidates=mechanism.num_candidates)
        record.update(result.to_dict())
        record["aggregate_noise_std"] = mechanism.loss_noise_std * math.sqrt(len(outcome.included))
    else:
        record.update(index=0, noisy_loss_sums=None, noisy_count=None, mean_losses=None)
    path.write_text(json.dumps(record, indent=2), encoding="utf-8")
    return record


def build_server(config: JobConfig, source: Source, pool: ClientPool, roster: Roster) -> Federation:
    """The server side: global model (the source head), optimizer and secure-aggregation settings;
    ``roster`` holds the clients' signing public keys."""
    head = source.head
    return Federation(
        pool=pool, roster=roster, names=list(head), global_params=flatten_delta(head), frozen_hash=source.frozen_hash,
        optimizer=make_server_optimizer(config["server"]["optimizer"], server_lr=config["server"]["lr"]),
        clip=config["secagg"]["clip"], bits=config["secagg"]["bits"], max_samples=config["secagg"]["max_samples"],
        seed=config["job"]["seed"])


@dataclass(kw_only=True)
class HeartJob:
    """Everything one in-process run of the heart job holds. ``hospitals`` are the client-side
    objects; with worker processes the live copies are in the workers (don't use these then)."""

    config: JobConfig
    out: Path
    source: Source
    hospitals: dict[str, Hospital]
    federation: Federation
    selection: dict[str, Any] | None = None

    @property
    def clients(self) -> dict[str, PrivateClient]:
        return {n: h.client for n, h in self.hospitals.items()}

    @property
    def guards(self) -> dict[str, BudgetGuard]:
        return {n: h.guard for n, h in self.hospitals.items()}

    @property
    def nodes(self) -> dict[str, ClientNode]:
        return {n: h.node for n, h in self.hospitals.items()}

    def global_model(self) -> HeartNet:
        model = copy.deepcopy(self.source.model)
        params = dict(model.named_parameters())
        state = unflatten_delta(self.federation.global_params, self.source.head)
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)
        return model


def build_job(config: JobConfig, out: Path, *, resume: bool = False, workers: int | None = None) -> HeartJob:
    """Train the source model, build every hospital's node (one shared ledger file in ``out``)
    and the server. ``workers`` (default: the config's ``job.workers``) > 0 runs the nodes in
    that many forked worker processes; 0 runs them in this process, one after the other."""
    out.mkdir(parents=True, exist_ok=True)
    ledger_path = out / "ledger.jsonl"
    if not resume and ledger_path.exists():
        raise ConfigError(f"{ledger_path} exists: use --resume to continue that run, or another --out")
    workers = config["job"]["workers"] if workers is None else workers
    # One process plays every hospital: per-run signing keys, and every node pins the roster.
    roster, identities = Roster.generate(config["job"]["clients"])
    selection: dict[str, Any] | None = None
    if "selection" in config.sections:
        candidates = [build_source(config, spec) for spec in config.source_specs()]
        selection = select_source(config, out, candidates, workers=workers, keys=(roster, identities))
        source = candidates[selection["index"]]
    else:
        source = build_source(config)
    ledger = Ledger(ledger_path)  # opened after selection: it holds the selection entries
    policy = NodePolicy(max_sessions=config["job"]["rounds"])  # one secure session per training round
    hospitals = {name: build_client_node(config, name, source, ledger, out / "budgets", identity=identities[name],
                                         roster=roster, policy=policy)
                 for name in config["job"]["clients"]}
    nodes = {n: h.node for n, h in hospitals.items()}
    pool: ClientPool = ProcessPool(nodes, workers=workers) if workers > 0 else LocalPool(nodes)
    federation = build_server(config, source, pool, roster)
    if resume and (out / "checkpoint.json").exists():
        federation.load_state_dict(json.loads((out / "checkpoint.json").read_text(encoding="utf-8")))
    return HeartJob(config=config, out=out, source=source, hospitals=hospitals, federation=federation,
                    selection=selection)


def _pooled(infos: dict[str, dict[str, Any]], split: str) -> tuple[dict[str, float], float]:
    per = {n: float(i["accuracy"][split]) for n, i in infos.items() if i.get("status") == "done"}
    total = sum(int(infos[n]["samples"][split]) for n in per)
    correct = sum(round(per[n] * int(infos[n]["samples"][split])) for n in per)
    return per, (correct / total if total else float("nan"))


def run_job(config: JobConfig, out: Path, *, resume: bool = False, progress: bool = True,
            workers: int | None = None) -> dict[str, Any]:
    """Run (or resume) the job; writes metrics.json, ledger.jsonl, report.png into ``out``."""
    t_start = time.perf_counter()
    if resume:
        saved = out / "config.json"
        if not saved.exists():
            raise ConfigError(f"nothing to resume in {out}")
        config = JobConfig.from_mapping(json.loads(saved.read_text(encoding="utf-8")))
    job = build_job(config, out, resume=resume, workers=workers)
    try:
        return _run(job, config, out, t_start, progress)
    finally:
        job.federation.pool.close()


def _run(job: HeartJob, config: JobConfig, out: Path, t_start: float, progress: bool) -> dict[str, Any]:
    return run_federation(config, job.source, job.federation, out, t_start=t_start, progress=progress,
                          selection=job.selection)


def run_federation(config: JobConfig, source: Source, federation: Federation, out: Path, *,
                   t_start: float | None = None, progress: bool = True,
                   selection: dict[str, Any] | None = None) -> dict[str, Any]:
    """The server's part of a job, whatever pool ``federation`` talks through: every round, the
    evaluations, personalisation; writes config.json, rounds.json, checkpoint.json,
    metrics.json and report.png into ``out``. Epsilons come from ``out/ledger.jsonl`` when the
    ledger is there (clients in this process or on this machine), else from what the clients
    report (with Flower the ledgers stay at the hospitals: audit them there)."""
    t_start = time.perf_counter() if t_start is None else t_start
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2), encoding="utf-8")
    rounds = config["job"]["rounds"]
    delta = config["privacy"]["delta"]
    round_rows: list[dict[str, Any]] = [r for r in _saved_rows(out) if r["round"] < federation.rounds_done]
    initial = flatten_delta(source.head)
    source_acc, source_pooled = _pooled(federation.query("evaluate", weights=initial), "test")
    bar = _progress(rounds, federation.rounds_done, progress)

    def on_round(report: RoundReport) -> None:
        infos = federation.query("evaluate", round=report.round)
        per, pooled = _pooled(infos, "test")
        val_per, val_pooled = _pooled(infos, "validation")
        eps = {n: float(i["epsilon"]) for n, i in infos.items() if i.get("status") == "done"}
        round_rows.append({**report.to_dict(), "test_accuracy": per, "pooled_test_accuracy": pooled,
                           "validation_accuracy": val_per, "pooled_validation_accuracy": val_pooled,
                           "epsilon": eps})
        (out / "rounds.json").write_text(json.dumps(round_rows, indent=2), encoding="utf-8")
        bar.update(1)
        bar.set_postfix(acc=f"{pooled:.3f}", eps=f"{max(eps.values(), default=0.0):.2f}", status=report.status)

    federation.run(rounds, checkpoint=out / "checkpoint.json", on_round=on_round)
    bar.close()
    final = federation.query("evaluate", round=rounds)
    federated_acc, federated_pooled = _pooled(final, "test")
    personal: dict[str, float] = {}
    personal_status: dict[str, str] = {}
    personalised: dict[str, dict[str, Any]] = {}
    if config["privacy"]["personalise"]:
        personalised = federation.query("personalise", round=rounds)
        for name, info in sorted(personalised.items()):
            if info["status"] == "done":
                personal[name] = float(info["accuracy"]["test"])
                personal_status[name] = "ok"
            else:
                personal_status[name] = f"{info['status']}: {info.get('reason', '')}"
    # Each hospital's own best model: its personalised one, or the federated one where it could
    # not personalise (e.g. its budget was spent), pooled over the same test rows as the federated.
    personal_pooled = None
    if personal:
        deployed = {n: personalised[n] if personal_status.get(n) == "ok" else final[n] for n in final}
        _, personal_pooled = _pooled(deployed, "test")
    if (out / "ledger.jsonl").exists():
        spent = _spent_from_ledger(out / "ledger.jsonl", config["job"]["clients"])
        eps_main = {n: compute_epsilon(ev, delta, accountant=config["privacy"]["accountant"]) if ev else 0.0
                    for n, ev in spent.items()}
        eps_prv: dict[str, float] | str = {n: compute_epsilon(ev, delta, accountant="prv") if ev else 0.0
                                           for n, ev in spent.items()}
    else:  # the ledgers are at the clients: what they report (audit each ledger where it is)
        eps_main = {n: float(i["epsilon"]) for n, i in final.items() if i.get("status") == "done"}
        eps_main.update({n: float(i["epsilon"]) for n, i in personalised.items() if i.get("status") == "done"})
        eps_prv = "audit each client's ledger (secfedtl audit LEDGER)"
    metrics = {
        "job": "uci_heart_disease", "delta": delta, "epsilon_budget": config["privacy"]["epsilon"],
        "accountant": config["privacy"]["accountant"],
        "source": {"centre": config["job"]["source"], **source.info,
                   "test_accuracy": source_acc, "pooled_test_accuracy": source_pooled},
        "final": {"pooled_test_accuracy": federated_pooled, "per_client_test_accuracy": federated_acc,
                  "personalised_test_accuracy": personal, "personalisation": personal_status,
                  "personalised_pooled_test_accuracy": personal_pooled,
                  "epsilon": eps_main, "epsilon_prv": eps_prv},
        "selection": selection,
        "rounds": round_rows,
        "wall_seconds": time.perf_counter() - t_start,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    _plot(metrics, out / "report.png")
    return metrics


def _spent_from_ledger(path: Path, clients: list[str]) -> dict[str, list[Any]]:
    """Every event each client has begun (pending entries count as spent), from the verified ledger."""
    entries, _ = read_verified_ledger(path)
    spent = spent_events(entries)
    return {n: [event for _, event, _ in spent.get(n, [])] for n in clients}


def _saved_rows(out: Path) -> list[dict[str, Any]]:
    path = out / "rounds.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else []


def _progress(total: int, initial: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="federated rounds", unit="round", disable=not enabled,
                file=sys.stderr)


def _plot(metrics: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = metrics["rounds"]
    xs = [r["round"] + 1 for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name in metrics["final"]["per_client_test_accuracy"]:
        ax1.plot(xs, [r["test_accuracy"].get(name, math.nan) for r in rows], marker="o", label=name)
    ax1.plot(xs, [r["pooled_test_accuracy"] for r in rows], color="black", linewidth=2, label="pooled")
    ax1.axhline(metrics["source"]["pooled_test_accuracy"], color="grey", linestyle="--", label="source (pooled)")
    ax1.set_xticks(xs)
    ax1.set_xlabel("round")
    ax1.set_ylabel("test accuracy")
    ax1.set_title("Global model accuracy per round")
    ax1.legend(fontsize=8)
    plot_epsilon_per_round(ax2, rows, clients=metrics["final"]["epsilon"], budget=metrics["epsilon_budget"],
                           accountant=metrics["accountant"], delta=metrics["delta"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_summary(metrics: dict[str, Any]) -> None:
    final = metrics["final"]
    src = metrics["source"]["test_accuracy"]
    print(f"\n{'hospital':<14}{'source':>9}{'federated':>11}{'personalised':>14}{'epsilon':>10}")
    for name, acc in final["per_client_test_accuracy"].items():
        pers = final["personalised_test_accuracy"].get(name)
        pers_s = f"{pers:.3f}" if pers is not None else "-"
        print(f"{name:<14}{src[name]:>9.3f}{acc:>11.3f}{pers_s:>14}{final['epsilon'][name]:>10.3f}")
    pooled_pers = final.get("personalised_pooled_test_accuracy")
    pooled_pers_s = f"{pooled_pers:.3f}" if pooled_pers is not None else "-"
    print(f"{'pooled':<14}{metrics['source']['pooled_test_accuracy']:>9.3f}{final['pooled_test_accuracy']:>11.3f}"
          f"{pooled_pers_s:>14}")
    sel = metrics.get("selection")
    if sel:
        chosen = sel["candidates"][sel["index"]]
        print(f"source selected with DP (epsilon {sel['epsilon']:g} of the budget; {sel['status']}): "
              f"candidate {sel['index']} {chosen}")
    print(f"delta = {metrics['delta']:g}; epsilon budget {metrics['epsilon_budget']:g} per hospital; "
          f"{metrics['wall_seconds']:.1f} s")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="job TOML file (schema: docs/config.md)")
    _add_common(parser)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/job"), help="output directory")
    parser.add_argument("--resume", type=Path, default=None, metavar="DIR",
                        help="continue the run in DIR from its last completed round")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="run the clients in N forked worker processes (default: the config's job.workers; "
                             "0: in this process, one after the other)")
    parser.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    config = JobConfig.load(args.config)
    return _run_cli(config, args)


def _run_cli(config: JobConfig, args: argparse.Namespace) -> int:
    out = args.resume if args.resume is not None else args.out
    metrics = run_job(config, out, resume=args.resume is not None, progress=not args.no_progress,
                      workers=args.workers)
    print_summary(metrics)
    print(f"wrote {out / 'metrics.json'}, {out / 'ledger.jsonl'}, {out / 'report.png'}")
    return 0


