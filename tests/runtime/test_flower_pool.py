"""FlowerPool, discovery and the ClientApp relay against an in-memory Flower grid (fast; needs
flwr). The real processes are in test_flower.py."""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from secfedtl.errors import ConfigError, RemoteProtocolError  # noqa: E402
from secfedtl.runtime.agent import NodeAgent  # noqa: E402
from secfedtl.runtime.batch import pack_batch  # noqa: E402
from secfedtl.runtime.flower import RECORD, FlowerPool, agent_path, discover, relay  # noqa: E402
from secfedtl.federated.pool import ClientPool  # noqa: E402

Handler = Callable[[Message], "Message | None"]


@pytest.fixture(autouse=True)
def _identity() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1  # what a ServerApp process has


class FakeGrid:
    """Replies at once through each node's handler; a handler returning None never replies."""

    def __init__(self, handlers: dict[int, Handler]) -> None:
        self.handlers = handlers
        self.replies: dict[str, Message] = {}
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.handlers)

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, group_id=group_id, ttl=ttl)

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id
            self.sent.append(msg)
            reply = self.handlers[msg.metadata.dst_node_id](msg)
            if reply is not None:
                self.replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, ids: list[str]) -> list[Message]:
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]


class Echo:
    def __init__(self, name: str) -> None:
        self.name = name

    def handle(self, blob: bytes) -> list[bytes]:
        if blob == b"refuse":
            raise RemoteProtocolError("no")
        return [self.name.encode() + b":" + blob]


@pytest.fixture
def agents() -> Iterator[dict[str, Path]]:
    root = Path(tempfile.mkdtemp(prefix="sffl-"))
    served, threads, paths = [], [], {}
    for name in ("hungary", "switzerland", "va"):
        agent = NodeAgent(Echo(name), root / f"{name}.sock", io_timeout=60)  # type: ignore[arg-type]
        agent.open()
        thread = threading.Thread(target=agent.serve_forever, daemon=True)
        thread.start()
        served.append(agent)
        threads.append(thread)
        paths[name] = agent.path
    yield paths
    for agent in served:
        agent.stop()
    for thread in threads:
        thread.join(5)
    shutil.rmtree(root, ignore_errors=True)


def _relay_to(path: Path) -> Handler:
    context = Context(run_id=1, node_id=0, node_config={"agent": str(path)}, state=RecordDict(), run_config={})
    return lambda msg: relay(msg, context)


def _grid(agents: dict[str, Path]) -> FakeGrid:
    return FakeGrid({10: _relay_to(agents["hungary"]), 11: _relay_to(agents["switzerland"]),
                     12: _relay_to(agents["va"])})


def test_discover_and_exchange_through_the_relay(agents: dict[str, Path]) -> None:
    grid = _grid(agents)
    nodes = discover(grid, ["hungary", "switzerland", "va"], timeout=30, poll_interval=0.01)
    assert nodes == {"hungary": 10, "switzerland": 11, "va": 12}
    pool = FlowerPool(grid, nodes, names=list(nodes), timeout=30, poll_interval=0.01)
    assert isinstance(pool, ClientPool)
    out = pool.exchange({"hungary": [b"a", b"b"], "va": [b"c"]}, phase="share")
    assert out == {"hungary": [b"hungary:a", b"hungary:b"], "va": [b"va:c"]}
    assert {m.metadata.group_id for m in grid.sent[-2:]} == {"share"}
    assert pool.exchange({"switzerland": [b"refuse"]}, phase="mask") == {}  # refused = silent


def test_missing_error_stale_and_forged_replies_are_silence(agents: dict[str, Path]) -> None:
    grid = _grid(agents)
    nodes = {"hungary": 10, "switzerland": 11, "va": 12}
    progress = Path(tempfile.mkdtemp(prefix="sffl-")) / "progress.jsonl"
    pool = FlowerPool(grid, nodes, names=list(nodes), timeout=0.3, poll_interval=0.01, progress=progress)
    grid.handlers[10] = lambda msg: None  # never answers: the exchange ends at the timeout
    grid.handlers[11] = lambda msg: Message(Error(code=0, reason="ClientApp crashed"), reply_to=msg)
    stale = pack_batch(999, [("va", b"old")])
    grid.handlers[12] = lambda msg: Message(RecordDict({RECORD: ConfigRecord({"op": "exchange", "batch": stale})}),
                                            reply_to=msg)
    assert pool.exchange({n: [b"x"] for n in nodes}, phase="mask") == {}
    # a node answering for another hospital is not believed
    grid.handlers[12] = lambda msg: Message(RecordDict({RECORD: ConfigRecord(
        {"op": "exchange", "batch": pack_batch(pool._seq, [("hungary", b"forged")])})}), reply_to=msg)  # noqa: SLF001
    assert pool.exchange({"va": [b"x"]}, phase="unmask") == {}
    lines = progress.read_text().splitlines()
    assert len(lines) == 4 and '"phase": "mask:start"' in lines[0] and '"answered": []' in lines[1]
    shutil.rmtree(progress.parent, ignore_errors=True)


def test_a_client_without_a_node_is_silent_and_unknown_nodes_are_refused(agents: dict[str, Path]) -> None:
    grid = _grid(agents)
    pool = FlowerPool(grid, {"hungary": 10}, names=["hungary", "switzerland", "va"], timeout=5, poll_interval=0.01)
    assert pool.exchange({"hungary": [b"x"], "va": [b"y"]}, phase="task") == {"hungary": [b"hungary:x"]}
    with pytest.raises(ConfigError):
        FlowerPool(grid, {"cleveland": 10}, names=["hungary"], timeout=5)


def test_discovery_refuses_two_nodes_claiming_one_hospital(agents: dict[str, Path]) -> None:
    grid = FakeGrid({1: _relay_to(agents["hungary"]), 2: _relay_to(agents["hungary"]),
                     3: _relay_to(agents["va"])})
    with pytest.raises(ConfigError, match="two Flower nodes"):
        discover(grid, ["hungary", "switzerland", "va"], timeout=5, poll_interval=0.01)


def test_discovery_gives_up_after_its_timeout(agents: dict[str, Path]) -> None:
    grid = FakeGrid({1: _relay_to(agents["hungary"]), 2: lambda msg: None})
    found = discover(grid, ["hungary", "switzerland"], timeout=0.5, poll_interval=0.01, reply_timeout=0.2)
    assert found == {"hungary": 1}


def test_agent_path_from_node_config_or_simulation_partition(monkeypatch) -> None:
    ctx = Context(run_id=1, node_id=0, node_config={"agent": "/srv/h.sock"}, state=RecordDict(), run_config={})
    assert agent_path(ctx) == "/srv/h.sock"
    monkeypatch.delenv("SECFEDTL_SIMULATION_AGENT_DIR", raising=False)
    sim = Context(run_id=1, node_id=0, node_config={"partition-id": 2, "num-partitions": 3}, state=RecordDict(),
                  run_config={"agent-dir": "/srv/other-federation"})
    # the server's run config never chooses the socket (it could point the relay at another agent)
    with pytest.raises(ConfigError, match="no secfedtl agent"):
        agent_path(sim)
    monkeypatch.setenv("SECFEDTL_SIMULATION_AGENT_DIR", "/tmp/agents")  # set by deploy for its own simulation
    assert agent_path(sim) == "/tmp/agents/partition-2.sock"
    with pytest.raises(ConfigError, match="no secfedtl agent"):
        agent_path(Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))
