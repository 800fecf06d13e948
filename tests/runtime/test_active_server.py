"""An active server against the production path (issue 11): a Federation over a LocalPool of real
ClientNodes, and a real node agent socket. Each attack is run twice where that makes sense: once
against a node that trusts what the server says (the behaviour before the roster: the node's
roster is the server's), where it succeeds, and once against a node that pins the federation's
roster and its own policy, where it is refused before the node sends anything."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from secfedtl.aggregation import make_server_optimizer
from secfedtl.crypto import primitives as cp
from secfedtl.errors import DecodeError, PolicyError, ReplayError, UnknownPartyError
from secfedtl.privacy.budget import BudgetGuard, PrivacyBudget
from secfedtl.privacy.ledger import Ledger
from secfedtl.federated import wire
from secfedtl.runtime.agent import AGENT_MAGIC, AGENT_VERSION, OP_EXCHANGE, AgentClient, NodeAgent
from secfedtl.runtime.batch import pack_batch, unpack_batch
from secfedtl.federated.statistic import FeatureMean, StatisticTask
from secfedtl.runtime.deploy import wait_for
from secfedtl.federated.federation import Federation
from secfedtl.federated.node import ClientNode, TaskOutput
from secfedtl.runtime.pool import LocalPool
from secfedtl.federated.roster import NodePolicy, Roster, write_simulated_keys
from secfedtl.secagg import codec
from secfedtl.secagg import messages as m
from secfedtl.secagg.config import SecAggConfig
from secfedtl.secagg.session import SessionParams
from secfedtl.transfer.centring import MeanMechanism

LENGTH = 5
HOSPITALS = ["hungary", "switzerland", "va"]


class Fixed:
    """A secure task contributing a fixed vector (weight 1); counts how often it ran."""

    def __init__(self, vector: np.ndarray) -> None:
        self.vector = np.asarray(vector, dtype=np.float64)
        self.runs = 0

    def __call__(self, request: wire.TaskRequest, digest: str) -> TaskOutput:
        self.runs += 1
        return TaskOutput(vector=self.vector, weight=1)


def make_node(name: str, keys: dict[str, cp.SigningKey], roster: Roster, vector: np.ndarray,
              policy: NodePolicy | None = None) -> ClientNode:
    return ClientNode(name=name, tasks={"train": Fixed(vector)}, identity=keys[name], roster=roster,
                      policy=policy or NodePolicy(min_parties=3))


def federation(pool: LocalPool, roster: Roster, **kw) -> Federation:
    return Federation(pool=pool, roster=roster, names=["w"], global_params=np.zeros(LENGTH),
                      optimizer=make_server_optimizer("fedavg", server_lr=1.0), clip=1.0, max_samples=1, **kw)


def secure(fed: Federation, round: int = 0):
    return fed.secure_round("train", round=round, cohort=fed.pool.names, vector_length=LENGTH, clip=1.0,
                            max_weight=1)


VICTIM_VECTOR = np.array([0.5, -0.25, 0.125, 0.75, -0.5])


# -- 1. isolation with sybils ------------------------------------------------------------------


def _sybil_federation(victim_roster_is_the_servers: bool):
    """The server runs an n=3, t=2 session with the victim and two parties of its own, whose inputs
    it knows (zeros): the sum it decodes is the victim's vector."""
    genuine, genuine_keys = Roster.generate(HOSPITALS)
    sybil_keys = {"sybil-1": cp.SigningKey.generate(), "sybil-2": cp.SigningKey.generate()}
    servers = Roster(parties={"hungary": genuine.key_of("hungary"), **{n: k.public for n, k in sybil_keys.items()}})
    victim = make_node("hungary", genuine_keys, servers if victim_roster_is_the_servers else genuine, VICTIM_VECTOR)
    sybils = {n: make_node(n, sybil_keys, servers, np.zeros(LENGTH)) for n in sybil_keys}
    return federation(LocalPool({"hungary": victim, **sybils}), servers), victim


def test_isolation_with_sybils_reads_the_victims_vector_when_the_node_trusts_the_server():
    fed, _ = _sybil_federation(victim_roster_is_the_servers=True)
    out = secure(fed)
    cfg = fed._secagg_config(3, clip=1.0, max_weight=1)  # noqa: SLF001
    assert (cfg.num_clients, cfg.degree, cfg.threshold) == (3, 2, 2)
    assert out.status == "ok" and out.total_weight == 3  # the sybils' weights (1 each) are the server's own
    assert np.max(np.abs(out.total - VICTIM_VECTOR)) <= cfg.encoding.error_bound(3)  # the attack works


def test_isolation_with_sybils_is_refused_by_a_node_that_pins_the_roster(caplog):
    caplog.set_level(logging.INFO, logger="secfedtl.federated.pool")
    fed, victim = _sybil_federation(victim_roster_is_the_servers=False)
    out = secure(fed)
    assert out.status == "failed" and out.total is None
    assert out.silent["hungary"] == "advertise"  # it sent nothing after its "ready"
    assert "UnknownPartyError" in caplog.text
    assert victim._session is None and victim._field is not None  # noqa: SLF001 - refused, nothing changed


# -- 2. key substitution -----------------------------------------------------------------------


def _substituting(pool: LocalPool, victim: str, *, substitute: bool, seen: dict):
    """Wrap the pool as a server that replaces, in the victim's key directory, one peer's advert
    with keys of its own (signed with its own Ed25519 key: it has no peer's private key)."""
    real = pool.exchange
    attacker = cp.SigningKey.generate()

    def exchange(requests, *, phase):
        requests = dict(requests)
        if phase == "advertise":
            seen["params"] = wire.decode(requests[victim][0]).session
        if phase == "share" and substitute:
            params: SessionParams = seen["params"]
            frame = wire.decode(requests[victim][0])
            directory = codec.decode(frame.data)
            assert isinstance(directory, m.KeyDirectory)
            honest = directory.peers[0]
            enc, mask = cp.generate_x25519(), cp.generate_x25519()
            forged = m.AdvertiseKeys(session_id=honest.session_id, round=honest.round, sender=honest.sender,
                                     enc_public_key=enc.public, mask_public_key=mask.public,
                                     signature=attacker.sign(params.advert_transcript(honest.sender, enc.public,
                                                                                       mask.public)))
            swapped = m.KeyDirectory(session_id=directory.session_id, round=directory.round,
                                     recipient=directory.recipient, peers=(forged, *directory.peers[1:]))
            requests[victim] = [wire.encode(wire.SecAggFrame(round=frame.round, data=codec.encode(swapped)))]
        replies = real(requests, phase=phase)
        seen.setdefault(phase, {}).update(replies)
        return replies

    pool.exchange = exchange  # type: ignore[method-assign]


@pytest.mark.parametrize("substitute", [False, True])
def test_key_substitution_is_refused_before_the_victim_sends_a_share(substitute):
    roster, keys = Roster.generate(HOSPITALS)
    nodes = {n: make_node(n, keys, roster, VICTIM_VECTOR if n == "hungary" else np.zeros(LENGTH))
             for n in HOSPITALS}
    pool = LocalPool(nodes)
    seen: dict = {}
    _substituting(pool, "hungary", substitute=substitute, seen=seen)
    out = secure(federation(pool, roster))
    if not substitute:  # the wrapper itself changes nothing: the round completes
        assert out.status == "ok" and "hungary" in seen["share"]
        return
    assert out.status == "failed"
    assert out.silent.get("hungary") == "share"
    assert "hungary" not in seen["share"]  # no share box left the victim: nothing to decrypt


# -- 3. parameters below policy ----------------------------------------------------------------


def test_a_threshold_below_the_declared_collusion_tolerance_is_refused():
    names = [f"h{i}" for i in range(5)]
    roster, keys = Roster.generate(names)
    policy = NodePolicy(colluders=2)
    nodes = {n: make_node(n, keys, roster, np.full(LENGTH, 0.1), policy=policy) for n in names}
    weak = secure(federation(LocalPool(nodes), roster, colluders=0))  # k=4, t=3: tolerates 1
    assert weak.status == "failed" and set(weak.silent.values()) == {"advertise"}
    strong = secure(federation(LocalPool(nodes), roster, colluders=2), round=1)  # k=4, t=4: tolerates 3
    assert strong.status == "ok" and len(strong.included) == 5


def test_a_session_smaller_than_the_policy_is_refused():
    names = [f"h{i}" for i in range(6)]
    roster, keys = Roster.generate(names)
    nodes = {n: make_node(n, keys, roster, np.full(LENGTH, 0.1), policy=NodePolicy()) for n in names}
    fed = federation(LocalPool(nodes), roster, clients_per_round=3)  # default policy: 6 - 6 // 4 = 5 parties
    out = fed.secure_round("train", round=0, cohort=fed.sample(0), vector_length=LENGTH, clip=1.0, max_weight=1)
    assert out.status == "failed" and set(out.silent.values()) == {"advertise"}
    full = secure(fed, round=1)
    assert full.status == "ok"


def _ready_node(policy: NodePolicy, n_roster: int = 60):
    names = [f"h{i}" for i in range(n_roster)]
    roster, keys = Roster.generate(names)
    node = make_node("h0", keys, roster, np.full(LENGTH, 0.1), policy=policy)
    fed = federation(LocalPool({"h0": node, "h1": make_node("h1", keys, roster, np.zeros(LENGTH)),
                                "h2": make_node("h2", keys, roster, np.zeros(LENGTH))}), roster)
    request = wire.TaskRequest.with_weights(round=0, task="train", weights=np.zeros(LENGTH), options={
        **fed.task_options(), "encoding": {"clip": 1.0, "bits": 32, "num_clients": 50, "max_weight": 1}})
    [reply] = node.handle(wire.encode(request))
    assert wire.decode(reply).status == "ready"

    def join(*, n: int = 50, k: int | None = None, t: int = 26, index: int = 0, parties=None) -> bytes:
        cfg = SecAggConfig(num_clients=n, threshold=t, neighbours=k, clip=1.0, bits=32, max_weight=1,
                           authenticated=True, scale=node._encoding.scale)  # noqa: SLF001 - as announced
        params = SessionParams(config=cfg, session_id=os.urandom(16), round=0, vector_length=LENGTH + 1,
                               context=bytes.fromhex(wire.request_digest(request)))
        keys_in_order = parties or tuple(keys[f"h{i}"].public for i in range(n))
        return wire.encode(wire.Join(round=0, index=index, session=params, parties=keys_in_order))

    return node, keys, join


def test_n50_with_k2_t2_and_other_sessions_below_policy_are_refused_before_anything_is_sent():
    node, keys, join = _ready_node(NodePolicy(min_parties=40, colluders=1, min_threshold=10))
    stranger = cp.SigningKey.generate().public
    refused = [
        (join(k=2, t=2), PolicyError),         # issue 11: n=50, k=2, t=2 was accepted
        (join(k=16, t=9), PolicyError),        # t below the policy's 10 (2t - k - 1 = 1 would do)
        (join(n=30, t=16), PolicyError),       # fewer parties than the policy's 40
        (join(index=1), UnknownPartyError),    # the node's own key is not at its index
        (join(parties=(keys["h0"].public, stranger, *(keys[f"h{i}"].public for i in range(2, 50)))),
         UnknownPartyError),                   # a party outside the roster
    ]
    for blob, error in refused:
        with pytest.raises(error):
            node.handle(blob)
        assert node._session is None and node._field is not None  # noqa: SLF001 - nothing sent or changed
    [advert] = node.handle(join(k=20, t=11))  # t >= 10, tolerates 2t - k - 1 = 1 colluder: accepted
    assert isinstance(wire.decode(advert), wire.SecAggFrame)


def test_max_sessions_per_job():
    node, _, join = _ready_node(NodePolicy(max_sessions=1))
    node._sessions_joined = 1  # noqa: SLF001 - as after one round
    with pytest.raises(PolicyError, match="already joined"):
        node.handle(join())


# -- 4. replayed tasks -------------------------------------------------------------------------


def test_a_replayed_train_request_is_refused_before_the_budget_is_charged(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="secfedtl.federated.pool")
    ledger = Ledger(tmp_path / "ledger.jsonl")
    roster, keys = Roster.generate(HOSPITALS)
    mechanism = MeanMechanism(dim=3, noise_multiplier=5.0)
    rng = np.random.default_rng(0)
    guards = {n: BudgetGuard(client=n, budget=PrivacyBudget(epsilon=10.0, delta=1e-5), ledger=ledger)
              for n in HOSPITALS}
    nodes = {n: ClientNode(name=n, identity=keys[n], roster=roster, tasks={"mean": StatisticTask(
        FeatureMean(mechanism), data=rng.standard_normal((30, 3)) / 2, guard=guards[n])}) for n in HOSPITALS}
    pool = LocalPool(nodes)
    sent: list[bytes] = []
    real = pool.exchange

    def recording(requests, *, phase):
        if phase == "task":
            sent.extend(requests["hungary"])
        return real(requests, phase=phase)

    pool.exchange = recording  # type: ignore[method-assign]
    fed = Federation(pool=pool, roster=roster, names=["mean"], global_params=np.zeros(1),
                     optimizer=make_server_optimizer("fedavg", server_lr=1.0), max_samples=1000)
    out = fed.secure_round("mean", round=0, cohort=HOSPITALS, vector_length=mechanism.vector_length,
                           clip=1000.0, max_weight=1, weights=np.zeros(0), options={"mechanism": mechanism.options()})
    assert out.status == "ok"
    before = (tmp_path / "ledger.jsonl").read_bytes()
    for _ in range(5):  # the budget of 10 would have run out after a few replays
        assert real({"hungary": sent}, phase="task") == {}  # silent: refused
    assert "ReplayError" in caplog.text
    assert (tmp_path / "ledger.jsonl").read_bytes() == before
    assert len(guards["hungary"].budget.events) == 1
    with pytest.raises(ReplayError):
        nodes["hungary"].handle(sent[0])


# -- 5. the agent socket -----------------------------------------------------------------------


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="sfta-"))  # AF_UNIX paths are short (108 bytes)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _serve(node, path: Path, **kw):
    agent = NodeAgent(node, path, **kw)
    agent.open()
    thread = threading.Thread(target=agent.serve_forever, daemon=True)
    thread.start()
    return agent, thread


class Fragile(Fixed):
    """Reads its options as a TrainTask does (``list(options["names"])``): a bad type raises
    TypeError out of the node, which killed the agent before."""

    def __call__(self, request: wire.TaskRequest, digest: str) -> TaskOutput:
        list(request.options.get("names", []))
        return super().__call__(request, digest)


def test_junk_and_killer_requests_do_not_stop_the_agent_and_a_replay_is_refused(short_dir):
    roster, keys = Roster.generate(HOSPITALS)
    task = Fragile(np.full(LENGTH, 0.1))
    node = ClientNode(name="hungary", tasks={"train": task}, identity=keys["hungary"], roster=roster)
    agent, thread = _serve(node, short_dir / "a" / "h.sock", io_timeout=600)
    client = AgentClient(agent.path, timeout=60)
    frame = AGENT_MAGIC + bytes([AGENT_VERSION, OP_EXCHANGE])
    junk = [os.urandom(4096), b"\0" * 14, frame + (1 << 62).to_bytes(8, "big"),
            frame + (5).to_bytes(8, "big") + b"\xff" * 5, frame + (2).to_bytes(8, "big") + b"abc"]
    for blob in junk:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(60)
            conn.connect(os.fspath(agent.path))
            conn.sendall(blob)
            conn.shutdown(socket.SHUT_WR)
            assert conn.recv(100) == b""  # closed without an answer
    encoding = {"clip": 1.0, "bits": 32, "num_clients": 3, "max_weight": 1}
    killer = wire.TaskRequest(round=7, task="train", options={"names": 5, "encoding": encoding})
    # the options a task trips over are a failed reply with the fixed reason (before: the agent died) ...
    [(_, answer)] = unpack_batch(client.exchange(pack_batch(1, [("hungary", wire.encode(killer))])))[1]
    assert wire.decode(answer).status == "failed" and wire.decode(answer).info == {"reason": "failed"}
    assert client.hello() == "hungary"  # ... and the agent goes on
    request = wire.TaskRequest(round=0, task="train", options={"encoding": encoding})
    [(_, first)] = unpack_batch(client.exchange(pack_batch(2, [("hungary", wire.encode(request))])))[1]
    assert wire.decode(first).status == "ready" and task.runs == 1
    assert unpack_batch(client.exchange(pack_batch(3, [("hungary", wire.encode(request))])))[1] == []  # replay
    assert task.runs == 1  # not run again
    agent.stop()
    thread.join(10)
    assert not thread.is_alive() and not agent.path.exists()  # the socket file is gone


def test_an_idle_peer_does_not_block_others_and_is_dropped(short_dir):
    roster, keys = Roster.generate(HOSPITALS)
    node = ClientNode(name="va", tasks={"train": Fixed(np.zeros(LENGTH))}, identity=keys["va"], roster=roster)
    agent, thread = _serve(node, short_dir / "a" / "v.sock", io_timeout=2.0)
    idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    idle.settimeout(120)
    idle.connect(os.fspath(agent.path))
    idle.sendall(AGENT_MAGIC)  # half a header, then nothing
    half_open = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    half_open.connect(os.fspath(agent.path))  # nothing at all
    # Served while both idle peers are connected (the old agent answered one connection at a time,
    # blocking everyone behind the first for its whole 60 s timeout).
    for _ in range(3):
        assert AgentClient(agent.path, timeout=120).hello() == "va"
    assert idle.recv(10) == b""  # the idle peer is dropped without an answer
    half_open.settimeout(120)
    assert half_open.recv(10) == b""
    idle.close()
    half_open.close()
    agent.stop()
    thread.join(10)
    assert not agent.path.exists()


def test_the_node_command_removes_its_socket_on_sigterm(short_dir):
    roster_path = write_simulated_keys(short_dir / "keys", HOSPITALS)
    sock = short_dir / "s" / "hungary.sock"
    proc = subprocess.Popen([sys.executable, "-m", "secfedtl.cli", "node", "--hospital", "hungary",
                             "--out", str(short_dir / "out"), "--socket", str(sock),
                             "--key", str(short_dir / "keys" / "hungary.key"), "--roster", str(roster_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: sock.exists() or proc.poll() is not None, timeout=300, what="the agent's socket")
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:  # junk first: it must survive it
            conn.connect(os.fspath(sock))
            conn.sendall(b"junk" * 100)
        client = AgentClient(sock, timeout=120)
        # issue 11: options {"names": 5} raised TypeError out of the real TrainTask and killed the agent
        killer = wire.TaskRequest(round=0, task="train", options={
            "names": 5, "encoding": {"clip": 1.0, "bits": 32, "num_clients": 3, "max_weight": 1}})
        try:
            replies = unpack_batch(client.exchange(pack_batch(1, [("hungary", wire.encode(killer))])))[1]
        except DecodeError:  # closed without an answer
            replies = []
        assert all(wire.decode(blob).status == "failed" for _, blob in replies)  # or refused as malformed
        assert client.hello() == "hungary"  # either way the agent goes on
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert not sock.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_node_command_refuses_a_key_the_roster_does_not_pin(short_dir):
    roster_path = write_simulated_keys(short_dir / "keys", HOSPITALS)
    done = subprocess.run([sys.executable, "-m", "secfedtl.cli", "node", "--hospital", "hungary",
                           "--out", str(short_dir / "out"), "--socket", str(short_dir / "s" / "h.sock"),
                           "--key", str(short_dir / "keys" / "va.key"), "--roster", str(roster_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "the roster pins another key" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1  # one line, no traceback


def test_the_server_cannot_make_a_node_charge_more_tasks_than_its_job_plans(tmp_path):
    """Budget drain (red-team review): train requests charge when they arrive, before any session.
    A heart-job node runs at most the job's planned tasks (rounds + personalisation), whatever
    round numbers the server invents; the next one is refused before anything is charged."""
    from secfedtl.jobs.heart import HeartConfig, build_job
    from secfedtl.training import flatten_params

    data = HeartConfig.load(None).to_dict()
    data["job"]["rounds"], data["job"]["id"], data["model"]["source_epochs"] = 2, "drain", 40
    config = HeartConfig.from_mapping(data)
    job = build_job(config, tmp_path / "out", state_dir=tmp_path / "state")
    try:
        node, guard = job.nodes["va"], job.guards["va"]
        head = job.source.head_state
        options = {**job.federation.task_options(),
                   "encoding": {"clip": 1.0, "bits": 32, "num_clients": 3, "max_weight": 1000}}
        statuses = []
        for r in (0, 5, 9, 17):  # invented round numbers
            request = wire.TaskRequest.with_weights(round=r, task="train", weights=flatten_params(head), options=options)
            try:
                statuses.append(wire.decode(node.handle(wire.encode(request))[0]).status)
            except PolicyError:
                statuses.append("refused by policy")
        assert statuses == ["ready", "ready", "ready", "refused by policy"]  # 2 rounds + personalisation
        assert len(guard.budget.events) == 3
    finally:
        job.close()


def test_a_replay_after_a_restart_is_refused_by_the_ledger(tmp_path):
    """The node's memory of answered tasks is lost on a restart; its ledger is not: a rebuilt node
    of the same job refuses a round its ledger already charged, before training or charging."""
    from secfedtl.jobs.heart import HeartConfig, build_job
    from secfedtl.training import flatten_params

    data = HeartConfig.load(None).to_dict()
    data["job"]["rounds"], data["job"]["id"], data["model"]["source_epochs"] = 2, "restart", 40
    config = HeartConfig.from_mapping(data)
    replies = []
    for attempt in range(2):  # the same job, built twice (a restarted process)
        job = build_job(config, tmp_path / f"out{attempt}", state_dir=tmp_path / "state")
        try:
            options = {**job.federation.task_options(),
                       "encoding": {"clip": 1.0, "bits": 32, "num_clients": 3, "max_weight": 1000}}
            request = wire.TaskRequest.with_weights(round=0, task="train", weights=flatten_params(job.source.head_state),
                                                    options=options)
            replies.append(wire.decode(job.nodes["hungary"].handle(wire.encode(request))[0]).status)
            events = len(job.guards["hungary"].budget.events)
        finally:
            job.close()
    assert replies == ["ready", "failed"] and events == 1  # charged once, whatever the restart


def test_the_server_cannot_make_a_node_write_evaluation_reports_without_end(tmp_path):
    """Red-team review (F4): evaluate may be asked again for a round, but a node answers it for at
    most max_tasks + 1 distinct rounds (each writes a report file at the hospital)."""
    from secfedtl.jobs.heart import HeartConfig, build_job
    from secfedtl.training import flatten_params

    data = HeartConfig.load(None).to_dict()
    data["job"]["rounds"], data["job"]["id"], data["model"]["source_epochs"] = 2, "evaluate-flood", 40
    config = HeartConfig.from_mapping(data)
    job = build_job(config, tmp_path / "out", state_dir=tmp_path / "state")
    try:
        node = job.nodes["va"]
        limit = node._policy.max_tasks
        assert limit is not None
        weights = flatten_params(job.source.head_state)
        statuses = []
        for r in [*range(limit + 1), 0, 1000]:
            request = wire.TaskRequest.with_weights(round=r, task="evaluate", weights=weights,
                                                    options=job.federation.task_options())
            try:
                statuses.append(wire.decode(node.handle(wire.encode(request))[0]).status)
            except PolicyError:
                statuses.append("refused by policy")
        assert statuses == ["done"] * (limit + 2) + ["refused by policy"]
    finally:
        job.close()


class Tripping(Fixed):
    """Trips over an exception type the node did not list before (IndexError, AssertionError,
    ZeroDivisionError: e.g. a label too large for the head, in torch)."""

    def __init__(self, vector: np.ndarray, error: type[Exception]) -> None:
        super().__init__(vector)
        self.error = error

    def __call__(self, request: wire.TaskRequest, digest: str) -> TaskOutput:
        if request.round == 0:
            raise self.error("tripped")
        return super().__call__(request, digest)


@pytest.mark.parametrize("error", [IndexError, AssertionError, ZeroDivisionError, AttributeError])
def test_any_exception_in_a_task_is_a_failed_reply_and_the_node_goes_on(error, caplog):
    roster, keys = Roster.generate(HOSPITALS)
    node = ClientNode(name="hungary", tasks={"train": Tripping(np.full(LENGTH, 0.1), error)},
                      identity=keys["hungary"], roster=roster)
    encoding = {"clip": 1.0, "bits": 32, "num_clients": 3, "max_weight": 1}
    with caplog.at_level(logging.WARNING, logger="secfedtl.federated.node"):
        [failed] = node.handle(wire.encode(wire.TaskRequest(round=0, task="train", options={"encoding": encoding})))
    assert wire.decode(failed).status == "failed" and wire.decode(failed).info == {"reason": "failed"}
    assert error.__name__ in caplog.text and "tripped" not in caplog.text  # the type, never the text
    [ready] = node.handle(wire.encode(wire.TaskRequest(round=1, task="train", options={"encoding": encoding})))
    assert wire.decode(ready).status == "ready"
