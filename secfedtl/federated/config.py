"""The public hyperparameters of a federated job: the job TOML (schema: docs/config.md).

:class:`JobConfig` checks the sections every federated transfer job shares (``[job]``,
``[privacy]``, ``[declared]``, ``[training]``, ``[server]``, ``[secagg]``, the optional
``[selection]``) and keeps ``[model]``, the job's own model settings, as an open table. A job
with a fixed ``[model]`` schema subclasses it (:class:`secfedtl.jobs.heart.HeartConfig`) and sets
:attr:`JobConfig.MODEL_SCHEMA`. Everything here is public: it travels to every machine of the
federation as the same file, and the job id is a hash of it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import sys
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from secfedtl.encoding.fixed_point import MIN_FIXED_POINT_BITS
from secfedtl.errors import ConfigError

__all__ = ["JobConfig"]

_SECTIONS: dict[str, dict[str, type]] = {
    "job": {"dataset": str, "source": str, "clients": list, "rounds": int, "seed": int,
            "validation_fraction": float, "workers": int, "id": str},
    "privacy": {"epsilon": float, "delta": float, "accountant": str, "personalise": bool, "secure_mode": bool,
                "insecure_reproducible": bool},
    "declared": {"records": dict},
    "model": {},  # the job's own (MODEL_SCHEMA); an open table by default
    "training": {"lr": float, "expected_batch_size": int, "max_grad_norm": float, "epochs": int,
                 "l2sp": float, "optimizer": str},
    "server": {"optimizer": str, "lr": float},
    "secagg": {"clip": float, "bits": int, "max_samples": int},
    "selection": {"candidates": list, "epsilon": float, "loss_clip": float},
}
#: Keys that may be left out, with their defaults (added after version 1 of the schema).
_OPTIONAL: dict[str, dict[str, Any]] = {"job": {"workers": 0, "id": "", "validation_fraction": 0.2},
                                       "privacy": {"secure_mode": True, "insecure_reproducible": False,
                                                   "personalise": False},
                                       "training": {"l2sp": 0.0, "optimizer": "sgd", "epochs": 1},
                                       "server": {"optimizer": "fedavg", "lr": 1.0},
                                       "secagg": {"bits": 32}}
#: Keys that may be left out and then stay out (no default is written into the config).
_MAY_OMIT: dict[str, dict[str, type]] = {"server": {"momentum": float, "ema": float},
                                         "privacy": {"noise": str, "colluders": int, "min_survivors": int},
                                         "secagg": {"prekeyed": bool}}
#: ``[privacy] noise``: ``"local"`` (each hospital adds the full DP noise to its own update; the
#: default) or ``"distributed"`` (each aggregation is one DP-SGD step across hospitals, each adding
#: a share of Skellam noise: :mod:`secfedtl.federated.distributed`).
NOISE_MODES = ("local", "distributed")
#: ``[secagg] bits`` with local noise: a fixed-point field narrower than 16 bits leaves a float
#: update almost no precision (distributed noise's integer sessions take
#: :data:`~secfedtl.encoding.fixed_point.MIN_BITS` and up: docs/privacy.md, "Encoding")
LOCAL_MIN_BITS = MIN_FIXED_POINT_BITS


def _typed(value: Any, kind: type, where: str) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
        raise ConfigError(f"{where} must be {kind.__name__}, got {value!r}")
    return value


def _check_components(sections: dict[str, dict[str, Any]]) -> None:
    """Build what the job builds from each section, with the same validators, before any folder,
    privacy state or data is touched: a bad value is a :class:`ConfigError` here, not after the
    source model trained."""
    from secfedtl.aggregation import make_server_optimizer
    from secfedtl.encoding.fixed_point import MAX_BITS, MIN_BITS, FixedPointEncoding
    from secfedtl.privacy.accountants import ACCOUNTANTS
    from secfedtl.training import DPTrainingConfig

    job, priv, tcfg, scfg = sections["job"], sections["privacy"], sections["training"], sections["secagg"]
    if priv["accountant"] not in ACCOUNTANTS:
        raise ConfigError(f"[privacy] accountant must be one of {sorted(ACCOUNTANTS)}, got {priv['accountant']!r}")
    server = sections["server"]
    with _section("server"):
        make_server_optimizer(server["optimizer"], server_lr=server["lr"],
                              **({"momentum": server["momentum"]} if "momentum" in server else {}))
        ema = server.get("ema", 0.0)
        if not (math.isfinite(ema) and 0.0 <= ema < 1.0):
            raise ConfigError(f"ema must be in [0, 1) (the released model's moving-average decay), got {ema!r}")
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
        bits, low = scfg["bits"], (MIN_BITS if priv.get("noise", "local") == "distributed" else LOCAL_MIN_BITS)
        if isinstance(bits, bool) or not isinstance(bits, int) or not low <= bits <= MAX_BITS:
            raise ConfigError(f"bits must be an integer in [{low}, {MAX_BITS}]"
                              + (" with local noise (distributed noise takes 8 and up)" if low == LOCAL_MIN_BITS else "")
                              + f", got {bits!r}")
        if priv.get("noise", "local") == "distributed":  # integer sessions: no clip, no weight word
            FixedPointEncoding(clip=1.0, bits=bits, num_clients=len(job["clients"]), max_weight=1)
        else:
            FixedPointEncoding(clip=scfg["clip"], bits=bits, num_clients=len(job["clients"]),
                               max_weight=scfg["max_samples"])


@contextlib.contextmanager
def _section(name: str) -> Iterator[None]:
    """Prefix a :class:`ConfigError` raised inside with the config section it is about."""
    try:
        yield
    except ConfigError as exc:
        raise ConfigError(f"[{name}] {exc}") from exc


@dataclass(kw_only=True)
class JobConfig:
    """A validated job configuration (sections and keys of docs/config.md)."""

    #: The ``[model]`` keys and their types; ``None``: an open table (any TOML values).
    MODEL_SCHEMA: ClassVar[dict[str, type] | None] = None
    #: ``[model]`` keys that may be left out, with their defaults.
    MODEL_OPTIONAL: ClassVar[dict[str, Any]] = {}
    #: The ``[job] dataset`` names this job accepts (empty: any).
    DATASETS: ClassVar[tuple[str, ...]] = ()
    #: ``(package, file)`` of the job file :meth:`load` reads when given no path.
    DEFAULT_FILE: ClassVar[tuple[str, str] | None] = None

    sections: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __getitem__(self, key: str) -> dict[str, Any]:
        return self.sections[key]

    # -- hooks of a job with its own [model] schema --------------------------------------------

    @classmethod
    def check_model(cls, model: dict[str, Any]) -> None:
        """Raise :class:`ConfigError` for a ``[model]`` section this job cannot build."""

    @classmethod
    def candidate_spec(cls, value: Any, model: dict[str, Any], k: int) -> dict[str, Any]:
        """One ``[selection] candidates`` entry, validated (default: any table)."""
        if not isinstance(value, dict):
            raise ConfigError(f"[selection] candidates[{k}] must be a table")
        return dict(value)

    def source_specs(self) -> list[dict[str, Any]]:
        """The source-model candidates: ``[selection] candidates``, else the ``[model]`` section."""
        if "selection" in self.sections:
            return copy.deepcopy(self.sections["selection"]["candidates"])
        return [copy.deepcopy(self.sections.get("model", {}))]

    # -- reading and writing -------------------------------------------------------------------

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> JobConfig:
        unknown = set(data) - set(_SECTIONS)
        if unknown:
            raise ConfigError(f"unknown config sections {sorted(unknown)}")
        sections: dict[str, dict[str, Any]] = {}
        for name, schema in _SECTIONS.items():
            if name == "selection" and name not in data:
                continue
            raw = data.get(name, {})
            if not isinstance(raw, Mapping):
                raise ConfigError(f"[{name}] must be a table")
            if name == "model":
                sections[name] = cls._model_section(raw)
                continue
            given = {**_OPTIONAL.get(name, {}), **dict(raw)}
            schema = {**schema, **{k: t for k, t in _MAY_OMIT.get(name, {}).items() if k in given}}
            extra = set(given) - set(schema)
            missing = set(schema) - set(given)
            if extra or missing:
                raise ConfigError(f"[{name}]: unknown keys {sorted(extra)}, missing keys {sorted(missing)}")
            sections[name] = {key: _typed(given[key], kind, f"[{name}] {key}") for key, kind in schema.items()}
        cls._check(sections)
        return cls(sections=sections)

    @classmethod
    def _model_section(cls, raw: Mapping[str, Any]) -> dict[str, Any]:
        if cls.MODEL_SCHEMA is None:
            return copy.deepcopy(dict(raw))
        given = {**cls.MODEL_OPTIONAL, **dict(raw)}
        extra, missing = set(given) - set(cls.MODEL_SCHEMA), set(cls.MODEL_SCHEMA) - set(given)
        if extra or missing:
            raise ConfigError(f"[model]: unknown keys {sorted(extra)}, missing keys {sorted(missing)}")
        return {key: _typed(given[key], kind, f"[model] {key}") for key, kind in cls.MODEL_SCHEMA.items()}

    @classmethod
    def _check(cls, sections: dict[str, dict[str, Any]]) -> None:
        job = sections["job"]
        if cls.DATASETS and job["dataset"] not in cls.DATASETS:
            raise ConfigError(f"this job's dataset must be one of {list(cls.DATASETS)}, got {job['dataset']!r}")
        if job["rounds"] < 1:
            raise ConfigError("rounds must be >= 1")
        if job["workers"] < 0:
            raise ConfigError("workers must be >= 0 (0: clients run in this process, one after the other)")
        if not 0 < job["validation_fraction"] < 0.5:
            raise ConfigError("validation_fraction must be in (0, 0.5)")
        clients = job["clients"]
        if (len(clients) < 3 or job["source"] in clients or len(set(clients)) != len(clients)
                or not all(isinstance(c, str) and c for c in clients)):
            raise ConfigError("at least 3 private clients (distinct names), and the source is not one of them")
        if not sections["privacy"]["epsilon"] > 0 or not 0 < sections["privacy"]["delta"] < 1:
            raise ConfigError("[privacy] epsilon must be > 0 and delta in (0, 1), got epsilon "
                              f"{sections['privacy']['epsilon']!r}, delta {sections['privacy']['delta']!r}")
        model = sections["model"]
        cls.check_model(model)
        if "selection" in sections:
            sel = sections["selection"]
            if not sel["candidates"]:
                raise ConfigError("[selection] candidates must list at least one source model")
            sel["candidates"] = [cls.candidate_spec(c, model, k) for k, c in enumerate(sel["candidates"])]
            if not 0 < sel["epsilon"] < sections["privacy"]["epsilon"]:
                raise ConfigError("[selection] epsilon must be > 0 and below the [privacy] epsilon it is part of")
            if not (math.isfinite(sel["loss_clip"]) and sel["loss_clip"] > 0):
                raise ConfigError("[selection] loss_clip must be a finite number > 0")
        cls._check_noise(sections)
        records = sections["declared"]["records"]
        if set(records) != set(clients):
            raise ConfigError("[declared] records must give every client's declared public record count, "
                              f"for exactly {sorted(clients)}")
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
                          stacklevel=3)

    @classmethod
    def _check_noise(cls, sections: dict[str, dict[str, Any]]) -> None:
        """``[privacy] noise`` and, in distributed mode, its policy keys and what it cannot combine with."""
        priv, clients = sections["privacy"], sections["job"]["clients"]
        mode = priv.get("noise", "local")
        if mode not in NOISE_MODES:
            raise ConfigError(f"[privacy] noise must be one of {list(NOISE_MODES)}, got {mode!r}")
        if mode == "local":
            extra = sorted(k for k in ("colluders", "min_survivors") if k in priv)
            if extra:
                raise ConfigError(f"[privacy] {', '.join(extra)} only apply to noise = \"distributed\"")
            if "prekeyed" in sections["secagg"]:
                raise ConfigError("[secagg] prekeyed only applies to noise = \"distributed\" (its steps' sessions)")
            return
        colluders = priv.get("colluders", 0)
        survivors = priv.get("min_survivors", len(clients))
        if not 3 <= survivors <= len(clients):
            raise ConfigError(f"[privacy] min_survivors must be between 3 and the {len(clients)} clients, got {survivors}")
        if not 0 <= colluders < survivors:
            raise ConfigError(f"[privacy] colluders must be >= 0 and below min_survivors ({survivors}), got {colluders}")
        why = {"accountant": (priv["accountant"] == "rdp", "the Skellam accountant is RDP: set accountant = \"rdp\""),
               "personalise": (not priv["personalise"], "personalise is a local-noise round: set personalise = false"),
               "selection": ("selection" not in sections, "[selection] is not supported with distributed noise yet"),
               "optimizer": (sections["training"]["optimizer"] == "sgd",
                             "[training] optimizer must be \"sgd\": the server takes each step")}
        for ok, message in why.values():
            if not ok:
                raise ConfigError(f"noise = \"distributed\": {message}")

    def noise(self) -> str:
        """``[privacy] noise`` (``"local"`` when the job file leaves it out)."""
        return str(self.sections["privacy"].get("noise", "local"))

    def prekeyed(self) -> bool:
        """``[secagg] prekeyed`` (``True`` when the job file leaves it out; distributed noise only)."""
        return bool(self.sections["secagg"].get("prekeyed", True))

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None) -> JobConfig:
        """Read and check a job file (``None``: this job's bundled default, if it has one)."""
        if path is None:
            if cls.DEFAULT_FILE is None:
                raise ConfigError("no job file given, and this job has no bundled default")
            return cls.load_bundled(cls.DEFAULT_FILE[1])
        else:
            try:
                text = Path(path).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"cannot read job file {os.fspath(path)!r}: "
                                  f"{exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}") from exc
        return cls._from_toml(text)

    @classmethod
    def load_bundled(cls, name: str) -> JobConfig:
        """Read and check the job file ``name`` shipped beside this job's bundled default (e.g. the
        heart job's ``heart_distributed.toml``)."""
        if cls.DEFAULT_FILE is None:
            raise ConfigError("this job has no bundled job files")
        try:
            text = resources.files(cls.DEFAULT_FILE[0]).joinpath(name).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"no bundled job file {name!r}: {exc}") from exc
        return cls._from_toml(text)

    @classmethod
    def _from_toml(cls, text: str) -> JobConfig:
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
        return type(self).from_mapping(data)

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
