"""`secfedtl bench secagg`: time each phase of one secure aggregation.

Reports all clients' key and share set-up (advertise + share-keys steps, summed over clients),
masking per client (the masked-input step: share decryption, pairwise key agreement and mask
expansion), the server's intake of masked inputs, and server unmasking (Shamir reconstruction,
dropped clients' pairwise masks, self-masks), plus the AES-CTR keystream rate measured in the same
run, so masking can be stated as a ratio to the keystream limit. Inputs are random; dropped clients
fall silent after sharing their keys (the costly case: their pairwise masks must be removed).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from secfedtl.crypto.prg import keystream_rate
from secfedtl.errors import ConfigError
from secfedtl.secagg.config import SecAggConfig
from secfedtl.secagg.session import SessionParams
from secfedtl.secagg.simulate import build_sessions, drive_round

FLOWER_REFERENCE = {  # Flower 1.41 SecAgg+ on this machine kind (2 cores), from the project brief
    (100, 11): {"setup_s": 5.1, "mask_per_client_s": 0.18, "unmask_s": 6.8},
    (50, 49): {"setup_s": 47.9, "mask_per_client_s": 0.62, "unmask_s": 36.1},
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--params", type=int, default=1_000_000, help="model parameters per client")
    parser.add_argument("--neighbors", type=int, default=None, help="SecAgg+ degree (default: complete graph)")
    parser.add_argument("--threshold", type=int, default=None, help="Shamir threshold (default: by the rule)")
    parser.add_argument("--dropout", type=float, default=0.05, help="fraction of clients that drop after sharing")
    parser.add_argument("--bits", type=int, default=32)
    parser.add_argument("--authenticated", action="store_true")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _config(args: argparse.Namespace) -> SecAggConfig:
    extra = {"bits": args.bits, "authenticated": args.authenticated}
    if args.threshold is None and args.neighbors is None:
        return SecAggConfig.recommended(num_clients=args.clients, dropout_rate=max(args.dropout, 0.01), **extra)
    degree = args.clients - 1 if args.neighbors is None else args.neighbors
    threshold = args.threshold if args.threshold is not None else degree // 2 + 1
    return SecAggConfig(num_clients=args.clients, threshold=threshold, neighbors=args.neighbors, **extra)


def run(args: argparse.Namespace) -> dict:
    if args.params < 1 or args.clients < 3 or not 0 <= args.dropout < 1:
        raise ConfigError("need --params >= 1, --clients >= 3 and 0 <= --dropout < 1")
    cfg = _config(args)
    rng = np.random.default_rng(0)
    vectors = [cfg.encoding.encode(rng.uniform(-cfg.clip, cfg.clip, args.params), rng=rng)
               for _ in range(args.clients)]
    params = SessionParams(config=cfg, session_id=os.urandom(16), round=0, vector_length=args.params + 1)
    clients, server = build_sessions(params, vectors)
    num_dropped = int(round(args.dropout * args.clients))
    dropouts = {i: "mask" for i in range(num_dropped)}
    t0 = time.perf_counter()
    outcome = drive_round(clients, server, dropouts=dropouts, timed=True)
    wall = time.perf_counter() - t0
    tm = outcome.timings
    total = lambda key: float(sum(tm.get(key, [])))  # noqa: E731
    masking = tm.get("client:mask", [])
    rate = keystream_rate()
    words_per_mask = args.params + 1
    limit = (cfg.degree + 1) * words_per_mask * np.dtype(params.dtype).itemsize / rate
    report = {
        "clients": args.clients, "params": args.params, "neighbors": cfg.degree, "threshold": cfg.threshold,
        "full_graph": cfg.full_graph, "dropped": num_dropped, "included": len(outcome.result.included),
        "bits": cfg.bits, "authenticated": cfg.authenticated,
        "setup_s": total("client:advertise") + total("client:share"),
        "mask_per_client_s": float(np.mean(masking)) if masking else 0.0,
        "server_intake_s": total("server:receive:mask"),
        "unmask_s": total("server:advance:unmask"),
        "server_total_s": sum(total(k) for k in tm if k.startswith("server:")),
        "round_wall_s": wall,
        "wire_bytes": outcome.wire_bytes,
        "keystream_gb_per_s": rate / 1e9,
        "mask_keystream_limit_s": limit,
    }
    report["mask_ratio_to_limit"] = report["mask_per_client_s"] / limit
    ref = FLOWER_REFERENCE.get((args.clients, cfg.degree))
    if ref is not None and args.params == 1_000_000:
        report["flower_reference"] = ref
        ours = report["setup_s"] + report["mask_per_client_s"] + report["unmask_s"]
        theirs = ref["setup_s"] + ref["mask_per_client_s"] + ref["unmask_s"]
        report["speedup_vs_flower"] = theirs / ours
    return report


def main(args: argparse.Namespace) -> int:
    report = run(args)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return 0
    graph = "complete graph" if report["full_graph"] else f"SecAgg+ k={report['neighbors']}"
    print(f"secure aggregation: {report['clients']} clients, {report['params']:,} params, {graph}, "
          f"t={report['threshold']}, {report['dropped']} dropped, {report['bits']} bits")
    rows = [
        ("key + share set-up, all clients", report["setup_s"]),
        ("masking, per client", report["mask_per_client_s"]),
        ("server intake of masked inputs", report["server_intake_s"]),
        ("server unmasking", report["unmask_s"]),
        ("whole round, wall clock (clients sequential)", report["round_wall_s"]),
    ]
    for name, seconds in rows:
        print(f"  {name:<46} {seconds:9.4f} s")
    print(f"  AES-128-CTR keystream: {report['keystream_gb_per_s']:.2f} GB/s; masking = "
          f"{report['mask_ratio_to_limit']:.2f}x the keystream limit ({report['mask_keystream_limit_s'] * 1e3:.1f} ms)")
    if "flower_reference" in report:
        ref = report["flower_reference"]
        print(f"  Flower 1.41 reference: set-up {ref['setup_s']} s, masking {ref['mask_per_client_s']} s, "
              f"unmask {ref['unmask_s']} s -> ours {report['speedup_vs_flower']:.1f}x faster")
    return 0
