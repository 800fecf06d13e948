"""secfedtl on Flower (optional extra ``secfedtl[flower]``, Flower 1.41 Message API).

* :data:`server_app` (a Flower ``ServerApp``) runs the same server loop as ``secfedtl run``
  (:class:`~secfedtl.federated.federation.Federation`) over a :class:`FlowerPool`: every exchange
  of the loop (the task, each secure-aggregation phase, every evaluation query) is one Flower
  message round, ``grid.push_messages`` then ``grid.pull_messages`` until every reply is in or
  the phase timeout passes. A node whose reply is missing, late, an Error, or malformed is
  silent for that phase, which the server loop counts as a dropout.
* :data:`client_app` (a Flower ``ClientApp``) is a relay: it forwards the bytes of each message
  to the hospital's node agent (:mod:`secfedtl.runtime.agent`) over a local Unix socket and
  returns the agent's bytes. Flower 1.41 starts a new ClientApp process for every message, so
  the node (data, DP client, budget, ledger, secure-aggregation keys) lives in the agent, never
  in Flower's processes or in Flower's state storage (``Context.state`` is not used).

Each Flower message carries one :class:`~flwr.app.ConfigRecord` under the key ``"secfedtl"``:
``op`` (``"hello"`` or ``"exchange"``) and, for an exchange, ``batch``: bytes of
:mod:`secfedtl.runtime.batch` around messages of :mod:`secfedtl.federated.wire`
(both versioned; decoders raise only ``DecodeError``). Flower's own SecAgg+ mod is not used:
secfedtl's secure aggregation runs inside these bytes.

Which node is which hospital: the server sends a ``hello`` to every connected node and the relay
answers with its agent's name. Configure the relay with the SuperNode's node config::

    flower-supernode ... --node-config "agent='/srv/secfedtl/hungary.sock'"

In Flower's simulation engine (no SuperNodes to configure) the relay finds the agent of virtual
node ``partition-id`` k at ``<dir>/partition-k.sock``, where ``dir`` is the environment variable
``SECFEDTL_SIMULATION_AGENT_DIR`` that :mod:`secfedtl.runtime.deploy` sets for the processes it
starts (it starts those agents too); never from the run config, which the server writes.

Run config of the app (``flwr run ... --run-config``): ``job`` (path of the job TOML on the
server machine; empty: the job's bundled default), ``job-code`` (``MODULE:ATTR`` of the
:class:`~secfedtl.federated.job.FederatedJob` installed on the server machine; empty: the bundled
heart job; the relays ignore it: each hospital's agent runs the job its own operator configured
with ``secfedtl node --job``), ``roster`` (path of the federation's roster on
the server machine, :mod:`secfedtl.federated.roster`; required: the server names each session
party's signing key from it, and every hospital checks them against its own copy), ``out`` (the
server's output directory),
``phase-timeout`` and ``discovery-timeout`` (seconds), ``poll-interval`` (seconds between pulls).
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from secfedtl._atomic import atomic_write
from secfedtl.errors import ConfigError, DecodeError, SecFedTLError
from secfedtl.runtime.agent import AgentClient
from secfedtl.runtime.batch import pack_batch, unpack_batch

log = logging.getLogger(__name__)

RECORD = "secfedtl"
MESSAGE_TYPE = "query.secfedtl"
#: The app's run-config keys and their defaults (also in the app's pyproject.toml).
RUN_CONFIG: dict[str, Any] = {"job": "", "job-code": "", "roster": "", "out": "runs/flower", "phase-timeout": 300.0,
                              "discovery-timeout": 300.0, "poll-interval": 0.2,
                              "record-view": False}


def _record(message: Message) -> Any:
    return message.content[RECORD]


class FlowerPool:
    """A :class:`~secfedtl.runtime.pool.ClientPool` over a Flower ``Grid``.

    ``nodes`` maps hospital names to Flower node ids (from :func:`discover`); ``names`` are all
    the job's clients (a name without a node is silent every phase). ``timeout`` bounds each
    exchange (seconds; it is also the messages' TTL, so late messages expire at the SuperLink);
    ``progress`` (optional) is a JSON-lines file that gets one public line per exchange (the
    phase and who was asked), for operators and tests; ``view`` (optional) is a JSON-lines file
    that records every message the server receives (its whole view, for audits:
    :mod:`secfedtl.testing.server_view`).
    """

    def __init__(self, grid: Grid, nodes: Mapping[str, int], *, names: Sequence[str], timeout: float,
                 poll_interval: float = 0.2, progress: Path | None = None, view: Path | None = None) -> None:
        if not timeout > 0 or not poll_interval > 0:
            raise ConfigError("timeout and poll_interval must be positive")
        unknown = set(nodes) - set(names)
        if unknown:
            raise ConfigError(f"nodes for unknown clients {sorted(unknown)}")
        self._grid = grid
        self._nodes = dict(nodes)
        self._names = sorted(names)
        self._timeout = float(timeout)
        self._poll = float(poll_interval)
        self._progress = progress
        self._view = view
        self._seq = 0
        self.last_exchange_seconds = 0.0

    @property
    def names(self) -> list[str]:
        return list(self._names)

    @property
    def nodes(self) -> dict[str, int]:
        return dict(self._nodes)

    def _note(self, phase: str, asked: Sequence[str], answered: Sequence[str], seconds: float) -> None:
        if self._progress is None:
            return
        line = {"seq": self._seq, "phase": phase, "asked": sorted(asked), "answered": sorted(answered),
                "seconds": round(seconds, 3), "time": time.time()}
        with open(self._progress, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line) + "\n")

    def exchange(self, requests: Mapping[str, Sequence[bytes]], *, phase: str) -> dict[str, list[bytes]]:
        self._seq += 1
        t0 = time.monotonic()
        if self._progress is not None:  # the phase has started (tests wait for this line)
            self._note(f"{phase}:start", list(requests), [], 0.0)
        messages, targets = [], []
        for name, blobs in sorted(requests.items()):
            node_id = self._nodes.get(name)
            if node_id is None or not blobs:
                continue
            content = RecordDict({RECORD: ConfigRecord({"op": "exchange",
                                                        "batch": pack_batch(self._seq, [(name, b) for b in blobs])})})
            messages.append(self._grid.create_message(content, MESSAGE_TYPE, node_id, phase, ttl=self._timeout))
            targets.append(name)
        out = self._collect(messages, targets, t0)
        if self._view is not None:
            with open(self._view, "a", encoding="utf-8") as fh:
                for name in sorted(out):
                    fh.write(json.dumps({"phase": phase, "node": name, "blobs": [b.hex() for b in out[name]]}) + "\n")
        self.last_exchange_seconds = time.monotonic() - t0
        self._note(phase, list(requests), list(out), self.last_exchange_seconds)
        return out

    def _collect(self, messages: list[Message], targets: list[str], t0: float) -> dict[str, list[bytes]]:
        out: dict[str, list[bytes]] = {}
        if not messages:
            return out
        ids = list(self._grid.push_messages(messages))
        pending = {mid: name for mid, name in zip(ids, targets) if mid}
        deadline = t0 + self._timeout
        while pending:
            for reply in self._grid.pull_messages(list(pending)):
                name = pending.pop(reply.metadata.reply_to_message_id, None)
                if name is None:
                    continue
                blobs = self._open(reply, name)
                if blobs:
                    out[name] = blobs
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(min(self._poll, max(0.0, deadline - time.monotonic())))
        for name in pending.values():
            log.info("no reply from %s in %.0f s: silent this phase", name, self._timeout)
        return out

    def _open(self, reply: Message, name: str) -> list[bytes]:
        """The wire messages in one reply; [] (silent) for an Error or anything malformed."""
        if reply.has_error():
            log.info("%s answered with a Flower error (code %s): silent this phase", name, reply.error.code)
            return []
        if reply.metadata.src_node_id != self._nodes[name]:
            return []
        try:
            batch = _record(reply)["batch"]
            if not isinstance(batch, bytes):
                raise DecodeError("batch is not bytes")
            seq, items = unpack_batch(batch)
        except (KeyError, TypeError, DecodeError):
            log.info("%s sent a malformed reply: silent this phase", name)
            return []
        if seq != self._seq:
            return []
        return [blob for who, blob in items if who == name]

    def close(self) -> None:
        pass


def discover(grid: Grid, names: Sequence[str], *, timeout: float, poll_interval: float = 0.2,
             reply_timeout: float = 60.0) -> dict[str, int]:
    """Map each hospital in ``names`` to the Flower node whose agent says it is that hospital.

    Asks every connected node (``hello``) until all names are found or ``timeout`` passes; a
    node that does not answer is asked again when it is next seen. Two nodes claiming one
    hospital is refused (:class:`ConfigError`); a node claiming a name not in the job is ignored.
    """
    wanted = set(names)
    found: dict[str, int] = {}
    answered: set[int] = set()
    deadline = time.monotonic() + timeout
    while wanted - set(found) and time.monotonic() < deadline:
        fresh = [n for n in grid.get_node_ids() if n not in answered]
        if not fresh:
            time.sleep(poll_interval)
            continue
        hello = [grid.create_message(RecordDict({RECORD: ConfigRecord({"op": "hello"})}), MESSAGE_TYPE, n,
                                     "hello", ttl=reply_timeout) for n in fresh]
        ids = [mid for mid in grid.push_messages(hello) if mid]
        end = min(deadline, time.monotonic() + reply_timeout)
        pending = set(ids)
        while pending and time.monotonic() < end:
            for reply in grid.pull_messages(list(pending)):
                pending.discard(reply.metadata.reply_to_message_id)
                if reply.has_error():
                    continue
                node_id = reply.metadata.src_node_id
                try:
                    name = _record(reply)["name"]
                except (KeyError, TypeError):
                    continue
                answered.add(node_id)
                if name not in wanted:
                    log.warning("node %s says it is %r, which is not a client of this job: ignored", node_id, name)
                elif name in found and found[name] != node_id:
                    raise ConfigError(f"two Flower nodes say they are {name!r}: refusing to guess")
                else:
                    found[name] = node_id
            if pending:
                time.sleep(poll_interval)
    return found


# -- ClientApp: the relay ------------------------------------------------------------------------

client_app = ClientApp()

#: set only by secfedtl.runtime.deploy for a local simulation's processes
SIMULATION_AGENT_DIR = "SECFEDTL_SIMULATION_AGENT_DIR"


def agent_path(context: Context) -> str:
    """Where this node's agent listens: node config ``agent``, else (a local simulation started by
    :mod:`secfedtl.runtime.deploy`) ``$SECFEDTL_SIMULATION_AGENT_DIR`` and the virtual node's
    ``partition-id``. Nothing the server sends chooses the socket."""
    node = context.node_config
    if "agent" in node and str(node["agent"]):
        return str(node["agent"])
    # Never from the run config: the server writes that, and could point this relay at another
    # agent on the machine. Only the local simulation (secfedtl.runtime.deploy) sets this variable,
    # in the environment of the processes it starts itself.
    agent_dir = os.environ.get(SIMULATION_AGENT_DIR, "")
    if agent_dir and "partition-id" in node:
        return os.path.join(agent_dir, f"partition-{int(node['partition-id'])}.sock")
    raise ConfigError("this SuperNode has no secfedtl agent: set --node-config \"agent='/path/to/agent.sock'\"")


@client_app.query("secfedtl")
def relay(message: Message, context: Context) -> Message:
    """Forward one message to the node agent; answer with what it says (bytes only)."""
    agent = AgentClient(agent_path(context))
    op = _record(message)["op"]
    if op == "hello":
        record = ConfigRecord({"op": "hello", "name": agent.hello()})
    elif op == "exchange":
        batch = _record(message)["batch"]
        if not isinstance(batch, bytes):
            raise DecodeError("batch is not bytes")
        record = ConfigRecord({"op": "exchange", "batch": agent.exchange(batch)})
    else:
        raise DecodeError(f"unknown operation {op!r}")
    return Message(RecordDict({RECORD: record}), reply_to=message)


# -- ServerApp ---------------------------------------------------------------------------------

server_app = ServerApp()


def _settings(run_config: Mapping[str, Any]) -> dict[str, Any]:
    settings = dict(RUN_CONFIG)
    settings.update({k: v for k, v in run_config.items() if k in RUN_CONFIG})
    settings["record-view"] = bool(settings["record-view"])
    for key in ("phase-timeout", "discovery-timeout", "poll-interval"):
        settings[key] = float(settings[key])
        if not settings[key] > 0:
            raise ConfigError(f"run config {key} must be positive")
    return settings


def _status(out: Path, state: str, **extra: Any) -> None:
    data = json.dumps({"state": state, "time": time.time(), **extra}).encode("utf-8")
    atomic_write(out / "status.json", lambda fh: fh.write(data))


def run_server(grid: Grid, run_config: Mapping[str, Any], *, clients: Sequence[str] | None = None) -> dict[str, Any]:
    """The server side of a job over Flower; writes what ``secfedtl run`` writes into ``out``
    (metrics.json, rounds.json, checkpoint.json, report.png; the ledgers stay at the hospitals),
    plus ``progress.jsonl`` (one line per exchange) and ``status.json``. ``clients`` (default:
    the job's) are the node names to federate (tests add a second node for one hospital's data)."""
    from secfedtl.federated.job import build_server, load_job, prepare_source
    from secfedtl.federated.roster import Roster
    from secfedtl.federated.run import run_federation

    t_start = time.perf_counter()
    settings = _settings(run_config)
    out = Path(settings["out"])
    out.mkdir(parents=True, exist_ok=True)
    _status(out, "starting")
    try:
        job = load_job(settings["job-code"] or None)
        config = job.load_config(settings["job"] or None)
        clients = list(config["job"]["clients"] if clients is None else clients)
        if not settings["roster"]:
            raise ConfigError("run config 'roster' is required: the federation's roster file (secfedtl keys roster)")
        roster = Roster.load(settings["roster"])
        if "selection" in config.sections:
            raise ConfigError("[selection] (DP source-model selection) runs with the in-process runners only; "
                              "over Flower, name the chosen source in [model]")
        source = job.build_source(config)
        _status(out, "discovering")
        nodes = discover(grid, clients, timeout=settings["discovery-timeout"],
                         poll_interval=settings["poll-interval"])
        missing = sorted(set(clients) - set(nodes))
        if len(nodes) < 3:
            raise ConfigError(f"only {sorted(nodes)} answered; secure aggregation needs 3 (missing {missing})")
        (out / "nodes.json").write_text(json.dumps({"nodes": {n: str(i) for n, i in nodes.items()},
                                                    "missing": missing}, indent=2), encoding="utf-8")
        _status(out, "running", missing=missing)
        pool = FlowerPool(grid, nodes, names=clients, timeout=settings["phase-timeout"],
                          poll_interval=settings["poll-interval"], progress=out / "progress.jsonl",
                          view=out / "server_view.jsonl" if settings["record-view"] else None)
        source, preparation = prepare_source(job, config, source, pool, roster, out)
        federation = build_server(config, source, pool, roster, job=job)
        metrics = run_federation(config, source, federation, out, t_start=t_start, progress=False,
                                 preparation=preparation)
    except (SecFedTLError, OSError) as exc:
        _status(out, "failed", error=f"{type(exc).__name__}: {exc}")
        raise
    except Exception as exc:
        _status(out, "failed", error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc(limit=5))
        raise
    _status(out, "done")
    return metrics


@server_app.main()
def _main(grid: Grid, context: Context) -> None:
    run_server(grid, context.run_config)


__all__ = ["MESSAGE_TYPE", "RECORD", "RUN_CONFIG", "FlowerPool", "agent_path", "client_app", "discover",
           "relay", "run_server", "server_app"]
