"""secfedtl.privacy.state: a hospital's budget belongs to its data, not to a job's output folder."""

from __future__ import annotations

import json
import stat

import numpy as np
import pytest

from secfedtl.errors import ConfigError, LedgerError, LedgerTamperedError, PrivacyBudgetExceeded
from secfedtl.privacy.events import PoissonGaussianEvent
from secfedtl.privacy.state import PrivacyState, data_fingerprint

EVENT = PoissonGaussianEvent(sample_rate=0.1, noise_multiplier=3.0, steps=5)
FP = data_fingerprint([np.arange(6.0).reshape(3, 2), np.array([0, 1, 0])])


def open_state(path, **kw):
    args = dict(client="h1", epsilon=2.0, delta=1e-5, accountant="rdp", fingerprint=FP)
    args.update(kw)
    return PrivacyState.open(path, **args)


def spend(state, job="job-a", rounds=2):
    guard = state.guard(job_id=job, declaration={"records": 100})
    for r in range(rounds):
        with guard.charge(EVENT, round=r, model_hash="m", release="dpsgd_update", randomness="csprng"):
            pass
    return guard


def test_a_second_job_continues_the_same_budget(tmp_path):
    state = open_state(tmp_path / "h1")
    first = spend(state).budget.spent_epsilon
    state.close()
    again = open_state(tmp_path / "h1")  # another job, another output folder: same state
    assert again.budget.spent_epsilon == pytest.approx(first)
    assert len(again.events_before("job-b")) == 2 and again.events_before("job-a") == []
    guard = again.guard(job_id="job-b", declaration={"records": 100})
    assert guard.budget.spent_epsilon == pytest.approx(first)
    entries = again.ledger.entries
    assert {e["job_id"] for e in entries} == {"job-a"} and entries[0]["data_fingerprint"] == FP
    assert entries[0]["declaration"] == {"records": 100}
    again.close()


def test_files_are_private(tmp_path):
    state = open_state(tmp_path / "h1")
    spend(state, rounds=1)
    assert stat.S_IMODE((tmp_path / "h1").stat().st_mode) == 0o700
    for name in ("ledger.jsonl", "state.json"):
        assert stat.S_IMODE((tmp_path / "h1" / name).stat().st_mode) == 0o600
    state.close()


@pytest.mark.parametrize("damage", ["delete", "truncate", "rewrite", "delete_state"])
def test_a_damaged_ledger_is_refused(tmp_path, damage):
    state = open_state(tmp_path / "h1")
    spend(state)
    state.close()
    ledger = tmp_path / "h1" / "ledger.jsonl"
    lines = ledger.read_bytes().splitlines(keepends=True)
    if damage == "delete":
        ledger.unlink()
    elif damage == "truncate":
        ledger.write_bytes(b"".join(lines[:-2]))
    elif damage == "rewrite":  # a consistent chain of its own (no events), written over the old one
        ledger.unlink()
        other = open_state(tmp_path / "elsewhere")
        other.close()
        ledger.write_bytes(b"")
    else:
        (tmp_path / "h1" / "state.json").unlink()
    with pytest.raises(LedgerTamperedError):
        open_state(tmp_path / "h1")


def test_a_rewritten_chain_with_other_content_is_refused(tmp_path):
    state = open_state(tmp_path / "h1")
    spend(state)
    state.close()
    # a fresh, valid ledger with fewer spends, then re-spent to the same length elsewhere
    elsewhere = open_state(tmp_path / "x")
    spend(elsewhere, rounds=2)
    elsewhere.close()
    (tmp_path / "h1" / "ledger.jsonl").write_bytes((tmp_path / "x" / "ledger.jsonl").read_bytes())
    with pytest.raises(LedgerTamperedError):
        open_state(tmp_path / "h1")


def test_a_job_cannot_change_the_budget_or_the_client(tmp_path):
    open_state(tmp_path / "h1").close()
    with pytest.raises(ConfigError, match="budget"):
        open_state(tmp_path / "h1", epsilon=5.0)
    with pytest.raises(ConfigError, match="privacy state of"):
        open_state(tmp_path / "h1", client="h2")


def test_two_jobs_at_once_are_refused(tmp_path):
    state = open_state(tmp_path / "h1")
    with pytest.raises(ConfigError, match="another job"):
        open_state(tmp_path / "h1")
    state.close()
    open_state(tmp_path / "h1").close()


def test_exhausted_budget_stays_exhausted_across_jobs(tmp_path):
    state = open_state(tmp_path / "h1", epsilon=1.0)
    guard = state.guard(job_id="a", declaration={})
    big = PoissonGaussianEvent(sample_rate=1.0, noise_multiplier=5.0, steps=1)  # epsilon ~0.8
    with guard.charge(big, round=0, model_hash="m", release="x", randomness="csprng"):
        pass
    state.close()
    state = open_state(tmp_path / "h1", epsilon=1.0)
    with pytest.raises(PrivacyBudgetExceeded):
        with state.guard(job_id="b", declaration={}).charge(big, round=0, model_hash="m", release="x",
                                                             randomness="csprng"):
            pass
    state.close()


def test_new_data_continues_the_budget_and_is_recorded(tmp_path):
    state = open_state(tmp_path / "h1")
    spend(state)
    state.close()
    other = data_fingerprint([np.arange(8.0).reshape(4, 2), np.array([0, 1, 0, 1])])  # a record added
    state = open_state(tmp_path / "h1", fingerprint=other)
    assert len(state.budget.events) == 2  # adding a record must not reset the budget
    assert json.loads((tmp_path / "h1" / "state.json").read_text())["fingerprints"] == [FP, other]
    state.close()


def test_bad_state_file_and_fingerprint(tmp_path):
    with pytest.raises(ConfigError):
        open_state(tmp_path / "h1", fingerprint="abc")
    open_state(tmp_path / "h1").close()
    (tmp_path / "h1" / "state.json").write_text("{}")
    with pytest.raises(LedgerError):
        open_state(tmp_path / "h1")


def test_fingerprint_depends_on_every_byte():
    a = np.arange(6.0).reshape(3, 2)
    b = a.copy()
    b[2, 1] += 1e-9
    assert data_fingerprint([a]) != data_fingerprint([b])
    assert data_fingerprint([a]) != data_fingerprint([a.astype(np.float32)])


def test_audit_checks_the_ledger_against_its_state_anchor(tmp_path):
    from secfedtl.cli import main as cli_main

    state = open_state(tmp_path / "h1")
    spend(state, rounds=3)
    state.close()
    ledger = tmp_path / "h1" / "ledger.jsonl"
    assert cli_main(["audit", str(ledger)]) == 0
    lines = ledger.read_bytes().splitlines(keepends=True)
    ledger.write_bytes(b"".join(lines[:-2]))  # a valid, shorter chain: only the anchor shows the cut
    assert cli_main(["audit", str(ledger)]) == 1


def test_renaming_a_hospital_does_not_start_a_new_budget(tmp_path):
    open_state(tmp_path / "h1").close()
    with pytest.raises(ConfigError, match="already protected"):
        open_state(tmp_path / "h1-renamed", client="h1-renamed")


def test_deleting_files_cannot_lift_the_lock(tmp_path):
    state = open_state(tmp_path / "h1")
    for leftover in (tmp_path / "h1").glob("*.lock"):
        leftover.unlink()
    with pytest.raises(ConfigError, match="another job"):
        open_state(tmp_path / "h1")
    state.close()
