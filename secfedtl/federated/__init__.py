"""The federated-job layer: describe a job once (:class:`FederatedJob`), and the pieces every
transport runs it with: the server loop (:mod:`~secfedtl.federated.federation`), the client node
and its tasks (:mod:`~secfedtl.federated.node`), the wire messages between them
(:mod:`~secfedtl.federated.wire`) and the federation's pinned keys
(:mod:`~secfedtl.federated.roster`). Transports (in process, worker processes, a node agent,
Flower) are in :mod:`secfedtl.runtime`; job instances in :mod:`secfedtl.jobs`.

The names below are imported on first use, so that ``secfedtl.federated.wire`` (which the Flower
relay needs) does not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"JobConfig": "secfedtl.federated.config", "FederatedJob": "secfedtl.federated.job",
         "HospitalData": "secfedtl.federated.job", "SourceModel": "secfedtl.federated.job",
         "load_job": "secfedtl.federated.job", "tensor_dataset": "secfedtl.federated.job"}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'secfedtl.federated' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
