"""The bundled heart-disease job: UCI Heart Disease (FLamby's Fed-Heart-Disease), a source model
trained on the public Cleveland centre, a new head fine-tuned with DP-SGD at the private centres.

This is one instance of :class:`~secfedtl.federated.job.FederatedJob` (:data:`HEART`): the job
file is ``secfedtl/configs/heart.toml`` (schema: docs/config.md, with this job's ``[model]`` keys
in :class:`HeartConfig`), ``source`` trains :class:`HeartNet` on Cleveland (deterministic for the
job seed, so the server and every hospital build the same model and agree on its hash), ``data``
loads one hospital's rows, standardised with the public source centre's statistics, split
record-stably into train/validation/test. The functions below with the old ``(config, ...)``
signatures build the same pieces for this job (tests and the audit run use them).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

import secfedtl.federated.job as _job
from secfedtl.crypto.primitives import SigningKey
from secfedtl.data import load_fed_heart_disease, record_split, split_key, standardize, validation_split
from secfedtl.data.heart import CENTER_NAMES, TRAIN_FRACTION
from secfedtl.errors import ConfigError
from secfedtl.federated.config import JobConfig
from secfedtl.federated.job import (  # noqa: F401 - re-exported: this job's building blocks
    FederatedJob,
    Hospital,
    HospitalData,
    SourceModel,
    build_server,
    declaration,
    default_state_root,
    job_id,
    planned_prior_events,
    selection_mechanism,
    selection_options,
    state_root,
    tensor_dataset,
)
from secfedtl.federated.node import ClientNode
from secfedtl.federated.roster import NodePolicy, Roster
from secfedtl.federated.run import prepare_run, run_federation  # noqa: F401 - re-exported
from secfedtl.privacy.state import PrivacyState, data_fingerprint
from secfedtl.runtime import local

SOURCE_KINDS = ("mlp", "linear")
#: Keys of one source-model candidate in ``[selection] candidates`` (all but ``kind`` optional:
#: they default to the ``[model]`` section's values).
_CANDIDATE_KEYS: dict[str, type] = {"kind": str, "hidden": int, "weight_decay": float}


class HeartConfig(JobConfig):
    """The heart job's file: the shared sections, ``[job] dataset = "uci_heart_disease"`` and
    ``[model]`` ``kind`` (mlp or linear), ``hidden``, ``source_epochs``, ``source_lr``,
    ``source_weight_decay``."""

    MODEL_SCHEMA: ClassVar[dict[str, type] | None] = {"kind": str, "hidden": int, "source_epochs": int,
                                                      "source_lr": float, "source_weight_decay": float}
    MODEL_OPTIONAL: ClassVar[dict[str, Any]] = {"kind": "mlp"}
    DATASETS: ClassVar[tuple[str, ...]] = ("uci_heart_disease",)
    DEFAULT_FILE: ClassVar[tuple[str, str] | None] = ("secfedtl.configs", "heart.toml")

    @classmethod
    def check_model(cls, model: dict[str, Any]) -> None:
        _check_source_spec({"kind": model["kind"], "hidden": model["hidden"],
                            "weight_decay": model["source_weight_decay"]}, "[model]")

    @classmethod
    def candidate_spec(cls, value: Any, model: dict[str, Any], k: int) -> dict[str, Any]:
        return _candidate_spec(value, model, k)

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


@dataclass(frozen=True, kw_only=True)
class HeartSource(SourceModel):
    """The heart job's source model, with the standardised centres it was built from (each
    hospital uses only its own; the experimenter of a simulation holds them all)."""

    centres: dict[str, Any] = dataclasses.field(default_factory=dict)


def _source(config: JobConfig, spec: Mapping[str, Any], centres: dict[str, Any]) -> HeartSource:
    job, mcfg = config["job"], config["model"]
    src = centres[job["source"]]
    model, info = train_source(src.x_train, src.y_train, hidden=spec["hidden"] if spec["kind"] == "mlp" else 0,
                               epochs=mcfg["source_epochs"], lr=mcfg["source_lr"], weight_decay=spec["weight_decay"],
                               seed=job["seed"], validation_fraction=job["validation_fraction"])
    return HeartSource(model=model, head="head", cache_features=True, info={**info, "spec": dict(spec)},
                       centres=centres)


def hospital_data(config: JobConfig, name: str, centres: dict[str, Any]) -> HospitalData:
    """Hospital ``name``'s data: its record-stable fit/validation split of its training rows
    (:func:`~secfedtl.data.record_split`: adding a record moves only that record) and its test
    rows; its privacy state is fingerprinted with every row it holds."""
    job = config["job"]
    if name not in job["clients"]:
        raise ConfigError(f"{name!r} is not one of the job's clients {job['clients']}")
    c = centres[name]
    x_fit, y_fit, x_val, y_val = record_split(c.x_train, c.y_train, job["validation_fraction"],
                                              split_key(job["seed"]))
    return HospitalData(train=tensor_dataset(x_fit, y_fit),
                        evaluation={"test": tensor_dataset(c.x_test, c.y_test),
                                    "validation": tensor_dataset(x_val, y_val)},
                        fingerprint=data_fingerprint([c.x_train, c.y_train, c.x_test, c.y_test]))


def heart_job(centres: dict[str, Any] | None = None) -> FederatedJob:
    """The heart job; ``centres`` (default: the bundled UCI centres, :func:`build_centres`) runs the
    same job on other data keyed by the config's source and client names
    (examples/heart_selection/tune_on_source.py: pseudo-hospitals cut from the source centre)."""

    def source(config: JobConfig, spec: Mapping[str, Any]) -> SourceModel:
        return _source(config, spec, build_centres(config) if centres is None else centres)

    def data(config: JobConfig, name: str) -> HospitalData:
        return hospital_data(config, name, build_centres(config) if centres is None else centres)

    return FederatedJob(name="uci_heart_disease", source=source, data=data, config_type=HeartConfig)


#: The bundled heart job (``secfedtl node --job secfedtl.jobs.heart:HEART``, the default).
HEART = heart_job()


# -- this job's pieces, by their old ``(config, ...)`` signatures ----------------------------------


def build_source(config: JobConfig, spec: dict[str, Any] | None = None, *,
                 centres: dict[str, Any] | None = None) -> HeartSource:
    """Load the data and train the source model on the public centre (deterministic for a seed).
    ``spec`` (one of :meth:`HeartConfig.source_specs`) defaults to the first candidate."""
    source = heart_job(centres).build_source(HEART.check(config), spec)
    assert isinstance(source, HeartSource)
    return source


def open_hospital_state(config: JobConfig, name: str, centres: dict[str, Any], root: Path) -> PrivacyState:
    """Hospital ``name``'s persistent privacy state in ``root/name``, for the budget of the job's
    ``[privacy]`` section, fingerprinted with every row the hospital holds."""
    return _job.open_hospital_state(config, name, hospital_data(config, name, centres), root)


def build_client_node(config: JobConfig, name: str, source: HeartSource, state: PrivacyState, *,
                      identity: SigningKey, roster: Roster, policy: NodePolicy | None = None,
                      job: str | None = None) -> Hospital:
    """Hospital ``name``'s node of the heart job (:func:`secfedtl.federated.job.build_client_node`)."""
    return _job.build_client_node(HEART, config, name, source, hospital_data(config, name, source.centres), state,
                                  identity=identity, roster=roster, policy=policy, job_ref=job)


def build_selection_node(config: JobConfig, name: str, candidates: list[HeartSource], state: PrivacyState, *,
                         identity: SigningKey, roster: Roster, job: str | None = None) -> ClientNode:
    """Hospital ``name``'s node for DP source selection (the ``select`` task on its validation split)."""
    data = hospital_data(config, name, candidates[0].centres)
    return _job.build_selection_node(config, name, candidates, data, state, identity=identity, roster=roster,
                                     job_ref=job)


def build_job(config: JobConfig, out: Path, *, resume: bool = False, workers: int | None = None,
              state_dir: Path | None = None, centres: dict[str, Any] | None = None) -> local.LocalJob:
    """The heart job built in this process (:func:`secfedtl.runtime.local.build_job`)."""
    return local.build_job(heart_job(centres), config, out, resume=resume, workers=workers, state_dir=state_dir)


def run_job(config: JobConfig, out: Path, *, resume: bool = False, progress: bool = True,
            workers: int | None = None, state_dir: Path | None = None) -> dict[str, Any]:
    """Run (or resume) the heart job in this process (:func:`secfedtl.runtime.local.run_job`)."""
    return local.run_job(HEART, config, out, resume=resume, progress=progress, workers=workers, state_dir=state_dir)

