"""Integration: the heart job on a real Flower deployment on 127.0.0.1.

A ``flower-superlink`` and one ``flower-supernode`` per node (insecure mode: loopback only), one
secfedtl node agent per node, ``flwr run`` of secfedtl's Flower app. Three rounds with DP-SGD and
secure aggregation; DP sampling and noise are seeded (``insecure_reproducible``, test only) so
the run can be compared with the in-process runner. The server records its whole view
(``record-view``) and every message in it is checked: a masked payload, key material, or a
data-free status (:mod:`secfedtl.testing.server_view`). In the third round, once the server has started its
``share`` phase, one SuperNode is killed: the round must complete without it, counting it as a
dropout. Every process is started here and killed here by its process id.

Four nodes, not three: the three hospitals plus a second node serving Hungary's data under
another name (as tests/runtime/test_federation.py does in process). With only three parties a
complete SecAgg graph has two neighbours per client and a Shamir threshold of two, so losing any
one during secure aggregation leaves the others' masks unrecoverable: such a round fails cleanly
by design (never a partial sum). Four parties survive one dropout.

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
from secfedtl.runtime.deploy import APP_PYPROJECT, LocalFlower, read_status, wait_for, wait_for_server  # noqa: E402
from secfedtl.jobs.heart import (  # noqa: E402
    HeartConfig,
    build_client_node,
    build_server,
    build_source,
    open_hospital_state,
)
from secfedtl.federated.roster import Roster  # noqa: E402
from secfedtl.runtime.pool import LocalPool  # noqa: E402
from secfedtl.testing.server_view import classify, read_recorded_view  # noqa: E402

pytestmark = pytest.mark.flower

ROUNDS = 3
KILL_ROUND = 2
VICTIM = "va"
TWIN = "hungary-twin"
PHASE_TIMEOUT = 60.0

# The app for this test: secfedtl's ClientApp, and a ServerApp federating the four nodes.
TWIN_APP = f"""
from flwr.serverapp import ServerApp
from secfedtl.runtime.flower import run_server

server_app = ServerApp()


@server_app.main()
def main(grid, context):
    run_server(grid, context.run_config, clients=["hungary", "switzerland", "va", "{TWIN}"])
"""


def _config() -> dict:
    data = HeartConfig.load(None).to_dict()
    data["job"]["rounds"] = ROUNDS
    data["privacy"]["personalise"] = False
    data["privacy"]["secure_mode"] = False
    data["privacy"]["insecure_reproducible"] = True
    data["model"]["source_epochs"] = 100
    return data


def _write_toml(data: dict, path: Path) -> None:
    path.write_text(HeartConfig.from_mapping(data).to_toml(), encoding="utf-8")


def _started(progress: Path, phase: str, occurrence: int) -> bool:
    if not progress.exists():
        return False
    lines = [json.loads(x) for x in progress.read_text(encoding="utf-8").splitlines() if x.strip()]
    return sum(1 for x in lines if x["phase"] == f"{phase}:start") >= occurrence


def _in_process(config: HeartConfig, out: Path) -> list[dict]:
    """The same four nodes in process (LocalPool), the same seeds: the reference rounds."""
    source = build_source(config)
    roster, keys = Roster.generate([*config["job"]["clients"], TWIN])
    nodes = {n: build_client_node(config, n, source, open_hospital_state(config, n, source.centres, out),
                                  identity=keys[n], roster=roster).node
             for n in config["job"]["clients"]}
    twin = build_client_node(config, "hungary", source,
                             open_hospital_state(config, "hungary", source.centres, out / "twin"),
                             identity=keys[TWIN], roster=roster).node
    twin.name = TWIN
    nodes[TWIN] = twin
    federation = build_server(config, source, LocalPool(nodes), roster)
    federation.run(ROUNDS)
    return [r.to_dict() for r in federation.history]


@pytest.mark.filterwarnings("ignore:privacy.insecure_reproducible")
def test_heart_job_on_flower_matches_in_process_and_survives_a_killed_supernode(tmp_path: Path) -> None:
    data = _config()
    job = tmp_path / "job.toml"
    _write_toml(data, job)
    config = HeartConfig.from_mapping(data)
    nodes = [*config["job"]["clients"], TWIN]
    server_out = tmp_path / "server"
    app = tmp_path / "app"
    app.mkdir()
    (app / "pyproject.toml").write_text(APP_PYPROJECT.replace('serverapp = "secfedtl.runtime.flower:server_app"',
                                                              'serverapp = "twin_app:server_app"'), encoding="utf-8")
    (app / "twin_app.py").write_text(TWIN_APP, encoding="utf-8")

    with LocalFlower(job=job, hospitals=nodes, root=tmp_path / "processes", twins={TWIN: "hungary"}, app=app) as fl:
        fl.start_agents({n: tmp_path / "hospitals" / n for n in nodes})
        fl.start_superlink()
        for n in nodes:
            fl.start_supernode(n)
        fl.run({"job": str(job), "out": str(server_out), "phase-timeout": PHASE_TIMEOUT, "poll-interval": 0.1,
                "record-view": True})
        # Round KILL_ROUND's share phase has begun: kill that hospital's SuperNode (by its pid).
        wait_for(lambda: _started(server_out / "progress.jsonl", "share", KILL_ROUND + 1) or
                 read_status(server_out).get("state") == "failed",
                 timeout=1500, what=f"round {KILL_ROUND}'s share phase", interval=0.1, procs=fl.processes)
        assert read_status(server_out).get("state") != "failed", read_status(server_out)
        fl.processes.kill(f"supernode-{VICTIM}")
        wait_for_server(server_out, timeout=1500)
        flower = json.loads((server_out / "metrics.json").read_text(encoding="utf-8"))

    rows = flower["server"]["rounds"]
    assert "simulation_only" not in flower  # the Flower server has no hospital's data
    # Everything the server received over Flower: masked payloads, key material, data-free statuses.
    view = read_recorded_view(server_out / "server_view.jsonl")
    kinds = [classify(blob)[0] for _, _, blob in view]
    assert kinds.count("masked") >= 3 * ROUNDS and set(kinds) <= {"status", "keys", "boxes", "masked", "signature",
                                                                   "unmask"}
    assert [r["status"] for r in rows] == ["ok"] * ROUNDS, [r["reason"] for r in rows]
    for r in rows[:KILL_ROUND]:
        assert sorted(r["included"]) == sorted(nodes) and r["dropped"] == [] and r["silent"] == {}
    killed = rows[KILL_ROUND]
    assert killed["dropped"] == [VICTIM] and list(killed["silent"]) == [VICTIM]
    assert killed["silent"][VICTIM] in ("share", "mask")
    assert sorted(killed["included"]) == sorted(set(nodes) - {VICTIM})

    # The same nodes in process, same seeds, no kill: identical rounds until the kill.
    reference = _in_process(config, tmp_path / "in-process")
    for r in range(KILL_ROUND + 1):
        # The round-r digest covers the global weights sent at round r (float64 bytes): equal
        # digests mean bit-identical global models after each of the first KILL_ROUND rounds.
        assert rows[r]["model_hash"] == reference[r]["model_hash"], f"round {r} started from other weights"
    for r in range(KILL_ROUND):
        assert rows[r]["total_weight"] == reference[r]["total_weight"]

    # Each node's own ledger: the chain verifies, and it spent what the in-process run spent (the
    # killed hospital trained in its last round before it was killed: that charge stays).
    for n in nodes:
        hospital = "hungary" if n == TWIN else n
        ref_audit = audit_ledger(tmp_path / "in-process" / ("twin" if n == TWIN else "") / hospital / "ledger.jsonl")
        audit = audit_ledger(tmp_path / "hospitals" / n / "privacy" / hospital / "ledger.jsonl")
        assert [c.client for c in audit.clients] == [hospital]
        mine = audit.client(hospital)
        assert mine.rounds == ROUNDS and mine.pending == 0
        assert mine.epsilon == pytest.approx(ref_audit.client(hospital).epsilon)
        assert mine.epsilon <= config["privacy"]["epsilon"] + 1e-9
        assert not audit.certified  # seeded sampling and noise: never certified


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-m", "flower", "-q"]))


@pytest.mark.filterwarnings("ignore:privacy.insecure_reproducible")
def test_the_same_job_on_flowers_simulation_engine_gives_the_in_process_weights(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    from secfedtl.aggregation.optimizers import decode_vector
    from secfedtl.runtime.deploy import run_local
    from secfedtl.jobs.heart import run_job

    data = _config()
    data["job"]["rounds"] = 2
    job = tmp_path / "job.toml"
    _write_toml(data, job)
    config = HeartConfig.from_mapping(data)
    simulated = run_local(job, tmp_path / "sim", simulation=True, phase_timeout=PHASE_TIMEOUT, timeout=900)
    reference = run_job(config, tmp_path / "in-process", progress=False)
    assert [r["status"] for r in simulated["server"]["rounds"]] == ["ok", "ok"]
    assert [r["model_hash"] for r in simulated["server"]["rounds"]] == [
        r["model_hash"] for r in reference["server"]["rounds"]]
    final = {}
    for name in ("sim/server", "in-process"):
        checkpoint = json.loads((tmp_path / name / "checkpoint.json").read_text(encoding="utf-8"))
        final[name] = decode_vector(checkpoint["global_params"])
    np.testing.assert_array_equal(final["sim/server"], final["in-process"])
    for h in config["job"]["clients"]:
        audit = audit_ledger(tmp_path / "sim" / "hospitals" / h / "privacy" / h / "ledger.jsonl")
        assert audit.client(h).rounds == 2 and audit.client(h).pending == 0
