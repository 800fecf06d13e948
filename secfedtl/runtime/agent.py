"""A node agent: one hospital's :class:`~secfedtl.runtime.node.ClientNode`, alive for the whole
run, answering batches of wire messages on a local Unix socket.

Why it exists: a Flower SuperNode starts a fresh ``flwr-clientapp`` process for every message
(Flower 1.41, both ``--isolation`` modes), so nothing a ClientApp keeps in memory survives from
one secure-aggregation phase to the next, and Flower's own per-node state (``Context.state``)
is stored by the SuperNode, where secret keys must not go. So the ClientApp
(:mod:`secfedtl.runtime.flower`) is a relay: it forwards the bytes of a Flower message to this
agent and returns the agent's bytes. The agent alone holds the hospital's data, DP client,
budget, ledger writer and secure-aggregation keys; the relay sees only what travels over the
network anyway (protocol messages: public keys, encrypted shares, masked vectors).

Socket protocol (version 1), one request and one response per connection::

    MAGIC "SFTA" | version u8 | op u8 | payload length u64 | payload

* ``op = HELLO`` (empty payload): the response payload is the node's name (UTF-8);
* ``op = EXCHANGE``: the payload is a batch of :mod:`secfedtl.runtime.batch` (``(name, wire
  message)`` items); the response is a batch with the same sequence number holding this node's
  replies (empty when it refused or fell silent). Items for another name are ignored.

Anything malformed closes the connection without an answer. The socket file is created mode
0600 in a directory that must not be writable by others; treat access to it like access to the
hospital's data. This module imports no torch at the top: the relay side (:class:`AgentClient`)
must start fast in Flower's per-message processes.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import stat
import struct
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from secfedtl.errors import ConfigError, DecodeError
from secfedtl.runtime.batch import pack_batch, unpack_batch

if TYPE_CHECKING:  # pragma: no cover
    from secfedtl.runtime.node import ClientNode

log = logging.getLogger(__name__)

AGENT_MAGIC = b"SFTA"
AGENT_VERSION = 1
OP_HELLO = 1
OP_EXCHANGE = 2
DEFAULT_MAX_BYTES = 1 << 30
_FRAME = struct.Struct(">4sBBQ")


def _recv_exact(conn: socket.socket, size: int) -> bytes:
    chunks, got = [], 0
    while got < size:
        chunk = conn.recv(min(size - got, 1 << 20))
        if not chunk:
            raise DecodeError("connection closed inside a frame")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def send_frame(conn: socket.socket, op: int, payload: bytes) -> None:
    conn.sendall(_FRAME.pack(AGENT_MAGIC, AGENT_VERSION, op, len(payload)) + payload)


def recv_frame(conn: socket.socket, *, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[int, bytes]:
    """One frame; raises :class:`DecodeError` for anything that is not one (and nothing else,
    apart from the socket's own ``OSError``/timeout)."""
    magic, version, op, size = _FRAME.unpack(_recv_exact(conn, _FRAME.size))
    if magic != AGENT_MAGIC:
        raise DecodeError("not a secfedtl agent frame")
    if version != AGENT_VERSION:
        raise DecodeError(f"unknown agent protocol version {version}")
    if op not in (OP_HELLO, OP_EXCHANGE):
        raise DecodeError(f"unknown agent operation {op}")
    if size > max_bytes:
        raise DecodeError(f"frame of {size} bytes is over the limit of {max_bytes}")
    return op, _recv_exact(conn, size)


class AgentClient:
    """The relay's side: ask the agent at ``path`` (a Unix socket) one thing per connection."""

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 600.0) -> None:
        self.path = os.fspath(path)
        self.timeout = timeout

    def _ask(self, op: int, payload: bytes) -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(self.timeout)
            conn.connect(self.path)
            send_frame(conn, op, payload)
            got_op, reply = recv_frame(conn)
        if got_op != op:
            raise DecodeError("the agent answered another operation")
        return reply

    def hello(self) -> str:
        """The name of the node behind the agent."""
        try:
            return self._ask(OP_HELLO, b"").decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError("the agent's name is not UTF-8") from exc

    def exchange(self, batch: bytes) -> bytes:
        """Forward a batch of wire messages; return the node's batch of replies."""
        return self._ask(OP_EXCHANGE, batch)


def _check_private_dir(directory: Path) -> None:
    mode = directory.stat().st_mode
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(f"{directory} is writable by other users: put the agent socket in a private directory")


class NodeAgent:
    """Serve ``node`` on the Unix socket ``path`` (created 0600; an existing socket file is
    replaced, any other file is refused). Connections are answered one at a time, in order:
    Flower hands a SuperNode one message at a time, and the node's state machine wants that."""

    def __init__(self, node: ClientNode, path: str | os.PathLike[str], *, io_timeout: float = 60.0) -> None:
        self.node = node
        self.path = Path(path)
        self.io_timeout = io_timeout
        self._sock: socket.socket | None = None
        self._stopping = False

    def open(self) -> None:
        parent = self.path.parent
        parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _check_private_dir(parent)
        if self.path.exists() or self.path.is_symlink():
            if not stat.S_ISSOCK(self.path.lstat().st_mode):
                raise ConfigError(f"{self.path} exists and is not a socket")
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(os.fspath(self.path))
        finally:
            os.umask(old)
        sock.listen(8)
        self._sock = sock

    def serve_one(self) -> bool:
        """Answer one connection; False once the agent was stopped."""
        assert self._sock is not None, "open() first"
        try:
            conn, _ = self._sock.accept()
        except OSError:
            return False
        with conn:
            conn.settimeout(self.io_timeout)
            try:
                op, payload = recv_frame(conn)
                send_frame(conn, op, self.answer(op, payload))
            except (DecodeError, OSError, struct.error) as exc:
                log.warning("agent %s: dropped a malformed or broken request (%s)", self.node.name, type(exc).__name__)
        return not self._stopping

    def answer(self, op: int, payload: bytes) -> bytes:
        """The response payload to one request (raises :class:`DecodeError` for bad batches)."""
        if op == OP_HELLO:
            return self.node.name.encode("utf-8")
        from secfedtl.runtime.pool import _deliver

        seq, items = unpack_batch(payload)
        mine = [blob for name, blob in items if name == self.node.name]
        replies = _deliver(self.node, mine) if mine else []
        return pack_batch(seq, [(self.node.name, r) for r in replies or []])

    def serve_forever(self) -> None:
        if self._sock is None:
            self.open()
        while self.serve_one():
            pass

    def stop(self) -> None:
        self._stopping = True
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
        try:
            if self.path.exists() and stat.S_ISSOCK(self.path.lstat().st_mode):
                self.path.unlink()
        except OSError:
            pass


# -- `secfedtl node`: one hospital's agent for a job ---------------------------------------------


def build_hospital_agent(config: Any, name: str, out: Path, socket_path: Path, *,
                         node_name: str | None = None, state_dir: Path | None = None) -> NodeAgent:
    """The agent of hospital ``name`` of a job: its privacy state (ledger, budget and local
    reports, kept across jobs) in ``state_dir/name`` (the node's own setting; default
    :func:`~secfedtl.runtime.job.default_state_root`, never the job file or ``out``).
    ``node_name`` (default ``name``) is the name the node answers to (tests run a second node
    from one hospital's data under another name). The agent holds the state's lock until it
    stops."""
    from secfedtl.runtime.job import build_client_node, build_source, open_hospital_state, state_root

    from secfedtl.errors import ConfigError

    if "selection" in config.sections:
        raise ConfigError("[selection] runs with the in-process runners only; name the chosen source in [model]")
    out.mkdir(parents=True, exist_ok=True)
    source = build_source(config)
    state = open_hospital_state(config, name, source.centres, state_root(state_dir))
    hospital = build_client_node(config, name, source, state)
    if node_name is not None:
        hospital.node.name = node_name
    return NodeAgent(hospital.node, socket_path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, nargs="?", default=None,
                        help="job TOML file (default: the bundled heart job)")
    parser.add_argument("--hospital", required=True, help="which of the job's clients this node is")
    parser.add_argument("--out", type=Path, required=True, help="this node's working directory")
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="where this hospital's privacy state (ledger, budget, local reports) is kept across "
                             "jobs: DIR/<hospital>/; default $SECFEDTL_STATE_DIR, else ~/.local/share/secfedtl/privacy")
    parser.add_argument("--socket", type=Path, required=True,
                        help="Unix socket the ClientApp relay connects to (node-config key 'agent')")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for local training")
    parser.add_argument("--node-name", default=None,
                        help="answer to this name instead of the hospital's (tests: a second node from one "
                             "hospital's data)")


def main(args: argparse.Namespace) -> int:
    import torch

    from secfedtl.runtime.job import JobConfig

    torch.set_num_threads(max(1, args.threads))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    agent = build_hospital_agent(JobConfig.load(args.config), args.hospital, args.out, args.socket,
                                 node_name=args.node_name, state_dir=args.state_dir)
    agent.open()

    def _stop(signum: int, frame: Any) -> None:
        agent.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print(f"secfedtl node {agent.node.name}: ready on {args.socket}", file=sys.stderr, flush=True)
    agent.serve_forever()
    agent.stop()
    return 0


__all__ = ["AgentClient", "NodeAgent", "build_hospital_agent", "recv_frame", "send_frame"]
