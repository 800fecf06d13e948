"""A client node: the client side of every round, behind one method, ``handle(bytes) -> [bytes]``.

A node holds one data holder's private objects (its :class:`~secfedtl.training.PrivateClient`,
budget guard, ledger, data) and a table of named *tasks*. It answers the messages of
:mod:`secfedtl.federated.wire`:

* :class:`~secfedtl.federated.wire.TaskRequest`: verify and run the named task. A *secure* task
  (``"train"``, ``"select"``) returns a vector and a weight; the node clips and encodes it into
  the field right away (under the encoding the request announces), keeps it in memory and
  replies ``"ready"``. A *local* task (``"evaluate"``, ``"personalise"``) keeps its results at
  the node (its own local report, :class:`LocalReports`) and the node replies ``"done"``. A task
  refused for budget reasons replies ``"refused"``; one that fails replies ``"failed"`` (the
  server treats it as a dropout).
* :class:`~secfedtl.federated.wire.Join`: check the session parameters against the request this
  node ran (same round, its own digest of the request as the session context, the announced
  encoding), check every party against the node's pinned roster (each key in the roster, this
  node's own key at its own index) and the parameters against its policy
  (:class:`~secfedtl.federated.roster.NodePolicy`), then start an authenticated
  :class:`~secfedtl.secagg.ClientSession` with the kept field vector: every advert and
  survivor-list signature is checked against the pinned keys.
* :class:`~secfedtl.federated.wire.SecAggFrame`: one secure-aggregation step.

What leaves a node: masked vectors (whose decoded content is the output of a mechanism charged
in its ledger before it ran, or a declared public value such as its FedAvg weight), and a reply
status with a fixed, data-free reason. Nothing computed from the data (accuracy, counts, epsilon
projections, timings, exception texts) is ever put in a reply. It answers each ``(round, task)``
once (:data:`REPEATABLE_TASKS` excepted): a replayed request is refused with
:class:`~secfedtl.errors.ReplayError` before any private data is touched. A message that breaks the rules raises :class:`~secfedtl.errors.RemoteProtocolError` (a
runner treats that as the node falling silent). Faults for tests and demos (``faults``) make the
node crash while training or fall silent from a protocol phase in a given round.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from secfedtl._atomic import atomic_write
from secfedtl.crypto.primitives import SigningKey
from secfedtl.encoding import FixedPointEncoding
from secfedtl.encoding.fixed_point import MIN_FIXED_POINT_BITS
from secfedtl.errors import (
    ConfigError,
    PrivacyBudgetExceeded,
    RemoteProtocolError,
    PolicyError,
    ReplayError,
    SecFedTLError,
    TooFewSurvivorsError,
    UnknownPartyError,
)
from secfedtl.federated import wire
from secfedtl.federated.distributed import integer_spec
from secfedtl.federated.roster import NodePolicy, Roster
from secfedtl.secagg import codec
from secfedtl.secagg.client import ClientSession
from secfedtl.secagg.session import SessionParams
from secfedtl.secagg.driver import PHASES, REPLY_PHASE
from secfedtl.training import PrivateClient, evaluate, flatten_params, model_with_params, unflatten_params

log = logging.getLogger(__name__)

#: Faults a node can be told to simulate, per round: ``"train"`` (crash while training, after the
#: budget was charged) or a protocol phase from :data:`secfedtl.secagg.PHASES` (silent from there).
FAULTS = ("train", *PHASES)
#: The most pre-keyed sessions (set up before their step's request) a node holds at once.
MAX_PREKEYED = 1024
#: Tasks a node answers more than once per round (public queries); every other task runs once.
REPEATABLE_TASKS = frozenset({"evaluate"})


@dataclass(frozen=True, kw_only=True)
class TaskOutput:
    """What a task returns: a contribution to the round's secure sum (``vector`` and integer
    ``weight``, fixed-point encoded by the node), or one already in the integer field (``field``,
    for a request announcing ``options["integer"]``; ``min_survivors``: the fewest parties whose
    inputs may be summed with it), or neither and public ``info`` only."""

    vector: np.ndarray | None = None
    weight: int = 0
    info: Mapping[str, Any] = field(default_factory=dict)
    field: np.ndarray | None = None
    min_survivors: int = 0
    colluders: int = 0  # parties its noise assumes may collude with the server: sessions must tolerate them


class Task(Protocol):
    def __call__(self, request: wire.TaskRequest, digest: str) -> TaskOutput: ...


class _SimulatedCrash(Exception):
    """A fault-plan crash while training (tests and demos of dropout handling)."""


class TrainTask:
    """The ``"train"`` task: DP fine-tuning of the client's trainable parameters from the global
    weights; contributes ``(model update, weight)``. ``frozen_hash`` (optional) is the hash of the
    frozen part of the model; a request announcing another one is refused, because averaging
    heads trained on different backbones is meaningless."""

    def __init__(self, client: PrivateClient, *, frozen_hash: str | None = None) -> None:
        self._client = client
        self._template = client.trainable_state()
        self._frozen_hash = frozen_hash

    def check(self, request: wire.TaskRequest) -> dict[str, torch.Tensor]:
        opts = request.options
        names = opts.get("names", [])  # server-chosen JSON: compare, never convert
        if not isinstance(names, list) or names != self._client.trainable_names:
            raise RemoteProtocolError("the request trains other parameters than this client's model")
        if self._frozen_hash is not None and opts.get("frozen_hash") != self._frozen_hash:
            raise RemoteProtocolError("the request is for another source model (frozen weights differ)")
        return unflatten_params(request.weights(), self._template)

    def __call__(self, request: wire.TaskRequest, digest: str) -> TaskOutput:
        state = self.check(request)
        update = self._client.train_round(global_state=state, round=request.round, model_hash=digest)
        return TaskOutput(vector=flatten_params(update.model_update), weight=update.weight)

    def crash(self, request: wire.TaskRequest, digest: str) -> TaskOutput:
        """Fault injection: charge the budget (the ledger entry is written), then fail inside
        the charged block, exactly as a process dying mid-training would leave things."""
        state = self.check(request)
        client = self._client
        real = client._guard  # noqa: SLF001 - fault injection swaps the guard for one call
        client._guard = _CrashingGuard(real)  # noqa: SLF001
        try:
            client.train_round(global_state=state, round=request.round, model_hash=digest)
        finally:
            client._guard = real  # noqa: SLF001
        raise AssertionError("unreachable")  # pragma: no cover


class _CrashingGuard:
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


#: A job's metric: ``metric(model, dataset)`` -> an :class:`~secfedtl.training.evaluate.Evaluation`
#: (its ``accuracy`` is the score reported, higher is better; default :func:`~secfedtl.training.evaluate`).
Metric = Callable[[nn.Module, Dataset], Any]


def _accuracy(model: nn.Module, datasets: Mapping[str, Dataset], metric: Metric = evaluate) -> dict[str, Any]:
    acc, samples = {}, {}
    for split, data in datasets.items():
        ev = metric(model, data)
        acc[split], samples[split] = ev.accuracy, ev.num_samples
    return {"accuracy": acc, "samples": samples}


class LocalReports:
    """Where a node keeps what its local tasks computed on its own data: one JSON file per task
    and round in ``directory`` (mode 0600), never sent to the server. ``directory=None`` keeps
    them in memory only (:attr:`latest`)."""

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self.directory = None if directory is None else Path(directory)
        self.latest: dict[str, dict[str, Any]] = {}

    def write(self, task: str, round: int, info: Mapping[str, Any]) -> None:
        record = {"task": task, "round": round, **info}
        self.latest[task] = record
        if self.directory is not None:
            self.directory.parent.mkdir(mode=0o700, exist_ok=True)
            self.directory.mkdir(mode=0o700, exist_ok=True)
            payload = json.dumps(record, indent=2, sort_keys=True).encode("utf-8")
            atomic_write(self.directory / f"{task}-round{round}.json",
                         lambda fh: (os.fchmod(fh.fileno(), 0o600), fh.write(payload)))

    def read(self, task: str, round: int) -> dict[str, Any] | None:
        """The report of ``task`` in ``round`` (from the folder, or from memory)."""
        if self.directory is not None:
            path = self.directory / f"{task}-round{round}.json"
            if path.exists():
                return json.loads(path.read_text(encoding="utf-8"))
        latest = self.latest.get(task)
        return latest if latest is not None and latest["round"] == round else None


class _LocalTask:
    """A task whose results stay at the node, in its :class:`LocalReports` (shares
    ``TrainTask``'s request check)."""

    def __init__(self, client: PrivateClient, datasets: Mapping[str, Dataset], *,
                 train: TrainTask | None = None, reports: LocalReports | None = None,
                 metric: Metric = evaluate) -> None:
        self._client = client
        self._datasets = dict(datasets)
        self._metric = metric
        self._train = train or TrainTask(client)
        self.reports = reports if reports is not None else LocalReports()

    def _report(self, request: wire.TaskRequest, model: nn.Module) -> TaskOutput:
        info = _accuracy(model, self._datasets, self._metric)
        info["epsilon"] = self._client._guard.budget.spent_epsilon  # noqa: SLF001
        self.reports.write(request.task, request.round, info)
        return TaskOutput()


class EvaluateTask(_LocalTask):
    """The ``"evaluate"`` task: accuracy of the global weights on the client's own evaluation
    splits, and the epsilon it has spent, written to its local report (nothing is sent back)."""

    def __call__(self, request: wire.TaskRequest, digest: str) -> TaskOutput:
        state = self._train.check(request)
        return self._report(request, model_with_params(self._client.model, state))


class PersonaliseTask(_LocalTask):
    """The ``"personalise"`` task: one more DP round on the global weights, kept locally (charged
    to the budget as ``release="local_model"``), then the personalised model's accuracy on the
    client's evaluation splits in its local report (nothing is sent back)."""

    def __call__(self, request: wire.TaskRequest, digest: str) -> TaskOutput:
        state = self._train.check(request)
        self._client.train_round(global_state=state, round=request.round, model_hash=digest,
                                 release="local_model")
        return self._report(request, self._client.model)


def standard_tasks(client: PrivateClient, evaluation: Mapping[str, Dataset], *,
                   frozen_hash: str | None = None, reports: LocalReports | None = None,
                   metric: Metric = evaluate) -> dict[str, Task]:
    """``train``, ``evaluate`` and ``personalise`` for one private client (the last two score
    with ``metric`` and report into ``reports``, at the client)."""
    train = TrainTask(client, frozen_hash=frozen_hash)
    reports = reports if reports is not None else LocalReports()
    local = dict(train=train, reports=reports, metric=metric)
    return {"train": train, "evaluate": EvaluateTask(client, evaluation, **local),
            "personalise": PersonaliseTask(client, evaluation, **local)}


def encoding_from_options(options: Mapping[str, Any]) -> FixedPointEncoding:
    """The fixed-point encoding a secure task's request announces (``options["encoding"]``)."""
    spec = options.get("encoding")
    if not isinstance(spec, Mapping) or set(spec) != {"clip", "bits", "num_clients", "max_weight"}:
        raise RemoteProtocolError("a secure task must announce its encoding (clip, bits, num_clients, max_weight)")
    bits = spec["bits"]
    if isinstance(bits, int) and not isinstance(bits, bool) and bits < MIN_FIXED_POINT_BITS:
        raise RemoteProtocolError(f"a fixed-point encoding of {bits} bits: a float update needs at least "
                                  f"{MIN_FIXED_POINT_BITS}")
    try:
        return FixedPointEncoding(clip=float(spec["clip"]), bits=spec["bits"], num_clients=spec["num_clients"],
                                  max_weight=spec["max_weight"])
    except (ConfigError, TypeError, ValueError) as exc:
        raise RemoteProtocolError(f"invalid encoding: {exc}") from exc


class ClientNode:
    """One client's side of every round (see the module docstring).

    ``tasks`` maps task names to callables; ``identity`` is this node's long-term Ed25519
    signing key, ``roster`` the federation's pinned public keys (``identity``'s among them) and
    ``policy`` what sessions it accepts (default :class:`~secfedtl.federated.roster.NodePolicy()`);
    ``seed`` seeds the (public, non-secret) stochastic rounding of the encoding; ``faults`` maps
    a round to a fault from :data:`FAULTS`. The tasks in :data:`REPEATABLE_TASKS` may be asked
    more than once per round (public queries); every other task is answered once per round. The
    fewest parties the node aggregates with is its ``policy``'s ``min_parties``.
    """

    def __init__(self, *, name: str, tasks: Mapping[str, Task], identity: SigningKey, roster: Roster,
                 policy: NodePolicy | None = None, seed: int = 0, faults: Mapping[int, str] | None = None,
                 prekey: tuple[str, Callable[[int, SessionParams], None]] | None = None) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigError("a node needs a non-empty name")
        if not isinstance(identity, SigningKey) or not isinstance(roster, Roster):
            raise ConfigError("a node needs its signing key (identity) and the federation's roster")
        if roster.name_of(identity.public) is None:
            raise ConfigError(f"node {name!r}: its signing key is not in the roster")
        policy = NodePolicy() if policy is None else policy
        if not isinstance(policy, NodePolicy):
            raise ConfigError("policy must be a NodePolicy")
        if policy.parties_required(roster) > len(roster):
            raise ConfigError(f"the policy asks for {policy.parties_required(roster)} parties; the roster has {len(roster)}")
        if not tasks:
            raise ConfigError("a node needs at least one task")
        for r, fault in (faults or {}).items():
            if fault not in FAULTS:
                raise ConfigError(f"unknown fault {fault!r} for round {r}; faults are {FAULTS}")
        self.name = name
        self._tasks = dict(tasks)
        self._seed = seed
        self.faults: dict[int, str] = dict(faults or {})
        self._identity = identity
        self._roster = roster
        self._policy = policy
        self._answered: set[tuple[int, str]] = set()  # (round, task) already run
        self._repeated: set[tuple[int, str]] = set()  # (round, task) of repeatable tasks answered
        self._sessions_joined = 0
        self._round: int | None = None
        self._digest = ""
        self._encoding: FixedPointEncoding | None = None
        self._integer: dict[str, int] | None = None  # the announced integer field of this round's contribution
        self._min_survivors = 0
        self._colluders = 0
        self._field: np.ndarray | None = None
        self._session: ClientSession | None = None
        self._silent: set[int] = set()  # rounds this node fell silent in (fault plan)
        if prekey is not None and (not isinstance(prekey, tuple) or len(prekey) != 2 or prekey[0] not in self._tasks
                                   or not callable(prekey[1])):
            raise ConfigError("prekey must be (the name of one of the node's tasks, its session check)")
        self._prekey = prekey
        self._prekeyed: dict[int, ClientSession] = {}  # round -> session set up before its task
        self._declined: set[int] = set()  # pre-keyed rounds whose task this node refused or failed

    def __repr__(self) -> str:  # never shows vectors or keys
        return f"ClientNode(name={self.name!r}, tasks={sorted(self._tasks)}, round={self._round})"

    def handle(self, blob: bytes) -> list[bytes]:
        """Answer one message (bytes of :mod:`~secfedtl.federated.wire`) with zero or more replies."""
        message = wire.decode(blob)
        if isinstance(message, wire.TaskRequest):
            replies = self._on_task(message)
            if self._is_step(message):
                if any(r.status != "ready" for r in replies):
                    if message.round in self._prekeyed:
                        # refused or failed: the pre-keyed session gets no input; its frames go unanswered
                        self._drop_prekeyed(message.round)
                        self._declined.add(message.round)
                else:  # steps run one after another: the sessions of earlier steps are over
                    for earlier in [r for r in self._prekeyed if r < message.round]:
                        self._drop_prekeyed(earlier)
            return [wire.encode(reply) for reply in replies]
        if isinstance(message, wire.Join):
            return self._on_join(message)
        if isinstance(message, wire.SecAggFrame):
            return self._on_frame(message)
        raise RemoteProtocolError(f"a node does not accept {type(message).__name__}")

    def _is_step(self, request: wire.TaskRequest) -> bool:
        """Whether ``request`` is for the task whose sessions may be pre-keyed (``prekey``)."""
        return self._prekey is not None and request.task == self._prekey[0]

    def _silent_from(self, phase: str, round: int | None = None) -> bool:  # noqa: A002
        round = self._round if round is None else round  # noqa: A001
        fault = self.faults.get(round) if round is not None else None
        if fault in PHASES and PHASES.index(fault) <= PHASES.index(phase):
            self._silent.add(round)  # type: ignore[arg-type]
        return round in self._silent

    def _forget(self) -> None:
        self._field = None
        self._session = None
        self._encoding = None
        self._integer = None
        self._min_survivors = 0
        self._colluders = 0

    def _on_task(self, request: wire.TaskRequest) -> list[wire.TaskReply]:
        key = (request.round, request.task)
        if self._is_step(request) and request.round in self._declined:
            # its pre-keyed session was aborted or its step refused: the step runs nowhere else
            # (checked before anything is touched: the node's state stays as it is)
            raise ReplayError(f"step {request.round}'s session was declined; the step is not run")
        if request.task not in REPEATABLE_TASKS:
            if key in self._answered:  # before anything is touched: the node's state stays as it is
                raise ReplayError(f"task {request.task!r} of round {request.round} was already answered")
            limit = self._policy.max_tasks
            if limit is not None and len(self._answered) >= limit:
                raise PolicyError(f"this node already ran {len(self._answered)} tasks, its policy's maximum")
            self._answered.add(key)
        else:
            # repeatable, but not without end: each round's answer is a report file at the
            # hospital, so a server inventing round numbers could fill its disk
            limit = self._policy.max_tasks
            if (limit is not None and key not in self._repeated
                    and len({r for r, t in self._repeated if t == request.task}) > limit):
                raise PolicyError(f"this node already answered {request.task!r} for {limit + 1} rounds, "
                                  "its policy's maximum")
            self._repeated.add(key)
        self._forget()
        self._round = request.round
        self._silent.discard(request.round)
        self._digest = wire.request_digest(request)
        prekeyed = self._prekeyed.get(request.round) if self._is_step(request) else None
        if prekeyed is not None:
            try:  # before anything runs or is charged
                self._check_prekeyed_request(request, prekeyed)
            except SecFedTLError:
                self._drop_prekeyed(request.round)
                self._declined.add(request.round)
                raise
        task = self._tasks.get(request.task)
        if task is None:
            return [wire.TaskReply(round=request.round, status="failed", info={"reason": "unknown task"})]
        integer = "integer" in request.options
        secure = "encoding" in request.options or integer
        try:
            if "encoding" in request.options and integer:
                raise RemoteProtocolError("a request announces either a fixed-point encoding or an integer field")
            encoding = encoding_from_options(request.options) if secure and not integer else None
            spec = integer_spec(request.options) if integer else None
            if self.faults.get(request.round) == "train":
                crash: Callable[..., TaskOutput] | None = getattr(task, "crash", None)
                if crash is None:
                    raise ConfigError(f"task {request.task!r} cannot simulate a crash")
                crash(request, self._digest)
            output = task(request, self._digest)
        except PrivacyBudgetExceeded:
            # Budgets are spent by public mechanisms only, so "refused" says nothing private; the
            # projected epsilon in the exception stays here.
            return [wire.TaskReply(round=request.round, status="refused", info={"reason": "budget"})]
        except TooFewSurvivorsError:
            # The announced cohort (public) is below this node's own policy: refused before charging.
            return [wire.TaskReply(round=request.round, status="refused", info={"reason": "policy"})]
        except Exception as exc:  # noqa: BLE001
            # whatever a task trips over (the server's options, the node's own data): a failed
            # reply with a fixed reason, never a crash of the node; the log names the type only
            log.warning("node %s: task %r of round %d failed: %s", self.name, request.task, request.round,
                        type(exc).__name__)
            return [wire.TaskReply(round=request.round, status="failed", info={"reason": "failed"})]
        if not secure:
            if output.vector is not None:
                raise ConfigError(f"task {request.task!r} returned a vector but the request announced no encoding")
            return [wire.TaskReply(round=request.round, status="done", info={})]
        if spec is not None:
            replies = self._keep_integer(request.round, spec, output)
            if prekeyed is not None:
                return self._feed_prekeyed(request.round, prekeyed, replies)
            return replies
        assert encoding is not None
        if output.vector is None:
            return [wire.TaskReply(round=request.round, status="failed", info={"reason": "failed"})]
        try:
            rng = np.random.default_rng([self._seed, request.round])  # rounding only: not secret
            self._field = encoding.encode(np.asarray(output.vector, dtype=np.float64), weight=output.weight, rng=rng)
        except (SecFedTLError, ValueError):
            return [wire.TaskReply(round=request.round, status="failed", info={"reason": "failed"})]
        self._encoding = encoding
        return [wire.TaskReply(round=request.round, status="ready", info={})]

    def _keep_integer(self, round: int, spec: dict[str, int], output: TaskOutput) -> list[wire.TaskReply]:  # noqa: A002
        """Keep a task's integer-field contribution (the integer input path of secure aggregation)."""
        field = output.field
        dtype = np.uint32 if spec["bits"] <= 32 else np.uint64
        if (field is None or not isinstance(field, np.ndarray) or field.ndim != 1 or field.size != spec["length"]
                or field.dtype != dtype or (spec["bits"] < 64 and int(field.max(initial=0)) >> spec["bits"])
                or output.min_survivors < 0):
            return [wire.TaskReply(round=round, status="failed", info={"reason": "failed"})]
        self._field, self._integer = field, spec
        self._min_survivors, self._colluders = output.min_survivors, output.colluders
        return [wire.TaskReply(round=round, status="ready", info={})]

    def _on_join(self, join: wire.Join) -> list[bytes]:
        if (join.round != self._round or self._field is None or self._session is not None
                or (self._encoding is None and self._integer is None)):
            if self._prekey is not None:  # no contribution ready for it: a session set up ahead of its step
                return self._prejoin(join)
            raise RemoteProtocolError("join without a contribution ready for this round")
        session = join.session
        if session.context != bytes.fromhex(self._digest):
            raise RemoteProtocolError("the session is bound to another request than the one this node ran")
        self._check_session(session)
        self._check_parties(join)
        self._policy.check(session.config, roster=self._roster, sessions_joined=self._sessions_joined)
        if self._silent_from("advertise"):
            return []
        self._session = ClientSession(params=session, client_id=join.index, input_vector=self._field,
                                      identity=self._identity, peer_identities=dict(enumerate(join.parties)))
        self._sessions_joined += 1
        advert = self._session.start()
        return [wire.encode(wire.SecAggFrame(round=join.round, data=codec.encode(advert)))]

    def _prejoin(self, join: wire.Join) -> list[bytes]:
        """Set up the session of a step whose request has not come yet (docs/protocol.md,
        "Pre-keyed steps"): its keys and shares only, no input. Checked first: the step is not
        answered or keyed yet, the session against this node's own plan (the ``prekey`` check:
        field, length, fewest survivors, colluders), the parties against the roster and the
        session against the policy. The input follows with the step's request, which must be
        the one the session is bound to (:func:`~secfedtl.federated.wire.step_context`).

        A refused session is *declined*: no reply and a log line naming the refusal's type, not
        an exception, so the other steps' ``Join`` of the same batch still get their answers."""
        try:
            return self._prejoin_checked(join)
        except SecFedTLError as exc:
            log.warning("node %s: declined a Join for step %d (no contribution ready, so a session ahead of its "
                        "step): %s", self.name, join.round, type(exc).__name__)
            return []

    def _prejoin_checked(self, join: wire.Join) -> list[bytes]:
        assert self._prekey is not None
        task, check = self._prekey
        if (join.round, task) in self._answered or join.round in self._declined:
            raise ReplayError(f"step {join.round} was already run; its session cannot be set up again")
        if join.round in self._prekeyed:
            raise ReplayError(f"the session of step {join.round} is already set up")
        if len(self._prekeyed) >= MAX_PREKEYED:
            raise PolicyError(f"this node already holds {len(self._prekeyed)} pre-keyed sessions, the most it holds")
        check(join.round, join.session)
        self._check_parties(join)
        self._policy.check(join.session.config, roster=self._roster, sessions_joined=self._sessions_joined)
        if self._silent_from("advertise", join.round):
            return []
        session = ClientSession(params=join.session, client_id=join.index, identity=self._identity,
                                peer_identities=dict(enumerate(join.parties)))
        self._sessions_joined += 1
        advert = session.start()
        self._prekeyed[join.round] = session
        return [wire.encode(wire.SecAggFrame(round=join.round, data=codec.encode(advert)))]

    @staticmethod
    def _check_prekeyed_request(request: wire.TaskRequest, session: ClientSession) -> None:
        """A step request against its pre-keyed session, before the step runs: the session's
        binding (the request without weights) and the announced field and cohort."""
        if session.params.context != wire.step_context(request):
            raise RemoteProtocolError("the pre-keyed session of this step is bound to another request")
        spec = integer_spec(request.options)
        cfg = session.params.config
        if (cfg.num_clients > spec["num_clients"] or cfg.bits != spec["bits"]
                or session.params.vector_length != spec["length"]):
            raise RemoteProtocolError("the pre-keyed session's field or cohort is not the one the step announces")

    def _feed_prekeyed(self, round: int, session: ClientSession, replies: list[wire.TaskReply]) -> list[wire.TaskReply]:  # noqa: A002
        """The step's contribution goes into its pre-keyed session (after the same checks a
        ``Join`` gets), under the digest of the whole request (weights included) as its input
        context, and is kept nowhere else: no second session can take it. Should a check fail,
        the share goes nowhere (the session is dropped and the step declined)."""
        if [r.status for r in replies] != ["ready"]:
            return replies
        assert self._field is not None
        try:
            self._check_session(session.params)
            session.provide_input(self._field, context=bytes.fromhex(self._digest))
        except SecFedTLError:
            self._drop_prekeyed(round)
            self._forget()
            self._declined.add(round)
            raise
        self._field = None
        self._session = session
        # the digest of the request this share answers (the server's own request, not data): an
        # honest server leaves out a party that received another one, whose masks would not cancel
        return [wire.TaskReply(round=round, status="ready", info={"digest": self._digest})]

    def _drop_prekeyed(self, round: int) -> None:  # noqa: A002
        session = self._prekeyed.pop(round, None)
        if session is not None and session is self._session:
            self._forget()

    def _check_parties(self, join: wire.Join) -> None:
        if any(self._roster.name_of(key) is None for key in join.parties):
            raise UnknownPartyError("the session names a party that is not in this node's roster")
        if join.parties[join.index] != self._identity.public:
            raise UnknownPartyError("the session puts another party at this node's index")

    def _check_session(self, session: SessionParams) -> None:
        """The session against the contribution this node holds for its round (the announced
        field or encoding, cohort, fewest survivors, colluders, vector length)."""
        cfg = session.config
        assert self._field is not None
        if self._integer is not None:
            spec = self._integer
            if cfg.num_clients > spec["num_clients"] or cfg.bits != spec["bits"]:
                raise RemoteProtocolError("the session's field or cohort is not the one announced with the task")
            if cfg.num_clients < self._min_survivors or cfg.min_survivors < self._min_survivors:
                # never help unmask a sum of fewer parties than this contribution's noise assumes
                raise PolicyError(f"the session may unmask a sum of {cfg.min_survivors} parties; this contribution "
                                  f"needs at least {self._min_survivors}")
            if cfg.tolerated_colluders < self._colluders:
                # the noise count assumes secure aggregation holds against that many colluders
                raise PolicyError(f"the session tolerates {max(0, cfg.tolerated_colluders)} colluders; this "
                                  f"contribution's noise assumes {self._colluders}")
        elif not self._fixed_point_matches(cfg):
            raise RemoteProtocolError("the session's encoding or cohort is not the one announced with the task")
        if session.vector_length != self._field.size:
            raise RemoteProtocolError("the session's vector length does not match this node's contribution")

    def _fixed_point_matches(self, cfg: Any) -> bool:
        enc = self._encoding
        assert enc is not None
        return not (cfg.num_clients > enc.num_clients or cfg.clip != enc.clip or cfg.bits != enc.bits
                    or cfg.max_weight != enc.max_weight or cfg.encoding.scale != enc.scale)

    def _on_frame(self, frame: wire.SecAggFrame) -> list[bytes]:
        session = self._prekeyed.get(frame.round)
        if session is None and frame.round == self._round:
            session = self._session
        if session is None:
            if frame.round in self._declined:
                return []  # this node refused or failed the step: it has no input to mask
            raise RemoteProtocolError("secure-aggregation message outside this node's round")
        message = codec.decode(frame.data)
        phase = REPLY_PHASE.get(type(message))
        if phase is None:
            raise RemoteProtocolError(f"a node does not accept {type(message).__name__}")
        if self._silent_from(phase, frame.round):
            return []
        try:
            replies = session.receive(message)
        except TooFewSurvivorsError:
            self._end_session(frame.round, session)  # refuses to go on: a dropout
            return []
        except SecFedTLError as exc:
            prekeyed = self._prekeyed.get(frame.round) is session
            self._end_session(frame.round, session)  # the session is aborted: drop its keys
            if not prekeyed:
                raise
            # one pre-keyed session's refusal silences that session only, not the batch it came in
            log.warning("node %s: aborted the pre-keyed session of step %d: %s", self.name, frame.round,
                        type(exc).__name__)
            self._declined.add(frame.round)
            return []
        if phase == "unmask":
            self._end_session(frame.round, session)  # round done: drop the keys and the vector
        return [wire.encode(wire.SecAggFrame(round=frame.round, data=codec.encode(r))) for r in replies]

    def _end_session(self, round: int, session: ClientSession) -> None:  # noqa: A002
        if self._prekeyed.get(round) is session:
            del self._prekeyed[round]
        if session is self._session:
            self._forget()


__all__ = ["FAULTS", "ClientNode", "EvaluateTask", "LocalReports", "PersonaliseTask", "Task", "TaskOutput", "TrainTask",
           "encoding_from_options", "standard_tasks"]
