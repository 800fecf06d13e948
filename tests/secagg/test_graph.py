"""secfedtl.secagg.graph: neighbour sets are symmetric, k-regular, exclude self, depend only on
the session id."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secfedtl.errors import ConfigError
from secfedtl.secagg.config import MAX_CLIENTS, SecAggConfig
from secfedtl.secagg.graph import NeighbourGraph, ring_order
from secfedtl.secagg.session import SessionParams


@st.composite
def graphs(draw):
    n = draw(st.integers(3, 60))
    k = draw(st.integers(1, n - 1))
    if k % 2 == 1 and n % 2 == 1:
        k -= 1
    if k == 0:
        k = 2
    return n, k, draw(st.binary(min_size=16, max_size=16))


@settings(max_examples=100, deadline=None)
@given(graphs())
def test_symmetric_k_regular_without_self(g):
    n, k, seed = g
    nb = tuple(NeighbourGraph(n, k, seed))
    assert len(nb) == n
    for u in range(n):
        assert len(nb[u]) == k
        assert u not in nb[u]
        assert nb[u] <= set(range(n))
        for v in nb[u]:
            assert u in nb[v]


@settings(max_examples=50, deadline=None)
@given(graphs(), st.binary(min_size=16, max_size=16))
def test_depends_only_on_the_session_id(g, other):
    n, k, seed = g
    assert tuple(NeighbourGraph(n, k, seed)) == tuple(NeighbourGraph(n, k, bytes(seed)))
    if other != seed and n >= 6 and k < n - 1:
        # a different session id almost surely gives another ring order
        assert ring_order(n, seed) != ring_order(n, other) or n < 8


def test_complete_graph():
    nb = tuple(NeighbourGraph(5, 4, b"x" * 16))
    assert all(nb[u] == set(range(5)) - {u} for u in range(5))


def test_ring_order_is_a_permutation_and_varies():
    orders = {tuple(ring_order(20, bytes([i]) * 16)) for i in range(20)}
    assert all(sorted(o) == list(range(20)) for o in orders)
    assert len(orders) == 20


def test_sparse_graph_is_connected_after_removing_fewer_than_k():
    n, k = 30, 6
    nb = tuple(NeighbourGraph(n, k, b"s" * 16))
    removed = set(list(range(0, n, 7))[: k - 1])
    alive = set(range(n)) - removed
    start = min(alive)
    seen, stack = {start}, [start]
    while stack:
        u = stack.pop()
        for v in nb[u] & alive:
            if v not in seen:
                seen.add(v)
                stack.append(v)
    assert seen == alive


@pytest.mark.parametrize("n,k", [(5, 0), (5, 5), (5, 3), (4, 7)])
def test_impossible_graphs_raise(n, k):
    with pytest.raises(ConfigError):
        tuple(NeighbourGraph(n, k, bytes(16)))


@settings(max_examples=40, deadline=None)
@given(graphs(), st.data())
def test_the_lazy_graph_answers_like_the_whole_graph_in_any_order(g, data):
    n, k, seed = g
    whole = tuple(NeighbourGraph(n, k, seed))
    lazy = NeighbourGraph(n, k, seed)
    for u in data.draw(st.permutations(range(n))):
        assert lazy[u] == whole[u]
    assert tuple(lazy) == whole and len(lazy) == n and lazy == NeighbourGraph(n, k, seed)
    for bad in (-1, n, True, "0"):
        with pytest.raises(IndexError):
            lazy[bad]  # type: ignore[index]


@pytest.mark.parametrize("neighbours", [None, 34])
def test_describing_the_largest_session_builds_no_graph(neighbours):
    """A session's parameters (what a decoder builds from a Join) hold no n-sized structure until
    a party asks for its own neighbours, and then only that party's."""
    cfg = SecAggConfig(num_clients=MAX_CLIENTS, threshold=MAX_CLIENTS // 2 + 1 if neighbours is None else 20,
                       neighbours=neighbours, bits=64)
    params = SessionParams(config=cfg, session_id=bytes(16), round=0, vector_length=1)
    graph = params.neighbours
    assert graph._cache == {} and graph._order is None  # noqa: SLF001 - nothing built yet
    assert len(graph[7]) == cfg.degree and 7 not in graph[7]
    assert list(graph._cache) == [7]  # noqa: SLF001 - one party's set, not n of them
    with pytest.raises(ConfigError):
        SecAggConfig(num_clients=MAX_CLIENTS + 1, threshold=MAX_CLIENTS // 2 + 1, bits=64)
