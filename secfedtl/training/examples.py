"""Per-example gradients for distributed DP: one row per sampled record, nothing clipped or summed.

In distributed mode (:mod:`secfedtl.federated.distributed`) a hospital does not take DP-SGD steps
itself: for each step it hands the gradients of its Poisson-sampled records to the integer
encoding (:class:`secfedtl.encoding.distributed.DistributedEncoding`), which clips, scales,
rotates and rounds *each example* (record-level sensitivity needs per-example rounding) before
summing and adding the hospital's noise share. This module computes those rows with
``torch.func`` (``vmap`` of ``grad`` of the per-example loss: exact per-example gradients, no
hooks), in the flat order of :func:`~secfedtl.training.update.flatten_params` (names sorted).
A fully trainable ``nn.Linear`` under the default cross entropy (a head on cached features) has a
closed form instead, the one :func:`~secfedtl.training.dpsgd.run_dp_sgd`'s fast path uses: for
logits ``z = W x + b`` the example's gradient is ``e x^T`` for ``W`` and ``e`` for ``b``, with
``e = softmax(z) - onehot(y)``; one outer product per example, no autograd (a test pins it to
the ``vmap`` result).

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
from secfedtl.training.dpsgd import PerSampleLoss, linear_ce_residual
from secfedtl.training.update import param_names
from secfedtl.transfer.distillation import check_class_labels, cross_entropy_loss

__all__ = ["per_example_gradients"]


def per_example_gradients(module: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *,
                          loss_fn: PerSampleLoss, prefix: str = "") -> np.ndarray:
    """Gradients of ``loss_fn`` for each example with respect to ``module``'s trainable
    parameters: an array ``(batch, dimension)`` in the parameters' dtype (float32 for a float32 model), columns in :func:`param_names` order of the
    parameters' names with ``prefix`` (the module's name in the whole model, e.g. ``"head."``, so
    the order is the global model's). An empty batch gives a ``(0, dimension)`` array."""
    trainable = {prefix + n: p for n, p in module.named_parameters() if p.requires_grad}
    if not trainable:
        raise TrainingError("the model has no trainable parameters")
    order = param_names(trainable)
    dimension = sum(trainable[n].numel() for n in order)
    dtype = next(iter(trainable.values())).dtype
    if len(inputs) == 0:
        return np.zeros((0, dimension), dtype=torch.empty(0, dtype=dtype).numpy().dtype)
    if _is_linear_cross_entropy(module, inputs, targets, loss_fn):
        return _linear_cross_entropy_rows(module, inputs, targets, [n[len(prefix):] for n in order]).cpu().numpy()
    local = {n[len(prefix):]: p.detach() for n, p in trainable.items()}
    fixed = {n: p.detach() for n, p in module.named_parameters() if not p.requires_grad}
    fixed.update({n: b for n, b in module.named_buffers()})

    def loss_one(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        def call(batch: torch.Tensor) -> torch.Tensor:
            return functional_call(module, {**params, **fixed}, (batch,))

        return loss_fn(call, x.unsqueeze(0), y.unsqueeze(0)).sum()  # type: ignore[arg-type]

    was = module.training
    if loss_fn is cross_entropy_loss and not targets.is_floating_point():
        # the loss cannot read label values inside vmap: check them here, against the classes of
        # one row's logits (eval mode, so that batch statistics never see a single row)
        module.eval()
        try:
            with torch.no_grad():
                classes = functional_call(module, {**local, **fixed}, (inputs[:1],)).shape[-1]
        finally:
            module.train(was)
        check_class_labels(targets, classes)
    module.train()
    try:
        grads = vmap(grad(loss_one), in_dims=(None, 0, 0))(local, inputs, targets)
    finally:
        module.train(was)
    rows = torch.cat([grads[n[len(prefix):]].reshape(len(inputs), -1) for n in order], dim=1)
    return _zero_non_finite(rows.detach().to("cpu")).numpy()


def _zero_non_finite(rows: torch.Tensor) -> torch.Tensor:
    rows[~torch.isfinite(rows).all(dim=1)] = 0.0
    return rows


def _is_linear_cross_entropy(module: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                             loss_fn: PerSampleLoss) -> bool:
    return (type(module) is nn.Linear and loss_fn is cross_entropy_loss
            and all(p.requires_grad for p in module.parameters())
            and inputs.dim() == 2 and targets.dim() == 1 and not targets.is_floating_point())


def _linear_cross_entropy_rows(layer: nn.Linear, x: torch.Tensor, y: torch.Tensor, order: list[str]) -> torch.Tensor:
    """Per-example gradients of ``CE(layer(x_i), y_i)``, columns in ``order`` (``bias``/``weight``);
    zero rows for examples whose gradient is not finite."""
    x = x.to(layer.weight.dtype)
    _, e = linear_ce_residual(layer, x, y)
    with torch.no_grad():
        # |e| <= 1, so a row is finite exactly when its e and x are: zero both for the others
        bad = ~(torch.isfinite(e).all(dim=1) & torch.isfinite(x).all(dim=1))
        if bool(bad.any()):
            e[bad] = 0.0
            x = x.masked_fill(bad.unsqueeze(1), 0.0)
        batch, classes, features = len(y), e.shape[1], x.shape[1]
        rows = torch.empty((batch, sum(classes * (features if n == "weight" else 1) for n in order)),
                           dtype=e.dtype, device=e.device)
        offset = 0
        for name in order:
            if name == "weight":
                block = rows[:, offset : offset + classes * features].view(batch, classes, features)
                torch.mul(e.unsqueeze(2), x.unsqueeze(1), out=block)
                offset += classes * features
            else:
                rows[:, offset : offset + classes] = e
                offset += classes
    return rows
