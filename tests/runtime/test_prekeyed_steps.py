"""Pre-keyed steps of a distributed-noise round (docs/protocol.md, "Pre-keyed steps").

Each step is still its own fresh secure-aggregation session; only its ``Join`` and share phase
travel ahead, in two exchanges at the start of the round. Through the production path
(:func:`secfedtl.jobs.heart.build_job`, the in-process pool, the hospitals' real nodes):

* with the same (test-seeded) randomness, a pre-keyed round gives bit for bit the model and the
  ledgers of a round of one full session per step, in ``2 + 3T`` exchanges instead of ``6T``;
* a hospital silent in one step's masked input fails that step only (the model keeps the others);
* a hospital refuses, before anything is charged or masked: a pre-keyed session for a step it
  has run or keyed already, one its own plan refuses (fewer survivors or colluders than its noise
  assumes, another field), more than :data:`~secfedtl.federated.node.MAX_PREKEYED` at once, and a
  step request other than the one the session is bound to; its input goes into the step's
  pre-keyed session only (a later ``Join`` for that step finds nothing to take), and a masked
  input is never sent before the step's request arrived.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from secfedtl.errors import PolicyError, RemoteProtocolError, ReplayError, SecFedTLError
from secfedtl.federated import node as nodemod
from secfedtl.federated import wire
from secfedtl.federated.distributed import STEP_TASK, settings_for
from secfedtl.jobs.heart import build_job
from secfedtl.secagg import codec
from secfedtl.secagg import messages as m
from secfedtl.secagg.session import SessionParams

from tests.runtime.test_distributed_job import HOSPITALS, distributed_config

pytestmark = pytest.mark.filterwarnings("ignore:privacy.insecure_reproducible")


def _seeded_config(**privacy: Any):
    return distributed_config(secure_mode=False, insecure_reproducible=True, **privacy)


def _entries(state: Path, name: str) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (state / name / "ledger.jsonl").read_text().splitlines()]
    return [{k: e[k] for k in ("round", "model_hash", "status", "event", "release")} for e in rows]


def _counting(job: Any) -> list[str]:
    phases: list[str] = []
    real = job.federation.pool.exchange

    def exchange(requests, *, phase):  # type: ignore[no-untyped-def]
        phases.append(phase)
        return real(requests, phase=phase)

    job.federation.pool.exchange = exchange  # type: ignore[method-assign]
    return phases


def test_a_prekeyed_round_equals_one_session_per_step_in_fewer_exchanges(tmp_path) -> None:
    config = _seeded_config()
    steps = settings_for(config).steps_per_round
    models, ledgers, exchanges, hashes = {}, {}, {}, {}
    for prekeyed in (False, True):
        state = tmp_path / f"state-{prekeyed}"
        job = build_job(config, tmp_path / f"out-{prekeyed}", state_dir=state)
        try:
            job.federation.prekeyed = prekeyed
            phases = _counting(job)
            report = job.federation.run_round()
            assert (report.status, report.steps_ok, report.silent) == ("ok", steps, {})
            assert report.included == HOSPITALS
            models[prekeyed] = job.federation.global_params.copy()
            hashes[prekeyed] = report.step_hashes
            ledgers[prekeyed] = {n: _entries(state, n) for n in HOSPITALS}
            exchanges[prekeyed] = phases
        finally:
            job.close()
    assert np.array_equal(models[True], models[False])
    assert ledgers[True] == ledgers[False]  # the same steps charged, for the same requests
    assert hashes[True] == hashes[False] and len(hashes[True]) == steps
    assert [e["model_hash"] for e in ledgers[True]["va"] if e["status"] == "pending"] == list(hashes[True])
    assert len(exchanges[False]) == 6 * steps
    assert len(exchanges[True]) == 2 + 3 * steps
    assert exchanges[True][:2] == ["advertise", "share"]
    assert exchanges[True][2:5] == ["mask", "consistency", "unmask"]


def test_a_hospital_silent_in_one_step_fails_that_step_only(tmp_path) -> None:
    config = _seeded_config()
    steps = settings_for(config).steps_per_round
    job = build_job(config, tmp_path / "out", state_dir=tmp_path / "state")
    try:
        job.nodes["va"].faults[1] = "mask"  # va is keyed for every step; in step 1 it masks nothing
        before = job.federation.global_params.copy()
        report = job.federation.run_round()
        assert (report.status, report.steps_ok) == ("ok", steps - 1)
        assert report.silent == {"va": "step 1: mask"} and "step 1" in report.reason
        assert not np.array_equal(job.federation.global_params, before)
        # va charged step 1 (its share was computed) but nothing of it was unmasked
        assert len([e for e in _entries(tmp_path / "state", "va") if e["status"] == "pending"]) == steps
    finally:
        job.close()


# -- one node, on the wire -------------------------------------------------------------------------


def _options(job: Any, num_clients: int = 3) -> dict[str, Any]:
    fed = job.federation
    plan = fed.distributed
    return {**fed.task_options(), "distributed": plan.announcement(),
            "integer": {"bits": plan.encoding.bits, "length": plan.encoding.padded_dimension,
                        "num_clients": num_clients}}


def _join(job: Any, step: int, *, index: int = 0, min_survivors: int = 3, context: bytes | None = None,
          vector_length: int | None = None) -> wire.Join:
    fed = job.federation
    plan = fed.distributed
    cfg = fed._secagg_config(3, clip=1.0, max_weight=1)
    cfg = dataclasses.replace(cfg, min_survivors=min_survivors)
    if context is None:
        context = wire.step_context(wire.TaskRequest(round=step, task=STEP_TASK, options=_options(job)))
    params = SessionParams(config=cfg, session_id=bytes([step + 1]) * 16, round=step,
                           vector_length=plan.encoding.padded_dimension if vector_length is None else vector_length,
                           context=context)
    parties = tuple(job.federation.roster.key_of(n) for n in HOSPITALS)
    return wire.Join(round=step, index=index, session=params, parties=parties)


def _request(job: Any, step: int, **kw: Any) -> wire.TaskRequest:
    return wire.TaskRequest.with_weights(round=step, task=STEP_TASK, weights=job.federation.global_params,
                                         options={**_options(job), **kw})


def _declined(node: Any, join: wire.Join, caplog: Any, error: str) -> None:
    """A pre-keyed session the node refuses: no reply (the batch's other steps still get theirs),
    nothing set up, and a log line naming the refusal's type."""
    caplog.clear()
    with caplog.at_level("WARNING", logger="secfedtl.federated.node"):
        assert node.handle(wire.encode(join)) == []
    assert error in caplog.text and f"step {join.round}" in caplog.text


def _pending(state: Path, name: str) -> int:
    path = state / name / "ledger.jsonl"
    return 0 if not path.exists() else len([e for e in _entries(state, name) if e["status"] == "pending"])


@pytest.fixture
def job(tmp_path):
    job = build_job(_seeded_config(), tmp_path / "out", state_dir=tmp_path / "state")
    yield job
    job.close()


def test_a_node_sets_up_a_step_session_before_the_step_and_masks_only_after_its_request(job, tmp_path,
                                                                                         caplog) -> None:
    node = job.nodes["hungary"]
    (advert,) = [wire.decode(b) for b in node.handle(wire.encode(_join(job, 0)))]
    assert isinstance(advert, wire.SecAggFrame) and isinstance(codec.decode(advert.data), m.AdvertiseKeys)
    assert _pending(tmp_path / "state", "hungary") == 0  # keys only: nothing charged, nothing computed
    _declined(node, _join(job, 0), caplog, "ReplayError")  # one session per step
    # a ShareDelivery before the step's request: the session has no input and aborts; nothing is sent
    empty = m.ShareDelivery(session_id=bytes([1]) * 16, round=0, recipient=0, ciphertexts=())
    caplog.clear()
    with caplog.at_level("WARNING", logger="secfedtl.federated.node"):
        assert node.handle(wire.encode(wire.SecAggFrame(round=0, data=codec.encode(empty)))) == []
    assert "aborted the pre-keyed session of step 0" in caplog.text and 0 not in node._prekeyed
    assert _pending(tmp_path / "state", "hungary") == 0
    _declined(node, _join(job, 0), caplog, "ReplayError")  # and it is not set up again
    node.handle(wire.encode(_join(job, 1)))
    before = (node._round, node._digest, set(node._answered), sorted(node._prekeyed))
    with pytest.raises(ReplayError, match="declined"):  # nor is the step run anywhere else
        node.handle(wire.encode(_request(job, 0)))
    assert _pending(tmp_path / "state", "hungary") == 0 and node._field is None
    assert (node._round, node._digest, set(node._answered), sorted(node._prekeyed)) == before  # untouched


def test_a_node_refuses_a_prekeyed_session_its_plan_refuses(job, tmp_path, caplog) -> None:
    node = job.nodes["hungary"]
    plan = job.federation.distributed
    steps = plan.settings.total_steps
    with pytest.raises(PolicyError, match="unmask a sum of 2"):
        plan.check_session(0, _join(job, 0, min_survivors=2).session)
    _declined(node, _join(job, 0, min_survivors=2), caplog, "PolicyError")
    with pytest.raises(RemoteProtocolError, match="field or vector length"):
        plan.check_session(0, _join(job, 0, vector_length=8).session)
    _declined(node, _join(job, 0, vector_length=8), caplog, "RemoteProtocolError")
    with pytest.raises(RemoteProtocolError, match="not one of the job's"):
        plan.check_session(steps, _join(job, steps).session)
    _declined(node, _join(job, steps), caplog, "RemoteProtocolError")
    assert node._prekeyed == {}
    # the plan of a job that assumes two colluders refuses a session of three (which tolerates one)
    strict = build_job(_seeded_config(colluders=2, min_survivors=3), tmp_path / "out2", state_dir=tmp_path / "s2")
    try:
        with pytest.raises(PolicyError, match="tolerates 1 colluders"):
            strict.federation.distributed.check_session(0, _join(strict, 0).session)
        _declined(strict.nodes["hungary"], _join(strict, 0), caplog, "PolicyError")
    finally:
        strict.close()
    # and a step already run cannot get a session set up afterwards: while it is the node's current
    # step, its contribution joins only a session bound to the whole request; later, it is a replay
    (reply,) = [wire.decode(b) for b in node.handle(wire.encode(_request(job, 3)))]
    assert reply.status == "ready"
    with pytest.raises(RemoteProtocolError, match="bound to another request"):
        node.handle(wire.encode(_join(job, 3)))
    node.handle(wire.encode(_request(job, 4)))
    _declined(node, _join(job, 3), caplog, "ReplayError")


def test_a_node_holds_at_most_max_prekeyed_sessions_and_drops_those_of_earlier_steps(job, monkeypatch,
                                                                                      caplog) -> None:
    monkeypatch.setattr(nodemod, "MAX_PREKEYED", 2)
    node = job.nodes["hungary"]
    node.handle(wire.encode(_join(job, 0)))
    node.handle(wire.encode(_join(job, 1)))
    _declined(node, _join(job, 2), caplog, "PolicyError")
    assert sorted(node._prekeyed) == [0, 1]
    # a request the step task refuses (a step beyond the job) changes no session
    steps = job.federation.distributed.settings.total_steps
    (reply,) = [wire.decode(b) for b in node.handle(wire.encode(_request(job, steps + 5)))]
    assert reply.status == "failed" and sorted(node._prekeyed) == [0, 1]
    # steps run one after another: step 1's request ends step 0's session (its keys are dropped)
    (reply,) = [wire.decode(b) for b in node.handle(wire.encode(_request(job, 1)))]
    assert reply.status == "ready" and reply.info == {"digest": wire.request_digest(_request(job, 1))}
    assert sorted(node._prekeyed) == [1]


def test_a_step_request_other_than_the_sessions_is_refused_before_charging(job, tmp_path, caplog) -> None:
    node = job.nodes["hungary"]
    node.handle(wire.encode(_join(job, 0)))
    # the session is bound to the step's request without weights; another option is another request
    forged = _request(job, 0, frozen_hash="another source")
    with pytest.raises(RemoteProtocolError, match="bound to another request"):
        node.handle(wire.encode(forged))
    assert _pending(tmp_path / "state", "hungary") == 0
    # the session is gone: the genuine request now runs on its own (one session per contribution)
    with pytest.raises(ReplayError):
        node.handle(wire.encode(_request(job, 0)))


def test_the_steps_input_goes_into_its_prekeyed_session_only(job, tmp_path, caplog) -> None:
    node = job.nodes["hungary"]
    node.handle(wire.encode(_join(job, 2)))
    (reply,) = [wire.decode(b) for b in node.handle(wire.encode(_request(job, 2)))]
    assert reply.status == "ready" and _pending(tmp_path / "state", "hungary") == 1
    assert node._field is None and node._prekeyed[2].has_input
    # a second session for the same step (a server trying to get the input masked twice) finds nothing
    _declined(node, _join(job, 2, context=bytes.fromhex(wire.request_digest(_request(job, 2)))), caplog,
              "ReplayError")


def test_a_step_announcing_another_cohort_than_its_session_is_refused_before_charging(tmp_path, caplog) -> None:
    """A server pre-keys a session of 3 and then announces a cohort of 2 in the step (the same
    value in the session's binding, so the binding check alone would pass)."""
    job = build_job(_seeded_config(), tmp_path / "out", state_dir=tmp_path / "state")
    try:
        node = job.nodes["hungary"]
        small = _request(job, 1, integer={"bits": job.federation.distributed.encoding.bits,
                                          "length": job.federation.distributed.encoding.padded_dimension,
                                          "num_clients": 2})
        node.handle(wire.encode(_join(job, 1, context=wire.step_context(small))))
        with pytest.raises(RemoteProtocolError, match="field or cohort"):
            node.handle(wire.encode(small))
        assert _pending(tmp_path / "state", "hungary") == 0 and node._field is None and node._prekeyed == {}
        # nothing was kept for a later session of that step
        _declined(node, _join(job, 1, context=bytes.fromhex(wire.request_digest(small))), caplog, "ReplayError")
    finally:
        job.close()


def test_a_node_without_prekeying_refuses_a_join_before_its_task(job) -> None:
    plain = nodemod.ClientNode(name="hungary", tasks={STEP_TASK: lambda request, digest: None},
                               identity=job.nodes["hungary"]._identity, roster=job.federation.roster)
    with pytest.raises(RemoteProtocolError, match="without a contribution"):
        plain.handle(wire.encode(_join(job, 0)))


def test_a_failed_step_leaves_its_prekeyed_session_unanswered(job, tmp_path) -> None:
    node = job.nodes["hungary"]
    node.handle(wire.encode(_join(job, 1)))
    # weights of the wrong size (not part of the session's binding): the task fails, before charging
    bad = wire.TaskRequest.with_weights(round=1, task=STEP_TASK, weights=np.zeros(5), options=_options(job))
    (reply,) = [wire.decode(b) for b in node.handle(wire.encode(bad))]
    assert (reply.status, reply.info) == ("failed", {"reason": "failed"})
    empty = m.ShareDelivery(session_id=bytes([2]) * 16, round=1, recipient=0, ciphertexts=())
    assert node.handle(wire.encode(wire.SecAggFrame(round=1, data=codec.encode(empty)))) == []
    assert _pending(tmp_path / "state", "hungary") == 0


def test_the_job_file_turns_prekeying_off_for_the_server_and_every_node(tmp_path) -> None:
    from secfedtl.errors import ConfigError
    from secfedtl.jobs.heart import HeartConfig

    data = _seeded_config().to_dict()
    data["secagg"]["prekeyed"] = False
    config = HeartConfig.from_mapping(data)
    local = HeartConfig.load(None).to_dict()
    local["secagg"]["prekeyed"] = True
    with pytest.raises(ConfigError, match="prekeyed only applies"):
        HeartConfig.from_mapping(local)
    job = build_job(config, tmp_path / "out", state_dir=tmp_path / "state")
    try:
        assert job.federation.prekeyed is False
        with pytest.raises(RemoteProtocolError, match="without a contribution"):
            job.nodes["hungary"].handle(wire.encode(_join(job, 0)))
        # a server that pre-keys anyway gets no session set up: every step fails, nothing is charged
        job.federation.prekeyed = True
        report = job.federation.run_round()
        assert (report.status, report.steps_ok) == ("failed", 0)
        assert all(_pending(tmp_path / "state", n) == 0 for n in HOSPITALS)
    finally:
        job.close()


def _tamper_step_zero(job: Any, *, forge_echo: bool) -> None:
    """hungary gets other weights in step 0 (in transit, after the server built its request);
    ``forge_echo``: the digest hungary echoes is replaced by the one the server sent (a server
    that ignores the echo)."""
    real = job.federation.pool.exchange
    sent: dict[int, str] = {}

    def tamper(requests, *, phase):  # type: ignore[no-untyped-def]
        out = {}
        for name, blobs in requests.items():
            msgs = [wire.decode(b) for b in blobs]
            for x in msgs:
                if isinstance(x, wire.TaskRequest):
                    sent[x.round] = wire.request_digest(x)
            out[name] = [wire.encode(wire.TaskRequest.with_weights(
                round=x.round, task=x.task, weights=x.weights() + 0.5, options=x.options))
                if name == "hungary" and isinstance(x, wire.TaskRequest) and x.round == 0 else b
                for x, b in zip(msgs, blobs)]
        raw = real(out, phase=phase)
        if forge_echo and "hungary" in raw:
            replies = [wire.decode(b) for b in raw["hungary"]]
            raw["hungary"] = [wire.encode(wire.TaskReply(round=r.round, status=r.status,
                                                         info={"digest": sent[r.round]}))
                              if isinstance(r, wire.TaskReply) and "digest" in r.info else b
                              for r, b in zip(replies, raw["hungary"])]
        return raw

    job.federation.pool.exchange = tamper  # type: ignore[method-assign]


def test_a_hospital_that_answers_another_request_is_left_out_of_the_step(tmp_path) -> None:
    """A hospital that received other weights than the server sent (version skew, tampering)
    echoes another digest; the server leaves it out of that step (a dropout: the step fails
    here, where every hospital's noise is needed) instead of applying a sum whose masks would not
    cancel. The other steps run."""
    config = _seeded_config()
    steps = settings_for(config).steps_per_round
    job = build_job(config, tmp_path / "out", state_dir=tmp_path / "state")
    try:
        _tamper_step_zero(job, forge_echo=False)
        report = job.federation.run_round()
    finally:
        job.close()
    assert (report.status, report.steps_ok) == ("ok", steps - 1)
    assert report.silent == {"hungary": "step 0: mask"} and report.reason.startswith("step 0:")


def test_a_server_showing_one_hospital_other_weights_gets_a_sum_still_masked(tmp_path, monkeypatch) -> None:
    """The weights are not in a pre-keyed session's binding, but each hospital gives its input
    under the digest of the whole request it was sent (ClientSession.provide_input's context),
    so a hospital shown other weights has pairwise masks that do not cancel, even for a server
    that ignores the echoed digest: it cannot isolate it (a model-inconsistency attack), and an
    honest step still sums exactly."""
    from secfedtl.federated import federation as fedmod
    from secfedtl.secagg.client import ClientSession

    inputs: dict[int, list[np.ndarray]] = {}
    real_provide = ClientSession.provide_input

    def spy(self, vector, *, context=b""):  # type: ignore[no-untyped-def]
        inputs.setdefault(self.params.round, []).append(np.array(vector, copy=True))
        return real_provide(self, vector, context=context)

    sums: dict[int, np.ndarray] = {}
    real_decode = fedmod.decode_step

    def record(plan, field_sum, step, **kwargs):  # type: ignore[no-untyped-def]
        sums[step] = np.array(field_sum, copy=True)
        return real_decode(plan, field_sum, step, **kwargs)

    monkeypatch.setattr(ClientSession, "provide_input", spy)
    monkeypatch.setattr(fedmod, "decode_step", record)
    job = build_job(_seeded_config(), tmp_path / "out", state_dir=tmp_path / "state")
    try:
        _tamper_step_zero(job, forge_echo=True)
        job.federation.run_round()
    finally:
        job.close()
    bits = job.federation.distributed.encoding.bits
    for step, field_sum in sums.items():
        true = (np.sum(np.array(inputs[step], dtype=np.uint64), axis=0) % (1 << bits)).astype(field_sum.dtype)
        wrong = np.count_nonzero(field_sum != true)
        if step == 0:
            assert wrong >= 0.9 * field_sum.size  # masks left on nearly every word: nothing isolated
        else:
            assert wrong == 0  # honest steps sum exactly
    assert 0 in sums and len(sums) == settings_for(_seeded_config()).steps_per_round
