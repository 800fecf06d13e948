"""The one wire codec for protocol messages: no pickle, no import-by-name.

Layout: ``MAGIC (4) | version (1) | type tag (1) | fields``. Field encodings are fixed per
message type (``_SCHEMAS``), big-endian:

* ``u32``/``u64``: 4/8 bytes;
* ``bytes``: u32 length, then the bytes;
* ``ids``: u32 count, then count u32 ids;
* ``pairs``: u32 count, then per pair a u32 id and a ``bytes`` field;
* ``adverts``: u32 count, then per element a ``bytes`` field holding an encoded AdvertiseKeys.

Tags and fields are never reused or removed; a new meaning gets a new tag. The decoder rejects,
with :class:`~secfedtl.errors.DecodeError` only: a wrong magic, an unknown version or tag, a length
or count that exceeds what remains or the caller's ``max_bytes``, a count above ``MAX_ITEMS``
(every list is of parties of one session, so never longer than
:data:`~secfedtl.secagg.config.MAX_CLIENTS`), trailing bytes, and any value the message
constructor refuses.

Work and memory are bounded before anything is allocated: a count is checked against
``MAX_ITEMS`` and against the bytes left (each item takes at least its fixed-size part), and
a length against the bytes left and ``max_bytes``; so a message builds at most ``MAX_ITEMS``
objects per list and copies each input byte a bounded number of times.
"""

from __future__ import annotations

import struct
from dataclasses import fields

from secfedtl.errors import DecodeError, MessageError
from secfedtl.secagg import messages as m
from secfedtl.secagg.config import MAX_CLIENTS

MAGIC = b"SFTL"
WIRE_VERSION = 1
DEFAULT_MAX_BYTES = 1 << 30
#: The longest list (of ids, pairs or adverts) a message may carry: one item per party.
MAX_ITEMS = MAX_CLIENTS

_TAGS: dict[int, type] = {
    1: m.AdvertiseKeys,
    2: m.KeyDirectory,
    3: m.EncryptedShares,
    4: m.ShareDelivery,
    5: m.MaskedInput,
    6: m.SurvivorList,
    7: m.ConsistencyResponse,
    8: m.UnmaskRequest,
    9: m.UnmaskResponse,
}
_TAG_OF = {cls: tag for tag, cls in _TAGS.items()}
_KINDS = {
    "session_id": "bytes", "round": "u64", "sender": "u32", "recipient": "u32",
    "enc_public_key": "bytes", "mask_public_key": "bytes", "signature": "bytes", "vector": "bytes",
    "peers": "adverts", "ciphertexts": "pairs", "signatures": "pairs", "self_mask_shares": "pairs",
    "mask_key_shares": "pairs", "survivors": "ids", "dropped": "ids",
}
_SCHEMAS = {cls: tuple((f.name, _KINDS[f.name]) for f in fields(cls)) for cls in _TAGS.values()}
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


def encode(message: m.Message) -> bytes:
    """Bytes of ``message``."""
    cls = type(message)
    if cls not in _TAG_OF:
        raise MessageError(f"not a protocol message: {cls.__name__}")
    out = [MAGIC, bytes((WIRE_VERSION, _TAG_OF[cls]))]
    for name, kind in _SCHEMAS[cls]:
        value = getattr(message, name)
        if kind == "u32":
            out.append(_U32.pack(value))
        elif kind == "u64":
            out.append(_U64.pack(value))
        elif kind == "bytes":
            out += (_U32.pack(len(value)), value)
        elif kind == "ids":
            out.append(_U32.pack(len(value)))
            out += [_U32.pack(v) for v in value]
        elif kind == "pairs":
            out.append(_U32.pack(len(value)))
            for ident, blob in value:
                out += (_U32.pack(ident), _U32.pack(len(blob)), blob)
        else:  # adverts
            out.append(_U32.pack(len(value)))
            for advert in value:
                blob = encode(advert)
                out += (_U32.pack(len(blob)), blob)
    return b"".join(out)


class _Reader:
    __slots__ = ("data", "pos", "max_bytes")

    def __init__(self, data: memoryview, max_bytes: int) -> None:
        self.data, self.pos, self.max_bytes = data, 0, max_bytes

    def take(self, n: int) -> memoryview:
        if n > len(self.data) - self.pos:
            raise DecodeError(f"length {n} exceeds the {len(self.data) - self.pos} bytes left")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def u32(self) -> int:
        return _U32.unpack(self.take(4))[0]

    def u64(self) -> int:
        return _U64.unpack(self.take(8))[0]

    def blob(self) -> bytes:
        n = self.u32()
        if n > self.max_bytes:
            raise DecodeError(f"field of {n} bytes exceeds the limit of {self.max_bytes}")
        return bytes(self.take(n))

    def count(self, min_item_bytes: int) -> int:
        n = self.u32()
        if n > MAX_ITEMS:
            raise DecodeError(f"count {n} exceeds the limit of {MAX_ITEMS} items")
        if n * min_item_bytes > len(self.data) - self.pos:
            raise DecodeError(f"count {n} cannot fit in the bytes left")
        return n


def decode(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> m.Message:
    """The message encoded in ``data``; raises only :class:`DecodeError` on bad input."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError("messages are bytes")
    if len(data) > max_bytes:
        raise DecodeError(f"message of {len(data)} bytes exceeds the limit of {max_bytes}")
    reader = _Reader(memoryview(bytes(data)), max_bytes)
    message = _decode_one(reader)
    if reader.pos != len(reader.data):
        raise DecodeError(f"{len(reader.data) - reader.pos} trailing bytes")
    return message


def _decode_one(reader: _Reader, only: type | None = None) -> m.Message:
    if bytes(reader.take(4)) != MAGIC:
        raise DecodeError("not a secfedtl message (bad magic)")
    version, tag = reader.take(2)
    if version != WIRE_VERSION:
        raise DecodeError(f"unknown wire version {version}")
    cls = _TAGS.get(tag)
    if cls is None:
        raise DecodeError(f"unknown message type tag {tag}")
    if only is not None and cls is not only:  # checked before decoding: no unbounded nesting
        raise DecodeError(f"expected {only.__name__}, found {cls.__name__}")
    values: dict[str, object] = {}
    for name, kind in _SCHEMAS[cls]:
        if kind == "u32":
            values[name] = reader.u32()
        elif kind == "u64":
            values[name] = reader.u64()
        elif kind == "bytes":
            values[name] = reader.blob()
        elif kind == "ids":
            values[name] = tuple(reader.u32() for _ in range(reader.count(4)))
        elif kind == "pairs":
            values[name] = tuple((reader.u32(), reader.blob()) for _ in range(reader.count(8)))
        else:
            adverts = []
            for _ in range(reader.count(4)):
                inner = _Reader(memoryview(reader.blob()), reader.max_bytes)
                advert = _decode_one(inner, m.AdvertiseKeys)
                if not isinstance(advert, m.AdvertiseKeys) or inner.pos != len(inner.data):
                    raise DecodeError("peers must hold exactly one AdvertiseKeys each")
                adverts.append(advert)
            values[name] = tuple(adverts)
    try:
        return cls(**values)
    except MessageError as exc:
        raise DecodeError(f"invalid {cls.__name__}: {exc}") from exc
