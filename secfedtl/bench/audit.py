"""`secfedtl bench audit`: repeated empirical audits of the correct pipeline (false alarms, tightness).

Each run is one `secfedtl audit-run` (fresh canary coins from ``os.urandom``, a throwaway privacy
state) of the heart job at the given epsilon; the bench prints every run's lower bound and the
ledger's epsilon, the number of violations (false alarms: the pipeline is believed correct) and the
ratio lower bound / ledger epsilon. Never part of the tests.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, help="job TOML (default: the bundled heart job)")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--epsilon", type=float, default=None, help="override [privacy] epsilon")
    parser.add_argument("--canaries", type=int, default=None,
                        help="default: as `secfedtl audit-run` (1000 white-box, one per sign-following feature "
                             "for the server, 32 server-replicas)")
    parser.add_argument("--client", default=None)
    parser.add_argument("--adversary", choices=("whitebox", "server", "server-replicas"), default="whitebox")
    parser.add_argument("--rounds", type=int, default=None, help="override [job] rounds")
    parser.add_argument("--baseline", action="store_true", help="also time one run without canaries")
    parser.add_argument("--json", type=Path, default=None, help="write every run's numbers here")


def main(args: argparse.Namespace) -> int:
    from secfedtl.jobs.audit_run import run_audit, run_replica_audit
    from secfedtl.jobs.heart import HeartConfig

    config = HeartConfig.load(args.config).updated({("privacy", "epsilon"): args.epsilon, ("job", "rounds"): args.rounds})
    rows: list[dict[str, Any]] = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            if args.adversary == "server-replicas":
                r = run_replica_audit(config, Path(tmp), canaries=args.canaries, client=args.client)
            else:
                r = run_audit(config, Path(tmp), canaries=args.canaries, client=args.client, adversary=args.adversary,
                              baseline=args.baseline and i == 0)
            g = r["fdp_gaussian"]
            row = {"run": i, "canaries": r["canaries"], "lower": r["bound"]["epsilon_lower"], "ledger": r["ledger_epsilon"],
                   "fdp_mu": g["mu_lower"], "fdp_epsilon": g["epsilon_lower"], "fdp_ratio": g["ratio"],
                   "fdp_above_ledger": bool(g["epsilon_lower"] > r["ledger_epsilon"]),
                   "ledger_prv": r["ledger_epsilon_prv"], "violation": r["violation"], "ratio": r["ratio"],
                   "k": r["bound"]["k_plus"], "correct": r["bound"]["correct"], "guesses": r["bound"]["guesses"],
                   "scorer": r["scorer"], "seconds": time.perf_counter() - t, "cpu_seconds": r["cpu_seconds"],
                   "pooled_test_accuracy": r["pooled_test_accuracy"]}
            if "baseline" in r:
                row["baseline"] = r["baseline"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    lows = [r["lower"] for r in rows]
    fdp = [r["fdp_epsilon"] for r in rows]
    prv = rows[0]["ledger_prv"]
    print(f"{len(rows)} runs, {args.adversary}, {rows[0]['canaries']} canaries: violations {sum(r['violation'] for r in rows)}; "
          f"(epsilon, delta) lower bound median {statistics.median(lows):.4f}, max {max(lows):.4f}; "
          f"f-DP (Gaussian) epsilon median {statistics.median(fdp):.4f}, max {max(fdp):.4f} "
          f"({sum(r['fdp_above_ledger'] for r in rows)} above the ledger); ledger epsilon {rows[0]['ledger']:.4f}"
          + (f" (prv {prv:.4f})" if prv is not None else "")
          + f"; ratio median {statistics.median(r['ratio'] for r in rows):.3f}, max {max(r['ratio'] for r in rows):.3f}; "
          f"f-DP ratio median {statistics.median(r['fdp_ratio'] for r in rows):.3f}")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return 0
