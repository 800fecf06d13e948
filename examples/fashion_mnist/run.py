"""Federated transfer learning with DP-SGD and secure aggregation: an MNIST CNN transferred to
Fashion-MNIST, 10 clients with Dirichlet(0.5) label skew, epsilon = 3 per client.

Set up with ``examples/fashion_mnist/setup.sh``, then from the repository root:

    .venv/bin/python examples/fashion_mnist/run.py --out runs/fashion_mnist
    .venv/bin/python examples/fashion_mnist/run.py --out runs/fashion_mnist_flower --flower simulate

The job is :data:`fashion_job.FASHION` (or :data:`fashion_job.FASHION_CENTRED` with DP centring), a :class:`~secfedtl.federated.job.FederatedJob` (the same
description the heart job uses): in process by default; ``--flower local|simulate`` runs the same
job on a local Flower deployment (SuperLink, a node agent per client running
``secfedtl node --job fashion_job:FASHION``, the secfedtl ServerApp).

Each client caches the frozen source layers' output once and trains a new linear head with
DP-SGD. Every mechanism parameter is public: each client declares a public record count (its fit
size rounded to ``--declared-grid``, fixed before training and written into every ledger entry),
and the sample rate, steps and noise follow from it. Poisson batches and noise come from
``os.urandom``. Each client's budget is a persistent privacy state (ledger + budget, charged
before every round); this example keeps the states in a THROWAWAY folder, ``<out>/privacy-state``
(``--state-dir`` to choose), as ``secfedtl demo`` does. The server sees only the securely
aggregated sum of the clients' updates (FedAvg with server momentum 0.5) and the round outcomes.

The accuracy in ``metrics.json`` is computed by the experimenter of this simulation (who holds
every client's data and the test split) outside the protocol, and is labelled ``simulation_only``;
nothing the clients compute on their data is sent to the server. Writes ``metrics.json`` and
``report.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # source_model.py and fashion_job.py beside this file

from fashion_job import FashionConfig, Images, client_names, job_for, load_data, splits  # noqa: E402

from secfedtl.federated.federation import released_params_of  # noqa: E402
from secfedtl.data.fashion_mnist import CLASS_NAMES, DEBIAN_DIR, ZALANDO_URL  # noqa: E402
from secfedtl.errors import ConfigError, SecFedTLError  # noqa: E402
from secfedtl.privacy.accountants import compute_epsilon  # noqa: E402
from secfedtl.privacy.audit import audit_ledger  # noqa: E402
from secfedtl.privacy.ledger import read_verified_ledger, spent_events  # noqa: E402
from secfedtl.reporting.plots import plot_epsilon_per_round  # noqa: E402
from secfedtl.training import evaluate  # noqa: E402
from secfedtl.transfer import cache_features, split_head  # noqa: E402

DELTA = 1e-5
ACCOUNTANT = "rdp"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rounds", type=int, default=40, help="federated rounds (the budget is spread over them)")
    p.add_argument("--epsilon", type=float, default=3.0, help=f"each client's budget (delta = {DELTA:g})")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label-skew concentration")
    p.add_argument("--validation-fraction", type=float, default=0.1,
                   help="each client's share of rows held out for validation, record by record ([job] "
                        "validation_fraction); the rest are trained on")
    p.add_argument("--seed", type=int, default=0,
                   help="partition and validation-split seed (public); Poisson batches and DP noise come from os.urandom")
    p.add_argument("--out", type=Path, default=Path("runs/fashion_mnist"))
    p.add_argument("--state-dir", type=Path, default=None,
                   help="where the clients' privacy states (ledger + budget) live; default: a throwaway "
                        "<out>/privacy-state. A second run on the same states continues their budgets")
    p.add_argument("--declared-grid", type=int, default=500,
                   help="each client declares its fit size rounded to a multiple of this as its public record count "
                        "(sample rate = batch size / declared count; also its FedAvg weight)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--noise", choices=("local", "distributed"), default="local",
                   help="local: each client adds the full DP noise to its update; distributed: every aggregation is "
                        "one DP-SGD step across clients, each adding a Skellam share (--batch-size is then the "
                        "expected batch across all clients and --lr the server's step size)")
    p.add_argument("--colluders", type=int, default=0,
                   help="with --noise distributed: clients assumed to collude with the server (their noise is not counted)")
    p.add_argument("--bits", type=int, default=32, help="secure-aggregation field width (distributed noise: of the integer sum)")
    p.add_argument("--backbone", choices=("mnist_cnn", "scatternet"), default="mnist_cnn",
                   help="frozen features below the head: the MNIST CNN's conv blocks (transfer), or ScatterNet "
                        "(Tramer and Boneh's handcrafted wavelet features, 81x7x7 = 3969; needs kymatio)")
    p.add_argument("--centre-epsilon", type=float, default=0.0,
                   help="with --backbone scatternet: the part of --epsilon spent on DP centring of the features before "
                        "training (the job's preparation; 0: none). Not with --flower in this example")
    p.add_argument("--num-conv", type=int, default=2, choices=(1, 2, 3),
                   help="frozen source conv blocks below the head (2: 64x7x7 = 3136 features)")
    p.add_argument("--epochs", type=int, default=1, help="local epochs per round (of the declared count)")
    p.add_argument("--batch-size", type=int, default=1024, help="expected (Poisson) batch size")
    p.add_argument("--lr", type=float, default=10.0, help="local DP-SGD learning rate")
    p.add_argument("--feature-scale", type=float, default=3.0,
                   help="norm of every feature vector (a fixed per-example map); sets how the clip norm "
                        "is shared between the head's weights and bias")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--server", default="fedavgm", help="server optimizer (fedavg, fedavgm, fedadam, ...)")
    p.add_argument("--server-lr", type=float, default=1.0)
    p.add_argument("--server-momentum", type=float, default=0.5, help="momentum of fedavgm (ignored by others)")
    p.add_argument("--ema", type=float, default=0.0,
                   help="[server] ema: release a moving average of the server's iterates with this decay "
                        "(post-processing, no budget; 0: the last iterate)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="folder with the four Fashion-MNIST IDX files, gzipped or not (default: Debian's "
                        f"dataset-fashion-mnist in {DEBIAN_DIR}; without apt, download them from "
                        f"{ZALANDO_URL}, MIT licence)")
    p.add_argument("--skip-checksums", action="store_true",
                   help="accept IDX files other than the published release (e.g. your own data in that format)")
    p.add_argument("--weights", type=Path, default=None, help="source weights (default: digit-recognizer-py's)")
    p.add_argument("--no-reference", action="store_true", help="skip the non-private reference head")
    p.add_argument("--flower", choices=("local", "simulate"), default=None,
                   help="run on a local Flower deployment (local: SuperLink + one SuperNode per client; simulate: "
                        "Flower's simulation engine) instead of in this process")
    p.add_argument("--phase-timeout", type=float, default=300.0, help="with --flower: seconds a phase waits")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad settings before any folder is created or any progress bar starts."""
    if not (math.isfinite(args.epsilon) and args.epsilon > 0):
        raise ConfigError(f"--epsilon must be a number > 0, got {args.epsilon:g}")
    if args.rounds < 1 or args.clients < 3 or args.epochs < 1 or args.batch_size < 1:
        raise ConfigError("--rounds, --epochs and --batch-size must be >= 1, and --clients >= 3")
    if not (math.isfinite(args.centre_epsilon) and 0 <= args.centre_epsilon < args.epsilon):
        raise ConfigError(f"--centre-epsilon ({args.centre_epsilon:g}) is part of the budget: it must be >= 0 and "
                          f"below --epsilon ({args.epsilon:g})")
    if args.centre_epsilon > 0 and args.backbone != "scatternet":
        raise ConfigError("--centre-epsilon: only --backbone scatternet has a centring layer")
    if args.centre_epsilon > 0 and args.flower is not None:
        raise ConfigError("--centre-epsilon with --flower: not supported by this example (the experimenter would "
                          "have to rebuild the centred model from the server's preparation record)")
    if args.declared_grid < 1:
        raise ConfigError("--declared-grid must be >= 1")
    if not (math.isfinite(args.alpha) and args.alpha > 0):
        raise ConfigError(f"--alpha must be a number > 0, got {args.alpha:g}")
    if args.data_dir is not None and not args.data_dir.is_dir():
        raise ConfigError(f"--data-dir {args.data_dir}: no such folder")
    if args.weights is not None and not args.weights.is_file():
        raise ConfigError(f"--weights {args.weights}: no such file")


def declared_records(fit_size: int, grid: int) -> int:
    """The public record count a client declares: its fit size rounded to the nearest multiple of
    ``grid`` (at least one ``grid``). In this simulation the experimenter plays every client's
    operator and declares it once, before training; a real operator would declare a round figure
    it is willing to make public. It need not match the data: it fixes the mechanism."""
    return max(grid, grid * round(fit_size / grid))


def job_config(args: argparse.Namespace, declared: dict[str, int], job_id: str) -> FashionConfig:
    """The job file of this run: every setting public (the declared counts included)."""
    server: dict[str, Any] = {"optimizer": args.server, "lr": args.server_lr}
    if args.server == "fedavgm" and args.server_momentum is not None:
        server["momentum"] = args.server_momentum
    if args.ema:
        server["ema"] = args.ema
    return FashionConfig.from_mapping({
        "job": {"dataset": "fashion_mnist", "source": "mnist" if args.backbone == "mnist_cnn" else "scatternet", "clients": list(declared), "rounds": args.rounds,
                "seed": args.seed, "id": job_id, "validation_fraction": args.validation_fraction},
        "privacy": {"epsilon": args.epsilon, "delta": DELTA, "accountant": ACCOUNTANT,
                    **({"noise": "distributed", "colluders": args.colluders} if args.noise == "distributed" else {})},
        "declared": {"records": declared},
        "model": {"backbone": args.backbone, "centre_epsilon": args.centre_epsilon, "num_conv": args.num_conv,
                  "feature_scale": args.feature_scale, "alpha": args.alpha},
        "training": {"lr": args.lr, "expected_batch_size": args.batch_size, "max_grad_norm": args.max_grad_norm,
                     "epochs": args.epochs},
        "server": server,
        # each coordinate of a head update stays far below 10; the weights are the declared counts
        "secagg": {"clip": 10.0, "max_samples": max(declared.values()), "bits": args.bits},
    })


def head_accuracy(head: nn.Module, data: TensorDataset) -> float:
    return evaluate(head, data, batch_size=4096).accuracy


def row_slices(data: TensorDataset, sizes: list[int]) -> list[TensorDataset]:
    """Consecutive row slices of ``data`` (views, no copy), of the given sizes."""
    bounds = np.cumsum([0, *sizes]).tolist()
    return [TensorDataset(*(t[a:b] for t in data.tensors)) for a, b in zip(bounds[:-1], bounds[1:])]


def with_feature_buffers(job: Any, buffers: dict[str, torch.Tensor]) -> Any:
    """``job`` whose hospitals cache their training features into ``buffers[name]`` (the
    experimenter, who plays every hospital in this process, gives each a row slice of one
    buffer, so the reference head reads the pooled features without computing or copying them)."""
    def data(config: Any, name: str) -> Any:
        return dataclasses.replace(job.data(config, name), feature_buffer=buffers[name])

    return dataclasses.replace(job, data=data)


def reference_head(fit: TensorDataset, val: TensorDataset, *, seed: int, max_epochs: int = 15,
                   progress: bool = True) -> dict[str, Any]:
    """Non-private, centralised linear head on the same features (all clients' fit rows pooled),
    the epoch count picked on the pooled validation rows (simulation only: no client would hand
    its rows over)."""
    torch.manual_seed(seed)
    x, y = fit.tensors
    head = nn.Linear(x.shape[1], 10)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    best = (-1.0, 0, copy.deepcopy(head.state_dict()))
    bar = _progress(max_epochs, "non-private reference head", progress, unit="epoch")
    for epoch in range(max_epochs):
        for idx in torch.randperm(len(y)).split(256):
            opt.zero_grad()
            nn.functional.cross_entropy(head(x[idx]), y[idx]).backward()
            opt.step()
        acc = head_accuracy(head, val)
        if acc > best[0]:
            best = (acc, epoch + 1, copy.deepcopy(head.state_dict()))
        bar.update(1)
        bar.set_postfix(val=f"{acc:.3f}")
    bar.close()
    head.load_state_dict(best[2])
    return {"head": head, "validation_accuracy": best[0], "epochs": best[1]}


def _node_settings(args: argparse.Namespace) -> None:
    """Each node's own settings (this process plays every client's operator): where its data and
    the source weights are. Read by fashion_job.py, in this process and in the node agents."""
    for key, value in (("FASHION_MNIST_DIR", args.data_dir), ("FASHION_MNIST_WEIGHTS", args.weights)):
        if value is not None:
            os.environ[key] = str(Path(value).resolve())
    if args.skip_checksums:
        os.environ["FASHION_MNIST_SKIP_CHECKSUMS"] = "1"
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))


def run(args: argparse.Namespace, *, on_clients: Any = None) -> dict[str, Any]:
    """The example; ``on_clients(clients, states, job_id)``, if given, is called once every client
    is set up and before the first round (``audit.py`` installs its canaries there; in process
    only)."""
    t_start = time.perf_counter()
    check_args(args)
    _node_settings(args)
    timings: dict[str, float] = {}
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    data = load_data()  # a clear error (no data, bad files) before anything is created
    names = client_names(args.clients)
    shares = splits(job_config(args, dict.fromkeys(names, 1), "probe"))
    # The operators' public declarations, fixed before any training (the experimenter plays them).
    declared = {n: declared_records(len(s.y_fit), args.declared_grid) for n, s in zip(names, shares)}
    job_id = "fashion_mnist-" + uuid.uuid4().hex  # public; every ledger entry of this run carries it
    config = job_config(args, declared, job_id)
    job, job_code = job_for(config)
    source = job.build_source(config)  # the source weights load (or fail) before anything is created
    timings["load"] = time.perf_counter() - t0

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.state_dir is None and args.flower is None:
        print(f"fashion_mnist: throwaway privacy states in {out / 'privacy-state'} "
              "(real clients keep theirs across jobs)", file=sys.stderr)
    test_images, test_labels = data.x_test, data.y_test
    del data  # the clients' shares are their own arrays: the whole training split need not stay
    ev: dict[str, Any] = {}

    def evaluation_features(prepared: Any) -> dict[str, dict[str, TensorDataset]]:
        """The experimenter's evaluation data (outside the protocol): the public test split and the
        clients' validation rows pooled (each client's rows a slice of it), as features of the
        frozen layers of the job's source once prepared (with DP centring they include the
        released centre): each round scores only the head. Returns each client's rows."""
        t = time.perf_counter()
        backbone, _ = split_head(prepared.model, "head")
        backbone.eval()

        def features(x: np.ndarray, y: np.ndarray) -> TensorDataset:
            return cache_features(backbone, Images(x, y), batch_size=prepared.feature_batch_size)

        ev["features"] = features
        ev["test"] = features(test_images, test_labels)
        ev["val"] = features(np.concatenate([s.x_val for s in shares]), np.concatenate([s.y_val for s in shares]))
        client_val = dict(zip(names, row_slices(ev["val"], [len(s.y_val) for s in shares])))
        timings["eval_features"] = time.perf_counter() - t
        return {n: {"validation": v} for n, v in client_val.items()}

    def head_with(params: np.ndarray) -> nn.Module:
        model = source.with_params(params)
        return model.head

    def round_metrics(params: np.ndarray) -> dict[str, float]:
        h = head_with(params)
        return {"public_test_accuracy": head_accuracy(h, ev["test"]),
                "pooled_validation_accuracy": head_accuracy(h, ev["val"])}

    t0 = time.perf_counter()
    if args.flower is None:
        # One buffer for every client's cached training features, each client's a row slice
        # (allocated, not yet written: the clients fill it); the reference head reads it whole.
        fit_x = torch.empty((sum(len(s.y_fit) for s in shares), source.model.head.in_features), dtype=torch.float32)
        fit_rows = [t.tensors[0] for t in row_slices(TensorDataset(fit_x), [len(s.y_fit) for s in shares])]
        buffered = with_feature_buffers(job, dict(zip(names, fit_rows)))
        metrics, ledgers, mechanism, params = _in_process(args, buffered, config, out, round_metrics, on_clients,
                                                          experimenter_features=evaluation_features)
        fit = TensorDataset(fit_x, torch.as_tensor(np.concatenate([s.y_fit for s in shares]), dtype=torch.long))
    else:
        if on_clients is not None:
            raise ConfigError("on Flower the clients live in their node agents: no in-process hook")
        evaluation_features(source)
        metrics, ledgers, mechanism, params = _on_flower(args, config, out, round_metrics, job_code)
        fit = None  # the clients' features are in their node agents
    timings["federated_training"] = time.perf_counter() - t0
    head, test, val, features = head_with(params), ev["test"], ev["val"], ev["features"]
    spent = {n: [ev for _, ev, _ in spent_events(read_verified_ledger(p)[0]).get(n, [])] for n, p in ledgers.items()}
    audits = {n: audit_ledger(p) for n, p in ledgers.items()}
    sim = metrics.setdefault("simulation_only", {"rounds": []})
    sim.update({
        "note": "computed by the experimenter of this simulation, who holds every client's data and the test "
                "split, outside the protocol: never sent to the server",
        "client_sizes": {n: len(s.y_fit) for n, s in zip(names, shares)},
        "client_validation_sizes": {n: len(s.y_val) for n, s in zip(names, shares)},
        "client_label_counts": {n: np.bincount(s.y_fit, minlength=10).tolist() for n, s in zip(names, shares)},
        "ledgers": {n: os.fspath(p) for n, p in ledgers.items()},
        "audit": {n: {"certified": a.certified, "epsilon": a.clients[0].epsilon if a.clients else 0.0,
                      "lines": a.lines, "head_hash": a.head_hash} for n, a in audits.items()},
    })
    sim["final"] = {**sim.get("final", {}), "test_accuracy": head_accuracy(head, test),
                    "validation_accuracy": head_accuracy(head, val),
                    "per_class_test_accuracy": dict(zip(CLASS_NAMES, _per_class_accuracy(head, test))),
                    "epsilon": {n: compute_epsilon(ev, DELTA, accountant="rdp") for n, ev in spent.items()},
                    # PRV interprets Gaussian events only: none for distributed noise's Skellam steps
                    "epsilon_prv": {n: compute_epsilon(ev, DELTA, accountant="prv") for n, ev in spent.items()}
                    if args.noise == "local" else None}
    metrics.update({
        "example": "fashion_mnist", "transport": args.flower or "in process",
        "command": " ".join(["python", "examples/fashion_mnist/run.py", *sys.argv[1:]]),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "job_id": job_id, "delta": DELTA, "accountant": ACCOUNTANT,
        "num_features": int(val.tensors[0].shape[1]), "declared_records": declared, "mechanism": mechanism,
    })
    if not args.no_reference:
        t0 = time.perf_counter()
        if fit is None:
            fit = features(np.concatenate([s.x_fit for s in shares]), np.concatenate([s.y_fit for s in shares]))
        ref = reference_head(fit, val, seed=args.seed, progress=not args.no_progress)
        sim["non_private_reference"] = {"validation_accuracy": ref["validation_accuracy"], "epochs": ref["epochs"],
                                        "test_accuracy": head_accuracy(ref["head"], test)}
        timings["reference"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    metrics["wall_seconds"] = timings
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    _plot(metrics, out / "report.png")
    return metrics


def _in_process(args: argparse.Namespace, job: Any, config: FashionConfig, out: Path, round_metrics: Any,
                on_clients: Any = None, *, experimenter_features: Any) -> tuple[Any, ...]:
    """Every client's node and the server in this process: the job's preparation (DP centring,
    if any) runs as the job is built; ``experimenter_features(prepared_source)`` then gives the
    experimenter's per-client evaluation features; then the rounds."""
    from secfedtl.federated.run import run_federation
    from secfedtl.runtime.local import build_job

    state_dir: Path = args.state_dir if args.state_dir is not None else out / "privacy-state"
    run_dir = out / "runs" / config["job"]["id"]
    local = build_job(job, config, run_dir, workers=0, state_dir=state_dir)
    try:
        local.warn_earlier_spend(epsilon=args.epsilon, delta=DELTA, accountant=ACCOUNTANT)
        if on_clients is not None:
            on_clients(local.clients, local.states, config["job"]["id"])
        evaluation = experimenter_features(local.source)
        metrics = run_federation(config, local.source, local.federation, run_dir, progress=not args.no_progress,
                                 preparation=local.preparation, experimenter=local.experimenter(evaluation),
                                 round_metrics=round_metrics)
        clients = local.clients
        mechanism = {"note": "public: functions of the settings and the declared counts only",
                     "sample_rate": {n: c.sample_rate for n, c in clients.items()},
                     "noise_multiplier": {n: c.noise_multiplier for n, c in clients.items()},
                     "local_steps": {n: c.local_steps for n, c in clients.items()}}
        plan = local.federation.distributed
        if plan is not None:  # distributed noise: one plan for every client (its ledger's poisson_skellam)
            mechanism = {"note": "public: functions of the job file only", "event_per_step": plan.event.to_dict(),
                         "steps_per_round": plan.settings.steps_per_round, "normaliser": plan.settings.normaliser,
                         "noise_multiplier": plan.encoding_plan.noise_multiplier,
                         "wrap_probability": plan.encoding_plan.wrap_probability}
        metrics["device"] = next(iter(clients.values())).config.resolve_device()
        metrics["privacy_state"] = {"directory": os.fspath(state_dir),
                                    "note": "a throwaway folder for this example unless --state-dir was given; a "
                                            "real client keeps its state across jobs, and a second job on it "
                                            "continues its budget"}
        return metrics, {n: s.ledger.path for n, s in local.states.items()}, mechanism, local.federation.released_params
    finally:
        local.close()


def _on_flower(args: argparse.Namespace, config: FashionConfig, out: Path, round_metrics: Any,
               job_code: str) -> tuple[Any, ...]:
    from secfedtl.runtime.deploy import run_local

    job_file = out / "job.toml"
    job_file.write_text(config.to_toml(), encoding="utf-8")
    metrics = run_local(job_file, out / "flower", simulation=args.flower == "simulate",
                        phase_timeout=args.phase_timeout, job_code=job_code)
    checkpoint = json.loads((out / "flower" / "server" / "checkpoint.json").read_text(encoding="utf-8"))
    params = released_params_of(checkpoint)
    ledgers = {n: out / "flower" / "hospitals" / n / "privacy" / n / "ledger.jsonl" for n in config["job"]["clients"]}
    metrics["simulation_only"] = {"rounds": []}  # the server kept no global model per round
    metrics["privacy_state"] = {"directory": os.fspath(out / "flower" / "hospitals"),
                                "note": "each node agent's own state folder (<client>/privacy/<client>)"}
    return metrics, ledgers, {"note": "at the hospitals: see each ledger's entries"}, params


@torch.no_grad()
def _per_class_accuracy(head: nn.Module, data: TensorDataset) -> list[float]:
    x, y = data.tensors
    pred = head(x.to(next(head.parameters()).device)).argmax(dim=1).cpu()
    return [float((pred[y == c] == c).float().mean()) for c in range(len(CLASS_NAMES))]


def _plot(metrics: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sim = metrics["simulation_only"]
    rows = sim["rounds"]
    xs = [r["round"] + 1 for r in rows]
    ticks = xs if len(xs) <= 15 else [x for x in xs if x == 1 or x % 5 == 0]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.2))
    if rows:
        ax1.plot(xs, [r["public_test_accuracy"] for r in rows], marker="o", label="federated, DP (test)")
        ax1.plot(xs, [r["pooled_validation_accuracy"] for r in rows], marker=".", linestyle=":",
                 label="federated, DP (validation)")
    else:  # on Flower the server keeps no global model per round: the final one only
        ax1.axhline(sim["final"]["test_accuracy"], color="C0", label="federated, DP (test, final)")
    if "non_private_reference" in sim:
        ax1.axhline(sim["non_private_reference"]["test_accuracy"], color="grey", linestyle="--",
                    label="non-private central head (test)")
    ax1.axhline(0.85, color="red", linewidth=0.8, linestyle=":", label="target 0.85")
    ax1.set_xticks(ticks)
    ax1.set_xlabel("round")
    ax1.set_ylabel("accuracy")
    ax1.set_title("Global model (10 classes; simulation only)")
    ax1.legend(fontsize=8)
    plot_epsilon_per_round(ax2, rows, clients=sim["final"]["epsilon"], budget=metrics["settings"]["epsilon"],
                           accountant=metrics["accountant"], delta=metrics["delta"], ticks=ticks, label_clients=False,
                           title="Privacy spent, one line per client")
    counts = np.array(list(sim["client_label_counts"].values()))
    bottom = np.zeros(len(counts))
    for c, label in enumerate(CLASS_NAMES):
        ax3.bar(range(len(counts)), counts[:, c], bottom=bottom, label=label)
        bottom += counts[:, c]
    ax3.set_xticks(range(len(counts)))
    ax3.set_xlabel("client")
    ax3.set_ylabel("training examples")
    ax3.set_title(f"Label skew, Dirichlet({metrics['settings']['alpha']:g})")
    ax3.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _progress(total: int, desc: str, enabled: bool, unit: str = "step") -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        metrics = run(args)
    except SecFedTLError as exc:
        print(f"fashion_mnist: error: {exc}", file=sys.stderr)
        return 2
    sim = metrics["simulation_only"]
    final = sim["final"]
    print(f"\n(simulation only: computed outside the protocol by whoever holds every dataset)\n"
          f"federated DP test accuracy {final['test_accuracy']:.4f} "
          f"(validation {final['validation_accuracy']:.4f}) after {args.rounds} rounds ({metrics['transport']}); "
          f"epsilon spent max {max(final['epsilon'].values()):.3f} (RDP), "
          + (f"{max(final['epsilon_prv'].values()):.3f} (PRV) " if final["epsilon_prv"] else "")
          + f"of {args.epsilon:g} at delta {DELTA:g}")
    if "non_private_reference" in sim:
        ref = sim["non_private_reference"]
        print(f"non-private central head on the same features: test {ref['test_accuracy']:.4f}")
    certified = all(a["certified"] for a in sim["audit"].values())
    print(f"ledgers ({'all certified' if certified else 'NOT ALL CERTIFIED'} by secfedtl audit): "
          f"{metrics['privacy_state']['directory']}")
    print(f"{metrics['wall_seconds']['total']:.0f} s; wrote {args.out / 'metrics.json'}, {args.out / 'report.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
