"""`secfedtl bench dp`: time DP head training on cached features vs through the frozen backbone.

Four ways to train the same linear head of a small CNN (three conv layers on 28x28 inputs,
synthetic data) with Poisson batches of expected size 64:

* DP-SGD through the frozen backbone (the backbone runs every step),
* DP-SGD on cached backbone features (:func:`secfedtl.transfer.caching.cache_features`),
* the same two without privacy (plain SGD, same batches),

plus a linear model on raw pixels, DP vs non-private. Reports steps per second and the ratios.
Never part of the test suite; numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from secfedtl.training.config import DPTrainingConfig
from secfedtl.training.dpsgd import run_dp_sgd
from secfedtl.transfer.batchnorm import pin_frozen_in_eval
from secfedtl.transfer.caching import cache_features, split_head
from secfedtl.transfer.distillation import cross_entropy_loss
from secfedtl.transfer.freezing import HeadOnly

__all__ = ["add_arguments", "main", "run_benchmark"]


class SmallCNN(nn.Module):
    """Three conv layers (16/32/64 channels) on 1x28x28, global average pool, linear head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.backbone(x))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `secfedtl bench dp`."""
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--samples", type=int, default=2048, help="client dataset size")
    parser.add_argument("--batch-size", type=int, default=64, help="expected (Poisson) batch size")
    parser.add_argument("--backbone-steps", type=int, default=40, help="steps through the backbone")
    parser.add_argument("--head-steps", type=int, default=1000, help="steps on cached features / linear")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the best is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)


def _plain_sgd(model: nn.Module, data: TensorDataset, *, steps: int, rate: float, lr: float, seed: int) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    x_all, y_all = data.tensors
    model.train()
    for _ in range(steps):
        idx = torch.nonzero(torch.rand(len(x_all), generator=gen) < rate).flatten()
        opt.zero_grad(set_to_none=True)
        if idx.numel():
            F.cross_entropy(model(x_all[idx]), y_all[idx]).backward()
            opt.step()


def _steps_per_s(fn: Callable[[int], None], steps: int, repeats: int) -> float:
    """Best of ``repeats`` timed runs (the machine may be shared; the best run is the least disturbed)."""
    fn(3)  # warm-up: allocator, Opacus hook set-up paths
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        fn(steps)
        best = max(best, steps / (time.perf_counter() - start))
    return best


def run_benchmark(
    *,
    samples: int = 2048,
    batch_size: int = 64,
    backbone_steps: int = 40,
    head_steps: int = 1000,
    repeats: int = 3,
    threads: int | None = None,
    seed: int = 0,
) -> dict[str, object]:
    """Run every configuration and return a dict of steps/s, ratios and the setup."""
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(samples, 1, 28, 28, generator=g), torch.randint(0, 10, (samples,), generator=g))
    rate = batch_size / samples
    model = SmallCNN()
    HeadOnly(head="fc").apply(model)
    pin_frozen_in_eval(model)
    cfg = DPTrainingConfig(lr=0.1, expected_batch_size=batch_size, max_grad_norm=1.0, steps=1, noise_multiplier=1.0)

    def dp(m: nn.Module, d: TensorDataset) -> Callable[[int], None]:
        return lambda n: run_dp_sgd(
            model=m, data=d, config=cfg, noise_multiplier=1.0, steps=n, sample_rate=rate,
            loss_fn=cross_entropy_loss, data_generator=torch.Generator().manual_seed(seed),
        ) and None

    results: dict[str, float] = {}
    results["dp_backbone"] = _steps_per_s(dp(model, data), backbone_steps, repeats)
    results["plain_backbone"] = _steps_per_s(
        lambda n: _plain_sgd(model, data, steps=n, rate=rate, lr=0.1, seed=seed), backbone_steps, repeats
    )
    backbone, head = split_head(model, "fc")
    backbone.train()
    start = time.perf_counter()
    cached = cache_features(backbone, data, batch_size=256)
    cache_s = time.perf_counter() - start
    results["dp_cached"] = _steps_per_s(dp(head, cached), head_steps, repeats)
    results["plain_cached"] = _steps_per_s(
        lambda n: _plain_sgd(head, cached, steps=n, rate=rate, lr=0.1, seed=seed), head_steps, repeats
    )
    flat = TensorDataset(data.tensors[0].reshape(samples, -1), data.tensors[1])
    linear = nn.Linear(28 * 28, 10)
    results["dp_linear"] = _steps_per_s(dp(linear, flat), head_steps, repeats)
    results["plain_linear"] = _steps_per_s(
        lambda n: _plain_sgd(linear, flat, steps=n, rate=rate, lr=0.1, seed=seed), head_steps, repeats
    )
    ratios = {
        "dp_cached_over_dp_backbone": results["dp_cached"] / results["dp_backbone"],
        "plain_backbone_over_dp_backbone": results["plain_backbone"] / results["dp_backbone"],
        "plain_cached_over_dp_cached": results["plain_cached"] / results["dp_cached"],
        "plain_linear_over_dp_linear": results["plain_linear"] / results["dp_linear"],
    }
    return {
        "steps_per_s": results,
        "ratios": ratios,
        "feature_cache_seconds": cache_s,
        "setup": {
            "samples": samples, "expected_batch_size": batch_size, "backbone_steps": backbone_steps,
            "head_steps": head_steps, "repeats": repeats, "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
        },
    }


def _table(report: dict[str, object]) -> str:
    sps = report["steps_per_s"]
    ratios = report["ratios"]
    assert isinstance(sps, dict) and isinstance(ratios, dict)
    rows = [
        ("CNN head, through frozen backbone", sps["dp_backbone"], sps["plain_backbone"]),
        ("CNN head, cached features", sps["dp_cached"], sps["plain_cached"]),
        ("linear model on raw pixels", sps["dp_linear"], sps["plain_linear"]),
    ]
    lines = ["| configuration | DP-SGD steps/s | non-private steps/s | non-private / DP |", "|---|---:|---:|---:|"]
    for name, dp_sps, plain_sps in rows:
        lines.append(f"| {name} | {dp_sps:,.1f} | {plain_sps:,.1f} | {plain_sps / dp_sps:.2f}x |")
    lines.append("")
    lines.append(f"DP cached / DP through backbone: **{ratios['dp_cached_over_dp_backbone']:.1f}x** "
                 f"(feature cache built once in {report['feature_cache_seconds']:.2f} s)")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """Entry point of `secfedtl bench dp`."""
    report = run_benchmark(
        samples=args.samples, batch_size=args.batch_size, backbone_steps=args.backbone_steps,
        head_steps=args.head_steps, repeats=args.repeats, threads=args.threads, seed=args.seed,
    )
    print(json.dumps(report, indent=2) if args.json else _table(report))
    return 0
