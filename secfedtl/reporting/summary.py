"""The summary table a job prints at the end of a run."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["print_summary"]


def print_summary(metrics: Mapping[str, Any]) -> None:
    """Print what a run's ``metrics.json`` says: the simulation's per-hospital table, or (no
    experimenter: Flower, a deployment) the round statuses."""
    sim = metrics.get("simulation_only")
    if sim is None:
        statuses = [r["status"] for r in metrics["server"]["rounds"]]
        print(f"\nrounds: {statuses}; personalisation: {metrics['server']['personalisation']}")
        print("accuracy and epsilon stay at the hospitals: read each hospital's local report and "
              "`secfedtl audit` its ledger")
        return
    final = sim["final"]
    src = sim["source"]["test_accuracy"]
    print("\n(simulation only: computed outside the protocol by whoever holds every dataset)")
    print(f"{'hospital':<14}{'source':>9}{'federated':>11}{'personalised':>14}{'epsilon':>10}")
    for name, acc in final["per_client_test_accuracy"].items():
        pers = final["personalised_test_accuracy"].get(name)
        pers_s = f"{pers:.3f}" if pers is not None else "-"
        print(f"{name:<14}{src[name]:>9.3f}{acc:>11.3f}{pers_s:>14}{final['epsilon'][name]:>10.3f}")
    pooled_pers = final.get("personalised_pooled_test_accuracy")
    pooled_pers_s = f"{pooled_pers:.3f}" if pooled_pers is not None else "-"
    src_pooled, fed_pooled = sim["source"]["pooled_test_accuracy"], final["pooled_test_accuracy"]
    print(f"{'pooled':<14}{'-' if src_pooled is None else f'{src_pooled:.3f}':>9}"
          f"{'-' if fed_pooled is None else f'{fed_pooled:.3f}':>11}{pooled_pers_s:>14}")
    sel = metrics["server"].get("selection")
    if sel:
        chosen = sel["candidates"][sel["index"]]
        print(f"source selected with DP (epsilon {sel['epsilon']:g} of the budget; {sel['status']}): "
              f"candidate {sel['index']} {chosen}")
    print(f"delta = {metrics['delta']:g}; epsilon budget {metrics['epsilon_budget']:g} per hospital; "
          f"{metrics['wall_seconds']:.1f} s")
