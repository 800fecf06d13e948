"""Tests for secfedtl.privacy.budget: refusal before any change, persistence, BudgetGuard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from secfedtl.errors import AccountingError, LedgerError, PrivacyBudgetExceeded
from secfedtl.privacy.accountants import compute_epsilon
from secfedtl.privacy.budget import BudgetGuard, PrivacyBudget
from secfedtl.privacy.events import PoissonGaussianEvent
from secfedtl.privacy.ledger import Ledger, verify_ledger

DELTA = 1e-5
ROUND = PoissonGaussianEvent(sample_rate=0.02, noise_multiplier=1.1, steps=150)
HUGE = PoissonGaussianEvent(sample_rate=0.1, noise_multiplier=1.0, steps=2000)


@pytest.fixture(params=["rdp", "prv"])
def accountant(request: pytest.FixtureRequest) -> str:
    return request.param


def test_spend_and_projection(accountant: str) -> None:
    budget = PrivacyBudget(epsilon=5.0, delta=DELTA, accountant=accountant)
    assert budget.spent_epsilon == 0.0
    projected = budget.projected_epsilon(ROUND)
    assert projected == pytest.approx(compute_epsilon([ROUND], DELTA, accountant))
    assert budget.events == ()  # projection changes nothing
    budget.spend(ROUND)
    assert budget.spent_epsilon == pytest.approx(projected)
    assert budget.remaining_epsilon == pytest.approx(5.0 - projected)


def test_refusal_changes_nothing(accountant: str) -> None:
    budget = PrivacyBudget(epsilon=3.0, delta=DELTA, accountant=accountant)
    budget.spend(ROUND)
    before = budget.to_dict()
    with pytest.raises(PrivacyBudgetExceeded, match=r"epsilon to \d+\.\d+.*budget of 3"):
        budget.spend(HUGE)
    assert budget.to_dict() == before


def test_spend_until_refused_never_exceeds_budget() -> None:
    budget = PrivacyBudget(epsilon=2.0, delta=DELTA)
    spent = 0
    with pytest.raises(PrivacyBudgetExceeded):
        for _ in range(100):
            budget.spend(ROUND)
            spent += 1
    assert spent >= 1
    assert budget.spent_epsilon <= 2.0 < budget.projected_epsilon(ROUND)
    assert len(budget.events) == spent


@pytest.mark.parametrize(
    "kwargs",
    [
        {"epsilon": 0.0},
        {"epsilon": -1.0},
        {"epsilon": float("inf")},
        {"delta": 0.0},
        {"delta": 1.0},
        {"accountant": "pld"},
    ],
)
def test_bad_budget_raises(kwargs: dict) -> None:
    with pytest.raises(AccountingError):
        PrivacyBudget(**{"epsilon": 1.0, "delta": DELTA, **kwargs})


def test_save_load_round_trip(tmp_path: Path, accountant: str) -> None:
    budget = PrivacyBudget(epsilon=4.0, delta=DELTA, accountant=accountant)
    budget.spend(ROUND)
    path = tmp_path / "budget.json"
    budget.save(path)
    loaded = PrivacyBudget.load(path)
    assert loaded.to_dict() == budget.to_dict()
    assert loaded.spent_epsilon == budget.spent_epsilon
    assert [p.name for p in tmp_path.iterdir()] == ["budget.json"]  # no temp file left


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(version=2),
        lambda d: d.update(kind="something"),
        lambda d: d.update(epsilon=-1),
        lambda d: d["accountant"].update(accountant="nope"),
        lambda d: d.update(extra=1),
    ],
)
def test_load_rejects_bad_state(tmp_path: Path, mutate) -> None:
    budget = PrivacyBudget(epsilon=4.0, delta=DELTA)
    data = budget.to_dict()
    mutate(data)
    path = tmp_path / "budget.json"
    path.write_text(json.dumps(data))
    with pytest.raises(AccountingError):
        PrivacyBudget.load(path)
    path.write_text("{not json")
    with pytest.raises(AccountingError):
        PrivacyBudget.load(path)


def test_from_ledger_counts_pending(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.jsonl")
    done = ledger.begin(client="a", round=0, event=ROUND, delta=DELTA, model_hash="m", release="test", randomness="csprng")
    ledger.complete(done)
    ledger.begin(client="a", round=1, event=ROUND, delta=DELTA, model_hash="m", release="test", randomness="csprng")
    ledger.begin(client="b", round=0, event=HUGE, delta=DELTA, model_hash="m", release="test", randomness="csprng")
    budget = PrivacyBudget.from_ledger(ledger.entries, "a", epsilon=8.0, delta=DELTA)
    assert budget.events == (ROUND, ROUND)


# --- BudgetGuard ---------------------------------------------------------------------------


def make_guard(tmp_path: Path, epsilon: float = 3.0) -> BudgetGuard:
    return BudgetGuard(
        client="a",
        budget=PrivacyBudget(epsilon=epsilon, delta=DELTA),
        ledger=Ledger(tmp_path / "l.jsonl"),
        state_path=tmp_path / "budget.json",
    )


def test_guard_records_pending_then_complete(tmp_path: Path) -> None:
    guard = make_guard(tmp_path)
    with guard.charge(ROUND, round=0, model_hash="m0", lr=0.1) as entry_id:
        entries = verify_ledger(tmp_path / "l.jsonl")
        assert [e["status"] for e in entries] == ["pending"]  # written before the block runs
        assert entries[0]["entry_id"] == entry_id and entries[0]["extra"] == {"lr": 0.1}
    entries = verify_ledger(tmp_path / "l.jsonl")
    assert [e["status"] for e in entries] == ["pending", "complete"]
    assert PrivacyBudget.load(tmp_path / "budget.json").events == (ROUND,)


def test_guard_refuses_before_writing_anything(tmp_path: Path) -> None:
    guard = make_guard(tmp_path)
    with guard.charge(ROUND, round=0, model_hash="m0"):
        pass
    ledger_before = (tmp_path / "l.jsonl").read_bytes()
    state_before = (tmp_path / "budget.json").read_bytes()
    budget_before = guard.budget.to_dict()
    ran = False
    with pytest.raises(PrivacyBudgetExceeded):
        with guard.charge(HUGE, round=1, model_hash="m1"):
            ran = True
    assert not ran
    assert (tmp_path / "l.jsonl").read_bytes() == ledger_before
    assert (tmp_path / "budget.json").read_bytes() == state_before
    assert guard.budget.to_dict() == budget_before


def test_guard_failure_inside_block_still_counts(tmp_path: Path) -> None:
    guard = make_guard(tmp_path)
    with pytest.raises(RuntimeError, match="diverged"):
        with guard.charge(ROUND, round=0, model_hash="m0"):
            raise RuntimeError("diverged")
    entries = verify_ledger(tmp_path / "l.jsonl")
    assert [e["status"] for e in entries] == ["pending"]
    assert guard.budget.events == (ROUND,)
    assert PrivacyBudget.load(tmp_path / "budget.json").events == (ROUND,)


def test_guard_catches_up_after_restart(tmp_path: Path) -> None:
    """State saved before a crash lags the ledger: a new guard adopts the ledger's events."""
    guard = make_guard(tmp_path, epsilon=8.0)
    with guard.charge(ROUND, round=0, model_hash="m0"):
        pass
    # Simulate a crash after begin(): a pending entry the state file never saw.
    guard.ledger.begin(client="a", round=1, event=ROUND, delta=DELTA, model_hash="m1", release="test", randomness="csprng")
    restarted = BudgetGuard(
        client="a",
        budget=PrivacyBudget.load(tmp_path / "budget.json"),
        ledger=Ledger(tmp_path / "l.jsonl"),
        state_path=tmp_path / "budget.json",
    )
    assert restarted.budget.events == (ROUND, ROUND)
    assert PrivacyBudget.load(tmp_path / "budget.json").events == (ROUND, ROUND)


def test_guard_rejects_budget_that_disagrees_with_ledger(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.jsonl")
    ledger.begin(client="a", round=0, event=ROUND, delta=DELTA, model_hash="m", release="test", randomness="csprng")
    budget = PrivacyBudget(epsilon=8.0, delta=DELTA, events=[HUGE])
    with pytest.raises(LedgerError):
        BudgetGuard(client="a", budget=budget, ledger=ledger)
    assert budget.events == (HUGE,)
