"""The client side of Bonawitz et al. 2017 secure aggregation with SecAgg+ neighbour graphs,
as a Sans-I/O state machine.

Ground rules:

* ``receive(message)`` takes one server message and returns the list of messages to send
  (zero or one). It never reads a socket, sleeps, or spawns threads.
* Each state accepts exactly one message type (``_LEGAL``). Anything else, or any failed check,
  raises a :mod:`secfedtl.errors` exception, sends nothing, and moves the session to
  ``ABORTED``; all other recorded data (keys, shares, survivor lists) stays as it was, because
  every handler computes into locals and commits only at its end.
* The refusals against a malicious server are in ``_on_unmask_request`` and
  ``_on_survivor_list``: a peer listed both alive and dropped, a peer reported dropped after it
  was confirmed surviving, fewer than ``threshold`` surviving neighbours, requests for shares
  this client never held, bad signatures, wrong session/round/recipient, replays.

Secrets (``b_u``, private keys, shares) live only in this object and are never logged or put in
``repr``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

import numpy as np

from secfedtl.crypto import primitives as cp
from secfedtl.crypto import shamir
from secfedtl.crypto.prg import add_masks
from secfedtl.errors import (
    AuthenticationError,
    ConfigError,
    InconsistentDropoutError,
    LocalProtocolError,
    RemoteProtocolError,
    ReplayError,
    SecFedTLError,
    TooFewSurvivorsError,
    WrongSessionError,
)
from secfedtl.secagg import messages as m
from secfedtl.secagg.session import (
    PURPOSE_MASK,
    PURPOSE_SHARE_BOX,
    PURPOSE_SHARE_KEY,
    SessionParams,
    sign_of,
    verify_identity,
)


class ClientState(enum.Enum):
    INIT = "init"
    ADVERTISED = "advertised"          # sent AdvertiseKeys, waits for KeyDirectory
    SHARES_SENT = "shares_sent"        # sent EncryptedShares, waits for ShareDelivery
    MASKED_SENT = "masked_sent"        # sent MaskedInput, waits for SurvivorList
    CONSISTENCY_SENT = "consistency_sent"  # sent ConsistencyResponse, waits for UnmaskRequest
    DONE = "done"
    ABORTED = "aborted"


_LEGAL: dict[ClientState, type] = {
    ClientState.ADVERTISED: m.KeyDirectory,
    ClientState.SHARES_SENT: m.ShareDelivery,
    ClientState.MASKED_SENT: m.SurvivorList,
    ClientState.CONSISTENCY_SENT: m.UnmaskRequest,
}
_ORDER = [m.KeyDirectory, m.ShareDelivery, m.SurvivorList, m.UnmaskRequest]


class ClientSession:
    """One client's part in one aggregation.

    ``input_vector`` is the already encoded field vector (see
    :meth:`secfedtl.encoding.FixedPointEncoding.encode`). It may be left out and given later with
    :meth:`provide_input`, any time before the ``ShareDelivery`` (which the masked input answers):
    the key advertisement and the share phase do not depend on it, so a session can be set up
    before its input exists (the pre-keyed steps of a distributed-noise round). In authenticated
    mode ``identity`` is this client's long-term Ed25519 key and ``peer_identities`` maps every
    client id to its Ed25519 public key.
    """

    def __init__(self, *, params: SessionParams, client_id: int, input_vector: np.ndarray | None = None,
                 identity: cp.SigningKey | None = None,
                 peer_identities: Mapping[int, bytes] | None = None) -> None:
        cfg = params.config
        if isinstance(client_id, bool) or not isinstance(client_id, int) or not 0 <= client_id < cfg.num_clients:
            raise ConfigError(f"client_id must be in [0, {cfg.num_clients})")
        if cfg.authenticated and (identity is None or peer_identities is None):
            raise ConfigError("authenticated mode needs identity and peer_identities")
        self.params = params
        self.client_id = client_id
        self._input = None if input_vector is None else params.check_field_vector(input_vector).copy()
        self._input_context = b""
        self._identity = identity
        self._peer_identities = dict(peer_identities or {})
        self._neighbours = params.neighbours[client_id]
        self.state = ClientState.INIT
        self._enc = cp.generate_x25519()
        self._mask = cp.generate_x25519()
        self._self_seed = cp.random_bytes()
        self._peers: dict[int, m.AdvertiseKeys] = {}        # U1 among neighbours
        self._shares: dict[int, tuple[bytes, bytes]] = {}    # owner -> (b share, key share), U2
        self._survivors: tuple[int, ...] | None = None       # U3 as confirmed

    def __repr__(self) -> str:
        return f"ClientSession(client_id={self.client_id}, state={self.state.value})"

    # -- public API ---------------------------------------------------------------------------

    def start(self) -> m.AdvertiseKeys:
        """Begin: returns this client's key advertisement."""
        if self.state is not ClientState.INIT:
            self.state = ClientState.ABORTED
            raise LocalProtocolError("start() called twice")
        sig = b""
        if self._identity is not None:
            sig = self._identity.sign(self.params.advert_transcript(
                self.client_id, self._enc.public, self._mask.public))
        advert = m.AdvertiseKeys(session_id=self.params.session_id, round=self.params.round,
                                 sender=self.client_id, enc_public_key=self._enc.public,
                                 mask_public_key=self._mask.public, signature=sig)
        self.state = ClientState.ADVERTISED
        return advert

    @property
    def has_input(self) -> bool:
        return self._input is not None

    def provide_input(self, input_vector: np.ndarray, *, context: bytes = b"") -> None:
        """Give the session its input, once, before the ``ShareDelivery`` arrives. ``context``
        (at most 64 bytes; e.g. the digest of the request the input answers) goes into the
        pairwise masks' binding (:meth:`SessionParams.mask_binding`): parties that give their
        inputs under different contexts get masks that do not cancel. A second input, or one
        after the masked input was sent, raises :class:`LocalProtocolError` and aborts the
        session; a bad vector or context raises and changes nothing."""
        if self._input is not None or self.state not in (ClientState.INIT, ClientState.ADVERTISED,
                                                          ClientState.SHARES_SENT):
            self.state = ClientState.ABORTED
            raise LocalProtocolError("the session's input can be given once, before its masked input is due")
        self.params.mask_binding(context)  # checks the context
        self._input = self.params.check_field_vector(input_vector).copy()
        self._input_context = context

    def receive(self, message: m.Message) -> list[m.Message]:
        """Handle one server message; returns the messages to send back."""
        try:
            self._check_envelope(message)
            handler = {
                m.KeyDirectory: self._on_key_directory,
                m.ShareDelivery: self._on_share_delivery,
                m.SurvivorList: self._on_survivor_list,
                m.UnmaskRequest: self._on_unmask_request,
            }[type(message)]
            return [handler(message)]
        except BaseException as exc:
            self.state = ClientState.ABORTED
            if isinstance(exc, SecFedTLError):
                raise
            raise LocalProtocolError(f"internal error while handling {type(message).__name__}") from exc

    # -- checks -------------------------------------------------------------------------------

    def _check_envelope(self, message: m.Message) -> None:
        if self.state in (ClientState.ABORTED, ClientState.DONE, ClientState.INIT):
            raise LocalProtocolError(f"no message is accepted in state {self.state.value}")
        expected = _LEGAL[self.state]
        if type(message) is not expected:
            if type(message) in _ORDER and _ORDER.index(type(message)) < _ORDER.index(expected):
                raise ReplayError(f"{type(message).__name__} replayed in state {self.state.value}")
            raise RemoteProtocolError(
                f"{type(message).__name__} is not allowed in state {self.state.value}")
        if message.session_id != self.params.session_id or message.round != self.params.round:
            raise WrongSessionError("message belongs to another session or round")
        if message.recipient != self.client_id:
            raise WrongSessionError("message addressed to another client")

    def _threshold_or_refuse(self, count: int, what: str) -> None:
        t = self.params.config.threshold
        if count < t:
            raise TooFewSurvivorsError(f"{what}: {count} present, at least {t} required")

    # -- handlers: each computes into locals, then commits ----------------------------------

    def _on_key_directory(self, msg: m.KeyDirectory) -> m.EncryptedShares:
        p = self.params
        peers: dict[int, m.AdvertiseKeys] = {}
        seen_keys = {self._enc.public, self._mask.public}
        for advert in msg.peers:
            v = advert.sender
            if v not in self._neighbours:
                raise RemoteProtocolError(f"client {v} is not a neighbour of {self.client_id}")
            if advert.session_id != p.session_id or advert.round != p.round:
                raise WrongSessionError("advertised keys belong to another session or round")
            keys = {advert.enc_public_key, advert.mask_public_key}
            if len(keys) != 2 or keys & seen_keys:
                raise RemoteProtocolError(f"client {v} advertised reused keys")
            seen_keys |= keys
            if p.config.authenticated:
                self._verify(v, advert.signature,
                             p.advert_transcript(v, advert.enc_public_key, advert.mask_public_key))
            peers[v] = advert
        self._threshold_or_refuse(len(peers), "neighbours with keys")
        t = p.config.threshold
        xs = [v + 1 for v in sorted(peers)]
        b_shares = shamir.split(self._self_seed, threshold=t, xs=xs)
        k_shares = shamir.split(self._mask.private, threshold=t, xs=xs)
        boxes = []
        for v in sorted(peers):
            key = cp.agree(self._enc.private, peers[v].enc_public_key, binding=p.binding,
                           purpose=PURPOSE_SHARE_KEY, party_a=self.client_id, party_b=v)
            box = cp.aead_encrypt(key, b_shares[v + 1] + k_shares[v + 1],
                                  p.binding.encode(PURPOSE_SHARE_BOX, self.client_id, v))
            boxes.append((v, box))
        out = m.EncryptedShares(session_id=p.session_id, round=p.round, sender=self.client_id,
                                ciphertexts=tuple(boxes))
        self._peers = peers
        self.state = ClientState.SHARES_SENT
        return out

    def _on_share_delivery(self, msg: m.ShareDelivery) -> m.MaskedInput:
        p = self.params
        if self._input is None:
            raise LocalProtocolError("the masked input is due but the session was given no input")
        shares: dict[int, tuple[bytes, bytes]] = {}
        for v, box in msg.ciphertexts:
            if v not in self._peers:
                raise RemoteProtocolError(f"shares from {v}, who is not among this client's peers")
            key = cp.agree(self._enc.private, self._peers[v].enc_public_key, binding=p.binding,
                           purpose=PURPOSE_SHARE_KEY, party_a=self.client_id, party_b=v)
            plain = cp.aead_decrypt(key, box, p.binding.encode(PURPOSE_SHARE_BOX, v, self.client_id))
            if len(plain) != 2 * shamir.SHARE_BYTES:
                raise RemoteProtocolError(f"malformed share box from {v}")
            shares[v] = (plain[: shamir.SHARE_BYTES], plain[shamir.SHARE_BYTES:])
        self._threshold_or_refuse(len(shares), "neighbours that shared their secrets")
        seeds = [(self._self_seed, 1)]
        for v in sorted(shares):
            s_uv = cp.agree(self._mask.private, self._peers[v].mask_public_key,
                            binding=p.mask_binding(self._input_context), purpose=PURPOSE_MASK,
                            party_a=self.client_id, party_b=v)
            seeds.append((s_uv, sign_of(self.client_id, v)))
        masked = add_masks(self._input.copy(), seeds)
        p.config.encoding.reduce(masked)
        out = m.MaskedInput(session_id=p.session_id, round=p.round, sender=self.client_id,
                            vector=p.vector_to_bytes(masked))
        self._shares = shares
        self.state = ClientState.MASKED_SENT
        return out

    def _on_survivor_list(self, msg: m.SurvivorList) -> m.ConsistencyResponse:
        p = self.params
        survivors = msg.survivors
        if self.client_id not in survivors:
            raise RemoteProtocolError("survivor list omits this client, which sent its masked input")
        if any(v >= p.config.num_clients for v in survivors):
            raise RemoteProtocolError("survivor list names unknown clients")
        if len(survivors) < p.config.min_survivors:
            raise TooFewSurvivorsError(f"{len(survivors)} survivors, at least {p.config.min_survivors} required")
        near = set(survivors) & self._neighbours
        if not near <= set(self._shares):
            raise InconsistentDropoutError("a surviving neighbour never shared its secrets with this client")
        self._threshold_or_refuse(len(near), "surviving neighbours")
        sig = b""
        if self._identity is not None:
            sig = self._identity.sign(p.consistency_transcript(self.client_id, survivors))
        out = m.ConsistencyResponse(session_id=p.session_id, round=p.round, sender=self.client_id,
                                    signature=sig)
        self._survivors = survivors
        self.state = ClientState.CONSISTENCY_SENT
        return out

    def _on_unmask_request(self, msg: m.UnmaskRequest) -> m.UnmaskResponse:
        p = self.params
        assert self._survivors is not None
        confirmed = set(self._survivors)
        alive, dropped = set(msg.survivors), set(msg.dropped)
        if alive & dropped:
            raise InconsistentDropoutError(
                f"clients {sorted(alive & dropped)} listed both as surviving and as dropped")
        if dropped & confirmed:
            raise InconsistentDropoutError(
                f"clients {sorted(dropped & confirmed)} reported dropped after being confirmed surviving")
        held = set(self._shares)
        if not (alive | dropped) <= held:
            raise InconsistentDropoutError("shares requested for clients this client holds none of")
        if alive != held & confirmed or dropped != held - confirmed:
            raise InconsistentDropoutError("unmask request does not match the confirmed survivor list")
        self._threshold_or_refuse(len(alive), "surviving neighbours")
        if p.config.authenticated:
            signers = dict(msg.signatures)
            if not set(signers) <= confirmed:
                raise AuthenticationError("consistency signatures from clients outside the survivor list")
            if len(signers) < p.config.threshold:
                raise AuthenticationError(
                    f"{len(signers)} consistency signatures, at least {p.config.threshold} required")
            for v, sig in signers.items():
                self._verify(v, sig, p.consistency_transcript(v, self._survivors))
        out = m.UnmaskResponse(
            session_id=p.session_id, round=p.round, sender=self.client_id,
            self_mask_shares=tuple((v, self._shares[v][0]) for v in sorted(alive)),
            mask_key_shares=tuple((v, self._shares[v][1]) for v in sorted(dropped)))
        self.state = ClientState.DONE
        return out

    def _verify(self, party: int, signature: bytes, transcript: bytes) -> None:
        verify_identity(self._peer_identities, party, signature, transcript)
