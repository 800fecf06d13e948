"""What the server loop needs from a transport: a :class:`ClientPool`.

A pool has one method that matters, :meth:`ClientPool.exchange`: deliver each client its
messages (bytes of :mod:`secfedtl.federated.wire`) and return the replies of those that
answered. A client absent from the result was silent: crashed, timed out, unreachable or
refusing. The server loop (:class:`~secfedtl.federated.federation.Federation`) treats every such
client as a dropout, whatever the pool. The pools themselves (in process, forked workers, a node
agent, Flower) are transports and live in :mod:`secfedtl.runtime`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

from secfedtl.errors import SecFedTLError
from secfedtl.federated.node import ClientNode

log = logging.getLogger(__name__)

__all__ = ["ClientPool", "deliver"]


@runtime_checkable
class ClientPool(Protocol):
    """What a server needs from a transport (see the module docstring)."""

    @property
    def names(self) -> Sequence[str]: ...

    def exchange(self, requests: Mapping[str, Sequence[bytes]], *, phase: str) -> dict[str, list[bytes]]: ...

    def close(self) -> None: ...


def deliver(node: ClientNode, blobs: Sequence[bytes]) -> list[bytes] | None:
    """A node's replies to its messages; None when it fell silent (it broke off with an error)."""
    replies: list[bytes] = []
    for blob in blobs:
        try:
            replies.extend(node.handle(blob))
        except SecFedTLError as exc:  # the node refuses the message: to the server it is silent
            log.info("node %s refused a message: %s", node.name, type(exc).__name__)
            return None
    return replies
