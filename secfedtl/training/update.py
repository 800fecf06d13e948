"""What one client's local round produces (a model update), and the flat-vector form of model
weights and updates for secure aggregation."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from secfedtl.errors import InputError

__all__ = ["ClientUpdate", "flatten_params", "model_with_params", "param_names", "unflatten_params"]


@dataclass(frozen=True, kw_only=True)
class ClientUpdate:
    """A client's round result.

    ``model_update`` holds ``new - old`` for the trainable parameters only. ``weight`` is the client's
    FedAvg weight: its *declared public* record count
    (:attr:`~secfedtl.training.DPTrainingConfig.public_dataset_size`), never the private count.
    ``event`` is the DP mechanism that was run and charged to the budget (a ``PoissonGaussianEvent``).
    """

    model_update: dict[str, torch.Tensor]
    weight: int
    event: Any

    def __post_init__(self) -> None:
        if not self.model_update:
            raise InputError("an update needs at least one tensor")
        for name, t in self.model_update.items():
            if not isinstance(name, str) or not isinstance(t, torch.Tensor):
                raise InputError("model_update must map names to tensors")
            if not torch.isfinite(t).all():
                raise InputError(f"model_update for {name!r} is not finite")
        if isinstance(self.weight, bool) or not isinstance(self.weight, int) or self.weight < 1:
            raise InputError(f"weight must be a positive int, got {self.weight!r}")
        object.__setattr__(self, "model_update", {k: v.detach().clone() for k, v in self.model_update.items()})


def param_names(params: Mapping[str, Any]) -> list[str]:
    """The fixed order used by :func:`flatten_params`: names sorted lexicographically."""
    return sorted(params)


def flatten_params(params: Mapping[str, torch.Tensor]) -> np.ndarray:
    """Concatenate ``params``' tensors (model weights or a model update, by parameter name), in
    :func:`param_names` order, into a 1-D float64 vector."""
    if not params:
        raise InputError("cannot flatten an empty parameter mapping")
    parts = []
    for name in param_names(params):
        t = params[name]
        if not isinstance(t, torch.Tensor):
            raise InputError(f"params[{name!r}] is not a tensor")
        parts.append(t.detach().to("cpu", torch.float64).reshape(-1).numpy())
    return np.concatenate(parts).astype(np.float64, copy=False)


def unflatten_params(vector: np.ndarray, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`flatten_params`: split ``vector`` into tensors shaped and typed like ``like``.

    Raises :class:`InputError` when the vector is not 1-D, has the wrong length, or is not finite.
    """
    vec = np.asarray(vector)
    if vec.ndim != 1:
        raise InputError(f"expected a 1-D vector, got shape {vec.shape}")
    if not np.issubdtype(vec.dtype, np.floating) or not np.isfinite(vec).all():
        raise InputError("vector must be finite floating point")
    sizes = {name: like[name].numel() for name in param_names(like)}
    if vec.shape[0] != sum(sizes.values()):
        raise InputError(f"vector has {vec.shape[0]} entries, the template needs {sum(sizes.values())}")
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for name, size in sizes.items():
        ref = like[name]
        chunk = torch.from_numpy(vec[offset : offset + size].astype(np.float64, copy=True))
        out[name] = chunk.reshape(ref.shape).to(dtype=ref.dtype)
        offset += size
    return out


def model_with_params(model: nn.Module, params: Mapping[str, torch.Tensor]) -> nn.Module:
    """A deep copy of ``model`` with ``params`` (parameter name to tensor) copied into its
    parameters; ``model`` itself is not changed. Raises :class:`InputError` for a name that is
    not one of the model's parameters."""
    work = copy.deepcopy(model)
    named = dict(work.named_parameters())
    unknown = sorted(set(params) - set(named))
    if unknown:
        raise InputError(f"the model has no parameters {unknown}")
    with torch.no_grad():
        for name, value in params.items():
            named[name].copy_(value)
    return work
