"""secfedtl.secagg.codec: decode(encode(m)) == m for every message type; any bytes decode to a
message or raise DecodeError only (fuzz, mutations, truncation, huge lengths, nesting)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secfedtl.errors import DecodeError, MessageError
from secfedtl.secagg import codec
from secfedtl.secagg import messages as m
from secfedtl.testing import strategies as sst

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _decode_or_decode_error(blob: bytes, **kw) -> None:
    try:
        out = codec.decode(blob, **kw)
    except DecodeError:
        return
    # whatever decodes must re-encode to exactly the same bytes (canonical encoding)
    assert codec.encode(out) == bytes(blob)


@pytest.mark.parametrize("strategy", [
    sst.advertise_keys(), sst.key_directories(), sst.encrypted_shares(), sst.share_deliveries(),
    sst.masked_inputs(), sst.survivor_lists(), sst.consistency_responses(), sst.unmask_requests(),
    sst.unmask_responses(),
], ids=lambda s: repr(s)[:40])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_roundtrip_every_type(strategy, data):
    msg = data.draw(strategy)
    blob = codec.encode(msg)
    assert blob[:4] == codec.MAGIC and blob[4] == codec.WIRE_VERSION
    assert blob[5] == codec._TAG_OF[type(msg)]
    back = codec.decode(blob)
    assert back == msg and type(back) is type(msg)
    assert codec.decode(bytearray(blob)) == msg and codec.decode(memoryview(blob)) == msg


@FUZZ
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_decode_error(blob):
    _decode_or_decode_error(blob)


@FUZZ
@given(st.binary(max_size=200))
def test_arbitrary_bodies_behind_a_valid_header(body):
    for tag in range(0, 11):
        _decode_or_decode_error(codec.MAGIC + bytes((codec.WIRE_VERSION, tag)) + body)


@FUZZ
@given(sst.messages(), st.data())
def test_mutations_of_valid_encodings(msg, data):
    blob = bytearray(codec.encode(msg))
    kind = data.draw(st.sampled_from(["flip", "truncate", "append", "length", "splice", "byte"]))
    if kind == "flip":
        i = data.draw(st.integers(0, len(blob) * 8 - 1))
        blob[i // 8] ^= 1 << (i % 8)
    elif kind == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    elif kind == "append":
        blob += data.draw(st.binary(min_size=1, max_size=20))
    elif kind == "length":  # overwrite a 4-byte window with a huge or random length
        i = data.draw(st.integers(6, max(6, len(blob) - 4)))
        value = data.draw(st.sampled_from([0xFFFFFFFF, 0x7FFFFFFF, 1 << 30, len(blob)]) | st.integers(0, 2**32 - 1))
        blob[i:i + 4] = struct.pack(">I", value)[: len(blob[i:i + 4])]
    elif kind == "splice":
        i = data.draw(st.integers(0, len(blob)))
        blob[i:i] = data.draw(st.binary(min_size=1, max_size=10))
    else:
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] = data.draw(st.integers(0, 255))
    _decode_or_decode_error(bytes(blob))
    _decode_or_decode_error(bytes(blob), max_bytes=64)


@given(sst.messages())
@settings(max_examples=50, deadline=None)
def test_truncations_and_trailing_bytes_are_rejected(msg):
    blob = codec.encode(msg)
    for cut in range(len(blob)):
        with pytest.raises(DecodeError):
            codec.decode(blob[:cut])
    with pytest.raises(DecodeError):
        codec.decode(blob + b"\x00")


def _valid():
    return codec.encode(m.SurvivorList(session_id=bytes(16), round=1, recipient=2, survivors=(1, 2, 3)))


@pytest.mark.parametrize("version", [0, 2, 255])
def test_unknown_version_is_rejected(version):
    blob = bytearray(_valid())
    blob[4] = version
    with pytest.raises(DecodeError, match="version"):
        codec.decode(bytes(blob))


@pytest.mark.parametrize("tag", [0, 10, 200, 255])
def test_unknown_tag_is_rejected(tag):
    blob = bytearray(_valid())
    blob[5] = tag
    with pytest.raises(DecodeError, match="tag"):
        codec.decode(bytes(blob))


def test_bad_magic_huge_counts_and_limits():
    with pytest.raises(DecodeError):
        codec.decode(b"XXXX" + _valid()[4:])
    header = codec.MAGIC + bytes((1, 6)) + struct.pack(">I", 16) + bytes(16) + struct.pack(">QI", 0, 0)
    with pytest.raises(DecodeError):
        codec.decode(header + struct.pack(">I", 0xFFFFFFFF))  # survivor count far past the end
    mi = codec.encode(m.MaskedInput(session_id=bytes(16), round=0, sender=0, vector=bytes(100)))
    assert codec.decode(mi).vector == bytes(100)
    with pytest.raises(DecodeError):
        codec.decode(mi, max_bytes=50)  # whole message over the limit
    with pytest.raises(DecodeError):
        codec.decode(mi, max_bytes=len(mi) - 1)
    for not_bytes in (None, "text", 5, [1, 2]):
        with pytest.raises(DecodeError):
            codec.decode(not_bytes)  # type: ignore[arg-type]


@pytest.mark.parametrize("tag, prefix", [
    (6, struct.pack(">I", 16) + bytes(16) + struct.pack(">QI", 0, 0)),  # SurvivorList: survivors
    (3, struct.pack(">I", 16) + bytes(16) + struct.pack(">QI", 0, 0)),  # EncryptedShares: ciphertexts
    (2, struct.pack(">I", 16) + bytes(16) + struct.pack(">QI", 0, 0)),  # KeyDirectory: peers
])
def test_a_list_longer_than_any_session_is_refused_before_it_is_read(tag, prefix):
    """Counts are bounded by MAX_ITEMS (one item per party of a session), not only by the bytes
    left: a message as long as MAX_ITEMS + 1 items would need is still refused."""
    count = codec.MAX_ITEMS + 1
    blob = codec.MAGIC + bytes((1, tag)) + prefix + struct.pack(">I", count) + bytes(8 * count)
    with pytest.raises(DecodeError, match="limit"):
        codec.decode(blob)
    ids = tuple(range(codec.MAX_ITEMS))  # the largest list decodes
    full = codec.encode(m.SurvivorList(session_id=bytes(16), round=0, recipient=0, survivors=ids))
    assert codec.decode(full).survivors == ids


def test_values_the_constructor_refuses_become_decode_errors():
    # unsorted survivor ids and a round above 2**63 - 1 are well-formed bytes but invalid messages
    body = struct.pack(">I", 16) + bytes(16) + struct.pack(">QI", 0, 0) + struct.pack(">III", 2, 5, 3)
    with pytest.raises(DecodeError, match="strictly increasing"):
        codec.decode(codec.MAGIC + bytes((1, 6)) + body)
    body = struct.pack(">I", 16) + bytes(16) + struct.pack(">QI", 2**63, 0) + struct.pack(">I", 0)
    with pytest.raises(DecodeError):
        codec.decode(codec.MAGIC + bytes((1, 6)) + body)


def test_deeply_nested_key_directories_raise_decode_error_not_recursion_error():
    """Regression: a KeyDirectory whose 'advert' is another KeyDirectory, nested a few thousand
    times (about 46 bytes a level), made the decoder recurse until RecursionError."""
    advert = codec.encode(m.AdvertiseKeys(session_id=bytes(16), round=0, sender=1,
                                          enc_public_key=bytes(32), mask_public_key=b"\x01" * 32))
    blob = advert
    for _ in range(3000):
        blob = (codec.MAGIC + bytes((1, 2)) + struct.pack(">I", 16) + bytes(16) + struct.pack(">QII", 0, 0, 1)
                + struct.pack(">I", len(blob)) + blob)
    with pytest.raises(DecodeError):
        codec.decode(blob)


def test_a_directory_may_only_hold_adverts():
    inner = codec.encode(m.SurvivorList(session_id=bytes(16), round=0, recipient=0, survivors=()))
    blob = (codec.MAGIC + bytes((1, 2)) + struct.pack(">I", 16) + bytes(16) + struct.pack(">QII", 0, 0, 1)
            + struct.pack(">I", len(inner)) + inner)
    with pytest.raises(DecodeError):
        codec.decode(blob)


def test_encode_refuses_non_messages():
    with pytest.raises(MessageError):
        codec.encode(object())  # type: ignore[arg-type]


@pytest.mark.parametrize("build", [
    lambda: m.AdvertiseKeys(session_id=bytes(15), round=0, sender=0, enc_public_key=bytes(32), mask_public_key=bytes(32)),
    lambda: m.AdvertiseKeys(session_id=bytes(16), round=-1, sender=0, enc_public_key=bytes(32), mask_public_key=bytes(32)),
    lambda: m.AdvertiseKeys(session_id=bytes(16), round=0, sender=2**32, enc_public_key=bytes(32), mask_public_key=bytes(32)),
    lambda: m.AdvertiseKeys(session_id=bytes(16), round=0, sender=True, enc_public_key=bytes(32), mask_public_key=bytes(32)),
    lambda: m.AdvertiseKeys(session_id=bytes(16), round=0, sender=0, enc_public_key=bytes(31), mask_public_key=bytes(32)),
    lambda: m.AdvertiseKeys(session_id=bytes(16), round=0, sender=0, enc_public_key=bytes(32), mask_public_key=bytes(32), signature=bytes(10)),
    lambda: m.SurvivorList(session_id=bytes(16), round=0, recipient=0, survivors=(1, 1)),
    lambda: m.SurvivorList(session_id=bytes(16), round=0, recipient=0, survivors=[1, 2]),
    lambda: m.UnmaskRequest(session_id=bytes(16), round=0, recipient=0, survivors=(), dropped=(), signatures=((1, bytes(3)),)),
    lambda: m.UnmaskResponse(session_id=bytes(16), round=0, sender=0, self_mask_shares=((1, bytes(66)),), mask_key_shares=((1, bytes(66)),)),
    lambda: m.EncryptedShares(session_id=bytes(16), round=0, sender=0, ciphertexts=((2, b"a"), (1, b"b"))),
    lambda: m.KeyDirectory(session_id=bytes(16), round=0, recipient=0, peers=("x",)),
])
def test_messages_validate_when_built(build):
    with pytest.raises(MessageError):
        build()
