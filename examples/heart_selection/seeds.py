"""Run a heart job config for several seeds and summarise (mean ± sd) what docs/results.md reports.

    PYTHONPATH=. python examples/heart_selection/seeds.py [CONFIG.toml] --seeds 0 1 2 3 4 --out runs/seeds

Without CONFIG the bundled default (what `secfedtl demo --seed S` runs). Writes summary.json and
prints a table; every run's own metrics.json, ledger and report.png stay in OUT/seed-S.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from secfedtl.runtime.job import JobConfig, run_job


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config", nargs="?", type=Path, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", type=Path, default=Path("runs/seeds"))
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        data = JobConfig.load(args.config).to_dict()
        data["job"]["seed"] = seed
        out = args.out / f"seed-{seed}"
        shutil.rmtree(out, ignore_errors=True)
        metrics = run_job(JobConfig.from_mapping(data), out, progress=False)
        final = metrics["final"]
        row = {"seed": seed, "source": metrics["source"]["pooled_test_accuracy"],
               "source_per": metrics["source"]["test_accuracy"],
               "federated": final["pooled_test_accuracy"], "federated_per": final["per_client_test_accuracy"],
               "personalised_per": final["personalised_test_accuracy"],
               "validation": metrics["rounds"][-1]["pooled_validation_accuracy"],
               "epsilon": max(final["epsilon"].values()), "epsilon_prv": max(final["epsilon_prv"].values()),
               "wall_seconds": metrics["wall_seconds"]}
        if metrics.get("selection"):
            row["selected"] = metrics["selection"]["index"]
        # personalised models, pooled over the hospitals' test splits
        sizes = {"hungary": 89, "switzerland": 16, "va": 45}
        pers = final["personalised_test_accuracy"]
        if pers and set(pers) == set(sizes):
            row["personalised"] = sum(round(pers[n] * sizes[n]) for n in sizes) / sum(sizes.values())
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("_per")}), flush=True)

    def stat(key: str, sub: str | None = None) -> str:
        vals = [r[key][sub] if sub else r[key] for r in rows if key in r and (sub is None or sub in r[key])]
        return f"{np.mean(vals):.3f} ± {np.std(vals, ddof=1):.3f}" if len(vals) > 1 else "-"

    summary = {"seeds": args.seeds, "runs": rows,
               "pooled": {k: stat(k) for k in ("source", "federated", "personalised", "validation")},
               "per_hospital": {n: {k: stat(k + "_per", n) for k in ("source", "federated", "personalised")}
                                for n in ("hungary", "switzerland", "va")},
               "max_epsilon": max(r["epsilon"] for r in rows), "max_epsilon_prv": max(r["epsilon_prv"] for r in rows)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
