"""Key agreement (X25519), key derivation (HKDF-SHA256), AEAD (AES-256-GCM) and signatures
(Ed25519), all from `cryptography`.

Every derived key and every AEAD call is *bound* to a context: protocol version, session id,
round, purpose label and the two party ids. :class:`Binding` builds that byte string once, so
callers cannot forget a field; the same bytes go into HKDF ``info`` and AES-GCM associated data.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from secfedtl.errors import CryptoError, DecryptionError, SignatureError

KEY_BYTES = 32
NONCE_BYTES = 12
SIGNATURE_BYTES = 64
_RAW = serialization.Encoding.Raw
_RAW_PUB = serialization.PublicFormat.Raw
_RAW_PRIV = serialization.PrivateFormat.Raw
_NO_ENC = serialization.NoEncryption()


@dataclass(frozen=True, slots=True, kw_only=True)
class Binding:
    """Context bound into every KDF ``info`` and AEAD associated data.

    ``context`` is an application digest (e.g. the hash of the model a federated round started
    from): two parties that were shown different contexts derive different keys and fail.
    """

    version: int
    session_id: bytes
    round: int
    context: bytes = b""

    def encode(self, purpose: bytes, party_a: int, party_b: int) -> bytes:
        return b"".join(
            (
                b"secfedtl",
                struct.pack(">HQ", self.version, self.round),
                _lp(self.session_id),
                _lp(self.context),
                _lp(purpose),
                struct.pack(">II", party_a, party_b),
            )
        )


def _lp(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def random_bytes(n: int = KEY_BYTES) -> bytes:
    """Secret randomness from the operating system's CSPRNG."""
    return os.urandom(n)


# --- X25519 ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyPair:
    """An X25519 key pair held as raw 32-byte strings."""

    private: bytes
    public: bytes

    def __repr__(self) -> str:  # never print secrets
        return f"KeyPair(public={self.public.hex()[:16]}..., private=<hidden>)"


def generate_x25519() -> KeyPair:
    sk = X25519PrivateKey.generate()
    return KeyPair(
        private=sk.private_bytes(_RAW, _RAW_PRIV, _NO_ENC),
        public=sk.public_key().public_bytes(_RAW, _RAW_PUB),
    )


def x25519_public(private: bytes) -> bytes:
    """The public key of a raw X25519 private key."""
    try:
        sk = X25519PrivateKey.from_private_bytes(private)
    except ValueError as exc:
        raise CryptoError("invalid X25519 private key") from exc
    return sk.public_key().public_bytes(_RAW, _RAW_PUB)


def x25519_shared(private: bytes, peer_public: bytes) -> bytes:
    """Raw X25519 shared secret. Raises :class:`CryptoError` on malformed or low-order keys."""
    try:
        sk = X25519PrivateKey.from_private_bytes(private)
        pk = X25519PublicKey.from_public_bytes(peer_public)
        return sk.exchange(pk)
    except ValueError as exc:  # wrong length, or an all-zero shared secret (low-order point)
        raise CryptoError("X25519 key agreement failed") from exc


#: A fixed, public X25519 scalar used only to test whether a public key is usable (see below).
_PROBE = hashlib.sha256(b"secfedtl/v1/x25519-public-key-probe").digest()


def check_x25519_public(public: bytes) -> None:
    """Raises :class:`CryptoError` unless ``public`` is an X25519 public key that key agreement
    accepts with every private key: 32 bytes and not of small order.

    Exact with one fixed scalar: a clamped X25519 scalar is a multiple of the cofactor and
    smaller than the prime subgroup orders, so the shared secret is all-zero for one private key
    exactly when it is for all of them.
    """
    if not isinstance(public, bytes):
        raise CryptoError("an X25519 public key is bytes")
    x25519_shared(_PROBE, public)


def hkdf_sha256(secret: bytes, *, info: bytes, length: int = KEY_BYTES, salt: bytes | None = None) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(secret)


def agree(private: bytes, peer_public: bytes, *, binding: Binding, purpose: bytes, party_a: int,
          party_b: int, length: int = KEY_BYTES) -> bytes:
    """X25519 then HKDF-SHA256 with the binding as ``info``. Parties are put in a canonical
    order, so both ends of a pair derive the same key."""
    lo, hi = sorted((party_a, party_b))
    return hkdf_sha256(x25519_shared(private, peer_public), info=binding.encode(purpose, lo, hi),
                       length=length)


# --- AES-GCM -----------------------------------------------------------------------------------


def aead_encrypt(key: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    """AES-256-GCM with a fresh random 96-bit nonce, returned as ``nonce || ciphertext``."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated_data)


def aead_decrypt(key: bytes, blob: bytes, associated_data: bytes) -> bytes:
    if len(blob) < NONCE_BYTES + 16:
        raise DecryptionError("ciphertext too short")
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], associated_data)
    except InvalidTag as exc:
        raise DecryptionError("ciphertext did not authenticate") from exc


# --- Ed25519 -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A long-term Ed25519 identity key (authenticated mode)."""

    private: bytes
    public: bytes

    @classmethod
    def generate(cls) -> SigningKey:
        sk = Ed25519PrivateKey.generate()
        return cls(sk.private_bytes(_RAW, _RAW_PRIV, _NO_ENC), sk.public_key().public_bytes(_RAW, _RAW_PUB))

    @classmethod
    def from_private(cls, private: bytes) -> SigningKey:
        """The key pair of a raw 32-byte Ed25519 private key (:class:`CryptoError` otherwise)."""
        try:
            sk = Ed25519PrivateKey.from_private_bytes(private)
        except (TypeError, ValueError) as exc:
            raise CryptoError("invalid Ed25519 private key") from exc
        return cls(sk.private_bytes(_RAW, _RAW_PRIV, _NO_ENC), sk.public_key().public_bytes(_RAW, _RAW_PUB))

    def sign(self, message: bytes) -> bytes:
        return Ed25519PrivateKey.from_private_bytes(self.private).sign(message)

    def __repr__(self) -> str:
        return f"SigningKey(public={self.public.hex()[:16]}..., private=<hidden>)"


def verify_signature(public: bytes, signature: bytes, message: bytes) -> None:
    """Raises :class:`SignatureError` unless ``signature`` is valid."""
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except (InvalidSignature, ValueError) as exc:
        raise SignatureError("signature did not verify") from exc
