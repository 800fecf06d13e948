"""Per-client privacy budgets, and a guard that charges them through the ledger.

:class:`PrivacyBudget` holds one client's (epsilon, delta) budget and an accountant with every
event spent so far. It checks first and changes state second: :meth:`PrivacyBudget.check`
raises :class:`PrivacyBudgetExceeded` before anything is composed, trained or recorded.

:class:`BudgetGuard` ties a budget to a :class:`Ledger`::

    guard = BudgetGuard(client="hospital-a", budget=budget, ledger=Ledger("ledger.jsonl"),
                        state_path="budget-a.json")
    with guard.charge(event, round=3, model_hash=h):
        train_one_round()        # DP-SGD with event's sample rate, noise multiplier and steps

The ledger is the source of truth. A guard built on a budget whose events are a prefix of the
client's ledger events (for example after a crash between the ledger write and the state save)
catches the budget up from the ledger.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from secfedtl._atomic import atomic_write
from secfedtl.errors import AccountingError, LedgerError, PrivacyBudgetExceeded
from secfedtl.privacy.accountants import ACCOUNTANTS, accountant_from_dict, make_accountant
from secfedtl.privacy.events import PoissonGaussianEvent
from secfedtl.privacy.ledger import Ledger, spent_events

__all__ = ["BUDGET_VERSION", "BudgetGuard", "PrivacyBudget"]

BUDGET_VERSION = 1
_BUDGET_KIND = "secfedtl.privacy_budget"


class PrivacyBudget:
    """One client's (epsilon, delta) budget and the accountant of what it has spent.

    Args:
        epsilon: total epsilon the client allows (> 0).
        delta: the delta at which epsilon is measured, in (0, 1).
        accountant: registry name of the accountant (``"rdp"`` or ``"prv"``).
        events: events already spent.

    Raises:
        AccountingError: invalid arguments.
    """

    __slots__ = ("_accountant", "_delta", "_epsilon")

    def __init__(
        self,
        *,
        epsilon: float,
        delta: float,
        accountant: str = "rdp",
        events: Iterable[PoissonGaussianEvent] = (),
    ) -> None:
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)):
            raise AccountingError("epsilon must be a real number")
        if not (math.isfinite(epsilon) and epsilon > 0):
            raise AccountingError(f"epsilon budget must be > 0 and finite, got {epsilon!r}")
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
            raise AccountingError(f"delta must be in (0, 1), got {delta!r}")
        acc = make_accountant(accountant)
        for event in events:
            acc.compose(event)
        self._epsilon = float(epsilon)
        self._delta = float(delta)
        self._accountant = acc

    @property
    def epsilon(self) -> float:
        """The epsilon budget."""
        return self._epsilon

    @property
    def delta(self) -> float:
        """The delta at which every epsilon of this budget is measured."""
        return self._delta

    @property
    def accountant_name(self) -> str:
        """Registry name of the accountant."""
        return self._accountant.name

    @property
    def events(self) -> tuple[PoissonGaussianEvent, ...]:
        """Every event spent, in order."""
        return self._accountant.events

    @property
    def spent_epsilon(self) -> float:
        """Epsilon spent so far (at :attr:`delta`)."""
        return self._accountant.get_epsilon(self._delta)

    @property
    def remaining_epsilon(self) -> float:
        """Budget minus spent epsilon (never below 0)."""
        return max(0.0, self._epsilon - self.spent_epsilon)

    def projected_epsilon(self, event: PoissonGaussianEvent) -> float:
        """Epsilon the client would have spent after ``event``; changes nothing."""
        acc = self._accountant.copy()
        acc.compose(event)
        return acc.get_epsilon(self._delta)

    def check(self, event: PoissonGaussianEvent) -> float:
        """Return the projected epsilon, or raise if ``event`` would exceed the budget.

        Raises:
            PrivacyBudgetExceeded: projected epsilon > budget (nothing changed).
            AccountingError: ``event`` is invalid.
        """
        projected = self.projected_epsilon(event)
        if projected > self._epsilon:
            raise PrivacyBudgetExceeded(
                f"running {event} would bring epsilon to {projected:.4f} "
                f"(delta={self._delta:g}, {self.accountant_name}), over the budget of "
                f"{self._epsilon:g}; already spent {self.spent_epsilon:.4f}"
            )
        return projected

    def spend(self, event: PoissonGaussianEvent, *, check: bool = True) -> None:
        """Record ``event`` as spent, after :meth:`check` unless ``check=False``.

        ``check=False`` is for recording something that already ran (it must be counted even if
        it took the client over budget).
        """
        if check:
            self.check(event)
        self._accountant.compose(event)

    def copy(self) -> PrivacyBudget:
        """An independent budget with the same settings and events."""
        return PrivacyBudget(
            epsilon=self._epsilon,
            delta=self._delta,
            accountant=self.accountant_name,
            events=self.events,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able state (versioned)."""
        return {
            "kind": _BUDGET_KIND,
            "version": BUDGET_VERSION,
            "epsilon": self._epsilon,
            "delta": self._delta,
            "accountant": self._accountant.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrivacyBudget:
        """Inverse of :meth:`to_dict`. Raises :class:`AccountingError` on anything unexpected."""
        if not isinstance(data, Mapping) or data.get("kind") != _BUDGET_KIND:
            raise AccountingError("not a secfedtl privacy budget")
        if data.get("version") != BUDGET_VERSION:
            raise AccountingError(f"unknown privacy budget version {data.get('version')!r}")
        if set(data) != {"kind", "version", "epsilon", "delta", "accountant"}:
            raise AccountingError(f"unexpected budget fields {sorted(map(str, data))}")
        acc = accountant_from_dict(data["accountant"])
        return cls(
            epsilon=data["epsilon"],
            delta=data["delta"],
            accountant=acc.name,
            events=acc.events,
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the state as JSON, atomically (temp file, fsync, ``os.replace``)."""
        data = json.dumps(self.to_dict(), sort_keys=True, indent=2, allow_nan=False) + "\n"
        atomic_write(path, lambda fh: fh.write(data.encode("utf-8")))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PrivacyBudget:
        """Read a budget written by :meth:`save`.

        Raises:
            AccountingError: the file is missing, not JSON, or not a valid budget.
        """
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise AccountingError(f"cannot read privacy budget {os.fspath(path)!r}: {exc}") from exc
        return cls.from_dict(data)

    @classmethod
    def from_ledger(
        cls,
        ledger_entries: Iterable[Mapping[str, Any]],
        client: str,
        *,
        epsilon: float,
        delta: float,
        accountant: str = "rdp",
    ) -> PrivacyBudget:
        """Rebuild a client's budget from (verified) ledger entries; pending entries count."""
        events = [event for _, event, _ in spent_events(ledger_entries).get(client, [])]
        return cls(epsilon=epsilon, delta=delta, accountant=accountant, events=events)

    def __repr__(self) -> str:
        return (
            f"PrivacyBudget(epsilon={self._epsilon}, delta={self._delta}, "
            f"accountant={self.accountant_name!r}, events={len(self.events)})"
        )


class BudgetGuard:
    """Charge a client's budget through the ledger, refusing before anything is written.

    Args:
        client: the client id written to the ledger.
        budget: the client's budget; caught up from the ledger if it lags behind it.
        ledger: the ledger to record in.
        state_path: where to save the budget after each charge (optional).

    Raises:
        LedgerError: the budget has events the ledger does not (they disagree).
    """

    __slots__ = ("_budget", "_client", "_data_fingerprint", "_declaration", "_job_id", "_ledger", "_state_path")

    def __init__(
        self,
        *,
        client: str,
        budget: PrivacyBudget,
        ledger: Ledger,
        state_path: str | os.PathLike[str] | None = None,
        declaration: Mapping[str, Any] | None = None,
        job_id: str = "",
        data_fingerprint: str = "",
    ) -> None:
        if not isinstance(client, str) or not client:
            raise LedgerError("client must be a non-empty string")
        if budget.accountant_name not in ACCOUNTANTS:  # pragma: no cover - defensive
            raise AccountingError(f"unknown accountant {budget.accountant_name!r}")
        recorded = [e for _, e, _ in spent_events(ledger.entries).get(client, [])]
        mine = list(budget.events)
        if recorded[: len(mine)] != mine:
            raise LedgerError(
                f"budget state for {client!r} ({len(mine)} events) is not a prefix of the "
                f"ledger's {len(recorded)} events; rebuild it with PrivacyBudget.from_ledger"
            )
        for event in recorded[len(mine) :]:
            budget.spend(event, check=False)
        self._client = client
        self._budget = budget
        self._ledger = ledger
        self._declaration = dict(declaration or {})
        self._job_id = job_id
        self._data_fingerprint = data_fingerprint
        self._state_path = None if state_path is None else Path(state_path)
        if self._state_path is not None and len(recorded) > len(mine):
            budget.save(self._state_path)

    @property
    def budget(self) -> PrivacyBudget:
        """The guarded budget."""
        return self._budget

    @property
    def ledger(self) -> Ledger:
        """The ledger charges are recorded in."""
        return self._ledger

    def already_charged(self, *, round: int, release: str) -> bool:  # noqa: A002
        """Whether this client's ledger already holds a ``release`` charged in ``round`` of this
        guard's job (``False`` when the guard has no job id). A node refuses such a request again,
        even after a restart: the ledger, not the process, remembers what was answered."""
        if not self._job_id:
            return False
        return any(e["status"] == "pending" and e["client"] == self._client and e.get("job_id") == self._job_id
                   and e["round"] == round and e.get("release") == release for e in self._ledger.entries)

    @contextlib.contextmanager
    def charge(
        self,
        event: PoissonGaussianEvent,
        *,
        round: int,  # noqa: A002 - the ledger field is called "round"
        model_hash: str,
        release: str = "dpsgd_update",
        randomness: str = "csprng",
        params: Mapping[str, Any] | None = None,
        **extra: Any,
    ) -> Iterator[str]:
        """Check the budget, write a pending ledger entry, run the block, then complete it.

        ``release`` names what the mechanism's output is, ``randomness`` where its sampling and
        noise come from, ``params`` the rest of its public parameters (see
        :meth:`Ledger.begin`); the guard adds the client's declaration, job id and data
        fingerprint. Yields the ledger ``entry_id``. If the budget would be exceeded,
        :class:`PrivacyBudgetExceeded` is raised before the ledger or budget changes. If the
        block raises, the pending entry stays in the ledger (it counts as spent), the budget
        records the spend too, and the exception propagates.
        """
        self._budget.check(event)
        entry_id = self._ledger.begin(
            client=self._client,
            round=round,
            event=event,
            delta=self._budget.delta,
            model_hash=model_hash,
            release=release,
            randomness=randomness,
            params=params,
            declaration=self._declaration,
            job_id=self._job_id,
            data_fingerprint=self._data_fingerprint,
            **extra,
        )
        try:
            yield entry_id
        except BaseException:
            self._budget.spend(event, check=False)
            self._save()
            raise
        self._budget.spend(event, check=False)
        self._ledger.complete(entry_id)
        self._save()

    def _save(self) -> None:
        if self._state_path is not None:
            self._budget.save(self._state_path)
