"""Tests for secfedtl.privacy.audit and the `secfedtl audit` command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from secfedtl.cli import main as cli_main
from secfedtl.errors import AccountingError, LedgerTamperedError
from secfedtl.privacy.accountants import compute_epsilon
from secfedtl.privacy.audit import audit_ledger
from secfedtl.privacy.events import PoissonGaussianEvent
from secfedtl.privacy.ledger import Ledger

REPO = Path(__file__).resolve().parents[2]
A = PoissonGaussianEvent(sample_rate=0.02, noise_multiplier=1.1, steps=150)
B = PoissonGaussianEvent(sample_rate=0.05, noise_multiplier=1.5, steps=40)


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path)
    for r in range(3):
        ledger.complete(ledger.begin(client="h1", round=r, event=A, delta=1e-5, model_hash="m", release="test", randomness="csprng"))
    ledger.complete(ledger.begin(client="h2", round=0, event=B, delta=1e-6, model_hash="m", release="test", randomness="csprng"))
    ledger.begin(client="h2", round=1, event=A, delta=1e-6, model_hash="m", release="test", randomness="csprng")  # crashed
    return path


def test_audit_recomputes_each_client(ledger_path: Path) -> None:
    report = audit_ledger(ledger_path)
    h1, h2 = report.client("h1"), report.client("h2")
    assert (h1.rounds, h1.steps, h1.entries, h1.pending) == (3, 450, 3, 0)
    assert (h2.rounds, h2.steps, h2.entries, h2.pending) == (2, 190, 2, 1)
    assert h1.delta == 1e-5 and h2.delta == 1e-6
    by = dict(h2.epsilon_by_accountant)
    assert by["rdp"] == pytest.approx(compute_epsilon([B, A], 1e-6, "rdp"))
    assert by["prv"] == pytest.approx(compute_epsilon([B, A], 1e-6, "prv"))
    assert h2.epsilon == by["rdp"] and by["prv"] < by["rdp"]
    assert report.lines == 9


def test_audit_with_explicit_delta(ledger_path: Path) -> None:
    report = audit_ledger(ledger_path, 1e-3, accountants=("rdp",))
    assert report.client("h1").delta == 1e-3
    assert report.client("h1").epsilon == pytest.approx(compute_epsilon([A] * 3, 1e-3))
    with pytest.raises(AccountingError):
        audit_ledger(ledger_path, 0.0)
    with pytest.raises(AccountingError):
        audit_ledger(ledger_path, accountants=("pld",))


def run_cli(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli_main(["audit", *args])
    return code, capsys.readouterr().out


def test_cli_json_intact(ledger_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_cli(str(ledger_path), "--json", "--accountant", "all", capsys=capsys)
    assert code == 0
    data = json.loads(out)  # exactly one JSON object
    assert data["chain"] == "ok"
    assert set(data["clients"]) == {"h1", "h2"}
    h2 = data["clients"]["h2"]
    assert {"epsilon", "delta", "rounds", "steps", "epsilon_by_accountant", "pending"} <= set(h2)
    assert set(h2["epsilon_by_accountant"]) == {"rdp", "prv"}
    assert h2["epsilon"] == h2["epsilon_by_accountant"]["rdp"]
    assert h2["pending"] == 1 and h2["steps"] == 190


def test_cli_single_accountant(ledger_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_cli(str(ledger_path), "--json", "--accountant", "prv", capsys=capsys)
    assert code == 0
    h1 = json.loads(out)["clients"]["h1"]
    assert set(h1["epsilon_by_accountant"]) == {"prv"}
    assert h1["epsilon"] == h1["epsilon_by_accountant"]["prv"]


def test_cli_table(ledger_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_cli(str(ledger_path), capsys=capsys)
    assert code == 0
    assert "h1" in out and "h2" in out and "chain ok" in out


def test_cli_tampered(ledger_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = ledger_path.read_bytes().splitlines(keepends=True)
    lines[3] = lines[3].replace(b'"steps":150', b'"steps":15')
    ledger_path.write_bytes(b"".join(lines))
    code, out = run_cli(str(ledger_path), "--json", capsys=capsys)
    assert code == 1
    data = json.loads(out)
    assert data["chain"] == "broken" and data["first_bad_line"] == 4
    code, out = run_cli(str(ledger_path), capsys=capsys)
    assert code == 1 and "first bad line 4" in out
    with pytest.raises(LedgerTamperedError):
        audit_ledger(ledger_path)


def test_cli_missing_file_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = run_cli(str(tmp_path / "absent.jsonl"), capsys=capsys)
    assert code == 2


def test_cli_as_a_process(ledger_path: Path) -> None:
    """`python -m secfedtl.cli audit` end to end, exit status 0 then 1."""
    cmd = [sys.executable, "-m", "secfedtl.cli", "audit", str(ledger_path), "--json"]
    cmd += ["--accountant", "rdp"]  # torch-free, so the process starts fast
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    ok = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["chain"] == "ok"
    data = bytearray(ledger_path.read_bytes())
    data[10] ^= 1
    ledger_path.write_bytes(bytes(data))
    bad = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert bad.returncode == 1
    assert json.loads(bad.stdout)["first_bad_line"] == 1


def _v1_ledger(path: Path) -> None:
    """A version-1 ledger line pair, written as secfedtl wrote it before ledger v2."""
    from secfedtl.privacy.ledger import GENESIS_HASH, _canonical, _line_hash, _sha256

    prev, lines = GENESIS_HASH, []
    for status in ("pending", "complete"):
        obj = {"version": 1, "entry_id": "e1", "status": status, "client": "old", "round": 0, **A.to_dict(),
               "delta": 1e-5, "model_hash": "m", "timestamp": "2026-01-01T00:00:00+00:00", "prev_hash": prev,
               "extra": {}}
        obj["line_hash"] = _line_hash(obj)
        line = _canonical(obj) + b"\n"
        lines.append(line)
        prev = _sha256(line)
    path.write_bytes(b"".join(lines))


def test_audit_lists_every_release_with_its_share(ledger_path: Path) -> None:
    report = audit_ledger(ledger_path)
    h1 = report.client("h1")
    assert [r.round for r in h1.releases] == [0, 1, 2] and all(r.release == "test" for r in h1.releases)
    assert h1.releases[0].epsilon == pytest.approx(compute_epsilon([A], 1e-5, "rdp"))
    assert h1.releases[-1].cumulative_epsilon == pytest.approx(h1.epsilon)
    assert report.certified and h1.certified
    data = report.to_dict()["clients"]["h1"]
    assert len(data["releases"]) == 3 and data["releases"][0]["mechanism"]["mechanism"] == "poisson_gaussian"


def test_seeded_and_v1_entries_are_never_certified(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "seeded.jsonl"
    ledger = Ledger(path)
    ledger.complete(ledger.begin(client="h1", round=0, event=A, delta=1e-5, model_hash="m", release="dpsgd_update",
                                 randomness="insecure_seeded", declaration={"records": 10}))
    report = audit_ledger(path)
    assert not report.certified and report.client("h1").declaration == {"records": 10}
    assert cli_main(["audit", str(path)]) == 3
    assert "NOT PRIVATE" in capsys.readouterr().err
    assert cli_main(["audit", str(path), "--test-ledger"]) == 0
    old = tmp_path / "v1.jsonl"
    _v1_ledger(old)
    v1 = audit_ledger(old)
    assert v1.client("old").releases[0].randomness == "unrecorded" and not v1.certified
    assert v1.client("old").epsilon == pytest.approx(compute_epsilon([A], 1e-5, "rdp"))
    capsys.readouterr()
    assert cli_main(["audit", str(old), "--json"]) == 3
    assert json.loads(capsys.readouterr().out)["certified"] is False


def test_an_empty_ledger_is_an_error_not_chain_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert cli_main(["audit", str(empty)]) == 2
    assert "empty ledger" in capsys.readouterr().err


@pytest.mark.parametrize("content", [b"hello\n", b"hello", b'{"a": 1}\n', b"[1, 2]\n"])
def test_a_file_that_is_not_a_ledger_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              content: bytes) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(content)
    assert cli_main(["audit", str(path)]) == 2
    err = capsys.readouterr().err
    assert "not a secfedtl ledger" in err and "TAMPERED" not in err
