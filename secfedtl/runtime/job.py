"""`secfedtl run CONFIG.toml`: a federated transfer-learning job described by a TOML file.

The bundled default (`secfedtl demo`) is ``secfedtl/configs/heart.toml``; the schema is in
docs/config.md. A job writes into its output directory:

* ``config.json``: the resolved job configuration, with the job id (what `--resume` rebuilds from);
* ``checkpoint.json``: server state after the last completed round;
* ``metrics.json`` and ``report.png``: results (``server``: what the server received;
  ``simulation_only``: what the experimenter, who holds every dataset in a simulation, computed
  outside the protocol).

Each hospital's privacy state (its ledger and budget, :class:`~secfedtl.privacy.state.PrivacyState`)
is *not* in the output directory: it lives in ``<state_dir>/<hospital>``, kept across jobs, so a
new job (or a new ``--out``) on the same hospital continues its budget.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
import uuid
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from collections.abc import Iterator, Mapping
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
from secfedtl.data import load_fed_heart_disease, record_split, split_key, standardize, validation_split
from secfedtl.data.heart import CENTER_NAMES, TRAIN_FRACTION
from secfedtl.encoding.fixed_point import FixedPointEncoding
from secfedtl.errors import AccountingError, ConfigError, RemoteProtocolError
from secfedtl.privacy.accountants import ACCOUNTANTS, calibrate_noise_multiplier, compute_epsilon
from secfedtl.privacy.budget import BudgetGuard
from secfedtl.privacy.events import PoissonGaussianEvent
from secfedtl.privacy.ledger import read_verified_ledger, spent_events
from secfedtl.privacy.randomness import Randomness
from secfedtl.privacy.state import PrivacyState, data_fingerprint
from secfedtl.runtime import wire
from secfedtl.runtime.federation import Federation, RoundReport
from secfedtl.runtime.node import ClientNode, LocalReports, TaskOutput, standard_tasks
from secfedtl.runtime.pool import ClientPool, LocalPool, ProcessPool
from secfedtl.runtime.roster import NodePolicy, Roster
from secfedtl.runtime.report import plot_epsilon_per_round
from secfedtl.training import (DPTrainingConfig, PrivateClient, evaluate, flatten_params, model_with_params,
                               unflatten_params)
from secfedtl.transfer.freezing import HeadOnly
from secfedtl.transfer.models import state_hash
from secfedtl.transfer.regularizers import L2SP
from secfedtl.transfer.selection import SelectionMechanism, private_selection_statistics, select_candidate

_SECTIONS = {
    "job": {"dataset": str, "source": str, "clients": list, "rounds": int, "seed": int,
            "validation_fraction": float, "workers": int, "id": str},
    "privacy": {"epsilon": float, "delta": float, "accountant": str, "personalise": bool, "secure_mode": bool,
                "insecure_reproducible": bool},
    "declared": {"records": dict},
    "model": {"kind": str, "hidden": int, "source_epochs": int, "source_lr": float, "source_weight_decay": float},
    "training": {"lr": float, "expected_batch_size": int, "max_grad_norm": float, "epochs": int,
                 "l2sp": float, "optimizer": str},
    "server": {"optimizer": str, "lr": float},
    "secagg": {"clip": float, "bits": int, "max_samples": int},
    "selection": {"candidates": list, "epsilon": float, "loss_clip": float},
}
#: Keys that may be left out, with their defaults (added after version 1 of the schema).
_OPTIONAL: dict[str, dict[str, Any]] = {"job": {"workers": 0, "id": ""},
                                       "privacy": {"secure_mode": True, "insecure_reproducible": False},
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
            raise ConfigError("[privacy] epsilon must be > 0 and delta in (0, 1), got epsilon "
                              f"{sections['privacy']['epsilon']!r}, delta {sections['privacy']['delta']!r}")
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
        records = sections["declared"]["records"]
        if set(records) != set(job["clients"]):
            raise ConfigError("[declared] records must give every client's declared public record count, "
                              f"for exactly {sorted(job['clients'])}")
        for name, count in records.items():
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ConfigError(f"[declared] records.{name} must be a positive integer, got {count!r}")
        _check_components(sections)
        if sections["privacy"]["insecure_reproducible"]:
            if sections["privacy"]["secure_mode"]:
                raise ConfigError("insecure_reproducible needs secure_mode = false (tests only)")
            warnings.warn("privacy.insecure_reproducible: Poisson batches and DP noise follow the job seed and are "
                          "predictable; the ledger marks every entry insecure_seeded and `secfedtl audit` "
                          "certifies none of them. For reproducibility tests only, never for real data",
                          stacklevel=2)
        return cls(sections=sections)

    @classmethod
    def load(cls, path: str | Path | None = None) -> JobConfig:
        if path is None:
            text = resources.files("secfedtl.configs").joinpath("heart.toml").read_text(encoding="utf-8")
        else:
            try:
                text = Path(path).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"cannot read job file {os.fspath(path)!r}: "
                                  f"{exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}") from exc
        try:
            return cls.from_mapping(tomllib.loads(text))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"invalid TOML: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.sections)

    def updated(self, changes: Mapping[tuple[str, str], Any]) -> JobConfig:
        """A validated copy with ``{(section, key): value}`` set; ``None`` values are left out
        (command-line overrides that were not given)."""
        data = self.to_dict()
        for (section, key), value in changes.items():
            if value is not None:
                data.setdefault(section, {})[key] = value
        return JobConfig.from_mapping(data)

    def to_toml(self) -> str:
        """The configuration as a job file that :meth:`load` reads back to the same sections."""
        def value(v: Any) -> str:
            if isinstance(v, dict):
                return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
            if isinstance(v, list):
                return "[" + ", ".join(value(x) for x in v) + "]"
            return json.dumps(v)

        return "".join(f"[{name}]\n" + "".join(f"{k} = {value(v)}\n" for k, v in section.items()) + "\n"
                       for name, section in self.sections.items())

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


def _check_components(sections: dict[str, dict[str, Any]]) -> None:
    """Build what the job builds from each section, with the same validators, before any folder,
    privacy state or data is touched: a bad value is a :class:`ConfigError` here, not after the
    source model trained."""
    job, priv, tcfg, scfg = sections["job"], sections["privacy"], sections["training"], sections["secagg"]
    if priv["accountant"] not in ACCOUNTANTS:
        raise ConfigError(f"[privacy] accountant must be one of {sorted(ACCOUNTANTS)}, got {priv['accountant']!r}")
    with _section("server"):
        make_server_optimizer(sections["server"]["optimizer"], server_lr=sections["server"]["lr"])
    with _section("training"):
        for records in sections["declared"]["records"].values():
            DPTrainingConfig(lr=tcfg["lr"], expected_batch_size=tcfg["expected_batch_size"],
                             max_grad_norm=tcfg["max_grad_norm"], epochs=tcfg["epochs"], optimizer=tcfg["optimizer"],
                             target_epsilon=priv["epsilon"], target_delta=priv["delta"], planned_rounds=job["rounds"],
                             secure_mode=priv["secure_mode"], accountant=priv["accountant"],
                             public_dataset_size=records)
        if not (math.isfinite(tcfg["l2sp"]) and tcfg["l2sp"] >= 0):
            raise ConfigError(f"l2sp must be a finite number >= 0, got {tcfg['l2sp']!r}")
    with _section("secagg"):
        if scfg["max_samples"] < 1:
            raise ConfigError(f"max_samples must be >= 1, got {scfg['max_samples']!r}")
        FixedPointEncoding(clip=scfg["clip"], bits=scfg["bits"], num_clients=len(job["clients"]),
                           max_weight=scfg["max_samples"])


@contextlib.contextmanager
def _section(name: str) -> Iterator[None]:
    """Prefix a :class:`ConfigError` raised inside with the config section it is about."""
    try:
        yield
    except ConfigError as exc:
        raise ConfigError(f"[{name}] {exc}") from exc


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


def build_source(config: JobConfig, spec: dict[str, Any] | None = None, *,
                 centres: dict[str, Any] | None = None) -> Source:
    """Load the data and train the source model on the public centre (deterministic for a seed).
    ``spec`` (one of :meth:`JobConfig.source_specs`) defaults to the first candidate. ``centres``
    (default :func:`build_centres`) replaces the bundled data, for simulations on other centres
    (examples/heart_selection/tune_on_source.py runs the job on pseudo-hospitals cut from the
    public source centre)."""
    job, mcfg = config["job"], config["model"]
    spec = config.source_specs()[0] if spec is None else spec
    centres = build_centres(config) if centres is None else centres
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
    evaluation: dict[str, TensorDataset]
    reports: LocalReports


def _client_split(config: JobConfig, name: str, centres: dict[str, Any]) -> tuple[int, Any, tuple[np.ndarray, ...]]:
    """A hospital's index, centre and record-stable fit/validation split of its training rows
    (:func:`~secfedtl.data.record_split`: adding a record moves only that record)."""
    job = config["job"]
    if name not in job["clients"]:
        raise ConfigError(f"{name!r} is not one of the job's clients {job['clients']}")
    k = job["clients"].index(name)
    c = centres[name]
    return k, c, record_split(c.x_train, c.y_train, job["validation_fraction"], split_key(job["seed"]))


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


def open_hospital_state(config: JobConfig, name: str, centres: dict[str, Any], root: Path) -> PrivacyState:
    """Hospital ``name``'s persistent privacy state in ``root/name``, for the budget of the job's
    ``[privacy]`` section, fingerprinted with every row the hospital holds."""
    priv = config["privacy"]
    c = centres[name]
    fingerprint = data_fingerprint([c.x_train, c.y_train, c.x_test, c.y_test])
    return PrivacyState.open(root / name, client=name, epsilon=priv["epsilon"], delta=priv["delta"],
                             accountant=priv["accountant"], fingerprint=fingerprint)


def declaration(config: JobConfig, name: str) -> dict[str, Any]:
    """What hospital ``name`` declares public about itself (recorded in every ledger entry)."""
    return {"records": config["declared"]["records"][name], "participation": True}


def build_client_node(config: JobConfig, name: str, source: Source, state: PrivacyState, *,
                      identity: SigningKey, roster: Roster, policy: NodePolicy | None = None,
                      job: str | None = None) -> Hospital:
    """The node of one private hospital: its own data splits, budget guard (on its persistent
    ``state``) and DP client, with the ``train``, ``evaluate`` and ``personalise`` tasks
    (the last two report locally, into ``state.directory/reports/<job id>``), its signing key
    ``identity`` and the federation's ``roster`` pinned (with ``policy``).

    Every mechanism parameter comes from public configuration: the sample rate is
    ``expected_batch_size / [declared] records``, the steps and noise follow from it, and the
    noise is calibrated so that what the hospital spent in other jobs, the selection event (if
    any) and every planned round of this job stay within its budget."""
    jcfg, priv, tcfg = config["job"], config["privacy"], config["training"]
    jid = job_id(config) if job is None else job
    k, c, (x_fit, y_fit, x_val, y_val) = _client_split(config, name, source.centres)
    guard = state.guard(job_id=jid, declaration=declaration(config, name))
    planned = jcfg["rounds"] + (1 if priv["personalise"] else 0)
    dp = DPTrainingConfig(lr=tcfg["lr"], expected_batch_size=tcfg["expected_batch_size"],
                          max_grad_norm=tcfg["max_grad_norm"], epochs=tcfg["epochs"],
                          optimizer=tcfg["optimizer"], target_epsilon=priv["epsilon"],
                          target_delta=priv["delta"], planned_rounds=planned, device="auto",
                          secure_mode=priv["secure_mode"], accountant=priv["accountant"],
                          public_dataset_size=config["declared"]["records"][name])
    earlier = state.events_before(jid)
    try:
        dp = _calibrated_after(dp, earlier + planned_prior_events(config))
    except ConfigError as exc:
        spent = f"{len(earlier)} releases of earlier jobs in {os.fspath(state.ledger.path)!r}; " if earlier else ""
        raise ConfigError(f"hospital {name!r} has too little privacy budget left for this job ({spent}"
                          f"budget epsilon {priv['epsilon']:g}): {exc}") from exc
    randomness = (Randomness.insecure_seeded(jcfg["seed"] * 1000 + k) if priv["insecure_reproducible"]
                  else Randomness.secure(secure_mode=priv["secure_mode"]))
    client = PrivateClient(client_id=name, model=source.model, train_data=_dataset(x_fit, y_fit), config=dp,
                           guard=guard, regularizer=L2SP(strength=tcfg["l2sp"], source=source.head),
                           head="head", cache_features=True, randomness=randomness)
    evaluation = {"test": _dataset(c.x_test, c.y_test), "validation": _dataset(x_val, y_val)}
    reports = LocalReports(state.directory / "reports" / jid)
    node = ClientNode(name=name, tasks=standard_tasks(client, evaluation, frozen_hash=source.frozen_hash,
                                                      reports=reports),
                      seed=jcfg["seed"] * 1000 + k, identity=identity, roster=roster, policy=policy)
    return Hospital(name=name, node=node, client=client, guard=guard, evaluation=evaluation, reports=reports)


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
        candidates = opts.get("candidates", [])  # server-chosen JSON: compare, never convert
        if not isinstance(candidates, list) or candidates != self._hashes:
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


def build_selection_node(config: JobConfig, name: str, candidates: list[Source], state: PrivacyState, *,
                         identity: SigningKey, roster: Roster, job: str | None = None) -> ClientNode:
    """One hospital's node for source selection: the ``select`` task on its validation split
    (selection noise from ``os.urandom``, whatever ``secure_mode`` says: it is one small draw)."""
    jcfg = config["job"]
    jid = job_id(config) if job is None else job
    k, _, (_, _, x_val, y_val) = _client_split(config, name, candidates[0].centres)
    guard = state.guard(job_id=jid, declaration=declaration(config, name))
    task = SelectTask(candidates=[c.model for c in candidates], data=_dataset(x_val, y_val),
                      mechanism=selection_mechanism(config), guard=guard)
    return ClientNode(name=name, tasks={"select": task}, seed=jcfg["seed"] * 1000 + k, identity=identity,
                      roster=roster)


def select_source(config: JobConfig, out: Path, candidates: list[Source], states: dict[str, PrivacyState], *,
                  workers: int, keys: tuple[Roster, dict[str, SigningKey]] | None = None) -> dict[str, Any]:
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
    roster, identities = Roster.generate(config["job"]["clients"]) if keys is None else keys
    nodes = {n: build_selection_node(config, n, candidates, states[n], identity=identities[n], roster=roster)
             for n in config["job"]["clients"]}
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
        pool=pool, roster=roster, names=list(head), global_params=flatten_params(head), frozen_hash=source.frozen_hash,
        optimizer=make_server_optimizer(config["server"]["optimizer"], server_lr=config["server"]["lr"]),
        clip=config["secagg"]["clip"], bits=config["secagg"]["bits"], max_samples=config["secagg"]["max_samples"],
        seed=config["job"]["seed"])


@dataclass(kw_only=True)
class HeartJob:
    """Everything one in-process run of the heart job holds. ``hospitals`` are the client-side
    objects; with worker processes the live copies are in the workers (don't use these then,
    except their evaluation data, which the experimenter of a simulation holds anyway)."""

    config: JobConfig
    out: Path
    source: Source
    hospitals: dict[str, Hospital]
    states: dict[str, PrivacyState]
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

    def model_with(self, params: np.ndarray) -> HeartNet:
        """The source model with ``params`` as its trainable weights."""
        return model_with_params(self.source.model, unflatten_params(params, self.source.head))  # type: ignore[return-value]

    def experimenter(self) -> Experimenter:
        """The simulation's view of every hospital's evaluation data (outside the protocol)."""
        return Experimenter(job=self)

    def close(self) -> None:
        self.federation.pool.close()
        for state in self.states.values():
            state.close()


@dataclass(kw_only=True)
class Experimenter:
    """What the person running a *simulation* sees: they hold every hospital's data, so they can
    compute each hospital's exact accuracy themselves. Nothing here crosses the wire or reaches
    the server; metrics.json keeps it under ``simulation_only``. In a deployment there is no
    experimenter: each hospital reads its own local report."""

    job: HeartJob

    def accuracy(self, params: np.ndarray) -> dict[str, dict[str, Any]]:
        model = self.job.model_with(params)
        out: dict[str, dict[str, Any]] = {}
        for name, hospital in self.job.hospitals.items():
            acc, samples = {}, {}
            for split, data in hospital.evaluation.items():
                ev = evaluate(model, data)
                acc[split], samples[split] = ev.accuracy, ev.num_samples
            out[name] = {"status": "done", "accuracy": acc, "samples": samples}
        return out

    def local_reports(self, task: str, round: int) -> dict[str, dict[str, Any]]:  # noqa: A002
        """Each hospital's local report of ``task`` (read from its own folder, in a simulation)."""
        out: dict[str, dict[str, Any]] = {}
        for name, hospital in self.job.hospitals.items():
            report = hospital.reports.read(task, round)
            out[name] = {"status": "done", **report} if report else {"status": "no report"}
        return out

    def epsilon(self, accountant: str | None = None) -> dict[str, float]:
        """Each hospital's spent epsilon, recomputed from its verified ledger (by ``accountant``,
        default the job's own)."""
        priv = self.job.config["privacy"]
        eps: dict[str, float] = {}
        for name, state in self.job.states.items():
            entries, _ = read_verified_ledger(state.ledger.path)
            events = [ev for _, ev, _ in spent_events(entries).get(name, [])]
            eps[name] = compute_epsilon(events, priv["delta"], accountant=accountant or priv["accountant"]) \
                if events else 0.0
        return eps


def build_job(config: JobConfig, out: Path, *, resume: bool = False, workers: int | None = None,
              state_dir: Path | None = None, centres: dict[str, Any] | None = None) -> HeartJob:
    """Train the source model, open every hospital's privacy state (in ``state_dir``, default
    :func:`state_root`), build its node and the server. ``workers`` (default: the config's
    ``job.workers``) > 0 runs the nodes in that many forked worker processes; 0 runs them in this
    process, one after the other. ``centres`` (default :func:`build_centres`: the bundled UCI
    centres) runs the same job on other data, keyed by the config's source and client names."""
    centres = build_centres(config) if centres is None else centres  # a bad centre name: before any folder
    out.mkdir(parents=True, exist_ok=True)
    if not resume and (out / "checkpoint.json").exists():
        raise ConfigError(f"{out} holds a run: use --resume to continue it, or another --out")
    workers = config["job"]["workers"] if workers is None else workers
    # One process plays every hospital: per-run signing keys, and every node pins the roster.
    roster, identities = Roster.generate(config["job"]["clients"])
    # one secure session per training round; no more tasks (each may charge) than the job plans
    planned_tasks = config["job"]["rounds"] + int(config["privacy"]["personalise"])
    policy = NodePolicy(max_sessions=config["job"]["rounds"], max_tasks=planned_tasks)
    root = state_root(state_dir)
    states: dict[str, PrivacyState] = {}
    try:
        for name in config["job"]["clients"]:
            states[name] = open_hospital_state(config, name, centres, root)
        selection: dict[str, Any] | None = None
        if "selection" in config.sections:
            candidates = [build_source(config, spec, centres=centres) for spec in config.source_specs()]
            selection = select_source(config, out, candidates, states, workers=workers, keys=(roster, identities))
            source = candidates[selection["index"]]
        else:
            source = build_source(config, centres=centres)
        hospitals = {name: build_client_node(config, name, source, states[name], identity=identities[name],
                                             roster=roster, policy=policy)
                     for name in config["job"]["clients"]}
    except BaseException:
        for state in states.values():
            state.close()
        raise
    nodes = {n: h.node for n, h in hospitals.items()}
    pool: ClientPool = ProcessPool(nodes, workers=workers) if workers > 0 else LocalPool(nodes)
    federation = build_server(config, source, pool, roster)
    if resume and (out / "checkpoint.json").exists():
        federation.load_state_dict(json.loads((out / "checkpoint.json").read_text(encoding="utf-8")))
    return HeartJob(config=config, out=out, source=source, hospitals=hospitals, states=states,
                    federation=federation, selection=selection)


def build_centres(config: JobConfig) -> dict[str, Any]:
    """The standardised centres (with the public source centre's statistics). Each private
    hospital's rows are split into train and test *record-stably*: a keyed hash of each record
    decides (FLamby's test share, ``1 - TRAIN_FRACTION``), so adding or removing a patient moves
    only that patient (FLamby's own split is a seeded shuffle, where one added row moves about 15
    others between train and test). The public source centre keeps FLamby's split."""
    unknown = sorted({config["job"]["source"], *config["job"]["clients"]} - set(CENTER_NAMES))
    if unknown:
        raise ConfigError(f"[job] not centres of {config['job']['dataset']}: {unknown}; "
                          f"choose among {list(CENTER_NAMES)}")
    centres, _ = standardize(load_fed_heart_disease(), stats_from=config["job"]["source"])
    key = split_key(config["job"]["seed"], "test")
    for name in config["job"]["clients"]:
        c = centres[name]
        x, y = np.concatenate([c.x_train, c.x_test]), np.concatenate([c.y_train, c.y_test])
        x_train, y_train, x_test, y_test = record_split(x, y, 1.0 - TRAIN_FRACTION, key)
        centres[name] = dataclasses.replace(c, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return centres


def _pooled(infos: dict[str, dict[str, Any]], split: str) -> tuple[dict[str, float], float]:
    per = {n: float(i["accuracy"][split]) for n, i in infos.items() if i.get("status") == "done"}
    total = sum(int(infos[n]["samples"][split]) for n in per)
    correct = sum(round(per[n] * int(infos[n]["samples"][split])) for n in per)
    return per, (correct / total if total else float("nan"))


def prepare_run(config: JobConfig, out: Path, *, resume: bool) -> JobConfig:
    """The configuration a run uses: on ``resume`` the one saved in ``out/config.json``; else
    ``config`` with a fresh random job id (unless it names one), saved there."""
    if resume:
        saved = out / "config.json"
        if not saved.exists():
            raise ConfigError(f"nothing to resume in {os.fspath(out)!r} (no config.json there)")
        return JobConfig.from_mapping(json.loads(saved.read_text(encoding="utf-8")))
    data = config.to_dict()
    if not data["job"]["id"]:
        data["job"]["id"] = "run-" + uuid.uuid4().hex
    return JobConfig.from_mapping(data)


def run_job(config: JobConfig, out: Path, *, resume: bool = False, progress: bool = True,
            workers: int | None = None, state_dir: Path | None = None) -> dict[str, Any]:
    """Run (or resume) the job; writes metrics.json and report.png into ``out``; every hospital's
    ledger is in its privacy state (``state_dir``, default :func:`state_root`)."""
    t_start = time.perf_counter()
    config = prepare_run(config, out, resume=resume)
    job = build_job(config, out, resume=resume, workers=workers, state_dir=state_dir)
    try:
        return run_federation(config, job.source, job.federation, out, t_start=t_start, progress=progress,
                              selection=job.selection, experimenter=job.experimenter())
    finally:
        job.close()


def run_federation(config: JobConfig, source: Source, federation: Federation, out: Path, *,
                   t_start: float | None = None, progress: bool = True,
                   selection: dict[str, Any] | None = None,
                   experimenter: Experimenter | None = None) -> dict[str, Any]:
    """The server's part of a job, whatever pool ``federation`` talks through: every round, then
    personalisation at the hospitals; writes config.json, rounds.json, checkpoint.json,
    metrics.json and report.png into ``out``.

    What the server receives is only round outcomes (``server`` in metrics.json). In a simulation
    the ``experimenter`` (who holds every dataset) adds each hospital's exact accuracy and spent
    epsilon, computed outside the protocol (``simulation_only``); without one (Flower, a real
    deployment) each hospital reads its own local report and audits its own ledger."""
    t_start = time.perf_counter() if t_start is None else t_start
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2), encoding="utf-8")
    rounds = config["job"]["rounds"]
    round_rows: list[dict[str, Any]] = [r for r in _saved_rows(out) if r["round"] < federation.rounds_done]
    sim_rows: list[dict[str, Any]] = [r for r in _saved_rows(out, "simulation_rounds.json")
                                      if r["round"] < federation.rounds_done]
    initial = flatten_params(source.head)
    # the personalisation round is a step of the bar: it spends epsilon too
    bar = _progress(rounds + int(config["privacy"]["personalise"]), federation.rounds_done, progress)
    sim: dict[str, Any] = {}
    if experimenter is not None:
        source_acc, source_pooled = _pooled(experimenter.accuracy(initial), "test")
        sim["source"] = {"test_accuracy": source_acc, "pooled_test_accuracy": source_pooled}

    def on_round(report: RoundReport) -> None:
        round_rows.append(report.to_dict())
        (out / "rounds.json").write_text(json.dumps(round_rows, indent=2), encoding="utf-8")
        postfix: dict[str, str] = {"status": report.status}
        if experimenter is not None:
            infos = experimenter.accuracy(federation.global_params)
            per, pooled = _pooled(infos, "test")
            val_per, val_pooled = _pooled(infos, "validation")
            eps = experimenter.epsilon()
            sim_rows.append({"round": report.round, "test_accuracy": per, "pooled_test_accuracy": pooled,
                             "validation_accuracy": val_per, "pooled_validation_accuracy": val_pooled,
                             "epsilon": eps})
            (out / "simulation_rounds.json").write_text(json.dumps(sim_rows, indent=2), encoding="utf-8")
            postfix.update(acc=f"{pooled:.3f}", eps=f"{max(eps.values(), default=0.0):.3f}")
        bar.update(1)
        bar.set_postfix(**postfix)

    federation.run(rounds, checkpoint=out / "checkpoint.json", on_round=on_round)
    personalise: dict[str, Any] = {}
    if config["privacy"]["personalise"]:
        # The hospitals fine-tune locally and keep the model and its evaluation; the server
        # hears only "done", "refused" (budget) or nothing.
        bar.set_description("personalisation")
        answers = federation.query("personalise", round=rounds)
        personalise = {n: answers.get(n, {}).get("status", "silent") for n in config["job"]["clients"]}
        postfix = {"done": f"{sum(v == 'done' for v in personalise.values())}/{len(personalise)}"}
        if experimenter is not None:
            postfix["eps"] = f"{max(experimenter.epsilon().values(), default=0.0):.3f}"
        bar.update(1)
        bar.set_postfix(**postfix)
    bar.close()
    metrics: dict[str, Any] = {
        "job": "uci_heart_disease", "job_id": job_id(config), "delta": config["privacy"]["delta"],
        "epsilon_budget": config["privacy"]["epsilon"], "accountant": config["privacy"]["accountant"],
        "server": {"note": "everything the server received: round outcomes over masked sums, and statuses",
                   "rounds": round_rows, "personalisation": personalise, "selection": selection,
                   "source": {"centre": config["job"]["source"], **source.info}},
        "wall_seconds": 0.0,
    }
    if experimenter is not None:
        final = experimenter.accuracy(federation.global_params)
        federated_acc, federated_pooled = _pooled(final, "test")
        personal: dict[str, float] = {}
        personalised = experimenter.local_reports("personalise", rounds) if personalise else {}
        for name, info in personalised.items():
            if personalise.get(name) == "done" and info.get("status") == "done":
                personal[name] = float(info["accuracy"]["test"])
        personal_pooled = None
        if personal:
            deployed = {n: personalised[n] if n in personal else final[n] for n in final}
            _, personal_pooled = _pooled(deployed, "test")
        eps, eps_prv = experimenter.epsilon(), experimenter.epsilon("prv")
        sim["note"] = ("computed by the experimenter of this simulation, who holds every hospital's data, "
                       "outside the protocol: never sent to the server")
        sim["final"] = {"pooled_test_accuracy": federated_pooled, "per_client_test_accuracy": federated_acc,
                        "personalised_test_accuracy": personal,
                        "personalised_pooled_test_accuracy": personal_pooled,
                        "epsilon": eps, "epsilon_prv": eps_prv}
        sim["rounds"] = sim_rows
        sim["ledgers"] = {n: os.fspath(s.ledger.path) for n, s in experimenter.job.states.items()}
        metrics["simulation_only"] = sim
    metrics["wall_seconds"] = time.perf_counter() - t_start
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    if experimenter is not None:
        _plot(metrics, out / "report.png")
    return metrics


def _saved_rows(out: Path, name: str = "rounds.json") -> list[dict[str, Any]]:
    path = out / name
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else []


def _progress(total: int, initial: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="federated rounds", unit="round", disable=not enabled,
                file=sys.stderr)


def _plot(metrics: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sim = metrics["simulation_only"]
    rows = sim["rounds"]
    xs = [r["round"] + 1 for r in rows]
    # The personalisation round spends epsilon after the last federated round: one more point
    # (the final epsilon, which the summary table prints), at "pers.".
    eps_rows, ticks, labels = rows, xs, [str(x) for x in xs]
    if metrics["server"]["personalisation"]:
        x_pers = (xs[-1] if xs else 0) + 1
        eps_rows = [*rows, {"round": x_pers - 1, "epsilon": sim["final"]["epsilon"]}]
        ticks, labels = [*xs, x_pers], [*labels, "pers."]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name in sim["final"]["per_client_test_accuracy"]:
        ax1.plot(xs, [r["test_accuracy"].get(name, math.nan) for r in rows], marker="o", label=name)
    ax1.plot(xs, [r["pooled_test_accuracy"] for r in rows], color="black", linewidth=2, label="pooled")
    if sim["final"].get("personalised_pooled_test_accuracy") is not None and len(ticks) > len(xs):
        ax1.plot([ticks[-1]], [sim["final"]["personalised_pooled_test_accuracy"]], color="black", marker="*",
                 markersize=12, linestyle="none", label="personalised (pooled)")
    ax1.axhline(sim["source"]["pooled_test_accuracy"], color="grey", linestyle="--", label="source (pooled)")
    ax1.set_xticks(ticks, labels=labels)
    ax1.set_xlabel("round")
    ax1.set_ylabel("test accuracy")
    ax1.set_title("Global model accuracy per round (simulation only)")
    ax1.legend(fontsize=8)
    plot_epsilon_per_round(ax2, eps_rows, clients=sim["final"]["epsilon"], budget=metrics["epsilon_budget"],
                           accountant=metrics["accountant"], delta=metrics["delta"])
    ax2.set_xticks(ticks, labels=labels)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_summary(metrics: dict[str, Any]) -> None:
    sim = metrics.get("simulation_only")
    if sim is None:
        statuses = [r["status"] for r in metrics["server"]["rounds"]]
        print(f"\nrounds: {statuses}; personalisation: {metrics['server']['personalisation']}")
        print("accuracy and epsilon stay at the hospitals: read each hospital's local report and "
              "`secfedtl audit` its ledger")
        return
    final = sim["final"]
    src = sim["source"]["test_accuracy"]
    print("\n(simulation only: computed outside the protocol by whoever holds every dataset)")
    print(f"{'hospital':<14}{'source':>9}{'federated':>11}{'personalised':>14}{'epsilon':>10}")
    for name, acc in final["per_client_test_accuracy"].items():
        pers = final["personalised_test_accuracy"].get(name)
        pers_s = f"{pers:.3f}" if pers is not None else "-"
        print(f"{name:<14}{src[name]:>9.3f}{acc:>11.3f}{pers_s:>14}{final['epsilon'][name]:>10.3f}")
    pooled_pers = final.get("personalised_pooled_test_accuracy")
    pooled_pers_s = f"{pooled_pers:.3f}" if pooled_pers is not None else "-"
    print(f"{'pooled':<14}{sim['source']['pooled_test_accuracy']:>9.3f}{final['pooled_test_accuracy']:>11.3f}"
          f"{pooled_pers_s:>14}")
    sel = metrics["server"].get("selection")
    if sel:
        chosen = sel["candidates"][sel["index"]]
        print(f"source selected with DP (epsilon {sel['epsilon']:g} of the budget; {sel['status']}): "
              f"candidate {sel['index']} {chosen}")
    print(f"delta = {metrics['delta']:g}; epsilon budget {metrics['epsilon_budget']:g} per hospital; "
          f"{metrics['wall_seconds']:.1f} s")


def _check_folder(path: Path, option: str) -> None:
    """Before anything is created: ``path`` is a folder or can become one."""
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{option} {os.fspath(path)!r}: {os.fspath(parent)!r} is a file, not a folder")
            return


def main(args: argparse.Namespace) -> int:
    """`secfedtl run CONFIG` (arguments: :mod:`secfedtl.cli`)."""
    config = JobConfig.load(args.config)
    return _run_cli(config, args)


def _run_cli(config: JobConfig, args: argparse.Namespace) -> int:
    """Run the job as `secfedtl run`/`demo` asked (arguments: :mod:`secfedtl.cli`)."""
    out = args.resume if args.resume is not None else args.out
    _check_folder(out, "--resume" if args.resume is not None else "--out")
    if args.state_dir is not None:
        _check_folder(args.state_dir, "--state-dir")
    metrics = run_job(config, out, resume=args.resume is not None, progress=not args.no_progress,
                      workers=args.workers, state_dir=args.state_dir)
    print_summary(metrics)
    ledgers = metrics.get("simulation_only", {}).get("ledgers", {})
    print(f"wrote {out / 'metrics.json'}, {out / 'report.png'}; ledgers: " + ", ".join(ledgers.values()))
    return 0
