"""Drive one ServerSession and its ClientSessions directly, with your own field vectors.

:func:`make_round` builds the parties; :func:`run_round` plays an honest round with dropouts
(like :func:`secfedtl.secagg.simulate`, but on already-encoded field vectors, so a test knows
the exact modular sum to expect); :func:`expected_field_sum` computes that sum independently.
:func:`run_until` stops a round at a phase so an adversarial test can play the server itself.

Rounds are played by the same round driver (:class:`secfedtl.secagg.driver.RoundDriver`) that
the production server runs, over the in-process transport
(:class:`secfedtl.secagg.simulate.LocalExchange`), so a test drives the production loop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from secfedtl.crypto.primitives import SigningKey
from secfedtl.secagg import messages as m
from secfedtl.secagg.client import ClientSession
from secfedtl.secagg.config import SecAggConfig
from secfedtl.secagg.driver import RoundDriver
from secfedtl.secagg.server import AggregateResult, ServerSession
from secfedtl.secagg.session import SessionParams
from secfedtl.secagg.simulate import LocalExchange, build_sessions, generate_identities

__all__ = ["Round", "expected_field_sum", "make_round", "random_field_vectors", "run_round", "run_until"]



@dataclass
class Round:
    params: SessionParams
    server: ServerSession
    clients: list[ClientSession]
    vectors: list[np.ndarray]
    keys: list[SigningKey | None]
    identities: dict[int, bytes] | None
    exchange: LocalExchange
    driver: RoundDriver
    pending: list[m.Message] = field(default_factory=list)  # server -> client messages not yet delivered

    @property
    def refused(self) -> set[int]:
        """Clients that refused to go on (TooFewSurvivorsError) and fell silent."""
        return self.exchange.refused

    @property
    def sent(self) -> list[m.Message]:
        """Every client -> server message, in order."""
        return self.exchange.sent


def random_field_vectors(params: SessionParams, rng: np.random.Generator) -> list[np.ndarray]:
    """One uniformly random vector of Z_2^bits per client."""
    bits = params.config.bits
    return [rng.integers(0, 1 << bits, params.vector_length, dtype=np.uint64, endpoint=False).astype(params.dtype)
            if bits < 64 else rng.integers(0, 2**64 - 1, params.vector_length, dtype=np.uint64, endpoint=True)
            for _ in range(params.config.num_clients)]


def make_round(cfg: SecAggConfig, *, vector_length: int = 4, session_id: bytes = b"\x01" * 16, round: int = 0,
               vectors: Sequence[np.ndarray] | None = None, seed: int = 0, context: bytes = b"") -> Round:
    params = SessionParams(config=cfg, session_id=session_id, round=round, vector_length=vector_length,
                           context=context)
    vecs = list(vectors) if vectors is not None else random_field_vectors(params, np.random.default_rng(seed))
    signing = generate_identities(cfg)
    clients, server = build_sessions(params, vecs, keys=signing)
    keys: list[SigningKey | None] = list(signing) if signing is not None else [None] * cfg.num_clients
    identities = None if signing is None else {i: k.public for i, k in enumerate(signing)}
    exchange = LocalExchange(clients)
    return Round(params=params, server=server, clients=clients, vectors=vecs, keys=keys, identities=identities,
                 exchange=exchange, driver=RoundDriver(server, exchange))


def run_until(rnd: Round, stop: str | None = None, dropouts: Mapping[int, str] | None = None) -> None:
    """Play the honest round with the round driver; stop before the server's messages for phase
    ``stop`` are delivered (they are left in ``rnd.pending``). ``stop=None`` plays to the end.
    Raises the server's TooFewSurvivorsError when the round fails."""
    rnd.exchange.dropouts = dict(dropouts or {})
    rnd.driver.run(stop)
    rnd.pending = [msg for u in sorted(rnd.driver.pending) for msg in rnd.driver.pending[u]]
    if rnd.driver.finished:
        outcome = rnd.driver.outcome()
        if outcome.error is not None:
            raise outcome.error


def run_round(rnd: Round, dropouts: Mapping[int, str] | None = None) -> AggregateResult:
    """Play the whole honest round; returns the server's result (or raises TooFewSurvivorsError)."""
    run_until(rnd, None, dropouts)
    return rnd.server.result()


def expected_field_sum(vectors: Sequence[np.ndarray], included: Sequence[int], bits: int) -> np.ndarray:
    """Sum of ``vectors[i]`` for ``i`` in ``included`` modulo ``2**bits``, with Python integers."""
    length = len(vectors[0])
    total = [0] * length
    for i in included:
        for j, v in enumerate(vectors[i].tolist()):
            total[j] += int(v)
    return np.array([t % (1 << bits) for t in total], dtype=np.uint64)
