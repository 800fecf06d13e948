"""secfedtl.crypto.primitives: published vectors (RFC 7748, RFC 5869) through our wrappers,
key agreement symmetry and binding, AEAD and signature failures raise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from secfedtl.crypto import primitives as cp
from secfedtl.errors import CryptoError, DecryptionError, SignatureError

VECTORS = json.loads((Path(__file__).parent / "vectors.json").read_text())


def _h(s: str) -> bytes:
    return bytes.fromhex(s)


@pytest.mark.parametrize("case", VECTORS["x25519_scalarmult"], ids=lambda c: c["source"])
def test_x25519_rfc7748_scalarmult(case):
    assert cp.x25519_shared(_h(case["scalar"]), _h(case["u"])) == _h(case["output"])


def test_x25519_rfc7748_iterated():
    it = VECTORS["x25519_iterated"]
    k = u = _h(it["start"])
    for i in range(1, 1001):
        k, u = cp.x25519_shared(k, u), k
        if i == 1:
            assert k == _h(it["after_1"])
    assert k == _h(it["after_1000"])


def test_x25519_rfc7748_diffie_hellman():
    dh = VECTORS["x25519_dh"]
    a, b = _h(dh["alice_private"]), _h(dh["bob_private"])
    assert cp.x25519_public(a) == _h(dh["alice_public"])
    assert cp.x25519_public(b) == _h(dh["bob_public"])
    assert cp.x25519_shared(a, _h(dh["bob_public"])) == _h(dh["shared"])
    assert cp.x25519_shared(b, _h(dh["alice_public"])) == _h(dh["shared"])


@pytest.mark.parametrize("case", VECTORS["hkdf_sha256"], ids=lambda c: c["source"])
def test_hkdf_rfc5869(case):
    out = cp.hkdf_sha256(_h(case["ikm"]), info=_h(case["info"]), salt=_h(case["salt"]),
                         length=case["length"])
    assert out == _h(case["okm"])


def test_hkdf_rfc5869_no_salt_equals_empty_salt():
    case = VECTORS["hkdf_sha256"][2]  # RFC 5869 A.3: salt not provided
    assert cp.hkdf_sha256(_h(case["ikm"]), info=b"", length=42) == _h(case["okm"])


def test_x25519_rejects_malformed_and_low_order_keys():
    sk = cp.generate_x25519()
    with pytest.raises(CryptoError):
        cp.x25519_shared(sk.private, bytes(31))
    with pytest.raises(CryptoError):
        cp.x25519_shared(sk.private, bytes(32))  # u = 0: low order, all-zero secret
    with pytest.raises(CryptoError):
        cp.x25519_public(b"short")


def _binding(**kw):
    base = dict(version=1, session_id=bytes(16), round=3, context=b"model")
    base.update(kw)
    return cp.Binding(**base)


def test_agree_is_symmetric_and_bound_to_every_field():
    a, b = cp.generate_x25519(), cp.generate_x25519()
    bind = _binding()
    k_ab = cp.agree(a.private, b.public, binding=bind, purpose=b"p", party_a=1, party_b=2)
    k_ba = cp.agree(b.private, a.public, binding=bind, purpose=b"p", party_a=2, party_b=1)
    assert k_ab == k_ba and len(k_ab) == cp.KEY_BYTES
    others = [
        cp.agree(a.private, b.public, binding=_binding(version=2), purpose=b"p", party_a=1, party_b=2),
        cp.agree(a.private, b.public, binding=_binding(session_id=b"\x01" * 16), purpose=b"p", party_a=1, party_b=2),
        cp.agree(a.private, b.public, binding=_binding(round=4), purpose=b"p", party_a=1, party_b=2),
        cp.agree(a.private, b.public, binding=_binding(context=b"other"), purpose=b"p", party_a=1, party_b=2),
        cp.agree(a.private, b.public, binding=bind, purpose=b"q", party_a=1, party_b=2),
        cp.agree(a.private, b.public, binding=bind, purpose=b"p", party_a=1, party_b=3),
    ]
    assert len({k_ab, *others}) == 1 + len(others)


def test_binding_encoding_is_injective_across_field_boundaries():
    # length prefixes: moving a byte from session id into context changes the encoding
    b1 = cp.Binding(version=1, session_id=b"ab", round=0, context=b"c")
    b2 = cp.Binding(version=1, session_id=b"a", round=0, context=b"bc")
    assert b1.encode(b"x", 1, 2) != b2.encode(b"x", 1, 2)


def test_aead_roundtrip_and_every_tamper_raises():
    key = cp.random_bytes()
    blob = cp.aead_encrypt(key, b"secret share", b"ad")
    assert cp.aead_decrypt(key, blob, b"ad") == b"secret share"
    assert cp.aead_encrypt(key, b"secret share", b"ad") != blob  # fresh nonce
    for i in range(len(blob)):
        bad = bytearray(blob)
        bad[i] ^= 0x01
        with pytest.raises(DecryptionError):
            cp.aead_decrypt(key, bytes(bad), b"ad")
    with pytest.raises(DecryptionError):
        cp.aead_decrypt(key, blob, b"other ad")
    with pytest.raises(DecryptionError):
        cp.aead_decrypt(cp.random_bytes(), blob, b"ad")
    with pytest.raises(DecryptionError):
        cp.aead_decrypt(key, blob[:20], b"ad")


def test_signatures_verify_and_forgeries_raise():
    sk = cp.SigningKey.generate()
    sig = sk.sign(b"transcript")
    assert len(sig) == cp.SIGNATURE_BYTES
    cp.verify_signature(sk.public, sig, b"transcript")
    with pytest.raises(SignatureError):
        cp.verify_signature(sk.public, sig, b"transcript!")
    with pytest.raises(SignatureError):
        cp.verify_signature(cp.SigningKey.generate().public, sig, b"transcript")
    with pytest.raises(SignatureError):
        cp.verify_signature(sk.public, bytes(64), b"transcript")
    with pytest.raises(SignatureError):
        cp.verify_signature(b"bad", sig, b"transcript")


def test_secrets_are_not_in_repr():
    kp = cp.generate_x25519()
    sk = cp.SigningKey.generate()
    assert kp.private.hex() not in repr(kp) and kp.private.hex()[:16] not in repr(kp)
    assert sk.private.hex()[:16] not in repr(sk)


# Small-order X25519 u-coordinates (the points of order 1, 2, 4 and 8 and their non-canonical
# encodings u + p), as listed in the libsodium / "May the fourth be with you" blacklist.
SMALL_ORDER = [
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0100000000000000000000000000000000000000000000000000000000000000",
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
    "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
]


@pytest.mark.parametrize("hex_key", SMALL_ORDER)
def test_check_x25519_public_refuses_small_order_keys_that_every_agreement_would_refuse(hex_key):
    key = bytes.fromhex(hex_key)
    with pytest.raises(CryptoError):
        cp.check_x25519_public(key)
    for _ in range(3):  # the probe's verdict is every private key's verdict
        with pytest.raises(CryptoError):
            cp.x25519_shared(cp.generate_x25519().private, key)


def test_check_x25519_public_accepts_real_keys_and_refuses_other_shapes():
    for _ in range(20):
        cp.check_x25519_public(cp.generate_x25519().public)
    for bad in (bytes(31), bytes(33), b"", "text"):
        with pytest.raises(CryptoError):
            cp.check_x25519_public(bad)  # type: ignore[arg-type]
