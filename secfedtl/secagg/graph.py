"""Neighbour graphs: the complete graph (Bonawitz et al. 2017) or a random k-regular
Harary graph (Bell et al. 2020, SecAgg+).

The Harary graph H(k, n) places the clients on a ring in a random order and joins each to its
``k // 2`` nearest ring neighbours on each side (plus the opposite client when ``k`` is odd). Its
vertex connectivity is ``k``, so removing fewer than ``k`` clients never splits it. The ring order
is derived from public randomness (the session id) with SHA-256, so every client computes the same
graph without trusting the server to tell it its neighbours. Labels are public, not secret.
"""

from __future__ import annotations

import hashlib

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


def neighbour_sets(num_clients: int, degree: int, seed: bytes) -> tuple[frozenset[int], ...]:
    """Neighbours of every client (never itself) in H(degree, num_clients) with random labels.

    ``degree == num_clients - 1`` gives the complete graph.
    """
    if not 1 <= degree <= num_clients - 1:
        raise ConfigError(f"degree {degree} impossible with {num_clients} clients")
    if degree % 2 == 1 and num_clients % 2 == 1:
        raise ConfigError("an odd degree needs an even number of clients (no k-regular graph)")
    if degree == num_clients - 1:
        everyone = frozenset(range(num_clients))
        return tuple(everyone - {u} for u in range(num_clients))
    order = ring_order(num_clients, seed)
    half = degree // 2
    result = []
    position = {client: i for i, client in enumerate(order)}
    for u in range(num_clients):
        i = position[u]
        near = {order[(i + d) % num_clients] for d in range(1, half + 1)}
        near |= {order[(i - d) % num_clients] for d in range(1, half + 1)}
        if degree % 2 == 1:
            near.add(order[(i + num_clients // 2) % num_clients])
        result.append(frozenset(near))
    return tuple(result)
