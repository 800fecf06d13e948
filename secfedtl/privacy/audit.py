"""`secfedtl audit LEDGER`: verify a privacy ledger and recompute every client's epsilon.

The auditor trusts nothing but the recorded mechanisms: it checks the hash chain, then feeds each
client's recorded events (pending entries included: they count as spent) to one or more
accountants. The headline ``epsilon`` is the RDP one whenever RDP is among the accountants
asked for (it is what Opacus reports by default), otherwise the tight PRV one. The command
line runs RDP alone unless ``--accountant prv`` or ``all`` asks for PRV: RDP is pure Python, so
``secfedtl audit LEDGER`` answers at once, while PRV imports torch and opacus (a few seconds).

Mechanisms: every registered mechanism is recomputed (local DP-SGD's ``poisson_gaussian`` and
distributed DP's ``poisson_skellam``). An accountant that cannot interpret some of a client's
mechanisms (PRV does not interpret ``poisson_skellam``) is left out of that client's
``epsilon_by_accountant`` and shown as ``n/a``; the headline accountant (RDP) interprets all.

Delta: with ``--delta`` every client is measured at that delta. Otherwise each client is
measured at the largest delta recorded on its entries (normally all entries of a client carry
its budget's delta, so this is that delta).

Releases: for each client the audit lists every release (round, what was released, mechanism,
its own epsilon at the client's delta, the cumulative epsilon after it), the client's public
declaration, and the total.

Certification: an entry counts toward a *certified* epsilon only if its sampling and noise came
from a CSPRNG (``randomness == "csprng"``). Entries of the test-only seeded mode
(``"insecure_seeded"``) and of version-1 ledgers (``"unrecorded"``: written when Poisson batches
followed the public job seed) are reported as NOT PRIVATE; the exit status is then 3 unless
``--test-ledger`` says this is a test ledger (then 0, and the report still says so).

Exit status: 0 when the chain is intact and every entry is certified, 1 when the chain is broken
(the first bad line is printed), 3 when some entry is not certified (without ``--test-ledger``),
2 on other errors (unreadable file, unknown ledger version, not a ledger, an empty ledger).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from secfedtl.errors import AccountingError, LedgerError, LedgerTamperedError
from secfedtl.privacy.accountants import ACCOUNTANTS, compute_epsilon
from secfedtl.privacy.ledger import check_anchor, entry_view, read_verified_ledger, spent_events
from secfedtl.privacy.randomness import CERTIFIED_RANDOMNESS

__all__ = ["AuditReport", "ClientAudit", "add_arguments", "audit_ledger", "main"]

_DEFAULT_ACCOUNTANTS = ("rdp", "prv")


@dataclass(frozen=True, slots=True, kw_only=True)
class Release:
    """One begun ledger entry of a client, as the audit reports it."""

    round: int
    release: str
    mechanism: dict[str, Any]
    params: dict[str, Any]
    randomness: str
    status: str  # "complete" or "pending" (pending counts as spent)
    epsilon: float  # this release alone, at the client's delta (headline accountant)
    cumulative_epsilon: float  # every release of the client up to and including this one

    @property
    def certified(self) -> bool:
        return self.randomness == CERTIFIED_RANDOMNESS

    def to_dict(self) -> dict[str, Any]:
        return {"round": self.round, "release": self.release, "mechanism": self.mechanism, "params": self.params,
                "randomness": self.randomness, "certified": self.certified, "status": self.status,
                "epsilon": self.epsilon, "cumulative_epsilon": self.cumulative_epsilon}


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
    releases: tuple[Release, ...] = ()
    declaration: dict[str, Any] | None = None

    @property
    def certified(self) -> bool:
        """Whether every release drew its randomness from a CSPRNG (the epsilon is a DP bound)."""
        return all(r.certified for r in self.releases)

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
            "certified": self.certified,
            "declaration": self.declaration,
            "releases": [r.to_dict() for r in self.releases],
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

    @property
    def certified(self) -> bool:
        """Whether every client's every release is certified (see the module docstring)."""
        return all(c.certified for c in self.clients)

    def to_dict(self) -> dict[str, Any]:
        """The object ``secfedtl audit --json`` prints."""
        return {
            "chain": "ok",
            "path": self.path,
            "lines": self.lines,
            "head_hash": self.head_hash,
            "certified": self.certified,
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
    _check_state_anchor(path)
    if not entries:
        raise LedgerError(f"{os.fspath(path)!r} is an empty ledger: there is nothing to certify")
    completed = {e["entry_id"] for e in entries if e["status"] == "complete"}
    pending_by_client: dict[str, int] = {}
    begun: dict[str, list[dict[str, Any]]] = {}
    for e in entries:
        if e["status"] == "pending":
            begun.setdefault(e["client"], []).append(entry_view(e))
            if e["entry_id"] not in completed:
                pending_by_client[e["client"]] = pending_by_client.get(e["client"], 0) + 1
    clients = []
    for client, spent in sorted(spent_events(entries).items()):
        client_delta = delta if delta is not None else max(d for _, _, d in spent)
        events = [event for _, event, _ in spent]
        by_acc = tuple(
            (name, compute_epsilon(events, client_delta, name)) for name in accountants
            if all(ACCOUNTANTS[name].supports(event) for event in events)
        )
        if headline not in dict(by_acc):
            raise AccountingError(
                f"the {headline} accountant cannot interpret every mechanism of {client}; audit with --accountant rdp")
        releases = tuple(
            Release(round=r, release=view["release"], mechanism=event.to_dict(), params=view["params"],
                    randomness=view["randomness"],
                    status="complete" if view["entry_id"] in completed else "pending",
                    epsilon=compute_epsilon([event], client_delta, headline),
                    cumulative_epsilon=compute_epsilon(events[: k + 1], client_delta, headline))
            for k, ((r, event, _), view) in enumerate(zip(spent, begun[client]))
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
                releases=releases,
                declaration=begun[client][-1]["declaration"] or None,
            )
        )
    return AuditReport(
        path=os.fspath(path), lines=len(entries), head_hash=head, clients=tuple(clients)
    )


def _check_state_anchor(path: str | os.PathLike[str]) -> None:
    """A ledger inside a hospital's privacy state must continue the anchor in the ``state.json``
    next to it (a ledger cut short would otherwise still verify as a shorter chain)."""
    from secfedtl.privacy.state import PrivacyState

    anchor = PrivacyState.anchor_of(path)
    if anchor is not None:
        check_anchor(Path(path).read_bytes(), anchor, where=f"ledger {os.fspath(path)!r}")


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
        default="rdp",
        help="accountant(s) to recompute epsilon with: rdp (the default and the headline; pure Python, "
             "instant), prv (tighter; imports torch and opacus, a few seconds) or all",
    )
    parser.add_argument(
        "--expected-head",
        default=None,
        help="anchored head hash; detects lines removed from the end",
    )
    parser.add_argument(
        "--releases", action="store_true", help="list every release of every client (always in --json)"
    )
    parser.add_argument(
        "--test-ledger",
        action="store_true",
        help="this is a test ledger: exit 0 even if entries are not certified (they are still reported)",
    )


def _print_releases(report: AuditReport) -> None:
    for c in report.clients:
        print(f"\n{c.client}: declared public {json.dumps(c.declaration, sort_keys=True)}")
        print(f"  {'round':>5}  {'release':<22}{'mechanism':<44}{'randomness':<17}{'eps':>8}{'total':>8}")
        for r in c.releases:
            mech = _describe(r.mechanism)
            flag = "" if r.certified else "  NOT PRIVATE"
            print(f"  {r.round:>5}  {r.release:<22}{mech:<44}{r.randomness:<17}{r.epsilon:>8.4f}"
                  f"{r.cumulative_epsilon:>8.4f}{flag}")
        print(f"  total epsilon {c.epsilon:.4f} ({c.headline_accountant}, delta {c.delta:g})")


def _describe(m: dict[str, Any]) -> str:
    """One line describing a recorded mechanism."""
    if m["mechanism"] == "poisson_skellam":
        return (f"poisson_skellam q={m['sample_rate']:.4g} share_var={m['share_variance']:.4g} "
                f"honest={m['honest_parties']} L2={m['l2_bound']:.4g} b={m['bits']} T={m['steps']}")
    return f"{m['mechanism']} q={m['sample_rate']:.4g} sigma={m['noise_multiplier']:.4g} T={m['steps']}"


def _print_table(report: AuditReport, accountants: tuple[str, ...]) -> None:
    headers = ["client", *[f"eps ({a})" for a in accountants], "delta", "releases", "steps", "pending", "certified"]
    rows = [
        [
            c.client,
            *[f"{dict(c.epsilon_by_accountant)[a]:.4f}" if a in dict(c.epsilon_by_accountant) else "n/a"
              for a in accountants],
            f"{c.delta:g}",
            str(c.entries),
            str(c.steps),
            str(c.pending),
            "yes" if c.certified else "NOT PRIVATE",
        ]
        for c in report.clients
    ]
    # Plain text, the same wherever it runs (no optional package changes what an auditor reads).
    print(f"privacy ledger {report.path}: chain ok, {report.lines} lines")
    print(f"head hash (anchor it elsewhere): {report.head_hash}")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths))))
    for r in rows:
        print("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))))


def main(args: argparse.Namespace) -> int:
    """Run ``secfedtl audit``; return the exit status (see the module docstring)."""
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
        if args.releases or not report.certified:
            _print_releases(report)
    if not report.certified:
        uncertified = sorted(c.client for c in report.clients if not c.certified)
        note = "test ledger: " if args.test_ledger else ""
        print(f"{note}NOT PRIVATE: entries of {', '.join(uncertified)} drew sampling or noise from a seeded or "
              "unrecorded generator; their epsilon is not a DP guarantee", file=sys.stderr)
        return 0 if args.test_ledger else 3
    return 0

