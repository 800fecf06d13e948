"""Integration: a distributed-noise heart job on a real local Flower deployment (127.0.0.1).

One SuperLink, one SuperNode and one secfedtl node agent per hospital, ``flwr run`` of secfedtl's
app (:func:`secfedtl.runtime.deploy.run_local`), one round of ``[privacy] noise =
"distributed"``: every DP step is one secure aggregation over Flower. Every step must complete,
every hospital's ledger must hold one ``poisson_skellam`` entry per step (audited), and the
server's recorded view is masked payloads, key material and data-free statuses only. The
per-step cost over Flower is printed (``-s``), not asserted. Slow (Flower starts a process per
message): the ``flower`` mark, ``make test-flower``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from secfedtl.federated.distributed import settings_for  # noqa: E402
from secfedtl.jobs.heart import HeartConfig  # noqa: E402
from secfedtl.privacy.audit import audit_ledger  # noqa: E402
from secfedtl.runtime.deploy import run_local  # noqa: E402

pytestmark = pytest.mark.flower


def test_a_distributed_job_on_flower_charges_every_step_and_completes(tmp_path: Path) -> None:
    data = HeartConfig.load(None).to_dict()
    data["job"]["rounds"] = 1
    data["model"]["source_epochs"] = 40
    data["privacy"].update(noise="distributed", personalise=False)
    config = HeartConfig.from_mapping(data)
    job = tmp_path / "job.toml"
    job.write_text(config.to_toml(), encoding="utf-8")
    metrics = run_local(job, tmp_path / "run", simulation=False, phase_timeout=60.0, timeout=1500)
    steps = settings_for(config).steps_per_round
    (row,) = metrics["server"]["rounds"]
    assert (row["status"], row["steps"], row["steps_ok"]) == ("ok", steps, steps)
    print(json.dumps({"flower_secagg_seconds_per_step": row["times"]["secure_aggregation"] / steps,
                      "flower_task_seconds_per_step": row["times"]["task_phase"] / steps,
                      "wire_bytes_per_step": row["wire_bytes"] / steps}))
    for name in config["job"]["clients"]:
        ledgers = list((tmp_path / "run").rglob(f"{name}/ledger.jsonl"))
        assert len(ledgers) == 1
        entries = [json.loads(x) for x in ledgers[0].read_text().splitlines()]
        charged = [e for e in entries if e["status"] == "pending"]
        assert len(charged) == steps and {e["event"]["mechanism"] for e in charged} == {"poisson_skellam"}
        audit = audit_ledger(ledgers[0]).client(name)
        assert audit.steps == steps and 0 < audit.epsilon <= config["privacy"]["epsilon"]


def test_a_prepared_distributed_job_on_flower_releases_first_then_every_step(tmp_path: Path, monkeypatch) -> None:
    """A job with a preparation (DP centring, tests/federated/test_preparation.py's synthetic job)
    and distributed noise, over Flower: the centring is released and applied first (one secure
    round), then every DP step of the round; each hospital's ledger holds the release, then one
    ``poisson_skellam`` entry per step, composing within its budget."""
    import os

    from secfedtl.federated.config import JobConfig
    from secfedtl.privacy.ledger import read_verified_ledger

    root = Path(__file__).resolve().parents[2]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    monkeypatch.syspath_prepend(str(root))
    from tests.federated.test_preparation import DISTRIBUTED

    data = DISTRIBUTED.to_dict()
    data["training"]["expected_batch_size"] = 150  # q = 1/4: four steps
    config = JobConfig.from_mapping(data)
    job = tmp_path / "job.toml"
    job.write_text(config.to_toml(), encoding="utf-8")
    metrics = run_local(job, tmp_path / "run", simulation=False, phase_timeout=60.0, timeout=1500,
                        job_code="tests.federated.test_preparation:JOB")
    steps = settings_for(config).steps_per_round
    assert steps == 4
    assert metrics["server"]["preparation"]["status"] == "ok"
    assert metrics["server"]["preparation"]["prepared"] == ["a", "b", "c"]
    (row,) = metrics["server"]["rounds"]
    assert (row["status"], row["steps"], row["steps_ok"]) == ("ok", steps, steps)
    for name in config["job"]["clients"]:
        (ledger,) = (tmp_path / "run").rglob(f"{name}/ledger.jsonl")
        entries, _ = read_verified_ledger(ledger)
        charged = [e for e in entries if e["status"] == "pending"]
        assert [e["release"] for e in charged] == ["feature_mean"] + ["distributed_share"] * steps
        audit = audit_ledger(ledger).client(name)
        assert audit.certified and 0 < audit.epsilon <= config["privacy"]["epsilon"]
