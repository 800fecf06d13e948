"""The runtime wire codec: round trips, canonical form, and only DecodeError for bad bytes."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secfedtl.errors import DecodeError, InputError
from secfedtl.runtime import wire
from secfedtl.secagg.config import SecAggConfig
from secfedtl.secagg.session import SessionParams


def session(round: int = 3, authenticated: bool = True) -> SessionParams:
    cfg = SecAggConfig(num_clients=5, threshold=3, neighbours=4, clip=0.5, bits=32, max_weight=100,
                       authenticated=authenticated)
    return SessionParams(config=cfg, session_id=os.urandom(16), round=round, vector_length=11, context=os.urandom(32))


PARTIES = tuple(os.urandom(32) for _ in range(5))


MESSAGES = [
    wire.TaskRequest.with_weights(round=3, task="train", weights=np.linspace(-1, 1, 10),
                                  options={"names": ["head.weight"], "encoding": {"clip": 0.5}}),
    wire.TaskRequest(round=0, task="evaluate"),
    wire.TaskReply(round=3, status="ready", info={"train_seconds": 0.25}),
    wire.TaskReply(round=3, status="refused", info={"reason": "budget"}),
    wire.Join(round=3, index=4, session=session(), parties=PARTIES),
    wire.SecAggFrame(round=3, data=b"\x01\x02\x03"),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(message):
    blob = wire.encode(message)
    back = wire.decode(blob)
    assert wire.encode(back) == blob
    if isinstance(message, wire.Join):
        for name in ("num_clients", "threshold", "neighbours", "clip", "bits", "max_weight", "min_survivors"):
            assert getattr(back.session.config, name) == getattr(message.session.config, name)
        assert back.session.session_id == message.session.session_id
        assert back.session.config.encoding.scale == message.session.config.encoding.scale
        assert back.session.config.authenticated and back.parties == message.parties and back.index == message.index
    else:
        assert back == message


def test_the_session_config_keeps_its_wire_keys():
    """The config travels under its original keys (``neighbors`` included, though the attribute is
    now spelt ``neighbours``), so renaming an attribute never changes the wire format."""
    import json

    blob = wire.encode(MESSAGES[4])
    _, _, _, head_len = wire._PREFIX.unpack_from(blob)  # noqa: SLF001
    header = json.loads(blob[wire._PREFIX.size:wire._PREFIX.size + head_len])  # noqa: SLF001
    config = header["session"]["config"]
    assert set(config) == {"num_clients", "threshold", "neighbors", "clip", "bits", "scale", "max_weight",
                           "min_survivors", "authenticated"}
    assert config["neighbors"] == 4 == wire.decode(blob).session.config.neighbours


def test_requests_are_canonical_and_the_digest_sees_every_field():
    a = wire.TaskRequest.with_weights(round=1, task="train", weights=np.ones(4), options={"b": 1, "a": 2})
    b = wire.TaskRequest.with_weights(round=1, task="train", weights=np.ones(4), options={"a": 2, "b": 1})
    assert wire.encode(a) == wire.encode(b) and wire.request_digest(a) == wire.request_digest(b)
    for other in (wire.TaskRequest.with_weights(round=2, task="train", weights=np.ones(4), options={"a": 2, "b": 1}),
                  wire.TaskRequest.with_weights(round=1, task="train", weights=np.r_[np.ones(3), 1.0 + 1e-12],
                                                options={"a": 2, "b": 1}),
                  wire.TaskRequest.with_weights(round=1, task="train", weights=np.ones(4), options={"a": 2, "b": 2})):
        assert wire.request_digest(other) != wire.request_digest(a)


@pytest.mark.parametrize("build", [
    lambda: wire.TaskRequest(round=-1, task="train"),
    lambda: wire.TaskRequest(round=0, task="not a name"),
    lambda: wire.TaskRequest(round=0, task="train", params=b"\0" * 7),
    lambda: wire.TaskRequest(round=0, task="train", options={"x": float("nan")}),
    lambda: wire.TaskRequest.with_weights(round=0, task="train", weights=np.array([1.0, np.inf])),
    lambda: wire.TaskReply(round=0, status="maybe"),
    lambda: wire.Join(round=2, index=0, session=session(round=3), parties=PARTIES),
    lambda: wire.Join(round=3, index=5, session=session(), parties=PARTIES),
    lambda: wire.Join(round=3, index=0, session=session(authenticated=False), parties=PARTIES),
    lambda: wire.Join(round=3, index=0, session=session(), parties=PARTIES[:4]),
    lambda: wire.Join(round=3, index=0, session=session(), parties=(PARTIES[0],) * 5),
    lambda: wire.Join(round=3, index=0, session=session(), parties=PARTIES[:4] + (b"short",)),
    lambda: wire.SecAggFrame(round=0, data=b""),
])
def test_invalid_messages_are_refused_when_built(build):
    with pytest.raises(InputError):
        build()


def test_non_finite_weights_in_a_received_request_are_refused():
    blob = bytearray(wire.encode(MESSAGES[0]))
    blob[-8:] = np.array([np.nan]).astype("<f8").tobytes()
    request = wire.decode(bytes(blob))
    with pytest.raises(InputError):
        request.weights()


@pytest.mark.parametrize("mutate", [
    lambda b: b[:-1],                                # truncated
    lambda b: b + b"\0",                             # trailing byte
    lambda b: b"XXXX" + b[4:],                       # magic
    lambda b: b[:4] + bytes([9]) + b[5:],            # version
    lambda b: b[:5] + bytes([77]) + b[6:],           # kind
    lambda b: b.replace(b'"round":3', b'"round":3.0', 1),  # not canonical / wrong type
    lambda b: b.replace(b'"round":3', b'"round":4', 1),    # join: session round disagrees
])
def test_bad_bytes_raise_decode_error(mutate):
    for message in MESSAGES:
        blob = mutate(wire.encode(message))
        try:
            wire.decode(blob)
        except DecodeError:
            continue
        # a mutation that happens to leave a valid message must at least re-encode identically
        assert wire.encode(wire.decode(blob)) == blob


def test_unauthenticated_and_retired_joins_are_refused():
    blob = wire.encode(MESSAGES[4])
    unauthenticated = blob.replace(b'"authenticated":true', b'"authenticated":false', 1)
    with pytest.raises(DecodeError, match="unauthenticated"):
        wire.decode(fix_length(unauthenticated))
    with pytest.raises(DecodeError, match="retired"):
        wire.decode(blob[:5] + bytes([3]) + blob[6:])  # the old kind of Join


def fix_length(blob: bytes) -> bytes:
    head_len = int.from_bytes(blob[6:10], "big") + len(b"false") - len(b"true")
    return blob[:6] + head_len.to_bytes(4, "big") + blob[10:]


def test_size_limit():
    blob = wire.encode(MESSAGES[0])
    with pytest.raises(DecodeError, match="over the limit"):
        wire.decode(blob, max_bytes=len(blob) - 1)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(0, len(MESSAGES) - 1), st.integers(0, 400))
def test_fuzz_only_decode_error(noise, which, cut):
    blob = wire.encode(MESSAGES[which])
    for data in (noise, blob[:cut] + noise, noise + blob[cut:]):
        try:
            wire.decode(data)
        except DecodeError:
            pass


def test_a_join_for_thousands_of_parties_fits_the_header_limit():
    n = 2000  # the party keys travel in the payload, 32 bytes each, not in the JSON header
    cfg = SecAggConfig(num_clients=n, threshold=31, neighbours=40, authenticated=True)
    params = SessionParams(config=cfg, session_id=os.urandom(16), round=1, vector_length=3)
    join = wire.Join(round=1, index=n - 1, session=params, parties=tuple(os.urandom(32) for _ in range(n)))
    back = wire.decode(wire.encode(join))
    assert back.parties == join.parties and back.index == n - 1
    blob = wire.encode(join)
    with pytest.raises(DecodeError):  # one key short of the session's size
        wire.decode(blob[:-32].replace((32 * n).to_bytes(8, "big"), (32 * (n - 1)).to_bytes(8, "big")))
