"""Federated transfer learning with DP-SGD and secure aggregation: an MNIST CNN transferred to
Fashion-MNIST, 10 clients with Dirichlet(0.5) label skew, epsilon = 3 per client.

Set up with ``examples/fashion_mnist/setup.sh``, then from the repository root:

    .venv/bin/python examples/fashion_mnist/run.py --out runs/fashion_mnist

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
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))  # source_model.py beside this file

from source_model import FashionNet, load_mnist_cnn, to_inputs  # noqa: E402

from secfedtl.aggregation import make_server_optimizer  # noqa: E402
from secfedtl.data.fashion_mnist import (  # noqa: E402
    CLASS_NAMES,
    DEBIAN_DIR,
    ZALANDO_URL,
    client_splits,
    load_fashion_mnist,
)
from secfedtl.errors import AccountingError, ConfigError, DataError, ModelError  # noqa: E402
from secfedtl.privacy.accountants import calibrate_noise_multiplier, compute_epsilon  # noqa: E402
from secfedtl.privacy.audit import audit_ledger  # noqa: E402
from secfedtl.privacy.budget import BudgetGuard  # noqa: E402
from secfedtl.privacy.ledger import read_verified_ledger, spent_events  # noqa: E402
from secfedtl.privacy.state import PrivacyState, data_fingerprint  # noqa: E402
from secfedtl.runtime.federation import Federation  # noqa: E402
from secfedtl.runtime.node import ClientNode, TrainTask  # noqa: E402
from secfedtl.runtime.pool import LocalPool  # noqa: E402
from secfedtl.runtime.report import plot_epsilon_per_round  # noqa: E402
from secfedtl.runtime.roster import Roster  # noqa: E402
from secfedtl.training import DPTrainingConfig, PrivateClient, evaluate, flatten_params, unflatten_params  # noqa: E402
from secfedtl.transfer import cache_features, split_head, state_hash  # noqa: E402

DELTA = 1e-5
ACCOUNTANT = "rdp"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rounds", type=int, default=40, help="federated rounds (the budget is spread over them)")
    p.add_argument("--epsilon", type=float, default=3.0, help=f"each client's budget (delta = {DELTA:g})")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label-skew concentration")
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
    p.add_argument("--data-dir", type=Path, default=None,
                   help="folder with the four Fashion-MNIST IDX files, gzipped or not (default: Debian's "
                        f"dataset-fashion-mnist in {DEBIAN_DIR}; without apt, download them from "
                        f"{ZALANDO_URL}, MIT licence)")
    p.add_argument("--skip-checksums", action="store_true",
                   help="accept IDX files other than the published release (e.g. your own data in that format)")
    p.add_argument("--weights", type=Path, default=None, help="source weights (default: digit-recognizer-py's)")
    p.add_argument("--no-reference", action="store_true", help="skip the non-private reference head")
    args = p.parse_args(argv)
    if args.declared_grid < 1:
        p.error("--declared-grid must be >= 1")
    return args


def declared_records(fit_size: int, grid: int) -> int:
    """The public record count a client declares: its fit size rounded to the nearest multiple of
    ``grid`` (at least one ``grid``). In this simulation the experimenter plays every client's
    operator and declares it once, before training; a real operator would declare a round figure
    it is willing to make public. It need not match the data: it fixes the mechanism."""
    return max(grid, grid * round(fit_size / grid))


class Images(Dataset):
    """uint8 images and their labels, each image made a model input (:func:`to_inputs`) only when
    read: the frozen layers see the same inputs, without a float copy of a whole split in memory."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return to_inputs(self.images[i : i + 1])[0], int(self.labels[i])


def calibrated_noise(config: DPTrainingConfig, *, rounds: int, prior: list[Any], client: str,
                     state: PrivacyState) -> float:
    """The noise multiplier for ``rounds`` rounds of ``config`` after what the client's privacy
    state already spent in other jobs (``prior``), from public values only."""
    assert config.target_epsilon is not None and config.target_delta is not None
    try:
        return calibrate_noise_multiplier(target_epsilon=config.target_epsilon, target_delta=config.target_delta,
                                          sample_rate=config.sample_rate, steps=rounds * config.local_steps(),
                                          accountant=config.accountant, prior_events=prior)
    except AccountingError as exc:
        spent = compute_epsilon(prior, config.target_delta, accountant=config.accountant) if prior else 0.0
        raise ConfigError(
            f"{client}'s privacy state in {state.directory} has already spent epsilon {spent:.3f} of its budget "
            f"{config.target_epsilon:g} in earlier jobs: no training noise fits what is left ({exc}). A new job "
            "on the same data continues its budget; use another --out (or --state-dir) for fresh simulated clients"
        ) from exc


def make_federation(clients: dict[str, PrivateClient], model: nn.Module, *, server: str, server_lr: float,
                    server_momentum: float | None, max_samples: int, seed: int) -> Federation:
    """The one place this example builds the federation: a node per private client with only its
    ``train`` task (the server never asks a client to evaluate: accuracy is the simulation's
    experimenter's, computed outside the protocol), an in-process pool, and the server (secure
    aggregation + optimizer). ``clip`` bounds each coordinate of a client's head update (they stay
    far below 10 here); ``max_samples`` bounds the declared weights."""
    frozen_hash = state_hash(model)  # the public source model; a node refuses a request for another
    roster, keys = Roster.generate(clients)  # one process plays every client: per-run signing keys
    nodes = {name: ClientNode(name=name, tasks={"train": TrainTask(client, frozen_hash=frozen_hash)},
                              seed=seed * 1000 + k,  # the node's seed drives only the public rounding
                              identity=keys[name], roster=roster)
             for k, (name, client) in enumerate(clients.items())}
    head = next(iter(clients.values())).trainable_state()
    momentum = {"momentum": server_momentum} if server == "fedavgm" and server_momentum is not None else {}
    return Federation(pool=LocalPool(nodes), roster=roster, names=list(head), global_params=flatten_params(head),
                      frozen_hash=frozen_hash, optimizer=make_server_optimizer(server, server_lr=server_lr, **momentum),
                      clip=10.0, bits=32, max_samples=max_samples, seed=seed)


def head_accuracy(head: nn.Module, data: TensorDataset) -> float:
    return evaluate(head, data, batch_size=4096).accuracy


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


def run(args: argparse.Namespace, *, on_clients: Any = None) -> dict[str, Any]:
    """The example; ``on_clients(clients, states, job_id)``, if given, is called once every client
    is set up and before the first round (``audit.py`` installs its canaries there)."""
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    # Data and source model first: a missing file fails before any folder is created.
    data = load_fashion_mnist(args.data_dir, **({"checksums": None} if args.skip_checksums else {}))
    splits = client_splits(data.x_train, data.y_train, num_clients=args.clients, alpha=args.alpha, seed=args.seed)
    test_split = (data.x_test, data.y_test)
    del data  # the training images now live in the clients' splits only
    model = FashionNet(load_mnist_cnn(args.weights), num_conv=args.num_conv, feature_scale=args.feature_scale)
    timings["load"] = time.perf_counter() - t0
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    state_dir: Path = args.state_dir if args.state_dir is not None else out / "privacy-state"
    if args.state_dir is None:
        print(f"fashion_mnist: throwaway privacy states in {state_dir} (real clients keep theirs across jobs)",
              file=sys.stderr)
    job_id = "fashion_mnist-" + uuid.uuid4().hex  # public; every ledger entry of this run carries it
    # Simulation only: every client caches its features (float32) into its own row slice of one
    # buffer, so the experimenter's non-private reference reuses them instead of a second copy.
    fit_rows = np.cumsum([0, *(len(s.y_fit) for s in splits)])
    fit_features = torch.empty((int(fit_rows[-1]), model.head.in_features), dtype=torch.float32)

    # The operators' public declarations, fixed before any training (the experimenter plays them).
    declared = {f"client{k:02d}": declared_records(len(s.y_fit), args.declared_grid) for k, s in enumerate(splits)}
    states: dict[str, PrivacyState] = {}
    try:
        clients: dict[str, PrivateClient] = {}
        guards: dict[str, BudgetGuard] = {}
        t0 = time.perf_counter()
        bar = _progress(args.clients, "caching client features", not args.no_progress)
        for k, split in enumerate(splits):
            name = f"client{k:02d}"
            states[name] = PrivacyState.open(
                state_dir / name, client=name, epsilon=args.epsilon, delta=DELTA, accountant=ACCOUNTANT,
                fingerprint=data_fingerprint([split.x_fit, split.y_fit, split.x_val, split.y_val]))
            guards[name] = states[name].guard(job_id=job_id,
                                              declaration={"records": declared[name], "participation": True})
            target = DPTrainingConfig(lr=args.lr, expected_batch_size=args.batch_size,
                                      max_grad_norm=args.max_grad_norm, epochs=args.epochs,
                                      target_epsilon=args.epsilon, target_delta=DELTA, planned_rounds=args.rounds,
                                      device="auto", accountant=ACCOUNTANT, public_dataset_size=declared[name])
            earlier = states[name].events_before(job_id)
            if earlier:
                print(f"{name}: its privacy state already spent epsilon "
                      f"{compute_epsilon(earlier, DELTA, accountant=ACCOUNTANT):.3f} of {args.epsilon:g} in earlier jobs; "
                      "this job's noise is calibrated for what is left", file=sys.stderr)
            sigma = calibrated_noise(target, rounds=args.rounds, prior=earlier, client=name, state=states[name])
            config = DPTrainingConfig(lr=args.lr, expected_batch_size=args.batch_size, max_grad_norm=args.max_grad_norm,
                                      epochs=args.epochs, noise_multiplier=sigma, device="auto",
                                      accountant=ACCOUNTANT, public_dataset_size=declared[name])
            clients[name] = PrivateClient(client_id=name, model=model, train_data=Images(split.x_fit, split.y_fit),
                                          config=config,
                                          guard=guards[name], head="head", cache_features=True,
                                          feature_buffer=fit_features[int(fit_rows[k]):int(fit_rows[k + 1])])
            bar.update(1)
        bar.close()
        timings["client_setup"] = time.perf_counter() - t0
        if on_clients is not None:
            on_clients(clients, states, job_id)
        metrics = _train(args, test_split, splits, model, clients, guards, states, declared, job_id, state_dir, timings,
                         fit_features)
    finally:
        for state in states.values():
            state.close()
    timings["total"] = time.perf_counter() - t_start
    metrics["wall_seconds"] = timings
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    _plot(metrics, out / "report.png")
    return metrics


def _train(args: argparse.Namespace, test_split: tuple[np.ndarray, np.ndarray], splits: list[Any], model: nn.Module, clients: dict[str, PrivateClient],
           guards: dict[str, BudgetGuard], states: dict[str, PrivacyState], declared: dict[str, int], job_id: str,
           state_dir: Path, timings: dict[str, float], fit_features: torch.Tensor) -> dict[str, Any]:
    # The experimenter's evaluation data: the public test split, and (simulation only) the
    # clients' validation rows pooled. Features computed once with the same frozen layers, so
    # each round evaluates only the head. None of this reaches the server.
    t0 = time.perf_counter()
    backbone, _ = split_head(model, "head")
    backbone.eval()

    def features(x: np.ndarray, y: np.ndarray) -> TensorDataset:
        return cache_features(backbone, Images(x, y), batch_size=64)

    val = features(np.concatenate([s.x_val for s in splits]), np.concatenate([s.y_val for s in splits]))
    test = features(*test_split)
    timings["eval_features"] = time.perf_counter() - t0

    federation = make_federation(clients, model, server=args.server, server_lr=args.server_lr,
                                 server_momentum=args.server_momentum, max_samples=max(declared.values()),
                                 seed=args.seed)
    template = next(iter(clients.values())).trainable_state()
    head = copy.deepcopy(model.head)
    server_rows: list[dict[str, Any]] = []
    sim_rows: list[dict[str, Any]] = []
    bar = _progress(args.rounds, "federated rounds", not args.no_progress)
    t0 = time.perf_counter()
    for _ in range(args.rounds):
        report = federation.run_round()
        server_rows.append(report.to_dict())
        state = unflatten_params(federation.global_params, template)
        head.load_state_dict({k.removeprefix("head."): v for k, v in state.items()})
        eps = {n: g.budget.spent_epsilon for n, g in guards.items()}
        sim_rows.append({"round": report.round, "validation_accuracy": head_accuracy(head, val),
                         "test_accuracy": head_accuracy(head, test), "epsilon": eps})
        bar.update(1)
        bar.set_postfix(val=f"{sim_rows[-1]['validation_accuracy']:.3f}", eps=f"{max(eps.values()):.2f}",
                        status=report.status)
    bar.close()
    timings["federated_training"] = time.perf_counter() - t0

    # Each client's spent epsilon, recomputed from its verified ledger, and `secfedtl audit` on it.
    ledgers = {n: s.ledger.path for n, s in states.items()}
    spent = {n: [ev for _, ev, _ in spent_events(read_verified_ledger(p)[0]).get(n, [])] for n, p in ledgers.items()}
    final_eps = {n: compute_epsilon(ev, DELTA, accountant="rdp") for n, ev in spent.items()}
    final_eps_prv = {n: compute_epsilon(ev, DELTA, accountant="prv") for n, ev in spent.items()}
    audits = {n: audit_ledger(p) for n, p in ledgers.items()}
    per_class = _per_class_accuracy(head, test)
    first = next(iter(clients.values()))
    metrics: dict[str, Any] = {
        "example": "fashion_mnist",
        "command": " ".join(["python", "examples/fashion_mnist/run.py", *sys.argv[1:]]),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "job_id": job_id,
        "delta": DELTA,
        "accountant": ACCOUNTANT,
        "device": first.config.resolve_device(),
        "num_features": int(val.tensors[0].shape[1]),
        "privacy_state": {"directory": os.fspath(state_dir),
                          "note": "a throwaway folder for this example unless --state-dir was given; a real "
                                  "client keeps its state across jobs, and a second job on it continues its budget"},
        "declared_records": declared,
        "mechanism": {"note": "public: functions of the settings and the declared counts only",
                      "sample_rate": {n: c.sample_rate for n, c in clients.items()},
                      "noise_multiplier": {n: c.noise_multiplier for n, c in clients.items()},
                      "local_steps": {n: c.local_steps for n, c in clients.items()}},
        "server": {"note": "everything the server received: round outcomes over masked sums (total_weight is the "
                           "sum of declared counts; times are the server's own clock)",
                   "rounds": server_rows},
        "simulation_only": {
            "note": "computed by the experimenter of this simulation, who holds every client's data and the test "
                    "split, outside the protocol: never sent to the server",
            "client_sizes": {f"client{k:02d}": len(s.y_fit) for k, s in enumerate(splits)},
            "client_validation_sizes": {f"client{k:02d}": len(s.y_val) for k, s in enumerate(splits)},
            "client_label_counts": {f"client{k:02d}": np.bincount(s.y_fit, minlength=10).tolist()
                                    for k, s in enumerate(splits)},
            "rounds": sim_rows,
            "final": {"test_accuracy": sim_rows[-1]["test_accuracy"],
                      "validation_accuracy": sim_rows[-1]["validation_accuracy"],
                      "per_class_test_accuracy": dict(zip(CLASS_NAMES, per_class)),
                      "epsilon": final_eps, "epsilon_prv": final_eps_prv},
            "ledgers": {n: os.fspath(p) for n, p in ledgers.items()},
            "audit": {n: {"certified": a.certified, "epsilon": a.clients[0].epsilon if a.clients else 0.0,
                          "lines": a.lines, "head_hash": a.head_hash} for n, a in audits.items()},
        },
    }
    if not args.no_reference:
        t0 = time.perf_counter()
        # The clients' own cached features (their slices of fit_features), pooled without a copy.
        fit = TensorDataset(fit_features, torch.from_numpy(np.concatenate([s.y_fit for s in splits])))
        ref = reference_head(fit, val, seed=args.seed, progress=not args.no_progress)
        metrics["simulation_only"]["non_private_reference"] = {
            "validation_accuracy": ref["validation_accuracy"], "epochs": ref["epochs"],
            "test_accuracy": head_accuracy(ref["head"], test)}
        timings["reference"] = time.perf_counter() - t0
    return metrics


@torch.no_grad()
def _per_class_accuracy(head: nn.Module, data: TensorDataset) -> list[float]:
    x, y = data.tensors
    pred = head(x.to(next(head.parameters()).device)).argmax(dim=1).cpu()
    return [float((pred[y == c] == c).float().mean()) for c in range(len(CLASS_NAMES))]


def _progress(total: int, desc: str, enabled: bool, unit: str | None = None) -> Any:
    from tqdm import tqdm

    unit = unit or ("step" if "cach" in desc else "round")
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr)


def _plot(metrics: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sim = metrics["simulation_only"]
    rows = sim["rounds"]
    xs = [r["round"] + 1 for r in rows]
    ticks = xs if len(xs) <= 15 else [x for x in xs if x == 1 or x % 5 == 0]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.2))
    ax1.plot(xs, [r["test_accuracy"] for r in rows], marker="o", label="federated, DP (test)")
    ax1.plot(xs, [r["validation_accuracy"] for r in rows], marker=".", linestyle=":", label="federated, DP (validation)")
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        metrics = run(args)
    except (DataError, ModelError, ConfigError) as exc:  # missing data or weights, a spent state: one line
        print(f"fashion_mnist: error: {exc}", file=sys.stderr)
        return 2
    sim = metrics["simulation_only"]
    final = sim["final"]
    print(f"\n(simulation only: computed outside the protocol by whoever holds every dataset)\n"
          f"federated DP test accuracy {final['test_accuracy']:.4f} "
          f"(validation {final['validation_accuracy']:.4f}) after {args.rounds} rounds; "
          f"epsilon spent max {max(final['epsilon'].values()):.3f} (RDP), "
          f"{max(final['epsilon_prv'].values()):.3f} (PRV) of {args.epsilon:g} at delta {DELTA:g}")
    if "non_private_reference" in sim:
        ref = sim["non_private_reference"]
        print(f"non-private central head on the same features: test {ref['test_accuracy']:.4f}")
    certified = all(a["certified"] for a in sim["audit"].values())
    print(f"ledgers ({'all certified' if certified else 'NOT ALL CERTIFIED'} by secfedtl audit): "
          f"{metrics['privacy_state']['directory']}/<client>/ledger.jsonl")
    print(f"{metrics['wall_seconds']['total']:.0f} s; wrote {args.out / 'metrics.json'}, {args.out / 'report.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
