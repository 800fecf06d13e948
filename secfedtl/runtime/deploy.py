"""Start and stop the processes of a secfedtl job on Flower, on one machine.

``secfedtl flower local JOB`` runs a real Flower deployment on 127.0.0.1 (a ``flower-superlink``,
one ``flower-supernode`` and one node agent per hospital, then ``flwr run``);
``secfedtl flower simulate JOB`` runs the same app on Flower's simulation engine (a
``flower-superlink --simulation``, one agent per virtual node). Both take the job TOML that
``secfedtl run JOB`` runs in process. Every process is started here with its own process
group and stopped here by its process id. This is what the integration test, the Flower
overhead benchmark and a developer trying the deployment out use; docs/deploy-flower.md shows
the same commands for a real multi-machine deployment.

Insecure (no TLS) on purpose: everything stays on 127.0.0.1. This module needs the Flower
command-line tools (``pip install 'secfedtl[flower]'``) but imports no Flower code.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secfedtl.errors import ConfigError, SecFedTLError
from secfedtl.federated.roster import write_simulated_keys

#: The Flower app (FAB) of secfedtl: its pyproject.toml names the components and run config.
APP_PYPROJECT = """\
[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "secfedtl-flower"
version = "0.1.0"
description = "secfedtl on Flower: DP-SGD hospitals, secfedtl secure aggregation, FedAvg"
license = "Apache-2.0"
# secfedtl[flower] must be installed on the SuperLink's and every SuperNode's machine.
dependencies = []

[tool.flwr.app]
publisher = "secfedtl"

[tool.flwr.app.components]
serverapp = "secfedtl.runtime.flower:server_app"
clientapp = "secfedtl.runtime.flower:client_app"

[tool.flwr.app.config]
job = ""                   # job TOML on the server machine ("" = the job's bundled default)
job-code = ""              # MODULE:ATTR of the FederatedJob installed on the server ("" = secfedtl.jobs.heart:HEART)
roster = ""                # the federation's roster on the server machine (secfedtl keys roster); required
out = "runs/flower"        # the server's output directory
phase-timeout = 300.0      # seconds a phase waits for replies; a node silent longer is a dropout
discovery-timeout = 300.0  # seconds to wait for every hospital's node to say hello
poll-interval = 0.2        # seconds between pulls of replies
record-view = false        # write every message the server receives to <out>/server_view.jsonl (audits)
"""

#: Environment of every Flower process started here: no telemetry or update checks (they try
#: the network and, when it is unreachable, delay each short-lived ClientApp process), and the
#: SuperNode's executor polls for work every 0.1 s instead of every second.
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
              "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}


def write_app(directory: Path) -> Path:
    """Write the Flower app directory (``pyproject.toml`` only) that ``flwr run`` builds."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pyproject.toml").write_text(APP_PYPROJECT, encoding="utf-8")
    return directory


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (bind to port 0 and let the kernel choose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flower_tool(name: str) -> str:
    """The path of a Flower command-line tool, next to this Python first."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise ConfigError(f"{name} not found: install the extra, pip install 'secfedtl[flower]'")
    return found


@dataclass
class Processes:
    """Processes started for one deployment, stopped by their own ids (and their groups: the
    Flower tools start helpers of their own) in :meth:`stop_all`."""

    root: Path
    env: dict[str, str] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    stopped: set[str] = field(default_factory=set)

    def start(self, label: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
        if label in self.procs:
            raise ConfigError(f"a process {label!r} is already running")
        log = open(self.root / f"{label}.log", "wb")  # noqa: SIM115 - the child owns it
        proc = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **self.env, **(env or {})}, start_new_session=True)
        log.close()
        self.procs[label] = proc
        return proc

    def log(self, label: str) -> str:
        path = self.root / f"{label}.log"
        return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""

    def kill(self, label: str, sig: int = signal.SIGKILL) -> None:
        """Stop one process by its id, then whatever is left of its process group."""
        proc = self.procs.get(label)
        if proc is None:
            return
        self.stopped.add(label)
        for target in (lambda: os.kill(proc.pid, sig), lambda: os.killpg(proc.pid, sig)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                target()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)

    def stop_all(self, grace: float = 5.0) -> None:
        """SIGTERM to every process (by id), up to ``grace`` seconds to exit, then SIGKILL to
        each one and its group."""
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(p.poll() is None for p in self.procs.values()):
            time.sleep(0.1)
        for label in reversed(list(self.procs)):
            self.kill(label, signal.SIGKILL)


def wait_for(predicate: Any, *, timeout: float, what: str, interval: float = 0.2,
             procs: Processes | None = None) -> None:
    """Wait until ``predicate()`` is true; :class:`TimeoutError` after ``timeout`` seconds, or
    at once when one of ``procs`` exited (its log is in the message)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if procs is not None:
            for label, proc in procs.procs.items():
                if label not in procs.stopped and proc.poll() is not None:
                    raise RuntimeError(f"{label} exited ({proc.returncode}) while waiting for {what}:\n"
                                       f"{procs.log(label)[-3000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class LocalFlower:
    """A Flower deployment on 127.0.0.1 for one job (see the module docstring)."""

    job: Path | None
    hospitals: Sequence[str]
    root: Path
    simulation: bool = False
    #: ``MODULE:ATTR`` of the job every agent (and the server) runs (None: the bundled heart job);
    #: each agent is started with it on its own command line, as a hospital's operator would
    job_code: str | None = None
    #: node name -> hospital whose data it serves, for nodes not named after their hospital (tests)
    twins: Mapping[str, str] = field(default_factory=dict)
    app: Path | None = None
    processes: Processes = field(init=False)
    link_port: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.home = self.root / "flwr-home"
        self.sockets = Path(tempfile.mkdtemp(prefix="secfedtl-agents-"))  # short path: AF_UNIX limit
        # The Flower tools start helpers (flower-superexec, flwr-clientapp, ...) by name: find ours first.
        path = os.pathsep.join([str(Path(flower_tool("flwr")).parent), os.environ.get("PATH", "")])
        self.processes = Processes(root=self.root, env={**FLOWER_ENV, "FLWR_HOME": str(self.home), "PATH": path})
        self.app = self.app or write_app(self.root / "app")
        # One machine plays every hospital: fresh keys per deployment, one roster for all.
        self.keys = self.sockets / "keys"
        self.roster = write_simulated_keys(self.keys, self.hospitals)

    def socket_of(self, hospital: str) -> Path:
        if self.simulation:
            return self.sockets / f"partition-{list(self.hospitals).index(hospital)}.sock"
        return self.sockets / f"{hospital}.sock"

    def start_agents(self, outs: Mapping[str, Path], *, timeout: float = 300.0) -> None:
        for name in self.hospitals:
            argv = [sys.executable, "-m", "secfedtl.cli", "node", *([str(self.job)] if self.job else []),
                    *(["--job", self.job_code] if self.job_code else []),
                    "--hospital", self.twins.get(name, name), "--node-name", name,
                    "--out", str(outs[name]), "--socket", str(self.socket_of(name)),
                    "--key", str(self.keys / f"{name}.key"), "--roster", str(self.roster),
                    # a local test deployment: each node keeps its privacy state in its own folder
                    "--state-dir", str(Path(outs[name]) / "privacy")]
            self.processes.start(f"agent-{name}", argv)
        wait_for(lambda: all(self.socket_of(n).exists() for n in self.hospitals), timeout=timeout,
                 what="the node agents", procs=self.processes)

    def start_superlink(self, *, timeout: float = 120.0) -> None:
        self.link_port = free_port()
        argv = [flower_tool("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(self.link_port),
                "--disable-runtime-dependency-installation"]
        env = {}
        if self.simulation:
            argv.append("--simulation")
            # the simulated relays find their agents here (never from the server's run config)
            env = {"SECFEDTL_SIMULATION_AGENT_DIR": str(self.sockets)}
        self.processes.start("superlink", argv, env=env)
        wait_for(lambda: _port_open(self.link_port), timeout=timeout, what="the SuperLink", procs=self.processes)
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{self.link_port}"\n'
            f"insecure = true\n", encoding="utf-8")

    def start_supernode(self, hospital: str) -> subprocess.Popen[bytes]:
        home = self.root / f"flwr-home-{hospital}"
        argv = [flower_tool("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{self.link_port}",
                "--host", "127.0.0.1", "--port", str(free_port()),
                "--node-config", f"agent='{self.socket_of(hospital)}'"]
        return self.processes.start(f"supernode-{hospital}", argv, env={"FLWR_HOME": str(home)})

    def run(self, run_config: Mapping[str, Any]) -> str:
        """``flwr run`` the app with ``run_config``; returns the run id."""
        run_config = {"roster": str(self.roster), **run_config}
        pairs = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        argv = [flower_tool("flwr"), "run", str(self.app), "local", "--run-config", pairs, "--format", "json"]
        if self.simulation:
            argv += ["--federation-config", f"num-supernodes={len(self.hospitals)}"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
                              env={**os.environ, **self.processes.env})
        if done.returncode != 0:
            raise RuntimeError(f"flwr run failed ({done.returncode}): {done.stdout[-2000:]} {done.stderr[-2000:]}")
        try:
            return str(json.loads(done.stdout)["run-id"])
        except (ValueError, KeyError):
            return done.stdout.strip()

    def close(self) -> None:
        self.processes.stop_all()
        shutil.rmtree(self.sockets, ignore_errors=True)

    def __enter__(self) -> LocalFlower:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_status(out: Path) -> dict[str, Any]:
    path = out / "status.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    except ValueError:
        return {}


def wait_for_server(out: Path, *, timeout: float, procs: Processes | None = None,
                    on_poll: Callable[[], None] | None = None) -> dict[str, Any]:
    """Wait until the ServerApp writes a final status (``done`` or ``failed``) into ``out``;
    ``on_poll`` (a progress display) is called at every look."""
    def finished() -> bool:
        if on_poll is not None:
            on_poll()
        return read_status(out).get("state") in ("done", "failed")

    wait_for(finished, timeout=timeout, what="the ServerApp to finish", interval=0.5, procs=procs)
    status = read_status(out)
    if status["state"] != "done":
        raise SecFedTLError(f"the ServerApp failed: {status.get('error')}")
    return status


class _Progress:
    """A progress bar for a local Flower run: what is starting, then the server's rounds (read
    from the ``rounds.json``, ``status.json`` and ``progress.jsonl`` it writes as it goes)."""

    _STATES = {"starting": "server: training the source model", "discovering": "server: waiting for the nodes"}

    def __init__(self, *, rounds: int, personalise: bool, server_out: Path, enabled: bool) -> None:
        from tqdm import tqdm

        self.rounds, self.server_out = rounds, server_out
        self.bar = tqdm(total=rounds + int(personalise), desc="starting", unit="round", disable=not enabled,
                        file=sys.stderr)

    def stage(self, what: str) -> None:
        self.bar.set_description(what)

    def poll(self) -> None:
        state = read_status(self.server_out).get("state", "starting")
        done = self.bar.total if state == "done" else len(_read_json(self.server_out / "rounds.json", []))
        if done > self.bar.n:  # never back: rounds.json may be caught half written
            self.bar.update(done - self.bar.n)
        done = self.bar.n
        if state in self._STATES:
            self.stage(self._STATES[state])
        elif state == "running":
            self.stage("federated rounds" if done < self.rounds else "personalisation")
            self.bar.set_postfix(phase=_last_phase(self.server_out / "progress.jsonl"))

    def close(self) -> None:
        self.bar.close()


def _read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # not written yet, or being written
        return default


def _last_phase(path: Path) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - 512))
            lines = fh.read().splitlines()
        return str(json.loads(lines[-1])["phase"]).removesuffix(":start") if lines else ""
    except (OSError, ValueError, KeyError, IndexError):
        return ""


def run_local(job: Path | None, out: Path, *, simulation: bool, phase_timeout: float = 120.0,
              timeout: float = 3600.0, progress: bool = False, job_code: str | None = None) -> dict[str, Any]:
    """Run a whole job on a local Flower deployment (or simulation); return its metrics.
    ``job`` is the job file, ``job_code`` the ``MODULE:ATTR`` of its
    :class:`~secfedtl.federated.job.FederatedJob` (default: the bundled heart job), importable by
    this Python on this machine (it plays the server and every hospital). ``progress`` shows a bar
    on stderr: each process starting, then the server's rounds."""
    from secfedtl.federated.job import load_job

    config = load_job(job_code).load_config(job)  # a bad job, then a missing extra: clear errors before anything
    for tool in ("flower-superlink", "flower-supernode", "flwr"):
        flower_tool(tool)
    hospitals = list(config["job"]["clients"])
    server_out = out / "server"
    bar = _Progress(rounds=config["job"]["rounds"], personalise=config["privacy"]["personalise"],
                    server_out=server_out, enabled=progress)
    out.mkdir(parents=True, exist_ok=True)
    try:
        with LocalFlower(job=job.resolve() if job else None, hospitals=hospitals, root=out / "processes",
                         simulation=simulation, job_code=job_code) as fl:
            bar.stage(f"starting {len(hospitals)} node agents")
            fl.start_agents({h: out / "hospitals" / h for h in hospitals})
            bar.stage("starting the SuperLink")
            fl.start_superlink()
            if not simulation:
                bar.stage(f"starting {len(hospitals)} SuperNodes")
                for h in hospitals:
                    fl.start_supernode(h)
            bar.stage("flwr run: submitting the app")
            fl.run({"job": str(job.resolve()) if job else "", "job-code": job_code or "",
                    "out": str(server_out.resolve()), "phase-timeout": phase_timeout})
            wait_for_server(server_out, timeout=timeout, procs=fl.processes, on_poll=bar.poll)
            bar.poll()
            bar.stage("stopping the processes")
    finally:
        bar.close()
    return json.loads((server_out / "metrics.json").read_text(encoding="utf-8"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("mode", choices=("local", "simulate"),
                        help="local: SuperLink + one SuperNode per hospital on 127.0.0.1; simulate: Flower's "
                             "simulation engine")
    parser.add_argument("config", type=Path, nargs="?", default=None,
                        help="job TOML file (default: the bundled heart job)")
    parser.add_argument("--out", type=Path, default=Path("runs/flower"),
                        help="output: server/ (metrics), hospitals/<name>/privacy/ (each hospital's privacy state), "
                             "processes/ (logs)")
    parser.add_argument("--job", default=None, metavar="MODULE:ATTR",
                        help="the FederatedJob to run (default: the bundled heart job, secfedtl.jobs.heart:HEART)")
    parser.add_argument("--phase-timeout", type=float, default=120.0,
                        help="seconds a phase waits for a hospital before counting it as a dropout")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    from secfedtl.reporting.summary import print_summary

    if not (args.phase_timeout > 0 and args.phase_timeout < float("inf")):
        raise ConfigError(f"--phase-timeout must be a positive number of seconds, got {args.phase_timeout!r}")
    metrics = run_local(args.config, args.out, simulation=args.mode == "simulate", phase_timeout=args.phase_timeout,
                        progress=not args.no_progress, job_code=args.job)
    print_summary(metrics)
    print(f"wrote {args.out / 'server' / 'metrics.json'}; each hospital's ledger and local reports: "
          f"{args.out / 'hospitals'}/<name>/privacy/<name>/")
    return 0


__all__ = ["APP_PYPROJECT", "FLOWER_ENV", "LocalFlower", "Processes", "flower_tool", "free_port", "read_status",
           "run_local", "wait_for", "wait_for_server", "write_app"]
