"""A data holder's persistent privacy state: its ledger and budget, kept with the node, anchored.

The budget belongs to the hospital's data, not to a job's output folder. One folder per data
holder (mode 0700) holds:

* ``ledger.jsonl`` (mode 0600): the hash-chained ledger of every release (:mod:`secfedtl.privacy.ledger`);
* ``state.json`` (mode 0600): the budget (epsilon, delta, accountant), the fingerprints of the data
  it has protected, and the **anchor** of the ledger: its length in bytes and the hash of its last
  line, rewritten (atomically) after every ledger line.

Opening the state checks the ledger against the anchor: a ledger that was deleted, truncated,
replaced or rewritten is refused (:class:`~secfedtl.errors.LedgerTamperedError`), so no resume and
no new job can start the hospital again at epsilon 0. A second job on the same state continues the
same budget. A job asking for another budget than the state holds is refused
(:class:`~secfedtl.errors.ConfigError`): changing a hospital's budget is its operator's decision,
made on the state itself, not by a job file.

Which data: every ledger entry records the SHA-256 fingerprint of the data it protects
(:func:`data_fingerprint`), and the state lists every fingerprint it has seen. The budget is the
hospital's, whatever records it holds today: a record added or removed (a neighbouring dataset,
the very change DP is about) must not reset it, so new data continues the same state.

While a job holds the state it keeps an exclusive ``flock`` on the state's folder; a second job on
the same state at the same time is refused. Data already protected by another client's state in
the same root is refused too (a new name does not start a new budget). The root is node-local
configuration (``--state-dir``, ``$SECFEDTL_STATE_DIR``); a job file cannot choose it.

What this cannot stop: an operator who deletes the whole folder (state and ledger together)
starts again from nothing. Anchor :attr:`Ledger.head_hash` elsewhere too (``secfedtl audit``
prints it) if that is in your threat model.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from secfedtl._atomic import atomic_write
from secfedtl.errors import ConfigError, LedgerError, LedgerTamperedError
from secfedtl.privacy.budget import BudgetGuard, PrivacyBudget
from secfedtl.privacy.events import PoissonGaussianEvent
from secfedtl.privacy.ledger import GENESIS_HASH, Ledger, spent_events

__all__ = ["STATE_VERSION", "PrivacyState", "data_fingerprint"]

STATE_VERSION = 1
_KIND = "secfedtl.privacy_state"
_STATE_KEYS = {"kind", "version", "client", "epsilon", "delta", "accountant", "ledger", "fingerprints"}


def data_fingerprint(arrays: Iterable[Any]) -> str:
    """SHA-256 over the dtype, shape and bytes of each array (numpy or torch), in order: the
    fingerprint of the data a ledger entry protects."""
    h = hashlib.sha256(b"secfedtl.data/1")
    for a in arrays:
        if hasattr(a, "detach"):
            a = a.detach().cpu().numpy()
        arr = np.ascontiguousarray(np.asarray(a))
        h.update(f"{arr.dtype.str}|{arr.shape}|".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def _private_dir(directory: Path) -> None:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = stat.S_IMODE(directory.stat().st_mode)
    if mode & 0o077:
        os.chmod(directory, 0o700)


def _write_private(path: Path, data: dict[str, Any]) -> None:
    payload = (json.dumps(data, sort_keys=True, indent=2, allow_nan=False) + "\n").encode("utf-8")
    atomic_write(path, lambda fh: (os.fchmod(fh.fileno(), 0o600), fh.write(payload)))


class PrivacyState:
    """One data holder's ledger and budget (see the module docstring). Use :meth:`open`."""

    def __init__(self, *, directory: Path, client: str, budget: PrivacyBudget, ledger: Ledger,
                 fingerprint: str, fingerprints: list[str], lock_fd: int) -> None:
        self.directory = directory
        self._fingerprint = fingerprint
        self.client = client
        self.budget = budget
        self.ledger = ledger
        self.fingerprints = fingerprints
        self._lock_fd = lock_fd

    @classmethod
    def open(cls, directory: str | os.PathLike[str], *, client: str, epsilon: float, delta: float,
             accountant: str, fingerprint: str) -> PrivacyState:
        """Open (or create) the state in ``directory`` for ``client`` with this budget.

        Raises:
            LedgerTamperedError: the ledger does not match its anchor (deleted, truncated,
                rewritten), or a ledger exists without its state file.
            ConfigError: the state belongs to another client or holds another budget, or another
                job holds it now.
            LedgerError: the state file is unreadable.
        """
        if not isinstance(fingerprint, str) or len(fingerprint) != 64:
            raise ConfigError("fingerprint must be a hex SHA-256 (see data_fingerprint)")
        budget = PrivacyBudget(epsilon=epsilon, delta=delta, accountant=accountant)  # validates first
        root = Path(directory)
        cls._refuse_known_data(root, client, fingerprint)
        _private_dir(root)
        lock_fd = cls._lock(root)
        try:
            state_path, ledger_path = root / "state.json", root / "ledger.jsonl"
            if state_path.exists():
                saved = cls._read(state_path)
                if saved["client"] != client:
                    raise ConfigError(f"{root} is the privacy state of {saved['client']!r}, not {client!r}")
                held = (saved["epsilon"], saved["delta"], saved["accountant"])
                if held != (budget.epsilon, budget.delta, budget.accountant_name):
                    raise ConfigError(
                        f"{client!r}'s privacy state holds the budget epsilon={held[0]:g}, delta={held[1]:g} "
                        f"({held[2]}); this job asks for epsilon={epsilon:g}, delta={delta:g} ({accountant}). "
                        "A job cannot change a hospital's budget."
                    )
                anchor = (int(saved["ledger"]["size"]), str(saved["ledger"]["head_hash"]))
                fingerprints = list(saved["fingerprints"])
            else:
                if ledger_path.exists() and ledger_path.stat().st_size > 0:
                    raise LedgerTamperedError(f"{ledger_path} exists without its state file: the state was deleted")
                anchor = (0, GENESIS_HASH)
                fingerprints = []
            state = cls(directory=root, client=client, budget=budget, ledger=None,  # type: ignore[arg-type]
                        fingerprint=fingerprint, fingerprints=fingerprints, lock_fd=lock_fd)
            ledger = Ledger(ledger_path, anchor=anchor, on_append=state._anchor)
            state.ledger = ledger
            state.budget = PrivacyBudget.from_ledger(ledger.entries, client, epsilon=epsilon, delta=delta,
                                                     accountant=accountant)
            if fingerprint not in fingerprints:
                fingerprints.append(fingerprint)
            state._anchor(ledger.size, ledger.head_hash)
            return state
        except BaseException:
            os.close(lock_fd)
            raise

    @classmethod
    def _refuse_known_data(cls, root: Path, client: str, fingerprint: str) -> None:
        """Refuse a state for data that another client's state in the same root already protects
        (renaming a hospital must not start a new budget for the same records)."""
        parent = root.parent
        if not parent.is_dir():
            return
        for sibling in sorted(parent.iterdir()):
            path = sibling / "state.json"
            if sibling == root or not path.is_file():
                continue
            try:
                saved = cls._read(path)
            except LedgerError:
                continue
            if fingerprint in saved["fingerprints"] and saved["client"] != client:
                raise ConfigError(f"this data is already protected by the privacy state of {saved['client']!r} "
                                  f"in {sibling}: a new name does not start a new budget")

    @staticmethod
    def _lock(root: Path) -> int:
        fd = os.open(root, os.O_RDONLY)  # the folder itself: deleting a lock file cannot lift it
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # pragma: no cover - not POSIX
            pass
        except OSError as exc:
            os.close(fd)
            raise ConfigError(f"another job holds the privacy state in {root}") from exc
        return fd

    @staticmethod
    def _read(path: Path) -> dict[str, Any]:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise LedgerError(f"cannot read privacy state {path}: {exc}") from exc
        if not isinstance(data, dict) or data.get("kind") != _KIND or set(data) != _STATE_KEYS:
            raise LedgerError(f"{path} is not a secfedtl privacy state")
        if data.get("version") != STATE_VERSION:
            raise LedgerError(f"{path}: unknown privacy state version {data.get('version')!r}")
        return data

    def _anchor(self, size: int, head: str) -> None:
        _write_private(self.directory / "state.json", {
            "kind": _KIND, "version": STATE_VERSION, "client": self.client, "epsilon": self.budget.epsilon,
            "delta": self.budget.delta, "accountant": self.budget.accountant_name,
            "ledger": {"size": size, "head_hash": head}, "fingerprints": self.fingerprints})

    @classmethod
    def anchor_of(cls, ledger_path: str | os.PathLike[str]) -> tuple[int, str] | None:
        """The anchor ``(size, head hash)`` in the ``state.json`` next to a ledger, or ``None``
        when the ledger is not inside a readable privacy state."""
        path = Path(ledger_path).parent / "state.json"
        if not path.is_file():
            return None
        try:
            saved = cls._read(path)
            return int(saved["ledger"]["size"]), str(saved["ledger"]["head_hash"])
        except (LedgerError, KeyError, TypeError, ValueError):
            return None

    @property
    def fingerprint(self) -> str:
        """The fingerprint of the data this state was opened for."""
        return self._fingerprint

    def guard(self, *, job_id: str, declaration: Mapping[str, Any]) -> BudgetGuard:
        """A budget guard on this state's ledger, for one job (its entries carry ``job_id``, the
        data fingerprint and ``declaration``)."""
        return BudgetGuard(client=self.client, budget=self.budget, ledger=self.ledger, declaration=declaration,
                           job_id=job_id, data_fingerprint=self._fingerprint)

    def events_before(self, job_id: str) -> list[PoissonGaussianEvent]:
        """Every event this hospital spent in other jobs than ``job_id`` (what a job's noise
        calibration must leave room for; the same list on a resume)."""
        return [ev for _, ev, _, job in self._spent_with_jobs() if job != job_id]

    def _spent_with_jobs(self) -> list[tuple[int, PoissonGaussianEvent, float, str]]:
        jobs = [e.get("job_id", "") for e in self.ledger.entries if e["status"] == "pending"
                and e["client"] == self.client]
        spent = spent_events(self.ledger.entries).get(self.client, [])
        return [(r, ev, d, job) for (r, ev, d), job in zip(spent, jobs)]

    def close(self) -> None:
        """Release the job's lock on the state."""
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __repr__(self) -> str:
        return f"PrivacyState(client={self.client!r}, directory={os.fspath(self.directory)!r})"
