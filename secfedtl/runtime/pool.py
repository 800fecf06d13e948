"""Client pools: how a server's messages reach client nodes and their replies come back.

A pool has one method that matters, :meth:`ClientPool.exchange`: deliver each client its
messages (bytes of :mod:`secfedtl.runtime.wire`) and return the replies of those that answered.
A client absent from the result was silent: crashed, timed out, unreachable or refusing. The
server loop (:class:`~secfedtl.runtime.federation.Federation`) treats every such client as a
dropout, whatever the pool.

* :class:`LocalPool`: the nodes live in this process and answer one after the other.
* :class:`ProcessPool`: the nodes live in forked worker processes and answer in parallel.
  Messages cross the pipes as raw bytes (``send_bytes``/``recv_bytes``, never pickle).
* ``secfedtl.runtime.flower``: nodes behind Flower SuperNodes (optional extra).
"""

from __future__ import annotations

import logging
import multiprocessing
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from secfedtl.errors import ConfigError, DecodeError, SecFedTLError
from secfedtl.runtime.batch import pack_batch, unpack_batch
from secfedtl.runtime.node import ClientNode

log = logging.getLogger(__name__)


@runtime_checkable
class ClientPool(Protocol):
    """What a server needs from a transport (see the module docstring)."""

    @property
    def names(self) -> Sequence[str]: ...

    def exchange(self, requests: Mapping[str, Sequence[bytes]], *, phase: str) -> dict[str, list[bytes]]: ...

    def close(self) -> None: ...


def _deliver(node: ClientNode, blobs: Sequence[bytes]) -> list[bytes] | None:
    """A node's replies to its messages; None when it fell silent (it broke off with an error)."""
    replies: list[bytes] = []
    for blob in blobs:
        try:
            replies.extend(node.handle(blob))
        except SecFedTLError as exc:  # the node refuses the message: to the server it is silent
            log.info("node %s refused a message: %s", node.name, type(exc).__name__)
            return None
    return replies


class LocalPool:
    """Nodes in this process, answering in turn (the embedded default)."""

    def __init__(self, nodes: Mapping[str, ClientNode]) -> None:
        if not nodes:
            raise ConfigError("a pool needs nodes")
        for name, node in nodes.items():
            if node.name != name:
                raise ConfigError(f"node {node.name!r} registered under another name {name!r}")
        self._nodes = dict(nodes)

    @property
    def names(self) -> list[str]:
        return sorted(self._nodes)

    @property
    def nodes(self) -> dict[str, ClientNode]:
        """The nodes (in-process only: tests and fault plans reach them here)."""
        return self._nodes

    def exchange(self, requests: Mapping[str, Sequence[bytes]], *, phase: str) -> dict[str, list[bytes]]:
        out: dict[str, list[bytes]] = {}
        for name, blobs in requests.items():
            node = self._nodes.get(name)
            replies = None if node is None else _deliver(node, blobs)
            if replies:
                out[name] = replies
        return out

    def close(self) -> None:
        pass


# -- forked workers ---------------------------------------------------------------------------

_pack, _unpack = pack_batch, unpack_batch  # the worker pipes and Flower carry the same batches


def _worker_main(conn: Any, nodes: dict[str, ClientNode]) -> None:  # pragma: no cover - child
    import torch

    torch.set_num_threads(1)  # one thread per worker: the workers are the parallelism
    while True:
        try:
            data = conn.recv_bytes()
        except EOFError:
            return
        if not data:
            return
        seq, items = _unpack(data)
        by_name: dict[str, list[bytes]] = {}
        for name, blob in items:
            by_name.setdefault(name, []).append(blob)
        replies: list[tuple[str, bytes]] = []
        for name, blobs in by_name.items():
            node = nodes.get(name)
            answer = None if node is None else _deliver(node, blobs)
            replies += [(name, r) for r in answer or []]
        conn.send_bytes(_pack(seq, replies))


class ProcessPool:
    """Nodes in ``workers`` forked processes; each node lives in exactly one worker, so its
    budget, ledger writer and secure-aggregation keys stay in that process. Build the nodes, hand
    them to the pool, and do not use them from the parent afterwards (the workers hold the live
    copies; ledgers shared between workers are safe, see :class:`~secfedtl.privacy.ledger.Ledger`).

    ``timeout`` (seconds, per exchange) turns a worker that does not answer in time into silent
    clients for that exchange; a worker that died makes its clients silent for good. Needs the
    ``fork`` start method (Linux).
    """

    def __init__(self, nodes: Mapping[str, ClientNode], *, workers: int, timeout: float | None = None) -> None:
        if not nodes:
            raise ConfigError("a pool needs nodes")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ConfigError("workers must be a positive integer")
        if timeout is not None and not timeout > 0:
            raise ConfigError("timeout must be positive")
        if "fork" not in multiprocessing.get_all_start_methods():
            raise ConfigError("ProcessPool needs the 'fork' start method (Linux); use LocalPool")
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            raise ConfigError("CUDA is already initialised in this process and forked workers cannot use it: "
                              "build the worker pool before anything runs on CUDA, or use LocalPool")
        ctx = multiprocessing.get_context("fork")
        names = sorted(nodes)
        workers = min(workers, len(names))
        self._names = names
        self._timeout = timeout
        self._seq = 0
        self._owner: dict[str, int] = {}
        self._conns: list[Any] = []
        self._procs: list[Any] = []
        self._dead: set[int] = set()
        for w in range(workers):
            mine = {n: nodes[n] for n in names[w::workers]}
            self._owner.update(dict.fromkeys(mine, w))
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(child, mine), daemon=True,
                               name=f"secfedtl-worker-{w}")
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)

    @property
    def names(self) -> list[str]:
        return list(self._names)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def exchange(self, requests: Mapping[str, Sequence[bytes]], *, phase: str) -> dict[str, list[bytes]]:
        self._seq += 1
        batches: dict[int, list[tuple[str, bytes]]] = {}
        for name, blobs in requests.items():
            w = self._owner.get(name)
            if w is not None and w not in self._dead:
                batches.setdefault(w, []).extend((name, b) for b in blobs)
        for w, items in batches.items():
            try:
                self._conns[w].send_bytes(_pack(self._seq, items))
            except OSError:
                self._dead.add(w)
        deadline = None if self._timeout is None else time.monotonic() + self._timeout
        out: dict[str, list[bytes]] = {}
        for w in batches:
            if w in self._dead:
                continue
            for name, blob in self._receive(w, deadline):
                out.setdefault(name, []).append(blob)
        return out

    def _receive(self, w: int, deadline: float | None) -> list[tuple[str, bytes]]:
        conn = self._conns[w]
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                if not conn.poll(wait):
                    log.warning("worker %d did not answer in time: its clients are silent this phase", w)
                    return []
                seq, items = _unpack(conn.recv_bytes())
            except (EOFError, OSError, DecodeError):
                log.warning("worker %d is gone: its clients are silent from now on", w)
                self._dead.add(w)
                return []
            if seq == self._seq:
                return items
            # a late answer to an exchange that timed out: drop it and keep waiting

    def close(self) -> None:
        for w, conn in enumerate(self._conns):
            if w not in self._dead:
                try:
                    conn.send_bytes(b"")
                except OSError:
                    pass
            conn.close()
        for proc in self._procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)

    def __enter__(self) -> ProcessPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["ClientPool", "LocalPool", "ProcessPool"]
