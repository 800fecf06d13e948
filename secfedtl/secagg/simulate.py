"""In-process simulation of one secure aggregation: every client, the server, and the wire.

The round is played by the one round driver (:mod:`secfedtl.secagg.driver`) that the runtime
uses too; :class:`LocalExchange` is its in-process transport. Every message goes through the
binary codec (encode, then decode) on its way, exactly as it would over a network, so a
simulation exercises the same code a deployment runs.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from secfedtl.crypto.primitives import SigningKey
from secfedtl.errors import ConfigError, InputError, TooFewSurvivorsError
from secfedtl.secagg import codec
from secfedtl.secagg import messages as m
from secfedtl.secagg.client import ClientSession
from secfedtl.secagg.config import SecAggConfig
from secfedtl.secagg.driver import PHASES, Phase, RoundDriver, timed_call
from secfedtl.secagg.server import AggregateResult, ServerSession
from secfedtl.secagg.session import SessionParams

__all__ = ["LocalExchange", "LocalRound", "SimulationResult", "build_sessions",
           "drive_round", "generate_identities", "session_id_for", "simulate"]

@dataclass(frozen=True, slots=True, kw_only=True)
class SimulationResult:
    """Outcome of :func:`simulate`.

    ``total`` is the dequantised sum of the included clients' (clipped, weighted) inputs;
    ``weight_total`` the sum of their weights; ``error_bound`` the largest possible absolute
    quantisation error of ``total`` in any coordinate; ``refused`` the clients that refused to
    continue (too few live neighbours) and so count as dropouts.
    """

    total: np.ndarray
    included: tuple[int, ...]
    weight_total: int
    field_sum: np.ndarray
    error_bound: float
    refused: tuple[int, ...]
    wire_bytes: int


def session_id_for(seed: int | None) -> bytes:
    """A fresh random session id, or a reproducible one for a given seed (ids are public)."""
    if seed is None:
        return os.urandom(16)
    return hashlib.sha256(b"secfedtl/simulate/" + str(int(seed)).encode()).digest()[:16]


def simulate(inputs: Sequence[np.ndarray], cfg: SecAggConfig, dropouts: Mapping[int, str] | None = None,
             seed: int | None = None, *, weights: Sequence[int] | None = None, context: bytes = b"",
             round: int = 0) -> SimulationResult:
    """Run one secure aggregation of ``inputs`` (one float vector per client) in process.

    ``dropouts`` maps a client index to the phase (one of :data:`PHASES`) from which it is
    silent. ``seed`` makes the stochastic rounding and the session id (hence the SecAgg+ graph)
    reproducible; keys, self-mask seeds and Shamir coefficients always come from the OS CSPRNG.
    Raises :class:`~secfedtl.errors.TooFewSurvivorsError` when too few clients remain at any
    phase; never returns a wrong sum.
    """
    if not isinstance(cfg, SecAggConfig):
        raise ConfigError("cfg must be a SecAggConfig")
    n = cfg.num_clients
    if len(inputs) != n:
        raise InputError(f"expected {n} inputs, got {len(inputs)}")
    arrays = [np.asarray(x) for x in inputs]
    if any(a.ndim != 1 for a in arrays) or len({a.shape for a in arrays}) != 1:
        raise InputError("inputs must be 1-D vectors of equal length")
    weights = [1] * n if weights is None else list(weights)
    if len(weights) != n:
        raise InputError(f"expected {n} weights, got {len(weights)}")
    dropouts = dict(dropouts or {})
    for client, phase in dropouts.items():
        if isinstance(client, bool) or not isinstance(client, int) or not 0 <= client < n:
            raise InputError(f"dropout for unknown client {client!r}")
        if phase not in PHASES:
            raise InputError(f"unknown phase {phase!r}; phases are {PHASES}")
    rng = np.random.default_rng(seed)
    encoded = [cfg.encoding.encode(a, weight=w, rng=rng) for a, w in zip(arrays, weights)]
    params = SessionParams(config=cfg, session_id=session_id_for(seed), round=round,
                           vector_length=arrays[0].size + 1, context=context)
    clients, server = build_sessions(params, encoded)
    outcome = drive_round(clients, server, dropouts=dropouts)
    result = outcome.result
    total, weight_total = cfg.encoding.decode_sum(result.field_sum)
    return SimulationResult(total=total, included=result.included, weight_total=weight_total,
                            field_sum=result.field_sum, error_bound=cfg.encoding.error_bound(len(result.included)),
                            refused=outcome.refused, wire_bytes=outcome.wire_bytes)


def generate_identities(config: SecAggConfig) -> list[SigningKey] | None:
    """Fresh Ed25519 identity keys, one per client, when ``config`` is authenticated."""
    if not config.authenticated:
        return None
    return [SigningKey.generate() for _ in range(config.num_clients)]


def build_sessions(params: SessionParams, field_vectors: Sequence[np.ndarray], *,
                   keys: Sequence[SigningKey] | None = None) -> tuple[list[ClientSession], ServerSession]:
    """One ClientSession per encoded vector and the ServerSession. In authenticated mode the
    clients use ``keys`` (fresh ones from :func:`generate_identities` when not given)."""
    n = params.config.num_clients
    if keys is None:
        keys = generate_identities(params.config)
    identities = None if keys is None else {i: k.public for i, k in enumerate(keys)}
    clients = [ClientSession(params=params, client_id=i, input_vector=field_vectors[i],
                             identity=None if keys is None else keys[i], peer_identities=identities)
               for i in range(n)]
    return clients, ServerSession(params=params, identities=identities)


class LocalExchange:
    """The in-process transport of a round (an ``exchange`` for :class:`~secfedtl.secagg.driver.RoundDriver`).

    Delivers each message to its :class:`ClientSession` through the codec and brings the replies
    back through the codec. ``dropouts`` maps a client to the phase from which it is silent (it
    may be changed between phases); a client that refuses with TooFewSurvivorsError falls
    silent from then on (``refused``). ``sent`` records every reply, in order; ``wire_bytes``
    counts both directions; with a ``clock``, ``timings`` holds the seconds of each client step
    (``client:<phase>``).
    """

    def __init__(self, clients: Sequence[ClientSession], *, dropouts: Mapping[int, str] | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        self.clients = list(clients)
        self.dropouts: dict[int, str] = dict(dropouts or {})
        self.refused: set[int] = set()
        self.sent: list[m.Message] = []
        self.wire_bytes = 0
        self.timings: dict[str, list[float]] = {}
        self._clock = clock

    def speaks(self, client: int, phase: str) -> bool:
        """Whether ``client`` still answers in ``phase`` (silent from its dropout phase on)."""
        if client in self.refused:
            return False
        return client not in self.dropouts or PHASES.index(self.dropouts[client]) > PHASES.index(phase)

    def _wire(self, message: m.Message) -> m.Message:
        blob = codec.encode(message)
        self.wire_bytes += len(blob)
        return codec.decode(blob)

    def _step(self, phase: str, fn: Callable[..., object], *args: object) -> object:
        return timed_call(self._clock, self.timings, f"client:{phase}", fn, *args)

    def __call__(self, phase: Phase, requests: Mapping[int, Sequence[m.Message]]) -> dict[int, list[m.Message]]:
        replies: dict[int, list[m.Message]] = {}
        for u, messages in requests.items():
            if not self.speaks(u, phase.name):
                continue
            client = self.clients[u]
            out: list[m.Message] = []
            try:
                if phase.request is None:
                    out.append(self._step(phase.name, client.start))  # type: ignore[arg-type]
                else:
                    for message in messages:
                        out += self._step(phase.name, client.receive, self._wire(message))  # type: ignore[operator]
            except TooFewSurvivorsError:
                self.refused.add(u)  # the client refuses and falls silent: a dropout
                continue
            replies[u] = [self._wire(reply) for reply in out]
            self.sent += replies[u]
        return replies


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalRound:
    """What :func:`drive_round` returns: the server's result, the clients that refused, the
    bytes that crossed the wire, and (when asked for) seconds spent per ``role:phase``."""

    result: AggregateResult
    refused: tuple[int, ...]
    wire_bytes: int
    timings: dict[str, list[float]]


def drive_round(clients: Sequence[ClientSession], server: ServerSession, *,
                dropouts: Mapping[int, str] | None = None, clock: Callable[[], float] | None = None) -> LocalRound:
    """Play one aggregation between ``clients`` and ``server`` in process with the round driver
    and :class:`LocalExchange`. Raises TooFewSurvivorsError when the round fails. With a ``clock``
    (e.g. ``time.perf_counter``), records the seconds of each client step (``client:<phase>``),
    of the server's message intake (``server:receive:<phase>``) and of closing each phase
    (``server:advance:<phase>``)."""
    exchange = LocalExchange(clients, dropouts=dropouts, clock=clock)
    driver = RoundDriver(server, exchange, clock=clock)
    driver.run()
    outcome = driver.outcome()
    if outcome.error is not None:
        raise outcome.error
    assert outcome.result is not None
    return LocalRound(result=outcome.result, refused=tuple(sorted(exchange.refused)),
                      wire_bytes=exchange.wire_bytes, timings={**exchange.timings, **outcome.timings})
