"""Tests for secfedtl.privacy.ledger: format, hash chain, tamper detection, crash safety."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secfedtl.errors import LedgerError, LedgerTamperedError
from secfedtl.privacy.audit import audit_ledger
from secfedtl.privacy.events import PoissonGaussianEvent
from secfedtl.privacy.ledger import (
    GENESIS_HASH,
    Ledger,
    read_verified_ledger,
    spent_events,
    verify_ledger,
)

REPO = Path(__file__).resolve().parents[2]
EVENT = PoissonGaussianEvent(sample_rate=0.02, noise_multiplier=1.1, steps=150)
REQUIRED = {
    "client", "round", "mechanism", "sample_rate", "noise_multiplier", "steps", "status",
    "prev_hash", "delta", "timestamp", "model_hash", "entry_id", "version",
}  # fmt: skip


def write_sample(path: Path) -> Ledger:
    """Five lines: a complete, b complete, a pending."""
    ledger = Ledger(path)
    for client in ("a", "b"):
        entry = ledger.begin(client=client, round=0, event=EVENT, delta=1e-5, model_hash="m0", release="test", randomness="csprng")
        ledger.complete(entry, loss=0.5)
    ledger.begin(client="a", round=1, event=EVENT, delta=1e-5, model_hash="m1", release="test", randomness="csprng", note="x")
    return ledger


def test_format_and_chain(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    write_sample(path)
    raw_lines = path.read_bytes().splitlines(keepends=True)
    assert len(raw_lines) == 5
    prev = GENESIS_HASH
    for raw in raw_lines:
        obj = json.loads(raw)
        assert REQUIRED <= set(obj)
        assert raw == json.dumps(obj, sort_keys=True, separators=(",", ":")).encode() + b"\n"
        assert obj["prev_hash"] == prev
        assert obj["timestamp"].endswith("+00:00")
        prev = hashlib.sha256(raw).hexdigest()
    statuses = [json.loads(r)["status"] for r in raw_lines]
    assert statuses == ["pending", "complete", "pending", "complete", "pending"]
    entries = verify_ledger(path)
    assert entries[1]["extra"] == {"loss": 0.5} and entries[4]["extra"] == {"note": "x"}
    assert entries[0]["entry_id"] == entries[1]["entry_id"]
    assert read_verified_ledger(path)[1] == prev


def test_reopen_continues_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    first = write_sample(path)
    pending = next(iter(first.pending_ids))
    again = Ledger(path)
    assert again.head_hash == first.head_hash
    assert again.pending_ids == {pending}
    again.complete(pending)
    again.begin(client="c", round=0, event=EVENT, delta=1e-5, model_hash="m", release="test", randomness="csprng")
    assert len(verify_ledger(path)) == 7


def test_spent_events_counts_every_begun_entry_once(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    write_sample(path)
    spent = spent_events(verify_ledger(path))
    assert spent == {"a": [(0, EVENT, 1e-5), (1, EVENT, 1e-5)], "b": [(0, EVENT, 1e-5)]}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"client": ""},
        {"client": 3},
        {"round": -1},
        {"round": True},
        {"event": {"sample_rate": 0.1}},
        {"delta": 0.0},
        {"delta": 1.0},
        {"model_hash": None},
        {"bad": float("nan")},
        {"bad": object()},
        {"release": ""},
        {"randomness": "numpy"},
        {"randomness": "unrecorded"},
        {"job_id": 3},
    ],
)
def test_bad_begin_raises_and_writes_nothing(tmp_path: Path, kwargs: dict) -> None:
    path = tmp_path / "ledger.jsonl"
    ledger = write_sample(path)
    before = path.read_bytes()
    args = {"client": "a", "round": 2, "event": EVENT, "delta": 1e-5, "model_hash": "m", "release": "test", "randomness": "csprng", **kwargs}
    with pytest.raises(LedgerError):
        ledger.begin(**args)
    assert path.read_bytes() == before
    # The writer is still usable and the chain still valid.
    ledger.begin(client="a", round=2, event=EVENT, delta=1e-5, model_hash="m", release="test", randomness="csprng")
    assert len(verify_ledger(path)) == 6


def test_complete_unknown_or_twice_raises(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path)
    entry = ledger.begin(client="a", round=0, event=EVENT, delta=1e-5, model_hash="m", release="test", randomness="csprng")
    ledger.complete(entry)
    before = path.read_bytes()
    with pytest.raises(LedgerError):
        ledger.complete(entry)
    with pytest.raises(LedgerError):
        ledger.complete("nope")
    assert path.read_bytes() == before


def test_two_writers_of_one_ledger_continue_each_others_chain(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    ledger = write_sample(path)
    other = Ledger(path)
    other.begin(client="z", round=0, event=EVENT, delta=1e-5, model_hash="m", release="test", randomness="csprng")
    ledger.begin(client="a", round=9, event=EVENT, delta=1e-5, model_hash="m", release="test", randomness="csprng")  # catches up first
    entries = verify_ledger(path)
    assert len(entries) == 7 and [e["client"] for e in entries[-2:]] == ["z", "a"]
    assert ledger.head_hash == Ledger(path).head_hash and len(ledger.entries) == 7


def test_writer_refuses_a_file_rewritten_under_it(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    ledger = write_sample(path)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-1]))  # the last line removed: a valid but shorter chain
    Ledger(path).begin(client="z", round=0, event=EVENT, delta=1e-5, model_hash="m", release="test", randomness="csprng")  # now longer again
    with pytest.raises(LedgerError, match="changed under this writer"):
        ledger.begin(client="a", round=9, event=EVENT, delta=1e-5, model_hash="m", release="test", randomness="csprng")
    assert len(verify_ledger(path)) == len(lines)


def _append_many(path: str, client: str, count: int) -> None:
    ledger = Ledger(path)
    for r in range(count):
        entry = ledger.begin(client=client, round=r, event=EVENT, delta=1e-5, model_hash="m", release="test", randomness="csprng")
        ledger.complete(entry)


def test_processes_appending_concurrently_keep_one_valid_chain(tmp_path: Path) -> None:
    import multiprocessing

    path = tmp_path / "ledger.jsonl"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(str(path), f"c{i}", 15)) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    entries = verify_ledger(path)
    assert len(entries) == 3 * 15 * 2
    for i in range(3):
        mine = [e for e in entries if e["client"] == f"c{i}"]
        assert [e["round"] for e in mine if e["status"] == "complete"] == list(range(15))


def test_opening_a_tampered_ledger_raises(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    write_sample(path)
    path.write_bytes(path.read_bytes().replace(b'"noise_multiplier":1.1', b'"noise_multiplier":9.1', 1))
    with pytest.raises(LedgerTamperedError, match="line 1"):
        Ledger(path)


# --- tamper detection ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("ledger") / "ledger.jsonl"
    write_sample(path)
    return path.read_bytes()


def first_bad_line(data: bytes, tmp_path: Path) -> int:
    path = tmp_path / "tampered.jsonl"
    path.write_bytes(data)
    with pytest.raises(LedgerTamperedError) as info:
        verify_ledger(path)
    assert str(info.value).startswith(f"line {info.value.line_number}:")
    return info.value.line_number


@given(data=st.data())
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_changed_byte_is_detected_at_its_line(
    sample_bytes: bytes, tmp_path: Path, data: st.DataObject
) -> None:
    lines = sample_bytes.splitlines(keepends=True)
    index = data.draw(st.integers(0, len(lines) - 1), label="line")
    position = data.draw(st.integers(0, len(lines[index]) - 1), label="byte")
    new = data.draw(st.integers(0, 255).filter(lambda b: b != lines[index][position]), label="new")
    line = bytearray(lines[index])
    line[position] = new
    tampered = b"".join(lines[:index]) + bytes(line) + b"".join(lines[index + 1 :])
    assert first_bad_line(tampered, tmp_path) == index + 1


@given(data=st.data())
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_inserted_byte_is_detected(sample_bytes: bytes, tmp_path: Path, data: st.DataObject) -> None:
    position = data.draw(st.integers(0, len(sample_bytes) - 1))
    byte = data.draw(st.binary(min_size=1, max_size=1))
    tampered = sample_bytes[:position] + byte + sample_bytes[position:]
    line = sample_bytes[:position].count(b"\n") + 1
    # an inserted newline at the end of a line leaves that line intact and adds an empty one after it
    expected = {line, line + 1} if byte == b"\n" else {line}
    assert first_bad_line(tampered, tmp_path) in expected


@pytest.mark.parametrize("index", range(4))  # deleting the last line needs an anchor, below
def test_deleted_line_is_detected(sample_bytes: bytes, tmp_path: Path, index: int) -> None:
    lines = sample_bytes.splitlines(keepends=True)
    del lines[index]
    assert first_bad_line(b"".join(lines), tmp_path) == index + 1


@pytest.mark.parametrize(("i", "j"), [(0, 1), (1, 3), (3, 4), (0, 4)])
def test_reordered_lines_are_detected(sample_bytes: bytes, tmp_path: Path, i: int, j: int) -> None:
    lines = sample_bytes.splitlines(keepends=True)
    lines[i], lines[j] = lines[j], lines[i]
    assert first_bad_line(b"".join(lines), tmp_path) == i + 1


@pytest.mark.parametrize("copy_of", [0, 2, 4])
def test_duplicated_line_is_detected(sample_bytes: bytes, tmp_path: Path, copy_of: int) -> None:
    lines = sample_bytes.splitlines(keepends=True)
    lines.insert(copy_of + 1, lines[copy_of])
    assert first_bad_line(b"".join(lines), tmp_path) == copy_of + 2


@pytest.mark.parametrize("cut", [1, 2, 40])
def test_truncated_last_line_is_detected(sample_bytes: bytes, tmp_path: Path, cut: int) -> None:
    assert first_bad_line(sample_bytes[:-cut], tmp_path) == 5


def test_appended_garbage_is_detected(sample_bytes: bytes, tmp_path: Path) -> None:
    assert first_bad_line(sample_bytes + b"{}\n", tmp_path) == 6
    assert first_bad_line(sample_bytes + b"\n", tmp_path) == 6


def test_removed_tail_is_detected_with_anchored_head(sample_bytes: bytes, tmp_path: Path) -> None:
    path = tmp_path / "l.jsonl"
    path.write_bytes(sample_bytes)
    _, head = read_verified_ledger(path)
    lines = sample_bytes.splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-1]))
    verify_ledger(path)  # a shorter valid chain: undetectable without an anchor
    with pytest.raises(LedgerTamperedError):
        verify_ledger(path, expected_head=head)


def test_rehashed_forgery_of_complete_line_is_rejected(tmp_path: Path) -> None:
    """Even with valid hashes, a complete line must agree with its pending line."""
    from secfedtl.privacy import ledger as ledger_mod

    path = tmp_path / "l.jsonl"
    Ledger(path).begin(client="a", round=0, event=EVENT, delta=1e-5, model_hash="m", release="test", randomness="csprng")
    pending = json.loads(path.read_bytes())
    forged = dict(pending, status="complete", steps=1)
    forged["prev_hash"] = hashlib.sha256(path.read_bytes()).hexdigest()
    forged["line_hash"] = ledger_mod._line_hash(forged)
    with path.open("ab") as fh:
        fh.write(ledger_mod._canonical(forged) + b"\n")
    with pytest.raises(LedgerTamperedError, match="line 2"):
        verify_ledger(path)


def test_missing_file_raises_ledger_error(tmp_path: Path) -> None:
    with pytest.raises(LedgerError):
        verify_ledger(tmp_path / "absent.jsonl")


# --- crash safety --------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import sys, time
    from secfedtl.privacy.events import PoissonGaussianEvent
    from secfedtl.privacy.ledger import Ledger
    ledger = Ledger(sys.argv[1])
    event = PoissonGaussianEvent(sample_rate=0.02, noise_multiplier=1.1, steps=150)
    ledger.begin(client="crashy", round=7, event=event, delta=1e-5, model_hash="m", release="test", randomness="csprng")
    print("BEGUN", flush=True)
    time.sleep(60)  # "training"; killed before complete()
    """
)


def test_sigkill_after_begin_leaves_a_counted_pending_entry(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    write_sample(path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, env=env, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "BEGUN"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    entries = verify_ledger(path)
    assert entries[-1]["status"] == "pending" and entries[-1]["client"] == "crashy"
    report = audit_ledger(path, accountants=("rdp",))
    crashy = report.client("crashy")
    assert crashy.pending == 1 and crashy.steps == 150
    assert crashy.epsilon > 0
    # The ledger can be reopened and continued after the crash.
    Ledger(path).begin(client="crashy", round=8, event=EVENT, delta=1e-5, model_hash="m", release="test", randomness="csprng")
    assert audit_ledger(path, accountants=("rdp",)).client("crashy").steps == 300
