"""Plot pieces shared by the jobs' and examples' ``report.png``."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["plot_epsilon_per_round"]


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
