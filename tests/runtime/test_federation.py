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
from secfedtl.runtime import wire
from secfedtl.runtime.job import (
    JobConfig,
    build_client_node,
    build_job,
    build_server,
    build_source,
    open_hospital_state,
    run_job,
)
from secfedtl.runtime.pool import LocalPool, ProcessPool
from secfedtl.runtime.roster import Roster
from secfedtl.secagg import codec
from secfedtl.secagg import messages as m
from secfedtl.training import flatten_params

ROOT = Path(__file__).resolve().parents[2]


def small_config(**overrides: object) -> JobConfig:
    data = JobConfig.load(None).to_dict()
    data["job"]["rounds"] = 2
    data["privacy"]["personalise"] = False
    data["model"]["source_epochs"] = 60
    data["job"]["id"] = "test-job"
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        data[section][key] = value
    return JobConfig.from_mapping(data)


def test_server_never_holds_an_individual_update_and_aggregate_is_the_weighted_mean(tmp_path, monkeypatch):
    job = build_job(small_config(), tmp_path)
    federation = job.federation
    updates: dict[str, tuple[np.ndarray, int]] = {}
    for name, client in job.clients.items():
        real = client.train_round

        def spy(*, _real=real, _name=name, **kwargs):
            update = _real(**kwargs)
            updates[_name] = (flatten_params(update.model_update), update.weight)
            return update

        monkeypatch.setattr(client, "train_round", spy)
    # Everything that crosses from the clients to the server: record the pool's replies.
    pool = federation.pool
    heard: list[bytes] = []
    real_exchange = pool.exchange

    def exchange(requests, *, phase):
        replies = real_exchange(requests, phase=phase)
        heard.extend(b for blobs in replies.values() for b in blobs)
        return replies

    monkeypatch.setattr(pool, "exchange", exchange)
    servers = []
    real_server = fed_mod.ServerSession

    def capture(**kwargs):
        server = real_server(**kwargs)
        servers.append(server)
        return server

    monkeypatch.setattr(fed_mod, "ServerSession", capture)
    before = federation.global_params.copy()
    report = federation.run_round()
    assert report.status == "ok" and set(report.included) == set(job.clients)
    assert len(updates) == 3
    # The encoded inputs, as each node built them (the same encoding and rounding seed).
    cfg = federation._secagg_config(3, clip=federation.clip, max_weight=federation.max_samples)  # noqa: SLF001
    fields = {n: cfg.encoding.encode(updates[n][0], weight=updates[n][1],
                                     rng=np.random.default_rng([job.hospitals[n].node._seed, 0]))  # noqa: SLF001
              for n in updates}
    masked = []
    for blob in heard:
        msg = wire.decode(blob)
        if isinstance(msg, wire.TaskReply):
            assert msg.info == {} and msg.status == "ready"  # no count, no delta, no timings
        else:
            inner = codec.decode(msg.data)
            if isinstance(inner, m.MaskedInput):
                masked.append(inner.vector)
    assert len(masked) == 3
    for vector in masked:
        for field in fields.values():
            plain = field.astype("<u4").tobytes()
            assert vector != plain
            assert plain[:64] not in vector  # not even the first 16 words appear in clear
    # What the server keeps: only the running sum (never equal to one client's vector).
    kept = [v for v in vars(servers[0]).values() if isinstance(v, np.ndarray)]
    for array in kept:
        for field in fields.values():
            assert not np.array_equal(array, field)
    # The update equals the plain weighted mean of the clipped updates, within the quantisation bound.
    clip = job.config["secagg"]["clip"]
    weights = np.array([updates[n][1] for n in sorted(updates)], dtype=np.float64)
    stacked = np.stack([np.clip(updates[n][0], -clip, clip) for n in sorted(updates)])
    expected = before + (weights[:, None] * stacked).sum(axis=0) / weights.sum()
    bound = cfg.encoding.error_bound(len(updates)) / weights.sum()
    assert np.max(np.abs(federation.global_params - expected)) <= bound
    assert report.total_weight == int(weights.sum())
    # ... and the weights are the declared public counts, not the private ones
    assert {n: w for n, (_, w) in updates.items()} == job.config["declared"]["records"]
    job.close()


def test_ledger_audit_matches_metrics_and_a_dropout_does_not_stop_the_run(tmp_path):
    config = small_config(job__rounds=3)
    out = tmp_path / "run"
    job = build_job(config, out)
    # Round 1: VA crashes while training; round 2: Hungary falls silent after sending shares.
    job.nodes["va"].faults = {1: "train"}
    job.nodes["hungary"].faults = {2: "mask"}
    job.federation.run(3, checkpoint=out / "checkpoint.json")
    statuses = [r.status for r in job.federation.history]
    assert statuses[0] == "ok"
    # With 3 hospitals, losing one leaves each survivor below the threshold: the round fails
    # cleanly (never a partial sum) and the next round runs.
    assert statuses[1] == "failed" and statuses[2] == "failed"
    assert "va" in job.federation.history[1].dropped
    assert job.federation.rounds_done == 3
    for name, guard in job.guards.items():
        report = audit_ledger(job.states[name].ledger.path, delta=config["privacy"]["delta"])
        assert report.to_dict()["chain"] == "ok" and report.certified
        assert report.client(name).rounds == 3  # the crashed round still counts as spent
        assert report.client(name).epsilon == pytest.approx(guard.budget.spent_epsilon, rel=1e-9)
        assert report.client(name).pending == (1 if name == "va" else 0)
    job.close()


def test_round_completes_when_enough_clients_survive(tmp_path):
    config = small_config()
    source = build_source(config)
    twins = {"hungary-2": "hungary", "va-2": "va"}
    roster, keys = Roster.generate([*config["job"]["clients"], *twins])
    hospitals = {n: build_client_node(config, n, source, open_hospital_state(config, n, source.centres, tmp_path),
                                      identity=keys[n], roster=roster)
                 for n in config["job"]["clients"]}
    nodes = {n: h.node for n, h in hospitals.items()}
    # Four-client cohorts tolerate one dropout: a second node for two hospitals, under other names.
    for twin, original in twins.items():
        clone = build_client_node(config, original, source,
                                  open_hospital_state(config, original, source.centres, tmp_path / twin),
                                  identity=keys[twin], roster=roster)
        clone.node.name = twin
        nodes[twin] = clone.node
    nodes["switzerland"].faults = {0: "mask"}
    federation = build_server(config, source, LocalPool(nodes), roster)
    report = federation.run_round()
    assert report.status == "ok", report.reason
    assert "switzerland" in report.dropped and "switzerland" not in report.included
    assert len(report.included) == 4


def test_worker_processes_give_the_same_round_as_in_process(tmp_path, fork_safe):
    """Clients in forked workers (parallel) run the same protocol: with the same seeds and
    reproducible noise, the global model after a round is identical to the in-process run."""
    results = {}
    for workers in (2, 0):  # workers first: the in-process run may initialise CUDA, and forks cannot use it
        out = tmp_path / f"w{workers}"
        # the test-only seeded randomness needs secure_mode off
        config = small_config(privacy__secure_mode=False, privacy__insecure_reproducible=True)
        source = build_source(config)
        out.mkdir()
        nodes, hospitals = {}, {}
        roster, keys = Roster.generate(config["job"]["clients"])
        for n in config["job"]["clients"]:
            hospitals[n] = build_client_node(config, n, source, open_hospital_state(config, n, source.centres, out),
                                             identity=keys[n], roster=roster)
            nodes[n] = hospitals[n].node
        pool = ProcessPool(nodes, workers=workers) if workers else LocalPool(nodes)
        try:
            federation = build_server(config, source, pool, roster)
            report = federation.run_round()
            evaluated = federation.query("evaluate")
        finally:
            pool.close()
        assert report.status == "ok"
        assert set(evaluated) == set(nodes) and all(i == {"status": "done"} for i in evaluated.values())
        for n in nodes:
            audit = audit_ledger(out / n / "ledger.jsonl", delta=config["privacy"]["delta"])
            assert audit.to_dict()["chain"] == "ok" and not audit.certified  # seeded: never certified
        reports = {n: hospitals[n].reports.read("evaluate", 1) for n in nodes}  # local reports, on disk
        results[workers] = (federation.global_params, {n: r["accuracy"] for n, r in reports.items()})
    np.testing.assert_array_equal(results[0][0], results[2][0])
    assert results[0][1] == results[2][1]


def test_metrics_and_audit_agree(tmp_path):
    out = tmp_path / "demo"
    metrics = run_job(small_config(), out, progress=False)
    sim = metrics["simulation_only"]
    for name, eps in sim["final"]["epsilon"].items():
        audit = audit_ledger(sim["ledgers"][name], delta=metrics["delta"])
        assert audit.to_dict()["chain"] == "ok" and audit.certified
        assert audit.client(name).epsilon == pytest.approx(eps, rel=1e-9)
        assert eps <= metrics["epsilon_budget"] + 1e-9
    assert {"pooled_test_accuracy", "per_client_test_accuracy", "epsilon"} <= set(sim["final"])
    assert len(metrics["server"]["rounds"]) == 2 and len(sim["rounds"]) == 2
    assert (out / "report.png").stat().st_size > 0


def test_personalised_pooled_accuracy_is_over_the_same_test_rows(tmp_path):
    from secfedtl.runtime.job import build_centres

    config = small_config(privacy__personalise=True, job__rounds=1)
    metrics = run_job(config, tmp_path / "p", progress=False)
    final = metrics["simulation_only"]["final"]
    assert set(metrics["server"]["personalisation"].values()) == {"done"}
    sizes = {n: len(c.y_test) for n, c in build_centres(config).items() if n in final["personalised_test_accuracy"]}
    correct = sum(round(final["personalised_test_accuracy"][n] * k) for n, k in sizes.items())
    assert final["personalised_pooled_test_accuracy"] == pytest.approx(correct / sum(sizes.values()))
    assert len(sizes) == 3


def test_a_prv_budget_is_spent_by_prv_calibrated_noise(tmp_path):
    """With ``accountant = "prv"`` the noise is calibrated by PRV, so the tighter accountant's
    budget is what the rounds use up (RDP calibration would leave part of it unspent)."""
    out = tmp_path / "prv"
    metrics = run_job(small_config(privacy__accountant="prv"), out, progress=False)
    assert metrics["accountant"] == "prv"
    final = metrics["simulation_only"]["final"]
    for name, eps in final["epsilon"].items():
        assert 0.95 <= eps <= 1.0 + 1e-9
        assert final["epsilon_prv"][name] == pytest.approx(eps, rel=1e-9)
        assert audit_ledger(metrics["simulation_only"]["ledgers"][name]).to_dict()["chain"] == "ok"


def test_resume_after_kill_counts_everything(tmp_path):
    """SIGKILL a demo mid-run, resume it: all rounds done, and every ledger entry the killed
    process began is still counted (about 20 s, so it runs in CI with the rest)."""
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "secfedtl.cli", "demo", "--out", str(out), "--rounds", "4", "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (out / "checkpoint.json").exists():
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (out / "checkpoint.json").exists()
    ledgers = {n: out / "privacy-state" / n / "ledger.jsonl" for n in ("hungary", "switzerland", "va")}
    spent_before = sum(1 for path in ledgers.values() for line in path.read_text().splitlines()
                       if json.loads(line)["status"] == "pending")
    done = subprocess.run([sys.executable, "-m", "secfedtl.cli", "demo", "--resume", str(out), "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in metrics["server"]["rounds"]] == [0, 1, 2, 3]
    entries = [json.loads(line) for path in ledgers.values() for line in path.read_text().splitlines()]
    begun = [e for e in entries if e["status"] == "pending"]
    assert len(begun) >= spent_before
    for name, eps in metrics["simulation_only"]["final"]["epsilon"].items():
        audit = audit_ledger(ledgers[name], delta=metrics["delta"])
        assert audit.to_dict()["chain"] == "ok"
        assert audit.client(name).epsilon == pytest.approx(eps, rel=1e-9)
        # every begun entry, including the killed round's, is counted
        events = [event_from_dict({k: e[k] for k in ("mechanism", "sample_rate", "noise_multiplier", "steps")})
                  for e in begun if e["client"] == name]
        assert eps == pytest.approx(compute_epsilon(events, metrics["delta"]), rel=1e-9)


def test_a_config_round_trips_through_its_toml(tmp_path):
    config = small_config(job__rounds=4)
    path = tmp_path / "job.toml"
    path.write_text(config.to_toml(), encoding="utf-8")
    assert JobConfig.load(path).to_dict() == config.to_dict()


def test_a_missing_job_file_is_one_clear_error(tmp_path, capsys):
    from secfedtl.cli import main as cli_main

    assert cli_main(["run", str(tmp_path / "missing.toml"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "cannot read job file" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
