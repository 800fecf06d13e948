"""The server's part of a job, whatever transport its pool uses: every round, then
personalisation at the hospitals; and, in a simulation only, the experimenter who holds every
hospital's data and scores the global model outside the protocol.

A run writes into its output directory:

* ``config.json``: the resolved job configuration, with the job id (what ``--resume`` rebuilds from);
* ``checkpoint.json``: server state after the last completed round;
* ``rounds.json``, ``metrics.json`` and (simulations) ``report.png``: results (``server``: what the
  server received; ``simulation_only``: what the experimenter computed outside the protocol).
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from secfedtl.errors import ConfigError
from secfedtl.federated.config import JobConfig
from secfedtl.federated.federation import Federation, RoundReport
from secfedtl.federated.job import Hospital, SourceModel, job_id
from secfedtl.federated.node import Metric
from secfedtl.privacy.accountants import compute_epsilon
from secfedtl.privacy.ledger import read_verified_ledger, spent_events
from secfedtl.privacy.state import PrivacyState
from secfedtl.reporting.plots import plot_job_report
from secfedtl.training import evaluate, flatten_params

__all__ = ["Experimenter", "prepare_run", "run_federation"]


def prepare_run(config: JobConfig, out: Path, *, resume: bool) -> JobConfig:
    """The configuration a run uses: on ``resume`` the one saved in ``out/config.json``; else
    ``config`` with a fresh random job id (unless it names one), saved there."""
    if resume:
        saved = out / "config.json"
        if not saved.exists():
            raise ConfigError(f"nothing to resume in {os.fspath(out)!r} (no config.json there)")
        return type(config).from_mapping(json.loads(saved.read_text(encoding="utf-8")))
    data = config.to_dict()
    if not data["job"]["id"]:
        data["job"]["id"] = "run-" + uuid.uuid4().hex
    return type(config).from_mapping(data)


@dataclass(kw_only=True)
class Experimenter:
    """What the person running a *simulation* sees: they hold every hospital's data, so they can
    score each hospital's model themselves. Nothing here crosses the wire or reaches the server;
    metrics.json keeps it under ``simulation_only``. In a deployment there is no experimenter:
    each hospital reads its own local report.

    ``features`` (optional): for a source model that caches features, the experimenter's own
    copy of the frozen layers' output on hospitals' evaluation splits (hospital -> split ->
    ``(features, labels)`` dataset, in the split's order); those splits are scored through the
    head only, which gives the same scores as the whole model (the head is applied last)
    without running the frozen layers every round."""

    config: JobConfig
    source: SourceModel
    hospitals: Mapping[str, Hospital]
    states: Mapping[str, PrivacyState]
    metric: Metric = evaluate
    features: Mapping[str, Mapping[str, Dataset]] | None = None

    def __post_init__(self) -> None:
        if self.features and not self.source.cache_features:
            raise ConfigError("Experimenter features are the frozen layers' output: the source model must cache "
                              "features")
        for name, splits in (self.features or {}).items():
            evaluation = self.hospitals[name].evaluation if name in self.hospitals else {}
            for split, data in splits.items():
                if split not in evaluation or len(data) != len(evaluation[split]):  # type: ignore[arg-type]
                    raise ConfigError(f"Experimenter features {name}/{split}: not one of that hospital's "
                                      "evaluation splits, or another length")

    def accuracy(self, params: np.ndarray) -> dict[str, dict[str, Any]]:
        model = self.source.with_params(params)
        head = model.get_submodule(self.source.head)
        features = self.features or {}
        out: dict[str, dict[str, Any]] = {}
        for name, hospital in self.hospitals.items():
            acc, samples = {}, {}
            for split, data in hospital.evaluation.items():
                cached = features.get(name, {}).get(split)
                ev = self.metric(model, data) if cached is None else self.metric(head, cached)
                acc[split], samples[split] = ev.accuracy, ev.num_samples
            out[name] = {"status": "done", "accuracy": acc, "samples": samples}
        return out

    def local_reports(self, task: str, round: int) -> dict[str, dict[str, Any]]:  # noqa: A002
        """Each hospital's local report of ``task`` (read from its own folder, in a simulation)."""
        out: dict[str, dict[str, Any]] = {}
        for name, hospital in self.hospitals.items():
            report = hospital.reports.read(task, round)
            out[name] = {"status": "done", **report} if report else {"status": "no report"}
        return out

    def epsilon(self, accountant: str | None = None) -> dict[str, float]:
        """Each hospital's spent epsilon, recomputed from its verified ledger (by ``accountant``,
        default the job's own)."""
        priv = self.config["privacy"]
        eps: dict[str, float] = {}
        for name, state in self.states.items():
            entries, _ = read_verified_ledger(state.ledger.path)
            events = [ev for _, ev, _ in spent_events(entries).get(name, [])]
            eps[name] = compute_epsilon(events, priv["delta"], accountant=accountant or priv["accountant"]) \
                if events else 0.0
        return eps


def _pooled(infos: dict[str, dict[str, Any]], split: str) -> tuple[dict[str, float], float | None]:
    """Per-hospital accuracy on ``split`` and the pooled one; ``None`` when no hospital scored that
    split (a job whose hospitals hold no test rows): JSON has no NaN."""
    per = {n: float(i["accuracy"][split]) for n, i in infos.items()
           if i.get("status") == "done" and split in i.get("accuracy", {})}
    total = sum(int(infos[n]["samples"][split]) for n in per)
    correct = sum(round(per[n] * int(infos[n]["samples"][split])) for n in per)
    return per, (correct / total if total else None)


def run_federation(config: JobConfig, source: SourceModel, federation: Federation, out: Path, *,
                   t_start: float | None = None, progress: bool = True,
                   selection: dict[str, Any] | None = None,
                   preparation: dict[str, Any] | None = None,
                   experimenter: Experimenter | None = None,
                   round_metrics: Callable[[np.ndarray], Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The server's part of a job, whatever pool ``federation`` talks through: every round, then
    personalisation at the hospitals; writes config.json, rounds.json, checkpoint.json,
    metrics.json and report.png into ``out``.

    What the server receives is only round outcomes (``server`` in metrics.json). In a simulation
    the ``experimenter`` (who holds every dataset) adds each hospital's exact score and spent
    epsilon, computed outside the protocol (``simulation_only``); without one (Flower, a real
    deployment) each hospital reads its own local report and audits its own ledger.
    ``round_metrics`` (simulations only) scores the global weights on the experimenter's own data
    after each round (e.g. a public test set); its columns join the round's simulation row."""
    t_start = time.perf_counter() if t_start is None else t_start
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2), encoding="utf-8")
    rounds = config["job"]["rounds"]
    round_rows: list[dict[str, Any]] = [r for r in _saved_rows(out) if r["round"] < federation.rounds_done]
    sim_rows: list[dict[str, Any]] = [r for r in _saved_rows(out, "simulation_rounds.json")
                                      if r["round"] < federation.rounds_done]
    initial = flatten_params(source.head_state)
    # the personalisation round is a step of the bar: it spends epsilon too
    bar = _progress(rounds + int(config["privacy"]["personalise"]), federation.rounds_done, progress)
    sim: dict[str, Any] = {}
    if experimenter is not None:
        source_acc, source_pooled = _pooled(experimenter.accuracy(initial), "test")
        sim["source"] = {"test_accuracy": source_acc, "pooled_test_accuracy": source_pooled,
                         **(round_metrics(initial) if round_metrics is not None else {})}

    def on_round(report: RoundReport) -> None:
        round_rows.append(report.to_dict())
        (out / "rounds.json").write_text(json.dumps(round_rows, indent=2), encoding="utf-8")
        postfix: dict[str, str] = {"status": report.status}
        if experimenter is not None:
            infos = experimenter.accuracy(federation.released_params)
            per, pooled = _pooled(infos, "test")
            val_per, val_pooled = _pooled(infos, "validation")
            eps = experimenter.epsilon()
            sim_rows.append({"round": report.round, "test_accuracy": per, "pooled_test_accuracy": pooled,
                             "validation_accuracy": val_per, "pooled_validation_accuracy": val_pooled,
                             "epsilon": eps,
                             **(round_metrics(federation.released_params) if round_metrics is not None else {})})
            (out / "simulation_rounds.json").write_text(json.dumps(sim_rows, indent=2), encoding="utf-8")
            postfix.update(acc="-" if pooled is None else f"{pooled:.3f}", eps=f"{max(eps.values(), default=0.0):.3f}")
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
        "job": config["job"]["dataset"], "job_id": job_id(config), "delta": config["privacy"]["delta"],
        "epsilon_budget": config["privacy"]["epsilon"], "accountant": config["privacy"]["accountant"],
        "noise": config.noise(),
        "server": {"note": "everything the server received: round outcomes over masked sums, and statuses",
                   "rounds": round_rows, "personalisation": personalise, "selection": selection,
                   **({"preparation": preparation} if preparation is not None else {}),
                   "source": {"centre": config["job"]["source"], **source.info}},
        "wall_seconds": 0.0,
    }
    if experimenter is not None:
        final = experimenter.accuracy(federation.released_params)
        federated_acc, federated_pooled = _pooled(final, "test")
        personal: dict[str, float] = {}
        personalised = experimenter.local_reports("personalise", rounds) if personalise else {}
        for name, info in personalised.items():
            if personalise.get(name) == "done" and info.get("status") == "done" and "test" in info["accuracy"]:
                personal[name] = float(info["accuracy"]["test"])
        personal_pooled = None
        if personal:
            deployed = {n: personalised[n] if n in personal else final[n] for n in final}
            _, personal_pooled = _pooled(deployed, "test")
        eps = experimenter.epsilon()
        # PRV interprets Gaussian events only: a distributed-noise job's Skellam steps have no PRV figure
        eps_prv = experimenter.epsilon("prv") if config.noise() == "local" else None
        sim["note"] = ("computed by the experimenter of this simulation, who holds every hospital's data, "
                       "outside the protocol: never sent to the server")
        sim["final"] = {"pooled_test_accuracy": federated_pooled, "per_client_test_accuracy": federated_acc,
                        "personalised_test_accuracy": personal,
                        "personalised_pooled_test_accuracy": personal_pooled,
                        "epsilon": eps, "epsilon_prv": eps_prv}
        sim["rounds"] = sim_rows
        sim["ledgers"] = {n: os.fspath(s.ledger.path) for n, s in experimenter.states.items()}
        metrics["simulation_only"] = sim
    metrics["wall_seconds"] = time.perf_counter() - t_start
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    if experimenter is not None:
        plot_job_report(metrics, out / "report.png")
    return metrics


def _saved_rows(out: Path, name: str = "rounds.json") -> list[dict[str, Any]]:
    path = out / name
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else []


def _progress(total: int, initial: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="federated rounds", unit="round", disable=not enabled,
                file=sys.stderr)
