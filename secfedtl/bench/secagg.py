"""`secfedtl bench secagg`: time each phase of one secure aggregation.

Reports all clients' key and share set-up (advertise + share-keys steps, summed over clients),
masking per client (the masked-input step: share decryption, pairwise key agreement and mask
expansion), the server's intake of masked inputs, and server unmasking (Shamir reconstruction,
dropped clients' pairwise masks, self-masks), plus the AES-CTR keystream rate measured in the same
run, so masking can be stated as a ratio to the keystream limit. Inputs are random; dropped clients
fall silent after sharing their keys (the costly case: their pairwise masks must be removed).

With ``--compare-flower``, Flower's SecAgg+ (its own ``SecAggPlusWorkflow`` and ``secaggplus_mod``,
see :mod:`secfedtl.bench.flower_secaggplus`) runs in the same process on the same inputs, number of
clients, graph degree, threshold, dropouts and modulus, and the report holds both sides and the
ratio per phase. flwr is imported only then.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from secfedtl.crypto.prg import CHUNK_BYTES, prg_key
from secfedtl.errors import ConfigError
from secfedtl.secagg.config import SecAggConfig
from secfedtl.secagg.session import SessionParams
from secfedtl.secagg.simulate import build_sessions, drive_round

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}

#: Phases timed on both sides, compared as Flower's seconds over secfedtl's.
COMPARED = ("setup_s", "mask_per_client_s", "server_intake_s", "unmask_s", "server_total_s", "round_wall_s",
            "round_cpu_s")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--params", type=int, default=1_000_000, help="model parameters per client")
    parser.add_argument("--neighbours", type=int, default=None,
                        help="SecAgg+ degree (default: by SecAggConfig.recommended; with only --threshold given, "
                             "the complete graph)")
    parser.add_argument("--threshold", type=int, default=None, help="Shamir threshold (default: by the rule)")
    parser.add_argument("--dropout", type=float, default=0.05, help="fraction of clients that drop after sharing")
    parser.add_argument("--bits", type=int, default=32)
    parser.add_argument("--authenticated", action="store_true")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="time phases in wall-clock seconds, or in CPU seconds of this process (steadier "
                             "on a shared machine); the whole round is reported both ways")
    parser.add_argument("--compare-flower", action="store_true",
                        help="also run Flower's SecAgg+ (needs flwr: pip install 'secfedtl[flower]') on the same "
                             "inputs in this process and report both sides")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _config(args: argparse.Namespace) -> SecAggConfig:
    extra = {"bits": args.bits, "authenticated": args.authenticated}
    if args.threshold is None and args.neighbours is None:
        return SecAggConfig.recommended(num_clients=args.clients, dropout_rate=max(args.dropout, 0.01), **extra)
    degree = args.clients - 1 if args.neighbours is None else args.neighbours
    threshold = args.threshold if args.threshold is not None else degree // 2 + 1
    return SecAggConfig(num_clients=args.clients, threshold=threshold, neighbours=args.neighbours, **extra)


def keystream_rate(num_bytes: int = 64 << 20) -> float:
    """Measured AES-128-CTR keystream throughput on this machine, in bytes per second: the
    mask PRG's (:mod:`secfedtl.crypto.prg`) speed limit, best of three."""
    encryptor = Cipher(algorithms.AES(prg_key(bytes(32))), modes.CTR(bytes(16))).encryptor()
    zeros = memoryview(bytes(CHUNK_BYTES))
    scratch = bytearray(CHUNK_BYTES + 16)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(num_bytes // CHUNK_BYTES):
            encryptor.update_into(zeros, scratch)
        best = min(best, time.perf_counter() - t0)
    return num_bytes / best


def run(args: argparse.Namespace) -> dict:
    if args.params < 1 or args.clients < 3 or not 0 <= args.dropout < 1:
        raise ConfigError("need --params >= 1, --clients >= 3 and 0 <= --dropout < 1")
    cfg = _config(args)
    compare = getattr(args, "compare_flower", False)
    flower = _import_flower() if compare else None
    rng = np.random.default_rng(0)
    floats = [rng.uniform(-cfg.clip, cfg.clip, args.params) for _ in range(args.clients)]
    vectors = [cfg.encoding.encode(x, rng=rng) for x in floats]
    floats = floats if compare else None  # float64: Flower quantises in its input's dtype
    params = SessionParams(config=cfg, session_id=os.urandom(16), round=0, vector_length=args.params + 1)
    clients, server = build_sessions(params, vectors)
    num_dropped = int(round(args.dropout * args.clients))
    dropouts = {i: "mask" for i in range(num_dropped)}
    load_before = os.getloadavg()
    t0, cpu0 = time.perf_counter(), time.process_time()
    clock = CLOCKS[getattr(args, "clock", "wall")]
    outcome = drive_round(clients, server, dropouts=dropouts, clock=clock)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    tm = outcome.timings
    total = lambda key: float(sum(tm.get(key, [])))  # noqa: E731
    masking = tm.get("client:mask", [])
    rate = keystream_rate()
    words_per_mask = args.params + 1
    limit = (cfg.degree + 1) * words_per_mask * np.dtype(params.dtype).itemsize / rate
    report = {
        "clients": args.clients, "params": args.params, "neighbours": cfg.degree, "threshold": cfg.threshold,
        "full_graph": cfg.full_graph, "dropped": num_dropped, "included": len(outcome.result.included),
        "bits": cfg.bits, "authenticated": cfg.authenticated,
        "setup_s": total("client:advertise") + total("client:share"),
        "mask_per_client_s": float(np.mean(masking)) if masking else 0.0,
        "server_intake_s": total("server:receive:mask"),
        "unmask_s": total("server:advance:unmask"),
        "server_total_s": sum(total(k) for k in tm if k.startswith("server:")),
        "round_wall_s": wall,
        "round_cpu_s": cpu,
        "wire_bytes": outcome.wire_bytes,
        "clock": getattr(args, "clock", "wall"),
        "keystream_gb_per_s": rate / 1e9,
        "mask_keystream_limit_s": limit,
    }
    report["mask_ratio_to_limit"] = report["mask_per_client_s"] / limit
    report["sum_correct"] = _sum_is_exact(outcome.result, cfg, vectors)
    del vectors
    if flower is not None:
        report["flower"] = flower.run_secaggplus(
            floats, num_shares=flower.flower_num_shares(cfg.degree, args.clients), threshold=cfg.threshold,
            num_dropped=num_dropped, clipping_range=cfg.clip, modulus_bits=cfg.bits, clock=clock)
        theirs = report["flower"]
        report["flower_over_secfedtl"] = {key: theirs[key] / report[key] for key in COMPARED if report[key] > 0}
    report["machine"] = {"cpus": os.cpu_count(), "load_average_1m_before": load_before[0],
                         "load_average_1m_after": os.getloadavg()[0]}
    return report


def _sum_is_exact(result, cfg: SecAggConfig, vectors: list[np.ndarray]) -> bool:  # noqa: ANN001
    """Whether the unmasked field sum is exactly the included clients' encoded inputs, summed."""
    expected = np.zeros_like(result.field_sum)
    for i in result.included:
        expected += vectors[i]
        cfg.encoding.reduce(expected)
    return bool(np.array_equal(expected, result.field_sum))


def _import_flower():  # noqa: ANN202
    try:
        from secfedtl.bench import flower_secaggplus
    except ImportError as exc:
        raise ConfigError(f"--compare-flower needs flwr (pip install 'secfedtl[flower]'): {exc}") from None
    return flower_secaggplus


def main(args: argparse.Namespace) -> int:
    report = run(args)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return 0
    graph = "complete graph" if report["full_graph"] else f"SecAgg+ k={report['neighbours']}"
    print(f"secure aggregation: {report['clients']} clients, {report['params']:,} params, {graph}, "
          f"t={report['threshold']}, {report['dropped']} dropped, {report['bits']} bits, "
          f"{'authenticated' if report['authenticated'] else 'not authenticated'}; phases in "
          f"{'CPU' if report['clock'] == 'cpu' else 'wall-clock'} seconds")
    rows = [
        ("key + share set-up, all clients", report["setup_s"]),
        ("masking, per client", report["mask_per_client_s"]),
        ("server intake of masked inputs", report["server_intake_s"]),
        ("server unmasking", report["unmask_s"]),
        ("whole round, wall clock (clients sequential)", report["round_wall_s"]),
        ("whole round, CPU time of this process", report["round_cpu_s"]),
    ]
    for name, seconds in rows:
        print(f"  {name:<46} {seconds:9.4f} s")
    print(f"  AES-128-CTR keystream: {report['keystream_gb_per_s']:.2f} GB/s; masking = "
          f"{report['mask_ratio_to_limit']:.2f}x the keystream limit ({report['mask_keystream_limit_s'] * 1e3:.1f} ms)")
    print(f"  sum exact: {report['sum_correct']}")
    if "flower" in report:
        fl, ratio = report["flower"], report["flower_over_secfedtl"]
        print(f"Flower {fl['flwr_version']} SecAgg+, same inputs, this process: num_shares={fl['num_shares']} "
              f"({fl['neighbours']} neighbours), t={fl['threshold']}, {fl['dropped']} dropped, "
              f"modulus 2^{fl['modulus_range'].bit_length() - 1}, not authenticated")
        flower_rows = [
            ("key + share set-up, all clients", "setup_s"),
            ("masking, per client", "mask_per_client_s"),
            ("server intake of masked inputs", "server_intake_s"),
            ("server unmasking", "unmask_s"),
            ("whole round, wall clock (clients sequential)", "round_wall_s"),
            ("whole round, CPU time of this process", "round_cpu_s"),
        ]
        for name, key in flower_rows:
            times = f"  ({ratio[key]:.1f}x secfedtl)" if key in ratio else ""
            print(f"  {name:<46} {fl[key]:9.4f} s{times}")
        print(f"  mean within quantisation bound: {fl['sum_correct']}")
    return 0
