"""Distributed-noise jobs (``[privacy] noise = "distributed"``) through the production runners.

Whole heart jobs, in process and in worker processes (the runner code that real runs use,
:func:`secfedtl.jobs.heart.run_job`), and a hospital's node answering wire bytes:

* every step is charged first, in the hospital's ledger, as ``poisson_skellam`` (one entry per
  step, the plan's share and honest count), and ``secfedtl audit`` recomputes the same epsilon;
* every byte the server receives is masked, key material or a fixed status, and each masked input
  is the output of a step its sender charged for that exact request;
* a cohort below the node's own ``min_survivors`` is refused before anything is charged, and a
  session that could unmask a smaller sum is refused; a step whose survivors fall below it fails
  (the others refuse to unmask) and leaves the model as it was;
* the noise a node adds is exactly ``Sk(share_variance / 2)`` of its ledger entries (the node's
  share decomposed with its own, test-seeded, randomness).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from secfedtl.errors import ConfigError, PolicyError
from secfedtl.federated import wire
from secfedtl.federated.distributed import STEP_TASK, plan_for, settings_for
from secfedtl.jobs.heart import HeartConfig, build_job, run_job
from secfedtl.privacy.audit import audit_ledger
from secfedtl.privacy.discrete_noise import skellam_noise
from secfedtl.privacy.randomness import Randomness
from secfedtl.secagg.config import SecAggConfig
from secfedtl.secagg.session import SessionParams
from secfedtl.testing.server_view import classify
from secfedtl.training.dpsgd import _batch
from secfedtl.training.examples import per_example_gradients

from tests.runtime.test_server_view import record_views

HOSPITALS = ("hungary", "switzerland", "va")
pytestmark = pytest.mark.filterwarnings("ignore:privacy.insecure_reproducible")


def distributed_config(*, rounds: int = 1, **privacy: Any) -> HeartConfig:
    data = HeartConfig.load(None).to_dict()
    data["job"]["rounds"] = rounds
    data["job"]["id"] = "distributed-test"
    data["model"]["source_epochs"] = 40
    data["privacy"].update({"noise": "distributed", "personalise": False, **privacy})
    return HeartConfig.from_mapping(data)


def ledger(state: Path, name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (state / name / "ledger.jsonl").read_text().splitlines()]


# -- configuration ---------------------------------------------------------------------------------


def test_local_is_the_default_and_distributed_refuses_what_it_cannot_do() -> None:
    assert HeartConfig.load(None).noise() == "local"
    assert "noise" not in HeartConfig.load(None)["privacy"]  # the job id of a local job is unchanged
    base = distributed_config()
    assert base.noise() == "distributed"
    data = base.to_dict()
    for section, key, value in [("privacy", "noise", "central"), ("privacy", "personalise", True),
                                ("privacy", "accountant", "prv"), ("privacy", "min_survivors", 2),
                                ("privacy", "min_survivors", 4), ("privacy", "colluders", 3),
                                ("training", "l2sp", -0.1), ("training", "optimizer", "adam")]:
        bad = json.loads(json.dumps(data))
        bad[section][key] = value
        with pytest.raises(ConfigError):
            HeartConfig.from_mapping(bad)
    local = HeartConfig.load(None).to_dict()
    local["privacy"]["colluders"] = 1
    with pytest.raises(ConfigError):
        HeartConfig.from_mapping(local)


def test_the_plan_is_public_and_counts_only_honest_parties() -> None:
    config = distributed_config(rounds=2, colluders=1)
    settings = settings_for(config)
    total = sum(config["declared"]["records"].values())
    assert settings.sample_rate == pytest.approx(config["training"]["expected_batch_size"] / total)
    assert settings.total_steps == 2 * settings.steps_per_round
    assert settings.policy.honest_parties == 2
    plan = plan_for(config, 66, job_id="x")
    assert plan.event.steps == 1 and plan.event.honest_parties == 2
    assert plan.event.share_variance / 2 <= 1e9  # within the exact sampler's range
    wary = plan_for(distributed_config(rounds=2, colluders=0), 66, job_id="x")
    # fewer honest parties assumed: each must add more
    assert plan.event.total_mu / plan.event.l2_bound**2 == pytest.approx(
        wary.event.total_mu / wary.event.l2_bound**2, rel=0.02)
    assert plan.event.share_variance / plan.event.l2_bound**2 > 1.4 * wary.event.share_variance / wary.event.l2_bound**2


# -- whole jobs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_a_distributed_job_charges_skellam_steps_and_the_server_sees_only_masked_sums(
        tmp_path, monkeypatch, workers, request) -> None:
    if workers:
        request.getfixturevalue("fork_safe")
    log = record_views(monkeypatch)
    state = tmp_path / "state"
    config = distributed_config()
    metrics = run_job(config, tmp_path / "out", progress=False, workers=workers, state_dir=state)
    steps = settings_for(config).steps_per_round
    (row,) = metrics["server"]["rounds"]
    assert (row["status"], row["steps"], row["steps_ok"]) == ("ok", steps, steps)
    assert metrics["noise"] == "distributed"
    plan = plan_for(config, 66, job_id=metrics["job_id"])
    digests: dict[int, str] = {}
    masked: dict[str, list[int]] = {}
    for direction, _phase, name, blob in log:
        if direction == "to":
            msg = wire.decode(blob)
            if isinstance(msg, wire.TaskRequest):
                assert "encoding" not in msg.options and msg.options["integer"]["bits"] == plan.encoding.bits
                digests[msg.round] = wire.request_digest(msg)
            continue
        kind, content = classify(blob)
        if kind == "status" and content[0] == "ready" and content[1]:
            # a pre-keyed step echoes the digest of the request this node was sent, nothing else
            assert content[1] == (("digest", digests[wire.decode(blob).round]),)
        if kind == "masked":
            # the integer path: padded_dimension words of the field, no weight word
            assert len(content) == plan.encoding.padded_dimension * np.dtype(plan.encoding.dtype).itemsize
            masked.setdefault(name, []).append(wire.decode(blob).round)
    assert set(masked) == set(HOSPITALS)
    for name in HOSPITALS:
        entries = ledger(state, name)
        charged = [e for e in entries if e["status"] == "pending"]
        assert len(charged) == steps
        for e in charged:
            assert e["event"]["mechanism"] == "poisson_skellam" and e["release"] == "distributed_share"
            assert e["event"]["share_variance"] == plan.event.share_variance
            assert e["event"]["honest_parties"] == 3 and e["event"]["steps"] == 1
            assert e["event"]["sample_rate"] == plan.settings.sample_rate
        # each masked input answers a request this hospital charged, for that exact request
        assert sorted(masked[name]) == list(range(steps))
        assert {(e["round"], e["model_hash"]) for e in charged} == {(r, digests[r]) for r in masked[name]}
        # the server's record names each step's request: an auditor can match it to every ledger
        assert {(e["round"], e["model_hash"]) for e in charged} == set(enumerate(row["step_hashes"]))
        # the audit recomputes the spent epsilon from the ledger alone
        audit = audit_ledger(state / name / "ledger.jsonl").client(name)
        eps = metrics["simulation_only"]["final"]["epsilon"][name]
        assert audit.epsilon == pytest.approx(eps) and 0.9 < eps <= config["privacy"]["epsilon"]
        assert audit.steps == steps and audit.certified
    assert metrics["simulation_only"]["final"]["epsilon_prv"] is None


def test_a_step_whose_survivors_fall_below_the_policy_fails_and_changes_nothing(tmp_path) -> None:
    config = distributed_config()
    job = build_job(config, tmp_path / "out", state_dir=tmp_path / "state")
    try:
        job.nodes["va"].faults[0] = "mask"  # va shares its keys in step 0, then falls silent
        before = job.federation.global_params.copy()
        outcome = job.federation.secure_round(STEP_TASK, round=0, cohort=list(HOSPITALS),
                                              vector_length=job.federation.distributed.encoding.padded_dimension,
                                              integer=True, min_survivors=3,
                                              options={"distributed": job.federation.distributed.announcement()})
        # a sum of 2 < min_survivors is never unmasked (the server session and the two others refuse)
        assert outcome.status == "failed" and outcome.field_sum is None
        assert np.array_equal(job.federation.global_params, before)
        for name in HOSPITALS:  # every share was charged before it was computed
            assert len([e for e in ledger(tmp_path / "state", name) if e["status"] == "pending"]) == 1
    finally:
        job.close()


# -- one node, on the wire -------------------------------------------------------------------------


def _request(job: Any, *, round: int = 0, num_clients: int = 3) -> wire.TaskRequest:  # noqa: A002
    fed = job.federation
    plan = fed.distributed
    return wire.TaskRequest.with_weights(
        round=round, task=STEP_TASK, weights=fed.global_params,
        options={**fed.task_options(), "distributed": plan.announcement(),
                 "integer": {"bits": plan.encoding.bits, "length": plan.encoding.padded_dimension,
                             "num_clients": num_clients}})


def test_a_node_refuses_a_cohort_below_its_policy_before_charging(tmp_path) -> None:
    job = build_job(distributed_config(), tmp_path / "out", state_dir=tmp_path / "state")
    try:
        node = job.nodes["hungary"]
        (reply,) = [wire.decode(b) for b in node.handle(wire.encode(_request(job, num_clients=2)))]
        assert (reply.status, reply.info) == ("refused", {"reason": "policy"})
        assert classify(wire.encode(reply))[0] == "status"
        assert not (tmp_path / "state" / "hungary" / "ledger.jsonl").exists() or not [
            e for e in ledger(tmp_path / "state", "hungary") if e["status"] == "pending"]
        # another announced encoding (a server trying a smaller scale or share) is a failure, uncharged
        forged = _request(job, round=1)
        options = dict(forged.options)
        options["distributed"] = {**options["distributed"], "share_variance": 1.0}
        forged = wire.TaskRequest.with_weights(round=1, task=STEP_TASK, weights=job.federation.global_params,
                                               options=options)
        (reply,) = [wire.decode(b) for b in node.handle(wire.encode(forged))]
        assert reply.status == "failed"
        # a valid request is charged and answered; a session that may unmask fewer parties is refused
        request = _request(job, round=2)
        (reply,) = [wire.decode(b) for b in node.handle(wire.encode(request))]
        assert reply.status == "ready"
        assert len([e for e in ledger(tmp_path / "state", "hungary") if e["status"] == "pending"]) == 1
        cfg = SecAggConfig(num_clients=3, threshold=2, bits=job.federation.distributed.encoding.bits,
                           authenticated=True)  # min_survivors 2 < the node's 3
        params = SessionParams(config=cfg, session_id=b"\x01" * 16, round=2,
                               vector_length=job.federation.distributed.encoding.padded_dimension,
                               context=bytes.fromhex(wire.request_digest(request)))
        parties = tuple(job.federation.roster.key_of(n) for n in HOSPITALS)
        with pytest.raises(PolicyError):
            node.handle(wire.encode(wire.Join(round=2, index=0, session=params, parties=parties)))
    finally:
        job.close()


def test_the_noise_a_node_adds_is_its_ledger_share(tmp_path) -> None:
    """With the job's insecure reproducible randomness (tests only), the test replays a node's
    draws: the Poisson batch and the rounding come first from its key stream, the noise after.
    What is left of the node's field vector once the encoded batch is taken out is the noise,
    and it must be Skellam with the variance its ledger entry records."""
    config = distributed_config(rounds=3, secure_mode=False, insecure_reproducible=True)
    job = build_job(config, tmp_path / "out", state_dir=tmp_path / "state")
    try:
        plan = job.federation.distributed
        enc = plan.encoding
        noise: list[np.ndarray] = []
        for name in HOSPITALS:
            client = job.clients[name]
            twin = Randomness.insecure_seeded(job.config["job"]["seed"] * 1000 + list(HOSPITALS).index(name))
            for step in range(plan.settings.total_steps):
                request = _request(job, round=step)
                (reply,) = [wire.decode(b) for b in job.nodes[name].handle(wire.encode(request))]
                assert reply.status == "ready"
                field = job.nodes[name]._field  # noqa: SLF001 - the test inspects what the node keeps
                chosen = torch.from_numpy(twin.poisson_indices(len(client._data), plan.settings.sample_rate))  # noqa: SLF001
                x, y = _batch(client._data, chosen)  # noqa: SLF001
                model = job.source.with_params(job.federation.global_params)
                grads = per_example_gradients(model.get_submodule("head"), x, y,
                                              loss_fn=client._loss_fn, prefix="head.")  # noqa: SLF001
                stream = twin.key_stream()
                signal = enc.encode_examples(grads, rotation_seed=plan.rotation_seed(step), stream=stream)
                drawn = skellam_noise(enc.padded_dimension, mu=plan.event.share_variance / 2, stream=stream)
                assert np.array_equal(field, enc.wrap(signal + drawn))
                noise.append(enc.unwrap(enc.wrap(enc.unwrap(field) - signal)))
        entries = [e for n in HOSPITALS for e in ledger(tmp_path / "state", n) if e["status"] == "pending"]
        assert {e["event"]["share_variance"] for e in entries} == {plan.event.share_variance}
        sample = np.concatenate(noise).astype(np.float64)
        var = plan.event.share_variance
        assert abs(sample.mean()) < 6 * math.sqrt(var / sample.size)
        assert sample.var() == pytest.approx(var, rel=6 * math.sqrt(2 / sample.size))
    finally:
        job.close()


def test_a_node_refuses_a_session_that_tolerates_fewer_colluders_than_its_noise_assumes(tmp_path) -> None:
    # colluders = 2 of 3: only one hospital's noise counts, and secure aggregation must hold against
    # two colluders; a 3-party session (2 neighbours, threshold 2) tolerates only 2t - k - 1 = 1
    job = build_job(distributed_config(colluders=2), tmp_path / "out", state_dir=tmp_path / "state")
    try:
        node = job.nodes["hungary"]
        request = _request(job)
        (reply,) = [wire.decode(b) for b in node.handle(wire.encode(request))]
        assert reply.status == "ready"
        assert job.federation.distributed.event.honest_parties == 1
        cfg = SecAggConfig(num_clients=3, threshold=2, bits=job.federation.distributed.encoding.bits,
                           min_survivors=3, authenticated=True)
        assert cfg.tolerated_colluders == 1
        params = SessionParams(config=cfg, session_id=b"\x02" * 16, round=0,
                               vector_length=job.federation.distributed.encoding.padded_dimension,
                               context=bytes.fromhex(wire.request_digest(request)))
        parties = tuple(job.federation.roster.key_of(n) for n in HOSPITALS)
        with pytest.raises(PolicyError, match="colluders"):
            node.handle(wire.encode(wire.Join(round=0, index=0, session=params, parties=parties)))
    finally:
        job.close()


def test_distributed_noise_takes_fields_below_16_bits_and_local_noise_does_not() -> None:
    """Integer sessions carry no fixed-point weight word, so distributed noise takes 8 bits and up
    (the encoding rule then says whether the noise fits); a local-noise job's float updates keep 16."""
    for bits in (8, 12, 15):
        data = distributed_config().to_dict()
        data["secagg"]["bits"] = bits
        assert HeartConfig.from_mapping(data)["secagg"]["bits"] == bits
    data = distributed_config().to_dict()
    data["secagg"]["bits"] = 7
    with pytest.raises(ConfigError, match=r"bits must be an integer in \[8, 64\]"):
        HeartConfig.from_mapping(data)
    local = HeartConfig.load(None).to_dict()
    local["secagg"]["bits"] = 12
    with pytest.raises(ConfigError, match=r"bits must be an integer in \[16, 64\] with local noise"):
        HeartConfig.from_mapping(local)


def test_a_12_bit_distributed_round_completes_in_its_field_and_an_8_bit_one_is_refused(tmp_path) -> None:
    data = distributed_config(secure_mode=False, insecure_reproducible=True).to_dict()
    data["secagg"]["bits"] = 12
    config = HeartConfig.from_mapping(data)
    job = build_job(config, tmp_path / "out", state_dir=tmp_path / "state")
    try:
        plan = job.federation.distributed
        assert plan.encoding.bits == 12 and plan.encoding_plan.wrap_probability <= 1e-6
        sums: list[np.ndarray] = []
        real = job.federation._apply_step

        def spy(plan_, field_sum, step, tally):  # type: ignore[no-untyped-def]
            sums.append(np.asarray(field_sum).copy())
            return real(plan_, field_sum, step, tally)

        job.federation._apply_step = spy  # type: ignore[method-assign]
        report = job.federation.run_round()
        steps = settings_for(config).steps_per_round
        assert (report.status, report.steps_ok) == ("ok", steps) and len(sums) == steps
        assert all(int(s.max()) < 2 ** 12 for s in sums) and any(int(s.max()) >= 2 ** 11 for s in sums)
        for name in HOSPITALS:
            charged = [e for e in ledger(tmp_path / "state", name) if e["status"] == "pending"]
            assert {e["event"]["bits"] for e in charged} == {12}
    finally:
        job.close()
    data["secagg"]["bits"] = 8  # the rule finds no scale at which three parties' noise fits 8 bits
    with pytest.raises(ConfigError, match="8 bits cannot hold the noise of 3 parties"):
        build_job(HeartConfig.from_mapping(data), tmp_path / "out8", state_dir=tmp_path / "state8")


@pytest.mark.parametrize("prekeyed", [True, False])
def test_a_server_of_another_job_id_is_refused_before_any_step_is_charged(tmp_path, prekeyed) -> None:
    """Every step's rotation seed comes from the job id and seed. A server whose file names another
    job (a hashed id over a file that differs in, say, ``[server] ema``) announces it, and every
    hospital refuses the step before charging it, where it used to charge and mask a step the
    server then un-rotated with the wrong seed (found by helper-28's red team)."""
    import dataclasses

    job = build_job(distributed_config(), tmp_path / "out", state_dir=tmp_path / "state")
    try:
        fed = job.federation
        fed.prekeyed = prekeyed
        for other in (dataclasses.replace(fed.distributed, job_id=fed.distributed.job_id + "-x"),
                      dataclasses.replace(fed.distributed, settings=dataclasses.replace(
                          fed.distributed.settings, job_seed=fed.distributed.settings.job_seed + 1))):
            fed.distributed = other
            before = fed.global_params.copy()
            report = fed.run_round()
            assert report.status == "failed" and report.steps_ok == 0
            assert np.array_equal(fed.global_params, before)
        for name in HOSPITALS:  # nothing charged: no ledger entry was ever written
            path = tmp_path / "state" / name / "ledger.jsonl"
            assert not path.exists() or [e for e in ledger(tmp_path / "state", name) if e["status"] == "pending"] == []
    finally:
        job.close()


@pytest.mark.parametrize("bits", [8, 12, 15])
def test_a_node_refuses_a_fixed_point_encoding_narrower_than_16_bits_before_charging(tmp_path, bits) -> None:
    """The field floor of 8 is for distributed noise's integer sessions; a float update (a
    local-noise round, selection, a preparation) needs 16, and a hospital refuses a server that
    announces less before training or charging (found by helper-29's red team)."""
    data = HeartConfig.load(None).to_dict()
    data["model"]["source_epochs"] = 40
    data["job"]["rounds"] = 1
    job = build_job(HeartConfig.from_mapping(data), tmp_path / "out", state_dir=tmp_path / "state")
    try:
        fed = job.federation
        node = job.nodes["hungary"]
        request = wire.TaskRequest.with_weights(round=0, task="train", weights=fed.global_params, options={
            **fed.task_options(), "encoding": {"clip": 1.0, "bits": bits, "num_clients": 3, "max_weight": 140}})
        (reply,) = [wire.decode(b) for b in node.handle(wire.encode(request))]
        assert reply.status == "failed"
        path = tmp_path / "state" / "hungary" / "ledger.jsonl"
        assert not path.exists() or not [e for e in ledger(tmp_path / "state", "hungary") if e["status"] == "pending"]
    finally:
        job.close()


def test_a_prepared_job_needs_16_bits_even_with_distributed_noise(tmp_path) -> None:
    """A preparation (DP centring) is a fixed-point secure round in the job's field: a prepared
    distributed job below 16 bits is refused by the job's check, before any folder or state."""
    from secfedtl.runtime.local import run_job as run_prepared
    from tests.federated.test_preparation import DISTRIBUTED, JOB

    data = DISTRIBUTED.to_dict()
    data["secagg"]["bits"] = 12
    config = type(DISTRIBUTED).from_mapping(data)  # the config alone is fine: steps take 8 bits and up
    with pytest.raises(ConfigError, match="preparation is a fixed-point secure round"):
        run_prepared(JOB, config, tmp_path / "out", state_dir=tmp_path / "state", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "state").exists()
