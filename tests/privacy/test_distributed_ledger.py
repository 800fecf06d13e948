"""Distributed-DP events in the ledger (version-3 lines) and in `secfedtl audit`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from secfedtl.cli import main as cli_main
from secfedtl.errors import LedgerError, LedgerTamperedError
from secfedtl.privacy.accountants import compute_epsilon
from secfedtl.privacy.audit import audit_ledger
from secfedtl.privacy.budget import PrivacyBudget
from secfedtl.privacy.events import PoissonGaussianEvent, PoissonSkellamEvent
from secfedtl.privacy.ledger import Ledger, spent_events, verify_ledger

GAUSS = PoissonGaussianEvent(sample_rate=0.02, noise_multiplier=1.1, steps=150)
SKELLAM = PoissonSkellamEvent(sample_rate=0.01, steps=200, share_variance=3.0e5, honest_parties=4,
                              l2_bound=1200.0, l1_bound=1200.0 * 128, dimension=16384, scale=1100.0, bits=18)


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path)
    ledger.complete(ledger.begin(client="h1", round=0, event=GAUSS, delta=1e-5, model_hash="m", release="dpsgd_update",
                                 randomness="csprng"))
    for r in (1, 2):
        ledger.complete(ledger.begin(client="h1", round=r, event=SKELLAM, delta=1e-5, model_hash="m",
                                     release="distributed_dpsgd_share", randomness="csprng", params={"clip_norm": 1.0}))
    ledger.begin(client="h2", round=1, event=SKELLAM, delta=1e-5, model_hash="m", release="distributed_dpsgd_share",
                 randomness="csprng")  # crashed: still spent
    return path


def test_skellam_lines_are_version_3_and_gaussian_lines_stay_version_2(ledger_path: Path) -> None:
    lines = verify_ledger(ledger_path)
    assert [line["version"] for line in lines] == [2, 2, 3, 3, 3, 3, 3]
    v3 = lines[2]
    assert v3["event"] == SKELLAM.to_dict() and "sample_rate" not in v3 and "mechanism" not in v3
    assert lines[3]["event"] == v3["event"]  # the complete line copies the event
    spent = spent_events(lines)
    assert [e for _, e, _ in spent["h1"]] == [GAUSS, SKELLAM, SKELLAM]
    assert [e for _, e, _ in spent["h2"]] == [SKELLAM]


def test_a_changed_event_field_is_tampering(ledger_path: Path) -> None:
    raw = ledger_path.read_bytes()
    assert b'"honest_parties":4' in raw
    ledger_path.write_bytes(raw.replace(b'"honest_parties":4', b'"honest_parties":9', 1))
    with pytest.raises(LedgerTamperedError) as info:
        verify_ledger(ledger_path)
    assert info.value.line_number == 3


def test_an_invalid_event_is_refused_before_writing(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.jsonl")
    with pytest.raises(LedgerError):
        ledger.begin(client="h", round=0, event={"mechanism": "poisson_skellam"}, delta=1e-5,  # type: ignore[arg-type]
                     model_hash="m", release="x", randomness="csprng")
    assert ledger.entries == []


def test_audit_recomputes_distributed_entries(ledger_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = audit_ledger(ledger_path)
    h1, h2 = report.client("h1"), report.client("h2")
    assert h1.epsilon == compute_epsilon([GAUSS, SKELLAM, SKELLAM], 1e-5)
    assert h2.epsilon == compute_epsilon([SKELLAM], 1e-5) and h2.pending == 1
    assert dict(h1.epsilon_by_accountant).keys() == {"rdp"}  # PRV cannot interpret poisson_skellam
    assert h1.steps == 150 + 400
    assert [r.mechanism["mechanism"] for r in h1.releases] == ["poisson_gaussian", "poisson_skellam", "poisson_skellam"]
    assert report.certified
    assert cli_main(["audit", str(ledger_path), "--releases", "--accountant", "all"]) == 0
    out = capsys.readouterr().out
    assert "n/a" in out and "poisson_skellam" in out and "honest=4" in out
    assert cli_main(["audit", str(ledger_path), "--json", "--accountant", "all"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["clients"]["h1"]["epsilon"] == h1.epsilon
    assert data["clients"]["h1"]["releases"][1]["mechanism"] == SKELLAM.to_dict()
    # PRV alone cannot audit it: a specific error, exit 2 (never a wrong number)
    assert cli_main(["audit", str(ledger_path), "--accountant", "prv"]) == 2


def test_a_budget_charges_distributed_events(tmp_path: Path) -> None:
    budget = PrivacyBudget(epsilon=compute_epsilon([SKELLAM], 1e-5) * 1.01, delta=1e-5)
    budget.spend(SKELLAM)
    assert budget.spent_epsilon == compute_epsilon([SKELLAM], 1e-5)
    from secfedtl.errors import PrivacyBudgetExceeded

    with pytest.raises(PrivacyBudgetExceeded):
        budget.check(SKELLAM)
