"""The privacy ledger: an append-only, hash-chained JSON-lines file of every mechanism run.

File format (versions 2 and 3; version-1 files are still read)
--------------------------------------------------------------
* UTF-8 text, one JSON object per line, each line ending in ``\\n``. Objects are written with
  sorted keys and compact separators (``json.dumps(obj, sort_keys=True, separators=(",", ":"))``);
  a line that is not in exactly that canonical form is rejected.
* ``prev_hash`` is the hex SHA-256 of the previous line's exact bytes, *including* its trailing
  ``\\n``. The first line's ``prev_hash`` is 64 zeros (:data:`GENESIS_HASH`); there is no header.
* ``line_hash`` is the hex SHA-256 of the line's canonical JSON with the ``line_hash`` key left
  out (so it covers ``prev_hash``). It lets a verifier pin a change to the exact line that was
  edited, including the last line, which no later ``prev_hash`` covers.
* Every line has ``version``, ``entry_id``, ``status``, ``client``, ``round``, ``mechanism``,
  ``sample_rate``, ``noise_multiplier``, ``steps``, ``delta``, ``model_hash``, ``timestamp``
  (UTC ISO 8601), ``prev_hash``, ``line_hash`` and ``extra`` (caller-supplied JSON fields, kept in
  their own object so they can never overwrite a ledger field).
* Version 2 adds what an auditor needs to judge each release: ``release`` (what the mechanism's
  output is, e.g. ``"dpsgd_update"``), ``randomness`` (``"csprng"``, or ``"insecure_seeded"`` for a
  test run, which ``secfedtl audit`` never certifies), ``params`` (the rest of the public
  mechanism: clip norm, normaliser, declared size...), ``declaration`` (what the data holder
  declared public about itself), ``job_id`` and ``data_fingerprint`` (SHA-256 of the data the
  entry protects). Version-1 lines read as ``release``/``randomness`` ``"unrecorded"``.
* Version 3 records the mechanism as data: instead of the top-level ``mechanism``,
  ``sample_rate``, ``noise_multiplier`` and ``steps`` of versions 1-2 a line has one ``event``
  object, the event's own ``to_dict()`` (any mechanism in the fixed registry
  :data:`~secfedtl.privacy.events.EVENT_TYPES`, e.g. ``poisson_skellam`` for distributed DP).
  Everything else is as in version 2. :meth:`Ledger.begin` writes a ``poisson_gaussian`` event as a
  version-2 line (byte-for-byte what earlier releases wrote) and any other mechanism as version 3,
  so a ledger without distributed DP stays readable by older secfedtl; one version per line, and a
  file may mix them.
* ``status`` is ``"pending"`` on the line written by :meth:`Ledger.begin` (before the mechanism
  runs) and ``"complete"`` on the line written by :meth:`Ledger.complete`, which repeats the
  pending line's mechanism fields and carries the same ``entry_id``. A pending entry with no
  completion COUNTS AS SPENT: the process may have crashed after noise was drawn.

What the chain does and does not prove
--------------------------------------
Any change to a byte, a removed, inserted or reordered line, or a torn (unterminated) last line
is detected and reported with its 1-based line number. The chain has no key: someone able to
rewrite the whole file can recompute every hash, and removing whole lines *from the end* leaves a
valid shorter chain. Anchor :attr:`Ledger.head_hash` (printed by ``secfedtl audit``) somewhere
the ledger's writer cannot change, and pass it back as ``expected_head`` to detect both.

Each line is written with one ``write``, flushed and ``os.fsync``'d before the call returns.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from secfedtl.errors import AccountingError, LedgerError, LedgerTamperedError
from secfedtl.privacy.events import DpEvent, PoissonGaussianEvent, event_from_dict
from secfedtl.privacy.randomness import RANDOMNESS_LABELS

__all__ = [
    "GENESIS_HASH",
    "LEDGER_VERSION",
    "Ledger",
    "check_anchor",
    "entry_view",
    "read_verified_ledger",
    "spent_events",
    "verify_ledger",
]

LEDGER_VERSION = 2
#: The version :meth:`Ledger.begin` writes for mechanisms other than ``poisson_gaussian``.
EVENT_LEDGER_VERSION = 3
_READABLE_VERSIONS = (1, 2, 3)
GENESIS_HASH = "0" * 64

_STATUSES = ("pending", "complete")
_EVENT_FIELDS = ("mechanism", "sample_rate", "noise_multiplier", "steps")
_V2_FIELDS = ("release", "randomness", "params", "declaration", "job_id", "data_fingerprint")
# Fields a complete line copies from its pending line.
_COPIED_FIELDS_V1 = ("client", "round", *_EVENT_FIELDS, "delta", "model_hash")
_COPIED_FIELDS = (*_COPIED_FIELDS_V1, *_V2_FIELDS)
_LINE_FIELDS_V1 = frozenset(
    {
        "version",
        "entry_id",
        "status",
        *_COPIED_FIELDS_V1,
        "timestamp",
        "prev_hash",
        "line_hash",
        "extra",
    }
)
_LINE_FIELDS = _LINE_FIELDS_V1 | frozenset(_V2_FIELDS)
_COPIED_FIELDS_V3 = ("client", "round", "event", "delta", "model_hash", *_V2_FIELDS)
_LINE_FIELDS_V3 = (_LINE_FIELDS - frozenset(_EVENT_FIELDS)) | {"event"}


def _line_fields(version: int) -> frozenset[str]:
    return {1: _LINE_FIELDS_V1, 2: _LINE_FIELDS, 3: _LINE_FIELDS_V3}[version]


def _copied_fields(version: int) -> tuple[str, ...]:
    return {1: _COPIED_FIELDS_V1, 2: _COPIED_FIELDS, 3: _COPIED_FIELDS_V3}[version]


def _event_of(obj: Mapping[str, Any]) -> DpEvent:
    """The mechanism a verified line records (AccountingError if invalid, KeyError if missing)."""
    if obj.get("version") == 3:
        return event_from_dict(obj["event"])
    return event_from_dict({k: obj[k] for k in _EVENT_FIELDS})
#: What a version-1 line reads as for the version-2 fields.
_V1_DEFAULTS = {"release": "unrecorded", "randomness": "unrecorded", "params": {}, "declaration": {},
                "job_id": "", "data_fingerprint": ""}


#: Field names every ledger line has; a file that starts with none of them is not a ledger.
_MARKERS = (b'"prev_hash"', b'"line_hash"', b'"entry_id"')


def _canonical(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _line_hash(obj: Mapping[str, Any]) -> str:
    return _sha256(_canonical({k: v for k, v in obj.items() if k != "line_hash"}))


def _tampered(line_number: int, message: str) -> LedgerTamperedError:
    err = LedgerTamperedError(f"line {line_number}: {message}")
    err.line_number = line_number  # type: ignore[attr-defined]
    return err


def _is_hex64(value: object) -> bool:
    return (
        isinstance(value, str)
        and len(value) == 64
        and all(c in "0123456789abcdef" for c in value)
    )


def _check_line_fields(obj: dict[str, Any], line_number: int) -> None:
    """Semantic checks on one line whose hashes are already known to be right."""
    version = obj.get("version")
    if isinstance(version, bool) or version not in _READABLE_VERSIONS:
        raise LedgerError(
            f"line {line_number}: unknown ledger version {version!r} "
            f"(this secfedtl reads versions {_READABLE_VERSIONS})"
        )
    fields = _line_fields(version)
    if set(obj) != fields:
        raise _tampered(line_number, f"unexpected fields {sorted(set(obj) ^ fields)}")
    if version >= 2:
        for key in ("release", "randomness", "job_id", "data_fingerprint"):
            if not isinstance(obj[key], str):
                raise _tampered(line_number, f"{key} must be a string")
        if not obj["release"]:
            raise _tampered(line_number, "release must name what was released")
        if obj["randomness"] not in RANDOMNESS_LABELS[:2]:
            raise _tampered(line_number, f"unknown randomness {obj['randomness']!r}")
        if not isinstance(obj["params"], dict) or not isinstance(obj["declaration"], dict):
            raise _tampered(line_number, "params and declaration must be objects")
    if obj["status"] not in _STATUSES:
        raise _tampered(line_number, f"unknown status {obj['status']!r}")
    if not isinstance(obj["client"], str) or not obj["client"]:
        raise _tampered(line_number, "client must be a non-empty string")
    rnd = obj["round"]
    if isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 0:
        raise _tampered(line_number, "round must be an int >= 0")
    try:
        _event_of(obj)
    except AccountingError as exc:
        raise _tampered(line_number, f"invalid mechanism: {exc}") from exc
    delta = obj["delta"]
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise _tampered(line_number, "delta must be in (0, 1)")
    if not isinstance(obj["entry_id"], str) or not obj["entry_id"]:
        raise _tampered(line_number, "entry_id must be a non-empty string")
    if not isinstance(obj["model_hash"], str) or not isinstance(obj["timestamp"], str):
        raise _tampered(line_number, "model_hash and timestamp must be strings")
    if not isinstance(obj["extra"], dict):
        raise _tampered(line_number, "extra must be an object")


def _parse(data: bytes, *, expected_head: str | None = None) -> tuple[list[dict[str, Any]], str]:
    """Verify ``data`` as a ledger; return its entries and the head hash (hash of the last line)."""
    entries: list[dict[str, Any]] = []
    prev = GENESIS_HASH
    pending: dict[str, dict[str, Any]] = {}
    completed: set[str] = set()
    seen_ids: set[str] = set()
    pos = 0
    line_number = 0
    if data and not any(marker in data[:4096] for marker in _MARKERS):
        # Not a damaged ledger (a changed, inserted or deleted byte leaves the others): another file.
        raise LedgerError("not a secfedtl ledger (none of a ledger line's fields in its first 4096 bytes)")
    while pos < len(data):
        line_number += 1
        end = data.find(b"\n", pos)
        if end < 0:
            raise _tampered(line_number, "truncated: the last line has no terminating newline")
        raw = data[pos : end + 1]
        pos = end + 1
        try:
            obj = json.loads(raw[:-1].decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise _tampered(line_number, f"not valid JSON: {exc}") from exc
        if not isinstance(obj, dict):
            raise _tampered(line_number, "not a JSON object")
        try:
            canonical = _canonical(obj)
        except ValueError as exc:
            raise _tampered(line_number, f"not canonical JSON: {exc}") from exc
        if canonical != raw[:-1]:
            raise _tampered(line_number, "not in canonical form (sorted keys, compact)")
        if not _is_hex64(obj.get("line_hash")) or obj["line_hash"] != _line_hash(obj):
            raise _tampered(line_number, "line_hash does not match the line's content")
        if obj.get("prev_hash") != prev:
            raise _tampered(
                line_number, "prev_hash does not match the previous line (removed/reordered?)"
            )
        _check_line_fields(obj, line_number)
        entry_id = obj["entry_id"]
        if obj["status"] == "pending":
            if entry_id in seen_ids:
                raise _tampered(line_number, f"entry_id {entry_id!r} begun twice")
            seen_ids.add(entry_id)
            pending[entry_id] = obj
        else:
            begun = pending.get(entry_id)
            if begun is None:
                raise _tampered(line_number, f"completes unknown entry {entry_id!r}")
            if entry_id in completed:
                raise _tampered(line_number, f"entry {entry_id!r} completed twice")
            if obj["version"] != begun["version"] or any(
                obj.get(k) != begun.get(k) for k in _copied_fields(begun["version"])
            ):
                raise _tampered(line_number, "complete line disagrees with its pending line")
            completed.add(entry_id)
        entries.append(obj)
        prev = _sha256(raw)
    if expected_head is not None and prev != expected_head:
        raise _tampered(
            line_number + 1,
            f"head hash {prev} is not the expected {expected_head} (lines removed at the end?)",
        )
    return entries, prev


def verify_ledger(path: str | os.PathLike[str], *, expected_head: str | None = None) -> list[dict]:
    """Read and verify a ledger; return its lines as dicts, in order.

    Args:
        path: the ledger file.
        expected_head: if given, the hash the last line must have (an anchored
            :attr:`Ledger.head_hash`); detects lines removed from the end.

    Raises:
        LedgerTamperedError: on the first bad line; ``str(err)`` starts with ``"line N:"`` and
            ``err.line_number`` is N (1-based; for a head mismatch, one past the last line).
        LedgerError: the file cannot be read, or was written by an unknown ledger version.
    """
    entries, _ = read_verified_ledger(path, expected_head=expected_head)
    return entries


def read_verified_ledger(
    path: str | os.PathLike[str], *, expected_head: str | None = None
) -> tuple[list[dict], str]:
    """Like :func:`verify_ledger`, but also return the head hash (hash of the last line)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise LedgerError(f"cannot read ledger {os.fspath(path)!r}: {exc.strerror or exc}") from exc
    try:
        return _parse(data, expected_head=expected_head)
    except LedgerTamperedError:
        raise
    except LedgerError as exc:  # not a ledger, an unknown version: name the file
        raise LedgerError(f"{os.fspath(path)!r}: {exc}") from exc


def spent_events(
    entries: Iterable[Mapping[str, Any]],
) -> dict[str, list[tuple[int, DpEvent, float]]]:
    """Everything each client has spent: ``{client: [(round, event, delta), ...]}`` in ledger order.

    Every begun entry counts once, whether it was completed or is still pending (a pending entry
    may have crashed after its noise was drawn, so it is charged). Completion lines add nothing.
    """
    spent: dict[str, list[tuple[int, DpEvent, float]]] = {}
    for entry in entries:
        if entry.get("status") != "pending":
            continue
        try:
            event = _event_of(entry)
        except KeyError as exc:
            raise LedgerError(f"ledger entry lacks field {exc}") from exc
        spent.setdefault(entry["client"], []).append(
            (int(entry["round"]), event, float(entry["delta"]))
        )
    return spent


def check_anchor(data: bytes, anchor: tuple[int, str], *, where: str = "the ledger") -> None:
    """Raise :class:`LedgerTamperedError` unless ``data`` continues the anchored ledger: its first
    ``anchor[0]`` bytes are a valid chain whose head hash is ``anchor[1]``."""
    size, head_at = anchor
    if len(data) < size:
        raise LedgerTamperedError(
            f"{where} holds {len(data)} bytes but its anchor records {size}: it was deleted, truncated or replaced"
        )
    _, prefix_head = _parse(data[:size])
    if prefix_head != head_at:
        raise LedgerTamperedError(f"{where} does not continue its anchored head {head_at}: it was rewritten")


def entry_view(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of one verified ledger line with every version-2 field present (a version-1 line
    reads as ``release``/``randomness`` ``"unrecorded"``: it was written when Poisson batches
    followed the public job seed, so nothing certifies it)."""
    view = {**_V1_DEFAULTS, **json.loads(_canonical(entry))}
    return view


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


def _lock(fd: int) -> None:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: one writer per ledger
        return
    fcntl.flock(fd, fcntl.LOCK_EX)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


class Ledger:
    """Append-only writer of a privacy ledger (see the module docstring for the format).

    Opening an existing file verifies its whole chain (raising :class:`LedgerTamperedError` if
    it is broken) and continues it. Several processes may hold the same ledger (e.g. the worker
    processes of one job): each append takes an exclusive ``flock`` on the file, and a writer
    that finds lines appended by another verifies them and continues after them. A file that
    changed in any other way (truncated, rewritten) is refused.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        anchor: tuple[int, str] | None = None,
        on_append: Callable[[int, str], None] | None = None,
    ) -> None:
        self._path = Path(path)
        try:
            data = self._path.read_bytes()
        except FileNotFoundError:
            data = b""
        except OSError as exc:
            raise LedgerError(f"cannot read ledger {os.fspath(path)!r}: {exc}") from exc
        if anchor is not None:
            check_anchor(data, anchor, where=os.fspath(path))
        self._on_append = on_append
        entries, head = _parse(data)
        self._entries: list[dict[str, Any]] = entries
        self._head = head
        self._size = len(data)
        self._open_ids = {e["entry_id"] for e in entries if e["status"] == "pending"} - {
            e["entry_id"] for e in entries if e["status"] == "complete"
        }

    @property
    def path(self) -> Path:
        """The ledger file."""
        return self._path

    @property
    def head_hash(self) -> str:
        """SHA-256 of the last line's bytes (:data:`GENESIS_HASH` for an empty ledger)."""
        return self._head

    @property
    def entries(self) -> list[dict[str, Any]]:
        """Copies of every line written so far, in order."""
        return [json.loads(_canonical(e)) for e in self._entries]

    @property
    def pending_ids(self) -> frozenset[str]:
        """Entry ids begun but not completed."""
        return frozenset(self._open_ids)

    def begin(
        self,
        *,
        client: str,
        round: int,  # noqa: A002 - the ledger field is called "round"
        event: DpEvent,
        delta: float,
        model_hash: str,
        release: str,
        randomness: str,
        params: Mapping[str, Any] | None = None,
        declaration: Mapping[str, Any] | None = None,
        job_id: str = "",
        data_fingerprint: str = "",
        **extra: Any,
    ) -> str:
        """Record, durably, that ``client`` is about to run ``event`` in ``round``; return its id.

        ``release`` names what the mechanism's output is; ``randomness`` is the label of where its
        sampling and noise come from (:data:`~secfedtl.privacy.randomness.RANDOMNESS_LABELS`);
        ``params`` the rest of its public parameters; ``declaration`` what the client declared
        public about itself. Call this BEFORE running the mechanism. The entry counts as spent
        from now on, even if :meth:`complete` is never called.

        Raises:
            LedgerError: invalid arguments (nothing written), or the write failed.
        """
        if not isinstance(release, str) or not release:
            raise LedgerError("release must name what the mechanism releases")
        if randomness not in RANDOMNESS_LABELS[:2]:
            raise LedgerError(f"randomness must be one of {RANDOMNESS_LABELS[:2]}, got {randomness!r}")
        if not isinstance(job_id, str) or not isinstance(data_fingerprint, str):
            raise LedgerError("job_id and data_fingerprint must be strings")
        if not isinstance(client, str) or not client:
            raise LedgerError("client must be a non-empty string")
        if isinstance(round, bool) or not isinstance(round, int) or round < 0:
            raise LedgerError(f"round must be an int >= 0, got {round!r}")
        if not isinstance(event, DpEvent):
            raise LedgerError(f"event must be a registered DP event, got {type(event).__name__}")
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
            raise LedgerError(f"delta must be in (0, 1), got {delta!r}")
        if not isinstance(model_hash, str):
            raise LedgerError("model_hash must be a string")
        entry_id = uuid.uuid4().hex
        obj: dict[str, Any] = {
            "entry_id": entry_id,
            "status": "pending",
            "client": client,
            "round": round,
            "delta": float(delta),
            "model_hash": model_hash,
            "release": release,
            "randomness": randomness,
            "params": dict(params or {}),
            "declaration": dict(declaration or {}),
            "job_id": job_id,
            "data_fingerprint": data_fingerprint,
            "timestamp": _utc_now(),
            "extra": dict(extra),
        }
        if isinstance(event, PoissonGaussianEvent):
            obj.update(version=LEDGER_VERSION, **event.to_dict())
        else:
            obj.update(version=EVENT_LEDGER_VERSION, event=event.to_dict())
        self._append(obj)
        self._open_ids.add(entry_id)
        return entry_id

    def complete(self, entry_id: str, **extra: Any) -> None:
        """Record that the pending entry ``entry_id`` finished normally.

        Raises:
            LedgerError: ``entry_id`` is unknown or already completed (nothing written), or the
                write failed.
        """
        if entry_id not in self._open_ids:
            raise LedgerError(f"no pending ledger entry {entry_id!r}")
        begun = next(
            e for e in self._entries if e["entry_id"] == entry_id and e["status"] == "pending"
        )
        copied = _copied_fields(begun["version"])
        obj: dict[str, Any] = {
            "version": begun["version"],
            "entry_id": entry_id,
            "status": "complete",
            **{k: begun[k] for k in copied},
            "timestamp": _utc_now(),
            "extra": dict(extra),
        }
        self._append(obj)
        self._open_ids.discard(entry_id)

    def _append(self, obj: dict[str, Any]) -> None:
        created = not self._path.exists()
        try:
            fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        except OSError as exc:
            raise LedgerError(f"cannot open ledger {os.fspath(self._path)!r}: {exc}") from exc
        try:
            _lock(fd)  # released when fd is closed
            size = os.fstat(fd).st_size
            if size != self._size:
                self._catch_up(fd, size)
            obj["prev_hash"] = self._head
            try:
                obj["line_hash"] = _line_hash(obj)
                line = _canonical(obj) + b"\n"
            except (TypeError, ValueError) as exc:
                raise LedgerError(f"ledger fields must be JSON-serialisable and finite: {exc}") from exc
            stored = json.loads(line)
            try:
                written = os.write(fd, line)
                if written != len(line):
                    raise OSError(f"short write ({written} of {len(line)} bytes)")
                os.fsync(fd)
            except OSError as exc:
                # Undo a partial line so the chain stays valid.
                try:
                    os.ftruncate(fd, self._size)
                    os.fsync(fd)
                except OSError:
                    pass
                raise LedgerError(f"cannot write ledger: {exc}") from exc
        finally:
            os.close(fd)
        if created:
            _fsync_dir(self._path.parent.resolve())
        self._entries.append(stored)
        self._head = _sha256(line)
        self._size += len(line)
        if self._on_append is not None:
            self._on_append(self._size, self._head)

    @property
    def size(self) -> int:
        """Bytes of the ledger this writer has verified or written."""
        return self._size

    def _catch_up(self, fd: int, size: int) -> None:
        """Another writer (another process holding the same ledger) appended lines since we last
        wrote: verify the whole file again and continue after its lines. Anything but a valid
        continuation of exactly what this writer has seen is refused."""
        changed = LedgerError(
            f"ledger {os.fspath(self._path)!r} changed under this writer "
            f"({size} bytes, expected at least {self._size} starting with what it wrote); reopen it"
        )
        if size < self._size:
            raise changed
        data = os.pread(fd, size, 0)
        entries, head = _parse(data)
        if entries[: len(self._entries)] != self._entries:
            raise changed
        self._entries = entries
        self._head = head
        self._size = size
