"""In-process federated transfer learning: private clients, secure aggregation, FedAvg.

One round (:meth:`Federation.run_round`):

1. the server samples clients and sends each the current global trainable weights; the hash of
   those weights (and the round) is bound into the secure-aggregation transcript, so a server that
   sends different models to different clients makes their keys disagree and the round fail;
2. each client charges its privacy budget (ledger entry written *before* training), fine-tunes
   with DP-SGD and returns its delta and sample count;
3. each client clips and encodes ``(n_k * delta_k, n_k)`` and masks it (secure aggregation,
   every message through the binary codec);
4. the server unmasks only the sum ``(sum n_k delta_k, sum n_k)`` and applies its optimizer
   (FedAvg, FedAvgM, FedAdam, ...).

The server-side objects (:class:`~secfedtl.secagg.ServerSession`, the optimizer, this runner's
``global_params``) never hold an individual update, count, or dataset size: the client side of
this process hands the server nothing but protocol messages.

A client that refuses for budget reasons sits the round out; one that crashes while training or
falls silent at any protocol phase is a dropout. The round completes if enough clients survive;
otherwise it is recorded as failed, the global model is unchanged, the budgets spent stay spent
(the ledger says so), and the run goes on.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from secfedtl.aggregation import ServerOptimizer
from secfedtl.aggregation.optimizers import decode_vector, encode_vector
from secfedtl.errors import (
    ConfigError,
    PrivacyBudgetExceeded,
    SecFedTLError,
    TooFewSurvivorsError,
)
from secfedtl.secagg.config import SecAggConfig
from secfedtl.secagg.session import SessionParams
from secfedtl.secagg.simulate import PHASES, build_sessions, drive_round
from secfedtl.training import PrivateClient, flatten_delta, unflatten_delta

CHECKPOINT_VERSION = 1

#: A fault plan says, per round, which client fails and where: a protocol phase from
#: :data:`secfedtl.secagg.PHASES`, or ``"train"`` (the client crashes while training).
FaultPlan = Mapping[int, Mapping[str, str]]


def model_hash(names: Sequence[str], params: np.ndarray, round: int) -> str:
    """SHA-256 over the parameter names, the float64 weights and the round number."""
    h = hashlib.sha256(b"secfedtl/model/v1")
    h.update(round.to_bytes(8, "big"))
    for name in names:
        h.update(name.encode() + b"\0")
    h.update(np.ascontiguousarray(params, dtype="<f8").tobytes())
    return h.hexdigest()


@dataclass(frozen=True, kw_only=True)
class RoundReport:
    """What one round did, for metrics.json."""

    round: int
    status: str  # "ok" or "failed"
    reason: str
    participants: tuple[str, ...]
    included: tuple[str, ...]
    dropped: tuple[str, ...]
    budget_refused: tuple[str, ...]
    total_weight: int
    times: dict[str, float]
    wire_bytes: int
    model_hash: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(kw_only=True)
class Federation:
    """A server and its private clients in one process.

    ``clients`` maps a client name to its :class:`~secfedtl.training.PrivateClient` (each with its
    own budget guard and ledger). ``clip`` bounds every coordinate of a client's delta before
    encoding; ``max_samples`` is the public bound on a client's sample count (its weight).
    ``threshold``/``neighbors`` default to :meth:`SecAggConfig.recommended` when that finds a
    configuration for the round's cohort, else to the complete graph with the smallest safe
    threshold (``k // 2 + 1``).
    """

    clients: Mapping[str, PrivateClient]
    names: Sequence[str]
    global_params: np.ndarray
    optimizer: ServerOptimizer
    clip: float = 1.0
    max_samples: int = 10_000
    bits: int = 32
    clients_per_round: int | None = None
    dropout_rate: float = 0.05
    seed: int = 0
    faults: FaultPlan = field(default_factory=dict)
    rounds_done: int = 0
    history: list[RoundReport] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.clients:
            raise ConfigError("a federation needs clients")
        order = list(self.names)
        for name, client in self.clients.items():
            if client.trainable_names != order:
                raise ConfigError(f"client {name!r} trains other parameters than the global model")
        self.global_params = np.asarray(self.global_params, dtype=np.float64).copy()
        if self.clients_per_round is not None and not 3 <= self.clients_per_round <= len(self.clients):
            raise ConfigError("clients_per_round must be between 3 and the number of clients")

    # -- helpers ------------------------------------------------------------------------------

    def global_state(self) -> dict[str, torch.Tensor]:
        """The global trainable weights as tensors (what the server sends to clients)."""
        any_client = next(iter(self.clients.values()))
        return unflatten_delta(self.global_params, any_client.trainable_state())

    def _secagg_config(self, cohort: int) -> SecAggConfig:
        extra = dict(clip=self.clip, bits=self.bits, max_weight=self.max_samples)
        try:
            return SecAggConfig.recommended(num_clients=cohort, dropout_rate=self.dropout_rate, **extra)
        except ConfigError:
            return SecAggConfig(num_clients=cohort, threshold=(cohort - 1) // 2 + 1, **extra)

    def _sample(self, round: int) -> list[str]:
        names = sorted(self.clients)
        if self.clients_per_round is None or self.clients_per_round >= len(names):
            return names
        rng = np.random.default_rng([self.seed, round])  # public sampling, not a secret
        return sorted(rng.choice(names, size=self.clients_per_round, replace=False).tolist())

    # -- one round ----------------------------------------------------------------------------

    def run_round(self) -> RoundReport:
        r = self.rounds_done
        faults = dict(self.faults.get(r, {}))
        cohort = self._sample(r)
        times = dict.fromkeys(("local_training", "encoding", "secure_aggregation", "aggregation",
                               "plain_fedavg_sum"), 0.0)
        digest = model_hash(self.names, self.global_params, r)
        state = self.global_state()
        updates: dict[str, tuple[np.ndarray, int]] = {}
        refused: list[str] = []
        crashed: list[str] = []
        for name in cohort:
            t0 = time.perf_counter()
            client = self.clients[name]
            try:
                if faults.get(name) == "train":
                    update = _crash_inside_charge(client, state, r, digest)
                else:
                    update = client.train_round(global_state=state, round=r, model_hash=digest)
            except PrivacyBudgetExceeded:
                refused.append(name)
                continue
            except (_SimulatedCrash, SecFedTLError, RuntimeError):
                crashed.append(name)  # its pending ledger entry stays: the budget counts as spent
                continue
            finally:
                times["local_training"] += time.perf_counter() - t0
            updates[name] = (flatten_delta(update.delta), update.num_samples)
        members = [n for n in cohort if n not in refused]
        report = dict(round=r, participants=tuple(members), budget_refused=tuple(refused),
                      model_hash=digest, times=times)
        if len(members) < 3:
            return self._finish(r, report, "failed", f"{len(members)} clients available; secure aggregation needs 3",
                                included=(), dropped=tuple(members), total_weight=0, wire=0)
        cfg = self._secagg_config(len(members))
        t0 = time.perf_counter()
        rng = np.random.default_rng([self.seed, r, 1])  # stochastic rounding (not secret)
        length = self.global_params.size + 1
        fields = []
        for name in members:
            if name in updates:
                vec, weight = updates[name]
                fields.append(cfg.encoding.encode(vec, weight=weight, rng=rng))
            else:
                fields.append(np.zeros(length, dtype=cfg.encoding.dtype))  # never sent: it crashed
        times["encoding"] = time.perf_counter() - t0
        if updates:  # what a plain FedAvg sum of the same shapes costs (random data)
            probe = [np.random.default_rng(i).standard_normal(length - 1) for i in range(len(updates))]
            t0 = time.perf_counter()
            np.sum(probe, axis=0)
            times["plain_fedavg_sum"] = time.perf_counter() - t0
        dropouts = {i: "advertise" for i, n in enumerate(members) if n in crashed}
        for i, name in enumerate(members):
            phase = faults.get(name)
            if phase in PHASES and i not in dropouts:
                dropouts[i] = phase
        params = SessionParams(config=cfg, session_id=os.urandom(16), round=r,
                               vector_length=length, context=bytes.fromhex(digest))
        t0 = time.perf_counter()
        try:
            clients, server = build_sessions(params, fields)
            outcome = drive_round(clients, server, dropouts=dropouts)
        except TooFewSurvivorsError as exc:
            times["secure_aggregation"] = time.perf_counter() - t0
            return self._finish(r, report, "failed", f"secure aggregation aborted: {exc}", included=(),
                                dropped=tuple(members), total_weight=0, wire=0)
        times["secure_aggregation"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        weighted_sum, total_weight = cfg.encoding.decode_sum(outcome.result.field_sum)
        if total_weight <= 0:
            return self._finish(r, report, "failed", "aggregate has no samples", included=(),
                                dropped=tuple(members), total_weight=0, wire=outcome.wire_bytes)
        self.global_params = self.optimizer.step(self.global_params, weighted_sum, total_weight)
        times["aggregation"] = time.perf_counter() - t0
        included = tuple(members[i] for i in outcome.result.included)
        return self._finish(r, report, "ok", "", included=included,
                            dropped=tuple(n for n in members if n not in included),
                            total_weight=int(total_weight), wire=outcome.wire_bytes)

    def _finish(self, r: int, report: dict, status: str, reason: str, *, included: tuple[str, ...],
                dropped: tuple[str, ...], total_weight: int, wire: int) -> RoundReport:
        times = report["times"]
        times["secagg_overhead"] = times["encoding"] + times["secure_aggregation"] - times["plain_fedavg_sum"]
        done = RoundReport(status=status, reason=reason, included=included, dropped=dropped,
                           total_weight=total_weight, wire_bytes=wire, **report)
        self.history.append(done)
        self.rounds_done = r + 1
        return done

    # -- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """JSON-able server state: global weights, optimizer state, rounds done, history."""
        return {"version": CHECKPOINT_VERSION, "rounds_done": self.rounds_done, "names": list(self.names),
                "global_params": encode_vector(self.global_params), "optimizer": self.optimizer.state_dict(),
                "history": [h.to_dict() for h in self.history]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != CHECKPOINT_VERSION or list(state.get("names", [])) != list(self.names):
            raise ConfigError("checkpoint is of another version or another model")
        params = decode_vector(state["global_params"])
        if params.shape != self.global_params.shape:
            raise ConfigError("checkpoint weights have the wrong shape")
        self.optimizer.load_state_dict(state["optimizer"])
        self.global_params = params
        self.rounds_done = int(state["rounds_done"])
        self.history = [RoundReport(**{**h, **{k: tuple(h[k]) for k in
                                               ("participants", "included", "dropped", "budget_refused")}})
                        for h in state["history"]]

    def save_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Write the server state atomically (temp file + rename)."""
        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(self.state_dict(), fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def run(self, rounds: int, *, checkpoint: str | os.PathLike[str] | None = None,
            on_round: Callable[[RoundReport], None] | None = None) -> list[RoundReport]:
        """Run rounds until ``rounds`` are done (resuming from ``rounds_done``)."""
        while self.rounds_done < rounds:
            report = self.run_round()
            if on_round is not None:  # first: a kill before the checkpoint re-runs this round
                on_round(report)
            if checkpoint is not None:
                self.save_checkpoint(checkpoint)
        return self.history


class _SimulatedCrash(Exception):
    """A fault-plan crash while training (tests and demos of dropout handling)."""


class _CrashingGuard:
    """Wraps a budget guard: the charge is made (ledger entry written), then the block fails,
    exactly as a process dying mid-training would leave things."""

    def __init__(self, guard: Any) -> None:
        self._guard = guard

    def charge(self, event: Any, **kwargs: Any) -> Any:
        import contextlib

        @contextlib.contextmanager
        def _cm():  # type: ignore[no-untyped-def]
            with self._guard.charge(event, **kwargs):
                raise _SimulatedCrash("client crashed while training")
                yield  # pragma: no cover

        return _cm()


def _crash_inside_charge(client: PrivateClient, state: Mapping[str, torch.Tensor], r: int, digest: str) -> Any:
    real = client._guard  # noqa: SLF001 - fault injection swaps the guard for one call
    client._guard = _CrashingGuard(real)  # noqa: SLF001
    try:
        return client.train_round(global_state=state, round=r, model_hash=digest)
    finally:
        client._guard = real  # noqa: SLF001
