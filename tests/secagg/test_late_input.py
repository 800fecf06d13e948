"""A session whose input comes after its set-up (pre-keyed steps, docs/protocol.md).

``ClientSession(input_vector=None)`` advertises and shares as usual; ``provide_input`` gives the
input, once, before the ``ShareDelivery``; its ``context`` binds the pairwise masks. Played by the
one round driver (:func:`secfedtl.secagg.simulate.drive_round`): inputs given late, under one
context, sum exactly as inputs given at the start, dropouts included; a client given its input
under another context leaves its masks uncancelled (the server gets no usable sum); the misuses
raise and abort.
"""

from __future__ import annotations

import numpy as np
import pytest

from secfedtl.errors import ConfigError, LocalProtocolError
from secfedtl.secagg.client import ClientState
from secfedtl.secagg.config import SecAggConfig
from secfedtl.secagg.driver import RoundDriver
from secfedtl.secagg.simulate import LocalExchange, build_sessions, drive_round, session_id_for
from secfedtl.secagg.session import SessionParams

N, LENGTH = 5, 40


def _params(seed: int = 0) -> SessionParams:
    cfg = SecAggConfig(num_clients=N, threshold=3, bits=32, authenticated=True)
    return SessionParams(config=cfg, session_id=session_id_for(seed), round=7, vector_length=LENGTH, context=b"step")


def _vectors(seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 2**32, LENGTH, dtype=np.uint64).astype(np.uint32) for _ in range(N)]


def _late(params: SessionParams, vectors: list[np.ndarray], contexts: list[bytes], server_context: bytes,
          dropouts: dict[int, str] | None = None) -> np.ndarray:
    clients, server = build_sessions(params, [None] * N)  # type: ignore[list-item]
    exchange = LocalExchange(clients, dropouts=dropouts)
    driver = RoundDriver(server, exchange)
    driver.run(stop="mask")  # keys and shares, no input yet
    assert all(not c.has_input for c in clients)
    for client, vector, context in zip(clients, vectors, contexts):
        client.provide_input(vector, context=context)
    server.bind_input_context(server_context)
    driver.run()
    outcome = driver.outcome()
    assert outcome.result is not None, outcome.reason
    return outcome.result.field_sum


@pytest.mark.parametrize("dropouts", [None, {1: "mask"}, {2: "unmask"}])
def test_late_inputs_under_one_context_sum_exactly(dropouts) -> None:
    vectors = _vectors()
    total = _late(_params(), vectors, [b"d" * 32] * N, b"d" * 32, dropouts)
    kept = [v for i, v in enumerate(vectors) if not (dropouts and dropouts.get(i) == "mask")]
    assert np.array_equal(total, np.sum(np.array(kept, dtype=np.uint64), axis=0).astype(np.uint32))
    # and the same as the inputs given at the start, without an input context
    clients, server = build_sessions(_params(), vectors if not dropouts else vectors)
    early = drive_round(clients, server, dropouts=dropouts).result.field_sum
    assert np.array_equal(total, early)


@pytest.mark.parametrize("dropouts", [None, {1: "mask"}])
def test_a_client_given_its_input_under_another_context_leaves_the_sum_masked(dropouts) -> None:
    vectors = _vectors()
    contexts = [b"d" * 32] * N
    contexts[0] = b"e" * 32  # the server showed client 0 another request
    total = _late(_params(), vectors, contexts, b"d" * 32, dropouts)
    kept = [v for i, v in enumerate(vectors) if not (dropouts and dropouts.get(i) == "mask")]
    true = np.sum(np.array(kept, dtype=np.uint64), axis=0).astype(np.uint32)
    assert np.count_nonzero(total != true) >= LENGTH - 2  # uncancelled masks on (almost) every word
    # a server that believes client 0's context instead fails the same way
    assert np.count_nonzero(_late(_params(), vectors, contexts, b"e" * 32, dropouts) != true) >= LENGTH - 2


def test_the_input_is_given_once_before_its_masked_input_and_under_a_short_context() -> None:
    clients, server = build_sessions(_params(), [None] * N)  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="at most 64 bytes"):
        clients[0].provide_input(_vectors()[0], context=b"x" * 65)
    assert not clients[0].has_input and clients[0].state is ClientState.INIT  # unchanged
    clients[0].provide_input(_vectors()[0])
    with pytest.raises(LocalProtocolError, match="once"):
        clients[0].provide_input(_vectors()[0])
    assert clients[0].state is ClientState.ABORTED
    server.bind_input_context(b"d")
    with pytest.raises(LocalProtocolError, match="set once"):
        server.bind_input_context(b"e")


def test_a_share_delivery_without_an_input_aborts_and_sends_nothing() -> None:
    clients, server = build_sessions(_params(), [None] * N)  # type: ignore[list-item]
    exchange = LocalExchange(clients)
    driver = RoundDriver(server, exchange)
    driver.run(stop="mask")
    (delivery,) = driver.requests()[0]
    with pytest.raises(LocalProtocolError, match="no input"):
        clients[0].receive(delivery)
    assert clients[0].state is ClientState.ABORTED
