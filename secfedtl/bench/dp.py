"""`secfedtl bench dp`: time DP head training on cached features vs through the frozen backbone.

Four ways to train the same linear head of a small CNN on 28x28 inputs (synthetic data; two
backbones: the PyTorch MNIST example network and a tinier 3-conv net) with Poisson batches of
expected size 64:

* DP-SGD through the frozen backbone (the backbone runs every step),
* DP-SGD on cached backbone features (:func:`secfedtl.transfer.caching.cache_features`),
* the same two without privacy (plain SGD, same batches),

plus a linear model on raw pixels, DP vs non-private. Reports steps per second and the ratios.
Never part of the test suite; numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from secfedtl.privacy.randomness import Randomness
from secfedtl.training.config import DPTrainingConfig
from secfedtl.training.dpsgd import run_dp_sgd
from secfedtl.transfer.batchnorm import pin_frozen_in_eval
from secfedtl.transfer.caching import cache_features, split_head
from secfedtl.transfer.distillation import cross_entropy_loss
from secfedtl.transfer.freezing import HeadOnly

__all__ = ["add_arguments", "main", "run_benchmark"]


class TinyCNN(nn.Module):
    """Three conv layers (16/32/64 channels, pooled early) on 1x28x28, global average pool, 64->10 head."""

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


class MnistExampleCNN(nn.Module):
    """The PyTorch MNIST example network: conv 32, conv 64, max-pool, dropout, fc 9216->128;
    the 128->10 layer is the head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Dropout(0.25), nn.Flatten(), nn.Linear(9216, 128), nn.ReLU(), nn.Dropout(0.5),
        )
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.backbone(x))


BACKBONES: dict[str, type[nn.Module]] = {"mnist-cnn": MnistExampleCNN, "tiny-cnn": TinyCNN}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `secfedtl bench dp`."""
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--samples", type=int, default=2048, help="client dataset size")
    parser.add_argument("--batch-size", type=int, default=64, help="expected (Poisson) batch size")
    parser.add_argument("--backbone-steps", type=int, default=40, help="steps through the backbone")
    parser.add_argument("--head-steps", type=int, default=1000, help="steps on cached features / linear")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the best is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--backbone", choices=[*BACKBONES, "all"], default="all", help="which backbone(s) to time"
    )
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
    backbones: tuple[str, ...] = tuple(BACKBONES),
    seed: int = 0,
) -> dict[str, object]:
    """Run every configuration and return a dict of steps/s, ratios and the setup.

    ``threads`` sets torch's intra-op thread count for the run (restored afterwards)."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(samples, batch_size, backbone_steps, head_steps, repeats, backbones, seed)
    finally:
        torch.set_num_threads(previous)


def _run(
    samples: int, batch_size: int, backbone_steps: int, head_steps: int, repeats: int,
    backbones: tuple[str, ...], seed: int,
) -> dict[str, object]:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(samples, 1, 28, 28, generator=g), torch.randint(0, 10, (samples,), generator=g))
    rate = batch_size / samples
    cfg = DPTrainingConfig(lr=0.1, expected_batch_size=batch_size, max_grad_norm=1.0, steps=1, noise_multiplier=1.0)

    def dp(m: nn.Module, d: TensorDataset) -> Callable[[int], None]:
        def train(n: int) -> None:
            run_dp_sgd(
                model=m, data=d, config=cfg, noise_multiplier=1.0, steps=n, sample_rate=rate,
                loss_fn=cross_entropy_loss, randomness=Randomness.insecure_seeded(seed),
            )

        return train

    def plain(m: nn.Module, d: TensorDataset) -> Callable[[int], None]:
        return lambda n: _plain_sgd(m, d, steps=n, rate=rate, lr=0.1, seed=seed)

    report: dict[str, object] = {}
    for name in backbones:
        model = BACKBONES[name]()
        HeadOnly(head="fc").apply(model)
        pin_frozen_in_eval(model)
        sps = {
            "dp_backbone": _steps_per_s(dp(model, data), backbone_steps, repeats),
            "plain_backbone": _steps_per_s(plain(model, data), backbone_steps, repeats),
        }
        backbone, head = split_head(model, "fc")
        backbone.train()  # pinned dropout stays off: same features as private training sees
        start = time.perf_counter()
        cached = cache_features(backbone, data, batch_size=256)
        cache_s = time.perf_counter() - start
        sps["dp_cached"] = _steps_per_s(dp(head, cached), head_steps, repeats)
        sps["plain_cached"] = _steps_per_s(plain(head, cached), head_steps, repeats)
        report[name] = {
            "steps_per_s": sps,
            "feature_cache_seconds": cache_s,
            "ratios": {
                "dp_cached_over_dp_backbone": sps["dp_cached"] / sps["dp_backbone"],
                "plain_backbone_over_dp_backbone": sps["plain_backbone"] / sps["dp_backbone"],
                "plain_cached_over_dp_cached": sps["plain_cached"] / sps["dp_cached"],
            },
        }
    flat = TensorDataset(data.tensors[0].reshape(samples, -1), data.tensors[1])
    linear = nn.Linear(28 * 28, 10)
    lin = {
        "dp": _steps_per_s(dp(linear, flat), head_steps, repeats),
        "plain": _steps_per_s(plain(linear, flat), head_steps, repeats),
    }
    report["linear-784x10"] = {"steps_per_s": lin, "ratios": {"plain_over_dp": lin["plain"] / lin["dp"]}}
    report["setup"] = {
        "samples": samples, "expected_batch_size": batch_size, "backbone_steps": backbone_steps,
        "head_steps": head_steps, "repeats": repeats, "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
    }
    return report


def _table(report: dict[str, object]) -> str:
    lines = [
        "| model | configuration | DP-SGD steps/s | non-private steps/s | non-private / DP |",
        "|---|---|---:|---:|---:|",
    ]
    summary = []
    for name, entry in report.items():
        if name in ("setup", "linear-784x10"):
            continue
        assert isinstance(entry, dict)
        sps, ratios = entry["steps_per_s"], entry["ratios"]
        for label, key in (("head through frozen backbone", "backbone"), ("head on cached features", "cached")):
            d, p = sps[f"dp_{key}"], sps[f"plain_{key}"]
            lines.append(f"| {name} | {label} | {d:,.1f} | {p:,.1f} | {p / d:.2f}x |")
        summary.append(
            f"{name}: DP cached / DP through backbone = **{ratios['dp_cached_over_dp_backbone']:.1f}x** "
            f"(feature cache built once in {entry['feature_cache_seconds']:.2f} s)"
        )
    lin = report["linear-784x10"]
    assert isinstance(lin, dict)
    d, p = lin["steps_per_s"]["dp"], lin["steps_per_s"]["plain"]
    lines.append(f"| linear 784->10 | whole model on raw pixels | {d:,.1f} | {p:,.1f} | {p / d:.2f}x |")
    return "\n".join(lines + [""] + summary)


def main(args: argparse.Namespace) -> int:
    """Entry point of `secfedtl bench dp`."""
    report = run_benchmark(
        samples=args.samples, batch_size=args.batch_size, backbone_steps=args.backbone_steps,
        head_steps=args.head_steps, repeats=args.repeats, threads=args.threads,
        backbones=tuple(BACKBONES) if args.backbone == "all" else (args.backbone,), seed=args.seed,
    )
    print(json.dumps(report, indent=2) if args.json else _table(report))
    return 0
