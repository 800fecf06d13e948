"""Local vs distributed noise on the heart job, at the same epsilon (docs/results.md, "Distributed noise").

For each job seed S and each setting, one in-process run of the bundled heart job
(secfedtl/configs/heart.toml) with ``personalise = false`` (a distributed-noise job has no local
personalisation round, so both sides spend the whole budget on federated training), in a fresh
privacy state. Both modes use settings chosen by the same search on public data
(examples/heart_selection/tune_on_source.py with ``--label-shift``, over the same settings, the
source model fixed): distributed runs the bundled secfedtl/configs/heart_distributed.toml
(``--noise distributed``; tuned_distributed.json), local runs heart.toml with the chosen values of
``--side-by-side`` (tuned_local.json). ``--local-settings bundled`` runs heart.toml as shipped
(tuned without the label-shift prior, with personalisation). Reports the pooled test accuracy of
the source model and of the federated model
(``simulation_only``: computed by the experimenter of the simulation, outside the protocol), each
hospital's epsilon recomputed from its ledger by ``secfedtl audit``, and for distributed runs the
secure-aggregation seconds per DP step.

    PYTHONPATH=. python examples/heart_distributed/compare.py --seeds 0 1 2 3 4 --out runs/heart-distributed
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from tqdm import tqdm

from secfedtl.jobs.heart import HeartConfig, run_job
from secfedtl.privacy.audit import audit_ledger


def settings(args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = [("local", {})]
    for bits in args.bits:
        for c in args.colluders:
            out.append((f"distributed b={bits} c={c}", {"noise": "distributed", "colluders": c, "bits": bits}))
    return out


HERE = Path(__file__).parent


def overrides(path: str) -> dict[str, dict[str, Any]]:
    """The ``chosen`` settings of a tune_on_source.py output (``bundled``: no overrides)."""
    if path == "bundled":
        return {}
    return json.loads(Path(path).read_text(encoding="utf-8"))["chosen"]


def run_one(seed: int, extra: dict[str, Any], epsilon: float, *,
            local: dict[str, dict[str, Any]] | None = None,
            distributed: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    if extra.get("noise") == "distributed":
        data = HeartConfig.load_bundled("heart_distributed.toml").to_dict()
        for section, values in (distributed or {}).items():
            data[section].update(values)
    else:
        data = HeartConfig.load(None).to_dict()
        for section, values in (local or {}).items():
            data[section].update(values)
    data["job"]["seed"] = seed
    data["privacy"].update(epsilon=epsilon, personalise=False)
    bits = extra.pop("bits", None)
    if bits is not None:
        data["secagg"]["bits"] = bits
    data["privacy"].update(extra)
    config = HeartConfig.from_mapping(data)
    with tempfile.TemporaryDirectory() as tmp:
        metrics = run_job(config, Path(tmp) / "out", progress=False, state_dir=Path(tmp) / "state")
        sim = metrics["simulation_only"]
        audited = {n: audit_ledger(Path(p)).client(n).epsilon for n, p in sim["ledgers"].items()}
    rounds = metrics["server"]["rounds"]
    steps = sum(r.get("steps", 0) for r in rounds)
    secagg = sum(r["times"]["secure_aggregation"] for r in rounds)
    task = sum(r["times"]["task_phase"] for r in rounds)
    return {"seed": seed, "source": sim["source"]["pooled_test_accuracy"],
            "federated": sim["final"]["pooled_test_accuracy"], "epsilon_audit": audited,
            "rounds_ok": sum(r["status"] == "ok" for r in rounds), "steps": steps,
            "steps_ok": sum(r.get("steps_ok", 0) for r in rounds),
            "secagg_seconds_per_step": secagg / steps if steps else None,
            "task_seconds_per_step": task / steps if steps else None,
            "wire_bytes_per_step": sum(r["wire_bytes"] for r in rounds) / steps if steps else None,
            "wall_seconds": metrics["wall_seconds"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epsilon", type=float, default=1.0)
    parser.add_argument("--bits", type=int, nargs="+", default=[32])
    parser.add_argument("--colluders", type=int, nargs="+", default=[0])
    parser.add_argument("--local-settings", default=str(HERE / "tuned_local.json"),
                        help="tune_on_source.py output whose chosen settings local runs use "
                             "('bundled': heart.toml's own; default: tuned_local.json)")
    parser.add_argument("--distributed-settings", default="bundled",
                        help="tune_on_source.py output whose chosen settings distributed runs use over "
                             "heart_distributed.toml (default 'bundled': the file as shipped)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    local, distributed = overrides(args.local_settings), overrides(args.distributed_settings)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict[str, Any]]] = {}
    jobs = [(name, extra, s) for name, extra in settings(args) for s in args.seeds]
    for name, extra, seed in tqdm(jobs, desc="runs", file=sys.stderr):
        results.setdefault(name, []).append(run_one(seed, dict(extra), args.epsilon, local=local, distributed=distributed))
        (args.out / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    for name, runs in results.items():
        fed = [r["federated"] for r in runs]
        src = [r["source"] for r in runs]
        eps = max(max(r["epsilon_audit"].values()) for r in runs)
        sd = statistics.stdev(fed) if len(fed) > 1 else 0.0
        per_step = [r["secagg_seconds_per_step"] for r in runs if r["secagg_seconds_per_step"] is not None]
        print(f"{name:<26} source {statistics.mean(src):.3f}  federated {statistics.mean(fed):.3f} ± {sd:.3f}  "
              f"runs {', '.join(f'{v:.3f}' for v in fed)}  max eps {eps:.3f}"
              + (f"  secagg s/step {statistics.mean(per_step):.3f}" if per_step else ""))
    _plot(results, args.out / "compare.png")
    return 0


def _plot(results: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(results)
    for k, name in enumerate(names):
        fed = [r["federated"] for r in results[name]]
        src = [r["source"] for r in results[name]]
        ax.scatter([k] * len(fed), fed, color="C0", label="federated" if k == 0 else None)
        ax.scatter([k + 0.15] * len(src), src, color="C1", marker="x", label="source" if k == 0 else None)
    ax.set_xticks(range(len(names)), names, rotation=15, fontsize=8)
    ax.set_ylabel("pooled test accuracy")
    ax.set_title("heart job, epsilon 1: local vs distributed noise")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
