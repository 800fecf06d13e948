"""In-process simulation of one secure aggregation: every client, the server, and the wire.

Every message goes through the binary codec (encode, then decode) on its way, exactly as it
would over a network, so a simulation exercises the same code a deployment runs.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from secfedtl.crypto.primitives import SigningKey
from secfedtl.errors import ConfigError, InputError, TooFewSurvivorsError
from secfedtl.secagg import codec
from secfedtl.secagg import messages as m
from secfedtl.secagg.client import ClientSession
from secfedtl.secagg.config import SecAggConfig
from secfedtl.secagg.server import AggregateResult, ServerSession
from secfedtl.secagg.session import SessionParams

#: Phases a client can fall silent from, in protocol order. A client silent from ``"unmask"``
#: (or ``"consistency"``) has already sent its masked input, so its input is included.
PHASES = ("advertise", "share", "mask", "consistency", "unmask")
#: Which phase a client's reply to each server message belongs to.
REPLY_PHASE = {
    m.KeyDirectory: "share",
    m.ShareDelivery: "mask",
    m.SurvivorList: "consistency",
    m.UnmaskRequest: "unmask",
}


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


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundOutcome:
    """What :func:`drive_round` returns: the server's result, the clients that refused, the
    bytes that crossed the wire, and (when asked for) seconds spent per ``role:phase``."""

    result: AggregateResult
    refused: tuple[int, ...]
    wire_bytes: int
    timings: dict[str, list[float]]


def drive_round(clients: Sequence[ClientSession], server: ServerSession, *,
                dropouts: Mapping[int, str] | None = None, timed: bool = False) -> RoundOutcome:
    """Move every message of one aggregation between ``clients`` and ``server`` in process,
    through the codec. A client that refuses with TooFewSurvivorsError falls silent (a dropout).
    With ``timed``, records the seconds of each client step (``client:<phase>``), of the
    server's message intake (``server:receive:<phase>``) and of closing each phase
    (``server:advance:<phase>``)."""
    silent_from = {i: PHASES.index(p) for i, p in (dropouts or {}).items()}
    refused: set[int] = set()
    timings: dict[str, list[float]] = {}
    wire = 0

    def clock(key: str, fn, *args):  # type: ignore[no-untyped-def]
        if not timed:
            return fn(*args)
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            timings.setdefault(key, []).append(time.perf_counter() - t0)

    def send(message: m.Message) -> m.Message:
        nonlocal wire
        blob = codec.encode(message)
        wire += len(blob)
        return codec.decode(blob)

    def speaks(client: int, phase: str) -> bool:
        return client not in refused and silent_from.get(client, len(PHASES)) > PHASES.index(phase)

    for i, client in enumerate(clients):
        if speaks(i, "advertise"):
            advert = clock("client:advertise", client.start)
            clock("server:receive:advertise", server.receive, send(advert))
    phase = "advertise"
    outgoing = clock(f"server:advance:{phase}", server.advance)
    while outgoing:
        phase = REPLY_PHASE[type(outgoing[0])]
        for message in outgoing:
            u = message.recipient
            if not speaks(u, phase):
                continue
            try:
                replies = clock(f"client:{phase}", clients[u].receive, send(message))
            except TooFewSurvivorsError:
                refused.add(u)  # the client refuses and falls silent: a dropout
                continue
            for reply in replies:
                clock(f"server:receive:{phase}", server.receive, send(reply))
        outgoing = clock(f"server:advance:{phase}", server.advance)
    return RoundOutcome(result=server.result(), refused=tuple(sorted(refused)), wire_bytes=wire,
                        timings=timings)
