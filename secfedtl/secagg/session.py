"""What both roles share: session parameters and the exact bytes that are signed or bound."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from collections.abc import Mapping

from secfedtl.crypto.primitives import Binding, verify_signature
from secfedtl.errors import AuthenticationError, ConfigError, EncodingError, SecFedTLError
from secfedtl.secagg.config import PROTOCOL_VERSION, SecAggConfig
from secfedtl.secagg.graph import NeighbourGraph
from secfedtl.secagg.messages import MAX_ROUND, SESSION_ID_BYTES

PURPOSE_SHARE_KEY = b"share-encryption"
PURPOSE_SHARE_BOX = b"share-box"
PURPOSE_MASK = b"pairwise-mask"
PURPOSE_ADVERT = b"advertise-keys"
PURPOSE_CONSISTENCY = b"consistency"


#: The most bytes an input context (:meth:`SessionParams.mask_binding`) may have.
MAX_INPUT_CONTEXT = 64


def check_input_context(context: bytes) -> bytes:
    if not isinstance(context, bytes) or len(context) > MAX_INPUT_CONTEXT:
        raise ConfigError(f"an input context must be at most {MAX_INPUT_CONTEXT} bytes")
    return context


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionParams:
    """Public parameters both sides must agree on for one aggregation.

    ``vector_length`` counts field words, including the trailing weight word that the encoding
    appends (so a model of ``m`` parameters has ``vector_length = m + 1``). ``context`` binds an
    application digest (e.g. the hash of the global model this round started from) into every
    key and signature: clients shown different contexts cannot complete the round together.
    """

    config: SecAggConfig
    session_id: bytes
    round: int
    vector_length: int
    context: bytes = b""
    neighbours: NeighbourGraph = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.config, SecAggConfig):
            raise ConfigError("config must be a SecAggConfig")
        if not isinstance(self.session_id, bytes) or len(self.session_id) != SESSION_ID_BYTES:
            raise ConfigError(f"session_id must be {SESSION_ID_BYTES} bytes")
        if isinstance(self.round, bool) or not isinstance(self.round, int) or not 0 <= self.round <= MAX_ROUND:
            raise ConfigError("round must be a non-negative integer")
        if isinstance(self.vector_length, bool) or not isinstance(self.vector_length, int) or self.vector_length < 1:
            raise ConfigError("vector_length must be a positive integer")
        if not isinstance(self.context, bytes) or len(self.context) > 1024:
            raise ConfigError("context must be at most 1024 bytes")
        object.__setattr__(self, "neighbours", NeighbourGraph(  # built lazily, client by client
            self.config.num_clients, self.config.degree, self.session_id))

    @property
    def binding(self) -> Binding:
        return Binding(version=PROTOCOL_VERSION, session_id=self.session_id, round=self.round,
                       context=self.context)

    def mask_binding(self, input_context: bytes = b"") -> Binding:
        """The binding of the pairwise masks: the session's own, and, for an input given after
        the set-up (:meth:`ClientSession.provide_input`), the input's context too (the digest of
        the request it answers). Two parties that give the same session inputs under different
        contexts derive different pairwise masks, so their masks do not cancel and the sum stays
        masked."""
        if not input_context:
            return self.binding
        check_input_context(input_context)
        return Binding(version=PROTOCOL_VERSION, session_id=self.session_id, round=self.round,
                       context=len(self.context).to_bytes(2, "big") + self.context + input_context)

    @property
    def dtype(self) -> type:
        return self.config.encoding.dtype

    @property
    def vector_bytes(self) -> int:
        return self.vector_length * np.dtype(self.dtype).itemsize

    def check_field_vector(self, vector: np.ndarray) -> np.ndarray:
        vec = np.asarray(vector)
        if vec.ndim != 1 or vec.size != self.vector_length:
            raise EncodingError(f"field vector must have shape ({self.vector_length},), got {vec.shape}")
        if vec.dtype != self.dtype:
            raise EncodingError(f"field vector must be {np.dtype(self.dtype).name}, got {vec.dtype}")
        if self.config.bits not in (32, 64) and int(vec.max(initial=0)) >> self.config.bits:
            raise EncodingError(f"field vector has words outside Z_2^{self.config.bits}")
        return vec

    def vector_from_bytes(self, data: bytes) -> np.ndarray:
        if len(data) != self.vector_bytes:
            raise EncodingError(f"masked vector must be {self.vector_bytes} bytes, got {len(data)}")
        vec = np.frombuffer(data, dtype=np.dtype(self.dtype).newbyteorder("<")).astype(self.dtype)
        return self.check_field_vector(vec)

    def vector_to_bytes(self, vector: np.ndarray) -> bytes:
        return np.asarray(vector, dtype=np.dtype(self.dtype).newbyteorder("<")).tobytes()

    def advert_transcript(self, sender: int, enc_public_key: bytes, mask_public_key: bytes) -> bytes:
        return self.binding.encode(PURPOSE_ADVERT, sender, sender) + enc_public_key + mask_public_key

    def consistency_transcript(self, sender: int, survivors: tuple[int, ...]) -> bytes:
        body = b"".join(v.to_bytes(4, "big") for v in survivors)
        return self.binding.encode(PURPOSE_CONSISTENCY, sender, sender) + len(survivors).to_bytes(4, "big") + body


def sign_of(owner: int, peer: int) -> int:
    """The sign with which ``owner`` adds the pairwise mask it shares with ``peer``."""
    return 1 if owner < peer else -1




def verify_identity(identities: Mapping[int, bytes], party: int, signature: bytes, transcript: bytes) -> None:
    """Check ``party``'s Ed25519 signature over ``transcript`` (authenticated mode).

    Raises :class:`AuthenticationError` when the key or signature is missing or does not verify.
    """
    public = identities.get(party)
    if public is None or not signature:
        raise AuthenticationError(f"no identity key or signature for client {party}")
    try:
        verify_signature(public, signature, transcript)
    except SecFedTLError as exc:
        raise AuthenticationError(f"bad signature from client {party}") from exc
