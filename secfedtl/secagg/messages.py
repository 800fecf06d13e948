"""Protocol messages: frozen, slotted, keyword-only values of plain fields, validated when built.

Every message names its session (16-byte id), the federated ``round`` and either its ``sender``
(client to server) or its ``recipient`` (server to client). Lists of party ids are strictly
increasing tuples, so every message has exactly one encoding (signatures cover canonical bytes).

Flow, one aggregation (see docs/protocol.md for the state tables):

====  ========================  =====================  ===========================================
tag   message                   direction              content
====  ========================  =====================  ===========================================
1     AdvertiseKeys             client -> server       X25519 encryption and mask public keys
2     KeyDirectory              server -> client       the adverts of the client's live neighbours
3     EncryptedShares           client -> server       AES-GCM boxes of Shamir shares, per peer
4     ShareDelivery             server -> client       the boxes addressed to this client
5     MaskedInput               client -> server       y_u = x_u + PRG(b_u) + sum +-PRG(s_uv)
6     SurvivorList              server -> client       U3: clients whose masked input arrived
7     ConsistencyResponse       client -> server       signature over U3 (empty if unauthenticated)
8     UnmaskRequest             server -> client       which neighbours survived / dropped
9     UnmaskResponse            client -> server       b-shares of survivors, key shares of dropped
====  ========================  =====================  ===========================================
"""

from __future__ import annotations

from dataclasses import dataclass

from secfedtl.errors import MessageError

SESSION_ID_BYTES = 16
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
SHARE_BYTES = 66
MAX_PARTY_ID = (1 << 32) - 1
MAX_ROUND = (1 << 63) - 1


def _check_party(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_PARTY_ID:
        raise MessageError(f"{name} must be a party id in [0, 2**32), got {value!r}")


def _check_bytes(value: object, name: str, *, size: int | None = None, sizes: tuple[int, ...] = ()) -> None:
    if not isinstance(value, bytes):
        raise MessageError(f"{name} must be bytes")
    if size is not None and len(value) != size:
        raise MessageError(f"{name} must be {size} bytes, got {len(value)}")
    if sizes and len(value) not in sizes:
        raise MessageError(f"{name} must be one of {sizes} bytes long, got {len(value)}")


def _check_ids(value: object, name: str) -> None:
    if not isinstance(value, tuple):
        raise MessageError(f"{name} must be a tuple")
    for item in value:
        _check_party(item, name)
    if any(a >= b for a, b in zip(value, value[1:])):
        raise MessageError(f"{name} must be strictly increasing (sorted, no duplicates)")


def _check_pairs(value: object, name: str, *, size: int | None = None) -> None:
    if not isinstance(value, tuple):
        raise MessageError(f"{name} must be a tuple of (party id, bytes) pairs")
    for item in value:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise MessageError(f"{name} must hold (party id, bytes) pairs")
        _check_party(item[0], name)
        _check_bytes(item[1], name, size=size)
    ids = [item[0] for item in value]
    if any(a >= b for a, b in zip(ids, ids[1:])):
        raise MessageError(f"{name} party ids must be strictly increasing")


@dataclass(frozen=True, slots=True, kw_only=True)
class _Header:
    session_id: bytes
    round: int

    def _check_header(self) -> None:
        _check_bytes(self.session_id, "session_id", size=SESSION_ID_BYTES)
        if isinstance(self.round, bool) or not isinstance(self.round, int) or not 0 <= self.round <= MAX_ROUND:
            raise MessageError(f"round must be an integer in [0, 2**63), got {self.round!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class AdvertiseKeys(_Header):
    sender: int
    enc_public_key: bytes
    mask_public_key: bytes
    signature: bytes = b""

    def __post_init__(self) -> None:
        self._check_header()
        _check_party(self.sender, "sender")
        _check_bytes(self.enc_public_key, "enc_public_key", size=PUBLIC_KEY_BYTES)
        _check_bytes(self.mask_public_key, "mask_public_key", size=PUBLIC_KEY_BYTES)
        _check_bytes(self.signature, "signature", sizes=(0, SIGNATURE_BYTES))


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyDirectory(_Header):
    recipient: int
    peers: tuple[AdvertiseKeys, ...]

    def __post_init__(self) -> None:
        self._check_header()
        _check_party(self.recipient, "recipient")
        if not isinstance(self.peers, tuple) or not all(isinstance(p, AdvertiseKeys) for p in self.peers):
            raise MessageError("peers must be a tuple of AdvertiseKeys")
        _check_ids(tuple(p.sender for p in self.peers), "peers")


@dataclass(frozen=True, slots=True, kw_only=True)
class EncryptedShares(_Header):
    sender: int
    ciphertexts: tuple[tuple[int, bytes], ...]  # (recipient, AES-GCM box)

    def __post_init__(self) -> None:
        self._check_header()
        _check_party(self.sender, "sender")
        _check_pairs(self.ciphertexts, "ciphertexts")


@dataclass(frozen=True, slots=True, kw_only=True)
class ShareDelivery(_Header):
    recipient: int
    ciphertexts: tuple[tuple[int, bytes], ...]  # (sender, AES-GCM box)

    def __post_init__(self) -> None:
        self._check_header()
        _check_party(self.recipient, "recipient")
        _check_pairs(self.ciphertexts, "ciphertexts")


@dataclass(frozen=True, slots=True, kw_only=True)
class MaskedInput(_Header):
    sender: int
    vector: bytes  # little-endian words of the field vector

    def __post_init__(self) -> None:
        self._check_header()
        _check_party(self.sender, "sender")
        _check_bytes(self.vector, "vector")

    def __repr__(self) -> str:
        return f"MaskedInput(round={self.round}, sender={self.sender}, vector=<{len(self.vector)} bytes>)"


@dataclass(frozen=True, slots=True, kw_only=True)
class SurvivorList(_Header):
    recipient: int
    survivors: tuple[int, ...]

    def __post_init__(self) -> None:
        self._check_header()
        _check_party(self.recipient, "recipient")
        _check_ids(self.survivors, "survivors")


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsistencyResponse(_Header):
    sender: int
    signature: bytes = b""

    def __post_init__(self) -> None:
        self._check_header()
        _check_party(self.sender, "sender")
        _check_bytes(self.signature, "signature", sizes=(0, SIGNATURE_BYTES))


@dataclass(frozen=True, slots=True, kw_only=True)
class UnmaskRequest(_Header):
    recipient: int
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    signatures: tuple[tuple[int, bytes], ...] = ()

    def __post_init__(self) -> None:
        self._check_header()
        _check_party(self.recipient, "recipient")
        _check_ids(self.survivors, "survivors")
        _check_ids(self.dropped, "dropped")
        _check_pairs(self.signatures, "signatures", size=SIGNATURE_BYTES)


@dataclass(frozen=True, slots=True, kw_only=True)
class UnmaskResponse(_Header):
    sender: int
    self_mask_shares: tuple[tuple[int, bytes], ...]  # (owner, share of b_owner)
    mask_key_shares: tuple[tuple[int, bytes], ...]   # (owner, share of the owner's mask key)

    def __post_init__(self) -> None:
        self._check_header()
        _check_party(self.sender, "sender")
        _check_pairs(self.self_mask_shares, "self_mask_shares", size=SHARE_BYTES)
        _check_pairs(self.mask_key_shares, "mask_key_shares", size=SHARE_BYTES)
        both = {o for o, _ in self.self_mask_shares} & {o for o, _ in self.mask_key_shares}
        if both:
            raise MessageError(f"both kinds of share for the same owner {sorted(both)}")

    def __repr__(self) -> str:
        return (f"UnmaskResponse(round={self.round}, sender={self.sender}, "
                f"{len(self.self_mask_shares)} self-mask shares, {len(self.mask_key_shares)} key shares)")


Message = (AdvertiseKeys | KeyDirectory | EncryptedShares | ShareDelivery | MaskedInput | SurvivorList
           | ConsistencyResponse | UnmaskRequest | UnmaskResponse)
