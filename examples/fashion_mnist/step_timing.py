"""Time one hospital's distributed DP step on the Fashion-MNIST example's shapes.

Run with PYTHONPATH pointing at the tree to measure (so before/after run the same script):
    OMP_NUM_THREADS=1 PYTHONPATH=/work/main python examples/fashion_mnist/step_timing.py --clients 2
Real Fashion-MNIST images through the real frozen conv blocks (digit-recognizer-py weights), the
plan of `run.py --noise distributed --rounds 3 --batch-size 8192 --lr 10` (10 clients), a head
after a few plain SGD steps (so the softmax errors are not all equal). Prints JSON.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples" / "fashion_mnist"))
os.environ.setdefault("FASHION_MNIST_WEIGHTS", "/tmp/deps-fashion/digit_recognizer/models/handwriting_model.pth")

import secfedtl  # noqa: E402
from secfedtl.crypto.stream import KeyStream  # noqa: E402
from secfedtl.federated.distributed import plan_for  # noqa: E402
from secfedtl.privacy.distributed import noisy_share  # noqa: E402
from secfedtl.training.examples import per_example_gradients  # noqa: E402
from secfedtl.transfer.distillation import cross_entropy_loss  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--clients", type=int, default=2, help="how many clients' steps to time (each ~820 examples)")
    p.add_argument("--batch", type=int, default=820)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--rotate", choices=("on", "off", "both"), default="on")
    args = p.parse_args()
    from fashion_job import FASHION, FashionConfig, client_names, load_data  # noqa: PLC0415
    from run import job_config, parse_args as run_parse  # noqa: PLC0415

    run_args = run_parse(["--noise", "distributed", "--rounds", "3", "--batch-size", "8192", "--lr", "10",
                          "--no-reference"])
    names = client_names(10)
    declared = dict.fromkeys(names, 5500)
    config = job_config(run_args, declared, "timing")
    plan = plan_for(config, 31370, job_id="timing")
    source = FASHION.build_source(config)
    model = source.model
    data = load_data()
    rng = np.random.default_rng(0)  # public test harness only: which images to time with
    idx = rng.choice(len(data.y_train), size=args.batch * args.clients, replace=False)
    from source_model import to_inputs  # noqa: PLC0415
    with torch.no_grad():
        feats = model.normalize(model.features(to_inputs(data.x_train[idx])).flatten(1))
    labels = torch.from_numpy(data.y_train[idx].astype(np.int64))
    head = model.head
    opt = torch.optim.SGD(head.parameters(), lr=1.0)
    for _ in range(20):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(feats), labels).backward()
        opt.step()
    out = {"secfedtl": secfedtl.__file__, "scale": plan.encoding.scale, "bits": plan.encoding.bits,
           "padded": plan.encoding.padded_dimension, "mu": plan.event.share_variance / 2, "steps": []}
    import dataclasses  # noqa: PLC0415
    rotations = {"on": [True], "off": [False], "both": [True, False]}[args.rotate]
    for rotate in rotations:
        encoding = dataclasses.replace(plan.encoding, rotate=rotate)
        event = plan.event
        if not rotate:
            event = dataclasses.replace(event, dimension=encoding.padded_dimension, l2_bound=encoding.l2_bound,
                                        l1_bound=encoding.l1_bound)
        noisy_share(encoding, np.zeros((1, 31370)), event=event, rotation_seed=b"warm", stream=KeyStream.fresh())
        for c in range(args.clients):
            x, y = feats[c * args.batch:(c + 1) * args.batch], labels[c * args.batch:(c + 1) * args.batch]
            t0 = time.perf_counter()
            grads = per_example_gradients(head, x, y, loss_fn=cross_entropy_loss, prefix="head.")
            t1 = time.perf_counter()
            prof = cProfile.Profile() if args.profile and c == 0 else None
            if prof:
                prof.enable()
            field = noisy_share(encoding, grads, event=event, rotation_seed=f"step{c}".encode(),
                                stream=KeyStream.fresh())
            if prof:
                prof.disable()
                pstats.Stats(prof, stream=sys.stderr).sort_stats("cumulative").print_stats(25)
            t2 = time.perf_counter()
            out["steps"].append({"rotate": rotate, "batch": len(y), "gradients_s": t1 - t0, "share_s": t2 - t1,
                                 "total_s": t2 - t0, "field_words": int(field.size)})
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
