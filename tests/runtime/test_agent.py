"""The node agent behind a Flower SuperNode: socket protocol, batches, refusals (no Flower needed)."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import struct
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secfedtl.errors import ConfigError, DecodeError, RemoteProtocolError
from secfedtl.runtime.agent import (
    AGENT_MAGIC,
    OP_EXCHANGE,
    OP_HELLO,
    AgentClient,
    NodeAgent,
    recv_frame,
    send_frame,
)
from secfedtl.runtime.batch import pack_batch, unpack_batch


class EchoNode:
    """Stands in for a ClientNode: answers b"x" with [b"x!"], refuses b"bad", is silent on b""."""

    name = "hungary"

    def __init__(self) -> None:
        self.seen: list[bytes] = []

    def handle(self, blob: bytes) -> list[bytes]:
        self.seen.append(blob)
        if blob == b"bad":
            raise RemoteProtocolError("refused")
        return [blob + b"!"] if blob else []


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="sfta-"))  # AF_UNIX paths are short (108 bytes)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def agent(short_dir: Path) -> Iterator[tuple[NodeAgent, EchoNode]]:
    node = EchoNode()
    served = NodeAgent(node, short_dir / "a" / "hungary.sock", io_timeout=60)  # type: ignore[arg-type]
    served.open()
    thread = threading.Thread(target=served.serve_forever, daemon=True)
    thread.start()
    yield served, node
    served.stop()
    thread.join(5)


def test_hello_and_exchange(agent: tuple[NodeAgent, EchoNode]) -> None:
    served, node = agent
    client = AgentClient(served.path, timeout=60)
    assert client.hello() == "hungary"
    reply = client.exchange(pack_batch(7, [("hungary", b"a"), ("hungary", b"b"), ("va", b"not mine")]))
    assert unpack_batch(reply) == (7, [("hungary", b"a!"), ("hungary", b"b!")])
    assert node.seen == [b"a", b"b"]  # the item for another client never reached the node


def test_refusal_is_an_empty_batch(agent: tuple[NodeAgent, EchoNode]) -> None:
    served, _ = agent
    client = AgentClient(served.path, timeout=60)
    assert unpack_batch(client.exchange(pack_batch(1, [("hungary", b"bad"), ("hungary", b"c")]))) == (1, [])
    assert unpack_batch(client.exchange(pack_batch(2, [("va", b"c")]))) == (2, [])


def test_socket_is_private(agent: tuple[NodeAgent, EchoNode]) -> None:
    served, _ = agent
    assert stat.S_IMODE(served.path.stat().st_mode) & 0o077 == 0
    assert stat.S_IMODE(served.path.parent.stat().st_mode) & 0o077 == 0


def test_garbage_is_dropped_and_the_agent_keeps_serving(agent: tuple[NodeAgent, EchoNode]) -> None:
    served, _ = agent
    for junk in (b"", b"nonsense", AGENT_MAGIC + bytes([9, OP_HELLO]) + struct.pack(">Q", 0),
                 AGENT_MAGIC + bytes([1, OP_EXCHANGE]) + struct.pack(">Q", 3) + b"abc"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(5)
            conn.connect(os.fspath(served.path))
            conn.sendall(junk)
            conn.shutdown(socket.SHUT_WR)
            assert conn.recv(100) == b""  # closed without an answer
    assert AgentClient(served.path, timeout=60).hello() == "hungary"


def test_refuses_a_shared_directory_and_a_non_socket_file(short_dir: Path) -> None:
    shared = short_dir / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(ConfigError, match="writable by other users"):
        NodeAgent(EchoNode(), shared / "x.sock").open()  # type: ignore[arg-type]
    private = short_dir / "private"
    private.mkdir(mode=0o700)
    (private / "x.sock").write_text("not a socket")
    with pytest.raises(ConfigError, match="not a socket"):
        NodeAgent(EchoNode(), private / "x.sock").open()  # type: ignore[arg-type]


def _frame_from(data: bytes) -> tuple[int, bytes]:
    left, right = socket.socketpair()
    with left, right:
        right.settimeout(2)
        left.sendall(data)
        left.shutdown(socket.SHUT_WR)
        return recv_frame(right, max_bytes=1 << 16)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_arbitrary_bytes_raise_only_decode_error(data: bytes) -> None:
    try:
        _frame_from(data)
    except DecodeError:
        pass
    except struct.error:  # pragma: no cover - would be a bug
        pytest.fail("struct.error escaped")


@given(st.sampled_from([OP_HELLO, OP_EXCHANGE]), st.binary(max_size=256))
def test_frames_round_trip(op: int, payload: bytes) -> None:
    left, right = socket.socketpair()
    with left, right:
        send_frame(left, op, payload)
        assert recv_frame(right) == (op, payload)


def test_oversized_frames_are_refused_before_reading() -> None:
    with pytest.raises(DecodeError, match="over the limit"):
        _frame_from(AGENT_MAGIC + bytes([1, OP_EXCHANGE]) + struct.pack(">Q", 1 << 40))
