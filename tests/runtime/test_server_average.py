"""``[server] ema``: the released model is a moving average of the server's iterates.

Averaging is post-processing at the server: training continues from the last iterate, the only
model a client is ever sent, so the requests, the ledgers and the budget are exactly those of the
same job without it. These tests run the production objects (``build_job``, the job runner).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from secfedtl.aggregation.optimizers import encode_vector
from secfedtl.errors import ConfigError, InputError
from secfedtl.federated.federation import Federation, released_params_of
from secfedtl.federated.run import Experimenter
from secfedtl.jobs.heart import HeartConfig, build_job, run_job

from tests.runtime.test_distributed_job import distributed_config

pytestmark = pytest.mark.filterwarnings("ignore:privacy.insecure_reproducible")


def _config(*, ema: float | None, distributed: bool, rounds: int = 2) -> HeartConfig:
    """A small seeded heart job (reproducible randomness, so two runs can be compared)."""
    if distributed:
        data = distributed_config(rounds=rounds, secure_mode=False, insecure_reproducible=True).to_dict()
    else:
        data = HeartConfig.load(None).to_dict()
        data["job"].update(rounds=rounds, id="ema-test")
        data["model"]["source_epochs"] = 40
        data["privacy"].update(personalise=False, secure_mode=False, insecure_reproducible=True)
    if ema is not None:
        data["server"]["ema"] = ema
    return HeartConfig.from_mapping(data)


def _recording(job: Any) -> list[np.ndarray]:
    """Every iterate the server's optimizer returns, in order."""
    iterates: list[np.ndarray] = []
    real = job.federation.optimizer.step

    def step(*args: Any, **kwargs: Any) -> np.ndarray:
        out = real(*args, **kwargs)
        iterates.append(out.copy())
        return out

    job.federation.optimizer.step = step
    return iterates


@pytest.mark.parametrize("distributed", [False, True], ids=["local-noise", "distributed-noise"])
def test_the_released_model_averages_every_applied_step_and_training_is_unchanged(tmp_path, distributed) -> None:
    results = {}
    for ema in (None, 0.7):
        job = build_job(_config(ema=ema, distributed=distributed), tmp_path / f"out-{ema}",
                        state_dir=tmp_path / f"state-{ema}")
        try:
            start = job.federation.global_params.copy()
            iterates = _recording(job)
            job.federation.run(2)
            reports = job.federation.history
            applied = sum(r.steps_ok for r in reports) if distributed else sum(r.status == "ok" for r in reports)
            assert len(iterates) == applied > 1
            results[ema] = (job.federation, start, iterates, [r.model_hash for r in reports],
                            [r.step_hashes for r in reports])
        finally:
            job.close()
    plain, averaged = results[None][0], results[0.7][0]
    # training is untouched: the same iterates, and every client was sent the same requests
    assert np.array_equal(plain.global_params, averaged.global_params)
    assert results[None][3:] == results[0.7][3:]
    assert plain.ema_params is None and plain.released_params is plain.global_params
    # the released model is the recursion a <- 0.7 a + 0.3 x over every applied step, from the source head
    expected = results[0.7][1]
    for x in results[0.7][2]:
        expected = 0.7 * expected + 0.3 * x
    np.testing.assert_allclose(averaged.released_params, expected, rtol=1e-12, atol=1e-15)
    assert not np.allclose(averaged.released_params, averaged.global_params)


def test_a_failed_step_is_not_averaged(tmp_path) -> None:
    job = build_job(_config(ema=0.5, distributed=False, rounds=2), tmp_path / "out", state_dir=tmp_path / "state")
    try:
        assert job.federation.run_round().status == "ok"
        # the average now differs from the iterate, so averaging the unchanged iterate in would show
        assert not np.allclose(job.federation.released_params, job.federation.global_params)
        job.nodes["va"].faults = {1: "train"}  # one of three hospitals lost: the round fails
        before = job.federation.released_params.copy()
        report = job.federation.run_round()
        assert report.status == "failed"
        assert np.array_equal(job.federation.released_params, before)
    finally:
        job.close()


@pytest.mark.parametrize("prekeyed", [True, False], ids=["prekeyed", "session-per-step"])
def test_a_failed_distributed_step_is_not_averaged(tmp_path, prekeyed) -> None:
    job = build_job(_config(ema=0.5, distributed=True, rounds=1), tmp_path / "out", state_dir=tmp_path / "state")
    try:
        fed = job.federation
        fed.prekeyed = prekeyed
        iterates = _recording(job)
        job.nodes["va"].faults[1] = "mask"  # va sends no masked input in step 1: that step fails
        start = fed.released_params.copy()
        report = fed.run_round()
        assert report.status == "ok" and report.steps_ok == fed.distributed.settings.steps_per_round - 1
        expected = start
        for x in iterates:  # the applied steps only
            expected = 0.5 * expected + 0.5 * x
        np.testing.assert_allclose(fed.released_params, expected, rtol=1e-12, atol=1e-15)
    finally:
        job.close()


def test_the_checkpoint_keeps_the_average_and_refuses_another_setting_unchanged(tmp_path) -> None:
    config = _config(ema=0.5, distributed=False, rounds=1)
    job = build_job(config, tmp_path / "out", state_dir=tmp_path / "state")
    try:
        job.federation.run(1, checkpoint=tmp_path / "checkpoint.json")
        state = json.loads((tmp_path / "checkpoint.json").read_text(encoding="utf-8"))
        assert state["ema"] == 0.5
        np.testing.assert_array_equal(released_params_of(state), job.federation.released_params)
        fed: Federation = job.federation
        saved = (fed.global_params.copy(), fed.ema_params.copy(), fed.rounds_done)
        fed.ema_params = fed.ema_params * 0.0  # forget it, then restore
        fed.load_state_dict(state)
        assert np.array_equal(fed.ema_params, saved[1])
        bad_states = [{**state, "ema": 0.9}, {k: v for k, v in state.items() if k not in ("ema", "ema_params")},
                      {**state, "ema_params": None}, {**state, "ema_params": encode_vector(saved[1][:-1])},
                      {**state, "ema_params": encode_vector(saved[1] * np.nan)}]
        for bad in bad_states:
            with pytest.raises((ConfigError, InputError)):  # InputError: a malformed vector (decode_vector)
                fed.load_state_dict(bad)
            assert np.array_equal(fed.global_params, saved[0]) and np.array_equal(fed.ema_params, saved[1])
            assert fed.rounds_done == saved[2]
        plain = {k: v for k, v in state.items() if k not in ("ema", "ema_params")}
        np.testing.assert_array_equal(released_params_of(plain), fed.global_params)
        # a malformed rest of the checkpoint is refused before anything (the average included) changes
        fed.run(2)
        saved = (fed.global_params.copy(), fed.ema_params.copy(), fed.rounds_done, list(fed.history),
                 fed.optimizer.state_dict())
        malformed = [{**state, "rounds_done": "1"}, {**state, "rounds_done": 5}, {**state, "history": [{"x": 1}]},
                     {k: v for k, v in state.items() if k != "history"}, [state]]
        for bad in malformed:
            with pytest.raises(InputError):
                fed.load_state_dict(bad)
            assert np.array_equal(fed.global_params, saved[0]) and np.array_equal(fed.ema_params, saved[1])
            assert (fed.rounds_done, fed.history, fed.optimizer.state_dict()) == saved[2:]
    finally:
        job.close()


@pytest.mark.parametrize("ema", [1.0, -0.1, math.nan, math.inf, "0.5", True])
def test_a_decay_outside_zero_to_one_is_refused(tmp_path, ema) -> None:
    data = HeartConfig.load(None).to_dict()
    data["server"]["ema"] = ema
    with pytest.raises(ConfigError, match="ema"):
        HeartConfig.from_mapping(data)
    job = build_job(_config(ema=None, distributed=False, rounds=1), tmp_path / "out", state_dir=tmp_path / "state")
    try:
        fed = job.federation
        with pytest.raises(ConfigError, match="ema"):
            Federation(pool=fed.pool, roster=fed.roster, names=fed.names, global_params=fed.global_params,
                       optimizer=fed.optimizer, ema=ema)
    finally:
        job.close()


def test_the_job_evaluates_and_saves_the_released_model(tmp_path, monkeypatch) -> None:
    scored: list[np.ndarray] = []
    real = Experimenter.accuracy

    def accuracy(self: Experimenter, params: np.ndarray) -> dict[str, dict[str, Any]]:
        scored.append(np.array(params, copy=True))
        return real(self, params)

    monkeypatch.setattr(Experimenter, "accuracy", accuracy)
    metrics = run_job(_config(ema=0.6, distributed=True, rounds=1), tmp_path / "run", progress=False,
                      state_dir=tmp_path / "state")
    state = json.loads((tmp_path / "run" / "checkpoint.json").read_text(encoding="utf-8"))
    released, last = released_params_of(state), released_params_of({"global_params": state["global_params"]})
    assert not np.allclose(released, last)
    # scored: the source head, the model after round 0 (its row), and the final model: both the released one
    assert len(scored) == 3 and all(np.array_equal(p, released) for p in scored[1:])
    assert metrics["simulation_only"]["rounds"][0]["pooled_test_accuracy"] == (
        metrics["simulation_only"]["final"]["pooled_test_accuracy"])


# -- [training] l2sp with distributed noise: the server's step pulls toward the source head -------------


def test_a_distributed_step_adds_the_l2sp_pull_toward_the_source_after_the_noise(tmp_path, monkeypatch) -> None:
    from secfedtl.encoding.distributed import DistributedEncoding

    data = distributed_config(rounds=1, secure_mode=False, insecure_reproducible=True).to_dict()
    data["training"]["l2sp"] = 0.3
    config = HeartConfig.from_mapping(data)
    decoded: list[np.ndarray] = []
    real_decode = DistributedEncoding.decode_sum

    def decode_sum(self: DistributedEncoding, *args: Any, **kwargs: Any) -> np.ndarray:
        out = real_decode(self, *args, **kwargs)
        decoded.append(out.copy())
        return out

    monkeypatch.setattr(DistributedEncoding, "decode_sum", decode_sum)
    job = build_job(config, tmp_path / "out", state_dir=tmp_path / "state")
    try:
        fed = job.federation
        source = fed.global_params.copy()
        calls: list[tuple[np.ndarray, np.ndarray, float]] = []
        real_step = fed.optimizer.step

        def step(params: np.ndarray, update: np.ndarray, weight: float) -> np.ndarray:
            calls.append((params.copy(), update.copy(), weight))
            return real_step(params, update, weight)

        fed.optimizer.step = step
        report = fed.run_round()
        settings = fed.distributed.settings
        assert report.status == "ok" and len(calls) == len(decoded) == report.steps_ok > 2
        assert settings.l2sp == 0.3
        for (params, update, weight), noisy_sum in zip(calls, decoded):
            assert weight == settings.normaliser
            pull = weight * 2 * 0.3 * (params - source)
            np.testing.assert_allclose(update, -settings.lr * (noisy_sum + pull), rtol=1e-12, atol=1e-12)
        assert np.abs(calls[-1][0] - source).max() > 0  # the pull was not zero after the first step
        # what the hospitals charge does not depend on it: the plan they announce and charge is the same
        plain = distributed_config(rounds=1)
        assert fed.distributed.announcement() == job_plan_announcement(plain, fed)
    finally:
        job.close()


def job_plan_announcement(config: HeartConfig, fed: Federation) -> dict[str, Any]:
    from secfedtl.federated.distributed import plan_for

    return plan_for(config, fed.global_params.size, job_id=fed.distributed.job_id,
                    prior_events=fed.distributed.prior_events).announcement()


def test_a_resumed_job_keeps_the_source_head_as_anchor_and_continues_the_average(tmp_path, monkeypatch) -> None:
    """``--resume`` (build_job(resume=True) loads checkpoint.json): the L2-SP pull still points at
    the source head, not at the checkpointed iterate, and the average goes on from ema_params."""
    from secfedtl.federated import federation as federation_module
    from secfedtl.training import flatten_params

    data = _config(ema=0.7, distributed=True, rounds=2).to_dict()
    data["training"]["l2sp"] = 0.3
    config = HeartConfig.from_mapping(data)
    out, state_dir = tmp_path / "out", tmp_path / "state"
    job = build_job(config, out, state_dir=state_dir)
    try:
        job.federation.run(1, checkpoint=out / "checkpoint.json")
    finally:
        job.close()
    state = json.loads((out / "checkpoint.json").read_text(encoding="utf-8"))
    job = build_job(config, out, resume=True, state_dir=state_dir)
    try:
        fed = job.federation
        head = flatten_params(job.source.head_state)
        assert fed.rounds_done == 1 and not np.allclose(fed.global_params, head)
        anchors: list[np.ndarray] = []
        real_decode = federation_module.decode_step

        def decode_step(*args: Any, source: np.ndarray, **kwargs: Any) -> np.ndarray:
            anchors.append(source.copy())
            return real_decode(*args, source=source, **kwargs)

        iterates = _recording(job)
        monkeypatch.setattr(federation_module, "decode_step", decode_step)
        fed.run(2)
        assert len(anchors) == len(iterates) == fed.history[-1].steps_ok > 0
        assert all(np.array_equal(a, head) for a in anchors)
        expected = released_params_of(state)
        for x in iterates:
            expected = 0.7 * expected + 0.3 * x
        np.testing.assert_allclose(fed.released_params, expected, rtol=1e-12, atol=1e-15)
    finally:
        job.close()


def test_hospitals_evaluate_and_personalise_the_released_model(tmp_path) -> None:
    data = _config(ema=0.5, distributed=False, rounds=1).to_dict()
    data["privacy"]["personalise"] = True
    job = build_job(HeartConfig.from_mapping(data), tmp_path / "out", state_dir=tmp_path / "state")
    try:
        sent: list[tuple[str, np.ndarray]] = []
        real = job.federation.pool.exchange

        def exchange(requests, *, phase):  # type: ignore[no-untyped-def]
            from secfedtl.federated import wire

            for blobs in requests.values():
                message = wire.decode(blobs[0])
                if isinstance(message, wire.TaskRequest) and message.task in ("evaluate", "personalise"):
                    sent.append((message.task, message.weights()))
            return real(requests, phase=phase)

        job.federation.pool.exchange = exchange
        job.federation.run(1)
        assert not np.allclose(job.federation.released_params, job.federation.global_params)
        for task in ("evaluate", "personalise"):
            job.federation.query(task, round=1)
        assert {t for t, _ in sent} == {"evaluate", "personalise"}
        assert all(np.array_equal(w, job.federation.released_params) for _, w in sent)
    finally:
        job.close()
