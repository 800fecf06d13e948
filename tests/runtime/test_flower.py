"""Integration: the heart job on a real Flower deployment on 127.0.0.1.

One ``flower-superlink`` and three ``flower-supernode`` processes (insecure mode: loopback only),
one secfedtl node agent per hospital, ``flwr run`` of secfedtl's Flower app. Three rounds with
DP-SGD and secure aggregation; the DP noise is seeded (``insecure_reproducible_noise``) so the
run can be compared with the in-process runner. In the third round, once the server has started
its ``consistency`` phase (the hospitals' masked inputs are in), one SuperNode is killed: the round
must complete, with that hospital counted as a dropout (silent from then on; its masked input
stays in the sum and the others' shares remove its self-mask). With three hospitals a dropout
*before* masking leaves every survivor below the Shamir threshold, so such a round fails cleanly
by design (tests/runtime/test_federation.py shows both cases in process). Every process is
started here and killed here by its process id.

Slow (minutes: Flower starts a process per message), so it carries the ``flower`` mark and runs
in ``make test-flower`` (part of CI), not in ``make test``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")

from secfedtl.privacy.audit import audit_ledger  # noqa: E402
from secfedtl.runtime.deploy import LocalFlower, read_status, wait_for, wait_for_server  # noqa: E402
from secfedtl.runtime.job import JobConfig, run_job  # noqa: E402

pytestmark = pytest.mark.flower

ROUNDS = 3
KILL_ROUND = 2
VICTIM = "va"
PHASE_TIMEOUT = 60.0


def _config() -> dict:
    data = JobConfig.load(None).to_dict()
    data["job"]["rounds"] = ROUNDS
    data["privacy"]["personalise"] = False
    data["privacy"]["secure_mode"] = False
    data["privacy"]["insecure_reproducible_noise"] = True
    data["model"]["source_epochs"] = 100
    return data


def _write_toml(data: dict, path: Path) -> None:
    lines = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _started(progress: Path, phase: str, occurrence: int) -> bool:
    if not progress.exists():
        return False
    lines = [json.loads(x) for x in progress.read_text(encoding="utf-8").splitlines() if x.strip()]
    return sum(1 for x in lines if x["phase"] == f"{phase}:start") >= occurrence


@pytest.mark.filterwarnings("ignore:privacy.insecure_reproducible_noise")
def test_heart_job_on_flower_matches_in_process_and_survives_a_killed_supernode(tmp_path: Path) -> None:
    data = _config()
    job = tmp_path / "job.toml"
    _write_toml(data, job)
    config = JobConfig.from_mapping(data)
    hospitals = list(config["job"]["clients"])
    server_out = tmp_path / "server"

    with LocalFlower(job=job, hospitals=hospitals, root=tmp_path / "processes") as fl:
        fl.start_agents({h: tmp_path / "hospitals" / h for h in hospitals})
        fl.start_superlink()
        for h in hospitals:
            fl.start_supernode(h)
        fl.run({"job": str(job), "out": str(server_out), "phase-timeout": PHASE_TIMEOUT, "poll-interval": 0.1})
        # Round KILL_ROUND's consistency phase has begun: kill that hospital's SuperNode (by its pid).
        wait_for(lambda: _started(server_out / "progress.jsonl", "consistency", KILL_ROUND + 1) or
                 read_status(server_out).get("state") == "failed",
                 timeout=1500, what=f"round {KILL_ROUND}'s consistency phase", interval=0.1, procs=fl.processes)
        assert read_status(server_out).get("state") != "failed", read_status(server_out)
        fl.processes.kill(f"supernode-{VICTIM}")
        wait_for_server(server_out, timeout=1500)
        flower = json.loads((server_out / "metrics.json").read_text(encoding="utf-8"))

    rows = flower["rounds"]
    assert [r["status"] for r in rows] == ["ok"] * ROUNDS
    for r in rows[:KILL_ROUND]:
        assert sorted(r["included"]) == sorted(hospitals) and r["dropped"] == [] and r["silent"] == {}
    killed = rows[KILL_ROUND]
    assert list(killed["silent"]) == [VICTIM] and killed["silent"][VICTIM] in ("consistency", "unmask")
    assert sorted(killed["included"]) == sorted(hospitals)  # its masked input arrived before the kill
    assert killed["total_weight"] == rows[0]["total_weight"]

    # The same job in process, same seed, no kill: identical rounds until the kill.
    reference = run_job(config, tmp_path / "in-process", progress=False)
    ref_rows = reference["rounds"]
    for r in range(KILL_ROUND + 1):
        # The round-r digest covers the global weights sent at round r (float64 bytes): equal
        # digests mean bit-identical global models after each of the first KILL_ROUND rounds.
        assert rows[r]["model_hash"] == ref_rows[r]["model_hash"], f"round {r} started from other weights"
    for r in range(KILL_ROUND):
        assert rows[r]["total_weight"] == ref_rows[r]["total_weight"]
        assert rows[r]["pooled_test_accuracy"] == pytest.approx(ref_rows[r]["pooled_test_accuracy"])
    ref_checkpoint = json.loads((tmp_path / "in-process" / "checkpoint.json").read_text(encoding="utf-8"))
    assert ref_checkpoint["rounds_done"] == ROUNDS

    # Each hospital's own ledger: the chain verifies, and it spent what the in-process run spent
    # (the killed hospital trained in its last round before it was killed: that charge stays).
    ref_audit = audit_ledger(tmp_path / "in-process" / "ledger.jsonl")
    for h in hospitals:
        audit = audit_ledger(tmp_path / "hospitals" / h / "ledger.jsonl")
        mine = audit.client(h)
        assert [c.client for c in audit.clients] == [h]
        assert mine.rounds == ROUNDS and mine.pending == 0
        assert mine.epsilon == pytest.approx(ref_audit.client(h).epsilon)
        assert mine.epsilon <= config["privacy"]["epsilon"] + 1e-9
    assert np.isfinite(flower["final"]["pooled_test_accuracy"])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-m", "flower", "-q"]))
