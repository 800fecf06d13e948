"""The server side of federated transfer learning: secure aggregation and FedAvg over a pool.

The server holds no client objects: everything it says to a client, and everything it hears
back, is bytes of :mod:`secfedtl.federated.wire`, moved by a
:class:`~secfedtl.federated.pool.ClientPool` (in process, forked workers, or Flower). One
training round (:meth:`Federation.run_round`) is a *secure round* of the ``"train"`` task
(:meth:`Federation.secure_round`), in phases, each one exchange on the pool:

1. ``task``: the server samples a cohort and sends each client the same
   :class:`~secfedtl.federated.wire.TaskRequest` (global trainable weights, the announced
   fixed-point encoding). Each client computes the SHA-256 of the request it received; that
   digest is the ledger's ``model_hash`` and the secure-aggregation ``context``, so a server
   that sends different models (or options) to different clients makes their keys disagree and
   the round fail (a pre-keyed distributed step completes instead, with a sum that stays masked:
   :meth:`Federation._run_prekeyed_round`). The client charges its budget (ledger entry written *before* training),
   fine-tunes with DP-SGD, clips and encodes ``(w_k * u_k, w_k)`` (``u_k`` its model update, ``w_k`` its declared public
   weight) and replies ``ready``; or ``refused`` (budget) or ``failed``, with no details;
2. ``advertise``, ``share``, ``mask``, ``consistency``, ``unmask``: the secure aggregation of the
   ready clients (:mod:`secfedtl.secagg`); the server unmasks only the sum;
3. the server decodes ``(sum w_k u_k, sum w_k)`` and applies its optimizer (FedAvg,
   FedAvgM, FedAdam, ...).

The server-side objects (the :class:`~secfedtl.secagg.ServerSession`, the optimizer,
``global_params``) never hold an individual update; the weights are public declarations.

A client that refuses for budget reasons sits the round out; one that fails, times out or falls
silent at any phase is a dropout. The round completes if enough clients survive; otherwise it
is recorded as failed, the global model is unchanged, the budgets spent stay spent (each
client's ledger says so), and the run goes on.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from secfedtl._atomic import atomic_write
from secfedtl.aggregation import ServerOptimizer
from secfedtl.aggregation.optimizers import decode_vector, encode_vector
from secfedtl.errors import ConfigError, DecodeError, InputError
from secfedtl.federated import wire
from secfedtl.federated.distributed import STEP_TASK, DistributedPlan, decode_step
from secfedtl.federated.pool import ClientPool
from secfedtl.federated.roster import Roster
from secfedtl.secagg import codec
from secfedtl.secagg.config import SecAggConfig, active_threshold
from secfedtl.secagg.driver import Phase, RoundDriver, drive
from secfedtl.secagg.server import ServerSession
from secfedtl.secagg.session import SessionParams

CHECKPOINT_VERSION = 2
TIMES = ("task_phase", "secure_aggregation", "aggregation", "plain_fedavg_sum")


@dataclass(frozen=True, kw_only=True)
class RoundReport:
    """What one round did, for metrics.json. ``times`` are seconds of the server's wall clock:
    ``task_phase`` (the clients' local work, as the server waits for it), ``secure_aggregation``
    and ``aggregation``; ``secagg_overhead`` is secure aggregation minus what a plain sum of the
    same updates costs. Clients report no timings (a training time depends on the data).
    ``total_weight`` is the sum of the included clients' declared public weights. ``silent`` maps each participant that failed to answer
    a phase of the round (crashed, timed out, unreachable, refused to go on, or answered
    nonsense) to the first such phase: one silent before its masked input arrived is also in
    ``dropped``; one silent after it is still in ``included`` (its masked input is in the sum;
    the others' shares remove its self-mask)."""

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
    silent: dict[str, str] = field(default_factory=dict)
    steps: int = 0  # distributed noise: DP steps (secure aggregations) planned in the round
    steps_ok: int = 0  # ... and how many of them completed and were applied
    #: distributed noise: the digest of each step's request as the server sent it (the
    #: ``model_hash`` each hospital's ledger records for that step; "" for a step never requested)
    step_hashes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class SecureSum:
    """The outcome of :meth:`Federation.secure_round`: ``total`` and ``total_weight`` are the
    decoded sum over the ``included`` clients (``None``/0 when the round failed)."""

    round: int
    status: str
    reason: str
    digest: str
    participants: tuple[str, ...]
    included: tuple[str, ...]
    dropped: tuple[str, ...]
    refused: tuple[str, ...]
    total: np.ndarray | None
    total_weight: int
    times: dict[str, float]
    wire_bytes: int
    info: dict[str, dict[str, Any]]
    silent: dict[str, str] = field(default_factory=dict)
    field_sum: np.ndarray | None = None  # the integer input path: the unmasked sum in Z_2^bits


class _CountedExchange:
    """``pool.exchange`` for one phase, counting the bytes that cross the wire both ways
    (:attr:`bytes`)."""

    def __init__(self, pool: ClientPool) -> None:
        self.pool = pool
        self.bytes = 0

    def __call__(self, requests: dict[str, list[bytes]], phase: str) -> dict[str, list[bytes]]:
        self.bytes += sum(len(b) for blobs in requests.values() for b in blobs)
        raw = self.pool.exchange(requests, phase=phase)
        self.bytes += sum(len(b) for blobs in raw.values() for b in blobs)
        return raw


@dataclass(kw_only=True)
class _StepTally:
    """What the steps of one distributed-noise round add up to, for its :class:`RoundReport`."""

    times: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TIMES, 0.0))
    wire_bytes: int = 0
    ok: int = 0
    reasons: list[str] = field(default_factory=list)
    participants: set[str] = field(default_factory=set)
    included: set[str] = field(default_factory=set)
    refused: set[str] = field(default_factory=set)
    silent: dict[str, str] = field(default_factory=dict)
    hashes: list[str] = field(default_factory=list)  # each step's request digest ("" if never requested)

    def report(self, round: int, steps: int) -> RoundReport:  # noqa: A002
        times = dict(self.times)
        times["secagg_overhead"] = times["secure_aggregation"] - times["plain_fedavg_sum"]
        return RoundReport(round=round, status="ok" if self.ok else "failed", reason="; ".join(self.reasons[:3]),
                           participants=tuple(sorted(self.participants)), included=tuple(sorted(self.included)),
                           dropped=tuple(sorted(self.participants - self.included)),
                           budget_refused=tuple(sorted(self.refused)), total_weight=0, times=times,
                           wire_bytes=self.wire_bytes, model_hash=next((h for h in reversed(self.hashes) if h), ""),
                           silent=self.silent, steps=steps, steps_ok=self.ok, step_hashes=tuple(self.hashes))


@dataclass(kw_only=True)
class Federation:
    """A server, and a pool of client nodes it reaches only through messages.

    ``names`` are the global model's trainable parameter names (in the order of
    ``global_params``); ``frozen_hash`` identifies the frozen source model clients must hold.
    ``clip`` bounds every coordinate of a client's model update before encoding; ``max_samples`` is the
    public bound on a client's sample count (its weight). The secure-aggregation graph and
    threshold come from :meth:`SecAggConfig.recommended` when that finds a configuration for the
    round's cohort, else the complete graph with the smallest threshold that tolerates
    ``colluders`` (default: the rule's). ``roster`` holds every client's signing public key:
    sessions are authenticated, and each Join names the key of every session index (the nodes
    check them against their own pinned copy of the roster).
    """

    pool: ClientPool
    roster: Roster
    names: Sequence[str]
    global_params: np.ndarray
    optimizer: ServerOptimizer
    frozen_hash: str | None = None
    clip: float = 1.0
    max_samples: int = 10_000
    bits: int = 32
    clients_per_round: int | None = None
    dropout_rate: float = 0.05
    colluders: int | None = None
    seed: int = 0
    distributed: DistributedPlan | None = None
    prekeyed: bool = True  # distributed noise: set up each round's step sessions before its steps
    ema: float = 0.0  # [server] ema: decay of the released model's moving average of the iterates (0: off)
    rounds_done: int = 0
    history: list[RoundReport] = field(default_factory=list)
    ema_params: np.ndarray | None = None
    source_params: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.pool, ClientPool):
            raise ConfigError("pool must be a ClientPool")
        if len(self.pool.names) < 3:
            raise ConfigError("a federation needs at least 3 clients")
        if not isinstance(self.roster, Roster) or set(self.pool.names) - set(self.roster.parties):
            raise ConfigError("roster must be a Roster with every client of the pool")
        self.global_params = np.asarray(self.global_params, dtype=np.float64).copy()
        if self.global_params.ndim != 1 or self.global_params.size == 0:
            raise ConfigError("global_params must be a non-empty vector")
        if self.clients_per_round is not None and not 3 <= self.clients_per_round <= len(self.pool.names):
            raise ConfigError("clients_per_round must be between 3 and the number of clients")
        if isinstance(self.ema, bool) or not isinstance(self.ema, (int, float)) or not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"ema must be a number in [0, 1), got {self.ema!r}")
        self.ema_params = self.global_params.copy() if self.ema > 0.0 else None
        self.source_params = self.global_params.copy()  # the source head: L2-SP's anchor (distributed steps)

    @property
    def released_params(self) -> np.ndarray:
        """The model the server releases (evaluated and deployed): with ``ema`` > 0 the exponential
        moving average of the iterates, ``a <- ema * a + (1 - ema) * x`` after every applied
        optimizer step (each round; each DP step with distributed noise), started at the source
        head; else the last iterate ``global_params``. Training always continues from the iterate,
        the only model sent to clients: averaging is post-processing of what the server already
        holds, so it spends no privacy budget and changes nothing on the wire."""
        return self.global_params if self.ema_params is None else self.ema_params

    def _step_to(self, params: np.ndarray) -> None:
        """Take the optimizer's new iterate, and fold it into the moving average."""
        self.global_params = params
        if self.ema_params is not None:
            self.ema_params = self.ema * self.ema_params + (1.0 - self.ema) * params

    # -- helpers ------------------------------------------------------------------------------

    def _secagg_config(self, cohort: int, *, clip: float, max_weight: int, scale: float | None = None,
                       min_survivors: int | None = None) -> SecAggConfig:
        extra = dict(clip=clip, bits=self.bits, max_weight=max_weight, scale=scale, authenticated=True)
        try:
            cfg = SecAggConfig.recommended(num_clients=cohort, dropout_rate=self.dropout_rate,
                                           colluders=self.colluders, **extra)
        except ConfigError:
            t = active_threshold(degree=cohort - 1, colluders=self.colluders or 0)
            cfg = SecAggConfig(num_clients=cohort, threshold=min(t, cohort - 1), **extra)
        if min_survivors is not None and min_survivors > cfg.min_survivors:
            cfg = dataclasses.replace(cfg, min_survivors=min_survivors)
        return cfg

    def sample(self, round: int) -> list[str]:
        """The round's cohort (public sampling from ``seed`` and the round; not a secret)."""
        names = sorted(self.pool.names)
        if self.clients_per_round is None or self.clients_per_round >= len(names):
            return names
        rng = np.random.default_rng([self.seed, round])
        return sorted(rng.choice(names, size=self.clients_per_round, replace=False).tolist())

    def task_options(self) -> dict[str, Any]:
        """Options every task request on the global model carries."""
        options: dict[str, Any] = {"names": list(self.names)}
        if self.frozen_hash is not None:
            options["frozen_hash"] = self.frozen_hash
        return options

    def _replies(self, raw: Mapping[str, list[bytes]], round: int, kind: type) -> dict[str, list[Any]]:
        """Decode what each client said; a client that sent anything malformed or off-round is
        treated as silent for the phase."""
        out: dict[str, list[Any]] = {}
        for name, blobs in raw.items():
            try:
                messages = [wire.decode(b) for b in blobs]
            except DecodeError:
                continue
            if all(isinstance(msg, kind) and msg.round == round for msg in messages):
                out[name] = messages
        return out

    # -- rounds -------------------------------------------------------------------------------

    def query(self, task: str, *, weights: np.ndarray | None = None, round: int | None = None,
              options: Mapping[str, Any] | None = None, clients: Sequence[str] | None = None
              ) -> dict[str, dict[str, Any]]:
        """Run a public task (``"evaluate"``, ``"personalise"``) on ``weights`` (default: the
        released model, :attr:`released_params`: the hospitals evaluate and personalise the model
        the federation releases); return each answering client's ``info`` (with its ``status``)."""
        r = self.rounds_done if round is None else round
        w = self.released_params if weights is None else weights
        request = wire.TaskRequest.with_weights(round=r, task=task, weights=w,
                                                options={**self.task_options(), **(options or {})})
        blob = wire.encode(request)
        names = sorted(self.pool.names) if clients is None else list(clients)
        replies = self._replies(self.pool.exchange({n: [blob] for n in names}, phase="task"), r, wire.TaskReply)
        return {n: {"status": msgs[0].status, **msgs[0].info} for n, msgs in replies.items() if len(msgs) == 1}

    def secure_round(self, task: str, *, round: int, cohort: Sequence[str], vector_length: int,
                     clip: float = 1.0, max_weight: int = 1, weights: np.ndarray | None = None,
                     options: Mapping[str, Any] | None = None, integer: bool = False,
                     min_survivors: int | None = None) -> SecureSum:
        """Run ``task`` on ``cohort`` and securely sum the ready clients' contributions
        (``vector_length`` floats each, clipped to ``[-clip, clip]``, weights up to
        ``max_weight``). Never raises for clients' misbehaviour: a failed round says why.

        ``integer=True`` is the integer input path: the request announces ``options["integer"]``
        (``bits``, ``length = vector_length``, the cohort size) instead of a fixed-point
        encoding, each client contributes a vector already in ``Z_2^bits`` (no weight word), and
        the outcome carries the unmasked ``field_sum`` undecoded (``total`` is ``None``). A
        session never has ``min_survivors`` below the given one (the clients check it too)."""
        times = dict.fromkeys(TIMES, 0.0)
        cohort = sorted(cohort)
        if len(cohort) < 3:
            raise ConfigError("a secure round needs a cohort of at least 3 clients")
        if integer:
            announce: dict[str, Any] = {"integer": {"bits": self.bits, "length": vector_length,
                                                    "num_clients": len(cohort)}}
            words = vector_length
            announced_scale = None
        else:
            encoding = {"clip": float(clip), "bits": self.bits, "num_clients": len(cohort), "max_weight": max_weight}
            announce = {"encoding": encoding}
            words = vector_length + 1
            announced_scale = self._secagg_config(len(cohort), clip=float(clip), max_weight=max_weight).encoding.scale
        w = self.global_params if weights is None else weights
        request = wire.TaskRequest.with_weights(round=round, task=task, weights=w,
                                                options={**self.task_options(), **(options or {}), **announce})
        digest = wire.request_digest(request)
        blob = wire.encode(request)
        exchange = _CountedExchange(self.pool)

        t0 = time.perf_counter()
        replies = self._replies(exchange({n: [blob] for n in cohort}, "task"), round, wire.TaskReply)
        times["task_phase"] = time.perf_counter() - t0
        info = {n: dict(msgs[0].info) for n, msgs in replies.items() if len(msgs) == 1}
        status = {n: msgs[0].status for n, msgs in replies.items() if len(msgs) == 1}
        silent = {n: "task" for n in cohort if n not in status}
        refused = tuple(n for n in cohort if status.get(n) == "refused")
        members = [n for n in cohort if status.get(n) == "ready"]
        participants = tuple(n for n in cohort if n not in refused)

        def finish(state: str, reason: str, *, included: Sequence[str] = (), total: np.ndarray | None = None,
                   total_weight: int = 0) -> SecureSum:
            return SecureSum(round=round, status=state, reason=reason, digest=digest, participants=participants,
                             included=tuple(included), dropped=tuple(n for n in participants if n not in included),
                             refused=refused, total=total, total_weight=total_weight, times=times,
                             wire_bytes=exchange.bytes, info=info, silent=silent)

        if len(members) < max(3, min_survivors or 0):
            return finish("failed", f"{len(members)} clients ready; the sum needs {max(3, min_survivors or 0)}")
        cfg = self._secagg_config(len(members), clip=float(clip), max_weight=max_weight, scale=announced_scale,
                                  min_survivors=min_survivors)
        params = SessionParams(config=cfg, session_id=os.urandom(16), round=round,
                               vector_length=words, context=bytes.fromhex(digest))
        index = {name: i for i, name in enumerate(members)}
        parties = tuple(self.roster.key_of(name) for name in members)
        server = ServerSession(params=params, identities=dict(enumerate(parties)))

        def secagg_exchange(phase: Phase, requests: Mapping[int, Sequence[Any]]) -> dict[int, list[Any]]:
            """The round driver's transport: wire frames over the pool, one exchange per phase."""
            if phase.request is None:  # open the session: each member joins as its party index
                out = {members[i]: [wire.encode(wire.Join(round=round, index=i, session=params, parties=parties))]
                       for i in requests}
            else:
                out = {members[i]: [wire.encode(wire.SecAggFrame(round=round, data=codec.encode(msg)))
                                    for msg in msgs] for i, msgs in requests.items()}
            answers = self._replies(exchange(out, phase.name), round, wire.SecAggFrame)
            replies: dict[int, list[Any]] = {}
            for name, frames in answers.items():
                if name not in index:
                    continue
                try:
                    replies[index[name]] = [codec.decode(frame.data) for frame in frames]
                except DecodeError:
                    continue  # nonsense is silence
            return replies

        t0 = time.perf_counter()
        outcome = drive(server, secagg_exchange)
        times["secure_aggregation"] = time.perf_counter() - t0
        for i, phase in outcome.silent.items():
            silent.setdefault(members[i], phase)
        if outcome.result is None:
            return finish("failed", outcome.reason)
        result = outcome.result
        included = [members[i] for i in result.included]
        if integer:
            return dataclasses.replace(finish("ok", "", included=included), field_sum=result.field_sum)
        total, total_weight = cfg.encoding.decode_sum(result.field_sum)
        # What a plain (unprotected) FedAvg sum of the same shapes costs, for the overhead figure.
        probe = [np.random.default_rng(i).standard_normal(vector_length) for i in range(len(included))]
        t1 = time.perf_counter()
        np.sum(probe, axis=0)
        times["plain_fedavg_sum"] = time.perf_counter() - t1
        return finish("ok", "", included=included, total=total, total_weight=int(total_weight))

    def run_round(self) -> RoundReport:
        """One training round: the ``"train"`` task securely summed, then the optimizer step
        (distributed noise: :meth:`run_distributed_round`)."""
        if self.distributed is not None:
            return self.run_distributed_round()
        r = self.rounds_done
        outcome = self.secure_round("train", round=r, cohort=self.sample(r), vector_length=self.global_params.size,
                                    clip=self.clip, max_weight=self.max_samples)
        status, reason = outcome.status, outcome.reason
        if status == "ok" and outcome.total_weight <= 0:
            status, reason = "failed", "aggregate has no samples"
        if status == "ok":
            assert outcome.total is not None
            t0 = time.perf_counter()
            self._step_to(self.optimizer.step(self.global_params, outcome.total, outcome.total_weight))
            outcome.times["aggregation"] = time.perf_counter() - t0
        times = dict(outcome.times)
        times["secagg_overhead"] = times["secure_aggregation"] - times["plain_fedavg_sum"]
        ok = status == "ok"
        report = RoundReport(round=r, status=status, reason=reason, participants=outcome.participants,
                             included=outcome.included if ok else (),
                             dropped=outcome.dropped if ok else outcome.participants,
                             budget_refused=outcome.refused, total_weight=outcome.total_weight if ok else 0,
                             times=times, wire_bytes=outcome.wire_bytes, model_hash=outcome.digest,
                             silent=dict(outcome.silent))
        return self._record(report)

    def run_distributed_round(self) -> RoundReport:
        """One training round of a distributed-noise job (:mod:`secfedtl.federated.distributed`):
        ``steps_per_round`` DP-SGD steps, each one secure aggregation of the ``"step"`` task on the
        integer input path, decoded and applied by the optimizer over the public normaliser. A
        step that fails leaves the model as it was; the round is ``ok`` if any step was applied."""
        plan = self.distributed
        assert plan is not None
        if self.prekeyed:
            return self._run_prekeyed_round()
        r, settings = self.rounds_done, plan.settings
        cohort = self.sample(r)
        tally = _StepTally()
        for s in range(settings.steps_per_round):
            step = r * settings.steps_per_round + s
            outcome = self.secure_round(STEP_TASK, round=step, cohort=cohort,
                                        vector_length=plan.encoding.padded_dimension, integer=True,
                                        options={"distributed": plan.announcement()},
                                        min_survivors=settings.policy.min_survivors)
            for key, value in outcome.times.items():
                tally.times[key] = tally.times.get(key, 0.0) + value
            tally.wire_bytes += outcome.wire_bytes
            tally.participants.update(outcome.participants)
            tally.refused.update(outcome.refused)
            for name, phase in outcome.silent.items():
                tally.silent.setdefault(name, f"step {s}: {phase}")
            tally.hashes.append(outcome.digest)
            if outcome.status != "ok" or outcome.field_sum is None:
                tally.reasons.append(f"step {s}: {outcome.reason}")
                continue
            self._apply_step(plan, outcome.field_sum, step, tally)
            tally.included.update(outcome.included)
        return self._record(tally.report(r, settings.steps_per_round))

    def _apply_step(self, plan: DistributedPlan, field_sum: np.ndarray, step: int, tally: _StepTally) -> None:
        """Decode a step's noisy sum and apply it: the optimizer over the public normaliser."""
        t0 = time.perf_counter()
        pseudo_gradient = decode_step(plan, field_sum, step, params=self.global_params, source=self.source_params)
        self._step_to(self.optimizer.step(self.global_params, pseudo_gradient, plan.settings.normaliser))
        tally.times["aggregation"] += time.perf_counter() - t0
        tally.ok += 1

    def _record(self, report: RoundReport) -> RoundReport:
        self.history.append(report)
        self.rounds_done = report.round + 1
        return report

    def _run_prekeyed_round(self) -> RoundReport:
        """A distributed-noise round with its step sessions *pre-keyed* (docs/protocol.md,
        "Pre-keyed steps"): one fresh, independent secure-aggregation session per step, as in
        :meth:`run_distributed_round`, but every step's ``Join`` and share phase travel in two
        exchanges at the start of the round; each step then costs three exchanges (its request
        with the session's ``ShareDelivery``, the survivor list, the unmask request) instead of
        six. A session is bound to its step's request without the weights
        (:func:`~secfedtl.federated.wire.step_context`); each party's input is the step's share,
        computed when that request arrives, and its pairwise masks are bound to the whole
        request (the weights too: :meth:`~secfedtl.secagg.ClientSession.provide_input`), so
        hospitals shown different weights get masks that do not cancel."""
        plan = self.distributed
        assert plan is not None
        r, settings = self.rounds_done, plan.settings
        cohort = sorted(self.sample(r))
        tally = _StepTally()
        times, refused = tally.times, tally.refused
        steps = [r * settings.steps_per_round + s for s in range(settings.steps_per_round)]
        options = {**self.task_options(), "distributed": plan.announcement(),
                   "integer": {"bits": self.bits, "length": plan.encoding.padded_dimension, "num_clients": len(cohort)}}
        index = {name: i for i, name in enumerate(cohort)}
        parties = tuple(self.roster.key_of(name) for name in cohort)
        exchange = _CountedExchange(self.pool)

        def frames_out(drivers: Mapping[int, RoundDriver]) -> dict[str, list[bytes]]:
            out: dict[str, list[bytes]] = {}
            for step, driver in drivers.items():
                for i, msgs in driver.requests().items():
                    if driver.phase is not None and driver.phase.request is None:  # open the session
                        blobs = [wire.encode(wire.Join(round=step, index=i, session=driver.server.params,
                                                       parties=parties))]
                    else:
                        blobs = [wire.encode(wire.SecAggFrame(round=step, data=codec.encode(msg))) for msg in msgs]
                    out.setdefault(cohort[i], []).extend(blobs)
            return out

        def frames_in(raw: Mapping[str, list[bytes]], drivers: Mapping[int, RoundDriver]
                      ) -> tuple[dict[int, dict[int, list[Any]]], dict[str, wire.TaskReply]]:
            """Each step's replies by party (secure-aggregation frames of that step's round) and
            the task replies; a node that sent anything malformed is silent for all of them."""
            by_step: dict[int, dict[int, list[Any]]] = {step: {} for step in drivers}
            tasks: dict[str, wire.TaskReply] = {}
            for name, blobs in raw.items():
                if name not in index:
                    continue
                try:
                    messages = [wire.decode(b) for b in blobs]
                    decoded = [(msg.round, codec.decode(msg.data)) for msg in messages if isinstance(msg, wire.SecAggFrame)]
                except DecodeError:
                    continue
                replies = [msg for msg in messages if isinstance(msg, wire.TaskReply)]
                if len(replies) + len(decoded) != len(messages) or len(replies) > 1:
                    continue
                if replies:
                    tasks[name] = replies[0]
                for step, message in decoded:
                    if step in by_step:
                        by_step[step].setdefault(index[name], []).append(message)
            return by_step, tasks

        # 1. set-up: every step's session, its Join and share phase in two exchanges
        drivers: dict[int, RoundDriver] = {}
        t0 = time.perf_counter()
        cfg = self._secagg_config(len(cohort), clip=1.0, max_weight=1, min_survivors=settings.policy.min_survivors)
        for step in steps:
            context = wire.step_context(wire.TaskRequest(round=step, task=STEP_TASK, options=options))
            params = SessionParams(config=cfg, session_id=os.urandom(16), round=step,
                                   vector_length=plan.encoding.padded_dimension, context=context)
            drivers[step] = RoundDriver(ServerSession(params=params, identities=dict(enumerate(parties))), None)
        for phase in ("advertise", "share"):
            live = {step: d for step, d in drivers.items() if d.phase is not None and d.phase.name == phase}
            if live:
                by_step, _ = frames_in(exchange(frames_out(live), phase), live)
                for step, driver in live.items():
                    driver.answer(by_step[step])
        times["secure_aggregation"] += time.perf_counter() - t0

        # 2. the steps: request + masked input, then survivors and unmasking
        tally.hashes = [""] * len(steps)
        for s, step in enumerate(steps):
            driver = drivers[step]
            if driver.phase is not None and driver.phase.name == "mask":
                asked = driver.requests()
                request = wire.TaskRequest.with_weights(round=step, task=STEP_TASK, weights=self.global_params,
                                                        options=options)
                digest = tally.hashes[s] = wire.request_digest(request)
                driver.server.bind_input_context(bytes.fromhex(digest))  # the inputs answer this exact request
                blob = wire.encode(request)
                out = frames_out({step: driver})
                for i in asked:
                    out[cohort[i]] = [blob, *out.get(cohort[i], [])]
                t0 = time.perf_counter()
                by_step, answers = frames_in(exchange(out, "mask"), {step: driver})
                times["task_phase"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                for name, reply in answers.items():
                    if reply.round == step and reply.status == "refused":
                        refused.add(name)
                tally.participants.update(cohort[i] for i in asked if cohort[i] not in refused)
                # a party that answers another request than the one sent (its digest echoed) has
                # masks that would not cancel: it is left out, a dropout of this step
                masked = {i: msgs for i, msgs in by_step[step].items()
                          if answers.get(cohort[i]) is not None and answers[cohort[i]].status == "ready"
                          and answers[cohort[i]].info == {"digest": digest}}
                driver.answer(masked)
                while driver.phase is not None:
                    phase = driver.phase.name
                    by_step, _ = frames_in(exchange(frames_out({step: driver}), phase), {step: driver})
                    driver.answer(by_step[step])
                times["secure_aggregation"] += time.perf_counter() - t0
            outcome = driver.outcome() if driver.finished else None
            if outcome is not None:
                for i, phase in outcome.silent.items():
                    if cohort[i] not in refused:
                        tally.silent.setdefault(cohort[i], f"step {s}: {phase}")
            if outcome is None or outcome.result is None:
                tally.reasons.append(f"step {s}: {outcome.reason if outcome is not None else 'not set up'}")
                continue
            self._apply_step(plan, outcome.result.field_sum, step, tally)
            tally.included.update(cohort[i] for i in outcome.result.included)
        tally.wire_bytes = exchange.bytes
        return self._record(tally.report(r, settings.steps_per_round))

    # -- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """JSON-able server state: global weights, optimizer state, rounds done, history, and with
        ``ema`` the moving average (``ema_params``: the released model, :func:`released_params_of`)."""
        state = {"version": CHECKPOINT_VERSION, "rounds_done": self.rounds_done, "names": list(self.names),
                 "global_params": encode_vector(self.global_params), "optimizer": self.optimizer.state_dict(),
                 "history": [h.to_dict() for h in self.history]}
        if self.ema_params is not None:
            state["ema"] = self.ema
            state["ema_params"] = encode_vector(self.ema_params)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output. Everything is checked before anything is changed:
        :class:`ConfigError` for a checkpoint of another model or setting, :class:`InputError`
        for a malformed one; either leaves this server as it was."""
        if not isinstance(state, Mapping):
            raise InputError(f"a checkpoint must be a mapping, got {type(state).__name__}")
        if state.get("version") != CHECKPOINT_VERSION or list(state.get("names", [])) != list(self.names):
            raise ConfigError("checkpoint is of another version or another model")
        missing = sorted({"global_params", "optimizer", "rounds_done", "history"} - set(state))
        if missing:
            raise InputError(f"checkpoint lacks {missing}")
        rounds_done, history_rows = state["rounds_done"], state["history"]
        if isinstance(rounds_done, bool) or not isinstance(rounds_done, int) or not isinstance(history_rows, list) \
                or rounds_done != len(history_rows):
            raise InputError("checkpoint's rounds_done must be an int equal to the number of rounds in its history")
        try:
            history = [RoundReport(**{**h, **{k: tuple(h[k]) for k in
                                              ("participants", "included", "dropped", "budget_refused",
                                               "step_hashes") if k in h}})
                       for h in history_rows]
        except (TypeError, ValueError) as exc:  # a row that is not a RoundReport's fields
            raise InputError(f"checkpoint's history is malformed: {exc}") from exc
        params = decode_vector(state["global_params"])
        if params.shape != self.global_params.shape:
            raise ConfigError("checkpoint weights have the wrong shape")
        average = None
        if state.get("ema", 0.0) != self.ema:
            raise ConfigError(f"checkpoint was written with ema {state.get('ema', 0.0)!r}, this server has {self.ema!r}")
        if self.ema_params is not None:
            if not isinstance(state.get("ema_params"), str):
                raise ConfigError("checkpoint has no ema_params")
            average = decode_vector(state["ema_params"])
            if average.shape != params.shape:
                raise ConfigError("checkpoint's ema_params have the wrong shape")
        elif "ema_params" in state:  # state_dict writes them only with its ema: released_params_of would disagree
            raise ConfigError("checkpoint has ema_params but was written without ema")
        self.optimizer.load_state_dict(state["optimizer"])
        self.global_params = params
        self.ema_params = average
        self.rounds_done = rounds_done
        self.history = history

    def save_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Write the server state atomically (temp file, fsync, rename)."""
        data = json.dumps(self.state_dict()).encode("utf-8")
        atomic_write(path, lambda fh: fh.write(data))

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


def released_params_of(state: Mapping[str, Any]) -> np.ndarray:
    """The released model of a checkpoint (:meth:`Federation.state_dict`): its moving average when
    it was written with ``ema``, else its last iterate."""
    return decode_vector(state["ema_params"] if "ema_params" in state else state["global_params"])
