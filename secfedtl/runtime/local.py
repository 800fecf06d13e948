"""Run a :class:`~secfedtl.federated.job.FederatedJob` on one machine: every hospital's node in
this process (one after the other) or in forked worker processes, and the server beside them.

One process plays every hospital here, so it loads every hospital's data with the job's own
loader, gives each node fresh signing keys (one roster for all) and keeps each hospital's
privacy state (ledger and budget) in ``<state_dir>/<hospital>``, kept across jobs: a new job (or
a new ``--out``) on the same hospital continues its budget.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn
from torch.utils.data import Dataset

import secfedtl.federated.job as _job
from secfedtl.errors import ConfigError
from secfedtl.federated.config import JobConfig
from secfedtl.federated.federation import Federation
from secfedtl.federated.job import FederatedJob, Hospital, HospitalData, SourceModel
from secfedtl.federated.node import ClientNode
from secfedtl.federated.pool import ClientPool
from secfedtl.federated.roster import NodePolicy, Roster
from secfedtl.federated.run import Experimenter, prepare_run, run_federation
from secfedtl.privacy.accountants import compute_epsilon
from secfedtl.privacy.budget import BudgetGuard
from secfedtl.privacy.state import PrivacyState
from secfedtl.runtime.pool import LocalPool, ProcessPool
from secfedtl.training import PrivateClient

__all__ = ["LocalJob", "build_job", "make_pool", "run_job"]


def make_pool(nodes: dict[str, ClientNode], workers: int) -> ClientPool:
    """``workers`` > 0: the nodes in that many forked worker processes; 0: in this process."""
    return ProcessPool(nodes, workers=workers) if workers > 0 else LocalPool(nodes)


@dataclass(kw_only=True)
class LocalJob:
    """Everything one in-process run of a job holds. ``hospitals`` are the client-side objects;
    with worker processes the live copies are in the workers (don't use these then, except their
    evaluation data, which the experimenter of a simulation holds anyway)."""

    job: FederatedJob
    config: JobConfig
    out: Path
    source: SourceModel
    data: dict[str, HospitalData]
    hospitals: dict[str, Hospital]
    states: dict[str, PrivacyState]
    federation: Federation
    selection: dict[str, Any] | None = None
    preparation: dict[str, Any] | None = None

    @property
    def clients(self) -> dict[str, PrivateClient]:
        return {n: h.client for n, h in self.hospitals.items()}

    @property
    def guards(self) -> dict[str, BudgetGuard]:
        return {n: h.guard for n, h in self.hospitals.items()}

    @property
    def nodes(self) -> dict[str, ClientNode]:
        return {n: h.node for n, h in self.hospitals.items()}

    def model_with(self, params: np.ndarray) -> nn.Module:
        """The source model with ``params`` as its trainable weights."""
        return self.source.with_params(params)

    def experimenter(self, features: Mapping[str, Mapping[str, Dataset]] | None = None) -> Experimenter:
        """The simulation's view of every hospital's evaluation data (outside the protocol);
        ``features``: see :class:`~secfedtl.federated.run.Experimenter`."""
        return Experimenter(config=self.config, source=self.source, hospitals=self.hospitals, states=self.states,
                            metric=self.job.metric, features=features)

    def warn_earlier_spend(self, *, epsilon: float, delta: float, accountant: str) -> None:
        """Say on stderr, per hospital whose privacy state already spent budget in earlier jobs,
        how much (this job's noise is calibrated for what is left of ``epsilon``)."""
        jid = self.config["job"]["id"]
        for name, state in self.states.items():
            earlier = state.events_before(jid)
            if earlier:
                print(f"{name}: its privacy state already spent epsilon "
                      f"{compute_epsilon(earlier, delta, accountant=accountant):.3f} of {epsilon:g} in earlier "
                      "jobs; this job's noise is calibrated for what is left", file=sys.stderr)

    def close(self) -> None:
        self.federation.pool.close()
        for state in self.states.values():
            state.close()


def build_job(job: FederatedJob, config: JobConfig, out: Path, *, resume: bool = False, workers: int | None = None,
              state_dir: Path | None = None) -> LocalJob:
    """Build the source model, load every hospital's data, open its privacy state (in
    ``state_dir``, default :func:`~secfedtl.federated.job.state_root`), run DP source selection
    if the config has a ``[selection]``, build every node and the server. ``workers`` (default:
    the config's ``job.workers``) > 0 runs the nodes in that many forked worker processes."""
    config = job.check(config)
    if not resume and (out / "checkpoint.json").exists():
        raise ConfigError(f"{out} holds a run: use --resume to continue it, or another --out")
    clients = config["job"]["clients"]
    data = {name: job.load_data(config, name) for name in clients}  # a bad centre or data dir: before any folder
    out.mkdir(parents=True, exist_ok=True)
    workers = config["job"]["workers"] if workers is None else workers
    # One process plays every hospital: per-run signing keys, and every node pins the roster.
    roster, identities = Roster.generate(clients)
    policy: NodePolicy = _job.node_policy(config, job)
    root = _job.state_root(state_dir)
    states: dict[str, PrivacyState] = {}
    try:
        for name in clients:
            states[name] = _job.open_hospital_state(config, name, data[name], root)
        selection: dict[str, Any] | None = None
        if "selection" in config.sections:
            candidates = [job.build_source(config, spec) for spec in config.source_specs()]
            selection = _job.saved_selection(config, out)
            if selection is None:
                nodes = {n: _job.build_selection_node(config, n, candidates, data[n], states[n],
                                                      identity=identities[n], roster=roster) for n in clients}
                selection = _job.select_source(config, out, candidates, make_pool(nodes, workers), roster)
            source = candidates[selection["index"]]
        else:
            source = job.build_source(config)
        hospitals = {name: _job.build_client_node(job, config, name, source, data[name], states[name],
                                                  identity=identities[name], roster=roster, policy=policy)
                     for name in clients}
    except BaseException:
        for state in states.values():
            state.close()
        raise
    pool = make_pool({n: h.node for n, h in hospitals.items()}, workers)
    try:
        source, preparation = _job.prepare_source(job, config, source, pool, roster, out)
    except BaseException:
        pool.close()
        for state in states.values():
            state.close()
        raise
    federation = _job.build_server(config, source, pool, roster, job=job)
    if resume and (out / "checkpoint.json").exists():
        federation.load_state_dict(json.loads((out / "checkpoint.json").read_text(encoding="utf-8")))
    return LocalJob(job=job, config=config, out=out, source=source, data=data, hospitals=hospitals, states=states,
                    federation=federation, selection=selection, preparation=preparation)


def run_job(job: FederatedJob, config: JobConfig, out: Path, *, resume: bool = False, progress: bool = True,
            workers: int | None = None, state_dir: Path | None = None) -> dict[str, Any]:
    """Run (or resume) ``job`` in this process (or its worker processes); writes metrics.json and
    report.png into ``out``; every hospital's ledger is in its privacy state (``state_dir``)."""
    t_start = time.perf_counter()
    config = prepare_run(job.check(config), out, resume=resume)
    local = build_job(job, config, out, resume=resume, workers=workers, state_dir=state_dir)
    try:
        return run_federation(config, local.source, local.federation, out, t_start=t_start, progress=progress,
                              selection=local.selection, preparation=local.preparation,
                              experimenter=local.experimenter())
    finally:
        local.close()
