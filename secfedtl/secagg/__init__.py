"""Secure aggregation (Bonawitz et al. 2017, SecAgg+ graphs of Bell et al. 2020), Sans-I/O.

Imports no torch and no sockets. Public contract::

    from secfedtl.secagg import SecAggConfig, simulate
    cfg = SecAggConfig(num_clients=20, threshold=11, neighbours=None, clip=1.0, bits=32)
    res = simulate(inputs, cfg, dropouts={3: "mask", 7: "unmask"}, seed=0)
    res.total, res.included
"""

from secfedtl.secagg.client import ClientSession, ClientState
from secfedtl.secagg.config import SecAggConfig
from secfedtl.secagg.driver import PHASE_TABLE, PHASES, Phase, RoundDriver, RoundOutcome, drive
from secfedtl.secagg.server import AggregateResult, ServerSession, ServerState
from secfedtl.secagg.session import SessionParams
from secfedtl.secagg.simulate import SimulationResult, simulate

__all__ = [
    "PHASES", "PHASE_TABLE", "AggregateResult", "ClientSession", "ClientState", "Phase", "RoundDriver",
    "RoundOutcome", "SecAggConfig", "ServerSession", "ServerState", "SessionParams", "SimulationResult",
    "drive", "simulate",
]
