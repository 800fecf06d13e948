"""One secure-aggregation round, driven through a phase table: the only round loop there is.

:func:`secfedtl.secagg.simulate`, the test harness (:mod:`secfedtl.testing.harness`) and the
production server (:meth:`secfedtl.federated.federation.Federation.secure_round`, over every
client pool) all run :class:`RoundDriver`; they differ only in the *exchange* function they
hand it, which moves one phase's messages to the parties and brings back their replies. So the
tests exercise the loop that runs in production.

Ground rules (Sans-I/O, like the session state machines):

* The driver never touches a socket, a clock or a thread. ``exchange(phase, requests)`` is
  called once per phase with the server's messages for each party id (for ``"advertise"``, the
  first phase, every party gets an empty list: *open your session*; the simulation calls
  :meth:`~secfedtl.secagg.ClientSession.start`, the runtime sends a ``Join``). It returns each
  answering party's replies; a party it leaves out is silent.
* A party is *silent* from the first phase in which it does not answer, answers with anything
  but exactly one message of the phase's reply type sent under its own id, or answers with a
  message the server refuses (:meth:`~secfedtl.secagg.ServerSession.receive` raises). Nothing
  of a refused answer reaches the server's state. A silent party is a dropout; it is never
  asked again.
* After each phase the driver closes it (:meth:`~secfedtl.secagg.ServerSession.advance`). If
  the server cannot go on (too few parties left, or shares that cannot recover the sum) the
  round *fails*: the outcome says why and carries no result. Nothing any party sends makes
  the driver raise.

Phase table (the server state that collects each phase's replies, the server message that
opens the phase, the reply it expects):

===========  ==============  ================  ====================
phase        server state    request           reply
===========  ==============  ================  ====================
advertise    ADVERTISE       (open session)    AdvertiseKeys
share        SHARE           KeyDirectory      EncryptedShares
mask         MASK            ShareDelivery     MaskedInput
consistency  CONSISTENCY     SurvivorList      ConsistencyResponse
unmask       UNMASK          UnmaskRequest     UnmaskResponse
===========  ==============  ================  ====================
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from secfedtl.errors import LocalProtocolError, SecFedTLError, TooFewSurvivorsError
from secfedtl.secagg import messages as m
from secfedtl.secagg.server import AggregateResult, ServerSession, ServerState


@dataclass(frozen=True, slots=True, kw_only=True)
class Phase:
    """One row of the phase table (see the module docstring)."""

    name: str
    state: ServerState
    request: type | None
    reply: type


PHASE_TABLE: tuple[Phase, ...] = (
    Phase(name="advertise", state=ServerState.ADVERTISE, request=None, reply=m.AdvertiseKeys),
    Phase(name="share", state=ServerState.SHARE, request=m.KeyDirectory, reply=m.EncryptedShares),
    Phase(name="mask", state=ServerState.MASK, request=m.ShareDelivery, reply=m.MaskedInput),
    Phase(name="consistency", state=ServerState.CONSISTENCY, request=m.SurvivorList, reply=m.ConsistencyResponse),
    Phase(name="unmask", state=ServerState.UNMASK, request=m.UnmaskRequest, reply=m.UnmaskResponse),
)
#: Phase names in protocol order. A party silent from ``"consistency"`` or ``"unmask"`` has
#: already sent its masked input, so its input is in the sum.
PHASES: tuple[str, ...] = tuple(p.name for p in PHASE_TABLE)
#: The phase whose reply answers each server message (what a client node needs to know).
REPLY_PHASE: dict[type, str] = {p.request: p.name for p in PHASE_TABLE if p.request is not None}
_BY_STATE = {p.state: p for p in PHASE_TABLE}

#: ``exchange(phase, requests) -> replies``: deliver ``requests[party]`` to each party, return
#: what each answering party sent back (see the module docstring).
Exchange = Callable[[Phase, Mapping[int, Sequence[m.Message]]], Mapping[int, Sequence[m.Message]]]


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundOutcome:
    """How a driven round ended.

    ``result`` is the server's aggregate, or None when the round failed (``reason`` says why,
    ``error`` is the server's exception). ``silent`` maps each party that stopped answering
    (see the module docstring) to the first phase it failed; ``rejected`` maps the parties whose
    answer the server refused, or whose unmask shares were shown wrong, to the reason (each is
    also in ``silent``). ``timings`` holds seconds per ``server:receive:<phase>`` and
    ``server:advance:<phase>`` when the driver was given a clock.
    """

    result: AggregateResult | None
    reason: str
    error: TooFewSurvivorsError | None
    silent: dict[int, str]
    rejected: dict[int, str]
    timings: dict[str, list[float]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.result is not None


def timed_call(clock: Callable[[], float] | None, timings: dict[str, list[float]], key: str,
               fn: Callable[..., object], *args: object) -> object:
    """``fn(*args)``; with a ``clock``, its duration is appended to ``timings[key]``."""
    if clock is None:
        return fn(*args)
    t0 = clock()
    try:
        return fn(*args)
    finally:
        timings.setdefault(key, []).append(clock() - t0)


class RoundDriver:
    """Drives one :class:`~secfedtl.secagg.ServerSession` through every phase with ``exchange``.

    ``run()`` plays to the end (or stops before the phase named ``stop``, leaving that phase's
    server messages in :attr:`pending`, so a caller can play them itself); ``step()`` plays one
    phase; ``requests()`` and ``answer()`` are its two halves, for a caller that moves several
    sessions' phases in one exchange (``exchange`` may then be None). ``clock`` (e.g.
    ``time.perf_counter``) turns on the server timings.
    """

    def __init__(self, server: ServerSession, exchange: Exchange | None, *,
                 clock: Callable[[], float] | None = None) -> None:
        if server.state is not ServerState.ADVERTISE or server.advertised:
            raise LocalProtocolError("a driver starts from a fresh server session")
        self.server = server
        self._exchange = exchange
        self._clock = clock
        n = server.params.config.num_clients
        #: The server's messages for the current phase, by party, not yet delivered.
        self.pending: dict[int, list[m.Message]] = {u: [] for u in range(n)}
        self._phase: Phase | None = PHASE_TABLE[0]
        self._silent: dict[int, str] = {}
        self._rejected: dict[int, str] = {}
        self._timings: dict[str, list[float]] = {}
        self._error: TooFewSurvivorsError | None = None

    @property
    def phase(self) -> Phase | None:
        """The phase whose messages are pending (None once the round has ended)."""
        return self._phase

    @property
    def finished(self) -> bool:
        return self._phase is None

    def _timed(self, key: str, fn: Callable[..., object], *args: object) -> object:
        return timed_call(self._clock, self._timings, key, fn, *args)

    def _refuse(self, party: int, phase: Phase, why: str) -> None:
        self._silent.setdefault(party, phase.name)
        self._rejected.setdefault(party, why)

    def step(self) -> None:
        """Play the current phase: exchange, hand the replies to the server, close the phase."""
        if self._phase is None:
            raise LocalProtocolError("the round has ended")
        if self._exchange is None:
            raise LocalProtocolError("this driver has no exchange: play it with requests() and answer()")
        self.answer(self._exchange(self._phase, self.requests()))

    def requests(self) -> dict[int, tuple[m.Message, ...]]:
        """The current phase's server messages by party (every party still asked; an empty tuple
        in ``advertise``: *open your session*). With :meth:`answer`, a caller can move several
        drivers' phases in one exchange of its own (:meth:`step` is ``answer(exchange(phase,
        requests()))``)."""
        if self._phase is None:
            raise LocalProtocolError("the round has ended")
        return {u: tuple(self.pending[u]) for u in sorted(self.pending)}

    def answer(self, replies: Mapping[int, Sequence[m.Message]]) -> None:
        """Close the current phase with the parties' ``replies`` (the rules of the module
        docstring: a party left out, or one whose answer is not one message of the phase's reply
        type under its own id or is refused by the server, is silent from this phase)."""
        phase = self._phase
        if phase is None:
            raise LocalProtocolError("the round has ended")
        asked = sorted(self.pending)
        for party in asked:
            answer = list(replies.get(party, ()))
            if not answer:
                self._silent.setdefault(party, phase.name)
                continue
            if len(answer) != 1 or type(answer[0]) is not phase.reply or answer[0].sender != party:
                self._refuse(party, phase, f"did not answer with one {phase.reply.__name__} of its own")
                continue
            try:
                self._timed(f"server:receive:{phase.name}", self.server.receive, answer[0])
            except SecFedTLError as exc:  # refused and unchanged: this party is a dropout
                self._refuse(party, phase, f"{type(exc).__name__}: {exc}")
        try:
            out = self._timed(f"server:advance:{phase.name}", self.server.advance)
        except TooFewSurvivorsError as exc:
            self._error = exc
            self._phase = None
            self.pending = {}
            return
        assert isinstance(out, list)
        self.pending = {}
        for message in out:
            self.pending.setdefault(message.recipient, []).append(message)
        self._phase = _BY_STATE.get(self.server.state)
        if self._phase is None:  # DONE: responders whose shares were wrong are dropouts too
            for party in self.server.result().rejected:
                self._refuse(party, PHASE_TABLE[-1], "sent unmask shares shown to be wrong")

    def run(self, stop: str | None = None) -> None:
        """Play phases until the round ends, or until the phase named ``stop`` is next."""
        if stop is not None and stop not in PHASES:
            raise LocalProtocolError(f"unknown phase {stop!r}; phases are {PHASES}")
        while self._phase is not None and self._phase.name != stop:
            self.step()

    def outcome(self) -> RoundOutcome:
        if self._phase is not None:
            raise LocalProtocolError("the round has not ended")
        result = self.server.result() if self._error is None else None
        reason = "" if self._error is None else f"secure aggregation aborted: {self._error}"
        return RoundOutcome(result=result, reason=reason, error=self._error, silent=dict(self._silent),
                            rejected=dict(self._rejected), timings={k: list(v) for k, v in self._timings.items()})


def drive(server: ServerSession, exchange: Exchange, *, clock: Callable[[], float] | None = None) -> RoundOutcome:
    """Play a whole round (see :class:`RoundDriver`)."""
    driver = RoundDriver(server, exchange, clock=clock)
    driver.run()
    return driver.outcome()


__all__ = ["PHASES", "PHASE_TABLE", "REPLY_PHASE", "Exchange", "Phase", "RoundDriver", "RoundOutcome", "drive"]
