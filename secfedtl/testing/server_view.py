"""What a server receives, field by field: a harness for checking that nothing a data holder
sends is unaccounted (docs/privacy.md, "What leaves a hospital").

:func:`classify` takes one client-to-server message (bytes of :mod:`secfedtl.federated.wire`) and
says what each of its fields is: a masked payload, protocol key material, or a status from a
fixed, data-free set. Anything else raises :class:`AssertionError`: a message that carried a
value computed from private data in the clear would fail here. The suite runs it over every byte
the server receives in whole jobs (in process, worker processes, Flower); use it the same way
for your own jobs. Record a Flower server's view with the run-config key ``record-view = true``
(it writes ``server_view.jsonl`` in the server's output folder; :func:`read_recorded_view`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from secfedtl.federated import wire
from secfedtl.secagg import codec
from secfedtl.secagg import messages as m

__all__ = ["ALLOWED_REPLIES", "classify", "read_recorded_view"]

#: Every task-reply body a node may send: a status and a reason from a fixed, data-free set.
#: (``refused``/``policy``: a distributed-noise step whose announced cohort is below the node's own
#: ``min_survivors``, a comparison of two public numbers.)
ALLOWED_REPLIES = frozenset({("ready", ()), ("done", ()), ("refused", (("reason", "budget"),)),
                             ("refused", (("reason", "policy"),)),
                             ("failed", (("reason", "failed"),)), ("failed", (("reason", "unknown task"),))})


def classify(blob: bytes) -> tuple[str, Any]:
    """``(kind, content)`` of one client-to-server message; kind is ``"status"``, ``"keys"``,
    ``"boxes"`` (AEAD ciphertexts for other clients), ``"masked"`` (the masked payload),
    ``"signature"`` or ``"unmask"`` (shares of protocol seeds). Raises AssertionError for
    anything else."""
    msg = wire.decode(blob)
    if isinstance(msg, wire.TaskReply):
        body = (msg.status, tuple(sorted(msg.info.items())))
        if msg.status == "ready" and set(msg.info) == {"digest"}:
            # a pre-keyed step echoes the digest of the server's own request: 64 hex characters
            digest = msg.info["digest"]
            assert isinstance(digest, str) and len(digest) == 64 and set(digest) <= set("0123456789abcdef"), body
            return "status", body
        assert body in ALLOWED_REPLIES, f"a reply carries {body}"
        return "status", body
    assert isinstance(msg, wire.SecAggFrame), f"a client sent a {type(msg).__name__}"
    inner = codec.decode(msg.data)
    if isinstance(inner, m.AdvertiseKeys):
        return "keys", (inner.enc_public_key, inner.mask_public_key, inner.signature)
    if isinstance(inner, m.EncryptedShares):
        return "boxes", inner.ciphertexts
    if isinstance(inner, m.MaskedInput):
        return "masked", inner.vector
    if isinstance(inner, m.ConsistencyResponse):
        return "signature", inner.signature
    if isinstance(inner, m.UnmaskResponse):
        return "unmask", (inner.self_mask_shares, inner.mask_key_shares)
    raise AssertionError(f"a client sent a {type(inner).__name__}")


def read_recorded_view(path: str | Path) -> list[tuple[str, str, bytes]]:
    """``(phase, node, bytes)`` of every message a Flower server recorded (``record-view``)."""
    out: list[tuple[str, str, bytes]] = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        out.extend((row["phase"], row["node"], bytes.fromhex(b)) for b in row["blobs"])
    return out
