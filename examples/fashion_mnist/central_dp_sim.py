"""How the ScatterNet settings of the distributed-noise runs were chosen: a quick *central* DP-SGD
simulation of the linear head on ScatterNet features, scored on a held-out validation split.

Distributed noise with every client honest is, to within the Skellam accountant's 0.4%, central
DP-SGD on the union of the clients' rows, so this single-process simulation (no clients, no
secure aggregation, no encoding) screens settings in 1-2 minutes each instead of 30. It is a
tuning tool of the experimenter, **not a private release**: it reads every training image, its
Poisson batches and noise come from torch's generator, and no ledger is charged (the known
limitation of the example's tuning, README "Settings ... were chosen on the clients' pooled
validation rows"). It never reads the test split.

    OMP_NUM_THREADS=2 .venv/bin/python examples/fashion_mnist/central_dp_sim.py --cache runs/scatter.pt \
        --epsilon 3 --batch 8192 --epochs 40 --lr 8 --centre-epsilon 0.3

The first run computes the scattering features of the 60,000 training images (about 4 minutes on
2 CPU cores) and caches them in ``--cache``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from secfedtl.data.fashion_mnist import load_fashion_mnist  # noqa: E402
from secfedtl.privacy.accountants import calibrate_noise_multiplier  # noqa: E402
from secfedtl.transfer.centring import MeanMechanism  # noqa: E402


def unit_features(cache: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The unit-norm ScatterNet features (:meth:`source_model.ScatterNet.unit_features`) of the
    training split, and its labels; cached in ``cache``."""
    if cache.is_file():
        saved = torch.load(cache, weights_only=True)
        return saved["x"], saved["y"]
    from source_model import ScatterNet, to_inputs

    data = load_fashion_mnist(None)
    net = ScatterNet().eval()
    with torch.no_grad():
        x = torch.cat([net.unit_features(to_inputs(data.x_train[i:i + 1024]))
                       for i in range(0, len(data.y_train), 1024)])
    y = torch.from_numpy(data.y_train.astype("int64"))
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"x": x, "y": y}, cache)
    return x, y


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, required=True, help="file for the cached training features")
    p.add_argument("--epsilon", type=float, default=3.0)
    p.add_argument("--batch", type=int, default=8192, help="expected batch (over all rows)")
    p.add_argument("--epochs", type=float, default=40)
    p.add_argument("--lr", type=float, default=8.0)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--clip", type=float, default=0.1)
    p.add_argument("--feature-scale", type=float, default=63.0)
    p.add_argument("--centre-epsilon", type=float, default=0.0, help="0: no centring")
    p.add_argument("--fit", type=int, default=54_000, help="rows trained on; the rest are the validation split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--local-clients", type=int, default=1,
                   help="screen local noise: each of K clients adds the full noise to its part of the batch, "
                        "so the sum carries sqrt(K) times the central noise std (1: central / distributed)")
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    x, y = unit_features(a.cache)
    perm = torch.randperm(len(y))
    fit, val = perm[:a.fit], perm[a.fit:]
    prior = []
    if a.centre_epsilon > 0:
        mech = MeanMechanism.calibrate(dim=x.shape[1], target_epsilon=a.centre_epsilon, target_delta=1e-5)
        prior = [mech.event()]
        # ten clients each add the mechanism's noise to their sum
        centre = x[fit].mean(0) + torch.randn(x.shape[1]) * mech.noise_std * 10 ** 0.5 / a.fit
        x = x - centre
    x = a.feature_scale * x / x.norm(dim=1, keepdim=True)
    q = a.batch / a.fit
    steps = int(round(a.epochs / q))
    sigma = calibrate_noise_multiplier(target_epsilon=a.epsilon, target_delta=1e-5, sample_rate=q, steps=steps,
                                       prior_events=prior)
    if a.local_clients < 1:
        p.error("--local-clients must be at least 1")
    sigma *= a.local_clients ** 0.5
    print(f"q {q:.4f}, {steps} steps, noise multiplier on the sum {sigma:.3f}", flush=True)
    w, b = torch.zeros(10, x.shape[1]), torch.zeros(10)
    mw, mb = torch.zeros_like(w), torch.zeros_like(b)
    xf, yf = x[fit], y[fit]
    for t in range(steps):
        idx = (torch.rand(a.fit) < q).nonzero().squeeze(1)
        xb, yb = xf[idx], yf[idx]
        err = torch.softmax(xb @ w.T + b, 1)
        err[torch.arange(len(yb)), yb] -= 1
        norms = err.norm(dim=1) * torch.sqrt((xb * xb).sum(1) + 1)
        err = err * (a.clip / norms).clamp(max=1.0).unsqueeze(1)
        gw = err.T @ xb + sigma * a.clip * torch.randn_like(w)
        gb = err.sum(0) + sigma * a.clip * torch.randn_like(b)
        mw, mb = a.momentum * mw + gw / a.batch, a.momentum * mb + gb / a.batch
        w, b = w - a.lr * mw, b - a.lr * mb
        if (t + 1) % max(1, steps // 5) == 0 or t == steps - 1:
            acc = ((x[val] @ w.T + b).argmax(1) == y[val]).float().mean().item()
            print(f"step {t + 1}: validation accuracy {acc:.4f}", flush=True)


if __name__ == "__main__":
    main()
