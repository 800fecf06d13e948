"""Run a heart job config for several seeds, or summarise finished runs, as docs/results.md reports them.

    PYTHONPATH=. python examples/heart_selection/seeds.py [CONFIG.toml] --seeds 0 1 2 3 4 --out runs/seeds
    PYTHONPATH=. python examples/heart_selection/seeds.py --summarise runs/demo-0 runs/demo-1 ...

The first form runs CONFIG (default: the bundled heart.toml, what `secfedtl demo --seed S` runs)
once per seed into OUT/seed-S, each with a fresh privacy state in OUT/seed-S/privacy-state (a
spent budget would refuse the next seed otherwise). The second summarises runs already made (for
instance by `secfedtl demo --seed S --out runs/demo-S`).

For every run it reads metrics.json's ``simulation_only`` section (test accuracy computed by the
experimenter of the simulation, who holds every dataset; nothing of it crossed the wire) and
recomputes each hospital's epsilon from its ledger with ``secfedtl audit LEDGER --json`` (RDP and
PRV). It prints mean ± standard deviation and writes OUT/summary.json. It chooses nothing: it only
reports test accuracy of a configuration that was fixed beforehand.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

HOSPITALS = ("hungary", "switzerland", "va")


def audit(ledger: str) -> dict[str, Any]:
    """``secfedtl audit LEDGER --json`` (the auditor's command), parsed."""
    out = subprocess.run([sys.executable, "-c", "import sys; from secfedtl.cli import main; sys.exit(main())",
                          "audit", ledger, "--json"], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"secfedtl audit {ledger} failed ({out.returncode}): {out.stderr or out.stdout}")
    return json.loads(out.stdout)


def summarise_run(run: Path) -> dict[str, Any]:
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    sim = metrics["simulation_only"]
    final = sim["final"]
    eps: dict[str, dict[str, float]] = {}
    certified = True
    for name, ledger in sim["ledgers"].items():
        report = audit(ledger)
        certified = certified and bool(report["certified"])
        eps[name] = report["clients"][name]["epsilon_by_accountant"]
    row: dict[str, Any] = {
        "run": str(run), "seed": json.loads((run / "config.json").read_text(encoding="utf-8"))["job"]["seed"],
        "source": sim["source"]["pooled_test_accuracy"], "federated": final["pooled_test_accuracy"],
        "personalised": final["personalised_pooled_test_accuracy"],
        "source_per": sim["source"]["test_accuracy"], "federated_per": final["per_client_test_accuracy"],
        "personalised_per": final["personalised_test_accuracy"],
        "epsilon_rdp": {n: e["rdp"] for n, e in eps.items()}, "epsilon_prv": {n: e["prv"] for n, e in eps.items()},
        "max_epsilon_rdp": max(e["rdp"] for e in eps.values()), "max_epsilon_prv": max(e["prv"] for e in eps.values()),
        "certified": certified, "wall_seconds": metrics["wall_seconds"],
    }
    if metrics["server"].get("selection"):
        row["selected"] = metrics["server"]["selection"]["index"]
    return row


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def stat(key: str, sub: str | None = None) -> str:
        vals = [r[key][sub] if sub else r[key] for r in rows
                if r.get(key) is not None and (sub is None or sub in r[key])]
        return f"{np.mean(vals):.3f} ± {np.std(vals, ddof=1):.3f}" if len(vals) > 1 else "-"

    return {"runs": rows,
            "pooled": {k: stat(k) for k in ("source", "federated", "personalised")},
            "pooled_values": {k: [round(r[k], 3) if r[k] is not None else None for r in rows]
                              for k in ("source", "federated", "personalised")},
            "per_hospital": {n: {k: stat(k + "_per", n) for k in ("source", "federated", "personalised")}
                             for n in HOSPITALS},
            "max_epsilon_per_hospital_rdp": {n: max(r["epsilon_rdp"][n] for r in rows) for n in HOSPITALS},
            "max_epsilon_per_hospital_prv": {n: max(r["epsilon_prv"][n] for r in rows) for n in HOSPITALS},
            "all_certified": all(r["certified"] for r in rows)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config", nargs="?", type=Path, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", type=Path, default=Path("runs/seeds"))
    parser.add_argument("--summarise", type=Path, nargs="+", default=None, metavar="RUN",
                        help="summarise these finished runs instead of running")
    args = parser.parse_args()
    if args.summarise:
        runs = list(args.summarise)
    else:
        from secfedtl.jobs.heart import HeartConfig, run_job

        runs = []
        for seed in args.seeds:
            data = HeartConfig.load(args.config).to_dict()
            data["job"]["seed"] = seed
            out = args.out / f"seed-{seed}"
            shutil.rmtree(out, ignore_errors=True)
            run_job(HeartConfig.from_mapping(data), out, progress=False, state_dir=out / "privacy-state")
            runs.append(out)
    rows = []
    for run in runs:
        row = summarise_run(run)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("_per")}), flush=True)
    result = summary(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
