"""Shared helpers for the red-team scripts (seeded heart jobs, wire and ledger recording)."""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

from secfedtl.federated import wire  # noqa: E402
from secfedtl.jobs.heart import HeartConfig  # noqa: E402


def seeded(*, distributed: bool, rounds: int = 2, ema: float | None = None, l2sp: float | None = None,
           job_id: str | None = "rt", prekeyed: bool | None = None, epochs: int | None = None) -> HeartConfig:
    data = HeartConfig.load(None).to_dict()
    data["job"]["rounds"] = rounds
    data["job"]["id"] = job_id or ""
    data["model"]["source_epochs"] = 40
    data["privacy"].update(personalise=False, secure_mode=False, insecure_reproducible=True)
    if distributed:
        data["privacy"]["noise"] = "distributed"
        if epochs is not None:
            data["training"]["epochs"] = epochs
    if ema is not None:
        data["server"]["ema"] = ema
    if l2sp is not None:
        data["training"]["l2sp"] = l2sp
    if prekeyed is not None:
        data["secagg"]["prekeyed"] = prekeyed
    return HeartConfig.from_mapping(data)


def record_wire(job: Any) -> list[tuple[str, str, Any]]:
    """Every server->node request and node->server reply, decoded; random per-run parts dropped
    (party keys in Joins, secagg frames whose content is keyed by per-run randomness)."""
    log: list[tuple[str, str, Any]] = []
    real = job.federation.pool.exchange

    def view(blob: bytes) -> Any:
        msg = wire.decode(blob)
        if isinstance(msg, wire.TaskRequest):
            return ("request", msg.round, msg.task, wire.request_digest(msg),
                    json.dumps({k: v for k, v in msg.options.items()}, sort_keys=True, default=str))
        if isinstance(msg, wire.TaskReply):
            return ("reply", msg.status, json.dumps(msg.info, sort_keys=True, default=str))
        if isinstance(msg, wire.Join):
            ses = msg.session
            return ("join", msg.index, repr(ses.config), ses.round, ses.vector_length)
        return ("frame", type(msg).__name__)

    def exchange(requests: dict[str, list[bytes]], *, phase: str) -> dict[str, list[bytes]]:
        for n in sorted(requests):
            log.append((phase, n, [view(b) for b in requests[n]]))
        replies = real(requests, phase=phase)
        for n in sorted(replies):
            log.append((phase + "<-", n, [view(b) for b in replies[n]]))
        return replies

    job.federation.pool.exchange = exchange
    return log


VOLATILE = {"time", "timestamp", "prev_hash", "hash", "entry_hash", "wall", "created", "entry_id", "line_hash"}


def ledger(state: Path, name: str, drop: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (state / name / "ledger.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in VOLATILE and k not in drop} for r in rows]


def diff_paths(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                out.append(f"{path}/{k}: only in {'b' if k not in a else 'a'}")
            else:
                out += diff_paths(a[k], b[k], f"{path}/{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} != {len(b)}"]
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            out += diff_paths(x, y, f"{path}[{i}]")
        return out
    return [] if a == b else [f"{path}: {a!r} != {b!r}"[:300]]


def record_client_outputs(monkeypatch_target: Any = None) -> tuple[dict[str, list[Any]], Any]:
    """Patch PrivateClient.train_round / distributed_share to record each hospital's output
    before masking (what it would send if there were no secure aggregation). Returns (log, undo)."""
    from secfedtl.training import client as cmod

    log: dict[str, list[Any]] = {}
    real_train, real_share = cmod.PrivateClient.train_round, cmod.PrivateClient.distributed_share

    def train_round(self, **kw):
        out = real_train(self, **kw)
        log.setdefault(self.client_id, []).append(("train", kw["round"], _as_np(out)))
        return out

    def distributed_share(self, **kw):
        out = real_share(self, **kw)
        log.setdefault(self.client_id, []).append(("share", kw["round"], _as_np(out)))
        return out

    cmod.PrivateClient.train_round, cmod.PrivateClient.distributed_share = train_round, distributed_share

    def undo():
        cmod.PrivateClient.train_round, cmod.PrivateClient.distributed_share = real_train, real_share

    return log, undo


def _as_np(out: Any) -> Any:
    if isinstance(out, np.ndarray):
        return out.copy()
    if hasattr(out, "__dataclass_fields__"):
        return {k: _as_np(getattr(out, k)) for k in out.__dataclass_fields__}
    if isinstance(out, dict):
        return {k: _as_np(v) for k, v in out.items()}
    try:
        import torch
        if isinstance(out, torch.Tensor):
            return out.detach().cpu().numpy().copy()
    except ImportError:
        pass
    return out


def same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape and np.array_equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return set(a) == set(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b
