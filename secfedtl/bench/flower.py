"""`secfedtl bench flower`: per-round cost of running a job over Flower vs in process.

``--simulation`` adds a third run on Flower's simulation engine.

Runs the same job (the bundled heart job unless a TOML is given; personalisation off, the same
seed) twice on this machine: in process (``LocalPool``, every client in this process) and on a
local Flower deployment (:func:`secfedtl.runtime.deploy.run_local`: a SuperLink, one SuperNode
and one node agent per hospital on 127.0.0.1, insecure mode). For each round it compares the
server's wall clock of the ``task`` phase (local DP training included) and of the five
secure-aggregation phases, and reports the Flower overhead per round and per message round
(exchange). Writes ``bench.json`` and ``flower_overhead.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from secfedtl.errors import ConfigError


def _phase_seconds(progress: Path) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for line in progress.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if not row["phase"].endswith(":start"):
            out.setdefault(row["phase"], []).append(float(row["seconds"]))
    return out


def _per_round(rounds: list[dict[str, Any]]) -> list[dict[str, float]]:
    return [{"task": r["times"]["task_phase"], "secure_aggregation": r["times"]["secure_aggregation"],
             "round": r["times"]["task_phase"] + r["times"]["secure_aggregation"] + r["times"]["aggregation"]}
            for r in rounds]


def run_prekeyed_comparison(config_path: Path | None, rounds: int, out: Path) -> dict[str, Any]:
    """A distributed-noise job on Flower twice in one run: its steps pre-keyed (``[secagg]
    prekeyed = true``, ``2 + 3T`` exchanges a round) and one full session per step (``false``,
    ``6T``); per step, the server's wall clock of the task and of secure aggregation."""
    from secfedtl.runtime.deploy import run_local
    from secfedtl.jobs.heart import HeartConfig

    report: dict[str, Any] = {"rounds": rounds}
    for prekeyed in (True, False):
        data = HeartConfig.load(config_path).to_dict()
        if data["privacy"].get("noise", "local") != "distributed":
            raise ConfigError("--prekeyed-vs-full compares the steps of a distributed-noise job ([privacy] noise)")
        data["job"]["rounds"] = rounds
        data["job"]["workers"] = 0
        data["secagg"]["prekeyed"] = prekeyed
        config = HeartConfig.from_mapping(data)
        folder = out / ("prekeyed" if prekeyed else "full-sessions")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "job.toml").write_text(config.to_toml(), encoding="utf-8")
        t0 = time.perf_counter()
        metrics = run_local(folder / "job.toml", folder / "flower", simulation=False)
        wall = time.perf_counter() - t0
        rows = metrics["server"]["rounds"]
        steps = sum(r["steps"] for r in rows)
        report["prekeyed" if prekeyed else "full_sessions"] = {
            "steps": steps, "steps_ok": sum(r["steps_ok"] for r in rows), "wall_seconds": wall,
            "task_seconds_per_step": sum(r["times"]["task_phase"] for r in rows) / steps,
            "secure_aggregation_seconds_per_step": sum(r["times"]["secure_aggregation"] for r in rows) / steps,
            "step_seconds": sum(r["times"]["task_phase"] + r["times"]["secure_aggregation"] for r in rows) / steps,
            "wire_bytes_per_step": sum(r["wire_bytes"] for r in rows) / steps,
            "exchanges": len([line for line in (folder / "flower" / "server" / "progress.jsonl").read_text(
                encoding="utf-8").splitlines() if not json.loads(line)["phase"].endswith(":start")]),
        }
    (out / "bench.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report


def run_bench(config_path: Path | None, rounds: int, out: Path, *, simulation: bool = False) -> dict[str, Any]:
    from secfedtl.runtime.deploy import run_local
    from secfedtl.jobs.heart import HeartConfig, run_job

    data = HeartConfig.load(config_path).to_dict()
    data["job"]["rounds"] = rounds
    data["job"]["workers"] = 0
    data["privacy"]["personalise"] = False
    config = HeartConfig.from_mapping(data)
    out.mkdir(parents=True, exist_ok=True)
    job = out / "job.toml"
    job.write_text(config.to_toml(), encoding="utf-8")
    t0 = time.perf_counter()
    # A bench is not a hospital: throwaway privacy states inside the bench's folder.
    local = run_job(config, out / "in-process", progress=False, state_dir=out / "in-process" / "privacy-state")
    local_wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    flower = run_local(job, out / "flower", simulation=False)
    flower_wall = time.perf_counter() - t0
    a, b = _per_round(local["server"]["rounds"]), _per_round(flower["server"]["rounds"])
    exchanges = _phase_seconds(out / "flower" / "server" / "progress.jsonl")
    report: dict[str, Any] = {
        "rounds": rounds, "clients": len(config["job"]["clients"]),
        "in_process": {"per_round": a, "wall_seconds": local_wall},
        "flower": {"per_round": b, "wall_seconds": flower_wall,
                   "exchange_seconds": {k: statistics.median(v) for k, v in exchanges.items()}},
        "overhead_per_round_seconds": [y["round"] - x["round"] for x, y in zip(a, b)],
        "median_round_seconds": {"in_process": statistics.median(x["round"] for x in a),
                                 "flower": statistics.median(y["round"] for y in b)},
    }
    if simulation:
        t0 = time.perf_counter()
        sim = run_local(job, out / "simulation", simulation=True)
        c = _per_round(sim["server"]["rounds"])
        report["simulation"] = {"per_round": c, "wall_seconds": time.perf_counter() - t0}
        report["median_round_seconds"]["simulation"] = statistics.median(z["round"] for z in c)
    (out / "bench.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    _plot(report, out / "flower_overhead.png")
    return report


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, b = report["in_process"]["per_round"], report["flower"]["per_round"]
    xs = list(range(1, len(a) + 1))
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.38
    ax.bar([x - width / 2 for x in xs], [r["task"] for r in a], width, label="in process: task (training)")
    ax.bar([x - width / 2 for x in xs], [r["secure_aggregation"] for r in a], width, bottom=[r["task"] for r in a],
           label="in process: secure aggregation")
    ax.bar([x + width / 2 for x in xs], [r["task"] for r in b], width, label="Flower: task (training)")
    ax.bar([x + width / 2 for x in xs], [r["secure_aggregation"] for r in b], width, bottom=[r["task"] for r in b],
           label="Flower: secure aggregation (5 message rounds)")
    ax.set_xticks(xs)
    ax.set_xlabel("round")
    ax.set_ylabel("server wall clock per round (s)")
    ax.set_title(f"{report['clients']} hospitals: Flower 1.41 (local deployment) vs in process")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, nargs="?", default=None, help="job TOML (default: the heart job)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="default: a new temporary directory")
    parser.add_argument("--simulation", action="store_true",
                        help="also run on Flower's simulation engine (needs secfedtl[flower-sim])")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--prekeyed-vs-full", action="store_true",
                        help="distributed-noise job only: Flower twice, pre-keyed steps against one full session "
                             "per step (docs/protocol.md, \"Pre-keyed steps\"); no in-process run")


def main(args: argparse.Namespace) -> int:
    if args.rounds < 1:
        raise ConfigError("--rounds must be >= 1")
    out = args.out or Path(tempfile.mkdtemp(prefix="secfedtl-bench-flower-"))
    if args.prekeyed_vs_full:
        report = run_prekeyed_comparison(args.config, args.rounds, out)
        print(json.dumps(report, indent=None if args.json else 1, sort_keys=True))
        return 0
    report = run_bench(args.config, args.rounds, out, simulation=args.simulation)
    if args.json:
        print(json.dumps(report, sort_keys=True))
        return 0
    m = report["median_round_seconds"]
    print(f"{report['clients']} hospitals, {report['rounds']} rounds (server wall clock per round, median)")
    print(f"  in process: {m['in_process']:.2f} s    Flower: {m['flower']:.2f} s    "
          f"overhead: {m['flower'] - m['in_process']:.2f} s per round")
    if "simulation" in m:
        print(f"  Flower simulation engine: {m['simulation']:.2f} s")
    for phase, sec in sorted(report["flower"]["exchange_seconds"].items()):
        print(f"  Flower message round '{phase}': {sec:.2f} s (median)")
    print(f"wrote {out / 'bench.json'} and {out / 'flower_overhead.png'}", file=sys.stderr)
    return 0
