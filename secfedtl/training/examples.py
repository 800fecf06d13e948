"""Per-example gradients for distributed DP: one row per sampled record, nothing clipped or summed.

In distributed mode (:mod:`secfedtl.federated.distributed`) a hospital does not take DP-SGD steps
itself: for each step it hands the gradients of its Poisson-sampled records to the integer
encoding (:class:`secfedtl.encoding.distributed.DistributedEncoding`), which clips, scales,
rotates and rounds *each example* (record-level sensitivity needs per-example rounding) before
summing and adding the hospital's noise share. This module computes those rows with
``torch.func`` (``vmap`` of ``grad`` of the per-example loss: exact per-example gradients, no
hooks), in the flat order of :func:`~secfedtl.training.update.flatten_params` (names sorted).

A record whose loss or gradient is not finite gets a zero row (it contributes nothing, within the
clip norm), never an error: whether a step fails must not depend on the data (as in
:func:`~secfedtl.training.dpsgd.run_dp_sgd`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from secfedtl.errors import TrainingError
from secfedtl.training.dpsgd import PerSampleLoss
from secfedtl.training.update import param_names

__all__ = ["per_example_gradients"]


def per_example_gradients(module: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *,
                          loss_fn: PerSampleLoss, prefix: str = "") -> np.ndarray:
    """Gradients of ``loss_fn`` for each example with respect to ``module``'s trainable
    parameters: a float64 array ``(batch, dimension)``, columns in :func:`param_names` order of the
    parameters' names with ``prefix`` (the module's name in the whole model, e.g. ``"head."``, so
    the order is the global model's). An empty batch gives a ``(0, dimension)`` array."""
    trainable = {prefix + n: p for n, p in module.named_parameters() if p.requires_grad}
    if not trainable:
        raise TrainingError("the model has no trainable parameters")
    order = param_names(trainable)
    dimension = sum(trainable[n].numel() for n in order)
    if len(inputs) == 0:
        return np.zeros((0, dimension), dtype=np.float64)
    local = {n[len(prefix):]: p.detach() for n, p in trainable.items()}
    fixed = {n: p.detach() for n, p in module.named_parameters() if not p.requires_grad}
    fixed.update({n: b for n, b in module.named_buffers()})

    def loss_one(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        def call(batch: torch.Tensor) -> torch.Tensor:
            return functional_call(module, {**params, **fixed}, (batch,))

        return loss_fn(call, x.unsqueeze(0), y.unsqueeze(0)).sum()  # type: ignore[arg-type]

    was = module.training
    module.train()
    try:
        grads = vmap(grad(loss_one), in_dims=(None, 0, 0))(local, inputs, targets)
    finally:
        module.train(was)
    rows = torch.cat([grads[n[len(prefix):]].reshape(len(inputs), -1) for n in order], dim=1)
    rows = rows.detach().to("cpu", torch.float64)
    rows[~torch.isfinite(rows).all(dim=1)] = 0.0
    return rows.numpy()
