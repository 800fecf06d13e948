"""Flower 1.41's SecAgg+ timed phase by phase, for `secfedtl bench secagg --compare-flower`.

Nothing of Flower's protocol is re-implemented here: the server side is Flower's own
``SecAggPlusWorkflow`` (its four stage methods, called in the order its ``__call__`` calls them),
and every client is Flower's own ``ClientApp`` with Flower's ``secaggplus_mod``. What this module
adds is the plumbing a Flower run would get from a SuperLink: an in-process :class:`Grid` that
hands each message to the destination node's ClientApp and brings the reply back, both ways
through Flower's own protobuf serde (``message_to_proto`` / ``SerializeToString``), as a real
deployment's wire would. Flower's simulation engine was not used: it runs the same workflow and
mod, but adds Ray actors and LinkState polling, which are not secure-aggregation work (and
secfedtl's side of the bench is timed in process too).

Timing: the grid times each client call per stage (and the serde, separately); the server time of
a stage is the stage's wall clock less the grid's time in it. A small mod inside
``secaggplus_mod`` times the client's training call (a NumPyClient that returns its fixed vector)
so that masking excludes it, and the strategy's ``aggregate_fit`` (FedAvg over results that all
already carry the unmasked aggregate) is timed and left out of unmasking.

This module imports flwr at import time; :mod:`secfedtl.bench.secagg` imports it only when asked
to compare.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence

import flwr
import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Parameters, parameters_to_ndarrays
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=no-name-in-module
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.server_config import ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import SecAggPlusWorkflow, WorkflowState
from flwr.serverapp.grid import Grid
from flwr.supercore.task_identity import TaskIdentity

RUN_ID = 1
STAGES = (Stage.SETUP, Stage.SHARE_KEYS, Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK)


def flower_num_shares(degree: int, num_clients: int) -> int:
    """Flower's ``num_shares`` that gives each client ``degree`` neighbours, or the nearest it allows.

    Flower's graph is a ring over the shuffled clients: a client's neighbourhood is itself and the
    ``num_shares // 2`` clients on each side, so it has ``num_shares - 1`` neighbours and
    ``num_shares`` must be odd below ``n`` (an even value breaks its share indexing). An even
    secfedtl degree ``k`` therefore maps to ``k + 1`` (the same ``k`` neighbours, ``k`` pairwise
    masks); an odd ``k`` maps to ``k`` (``k - 1`` neighbours: one pairwise mask fewer than ours).
    The complete graph (``k = n - 1``) maps to ``n``.
    """
    if degree >= num_clients - 1:
        return num_clients
    return degree + 1 if degree % 2 == 0 else degree


class _Clock:
    """Seconds per key, read from ``now`` (time.perf_counter: wall; time.process_time: CPU)."""

    def __init__(self, now: Callable[[], float] = time.perf_counter) -> None:
        self.now = now
        self.seconds: dict[str, list[float]] = {}

    def add(self, key: str, seconds: float) -> None:
        self.seconds.setdefault(key, []).append(seconds)

    def total(self, key: str) -> float:
        return float(sum(self.seconds.get(key, [])))


def _through_wire(message: Message, clock: _Clock) -> tuple[Message, int]:
    """The message after Flower's protobuf encoding and decoding; its size in bytes."""
    t0 = clock.now()
    blob = message_to_proto(message).SerializeToString()
    out = message_from_proto(ProtoMessage.FromString(blob))
    clock.add("serde", clock.now() - t0)
    return out, len(blob)


class LocalGrid(Grid):
    """Delivers each message to its node's ClientApp in this process (no SuperLink, no threads).

    ``silent_from`` maps a node id to the first stage it no longer answers (a dropout).
    """

    def __init__(self, apps: dict[int, tuple[ClientApp, Context]], clock: _Clock, *,
                 silent_from: dict[int, str]) -> None:
        self._apps = apps
        self._clock = clock
        self._silent_from = silent_from
        self._run = None
        self.wire_bytes = 0
        self.busy_s = 0.0  # client calls and serde: time that is not the server's

    def set_run(self, run) -> None:  # noqa: ANN001
        self._run = run

    @property
    def run(self):  # noqa: ANN201
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._apps)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("LocalGrid answers through send_and_receive only")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("LocalGrid answers through send_and_receive only")

    def _silent(self, node_id: int, stage: str) -> bool:
        first = self._silent_from.get(node_id)
        return first is not None and STAGES.index(stage) >= STAGES.index(first)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        t_start = self._clock.now()
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            message.metadata.__dict__["_run_id"] = RUN_ID
            received, size = _through_wire(message, self._clock)
            self.wire_bytes += size
            stage = received.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]
            if self._silent(message.metadata.dst_node_id, stage):
                continue
            app, context = self._apps[message.metadata.dst_node_id]
            t0 = self._clock.now()
            reply = app(received, context)
            self._clock.add(f"client:{stage}", self._clock.now() - t0)
            back, size = _through_wire(reply, self._clock)
            self.wire_bytes += size
            replies.append(back)
        self.busy_s += self._clock.now() - t_start
        return replies


class _FixedVectorClient(NumPyClient):
    """A client whose 'training' returns a fixed vector with weight 1."""

    def __init__(self, vector: np.ndarray) -> None:
        self.vector = vector

    def fit(self, parameters, config):  # noqa: ANN001, ANN201
        return [self.vector], 1, {}


def _client_fn(vector: np.ndarray) -> Callable:
    def client_fn(context: Context):  # noqa: ANN202 (Flower checks this exact signature)
        return _FixedVectorClient(vector).to_client()
    return client_fn


def _timing_mod(clock: _Clock) -> Callable:
    """A mod placed after secaggplus_mod: times the training call that masking must not count."""
    def mod(message: Message, context: Context, call_next: Callable) -> Message:
        t0 = clock.now()
        out = call_next(message, context)
        clock.add("client:train", clock.now() - t0)
        return out
    return mod


class _KeepAggregate(FedAvg):
    """FedAvg that samples every client; aggregate_fit returns the unmasked aggregate (timed).

    Flower's SecAgg+ workflow writes the unmasked weighted average into every result before it
    calls ``aggregate_fit``; FedAvg would average those identical copies again.
    """

    def __init__(self, num_clients: int, clock: _Clock) -> None:
        super().__init__(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=num_clients,
                         min_available_clients=num_clients)
        self._clock = clock
        self.aggregate: np.ndarray | None = None
        self.num_results = 0

    def aggregate_fit(self, server_round, results, failures):  # noqa: ANN001, ANN201
        t0 = self._clock.now()
        self.num_results = len(results)
        params: Parameters = results[0][1].parameters
        self.aggregate = parameters_to_ndarrays(params)[0]
        self._clock.add("server:aggregate_fit", self._clock.now() - t0)
        return params, {}


def run_secaggplus(vectors: Sequence[np.ndarray], *, num_shares: int, threshold: int, num_dropped: int,
                   clipping_range: float, modulus_bits: int = 32,
                   clock: Callable[[], float] = time.perf_counter) -> dict:
    """One SecAgg+ round of Flower's workflow and mod over ``vectors``; a report per phase.

    The first ``num_dropped`` clients answer the set-up and share-keys stages and then fall silent
    (secfedtl's costly case: their pairwise masks must be removed). Every client's weight is 1,
    so the workflow's result is the mean of the surviving clients' clipped vectors. Phases are
    timed with ``clock``; the whole round is reported in both wall and CPU seconds.
    """
    n = len(vectors)
    modulus_range = 2 ** min(modulus_bits, 32)  # Flower's masks live below 2**32
    # The largest power-of-two quantisation range whose n-client sum (values up to the range
    # itself, weights as large) cannot wrap around the modulus.
    quantization_range = 2 ** int(np.floor(np.log2((modulus_range - 1) / n)))
    clock = _Clock(clock)
    node_ids = list(range(1001, 1001 + n))
    apps: dict[int, tuple[ClientApp, Context]] = {}
    for node_id, vector in zip(node_ids, vectors, strict=True):
        app = ClientApp(client_fn=_client_fn(vector), mods=[secaggplus_mod, _timing_mod(clock)])
        apps[node_id] = (app, Context(run_id=RUN_ID, node_id=node_id, node_config={}, state=RecordDict(),
                                      run_config={}))
    silent = {nid: Stage.COLLECT_MASKED_VECTORS for nid in node_ids[:num_dropped]}
    grid = LocalGrid(apps, clock, silent_from=silent)

    strategy = _KeepAggregate(n, clock)
    manager = SimpleClientManager()
    for node_id in node_ids:
        manager.register(GridClientProxy(node_id, grid, RUN_ID))
    context = LegacyContext(Context(run_id=RUN_ID, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            config=ServerConfig(num_rounds=1), strategy=strategy, client_manager=manager)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: 1})
    # The global model is not part of secure aggregation on either side: a one-entry placeholder.
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord([np.zeros(1, dtype=np.float32)])

    workflow = SecAggPlusWorkflow(num_shares=num_shares, reconstruction_threshold=threshold, max_weight=1.0,
                                  clipping_range=float(clipping_range), quantization_range=quantization_range,
                                  modulus_range=modulus_range)
    state = WorkflowState()
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)  # pylint: disable=protected-access
    # What Flower's own ServerApp runners set before a workflow runs (flwr/server/compat/app.py).
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, RUN_ID, SUPERLINK_NODE_ID
    stages = {Stage.SETUP: workflow.setup_stage, Stage.SHARE_KEYS: workflow.share_keys_stage,
              Stage.COLLECT_MASKED_VECTORS: workflow.collect_masked_vectors_stage,
              Stage.UNMASK: workflow.unmask_stage}
    server_s: dict[str, float] = {}
    completed = True
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.WARNING)  # its per-stage INFO lines would go into the bench's output
    t_round, cpu_round = time.perf_counter(), time.process_time()
    try:
        for stage in STAGES:  # the order SecAggPlusWorkflow.__call__ runs them
            busy0, t0 = grid.busy_s, clock.now()
            ok = stages[stage](grid, context, state)
            server_s[stage] = clock.now() - t0 - (grid.busy_s - busy0)
            if not ok:
                completed = False
                break
    finally:
        round_wall, round_cpu = time.perf_counter() - t_round, time.process_time() - cpu_round
        flwr_logger.setLevel(level)
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved  # pylint: disable=protected-access

    survivors = [np.clip(np.asarray(v, dtype=np.float64), -clipping_range, clipping_range)
                 for v in vectors[num_dropped:]]
    expected = np.mean(survivors, axis=0)
    # Stochastic rounding moves each client's value by less than one quantisation step, so their
    # mean moves by less than one step too (plus float rounding).
    bound = 2 * clipping_range / quantization_range * (1 + 1e-6) + 1e-12
    max_error = float(np.max(np.abs(strategy.aggregate - expected))) if strategy.aggregate is not None else None
    masking = list(np.subtract(clock.seconds.get(f"client:{Stage.COLLECT_MASKED_VECTORS}", []),
                               clock.seconds.get("client:train", [])))
    aggregate_fit = clock.total("server:aggregate_fit")
    return {
        "flwr_version": flwr.__version__,
        "driven_by": "SecAggPlusWorkflow stages + ClientApp(mods=[secaggplus_mod]) over an in-process Grid, "
                     "every message through Flower's protobuf serde",
        "clients": n, "params": int(vectors[0].size), "num_shares": num_shares,
        "neighbours": min(num_shares, n) - 1, "threshold": threshold, "dropped": num_dropped,
        "included": strategy.num_results, "completed": completed,
        "modulus_range": modulus_range, "quantization_range": quantization_range,
        "clipping_range": float(clipping_range), "authenticated": False,
        "setup_s": clock.total(f"client:{Stage.SETUP}") + clock.total(f"client:{Stage.SHARE_KEYS}"),
        "mask_per_client_s": float(np.mean(masking)) if masking else 0.0,
        "client_train_call_s": clock.total("client:train"),
        "server_intake_s": server_s.get(Stage.COLLECT_MASKED_VECTORS, 0.0),
        "unmask_s": server_s.get(Stage.UNMASK, 0.0) - aggregate_fit,
        "server_total_s": sum(server_s.values()) - aggregate_fit,
        "server_s_by_stage": server_s,
        "serde_s": clock.total("serde"),
        "round_wall_s": round_wall,
        "round_cpu_s": round_cpu,
        "wire_bytes": grid.wire_bytes,
        "max_abs_error": max_error,
        "error_bound": bound,
        "sum_correct": completed and max_error is not None and max_error <= bound,
    }
