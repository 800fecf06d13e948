"""`secfedtl audit LEDGER`: verify a privacy ledger and recompute every client's epsilon.

The auditor trusts nothing but the recorded mechanisms: it checks the hash chain, then feeds each
client's recorded events (pending entries included: they count as spent) to one or more
accountants. The headline ``epsilon`` is the RDP one whenever RDP is among the accountants
asked for (it is what Opacus reports by default), otherwise the tight PRV one.

Delta: with ``--delta`` every client is measured at that delta. Otherwise each client is
measured at the largest delta recorded on its entries (normally all entries of a client carry
its budget's delta, so this is that delta).

Exit status: 0 when the chain is intact, 1 when it is broken (the first bad line is printed),
2 on other errors (unreadable file, unknown ledger version).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass
from typing import Any

from secfedtl.errors import AccountingError, LedgerTamperedError
from secfedtl.privacy.accountants import ACCOUNTANTS, compute_epsilon
from secfedtl.privacy.ledger import read_verified_ledger, spent_events

__all__ = ["AuditReport", "ClientAudit", "add_arguments", "audit_ledger", "main"]

_DEFAULT_ACCOUNTANTS = ("rdp", "prv")


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientAudit:
    """What one client has spent according to the ledger."""

    client: str
    epsilon: float
    headline_accountant: str
    delta: float
    rounds: int
    steps: int
    entries: int
    pending: int
    epsilon_by_accountant: tuple[tuple[str, float], ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form used by ``secfedtl audit --json``."""
        return {
            "epsilon": self.epsilon,
            "accountant": self.headline_accountant,
            "delta": self.delta,
            "rounds": self.rounds,
            "steps": self.steps,
            "entries": self.entries,
            "pending": self.pending,
            "epsilon_by_accountant": dict(self.epsilon_by_accountant),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditReport:
    """Result of :func:`audit_ledger` on an intact ledger."""

    path: str
    lines: int
    head_hash: str
    clients: tuple[ClientAudit, ...]

    def client(self, client: str) -> ClientAudit:
        """The audit of one client (KeyError if it has no entries)."""
        for c in self.clients:
            if c.client == client:
                return c
        raise KeyError(client)

    def to_dict(self) -> dict[str, Any]:
        """The object ``secfedtl audit --json`` prints."""
        return {
            "chain": "ok",
            "path": self.path,
            "lines": self.lines,
            "head_hash": self.head_hash,
            "clients": {c.client: c.to_dict() for c in self.clients},
        }


def audit_ledger(
    path: str | os.PathLike[str],
    delta: float | None = None,
    *,
    accountants: tuple[str, ...] = _DEFAULT_ACCOUNTANTS,
    expected_head: str | None = None,
) -> AuditReport:
    """Verify the ledger at ``path`` and recompute every client's epsilon.

    Args:
        path: the ledger file.
        delta: measure every client at this delta instead of its recorded one.
        accountants: registry names of the accountants to run; the first of them is the
            headline unless ``"rdp"`` is among them.
        expected_head: the anchored head hash, if any (see :func:`verify_ledger`).

    Raises:
        LedgerTamperedError: the chain is broken (``err.line_number`` is the first bad line).
        LedgerError: the file cannot be read or has an unknown version.
        AccountingError: unknown accountant or invalid delta.
    """
    if not accountants:
        raise AccountingError("at least one accountant is needed")
    for name in accountants:
        if name not in ACCOUNTANTS:
            raise AccountingError(f"unknown accountant {name!r}; known: {sorted(ACCOUNTANTS)}")
    if delta is not None and not (
        isinstance(delta, (int, float)) and math.isfinite(delta) and 0 < delta < 1
    ):
        raise AccountingError(f"delta must be in (0, 1), got {delta!r}")
    headline = "rdp" if "rdp" in accountants else accountants[0]
    entries, head = read_verified_ledger(path, expected_head=expected_head)
    completed = {e["entry_id"] for e in entries if e["status"] == "complete"}
    pending_by_client: dict[str, int] = {}
    for e in entries:
        if e["status"] == "pending" and e["entry_id"] not in completed:
            pending_by_client[e["client"]] = pending_by_client.get(e["client"], 0) + 1
    clients = []
    for client, spent in sorted(spent_events(entries).items()):
        client_delta = delta if delta is not None else max(d for _, _, d in spent)
        events = [event for _, event, _ in spent]
        by_acc = tuple(
            (name, compute_epsilon(events, client_delta, name)) for name in accountants
        )
        clients.append(
            ClientAudit(
                client=client,
                epsilon=dict(by_acc)[headline],
                headline_accountant=headline,
                delta=float(client_delta),
                rounds=len({r for r, _, _ in spent}),
                steps=sum(event.steps for event in events),
                entries=len(spent),
                pending=pending_by_client.get(client, 0),
                epsilon_by_accountant=by_acc,
            )
        )
    return AuditReport(
        path=os.fspath(path), lines=len(entries), head_hash=head, clients=tuple(clients)
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``secfedtl audit``."""
    parser.add_argument("ledger", metavar="LEDGER", help="path of the privacy ledger (JSON lines)")
    parser.add_argument(
        "--delta", type=float, default=None, help="measure every client at this delta"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--accountant",
        choices=[*sorted(ACCOUNTANTS), "all"],
        default="all",
        help="accountant(s) to recompute epsilon with (default: all; headline epsilon is RDP)",
    )
    parser.add_argument(
        "--expected-head",
        default=None,
        help="anchored head hash; detects lines removed from the end",
    )


def _print_table(report: AuditReport, accountants: tuple[str, ...]) -> None:
    headers = ["client", *[f"eps ({a})" for a in accountants], "delta", "rounds", "steps", "pending"]
    rows = [
        [
            c.client,
            *[f"{v:.4f}" for _, v in c.epsilon_by_accountant],
            f"{c.delta:g}",
            str(c.rounds),
            str(c.steps),
            str(c.pending),
        ]
        for c in report.clients
    ]
    title = f"privacy ledger {report.path}: chain ok, {report.lines} lines"
    caption = f"head hash (anchor it elsewhere): {report.head_hash}"
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        print(caption)
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
        print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
        for r in rows:
            print("  ".join(v.ljust(w) for v, w in zip(r, widths)))
        return
    # as wide as its title and caption: rich wraps them to the table's width otherwise
    table = Table(title=title, caption=caption, min_width=max(len(title), len(caption)) + 4)
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*r)
    Console(width=max(100, len(caption) + 4, len(title) + 4)).print(table)


def main(args: argparse.Namespace) -> int:
    """Run ``secfedtl audit``; return the exit status (0 intact, 1 tampered)."""
    accountants = tuple(sorted(ACCOUNTANTS)) if args.accountant == "all" else (args.accountant,)
    accountants = tuple(sorted(accountants, key=lambda a: a != "rdp"))  # rdp first
    try:
        report = audit_ledger(
            args.ledger, args.delta, accountants=accountants, expected_head=args.expected_head
        )
    except LedgerTamperedError as exc:
        line = getattr(exc, "line_number", None)
        if args.json:
            print(json.dumps({"chain": "broken", "first_bad_line": line, "error": str(exc)}))
        else:
            print(f"ledger TAMPERED: first bad line {line} ({exc})")
        return 1
    if args.json:
        print(json.dumps(report.to_dict(), sort_keys=True))
    else:
        _print_table(report, accountants)
    return 0

