"""The server side of secure aggregation, as a Sans-I/O state machine.

Ground rules:

* ``receive(message)`` records one client message for the current phase. A message that is
  illegal (wrong phase, wrong session, unknown or repeated sender, malformed content, bad
  signature) raises a :mod:`secfedtl.errors` exception and changes nothing: one misbehaving
  client cannot abort everyone's round, it simply counts as a dropout if it never sends a
  valid message.
* ``advance()`` closes the current phase (the runtime calls it when every expected message
  arrived or a deadline passed) and returns the messages for the next one. If fewer clients
  than the config allows remain, or the shares the clients returned cannot recover the sum,
  it raises :class:`~secfedtl.errors.TooFewSurvivorsError` (and nothing else for anything a
  client sent) and the session is ``ABORTED``: the server never returns a sum over too few
  clients, and never one it could not check.
* Unmasking treats shares as coming from parties that may lie (:func:`secfedtl.crypto.shamir.recover`):
  a client whose share disagrees with what the other shares of the same secret define is
  *rejected* (``AggregateResult.rejected``), all its shares are set aside, and every secret is
  recovered again without them; its masked input, already in the sum, stays included. A
  secret that cannot be recovered that way, or a dropped client's mask key that does not match
  its advertised public key, aborts the round.
* The server only ever holds the running sum of masked inputs; it never stores an individual
  masked vector, and an individual masked vector is uniformly random anyway.

Phases: ADVERTISE -> SHARE -> MASK -> CONSISTENCY -> UNMASK -> DONE.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from secfedtl.crypto import primitives as cp
from secfedtl.crypto import shamir
from secfedtl.crypto.prg import add_masks
from secfedtl.errors import (
    ConfigError,
    CryptoError,
    EncodingError,
    LocalProtocolError,
    ReconstructionError,
    RemoteProtocolError,
    ReplayError,
    TooFewSurvivorsError,
    WrongSessionError,
)
from secfedtl.secagg import messages as m
from secfedtl.secagg.session import PURPOSE_MASK, SessionParams, sign_of, verify_identity


class ServerState(enum.Enum):
    ADVERTISE = "advertise"
    SHARE = "share"
    MASK = "mask"
    CONSISTENCY = "consistency"
    UNMASK = "unmask"
    DONE = "done"
    ABORTED = "aborted"


_LEGAL: dict[ServerState, type] = {
    ServerState.ADVERTISE: m.AdvertiseKeys,
    ServerState.SHARE: m.EncryptedShares,
    ServerState.MASK: m.MaskedInput,
    ServerState.CONSISTENCY: m.ConsistencyResponse,
    ServerState.UNMASK: m.UnmaskResponse,
}
_NEXT = {
    ServerState.ADVERTISE: ServerState.SHARE,
    ServerState.SHARE: ServerState.MASK,
    ServerState.MASK: ServerState.CONSISTENCY,
    ServerState.CONSISTENCY: ServerState.UNMASK,
    ServerState.UNMASK: ServerState.DONE,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class AggregateResult:
    """What the server learns: the sum, over ``included`` clients, of their field vectors."""

    field_sum: np.ndarray
    included: tuple[int, ...]
    dropped: tuple[int, ...]
    rejected: tuple[int, ...] = ()  # answered the unmask request with shares shown to be wrong


class ServerSession:
    """The server's part in one aggregation (see the module docstring)."""

    def __init__(self, *, params: SessionParams, identities: Mapping[int, bytes] | None = None) -> None:
        if params.config.authenticated and identities is None:
            raise ConfigError("authenticated mode needs every client's identity public key")
        self.params = params
        self._identities = dict(identities or {})
        self.state = ServerState.ADVERTISE
        self._adverts: dict[int, m.AdvertiseKeys] = {}
        self._boxes: dict[int, dict[int, bytes]] = {}      # sender -> recipient -> box
        self._sum = np.zeros(params.vector_length, dtype=params.dtype)
        self._masked: set[int] = set()                     # U3 so far
        self._signatures: dict[int, bytes] = {}            # U4
        self._requests: dict[int, m.UnmaskRequest] = {}
        self._responses: dict[int, m.UnmaskResponse] = {}  # U5
        self._result: AggregateResult | None = None
        self._input_context = b""

    def bind_input_context(self, context: bytes) -> None:
        """The context under which the clients were given their inputs
        (:meth:`~secfedtl.secagg.ClientSession.provide_input`): the server removes dropped
        clients' pairwise masks under it. Set once, before the result; anything else raises
        :class:`LocalProtocolError` and changes nothing."""
        if self._input_context or self._result is not None or self.state in (ServerState.DONE, ServerState.ABORTED):
            raise LocalProtocolError("the input context is set once, before the sum is unmasked")
        self.params.mask_binding(context)  # checks it
        self._input_context = context

    def __repr__(self) -> str:
        return f"ServerSession(state={self.state.value}, clients={self.params.config.num_clients})"

    # -- membership of each phase -------------------------------------------------------------

    @property
    def advertised(self) -> tuple[int, ...]:
        return tuple(sorted(self._adverts))

    @property
    def shared(self) -> tuple[int, ...]:
        return tuple(sorted(self._boxes))

    @property
    def survivors(self) -> tuple[int, ...]:
        return tuple(sorted(self._masked))

    def expected_senders(self) -> tuple[int, ...]:
        """Clients from which a message is still expected in the current phase."""
        n = self.params.config.num_clients
        pending = {
            ServerState.ADVERTISE: set(range(n)) - set(self._adverts),
            ServerState.SHARE: set(self._adverts) - set(self._boxes),
            ServerState.MASK: set(self._boxes) - self._masked,
            ServerState.CONSISTENCY: self._masked - set(self._signatures),
            ServerState.UNMASK: set(self._requests) - set(self._responses),
        }.get(self.state, set())
        return tuple(sorted(pending))

    # -- receive ------------------------------------------------------------------------------

    def receive(self, message: m.Message) -> None:
        """Record one client message for the current phase (see the module docstring)."""
        if self.state in (ServerState.DONE, ServerState.ABORTED):
            raise LocalProtocolError(f"no message is accepted in state {self.state.value}")
        expected = _LEGAL[self.state]
        if type(message) is not expected:
            raise ReplayError(f"{type(message).__name__} is not accepted in phase {self.state.value}")
        p = self.params
        if message.session_id != p.session_id or message.round != p.round:
            raise WrongSessionError("message belongs to another session or round")
        sender = message.sender
        if sender not in self.expected_senders():
            if 0 <= sender < p.config.num_clients and self._already(sender):
                raise ReplayError(f"second {type(message).__name__} from client {sender}")
            raise RemoteProtocolError(f"client {sender} is not expected in phase {self.state.value}")
        {
            m.AdvertiseKeys: self._on_advert,
            m.EncryptedShares: self._on_shares,
            m.MaskedInput: self._on_masked,
            m.ConsistencyResponse: self._on_consistency,
            m.UnmaskResponse: self._on_unmask,
        }[expected](message)

    def _already(self, sender: int) -> bool:
        return sender in {
            ServerState.ADVERTISE: self._adverts,
            ServerState.SHARE: self._boxes,
            ServerState.MASK: self._masked,
            ServerState.CONSISTENCY: self._signatures,
            ServerState.UNMASK: self._responses,
        }[self.state]

    def _on_advert(self, msg: m.AdvertiseKeys) -> None:
        keys = {msg.enc_public_key, msg.mask_public_key}
        if len(keys) != 2 or any(keys & {a.enc_public_key, a.mask_public_key} for a in self._adverts.values()):
            raise RemoteProtocolError(f"client {msg.sender} advertised reused keys")
        for key in keys:
            try:
                cp.check_x25519_public(key)
            except CryptoError as exc:  # a low-order key would make every neighbour's agreement fail
                raise RemoteProtocolError(f"client {msg.sender} advertised an unusable public key") from exc
        if self.params.config.authenticated:
            self._verify(msg.sender, msg.signature, self.params.advert_transcript(
                msg.sender, msg.enc_public_key, msg.mask_public_key))
        self._adverts[msg.sender] = msg

    def _on_shares(self, msg: m.EncryptedShares) -> None:
        want = self.params.neighbours[msg.sender] & set(self._adverts)
        got = {r for r, _ in msg.ciphertexts}
        if got != want:
            raise RemoteProtocolError(f"client {msg.sender} must send one box to each live neighbour")
        self._boxes[msg.sender] = dict(msg.ciphertexts)

    def _on_masked(self, msg: m.MaskedInput) -> None:
        try:
            vector = self.params.vector_from_bytes(msg.vector)
        except EncodingError as exc:
            raise RemoteProtocolError(f"malformed masked input from client {msg.sender}: {exc}") from exc
        np.add(self._sum, vector, out=self._sum)
        self._masked.add(msg.sender)

    def _on_consistency(self, msg: m.ConsistencyResponse) -> None:
        if self.params.config.authenticated:
            self._verify(msg.sender, msg.signature,
                         self.params.consistency_transcript(msg.sender, self.survivors))
        self._signatures[msg.sender] = msg.signature

    def _on_unmask(self, msg: m.UnmaskResponse) -> None:
        request = self._requests[msg.sender]
        if tuple(o for o, _ in msg.self_mask_shares) != request.survivors or \
                tuple(o for o, _ in msg.mask_key_shares) != request.dropped:
            raise RemoteProtocolError(f"client {msg.sender} answered with other shares than requested")
        for _, share in msg.self_mask_shares + msg.mask_key_shares:
            if int.from_bytes(share, "big") >= shamir.PRIME:
                raise RemoteProtocolError(f"client {msg.sender} sent a share outside the field")
        self._responses[msg.sender] = msg

    def _verify(self, party: int, signature: bytes, transcript: bytes) -> None:
        verify_identity(self._identities, party, signature, transcript)

    # -- advance ------------------------------------------------------------------------------

    def advance(self) -> list[m.Message]:
        """Close the current phase; returns the next phase's messages (empty once DONE)."""
        if self.state in (ServerState.DONE, ServerState.ABORTED):
            raise LocalProtocolError(f"cannot advance from state {self.state.value}")
        try:
            out = {
                ServerState.ADVERTISE: self._close_advertise,
                ServerState.SHARE: self._close_share,
                ServerState.MASK: self._close_mask,
                ServerState.CONSISTENCY: self._close_consistency,
                ServerState.UNMASK: self._close_unmask,
            }[self.state]()
        except BaseException:
            self.state = ServerState.ABORTED
            raise
        self.state = _NEXT[self.state]
        return out

    def _enough(self, count: int, what: str) -> None:
        need = self.params.config.min_survivors
        if count < need:
            raise TooFewSurvivorsError(f"{what}: {count} clients, at least {need} required")

    def _close_advertise(self) -> list[m.Message]:
        self._enough(len(self._adverts), "clients that advertised keys")
        p = self.params
        return [m.KeyDirectory(session_id=p.session_id, round=p.round, recipient=u,
                               peers=tuple(self._adverts[v] for v in sorted(p.neighbours[u] & set(self._adverts))))
                for u in sorted(self._adverts)]

    def _close_share(self) -> list[m.Message]:
        self._enough(len(self._boxes), "clients that shared their secrets")
        p = self.params
        out = []
        for u in sorted(self._boxes):
            boxes = tuple((v, self._boxes[v][u]) for v in sorted(p.neighbours[u] & set(self._boxes)))
            out.append(m.ShareDelivery(session_id=p.session_id, round=p.round, recipient=u, ciphertexts=boxes))
        return out

    def _close_mask(self) -> list[m.Message]:
        self._enough(len(self._masked), "clients that sent masked inputs")
        p = self.params
        return [m.SurvivorList(session_id=p.session_id, round=p.round, recipient=u, survivors=self.survivors)
                for u in self.survivors]

    def _close_consistency(self) -> list[m.Message]:
        self._enough(len(self._signatures), "clients that confirmed the survivor list")
        p = self.params
        signatures = tuple(sorted(self._signatures.items())) if p.config.authenticated else ()
        shared = set(self._boxes)
        requests = {}
        for u in sorted(self._signatures):
            near = p.neighbours[u] & shared
            requests[u] = m.UnmaskRequest(
                session_id=p.session_id, round=p.round, recipient=u,
                survivors=tuple(sorted(near & self._masked)), dropped=tuple(sorted(near - self._masked)),
                signatures=signatures)
        self._requests = requests
        return list(requests.values())

    def _close_unmask(self) -> list[m.Message]:
        p = self.params
        self._enough(len(self._responses), "clients that answered the unmask request")
        shares: dict[tuple[str, int], dict[int, bytes]] = {}  # (kind, owner) -> responder -> share
        for responder, resp in self._responses.items():
            for owner, share in resp.self_mask_shares:
                shares.setdefault(("seed", owner), {})[responder] = share
            for owner, share in resp.mask_key_shares:
                shares.setdefault(("key", owner), {})[responder] = share
        dropped = sorted(set(self._boxes) - self._masked)
        partners = {owner: sorted(p.neighbours[owner] & self._masked) for owner in dropped}
        wanted = [("seed", owner) for owner in self.survivors]
        wanted += [("key", owner) for owner in dropped if partners[owner]]  # none: nothing to remove
        recovered, rejected = self._recover(wanted, shares)
        seeds: list[tuple[bytes, int]] = [(recovered[("seed", owner)], -1) for owner in self.survivors]
        for owner in dropped:
            if not partners[owner]:
                continue
            private = recovered[("key", owner)]
            for w in partners[owner]:
                s_wd = cp.agree(private, self._adverts[w].mask_public_key,
                                binding=p.mask_binding(self._input_context), purpose=PURPOSE_MASK,
                                party_a=owner, party_b=w)
                seeds.append((s_wd, -sign_of(w, owner)))
        total = add_masks(self._sum.copy(), seeds)
        p.config.encoding.reduce(total)
        self._result = AggregateResult(field_sum=total, included=self.survivors, dropped=tuple(dropped),
                                       rejected=tuple(sorted(rejected)))
        return []

    def _recover(self, wanted: list[tuple[str, int]], shares: Mapping[tuple[str, int], Mapping[int, bytes]]
                 ) -> tuple[dict[tuple[str, int], bytes], set[int]]:
        """Every wanted secret, from the shares of responders not caught lying; and those caught.

        Each pass tries every secret not yet recovered. A responder whose share of any secret is
        shown wrong is set aside for every secret, each secret recovered with its help is
        recovered again without it (one recovered from exactly ``t`` shares, a liar's among them,
        is not trusted), and the pass is repeated: a secret with too many wrong shares to locate
        may become recoverable once liars caught elsewhere are set aside. When a pass catches no
        one and some secret is still not recovered, the round cannot be finished."""
        t = self.params.config.threshold
        rejected: set[int] = set()
        done: dict[tuple[str, int], tuple[bytes, frozenset[int]]] = {}  # secret, responders used
        while True:
            caught: set[int] = set()
            failures: list[str] = []
            for key in wanted:
                if key in done:
                    continue
                kind, owner = key
                what = (f"client {owner}'s self-mask seed" if kind == "seed"
                        else f"dropped client {owner}'s mask key")
                have = {r + 1: share for r, share in shares.get(key, {}).items() if r not in rejected}
                if len(have) < t:
                    aside = f" (clients {sorted(rejected)} set aside for wrong shares)" if rejected else ""
                    failures.append(f"only {len(have)} shares of {what}{aside}, {t} required")
                    continue
                try:
                    found = shamir.recover(have, threshold=t)
                except ReconstructionError as exc:
                    failures.append(f"{what} cannot be recovered from its shares: {exc}")
                    continue
                if found.rejected:
                    caught |= {x - 1 for x in found.rejected}
                    continue  # recovered again once the liars are set aside everywhere
                if kind == "key" and cp.x25519_public(found.secret) != self._adverts[owner].mask_public_key:
                    failures.append(f"{what} cannot be recovered: its shares give another key than the one "
                                    "it advertised")
                    continue
                done[key] = (found.secret, frozenset(x - 1 for x in have))
            if caught:
                rejected |= caught
                done = {k: v for k, v in done.items() if not v[1] & caught}
                continue
            if failures:
                raise TooFewSurvivorsError("; ".join(failures[:3]) + ("; ..." if len(failures) > 3 else ""))
            return {key: secret for key, (secret, _) in done.items()}, rejected

    def result(self) -> AggregateResult:
        if self.state is not ServerState.DONE or self._result is None:
            raise LocalProtocolError("the aggregate is available only once the session is DONE")
        return self._result
