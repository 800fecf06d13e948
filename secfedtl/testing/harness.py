"""Drive one ServerSession and its ClientSessions directly, with your own field vectors.

:func:`make_round` builds the parties; :func:`run_round` plays an honest round with dropouts
(like :func:`secfedtl.secagg.simulate`, but on already-encoded field vectors, so a test knows
the exact modular sum to expect); :func:`expected_field_sum` computes that sum independently.
:func:`run_until` stops a round at a phase so an adversarial test can play the server itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from secfedtl.crypto.primitives import SigningKey
from secfedtl.errors import TooFewSurvivorsError
from secfedtl.secagg import messages as m
from secfedtl.secagg.client import ClientSession
from secfedtl.secagg.config import SecAggConfig
from secfedtl.secagg.server import AggregateResult, ServerSession
from secfedtl.secagg.session import SessionParams
from secfedtl.secagg.simulate import PHASES, REPLY_PHASE, build_sessions, generate_identities

__all__ = ["Round", "expected_field_sum", "make_round", "random_field_vectors", "run_round", "run_until"]



@dataclass
class Round:
    params: SessionParams
    server: ServerSession
    clients: list[ClientSession]
    vectors: list[np.ndarray]
    keys: list[SigningKey | None]
    identities: dict[int, bytes] | None
    refused: set[int] = field(default_factory=set)
    pending: list[m.Message] = field(default_factory=list)  # server -> client messages not yet delivered
    sent: list[m.Message] = field(default_factory=list)  # every client -> server message, in order


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
    return Round(params=params, server=server, clients=clients, vectors=vecs, keys=keys, identities=identities)


def _speaks(rnd: Round, dropouts: Mapping[int, str], client: int, phase: str) -> bool:
    """Whether ``client`` still answers in ``phase`` (silent from its dropout phase on)."""
    if client in rnd.refused:
        return False
    return client not in dropouts or PHASES.index(dropouts[client]) > PHASES.index(phase)


def run_until(rnd: Round, stop: str | None = None, dropouts: Mapping[int, str] | None = None) -> None:
    """Play the honest round; stop before the server's messages for phase ``stop`` are
    delivered (they are left in ``rnd.pending``). ``stop=None`` plays to the end."""
    drops = dict(dropouts or {})
    server = rnd.server
    if not rnd.pending and server.state.value == "advertise" and not server.advertised:
        for i, c in enumerate(rnd.clients):
            if _speaks(rnd, drops, i, "advertise"):
                advert = c.start()
                rnd.sent.append(advert)
                server.receive(advert)
        rnd.pending = server.advance()
    while rnd.pending:
        phase = REPLY_PHASE[type(rnd.pending[0])]
        if phase == stop:
            return
        for msg in rnd.pending:
            u = msg.recipient
            if not _speaks(rnd, drops, u, phase):
                continue
            try:
                replies = rnd.clients[u].receive(msg)
            except TooFewSurvivorsError:
                rnd.refused.add(u)
                continue
            for reply in replies:
                rnd.sent.append(reply)
                server.receive(reply)
        rnd.pending = server.advance()


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
