"""secfedtl.aggregation: FedAvg and adaptive server optimisers over unmasked weighted sums.

The server only ever sees ``sum_k n_k * u_k`` (``u_k`` client ``k``'s model update) and ``sum_k n_k``; see
:mod:`secfedtl.aggregation.optimizers`.
"""

from secfedtl.aggregation.optimizers import (
    SERVER_OPTIMIZERS,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedYogi,
    ServerOptimizer,
    average_update,
    make_server_optimizer,
)

__all__ = [
    "SERVER_OPTIMIZERS",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedYogi",
    "ServerOptimizer",
    "average_update",
    "make_server_optimizer",
]
