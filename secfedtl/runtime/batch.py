"""Batches: several wire messages for (or from) named clients in one byte string.

What a worker pipe (:class:`~secfedtl.runtime.pool.ProcessPool`), a node agent's socket
(:mod:`secfedtl.runtime.agent`) and a Flower message (:mod:`secfedtl.runtime.flower`) carry::

    MAGIC "SFTB" | sequence u64 | count u32 | count x (name length u16 | name | blob length u64 | blob)

The sequence number pairs an answer with its request (a late answer to an exchange that timed
out is dropped). :func:`unpack_batch` raises only :class:`~secfedtl.errors.DecodeError`, and refuses a
count that cannot fit in the bytes given before it reads any item.
Light on purpose (no numpy, no torch): Flower starts a process per message that imports this.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from secfedtl.errors import DecodeError

_BATCH_MAGIC = b"SFTB"
_HEAD = struct.Struct(">4sQI")
_NAME = struct.Struct(">H")
_BLOB = struct.Struct(">Q")


def pack_batch(seq: int, items: Sequence[tuple[str, bytes]]) -> bytes:
    parts = [_HEAD.pack(_BATCH_MAGIC, seq, len(items))]
    for name, blob in items:
        raw = name.encode()
        parts += [_NAME.pack(len(raw)), raw, _BLOB.pack(len(blob)), blob]
    return b"".join(parts)


def unpack_batch(data: bytes) -> tuple[int, list[tuple[str, bytes]]]:
    try:
        magic, seq, count = _HEAD.unpack_from(data)
        if magic != _BATCH_MAGIC:
            raise DecodeError("not a secfedtl batch")
        pos, items = _HEAD.size, []
        if count * (_NAME.size + _BLOB.size) > len(data) - pos:  # checked before reading any item
            raise DecodeError(f"a batch of {count} items cannot fit in {len(data)} bytes")
        for _ in range(count):
            (n,) = _NAME.unpack_from(data, pos)
            name = data[pos + 2:pos + 2 + n].decode()
            pos += 2 + n
            (size,) = _BLOB.unpack_from(data, pos)
            pos += _BLOB.size
            blob = data[pos:pos + size]
            if len(blob) != size:
                raise DecodeError("batch truncated")
            pos += size
            items.append((name, blob))
    except (struct.error, UnicodeDecodeError) as exc:
        raise DecodeError(f"malformed batch: {exc}") from exc
    if pos != len(data):
        raise DecodeError("trailing bytes after a batch")
    return seq, items


__all__ = ["pack_batch", "unpack_batch"]
