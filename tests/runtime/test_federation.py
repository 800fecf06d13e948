"""End-to-end rounds on the bundled heart data: privacy of what the server holds, correctness of
the aggregate, ledger consistency, dropouts, and resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from secfedtl.privacy.accountants import compute_epsilon
from secfedtl.privacy.audit import audit_ledger
from secfedtl.privacy.events import event_from_dict
from secfedtl.runtime import federation as fed_mod
from secfedtl.runtime.job import JobConfig, build_job, run_job
from secfedtl.secagg import messages as m
from secfedtl.training import flatten_delta

ROOT = Path(__file__).resolve().parents[2]


def small_config(**overrides: object) -> JobConfig:
    data = JobConfig.load(None).to_dict()
    data["job"]["rounds"] = 2
    data["privacy"]["personalise"] = False
    data["model"]["source_epochs"] = 60
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        data[section][key] = value
    return JobConfig.from_mapping(data)


def test_server_never_holds_an_individual_update_and_aggregate_is_the_weighted_mean(tmp_path, monkeypatch):
    job = build_job(small_config(), tmp_path)
    federation = job.federation
    deltas: dict[str, tuple[np.ndarray, int]] = {}
    for name, client in job.clients.items():
        real = client.train_round

        def spy(*, _real=real, _name=name, **kwargs):
            update = _real(**kwargs)
            deltas[_name] = (flatten_delta(update.delta), update.num_samples)
            return update

        monkeypatch.setattr(client, "train_round", spy)
    received: list[bytes] = []
    servers = []
    real_build = fed_mod.build_sessions

    def capture(params, fields):
        clients, server = real_build(params, fields)
        servers.append((server, [f.copy() for f in fields]))
        real_receive = server.receive

        def receive(message):
            if isinstance(message, m.MaskedInput):
                received.append(message.vector)
            return real_receive(message)

        server.receive = receive
        return clients, server

    monkeypatch.setattr(fed_mod, "build_sessions", capture)
    before = federation.global_params.copy()
    report = federation.run_round()
    assert report.status == "ok" and set(report.included) == set(job.clients)

    server, fields = servers[0]
    # What the server received: masked vectors, none equal to (or containing) any encoded input.
    assert len(received) == len(fields)
    for blob in received:
        for field in fields:
            plain = field.astype("<u4").tobytes()
            assert blob != plain
            assert plain[:64] not in blob  # not even the first 16 words appear in clear
    # What the server keeps: only the running sum (never equal to one client's vector).
    kept = [v for v in vars(server).values() if isinstance(v, np.ndarray)]
    for array in kept:
        for field in fields:
            assert not np.array_equal(array, field)
    # The update equals the plain weighted mean of the clipped deltas, within the quantisation bound.
    clip = job.config["secagg"]["clip"]
    weights = np.array([deltas[n][1] for n in sorted(deltas)], dtype=np.float64)
    stacked = np.stack([np.clip(deltas[n][0], -clip, clip) for n in sorted(deltas)])
    expected = before + (weights[:, None] * stacked).sum(axis=0) / weights.sum()
    cfg_scale = federation._secagg_config(len(deltas)).encoding  # noqa: SLF001
    bound = cfg_scale.error_bound(len(deltas)) / weights.sum()
    assert np.max(np.abs(federation.global_params - expected)) <= bound
    assert report.total_weight == int(weights.sum())


def test_ledger_audit_matches_metrics_and_a_dropout_does_not_stop_the_run(tmp_path):
    config = small_config(job__rounds=3)
    out = tmp_path / "run"
    job = build_job(config, out)
    # Round 1: VA crashes while training; round 2: Hungary falls silent after sending shares.
    job.federation.faults = {1: {"va": "train"}, 2: {"hungary": "mask"}}
    job.federation.run(3, checkpoint=out / "checkpoint.json")
    statuses = [r.status for r in job.federation.history]
    assert statuses[0] == "ok"
    # With 3 hospitals, losing one leaves each survivor below the threshold: the round fails
    # cleanly (never a partial sum) and the next round runs.
    assert statuses[1] == "failed" and statuses[2] == "failed"
    assert job.federation.rounds_done == 3
    report = audit_ledger(out / "ledger.jsonl", delta=config["privacy"]["delta"])
    assert report.to_dict()["chain"] == "ok"
    for name, guard in job.guards.items():
        assert report.client(name).rounds == 3  # the crashed round still counts as spent
        assert report.client(name).epsilon == pytest.approx(guard.budget.spent_epsilon, rel=1e-9)
    assert report.client("va").pending == 1


def test_round_completes_when_enough_clients_survive(tmp_path):
    data = small_config().to_dict()
    data["job"]["clients"] = ["hungary", "switzerland", "va"]
    job = build_job(JobConfig.from_mapping(data), tmp_path)
    federation = job.federation
    # Four-client cohorts tolerate one dropout: duplicate a hospital under another name.
    import copy

    from secfedtl.privacy.budget import BudgetGuard, PrivacyBudget
    from secfedtl.privacy.ledger import Ledger

    clients = dict(job.clients)
    for twin, original in (("hungary-2", "hungary"), ("va-2", "va")):
        clone = copy.deepcopy(clients[original])
        clone._guard = BudgetGuard(client=twin, budget=PrivacyBudget(epsilon=1.0, delta=1e-5),  # noqa: SLF001
                                   ledger=Ledger(tmp_path / f"{twin}.jsonl"))
        clients[twin] = clone
    federation.clients = clients
    federation.faults = {0: {"switzerland": "mask"}}
    report = federation.run_round()
    assert report.status == "ok", report.reason
    assert "switzerland" in report.dropped and "switzerland" not in report.included
    assert len(report.included) == 4


def test_metrics_and_audit_agree(tmp_path):
    out = tmp_path / "demo"
    metrics = run_job(small_config(), out, progress=False)
    audit = audit_ledger(out / "ledger.jsonl", delta=metrics["delta"])
    assert audit.to_dict()["chain"] == "ok"
    for name, eps in metrics["final"]["epsilon"].items():
        assert audit.client(name).epsilon == pytest.approx(eps, rel=1e-9)
        assert eps <= metrics["epsilon_budget"] + 1e-9
    assert {"pooled_test_accuracy", "per_client_test_accuracy", "epsilon"} <= set(metrics["final"])
    assert len(metrics["rounds"]) == 2 and (out / "report.png").stat().st_size > 0


@pytest.mark.slow
def test_resume_after_kill_counts_everything(tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "secfedtl.cli", "demo", "--out", str(out), "--rounds", "4", "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (out / "checkpoint.json").exists():
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (out / "checkpoint.json").exists()
    spent_before = sum(1 for line in (out / "ledger.jsonl").read_text().splitlines()
                       if json.loads(line)["status"] == "pending")
    done = subprocess.run([sys.executable, "-m", "secfedtl.cli", "demo", "--resume", str(out), "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [0, 1, 2, 3]
    audit = audit_ledger(out / "ledger.jsonl", delta=metrics["delta"])
    assert audit.to_dict()["chain"] == "ok"
    entries = [json.loads(line) for line in (out / "ledger.jsonl").read_text().splitlines()]
    begun = [e for e in entries if e["status"] == "pending"]
    assert len(begun) >= spent_before
    for name, eps in metrics["final"]["epsilon"].items():
        assert audit.client(name).epsilon == pytest.approx(eps, rel=1e-9)
        # every begun entry, including the killed round's, is counted
        events = [event_from_dict({k: e[k] for k in ("mechanism", "sample_rate", "noise_multiplier", "steps")})
                  for e in begun if e["client"] == name]
        assert eps == pytest.approx(compute_epsilon(events, metrics["delta"]), rel=1e-9)
