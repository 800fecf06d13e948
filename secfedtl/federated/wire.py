"""The runtime's messages between a server and its client nodes, and their binary codec.

Everything a server says to a client (and back) in a federated round is one of four messages,
turned into bytes by :func:`encode` and back by :func:`decode`, so the same round runs over an
in-process pool, forked worker processes, or Flower:

* :class:`TaskRequest` (server -> client): do the named local ``task`` (``"train"``,
  ``"evaluate"``, ...) on the given global weights;
* :class:`TaskReply` (client -> server): ``"ready"`` (a contribution to the round's secure sum is
  waiting), ``"done"`` (a public result is in ``info``), ``"refused"`` (budget) or ``"failed"``;
* :class:`Join` (server -> client): join this round's secure aggregation as party ``index``
  under these public session parameters, with ``parties``: the long-term Ed25519 public key of
  the party at every session index, which each node checks against its pinned roster
  (:mod:`secfedtl.federated.roster`). Sessions are always authenticated: kind 3, the
  unauthenticated Join of earlier versions, is retired and refused;
* :class:`SecAggFrame` (both ways): one secure-aggregation message, as bytes of
  :mod:`secfedtl.secagg.codec`.

Wire format (version 1)::

    MAGIC "SFTR" | version u8 | kind u8 | header length u32 | header | payload length u64 | payload

The header is canonical JSON (sorted keys, compact, UTF-8) of the message's plain fields; the
payload is raw bytes (the float64 little-endian weights of a task, a Join's party keys, 32
bytes each in index order, or a secure-aggregation frame). Unknown versions or kinds, malformed headers, wrong field types, trailing bytes and
messages over ``max_bytes`` raise :class:`~secfedtl.errors.DecodeError` and nothing else.
Requests are canonical: the same request always encodes to the same bytes, which is what lets
a client bind a digest of the request it received into the secure aggregation
(:func:`request_digest`).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np

from secfedtl.errors import ConfigError, DecodeError, InputError
from secfedtl.secagg.config import SecAggConfig
from secfedtl.secagg.session import SessionParams

MAGIC = b"SFTR"
WIRE_VERSION = 1
DEFAULT_MAX_BYTES = 1 << 30
MAX_HEADER_BYTES = 1 << 16
STATUSES = ("ready", "done", "refused", "failed")
_PREFIX = struct.Struct(">4sBBI")
_PAYLOAD_LEN = struct.Struct(">Q")


def _check_json(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise InputError(f"{what} must be a mapping")
    try:
        text = json.dumps(dict(value), sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what} must be JSON with finite numbers: {exc}") from exc
    result: dict[str, Any] = json.loads(text)
    return result


def _check_round(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32:
        raise InputError(f"round must be an integer in [0, 2**32), got {value!r}")


@dataclass(frozen=True, kw_only=True)
class TaskRequest:
    """Server -> client: run ``task`` on ``params`` (float64 little-endian bytes)."""

    round: int
    task: str
    options: Mapping[str, Any] = field(default_factory=dict)
    params: bytes = b""

    def __post_init__(self) -> None:
        _check_round(self.round)
        if not isinstance(self.task, str) or not self.task.isidentifier() or len(self.task) > 64:
            raise InputError(f"task must be an identifier of at most 64 characters, got {self.task!r}")
        object.__setattr__(self, "options", _check_json(self.options, "options"))
        if not isinstance(self.params, bytes) or len(self.params) % 8:
            raise InputError("params must be bytes of float64 values")

    @classmethod
    def with_weights(cls, *, round: int, task: str, weights: np.ndarray,
                     options: Mapping[str, Any] | None = None) -> TaskRequest:
        vector = np.asarray(weights, dtype=np.float64)
        if vector.ndim != 1 or not np.all(np.isfinite(vector)):
            raise InputError("weights must be a finite 1-D vector")
        return cls(round=round, task=task, options=dict(options or {}),
                   params=np.ascontiguousarray(vector, dtype="<f8").tobytes())

    def weights(self) -> np.ndarray:
        """The global weights as a float64 vector (finite: refused otherwise)."""
        vector = np.frombuffer(self.params, dtype="<f8").astype(np.float64)
        if not np.all(np.isfinite(vector)):
            raise InputError("the weights of a task request must be finite")
        return vector


@dataclass(frozen=True, kw_only=True)
class TaskReply:
    """Client -> server: the outcome of a task. ``info`` is public (it is sent in clear)."""

    round: int
    status: str
    info: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_round(self.round)
        if self.status not in STATUSES:
            raise InputError(f"status must be one of {STATUSES}, got {self.status!r}")
        object.__setattr__(self, "info", _check_json(self.info, "info"))


@dataclass(frozen=True, kw_only=True)
class Join:
    """Server -> client: take part in this round's (authenticated) secure aggregation as party
    ``index``; ``parties[i]`` is the Ed25519 public key of party ``i`` (distinct keys)."""

    round: int
    index: int
    session: SessionParams
    parties: tuple[bytes, ...]

    def __post_init__(self) -> None:
        _check_round(self.round)
        if not isinstance(self.session, SessionParams):
            raise InputError("session must be SessionParams")
        if self.session.round != self.round:
            raise InputError("the session's round is not the message's round")
        if not self.session.config.authenticated:
            raise InputError("a Join must be for an authenticated session")
        n = self.session.config.num_clients
        if isinstance(self.index, bool) or not isinstance(self.index, int) or not 0 <= self.index < n:
            raise InputError(f"index must be in [0, {n}), got {self.index!r}")
        if not isinstance(self.parties, tuple) or len(self.parties) != n or \
                not all(isinstance(p, bytes) and len(p) == PUBLIC_KEY_BYTES for p in self.parties):
            raise InputError(f"parties must be {n} Ed25519 public keys of {PUBLIC_KEY_BYTES} bytes")
        if len(set(self.parties)) != n:
            raise InputError("parties must be distinct keys")


@dataclass(frozen=True, kw_only=True)
class SecAggFrame:
    """One secure-aggregation message (bytes of :mod:`secfedtl.secagg.codec`), either way."""

    round: int
    data: bytes

    def __post_init__(self) -> None:
        _check_round(self.round)
        if not isinstance(self.data, bytes) or not self.data:
            raise InputError("data must be non-empty bytes")


Message = Union[TaskRequest, TaskReply, Join, SecAggFrame]
_KIND = {TaskRequest: 1, TaskReply: 2, Join: 5, SecAggFrame: 4}
_CLASS = {v: k for k, v in _KIND.items()}
_RETIRED = {3: "kind 3 (the unauthenticated Join) is retired: sessions are authenticated"}
PUBLIC_KEY_BYTES = 32
#: The session config as it travels: wire key -> :class:`SecAggConfig` attribute. The key
#: ``"neighbors"`` is older than the attribute's spelling (``neighbours``) and stays, so the wire
#: format is unchanged.
_CONFIG_FIELDS = {"num_clients": "num_clients", "threshold": "threshold", "neighbors": "neighbours", "clip": "clip",
                  "bits": "bits", "scale": "scale", "max_weight": "max_weight", "min_survivors": "min_survivors",
                  "authenticated": "authenticated"}


def _session_header(session: SessionParams) -> dict[str, Any]:
    cfg = session.config
    fields = {key: getattr(cfg, attribute) for key, attribute in _CONFIG_FIELDS.items()}
    fields["scale"] = cfg.encoding.scale  # explicit, so both sides encode alike
    return {"config": fields,
            "session_id": session.session_id.hex(), "vector_length": session.vector_length,
            "context": session.context.hex()}


def _session_from_header(round: int, data: Any) -> SessionParams:
    if not isinstance(data, dict) or set(data) != {"config", "session_id", "vector_length", "context"}:
        raise DecodeError("malformed session parameters")
    cfg = data["config"]
    if not isinstance(cfg, dict) or set(cfg) != set(_CONFIG_FIELDS):
        raise DecodeError("malformed secure-aggregation config")
    if cfg["authenticated"] is not True:
        raise DecodeError("unauthenticated sessions are not carried by this runtime")
    for name in ("clip", "scale"):
        if not isinstance(cfg[name], (int, float)) or isinstance(cfg[name], bool):
            raise DecodeError(f"config {name} must be a number")
    try:
        values = {**cfg, "clip": float(cfg["clip"]), "scale": float(cfg["scale"])}
        config = SecAggConfig(**{_CONFIG_FIELDS[key]: value for key, value in values.items()})
        return SessionParams(config=config, session_id=bytes.fromhex(data["session_id"]), round=round,
                             vector_length=data["vector_length"], context=bytes.fromhex(data["context"]))
    except (ConfigError, ValueError, TypeError) as exc:
        raise DecodeError(f"invalid session parameters: {exc}") from exc


def _parties_from_payload(payload: bytes) -> tuple[bytes, ...]:
    if len(payload) % PUBLIC_KEY_BYTES:
        raise DecodeError(f"a Join's payload must be {PUBLIC_KEY_BYTES}-byte public keys")
    return tuple(payload[i:i + PUBLIC_KEY_BYTES] for i in range(0, len(payload), PUBLIC_KEY_BYTES))


def encode(message: Message) -> bytes:
    """The message as bytes (see the module docstring)."""
    kind = _KIND.get(type(message))
    if kind is None:
        raise InputError(f"not a runtime message: {type(message).__name__}")
    payload = b""
    if isinstance(message, TaskRequest):
        header: dict[str, Any] = {"round": message.round, "task": message.task, "options": message.options}
        payload = message.params
    elif isinstance(message, TaskReply):
        header = {"round": message.round, "status": message.status, "info": message.info}
    elif isinstance(message, Join):
        header = {"round": message.round, "index": message.index, "session": _session_header(message.session)}
        payload = b"".join(message.parties)
    else:
        header = {"round": message.round}
        payload = message.data
    head = json.dumps(header, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    if len(head) > MAX_HEADER_BYTES:
        raise InputError("message header too large")
    return _PREFIX.pack(MAGIC, WIRE_VERSION, kind, len(head)) + head + _PAYLOAD_LEN.pack(len(payload)) + payload


def _no_floats_but_finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("non-finite number")
    return value


def decode(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Message:
    """Parse bytes from :func:`encode`; anything else raises :class:`DecodeError`."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError("expected bytes")
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    if size > max_bytes:  # before copying anything
        raise DecodeError(f"message of {size} bytes is over the limit of {max_bytes}")
    data = bytes(data)
    if len(data) < _PREFIX.size:
        raise DecodeError("message too short")
    magic, version, kind, head_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise DecodeError("not a secfedtl runtime message (bad magic)")
    if version != WIRE_VERSION:
        raise DecodeError(f"unknown runtime wire version {version}")
    cls = _CLASS.get(kind)
    if kind in _RETIRED:
        raise DecodeError(_RETIRED[kind])
    if cls is None:
        raise DecodeError(f"unknown message kind {kind}")
    if head_len > MAX_HEADER_BYTES:
        raise DecodeError("header too large")
    pos = _PREFIX.size
    head_bytes = data[pos:pos + head_len]
    pos += head_len
    if len(head_bytes) != head_len or len(data) < pos + _PAYLOAD_LEN.size:
        raise DecodeError("message truncated")
    (payload_len,) = _PAYLOAD_LEN.unpack_from(data, pos)
    pos += _PAYLOAD_LEN.size
    if len(data) - pos != payload_len:
        raise DecodeError("payload length does not match (truncated or trailing bytes)")
    payload = data[pos:]
    try:
        header = json.loads(head_bytes.decode("utf-8"), parse_constant=_reject_constant,
                            parse_float=lambda s: _no_floats_but_finite(float(s)))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise DecodeError(f"malformed header: {exc}") from exc
    if not isinstance(header, dict):
        raise DecodeError("header is not an object")
    expected = {TaskRequest: {"round", "task", "options"}, TaskReply: {"round", "status", "info"},
                Join: {"round", "index", "session"}, SecAggFrame: {"round"}}[cls]
    if set(header) != expected:
        raise DecodeError(f"{cls.__name__} header has fields {sorted(header)}, expected {sorted(expected)}")
    if cls is TaskReply and payload:
        raise DecodeError(f"{cls.__name__} carries no payload")
    try:
        if cls is TaskRequest:
            message: Message = TaskRequest(round=header["round"], task=header["task"], options=header["options"],
                                           params=payload)
        elif cls is TaskReply:
            message = TaskReply(round=header["round"], status=header["status"], info=header["info"])
        elif cls is Join:
            _check_round(header["round"])
            session = _session_from_header(header["round"], header["session"])
            message = Join(round=header["round"], index=header["index"], session=session,
                           parties=_parties_from_payload(payload))
        else:
            message = SecAggFrame(round=header["round"], data=payload)
    except (InputError, ConfigError, TypeError) as exc:
        raise DecodeError(f"invalid {cls.__name__}: {exc}") from exc
    if encode(message) != data:
        raise DecodeError("message is not in canonical form")
    return message


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def request_digest(request: TaskRequest) -> str:
    """SHA-256 (hex) of the request's canonical bytes. Every client of a round computes it over
    the request it received and binds it into the secure aggregation, so clients shown
    different models (or options) cannot complete a round together (a pre-keyed step binds it
    into its pairwise masks: such clients get a sum that stays masked; :func:`step_context`)."""
    return hashlib.sha256(b"secfedtl/task-request/v1\0" + encode(request)).hexdigest()


def step_context(request: TaskRequest) -> bytes:
    """The context a *pre-keyed* step session is bound to (docs/protocol.md, "Pre-keyed steps"):
    SHA-256 of the step's request with its weights left out (round, task and options), since the
    session's keys are set up before the weights of that step exist. Every hospital compares it
    with the request it is then sent, before it runs anything."""
    blank = TaskRequest(round=request.round, task=request.task, options=request.options)
    return hashlib.sha256(b"secfedtl/pre-keyed-step/v1\0" + encode(blank)).digest()
