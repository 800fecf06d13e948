"""Federated transfer learning with DP-SGD and secure aggregation: an MNIST CNN transferred to
Fashion-MNIST, 10 clients with Dirichlet(0.5) label skew, epsilon = 3 per client.

Set up with ``examples/fashion_mnist/setup.sh``, then from the repository root:

    .venv/bin/python examples/fashion_mnist/run.py --out runs/fashion_mnist

Each client caches the frozen source layers' output once, trains a new linear head with DP-SGD
(its own budget, charged to the hash-chained ledger before every round), and the server sees only
the securely aggregated sum of the clients' updates (FedAvg with server momentum 0.5). Writes ``metrics.json``,
``ledger.jsonl`` and ``report.png`` into ``--out``. Every choice of settings was made on the
clients' validation splits; the test split is only reported.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))  # source_model.py beside this file

from source_model import FashionNet, load_mnist_cnn, to_inputs  # noqa: E402

from secfedtl.aggregation import make_server_optimizer  # noqa: E402
from secfedtl.data.fashion_mnist import CLASS_NAMES, client_splits, load_fashion_mnist  # noqa: E402
from secfedtl.errors import ConfigError  # noqa: E402
from secfedtl.privacy.accountants import compute_epsilon  # noqa: E402
from secfedtl.privacy.budget import BudgetGuard, PrivacyBudget  # noqa: E402
from secfedtl.privacy.ledger import Ledger  # noqa: E402
from secfedtl.runtime.federation import Federation  # noqa: E402
from secfedtl.runtime.node import ClientNode, standard_tasks  # noqa: E402
from secfedtl.runtime.pool import LocalPool  # noqa: E402
from secfedtl.runtime.report import plot_epsilon_per_round  # noqa: E402
from secfedtl.runtime.roster import Roster  # noqa: E402
from secfedtl.training import DPTrainingConfig, PrivateClient, evaluate, flatten_delta, unflatten_delta  # noqa: E402
from secfedtl.transfer import cache_features, split_head, state_hash  # noqa: E402

DELTA = 1e-5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rounds", type=int, default=40, help="federated rounds (the budget is spread over them)")
    p.add_argument("--epsilon", type=float, default=3.0, help=f"each client's budget (delta = {DELTA:g})")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label-skew concentration")
    p.add_argument("--seed", type=int, default=0, help="partition, validation split and sampling seed (public)")
    p.add_argument("--out", type=Path, default=Path("runs/fashion_mnist"))
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--num-conv", type=int, default=2, choices=(1, 2, 3),
                   help="frozen source conv blocks below the head (2: 64x7x7 = 3136 features)")
    p.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    p.add_argument("--batch-size", type=int, default=1024, help="expected (Poisson) batch size")
    p.add_argument("--lr", type=float, default=10.0, help="local DP-SGD learning rate")
    p.add_argument("--feature-scale", type=float, default=3.0,
                   help="norm of every feature vector (a fixed per-example map); sets how the clip norm "
                        "is shared between the head's weights and bias")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--server", default="fedavgm", help="server optimizer (fedavg, fedavgm, fedadam, ...)")
    p.add_argument("--server-lr", type=float, default=1.0)
    p.add_argument("--server-momentum", type=float, default=0.5, help="momentum of fedavgm (ignored by others)")
    p.add_argument("--data-dir", type=Path, default=None, help="IDX files (default: Debian's dataset-fashion-mnist)")
    p.add_argument("--skip-checksums", action="store_true",
                   help="accept IDX files other than the published release (e.g. your own data in that format)")
    p.add_argument("--weights", type=Path, default=None, help="source weights (default: digit-recognizer-py's)")
    p.add_argument("--no-reference", action="store_true", help="skip the non-private reference head")
    return p.parse_args(argv)


def make_federation(clients: dict[str, PrivateClient], validation: dict[str, TensorDataset], model: nn.Module, *,
                    server: str, server_lr: float, server_momentum: float | None, max_samples: int,
                    seed: int) -> Federation:
    """The one place this example builds the federation: a node per private client (its ``train``
    and ``evaluate`` tasks), an in-process pool, and the server (secure aggregation + optimizer).
    ``clip`` bounds each coordinate of a client's head delta (they stay far below 10 here)."""
    frozen_hash = state_hash(model)  # the public source model; a node refuses a request for another
    roster, keys = Roster.generate(clients)  # one process plays every client: per-run signing keys
    nodes = {name: ClientNode(name=name, tasks=standard_tasks(client, {"validation": validation[name]},
                                                              frozen_hash=frozen_hash), seed=seed * 1000 + k,
                              identity=keys[name], roster=roster)
             for k, (name, client) in enumerate(clients.items())}
    head = next(iter(clients.values())).trainable_state()
    momentum = {"momentum": server_momentum} if server == "fedavgm" and server_momentum is not None else {}
    return Federation(pool=LocalPool(nodes), roster=roster, names=list(head), global_params=flatten_delta(head),
                      frozen_hash=frozen_hash, optimizer=make_server_optimizer(server, server_lr=server_lr, **momentum),
                      clip=10.0, bits=32, max_samples=max_samples, seed=seed)


def head_accuracy(head: nn.Module, data: TensorDataset) -> float:
    return evaluate(head, data, batch_size=4096).accuracy


def reference_head(fit: TensorDataset, val: TensorDataset, *, seed: int, max_epochs: int = 15) -> dict[str, Any]:
    """Non-private, centralised linear head on the same features (all clients' fit rows pooled),
    the epoch count picked on the pooled validation rows."""
    torch.manual_seed(seed)
    x, y = fit.tensors
    head = nn.Linear(x.shape[1], 10)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    best = (-1.0, 0, copy.deepcopy(head.state_dict()))
    for epoch in range(max_epochs):
        for idx in torch.randperm(len(y)).split(256):
            opt.zero_grad()
            nn.functional.cross_entropy(head(x[idx]), y[idx]).backward()
            opt.step()
        acc = head_accuracy(head, val)
        if acc > best[0]:
            best = (acc, epoch + 1, copy.deepcopy(head.state_dict()))
    head.load_state_dict(best[2])
    return {"head": head, "validation_accuracy": best[0], "epochs": best[1]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.perf_counter()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    if (out / "ledger.jsonl").exists():
        raise ConfigError(f"{out / 'ledger.jsonl'} exists: a ledger is never overwritten; use another --out")
    timings: dict[str, float] = {}
    torch.manual_seed(args.seed)

    t0 = time.perf_counter()
    data = load_fashion_mnist(args.data_dir, **({"checksums": None} if args.skip_checksums else {}))
    splits = client_splits(data.x_train, data.y_train, num_clients=args.clients, alpha=args.alpha, seed=args.seed)
    model = FashionNet(load_mnist_cnn(args.weights), num_conv=args.num_conv, feature_scale=args.feature_scale)
    timings["load"] = time.perf_counter() - t0

    ledger = Ledger(out / "ledger.jsonl")
    clients: dict[str, PrivateClient] = {}
    client_validation: dict[str, TensorDataset] = {}
    guards: dict[str, BudgetGuard] = {}
    t0 = time.perf_counter()
    bar = _progress(args.clients, "caching client features", not args.no_progress)
    for k, split in enumerate(splits):
        name = f"client{k:02d}"
        guards[name] = BudgetGuard(client=name, budget=PrivacyBudget(epsilon=args.epsilon, delta=DELTA), ledger=ledger)
        config = DPTrainingConfig(lr=args.lr, expected_batch_size=args.batch_size, max_grad_norm=args.max_grad_norm,
                                  epochs=args.epochs, target_epsilon=args.epsilon, target_delta=DELTA,
                                  planned_rounds=args.rounds, device="auto", seed=args.seed * 1000 + k)
        train = TensorDataset(to_inputs(split.x_fit), torch.from_numpy(split.y_fit))
        clients[name] = PrivateClient(client_id=name, model=model, train_data=train, config=config,
                                      guard=guards[name], head="head", cache_features=True)
        client_validation[name] = TensorDataset(to_inputs(split.x_val), torch.from_numpy(split.y_val))
        bar.update(1)
    bar.close()
    timings["client_setup"] = time.perf_counter() - t0

    # Evaluation data (the evaluator's, not private): features computed once with the same
    # frozen layers, so each round evaluates only the head.
    t0 = time.perf_counter()
    backbone, _ = split_head(model, "head")
    backbone.eval()

    def features(x: np.ndarray, y: np.ndarray) -> TensorDataset:
        return cache_features(backbone, TensorDataset(to_inputs(x), torch.from_numpy(y)), batch_size=1024)

    val = features(np.concatenate([s.x_val for s in splits]), np.concatenate([s.y_val for s in splits]))
    test = features(data.x_test, data.y_test)
    timings["eval_features"] = time.perf_counter() - t0

    max_samples = max(c.num_samples for c in clients.values())
    federation = make_federation(clients, client_validation, model, server=args.server, server_lr=args.server_lr,
                                 server_momentum=args.server_momentum, max_samples=max_samples, seed=args.seed)
    template = next(iter(clients.values())).trainable_state()
    head = copy.deepcopy(model.head)
    rows: list[dict[str, Any]] = []
    bar = _progress(args.rounds, "federated rounds", not args.no_progress)
    t0 = time.perf_counter()
    for _ in range(args.rounds):
        report = federation.run_round()
        state = unflatten_delta(federation.global_params, template)
        head.load_state_dict({k.removeprefix("head."): v for k, v in state.items()})
        eps = {n: g.budget.spent_epsilon for n, g in guards.items()}
        rows.append({**report.to_dict(), "validation_accuracy": head_accuracy(head, val),
                     "test_accuracy": head_accuracy(head, test), "epsilon": eps})
        bar.update(1)
        bar.set_postfix(val=f"{rows[-1]['validation_accuracy']:.3f}", eps=f"{max(eps.values()):.2f}")
    bar.close()
    timings["federated_training"] = time.perf_counter() - t0

    final_eps = {n: g.budget.spent_epsilon for n, g in guards.items()}
    final_eps_prv = {n: compute_epsilon(g.budget.events, DELTA, accountant="prv") for n, g in guards.items()}
    per_class = _per_class_accuracy(head, test)
    metrics: dict[str, Any] = {
        "example": "fashion_mnist",
        "command": " ".join(["python", "examples/fashion_mnist/run.py", *sys.argv[1:]]),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "delta": DELTA,
        "device": clients[next(iter(clients))].config.resolve_device(),
        "num_features": int(val.tensors[0].shape[1]),
        "client_sizes": {n: c.num_samples for n, c in clients.items()},
        "client_label_counts": {f"client{k:02d}": np.bincount(s.y_fit, minlength=10).tolist()
                                for k, s in enumerate(splits)},
        "noise_multiplier": {n: c.noise_multiplier for n, c in clients.items()},
        "local_steps": {n: c.local_steps for n, c in clients.items()},
        "final": {"test_accuracy": rows[-1]["test_accuracy"], "validation_accuracy": rows[-1]["validation_accuracy"],
                  "per_class_test_accuracy": dict(zip(CLASS_NAMES, per_class)),
                  "epsilon": final_eps, "epsilon_prv": final_eps_prv},
        "rounds": rows,
    }
    if not args.no_reference:
        t0 = time.perf_counter()
        fit = features(np.concatenate([s.x_fit for s in splits]), np.concatenate([s.y_fit for s in splits]))
        ref = reference_head(fit, val, seed=args.seed)
        metrics["non_private_reference"] = {"validation_accuracy": ref["validation_accuracy"], "epochs": ref["epochs"],
                                            "test_accuracy": head_accuracy(ref["head"], test)}
        timings["reference"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    metrics["wall_seconds"] = timings
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    _plot(metrics, out / "report.png")
    return metrics


@torch.no_grad()
def _per_class_accuracy(head: nn.Module, data: TensorDataset) -> list[float]:
    x, y = data.tensors
    pred = head(x.to(next(head.parameters()).device)).argmax(dim=1).cpu()
    return [float((pred[y == c] == c).float().mean()) for c in range(len(CLASS_NAMES))]


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step" if "cach" in desc else "round", disable=not enabled, file=sys.stderr)


def _plot(metrics: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = metrics["rounds"]
    xs = [r["round"] + 1 for r in rows]
    ticks = xs if len(xs) <= 15 else [x for x in xs if x == 1 or x % 5 == 0]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.2))
    ax1.plot(xs, [r["test_accuracy"] for r in rows], marker="o", label="federated, DP (test)")
    ax1.plot(xs, [r["validation_accuracy"] for r in rows], marker=".", linestyle=":", label="federated, DP (validation)")
    if "non_private_reference" in metrics:
        ax1.axhline(metrics["non_private_reference"]["test_accuracy"], color="grey", linestyle="--",
                    label="non-private central head (test)")
    ax1.axhline(0.85, color="red", linewidth=0.8, linestyle=":", label="target 0.85")
    ax1.set_xticks(ticks)
    ax1.set_xlabel("round")
    ax1.set_ylabel("accuracy")
    ax1.set_title("Global model (10 classes)")
    ax1.legend(fontsize=8)
    plot_epsilon_per_round(ax2, rows, clients=metrics["final"]["epsilon"], budget=metrics["settings"]["epsilon"],
                           accountant="rdp", delta=metrics["delta"], ticks=ticks, label_clients=False,
                           title="Privacy spent, one line per client")
    counts = np.array(list(metrics["client_label_counts"].values()))
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
    metrics = run(args)
    final = metrics["final"]
    print(f"\nfederated DP test accuracy {final['test_accuracy']:.4f} "
          f"(validation {final['validation_accuracy']:.4f}) after {args.rounds} rounds; "
          f"epsilon spent max {max(final['epsilon'].values()):.3f} (RDP), "
          f"{max(final['epsilon_prv'].values()):.3f} (PRV) of {args.epsilon:g} at delta {DELTA:g}")
    if "non_private_reference" in metrics:
        ref = metrics["non_private_reference"]
        print(f"non-private central head on the same features: test {ref['test_accuracy']:.4f}")
    print(f"{metrics['wall_seconds']['total']:.0f} s; wrote {args.out / 'metrics.json'}, "
          f"{args.out / 'ledger.jsonl'}, {args.out / 'report.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
