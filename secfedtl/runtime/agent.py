"""A node agent: one hospital's :class:`~secfedtl.federated.node.ClientNode`, alive for the whole
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

Anything malformed closes the connection without an answer, and the agent goes on serving the
others; a peer idle for ``io_timeout`` seconds is dropped without blocking anyone. The socket
file is created mode 0600 in a directory that must not be writable by others, and removed when
the agent stops; treat access to it like access to the hospital's data. This module imports no torch at the top: the relay side (:class:`AgentClient`)
must start fast in Flower's per-message processes.
"""

from __future__ import annotations

import argparse
import logging
import os
import selectors
import signal
import socket
import stat
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from secfedtl.errors import ConfigError, DecodeError
from secfedtl.runtime.batch import pack_batch, unpack_batch

if TYPE_CHECKING:  # pragma: no cover
    from secfedtl.federated.node import ClientNode

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


def parse_header(header: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[int, int]:
    """``(op, payload size)`` of a frame header (:class:`DecodeError` for anything else)."""
    if len(header) != _FRAME.size:
        raise DecodeError("short frame header")
    magic, version, op, size = _FRAME.unpack(header)
    if magic != AGENT_MAGIC:
        raise DecodeError("not a secfedtl agent frame")
    if version != AGENT_VERSION:
        raise DecodeError(f"unknown agent protocol version {version}")
    if op not in (OP_HELLO, OP_EXCHANGE):
        raise DecodeError(f"unknown agent operation {op}")
    if size > max_bytes:
        raise DecodeError(f"frame of {size} bytes is over the limit of {max_bytes}")
    return op, size


def recv_frame(conn: socket.socket, *, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[int, bytes]:
    """One frame; raises :class:`DecodeError` for anything that is not one (and nothing else,
    apart from the socket's own ``OSError``/timeout)."""
    op, size = parse_header(_recv_exact(conn, _FRAME.size), max_bytes=max_bytes)
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


@dataclass(eq=False)
class _Peer:
    """One connection's state: what it sent so far, what it is owed, when it last made progress."""

    sock: socket.socket
    last: float
    inbox: bytearray = field(default_factory=bytearray)
    frame: tuple[int, int] | None = None  # (op, payload size) once the header is in
    outbox: bytes = b""
    sent: int = 0


class NodeAgent:
    """Serve ``node`` on the Unix socket ``path`` (created 0600; an existing socket file is
    replaced, any other file is refused).

    Connections are multiplexed on one thread (:mod:`selectors`): a peer that makes no progress
    (sends or reads nothing) for ``io_timeout`` seconds is dropped without holding up anyone else,
    and at most ``max_connections`` are open at once (a connection over that is closed at once).
    Complete requests are answered one at a time, in the order they complete: Flower hands a
    SuperNode one message at a time, and the node's state machine wants that. Whatever a peer
    sends, the agent goes on: a malformed frame, and any exception the node raises while
    answering (logged by type only), close that one connection without an answer.
    :meth:`stop` (or leaving :meth:`serve_forever`) removes the socket file.
    """

    def __init__(self, node: ClientNode, path: str | os.PathLike[str], *, io_timeout: float = 60.0,
                 max_connections: int = 16, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if not io_timeout > 0 or max_connections < 1 or max_bytes < 1:
            raise ConfigError("io_timeout, max_connections and max_bytes must be positive")
        self.node = node
        self.path = Path(path)
        self.io_timeout = float(io_timeout)
        self.max_connections = max_connections
        self.max_bytes = max_bytes
        self._sock: socket.socket | None = None
        self._stopping = False
        self._peers: dict[int, _Peer] = {}
        self._selector: selectors.BaseSelector | None = None

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
        sock.listen(self.max_connections)
        sock.setblocking(False)
        self._sock = sock

    def answer(self, op: int, payload: bytes) -> bytes:
        """The response payload to one request (raises :class:`DecodeError` for bad batches)."""
        if op == OP_HELLO:
            return self.node.name.encode("utf-8")
        from secfedtl.federated.pool import deliver

        seq, items = unpack_batch(payload)
        mine = [blob for name, blob in items if name == self.node.name]
        replies = deliver(self.node, mine) if mine else []
        return pack_batch(seq, [(self.node.name, r) for r in replies or []])

    def serve_forever(self) -> None:
        """Serve until :meth:`stop`; then close every connection and remove the socket file."""
        if self._sock is None:
            self.open()
        assert self._sock is not None
        sel = self._selector = selectors.DefaultSelector()
        try:
            sel.register(self._sock, selectors.EVENT_READ, None)
            while not self._stopping:
                self.step(timeout=min(1.0, self.io_timeout))
        except (OSError, ValueError):  # the listening socket was closed by stop()
            if not self._stopping:
                raise
        finally:
            for fd in list(self._peers):
                self._close(fd)
            sel.close()
            self._selector = None
            self._remove_socket_file()

    def step(self, *, timeout: float) -> None:
        """One pass of the loop: wait up to ``timeout`` seconds for activity, serve it, then drop
        peers idle for longer than ``io_timeout``."""
        sel = self._selector
        assert sel is not None and self._sock is not None
        for key, events in sel.select(timeout):
            if key.data is None:
                self._accept()
            elif events & selectors.EVENT_READ:
                self._read(key.fd)
            elif events & selectors.EVENT_WRITE:
                self._write(key.fd)
        now = time.monotonic()
        for fd, peer in list(self._peers.items()):
            if now - peer.last > self.io_timeout:
                log.warning("agent %s: dropped a connection idle for %.0f s", self.node.name, self.io_timeout)
                self._close(fd)

    def _accept(self) -> None:
        assert self._sock is not None and self._selector is not None
        try:
            conn, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        if len(self._peers) >= self.max_connections:
            log.warning("agent %s: %d connections open; refused one more", self.node.name, len(self._peers))
            conn.close()
            return
        conn.setblocking(False)
        self._peers[conn.fileno()] = _Peer(sock=conn, last=time.monotonic())
        self._selector.register(conn, selectors.EVENT_READ, "peer")

    def _close(self, fd: int) -> None:
        peer = self._peers.pop(fd, None)
        if peer is None:
            return
        if self._selector is not None:
            try:
                self._selector.unregister(peer.sock)
            except (KeyError, ValueError):
                pass
        peer.sock.close()

    def _read(self, fd: int) -> None:
        peer = self._peers[fd]
        try:
            chunk = peer.sock.recv(1 << 20)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(fd)
            return
        if not chunk:  # closed before a whole request arrived
            self._close(fd)
            return
        peer.last = time.monotonic()
        peer.inbox += chunk
        try:
            if peer.frame is None and len(peer.inbox) >= _FRAME.size:
                peer.frame = parse_header(bytes(peer.inbox[:_FRAME.size]), max_bytes=self.max_bytes)
                del peer.inbox[:_FRAME.size]
            if peer.frame is None or len(peer.inbox) < peer.frame[1]:
                return
            op, size = peer.frame
            if len(peer.inbox) > size:
                raise DecodeError("bytes after the request")
            reply = self.answer(op, bytes(peer.inbox))
        except DecodeError as exc:
            log.warning("agent %s: dropped a malformed request (%s)", self.node.name, type(exc).__name__)
            self._close(fd)
            return
        except Exception as exc:  # noqa: BLE001 - no request may stop the agent; the node logs no secrets
            log.error("agent %s: the node failed on a request (%s); connection closed", self.node.name,
                      type(exc).__name__)
            self._close(fd)
            return
        peer.inbox = bytearray()
        peer.outbox = _FRAME.pack(AGENT_MAGIC, AGENT_VERSION, op, len(reply)) + reply
        peer.last = time.monotonic()
        assert self._selector is not None
        self._selector.modify(peer.sock, selectors.EVENT_WRITE, "peer")
        self._write(fd)

    def _write(self, fd: int) -> None:
        peer = self._peers.get(fd)
        if peer is None:
            return
        try:
            sent = peer.sock.send(peer.outbox[peer.sent:peer.sent + (1 << 20)])
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(fd)
            return
        peer.sent += sent
        peer.last = time.monotonic()
        if peer.sent >= len(peer.outbox):
            self._close(fd)  # one request per connection

    def _remove_socket_file(self) -> None:
        try:
            if self.path.is_socket():
                self.path.unlink()
        except OSError:
            pass

    def stop(self) -> None:
        """Stop serving (from a signal handler or another thread) and remove the socket file."""
        self._stopping = True
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
        self._remove_socket_file()


# -- `secfedtl node`: one hospital's agent for a job ---------------------------------------------


def build_hospital_agent(config: Any, name: str, out: Path, socket_path: Path, *, key: Path, roster: Path,
                         policy: Any = None, node_name: str | None = None,
                         state_dir: Path | None = None, job: Any = None) -> NodeAgent:
    """The agent of hospital ``name`` of a job: ``job`` (a
    :class:`~secfedtl.federated.job.FederatedJob` this node's operator installed; default the
    bundled heart job) loads the hospital's data on this machine and builds the source model;
    its privacy state (ledger, budget and local reports, kept across jobs) is in
    ``state_dir/name`` (the node's own setting; default
    :func:`~secfedtl.federated.job.default_state_root`, never the job file or ``out``), its signing
    key from the file ``key`` (0600) and the federation's roster from ``roster``
    (:mod:`secfedtl.federated.roster`), pinned in the node with ``policy``. ``node_name`` (default
    ``name``) is the name the node answers to (tests run a second node from one hospital's data
    under another name); the key's roster name must be the node's name. The agent holds the
    state's lock until it stops."""
    from secfedtl.federated import job as _job
    from secfedtl.federated.roster import Roster, load_signing_key

    job = _job.load_job() if job is None else job
    config = job.check(config)
    if "selection" in config.sections:
        raise ConfigError("[selection] runs with the in-process runners only; name the chosen source in [model]")
    key_name, identity = load_signing_key(key)
    pinned = Roster.load(roster)
    answer_as = name if node_name is None else node_name
    if key_name != answer_as or pinned.parties.get(answer_as) != identity.public:
        raise ConfigError(f"{key} is {key_name!r}'s key; the roster pins another key (or none) for {answer_as!r}")
    data = job.load_data(config, name)
    source = job.build_source(config)
    out.mkdir(parents=True, exist_ok=True)
    state = _job.open_hospital_state(config, name, data, _job.state_root(state_dir))
    try:
        hospital = _job.build_client_node(job, config, name, source, data, state, identity=identity, roster=pinned,
                                          policy=policy)
    except BaseException:
        state.close()
        raise
    hospital.node.name = answer_as
    return NodeAgent(hospital.node, socket_path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, nargs="?", default=None,
                        help="job TOML file (default: the bundled heart job)")
    parser.add_argument("--hospital", required=True, help="which of the job's clients this node is")
    parser.add_argument("--job", default=None, metavar="MODULE:ATTR",
                        help="the FederatedJob this node runs, from this machine's own installation (default: the "
                             "bundled heart job, secfedtl.jobs.heart:HEART); the server can never choose it")
    parser.add_argument("--out", type=Path, required=True, help="this node's working directory")
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="where this hospital's privacy state (ledger, budget, local reports) is kept across "
                             "jobs: DIR/<hospital>/; default $SECFEDTL_STATE_DIR, else ~/.local/share/secfedtl/privacy")
    parser.add_argument("--socket", type=Path, required=True,
                        help="Unix socket the ClientApp relay connects to (node-config key 'agent')")
    parser.add_argument("--key", type=Path, required=True,
                        help="this hospital's signing key file (secfedtl keys new; mode 0600)")
    parser.add_argument("--roster", type=Path, required=True,
                        help="the federation's roster (secfedtl keys roster): whom this node aggregates with")
    parser.add_argument("--min-parties", type=int, default=None,
                        help="refuse sessions with fewer parties (default: all of the roster but a quarter, >= 3)")
    parser.add_argument("--colluders", type=int, default=0,
                        help="clients assumed to collude with an active server; sessions must tolerate them")
    parser.add_argument("--max-sessions", type=int, default=None,
                        help="refuse secure-aggregation sessions beyond this many (default: the job's rounds, plus "
                             "one for a preparation; its DP steps with distributed noise)")
    parser.add_argument("--max-tasks", type=int, default=None,
                        help="refuse tasks beyond this many; each may charge the budget when it arrives (default: "
                             "what the job plans: its rounds, plus one with personalisation)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for local training")
    parser.add_argument("--node-name", default=None,
                        help="answer to this name instead of the hospital's (tests: a second node from one "
                             "hospital's data)")


def main(args: argparse.Namespace) -> int:
    import torch

    from secfedtl.federated.job import load_job
    from secfedtl.federated.job import node_policy

    job = load_job(args.job)
    config = job.load_config(args.config)
    torch.set_num_threads(max(1, args.threads))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    planned = node_policy(config, job)  # what the job plans: its sessions and tasks
    policy = node_policy(config, job, min_parties=args.min_parties, colluders=args.colluders,
                         max_sessions=planned.max_sessions if args.max_sessions is None else args.max_sessions,
                         max_tasks=planned.max_tasks if args.max_tasks is None else args.max_tasks)
    agent = build_hospital_agent(config, args.hospital, args.out, args.socket,
                                 key=args.key, roster=args.roster, policy=policy, node_name=args.node_name,
                                 state_dir=args.state_dir, job=job)
    agent.open()

    def _stop(signum: int, frame: Any) -> None:
        agent.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print(f"secfedtl node {agent.node.name}: ready on {args.socket}", file=sys.stderr, flush=True)
    try:
        agent.serve_forever()
    finally:
        agent.stop()
    return 0


__all__ = ["AgentClient", "NodeAgent", "build_hospital_agent", "parse_header", "recv_frame", "send_frame"]
