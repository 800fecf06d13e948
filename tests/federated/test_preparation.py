"""A job with a preparation (DP centring before training) through the production path: the
release is charged before training and counts in the training noise, the server sends the public
centre, every node builds the same centred model (the same hash in every task), and a node
refuses a centre it could not have been sent honestly, or training before it is prepared."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from secfedtl.federated import wire
from secfedtl.federated.centring import Centring, centring
from secfedtl.federated.config import JobConfig
from secfedtl.federated.job import FederatedJob, HospitalData, SourceModel, node_policy
from secfedtl.privacy.accountants import compute_epsilon
from secfedtl.privacy.ledger import read_verified_ledger, spent_events
from secfedtl.runtime.local import build_job, run_job
from secfedtl.transfer.centring import MeanMechanism

DIM = 6
OFFSET = np.eye(DIM)[0] * 0.8  # a common offset, as sentence embeddings have


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = Centring(DIM, scale=4.0)
        self.head = nn.Linear(DIM, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _data(config: JobConfig, name: str) -> HospitalData:
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    y = rng.integers(0, 2, 240)
    x = OFFSET + 0.2 * rng.standard_normal((240, DIM)) + np.outer(2 * y - 1, np.eye(DIM)[1]) * 0.3
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return HospitalData.from_tensors(x[:200], y[:200], evaluation={"test": (x[200:], y[200:])})


def _source(config: JobConfig, spec) -> SourceModel:
    torch.manual_seed(0)
    return SourceModel(model=Net(), head="head", cache_features=True)


JOB = FederatedJob(name="centred", source=_source, data=_data,
                   prepare=centring(lambda c: MeanMechanism(dim=DIM, noise_multiplier=4.0),
                                    lambda d: d.train.tensors[0].numpy()))
CONFIG = JobConfig.from_mapping({
    "job": {"dataset": "synthetic", "source": "public", "clients": ["a", "b", "c"], "rounds": 2, "seed": 0},
    "privacy": {"epsilon": 3.0, "delta": 1e-5, "accountant": "rdp"},
    "declared": {"records": {"a": 200, "b": 200, "c": 200}},
    "training": {"lr": 0.5, "expected_batch_size": 50, "max_grad_norm": 1.0},
    "secagg": {"clip": 1.0, "max_samples": 1000},
})


def test_a_prepared_job_centres_first_and_stays_within_the_budget(tmp_path: Path):
    metrics = run_job(JOB, CONFIG, tmp_path / "out", state_dir=tmp_path / "state", progress=False)
    prep = metrics["server"]["preparation"]
    assert prep["status"] == "ok" and prep["prepared"] == ["a", "b", "c"] and prep["task"] == "mean"
    pooled = np.vstack([_data(CONFIG, n).train.tensors[0].numpy() for n in "abc"]).mean(axis=0)
    assert np.abs(np.asarray(prep["result"]) - pooled).max() < 0.1  # the noisy mean is near the true one
    assert [r["status"] for r in metrics["server"]["rounds"]] == ["ok", "ok"]
    for name in "abc":
        entries, _ = read_verified_ledger(tmp_path / "state" / name / "ledger.jsonl")
        events = [ev for _, ev, _ in spent_events(entries)[name]]
        assert events[0] == MeanMechanism(dim=DIM, noise_multiplier=4.0).event() and len(events) == 3
        assert compute_epsilon(events, 1e-5, accountant="rdp") <= 3.0 + 1e-9  # the release counted in the noise
    assert metrics["simulation_only"]["final"]["pooled_test_accuracy"] > 0.6


def test_a_node_refuses_a_bad_centre_and_training_before_it(tmp_path: Path):
    job = build_job(JOB, CONFIG, tmp_path / "out", state_dir=tmp_path / "state")
    try:
        assert node_policy(CONFIG, JOB).max_sessions == 3 and node_policy(CONFIG, JOB).max_tasks == 4
        fed = job.federation
        assert job.source.model.backbone.centre.abs().sum() > 0  # the server trains the centred model
        # a fresh node of the same hospital, not yet prepared (the job's ones were prepared at build time)
        from secfedtl.federated.job import build_client_node, open_hospital_state
        from secfedtl.federated.roster import Roster

        roster, keys = Roster.generate(["a", "b", "c"])
        state = open_hospital_state(CONFIG, "a", _data(CONFIG, "a"), tmp_path / "fresh")
        raw = JOB.build_source(CONFIG)
        hospital = build_client_node(JOB, CONFIG, "a", raw, _data(CONFIG, "a"), state, identity=keys["a"],
                                     roster=roster, job_ref="fresh")
        node = hospital.node

        def ask(task: str, weights: np.ndarray, round: int = 0) -> str:
            request = wire.TaskRequest.with_weights(round=round, task=task, weights=weights,
                                                    options={**fed.task_options()})
            return wire.decode(node.handle(wire.encode(request))[0]).status

        assert ask("evaluate", fed.global_params) == "failed"  # before the preparation's result
        assert ask("prepare", np.ones(DIM), round=1) == "failed"  # outside the ball of radius row_clip
        assert ask("prepare", np.zeros(DIM + 1), round=2) == "failed"  # wrong length
        assert hospital.client is None and state.ledger.entries == []  # nothing built, nothing charged
        centre = job.source.model.backbone.centre.numpy().astype(np.float64)
        assert ask("prepare", centre, round=3) == "done"
        assert hospital.client is not None
        assert ask("prepare", centre, round=4) == "failed"  # once
        assert ask("evaluate", fed.global_params, round=5) == "done"  # same model hash as the server's
        state.close()
    finally:
        job.close()


def test_a_server_cannot_make_a_node_release_its_preparation_twice(tmp_path: Path):
    """The job plans one release of the preparation's statistic (its event is the one prior event
    of the training noise); a server asking again, in any round, is refused before a charge, so
    it cannot spend the node's sessions and budget on repeated releases instead of training."""
    from secfedtl.federated.job import build_client_node, open_hospital_state
    from secfedtl.federated.roster import Roster
    from secfedtl.federated.statistic import FeatureMean

    roster, keys = Roster.generate(["a", "b", "c"])
    state = open_hospital_state(CONFIG, "a", _data(CONFIG, "a"), tmp_path / "state")
    hospital = build_client_node(JOB, CONFIG, "a", JOB.build_source(CONFIG), _data(CONFIG, "a"), state,
                                 identity=keys["a"], roster=roster, policy=node_policy(CONFIG, JOB), job_ref="j")
    statistic = FeatureMean(MeanMechanism(dim=DIM, noise_multiplier=4.0))
    options = {**statistic.options(), "encoding": {"clip": statistic.clip(1000), "bits": 64, "num_clients": 3,
                                                    "max_weight": 1}}

    def ask(round: int) -> str:
        request = wire.TaskRequest.with_weights(round=round, task="mean", weights=np.zeros(0), options=options)
        return wire.decode(hospital.node.handle(wire.encode(request))[0]).status

    assert ask(0) == "ready"
    assert [ask(1), ask(2)] == ["failed", "failed"]
    entries, _ = read_verified_ledger(tmp_path / "state" / "a" / "ledger.jsonl")
    assert [ev for _, ev, _ in spent_events(entries)["a"]] == [statistic.event()]
    state.close()


@pytest.mark.parametrize("prepared", [True, False])
def test_a_node_refuses_personalisation_its_job_file_does_not_plan(tmp_path: Path, prepared: bool):
    """``[privacy] personalise = false``: the training noise is calibrated for the training rounds
    only, so a server asking for a personalisation round (a charged DP-SGD round) is refused
    before anything is charged."""
    from secfedtl.federated.job import build_client_node, open_hospital_state
    from secfedtl.federated.roster import Roster

    assert not CONFIG["privacy"]["personalise"]
    job = JOB if prepared else FederatedJob(name="plain", source=_source, data=_data)
    roster, keys = Roster.generate(["a", "b", "c"])
    state = open_hospital_state(CONFIG, "a", _data(CONFIG, "a"), tmp_path / "state")
    raw = job.build_source(CONFIG)
    hospital = build_client_node(job, CONFIG, "a", raw, _data(CONFIG, "a"), state, identity=keys["a"],
                                 roster=roster, job_ref="j")
    source = raw
    if prepared:
        source = JOB.prepare.apply(raw, np.zeros(DIM))
        request = wire.TaskRequest.with_weights(round=0, task="prepare", weights=np.zeros(DIM))
        assert wire.decode(hospital.node.handle(wire.encode(request))[0]).status == "done"
    weights = np.concatenate([p.detach().numpy().ravel() for p in source.head_state.values()])
    request = wire.TaskRequest.with_weights(round=1, task="personalise", weights=weights,
                                            options={"names": list(source.head_state),
                                                     "frozen_hash": source.frozen_hash})
    assert wire.decode(hospital.node.handle(wire.encode(request))[0]).status == "failed"
    assert state.ledger.entries == []
    state.close()


# -- with distributed noise ------------------------------------------------------------------------

MEAN_EVENT = MeanMechanism(dim=DIM, noise_multiplier=4.0).event()
DISTRIBUTED = JobConfig.from_mapping({**CONFIG.to_dict(), "job": {**CONFIG["job"], "rounds": 1},
                                      "privacy": {**CONFIG["privacy"], "noise": "distributed"}})
HEAD = DIM * 2 + 2  # the trainable dimension (Linear(DIM, 2))


def _charged(state: Path, name: str) -> list[dict]:
    entries, _ = read_verified_ledger(state / name / "ledger.jsonl")
    return [e for e in entries if e["status"] == "pending"]


def test_a_prepared_distributed_job_charges_the_release_first_and_its_steps_compose_within_the_budget(
        tmp_path: Path):
    """The share is calibrated after the preparation's public event (the same at every hospital,
    from the job file): the release is charged and applied first, then every step; the events
    each ledger holds compose to at most epsilon, where a share calibrated without the release
    would have overspent."""
    from secfedtl.federated.distributed import plan_for, settings_for
    from secfedtl.privacy.audit import audit_ledger

    steps = settings_for(DISTRIBUTED).total_steps
    assert node_policy(DISTRIBUTED, JOB).max_sessions == steps + 1  # one for the release, one per step
    metrics = run_job(JOB, DISTRIBUTED, tmp_path / "out", state_dir=tmp_path / "state", progress=False)
    prep = metrics["server"]["preparation"]
    assert prep["status"] == "ok" and prep["prepared"] == ["a", "b", "c"]
    (row,) = metrics["server"]["rounds"]
    assert (row["status"], row["steps"], row["steps_ok"]) == ("ok", steps, steps)
    plan = plan_for(DISTRIBUTED, HEAD, job_id=metrics["job_id"], prior_events=[MEAN_EVENT])
    for name in "abc":
        charged = _charged(tmp_path / "state", name)
        assert [e["release"] for e in charged] == ["feature_mean"] + ["distributed_share"] * steps
        assert [e["event"]["share_variance"] for e in charged[1:]] == [plan.event.share_variance] * steps
        entries, _ = read_verified_ledger(tmp_path / "state" / name / "ledger.jsonl")
        events = [ev for _, ev, _ in spent_events(entries)[name]]
        assert events == [MEAN_EVENT] + [plan.event] * steps
        eps = compute_epsilon(events, 1e-5, accountant="rdp")
        assert 2.9 < eps <= 3.0 and metrics["simulation_only"]["final"]["epsilon"][name] == pytest.approx(eps)
        audit = audit_ledger(tmp_path / "state" / name / "ledger.jsonl").client(name)
        assert audit.certified and audit.epsilon == pytest.approx(eps)
    naive = plan_for(DISTRIBUTED, HEAD, job_id=metrics["job_id"])  # the release left out of the calibration
    assert naive.event.share_variance < plan.event.share_variance
    assert compute_epsilon([MEAN_EVENT] + [naive.event] * steps, 1e-5, accountant="rdp") > 3.0
    assert metrics["simulation_only"]["final"]["pooled_test_accuracy"] > 0.6


def test_every_node_plans_what_the_server_plans_and_refuses_a_share_calibrated_without_the_release(
        tmp_path: Path):
    """The server's plan (``build_server(..., job=...)``) is the one every prepared node checks
    requests against: a server announcing the smaller share of a plan that leaves the
    preparation out is refused before anything is charged."""
    from secfedtl.federated.distributed import STEP_TASK, plan_for
    from secfedtl.federated.job import distributed_plan, job_id

    job = build_job(JOB, DISTRIBUTED, tmp_path / "out", state_dir=tmp_path / "state")
    try:
        fed = job.federation
        jid = job_id(DISTRIBUTED)
        assert fed.distributed == plan_for(DISTRIBUTED, HEAD, job_id=jid, prior_events=[MEAN_EVENT])
        assert fed.distributed == distributed_plan(JOB, DISTRIBUTED, JOB.build_source(DISTRIBUTED))
        naive = plan_for(DISTRIBUTED, HEAD, job_id=jid)
        for name in "abc":
            before = len(_charged(tmp_path / "state", name))
            assert before == 1  # the preparation's release, charged while the job was built

            def ask(plan, round: int) -> str:  # noqa: A002
                request = wire.TaskRequest.with_weights(
                    round=round, task=STEP_TASK, weights=fed.global_params,
                    options={**fed.task_options(), "distributed": plan.announcement(),
                             "integer": {"bits": plan.encoding.bits, "length": plan.encoding.padded_dimension,
                                         "num_clients": 3}})
                return wire.decode(job.nodes[name].handle(wire.encode(request))[0]).status

            assert ask(naive, 0) == "failed" and len(_charged(tmp_path / "state", name)) == before
            assert ask(fed.distributed, 1) == "ready"  # the server's plan is the node's own
            (entry,) = _charged(tmp_path / "state", name)[before:]
            assert entry["event"]["share_variance"] == fed.distributed.event.share_variance
    finally:
        job.close()


def test_a_hospital_that_spent_elsewhere_adds_the_same_share_and_refuses_steps_instead(tmp_path: Path):
    """The plan never follows one hospital's own ledger: hospital ``a``, which spent part of its
    budget in an earlier job, computes the same share as the others (never less noise); its
    budget guard refuses the steps it cannot afford (the steps then fail: no sum of fewer than
    ``min_survivors`` parties is unmasked), and its ledger stays within its budget."""
    from secfedtl.federated.distributed import settings_for
    from secfedtl.federated.job import declaration, open_hospital_state
    from secfedtl.privacy.events import PoissonGaussianEvent

    earlier = PoissonGaussianEvent(sample_rate=1.0, noise_multiplier=3.0, steps=1)
    state = open_hospital_state(DISTRIBUTED, "a", _data(DISTRIBUTED, "a"), tmp_path / "state")
    try:
        with state.guard(job_id="an-earlier-job", declaration=declaration(DISTRIBUTED, "a")).charge(
                earlier, round=0, model_hash="0" * 64):
            pass
    finally:
        state.close()
    assert compute_epsilon([earlier], 1e-5, accountant="rdp") > 1.0
    metrics = run_job(JOB, DISTRIBUTED, tmp_path / "out", state_dir=tmp_path / "state", progress=False)
    steps = settings_for(DISTRIBUTED).total_steps
    (row,) = metrics["server"]["rounds"]
    shares = {}
    for name in "abc":
        charged = [e for e in _charged(tmp_path / "state", name) if e["release"] == "distributed_share"]
        shares[name] = {e["event"]["share_variance"] for e in charged}
        entries, _ = read_verified_ledger(tmp_path / "state" / name / "ledger.jsonl")
        assert compute_epsilon([ev for _, ev, _ in spent_events(entries)[name]], 1e-5, accountant="rdp") <= 3.0
        if name == "a":
            assert 0 < len(charged) < steps  # refused the steps over its budget, charged nothing for them
    assert shares["a"] == shares["b"] == shares["c"] and len(shares["a"]) == 1
    assert row["steps_ok"] == len([e for e in _charged(tmp_path / "state", "a") if e["release"] == "distributed_share"])
    assert "a" in row["budget_refused"]
