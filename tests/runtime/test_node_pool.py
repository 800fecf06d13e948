"""Client nodes and pools with small stand-in tasks (no training): the secure round's sum, what a
node refuses, and how pools turn failures into silence."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from secfedtl.aggregation import make_server_optimizer
from secfedtl.errors import ConfigError, DecodeError, PrivacyBudgetExceeded, RemoteProtocolError
from secfedtl.runtime import wire
from secfedtl.runtime.federation import Federation
from secfedtl.runtime.node import ClientNode, TaskOutput
from secfedtl.runtime.pool import LocalPool, ProcessPool, _pack, _unpack
from secfedtl.runtime.roster import NodePolicy, Roster

LENGTH = 6
ROSTER, KEYS = Roster.generate([f"c{i}" for i in range(8)] + ["slow"])


def node(name: str, tasks, **kw) -> ClientNode:
    return ClientNode(name=name, tasks=tasks, identity=KEYS[name], roster=ROSTER, policy=NodePolicy(min_parties=3),
                      **kw)


class Fixed:
    """A secure task contributing a fixed vector and weight; records what it was asked."""

    def __init__(self, vector: np.ndarray, weight: int, *, sleep: float = 0.0, refuse: bool = False) -> None:
        self.vector, self.weight, self.sleep, self.refuse = vector, weight, sleep, refuse
        self.digests: list[str] = []

    def __call__(self, request: wire.TaskRequest, digest: str) -> TaskOutput:
        if self.refuse:
            raise PrivacyBudgetExceeded("no budget left")
        time.sleep(self.sleep)
        self.digests.append(digest)
        if request.task == "evaluate":
            return TaskOutput(info={"mean": float(request.weights().mean())})
        return TaskOutput(vector=self.vector, weight=self.weight)


def make_nodes(n: int = 4, **task_kw) -> tuple[dict[str, ClientNode], dict[str, Fixed]]:
    rng = np.random.default_rng(0)
    tasks = {f"c{i}": Fixed(rng.uniform(-1, 1, LENGTH), int(rng.integers(1, 50)), **task_kw) for i in range(n)}
    nodes = {name: node(name, {"train": t, "evaluate": t}, seed=i)
             for i, (name, t) in enumerate(tasks.items())}
    return nodes, tasks


def federation(pool) -> Federation:
    return Federation(pool=pool, roster=ROSTER, names=["w"], global_params=np.zeros(LENGTH),
                      optimizer=make_server_optimizer("fedavg", server_lr=1.0), clip=1.0, max_samples=100)


def secure(fed: Federation, round: int = 0):
    return fed.secure_round("train", round=round, cohort=fed.pool.names, vector_length=LENGTH, clip=1.0,
                            max_weight=100)


def test_secure_round_sums_the_weighted_contributions():
    nodes, tasks = make_nodes()
    fed = federation(LocalPool(nodes))
    out = secure(fed)
    assert out.status == "ok" and out.included == tuple(sorted(nodes))
    expected = sum(t.weight * t.vector for t in tasks.values())
    bound = fed._secagg_config(4, clip=1.0, max_weight=100).encoding.error_bound(4)  # noqa: SLF001
    assert np.max(np.abs(out.total - expected)) <= bound
    assert out.total_weight == sum(t.weight for t in tasks.values())
    # every client saw the same request, hence the same digest (the session context)
    assert len({d for t in tasks.values() for d in t.digests}) == 1


def test_a_client_shown_another_model_cannot_join_the_round():
    nodes, tasks = make_nodes(5)
    pool = LocalPool(nodes)
    real = pool.exchange

    def lying(requests, *, phase):  # the server sends c0 a different model
        if phase == "task":
            request = wire.decode(requests["c0"][0])
            requests = {**requests, "c0": [wire.encode(wire.TaskRequest(
                round=request.round, task=request.task, options=request.options,
                params=np.full(LENGTH, 0.5).astype("<f8").tobytes()))]}
        return real(requests, phase=phase)

    pool.exchange = lying
    out = secure(federation(pool))
    assert tasks["c0"].digests[0] != tasks["c1"].digests[0]
    assert "c0" not in out.included and "c0" in out.dropped


def test_refused_failed_and_unknown_tasks():
    nodes, tasks = make_nodes(4)
    tasks["c1"].refuse = True
    nodes["c2"] = node("c2", {"other": tasks["c2"]})
    out = secure(federation(LocalPool(nodes)))
    assert out.refused == ("c1",)
    assert out.status == "failed" and "2 clients ready" in out.reason
    assert "c2" in out.dropped


def test_query_replies_carry_no_task_output():
    """What a local task computes stays at the node: the server hears only "done"."""
    nodes, tasks = make_nodes(3)
    fed = federation(LocalPool(nodes))
    infos = fed.query("evaluate", weights=np.full(LENGTH, 2.0))
    assert set(infos) == set(nodes)
    assert all(i == {"status": "done"} for i in infos.values())
    assert all(len(t.digests) == 1 for t in tasks.values())  # the task did run


def test_refusal_and_failure_replies_carry_no_details():
    nodes, _ = make_nodes(3, refuse=True)
    fed = federation(LocalPool(nodes))
    infos = fed.query("evaluate", weights=np.zeros(LENGTH))
    assert all(i == {"status": "refused", "reason": "budget"} for i in infos.values())
    [reply] = nodes["c0"].handle(wire.encode(wire.TaskRequest.with_weights(
        round=0, task="nonexistent", weights=np.zeros(LENGTH), options={})))
    assert wire.decode(reply).info == {"reason": "unknown task"}


def test_node_refuses_out_of_turn_and_mismatched_sessions():
    nodes, _ = make_nodes(3)
    c0 = nodes["c0"]
    with pytest.raises(RemoteProtocolError):
        c0.handle(wire.encode(wire.SecAggFrame(round=0, data=b"x")))
    fed = federation(LocalPool(nodes))
    request = wire.TaskRequest.with_weights(round=0, task="train", weights=np.zeros(LENGTH), options={
        **fed.task_options(), "encoding": {"clip": 1.0, "bits": 32, "num_clients": 3, "max_weight": 100}})
    [reply] = c0.handle(wire.encode(request))
    assert wire.decode(reply).status == "ready"
    from secfedtl.secagg.config import SecAggConfig
    from secfedtl.secagg.session import SessionParams

    def join(**over):
        cfg = dict(num_clients=3, threshold=2, clip=1.0, bits=32, max_weight=100, authenticated=True)
        context = over.pop("context", bytes.fromhex(wire.request_digest(request)))
        length = over.pop("vector_length", LENGTH + 1)
        cfg.update(over)
        params = SessionParams(config=SecAggConfig(**cfg), session_id=os.urandom(16), round=0,
                               vector_length=length, context=context)
        parties = tuple(KEYS[f"c{i}"].public for i in range(3))
        return wire.encode(wire.Join(round=0, index=0, session=params, parties=parties))

    for bad in (join(context=b"\0" * 32), join(clip=2.0), join(max_weight=50), join(vector_length=LENGTH)):
        with pytest.raises(RemoteProtocolError):
            c0.handle(bad)
    [advert] = c0.handle(join())
    assert isinstance(wire.decode(advert), wire.SecAggFrame)
    with pytest.raises(RemoteProtocolError):
        c0.handle(join())  # a second join in the same round


def test_bad_fault_names_are_refused():
    with pytest.raises(ConfigError):
        node("c0", {"train": Fixed(np.zeros(2), 1)}, faults={0: "later"})


def test_worker_batches_round_trip_and_reject_junk():
    items = [("a", b"one"), ("b", b""), ("a", os.urandom(100))]
    assert _unpack(_pack(7, items)) == (7, items)
    for junk in (b"", b"SFTB", _pack(1, items)[:-1], _pack(1, items) + b"\0", b"XXXX" + _pack(1, items)[4:]):
        with pytest.raises(DecodeError):
            _unpack(junk)


def test_process_pool_parallel_round_and_a_killed_worker_makes_its_clients_silent(fork_safe):
    nodes, tasks = make_nodes(6)
    with ProcessPool(nodes, workers=3) as pool:
        fed = federation(pool)
        out = secure(fed)
        assert out.status == "ok" and len(out.included) == 6
        expected = sum(t.weight * t.vector for t in tasks.values())
        assert np.allclose(out.total, expected, atol=1e-3)
        os.kill(pool.pids[0], signal.SIGKILL)  # worker 0 holds c0 and c3
        out = secure(fed, round=1)
        assert out.status == "ok"
        assert set(out.dropped) == {"c0", "c3"} and len(out.included) == 4


def test_process_pool_timeout_silences_a_slow_worker_and_drops_its_late_answer(fork_safe):
    nodes, _ = make_nodes(3)
    slow = node("slow", {"train": Fixed(np.zeros(LENGTH), 1, sleep=1.5), "evaluate": Fixed(np.zeros(LENGTH), 1)})
    nodes["slow"] = slow
    with ProcessPool(nodes, workers=4, timeout=0.5) as pool:
        fed = federation(pool)
        out = secure(fed)
        assert out.status == "ok" and "slow" in out.dropped and len(out.included) == 3
        time.sleep(1.5)  # the late reply arrives and must not be mistaken for the next answer
        infos = fed.query("evaluate")
        assert infos["slow"]["status"] == "done"


def test_process_pool_refuses_to_fork_after_cuda_was_initialised(monkeypatch):
    """Forked children cannot use a CUDA context their parent made: the pool says so up front
    instead of letting every hospital fail inside its worker."""
    import torch

    from secfedtl.errors import ConfigError

    nodes, _ = make_nodes(2)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(ConfigError, match="CUDA is already initialised"):
        ProcessPool(nodes, workers=2)
