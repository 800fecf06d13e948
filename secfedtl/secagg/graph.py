"""Neighbour graphs: the complete graph (Bonawitz et al. 2017) or a random k-regular
Harary graph (Bell et al. 2020, SecAgg+).

The Harary graph H(k, n) places the clients on a ring in a random order and joins each to its
``k // 2`` nearest ring neighbours on each side (plus the opposite client when ``k`` is odd). Its
vertex connectivity is ``k``, so removing fewer than ``k`` clients never splits it. The ring order
is derived from public randomness (the session id) with SHA-256, so every client computes the same
graph without trusting the server to tell it its neighbours. Labels are public, not secret.

:class:`NeighbourGraph` builds a client's neighbour set only when it is asked for (and the ring
order only on the first question), so describing a session costs nothing in its size: a decoder
that reads a session's parameters from the wire never builds an ``n``-client graph.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

from secfedtl.errors import ConfigError


def _uniform_below(n: int, seed: bytes, counter: list[int]) -> int:
    """Unbiased integer in [0, n) from SHA-256(seed || counter) with rejection."""
    bound = (1 << 64) - ((1 << 64) % n)
    while True:
        block = hashlib.sha256(seed + counter[0].to_bytes(8, "big")).digest()
        counter[0] += 1
        value = int.from_bytes(block[:8], "big")
        if value < bound:
            return value % n


def ring_order(num_clients: int, seed: bytes) -> list[int]:
    """A permutation of ``range(num_clients)`` determined by ``seed`` (Fisher-Yates)."""
    order = list(range(num_clients))
    counter = [0]
    for i in range(num_clients - 1, 0, -1):
        j = _uniform_below(i + 1, b"secfedtl/v1/graph" + seed, counter)
        order[i], order[j] = order[j], order[i]
    return order


class NeighbourGraph(Sequence[frozenset[int]]):
    """Neighbours of every client (never itself) in H(degree, num_clients) with random labels,
    computed on demand: ``graph[u]`` is client ``u``'s neighbour set (cached once built).

    ``degree == num_clients - 1`` gives the complete graph. Building the object checks the
    parameters and allocates nothing that grows with ``num_clients``.
    """

    __slots__ = ("_cache", "_order", "_position", "degree", "num_clients", "seed")

    def __init__(self, num_clients: int, degree: int, seed: bytes) -> None:
        if not 1 <= degree <= num_clients - 1:
            raise ConfigError(f"degree {degree} impossible with {num_clients} clients")
        if degree % 2 == 1 and num_clients % 2 == 1:
            raise ConfigError("an odd degree needs an even number of clients (no k-regular graph)")
        self.num_clients, self.degree, self.seed = num_clients, degree, bytes(seed)
        self._order: list[int] | None = None
        self._position: dict[int, int] | None = None
        self._cache: dict[int, frozenset[int]] = {}

    def __len__(self) -> int:
        return self.num_clients

    def __iter__(self) -> Iterator[frozenset[int]]:
        return (self[u] for u in range(self.num_clients))

    def __getitem__(self, u):  # type: ignore[no-untyped-def, override]
        if isinstance(u, slice):
            return tuple(self[i] for i in range(*u.indices(self.num_clients)))
        if isinstance(u, bool) or not isinstance(u, int) or not 0 <= u < self.num_clients:
            raise IndexError(f"no client {u!r} in a graph of {self.num_clients}")
        near = self._cache.get(u)
        if near is None:
            near = self._cache[u] = self._build(u)
        return near

    def __eq__(self, other: object) -> bool:
        if isinstance(other, NeighbourGraph):
            return (self.num_clients, self.degree, self.seed) == (other.num_clients, other.degree, other.seed)
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.num_clients, self.degree, self.seed))

    def __repr__(self) -> str:
        return f"NeighbourGraph(num_clients={self.num_clients}, degree={self.degree})"

    def _build(self, u: int) -> frozenset[int]:
        n, degree = self.num_clients, self.degree
        if degree == n - 1:
            return frozenset(range(n)) - {u}
        if self._order is None:
            self._order = ring_order(n, self.seed)
            self._position = {client: i for i, client in enumerate(self._order)}
        order, position = self._order, self._position
        assert position is not None
        i = position[u]
        half = degree // 2
        near = {order[(i + d) % n] for d in range(1, half + 1)}
        near |= {order[(i - d) % n] for d in range(1, half + 1)}
        if degree % 2 == 1:
            near.add(order[(i + n // 2) % n])
        return frozenset(near)
