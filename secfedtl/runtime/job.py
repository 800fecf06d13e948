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
from secfedtl.data import load_fed_heart_disease, standardize, validation_split
from secfedtl.errors import ConfigError
from secfedtl.privacy.accountants import compute_epsilon
from secfedtl.privacy.budget import BudgetGuard, PrivacyBudget
from secfedtl.privacy.ledger import Ledger
from secfedtl.privacy.ledger import read_verified_ledger, spent_events
from secfedtl.runtime.federation import Federation, RoundReport
from secfedtl.runtime.node import ClientNode, standard_tasks
from secfedtl.runtime.pool import ClientPool, LocalPool, ProcessPool
from secfedtl.training import DPTrainingConfig, PrivateClient, flatten_delta, unflatten_delta
from secfedtl.transfer.freezing import HeadOnly
from secfedtl.transfer.models import state_hash
from secfedtl.transfer.regularizers import L2SP

_SECTIONS = {
    "job": {"dataset": str, "source": str, "clients": list, "rounds": int, "seed": int,
            "validation_fraction": float, "workers": int},
    "privacy": {"epsilon": float, "delta": float, "accountant": str, "personalise": bool, "secure_mode": bool,
                "insecure_reproducible_noise": bool},
    "model": {"hidden": int, "source_epochs": int, "source_lr": float, "source_weight_decay": float},
    "training": {"lr": float, "expected_batch_size": int, "max_grad_norm": float, "epochs": int,
                 "l2sp": float, "optimizer": str},
    "server": {"optimizer": str, "lr": float},
    "secagg": {"clip": float, "bits": int, "max_samples": int},
}
#: Keys that may be left out, with their defaults (added after version 1 of the schema).
_OPTIONAL: dict[str, dict[str, Any]] = {"job": {"workers": 0},
                                        "privacy": {"secure_mode": True, "insecure_reproducible_noise": False}}


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


class HeartNet(nn.Module):
    """A small MLP: ``backbone`` (Linear + ReLU, frozen after source training) and ``head``."""

    def __init__(self, num_features: int, hidden: int) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(num_features, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, 2)

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
    # nothing on the source and removes that noise elsewhere.
    constant = torch.as_tensor(np.ptp(x, axis=0) == 0)
    with torch.no_grad():
        model.backbone[0].weight[:, constant] = 0.0
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


def build_source(config: JobConfig) -> Source:
    """Load the data and train the source model on the public centre (deterministic for a seed)."""
    job, mcfg = config["job"], config["model"]
    centres, _ = standardize(load_fed_heart_disease(), stats_from=job["source"])
    src = centres[job["source"]]
    model, info = train_source(src.x_train, src.y_train, hidden=mcfg["hidden"], epochs=mcfg["source_epochs"],
                               lr=mcfg["source_lr"], weight_decay=mcfg["source_weight_decay"], seed=job["seed"],
                               validation_fraction=job["validation_fraction"])
    HeadOnly(head="head").apply(model)
    return Source(centres=centres, model=model, info=info)


@dataclass(kw_only=True)
class Hospital:
    """One private client's objects (they stay at that client)."""

    name: str
    node: ClientNode
    client: PrivateClient
    guard: BudgetGuard


def build_client_node(config: JobConfig, name: str, source: Source, ledger: Ledger, budgets_dir: Path) -> Hospital:
    """The node of one private hospital: its own data splits, budget guard (on ``ledger``) and
    DP client, with the ``train``, ``evaluate`` and ``personalise`` tasks."""
    job, priv, tcfg = config["job"], config["privacy"], config["training"]
    if name not in job["clients"]:
        raise ConfigError(f"{name!r} is not one of the job's clients {job['clients']}")
    k = job["clients"].index(name)
    c = source.centres[name]
    x_fit, y_fit, x_val, y_val = validation_split(c.x_train, c.y_train, job["validation_fraction"], job["seed"] + k)
    budget = PrivacyBudget.from_ledger(ledger.entries, name, epsilon=priv["epsilon"], delta=priv["delta"],
                                       accountant=priv["accountant"])
    budgets_dir.mkdir(parents=True, exist_ok=True)
    guard = BudgetGuard(client=name, budget=budget, ledger=ledger, state_path=budgets_dir / f"{name}.json")
    planned = job["rounds"] + (1 if priv["personalise"] else 0)
    dp = DPTrainingConfig(lr=tcfg["lr"], expected_batch_size=min(tcfg["expected_batch_size"], len(y_fit)),
                          max_grad_norm=tcfg["max_grad_norm"], epochs=tcfg["epochs"],
                          optimizer=tcfg["optimizer"], target_epsilon=priv["epsilon"],
                          target_delta=priv["delta"], planned_rounds=planned, device="auto",
                          secure_mode=priv["secure_mode"], seed=job["seed"] * 1000 + k)
    noise = None
    if priv["insecure_reproducible_noise"]:  # tests only: the same noise in every runtime, for a seed
        noise = torch.Generator().manual_seed(job["seed"] * 1000 + k + 1)
    client = PrivateClient(client_id=name, model=source.model, train_data=_dataset(x_fit, y_fit), config=dp,
                           guard=guard, regularizer=L2SP(strength=tcfg["l2sp"], source=source.head),
                           head="head", cache_features=True, noise_generator=noise)
    evaluation = {"test": _dataset(c.x_test, c.y_test), "validation": _dataset(x_val, y_val)}
    node = ClientNode(name=name, tasks=standard_tasks(client, evaluation, frozen_hash=source.frozen_hash),
                      seed=job["seed"] * 1000 + k)
    return Hospital(name=name, node=node, client=client, guard=guard)


def build_server(config: JobConfig, source: Source, pool: ClientPool) -> Federation:
    """The server side: global model (the source head), optimizer and secure-aggregation settings."""
    head = source.head
    return Federation(
        pool=pool, names=list(head), global_params=flatten_delta(head), frozen_hash=source.frozen_hash,
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
    source = build_source(config)
    ledger = Ledger(ledger_path)
    hospitals = {name: build_client_node(config, name, source, ledger, out / "budgets")
                 for name in config["job"]["clients"]}
    nodes = {n: h.node for n, h in hospitals.items()}
    workers = config["job"]["workers"] if workers is None else workers
    pool: ClientPool = ProcessPool(nodes, workers=workers) if workers > 0 else LocalPool(nodes)
    federation = build_server(config, source, pool)
    if resume and (out / "checkpoint.json").exists():
        federation.load_state_dict(json.loads((out / "checkpoint.json").read_text(encoding="utf-8")))
    return HeartJob(config=config, out=out, source=source, hospitals=hospitals, federation=federation)


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
    return run_federation(config, job.source, job.federation, out, t_start=t_start, progress=progress)


def run_federation(config: JobConfig, source: Source, federation: Federation, out: Path, *,
                   t_start: float | None = None, progress: bool = True) -> dict[str, Any]:
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
                  "epsilon": eps_main, "epsilon_prv": eps_prv},
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
    for name in metrics["final"]["epsilon"]:
        ax2.plot(xs, [r["epsilon"].get(name, math.nan) for r in rows], marker="o", label=name)
    ax2.axhline(metrics["epsilon_budget"], color="red", linestyle="--", label="budget")
    ax2.set_xticks(xs)
    ax2.set_xlabel("round")
    ax2.set_ylabel(f"epsilon (RDP, delta={metrics['delta']:g})")
    ax2.set_title("Privacy spent per hospital")
    ax2.legend(fontsize=8)
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
    print(f"{'pooled':<14}{metrics['source']['pooled_test_accuracy']:>9.3f}{final['pooled_test_accuracy']:>11.3f}")
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


