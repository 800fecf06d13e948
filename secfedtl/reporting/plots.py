"""Plots of a job's results (``report.png``), drawn from plain metrics dicts: this package knows
no model, transport or job."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["plot_epsilon_per_round", "plot_job_report"]


def _or_nan(value: float | None) -> float:
    """A pooled accuracy for plotting: ``None`` (no hospital scored that split) is a gap."""
    return math.nan if value is None else value


def plot_epsilon_per_round(ax: Any, rounds: Sequence[Mapping[str, Any]], *, clients: Iterable[str], budget: float,
                           accountant: str, delta: float, ticks: Sequence[int] | None = None,
                           label_clients: bool = True, title: str = "Privacy spent per hospital") -> None:
    """Epsilon spent after each round, one line per client, and the budget as a dashed line, on
    the matplotlib axes ``ax``. ``rounds`` are rows with ``"round"`` (0-based) and ``"epsilon"``
    (client -> epsilon; a client missing from a row is a gap). With many clients,
    ``label_clients=False`` draws thin unlabelled lines and the legend names only the budget."""
    xs = [r["round"] + 1 for r in rounds]
    for name in clients:
        ys = [r["epsilon"].get(name, math.nan) for r in rounds]
        if label_clients:
            ax.plot(xs, ys, marker="o", label=name)
        else:
            ax.plot(xs, ys, marker=".", linewidth=0.8)
    ax.axhline(budget, color="red", linestyle="--", label="budget")
    ax.set_xticks(xs if ticks is None else ticks)
    ax.set_xlabel("round")
    ax.set_ylabel(f"epsilon ({accountant.upper()}, delta={delta:g})")
    ax.set_title(title)
    ax.legend(fontsize=8)


def plot_job_report(metrics: Mapping[str, Any], path: Any) -> None:
    """The ``report.png`` of a simulated job (``metrics`` of
    :func:`~secfedtl.federated.run.run_federation` with ``simulation_only``): the global model's
    test score per hospital and pooled after each round, and the epsilon each hospital spent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sim = metrics["simulation_only"]
    rows = sim["rounds"]
    xs = [r["round"] + 1 for r in rows]
    ticks = xs if len(xs) <= 15 else [x for x in xs if x == 1 or x % 5 == 0]
    labels = [str(x) for x in ticks]
    # The personalisation round spends epsilon after the last federated round: one more point
    # (the final epsilon, which the summary table prints), at "pers.".
    eps_rows = rows
    if metrics["server"].get("personalisation"):
        x_pers = (xs[-1] if xs else 0) + 1
        eps_rows = [*rows, {"round": x_pers - 1, "epsilon": sim["final"]["epsilon"]}]
        ticks, labels = [*ticks, x_pers], [*labels, "pers."]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    many = len(sim["final"]["per_client_test_accuracy"]) > 8
    for name in sim["final"]["per_client_test_accuracy"]:
        ax1.plot(xs, [r["test_accuracy"].get(name, math.nan) for r in rows], marker="." if many else "o",
                 linewidth=0.8 if many else 1.5, label=None if many else name)
    ax1.plot(xs, [_or_nan(r["pooled_test_accuracy"]) for r in rows], color="black", linewidth=2, label="pooled")
    if sim["final"].get("personalised_pooled_test_accuracy") is not None and labels and labels[-1] == "pers.":
        ax1.plot([ticks[-1]], [sim["final"]["personalised_pooled_test_accuracy"]], color="black", marker="*",
                 markersize=12, linestyle="none", label="personalised (pooled)")
    if sim["source"]["pooled_test_accuracy"] is not None:
        ax1.axhline(sim["source"]["pooled_test_accuracy"], color="grey", linestyle="--", label="source (pooled)")
    ax1.set_xticks(ticks, labels=labels)
    ax1.set_xlabel("round")
    ax1.set_ylabel("test accuracy")
    ax1.set_title("Global model accuracy per round (simulation only)")
    ax1.legend(fontsize=8)
    plot_epsilon_per_round(ax2, eps_rows, clients=sim["final"]["epsilon"], budget=metrics["epsilon_budget"],
                           accountant=metrics["accountant"], delta=metrics["delta"], label_clients=not many)
    ax2.set_xticks(ticks, labels=labels)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
