"""`secfedtl bench distributed`: the cost and the bit budget of distributed DP's building blocks.

Three measurements (never part of the test suite; times depend on the machine):

* **sampler**: Skellam noise for ``d`` coordinates from a fresh AES-CTR key stream (table build,
  cached once per ``mu``, timed apart), beside the key stream alone and ``os.urandom``;
* **encoding**: one hospital's step (clip, rotate, conditional rounding, sum) for a batch;
* **step**: one hospital's whole share of one step at the Fashion-MNIST example's shape (a linear
  head 3,136 -> 10 on cached features, 31,370 weights, about 820 sampled records, 32-bit field):
  per-example gradients, encoding, Skellam noise and wrap, rotation on and off;
* **bits**: the bit-width rule (:func:`secfedtl.encoding.distributed.plan_encoding`): for each
  dimension and party count, the encoding overhead per bit width and the smallest width within
  1% of central DP's noise (:func:`~secfedtl.encoding.distributed.choose_bits`), plus the
  accounting cost of Skellam against the Gaussian (noise multiplier needed for a target epsilon).

Prints one JSON object; ``--plot FILE`` draws overhead against bits.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time

import numpy as np

__all__ = ["add_arguments", "main", "run_benchmark"]


def _best_of(fn, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_sampler(dimension: int, mus: list[float], repeats: int) -> list[dict]:
    from secfedtl.crypto.stream import KeyStream
    from secfedtl.privacy.discrete_noise import _table, skellam_noise, skellam_table

    rows = []
    stream_s = _best_of(lambda: KeyStream.fresh().read(16 * dimension), repeats)
    urandom_s = _best_of(lambda: os.urandom(16 * dimension), repeats)
    for mu in mus:
        _table.cache_clear()
        start = time.perf_counter()
        table = skellam_table(mu)
        build_s = time.perf_counter() - start
        sample_s = _best_of(lambda: skellam_noise(dimension, mu=mu, stream=KeyStream.fresh()), repeats)
        rows.append({"dimension": dimension, "mu": mu, "table_rows": 2 * table.half_width + 1,
                     "table_build_s": build_s, "sample_s": sample_s,
                     "samples_per_s": dimension / sample_s, "keystream_16B_per_coord_s": stream_s,
                     "os_urandom_16B_per_coord_s": urandom_s})
    return rows


def bench_encoding(dimension: int, batch: int, repeats: int, rotate: bool = True) -> dict:
    from secfedtl.crypto.stream import KeyStream
    from secfedtl.encoding.distributed import DistributedEncoding

    enc = DistributedEncoding(dimension=dimension, clip_norm=1.0, scale=1000.0, bits=20 if rotate else 32,
                              rotate=rotate)
    grads = np.random.default_rng(0).normal(size=(batch, dimension)).astype(np.float32)
    seconds = _best_of(lambda: enc.encode_examples(grads, rotation_seed=b"bench", stream=KeyStream.fresh()), repeats)
    return {"dimension": dimension, "padded": enc.padded_dimension, "rotate": rotate, "batch": batch, "encode_s": seconds,
            "examples_per_s": batch / seconds}


def bench_step(*, batch: int = 820, features: int = 3136, classes: int = 10, scale: float = 90628.9,
               mu: float = 9.0e8, repeats: int = 3) -> list[dict]:
    """One hospital's share of one distributed step (:func:`secfedtl.privacy.distributed.noisy_share`
    after :func:`~secfedtl.training.examples.per_example_gradients`), timed piece by piece. The
    defaults are the Fashion-MNIST example's (``run.py --noise distributed --batch-size 8192``:
    10 clients, scale and Skellam share of its plan); synthetic features of norm 3."""
    import torch

    from secfedtl.crypto.stream import KeyStream
    from secfedtl.encoding.distributed import DistributedEncoding
    from secfedtl.privacy.discrete_noise import skellam_noise, skellam_table
    from secfedtl.training.examples import per_example_gradients
    from secfedtl.transfer.distillation import cross_entropy_loss

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, features, generator=gen)
    x *= 3.0 / x.norm(dim=1, keepdim=True)
    y = torch.randint(0, classes, (batch,), generator=gen)
    head = torch.nn.Linear(features, classes)
    dimension = features * classes + classes
    skellam_table(mu)  # built once per process (cached), not per step
    rows = []
    for rotate in (True, False):
        enc = DistributedEncoding(dimension=dimension, clip_norm=1.0, scale=scale, bits=32, rotate=rotate)
        grads = per_example_gradients(head, x, y, loss_fn=cross_entropy_loss, prefix="head.")
        gradients_s = _best_of(lambda: per_example_gradients(head, x, y, loss_fn=cross_entropy_loss, prefix="head."),
                               repeats)
        encode_s = _best_of(lambda: enc.encode_examples(grads, rotation_seed=b"bench", stream=KeyStream.fresh()),
                            repeats)
        noise_s = _best_of(lambda: enc.wrap(skellam_noise(enc.padded_dimension, mu=mu, stream=KeyStream.fresh())),
                           repeats)
        rows.append({"batch": batch, "dimension": dimension, "padded": enc.padded_dimension, "rotate": rotate,
                     "scale": scale, "mu": mu, "gradients_s": gradients_s, "encode_s": encode_s,
                     "noise_and_wrap_s": noise_s, "step_s": gradients_s + encode_s + noise_s})
    return rows


def bench_bits(dimensions: list[int], parties: list[int], max_batch: int, colluders: int) -> dict:
    from secfedtl.encoding.distributed import choose_bits, plan_encoding
    from secfedtl.errors import ConfigError

    curves, chosen = [], []
    for d in dimensions:
        for n in parties:
            honest = max(1, n - colluders)
            kwargs = dict(dimension=d, clip_norm=1.0, noise_multiplier=1.0, num_parties=n, honest_parties=honest,
                          max_batch=max_batch, wrap_probability=1e-6)
            curve = []
            for bits in range(10, 25):
                try:
                    plan = plan_encoding(bits=bits, **kwargs)
                except ConfigError:
                    continue
                curve.append({"bits": bits, "scale": plan.encoding.scale, "norm_inflation": plan.norm_inflation,
                              "overhead": plan.encoding_overhead})
            curves.append({"dimension": d, "parties": n, "honest": honest, "curve": curve})
            plan = choose_bits(max_overhead=0.01, **kwargs)
            unrotated = choose_bits(max_overhead=0.01, **{**kwargs, "rotate": False})
            chosen.append({"dimension": d, "parties": n, "honest": honest, "bits": plan.encoding.bits,
                           "bits_without_rotation": unrotated.encoding.bits,
                           "scale": plan.encoding.scale, "overhead": plan.encoding_overhead,
                           "wrap_probability_bound": plan.wrap_probability,
                           "dropout_noise_factor": math.sqrt(n / honest)})
    return {"max_batch": max_batch, "colluders": colluders, "noise_multiplier": 1.0, "curves": curves,
            "smallest_within_1pct": chosen}


def bench_accounting() -> list[dict]:
    from secfedtl.privacy.accountants import calibrate_noise_multiplier, calibrate_skellam_share

    rows = []
    for q, steps, eps in [(0.01, 1000, 3.0), (0.01, 1000, 1.0), (0.05, 200, 3.0), (0.004, 2500, 1.0), (1.0, 50, 3.0),
                          (0.1, 30, 1.0), (0.1, 300, 1.0)]:
        z_rdp = calibrate_noise_multiplier(target_epsilon=eps, target_delta=1e-5, sample_rate=q, steps=steps)
        z_prv = calibrate_noise_multiplier(target_epsilon=eps, target_delta=1e-5, sample_rate=q, steps=steps,
                                           accountant="prv")
        l2 = 1.0e4  # Gaussian regime; the Skellam-specific term is negligible
        event = calibrate_skellam_share(target_epsilon=eps, target_delta=1e-5, sample_rate=q, steps=steps,
                                        honest_parties=1, l2_bound=l2, l1_bound=l2 * 1024, dimension=2**20,
                                        scale=1.0, bits=20)
        z_sk = math.sqrt(2 * event.total_mu) / l2
        rows.append({"sample_rate": q, "steps": steps, "epsilon": eps, "gaussian_rdp": z_rdp, "gaussian_prv": z_prv,
                     "skellam_rdp": z_sk, "skellam_over_gaussian_rdp": z_sk / z_rdp})
    return rows


def run_benchmark(*, dimension: int = 10**6, repeats: int = 3) -> dict:
    return {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "sampler": bench_sampler(dimension, [50.0, 1.0e4, 1.0e6], repeats),
        "encoding": [bench_encoding(d, 64, repeats, rotate) for d in (10**4, 10**5) for rotate in (True, False)],
        "step": bench_step(repeats=repeats),
        "bits": bench_bits([10**4, 10**5, 10**6], [3, 10, 100], max_batch=512, colluders=1),
        "accounting": bench_accounting(),
    }


def _plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for entry in result["bits"]["curves"]:
        if entry["parties"] != 10:
            continue
        xs = [p["bits"] for p in entry["curve"]]
        ys = [p["overhead"] - 1.0 for p in entry["curve"]]
        ax.semilogy(xs, ys, marker="o", label=f"d = {entry['dimension']:.0e}")
    ax.axhline(0.01, color="grey", linestyle="--", linewidth=1, label="1% overhead")
    ax.set_xlabel("bits per coordinate")
    ax.set_ylabel("noise std overhead vs central DP (ratio - 1)")
    ax.set_title("Distributed DP encoding overhead\n10 parties (1 colluder), 512 examples per step, wrap probability <= 1e-6",
                 fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dimension", type=int, default=10**6, help="coordinates for the sampler timing")
    parser.add_argument("--repeats", type=int, default=3, help="timings keep the best of this many runs")
    parser.add_argument("--plot", default=None, help="write the overhead-vs-bits plot here (PNG)")


def main(args: argparse.Namespace) -> int:
    result = run_benchmark(dimension=args.dimension, repeats=args.repeats)
    print(json.dumps(result, indent=1))
    if args.plot:
        _plot(result, args.plot)
    return 0
