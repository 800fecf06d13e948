"""DP-SGD steps with Opacus, spelled out: Poisson batch, per-sample loss, clip, noise, scale, step.

This is the level below :class:`~secfedtl.training.client.PrivateClient`. It follows Opacus'
``DPOptimizer.step`` (``pre_step`` = clip and accumulate, add noise, scale; then the inner
optimizer's ``step``) with three deliberate choices:

* **Normalisation by the public expected batch size.** Per-sample losses are *summed* (the grad
  sample module uses ``loss_reduction="sum"``), and the noisy sum of clipped gradients is divided
  by the configured ``expected_batch_size`` (the DP optimizer uses ``loss_reduction="mean"`` with
  that fixed divisor) -- never by the actual size of the Poisson batch or of the dataset. Dividing
  by a data-dependent count changes the sensitivity analysis (Opacus issues #571 and #819); a fixed
  public divisor is post-processing.
* **Empty Poisson batches still step**: the clipped sum is zero, noise is added and the step is
  taken, exactly as the accountant assumes.
* **Linear head on cached features**: for a fully trainable ``nn.Linear`` with cross entropy on a
  feature ``TensorDataset``, per-sample gradients have a closed form (``(softmax - onehot) x^T``), so
  the clipped sum is computed directly, without autograd hooks; Opacus' optimizer still adds the
  noise and scales. It matches the generic Opacus path to float tolerance (tested).
* **Data-independent regularisers** (L2-SP) are added to the gradient after noise, which costs no
  privacy (see :mod:`secfedtl.transfer.regularizers`).

Poisson batch membership comes from the client's :class:`~secfedtl.privacy.randomness.Randomness`
(``os.urandom`` unless a test asks for the insecure seeded kind), never from torch's generators.
Noise comes from Opacus with the client's own ``generator``. With ``secure_mode`` it
comes from the operating system's CSPRNG (``os.urandom``) through Box-Muller, summed 4 times and
halved as in Opacus' secure mode (the floating-point attack mitigation of arXiv:2107.10138).
"""

from __future__ import annotations

import warnings
from typing import Protocol

import torch
from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset, default_collate

from secfedtl.errors import ConfigError, TrainingError
from secfedtl.privacy.noise import secure_gaussian_array
from secfedtl.privacy.randomness import Randomness
from secfedtl.training.config import DPTrainingConfig
from secfedtl.transfer.distillation import check_class_labels, cross_entropy_loss

__all__ = ["AuditHook", "PerSampleLoss", "linear_ce_residual", "secure_gaussian", "run_dp_sgd"]


class PerSampleLoss(Protocol):
    """``(model, inputs, targets) -> losses`` of shape ``(batch,)``, one loss per example."""

    def __call__(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...


class GradientRegularizer(Protocol):
    """A data-independent term whose gradient is added after noise (e.g. :class:`L2SP`)."""

    def add_gradient(self, model: nn.Module) -> None: ...


class AuditHook(Protocol):
    """An empirical audit's view into DP-SGD (:mod:`secfedtl.jobs.audit_run`; never set in a real job).

    ``parameter`` is an extra block of coordinates that the optimizer noises and steps like every
    trained parameter, and that no real record's gradient touches: the audit's gradient (Dirac)
    canaries live there. Each step, :meth:`clipped_sum` returns the sum of the canaries sampled in
    that step (each of norm at most ``clip_norm``), added to the clipped sum before the noise;
    :meth:`observe` then receives the noisy sums of every trained parameter and of the block (what
    a white-box adversary sees), before normalisation."""

    parameter: torch.Tensor

    def clipped_sum(self, randomness: Randomness, sample_rate: float, clip_norm: float) -> torch.Tensor: ...

    def observe(self, noisy_sums: list[torch.Tensor]) -> None: ...


def secure_gaussian(shape: torch.Size | tuple[int, ...], *, std: float, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Gaussian noise with standard deviation ``std`` drawn from ``os.urandom``.

    Box-Muller on 53-bit uniforms in float64; four draws are summed and halved (Opacus' secure-mode
    construction) so the low bits of one float do not reveal the sample. The draw itself is
    :func:`secfedtl.privacy.noise.secure_gaussian_array`.
    """
    noise = secure_gaussian_array(tuple(shape), std=std)
    return torch.from_numpy(noise).to(dtype=dtype, device=device)


def _secure_add_noise(self: DPOptimizer) -> None:
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    for p in self.params:
        _check_processed_flag(p.summed_grad)
        noise = secure_gaussian(
            p.summed_grad.shape,
            std=self.noise_multiplier * self.max_grad_norm,
            dtype=p.summed_grad.dtype,
            device=p.summed_grad.device,
        )
        p.grad = (p.summed_grad + noise).view_as(p)
        _mark_as_processed(p.summed_grad)


class _SecureDPOptimizer(DPOptimizer):
    add_noise = _secure_add_noise


class _SecureDPOptimizerGhost(DPOptimizerFastGradientClipping):
    add_noise = _secure_add_noise


def _batch(data: Dataset, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(data, TensorDataset) and len(data.tensors) == 2:
        return data.tensors[0][idx], data.tensors[1][idx]
    x, y = default_collate([data[int(i)] for i in idx])
    return x, torch.as_tensor(y)


def _inner_optimizer(config: DPTrainingConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum)


def _is_linear_ce_fast_path(model: nn.Module, data: Dataset, loss_fn: PerSampleLoss, config: DPTrainingConfig) -> bool:
    """A fully trainable ``nn.Linear`` with cross entropy on a 2-D ``TensorDataset`` (cached
    features): per-sample gradients have a closed form, no autograd hooks needed."""
    return (
        type(model) is nn.Linear
        and all(p.requires_grad for p in model.parameters())
        and loss_fn is cross_entropy_loss
        and config.clipping == "flat"
        and isinstance(data, TensorDataset)
        and len(data.tensors) == 2
        and data.tensors[0].dim() == 2
    )


def linear_ce_residual(layer: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For the logits ``z = layer(x)``: the log-probabilities and the residual
    ``e = softmax(z) - onehot(y)``, the per-example gradient of cross entropy with respect to
    ``z`` (no autograd). The closed forms of the linear head's per-example gradients (this module's
    DP-SGD fast path, :mod:`secfedtl.training.examples`) are built on it. Labels outside
    ``[0, classes)`` raise :class:`~secfedtl.errors.InputError` (:func:`check_class_labels`)."""
    check_class_labels(y, layer.out_features)
    with torch.no_grad():
        log_p = F.log_softmax(F.linear(x, layer.weight, layer.bias), dim=1)
        e = log_p.exp()
        e[torch.arange(len(y), device=y.device), y] -= 1.0
    return log_p, e


def _linear_ce_clipped_sum(
    layer: nn.Linear, x: torch.Tensor, y: torch.Tensor, max_grad_norm: float
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Sum over the batch of per-sample clipped gradients of ``CE(layer(x_i), y_i)``.

    For logits ``z = W x + b`` the per-sample gradient is ``e_i x_i^T`` (and ``e_i`` for the bias)
    with ``e_i = softmax(z_i) - onehot(y_i)``, so its norm is ``||e_i|| * sqrt(||x_i||^2 + 1)``.
    Clip factors follow Opacus exactly: ``min(1, C / (norm + 1e-6))``. Returns the summed weight
    and bias gradients and the per-sample losses.
    """
    log_p, e = linear_ce_residual(layer, x, y)
    with torch.no_grad():
        losses = -log_p.gather(1, y.view(-1, 1)).squeeze(1)
        sq = (x * x).sum(dim=1) + (1.0 if layer.bias is not None else 0.0)
        norms = torch.sqrt((e * e).sum(dim=1) * sq)
        # A record whose loss or gradient is not finite contributes zero (within the clip norm),
        # never an error: whether training fails must not depend on the data.
        ok = torch.isfinite(losses) & torch.isfinite(norms) & torch.isfinite(x).all(dim=1)
        factor = torch.where(ok, (max_grad_norm / (norms + 1e-6)).clamp(max=1.0), torch.zeros_like(norms))
        ce = torch.where(ok.unsqueeze(1), e, torch.zeros_like(e)) * factor.unsqueeze(1)
        grad_w = ce.t() @ x.masked_fill(~ok.unsqueeze(1), 0.0)  # one copy of the batch, not two
        grad_b = ce.sum(dim=0) if layer.bias is not None else None
    return grad_w, grad_b, losses



def _finite_mean(values: torch.Tensor) -> float:
    """Mean of the finite values (for the local loss log only), 0 when there are none."""
    finite = values[torch.isfinite(values)]
    return float(finite.mean()) if len(finite) else 0.0


def _zero_non_finite_samples(params: list[nn.Parameter], per_sample: torch.Tensor) -> None:
    """Set to zero every per-sample gradient row of a record whose loss or gradient is not finite:
    that record contributes nothing (within the clip norm), and training never fails because of
    what a record holds (the server could otherwise test records through the failure)."""
    bad = ~torch.isfinite(per_sample)
    for p in params:
        gs = getattr(p, "grad_sample", None)
        if gs is not None and gs.shape[0] == bad.shape[0]:
            bad |= ~torch.isfinite(gs.reshape(gs.shape[0], -1)).all(dim=1)
    if bad.any():
        for p in params:
            gs = getattr(p, "grad_sample", None)
            if gs is not None and gs.shape[0] == bad.shape[0]:
                gs[bad] = 0.0


def run_dp_sgd(
    *,
    model: nn.Module,
    data: Dataset,
    config: DPTrainingConfig,
    noise_multiplier: float,
    steps: int,
    sample_rate: float,
    loss_fn: PerSampleLoss,
    regularizer: GradientRegularizer | None = None,
    regularized_model: nn.Module | None = None,
    randomness: Randomness,
    noise_generator: torch.Generator | None = None,
    device: str = "cpu",
    audit: AuditHook | None = None,
) -> list[float]:
    """Run ``steps`` DP-SGD steps on ``model`` in place and return the mean loss of each step.

    ``model`` is trained as given (its frozen parameters get no gradient); ``regularized_model`` is
    the model the regulariser's names refer to (defaults to ``model``). Each step's batch is drawn
    by ``randomness`` (see :mod:`secfedtl.privacy.randomness`); ``noise_generator`` is the client's
    own noise generator (``randomness.noise_generator()``; ``None`` in ``secure_mode``). A record
    whose loss or per-sample gradient is not finite contributes zero to its step (never an error:
    a failure that depends on a record would tell a server whether it is there). Raises
    :class:`TrainingError` on non-finite parameters after training (possible only from public
    inputs: huge global weights or learning rate); the caller owns rollback.
    ``audit`` (:class:`AuditHook`, empirical audits only; ``None`` changes nothing) adds gradient
    canaries in a block of their own and observes every noisy step (linear-head fast path only).
    """
    if not isinstance(randomness, Randomness):
        raise ConfigError("randomness must be a secfedtl.privacy.randomness.Randomness")
    if config.secure_mode and noise_generator is not None:
        raise ConfigError("secure_mode draws noise from the OS CSPRNG; do not pass a noise generator")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters")
    n = len(data)  # type: ignore[arg-type]
    ghost = config.clipping == "ghost"
    fast = _is_linear_ce_fast_path(model, data, loss_fn, config)
    if audit is not None:
        if not fast:
            raise ConfigError("the white-box audit hook supports the linear head on cached features only")
        params = params + [audit.parameter]
    inner = _inner_optimizer(config, params)
    common = dict(
        noise_multiplier=noise_multiplier,
        max_grad_norm=config.max_grad_norm,
        expected_batch_size=config.expected_batch_size,
        loss_reduction="mean",  # divide the noisy sum by the fixed expected_batch_size
        generator=noise_generator,
        secure_mode=config.secure_mode,
    )
    try:
        if ghost:
            gsm: nn.Module = GradSampleModuleFastGradientClipping(
                model, loss_reduction="sum", max_grad_norm=config.max_grad_norm, use_ghost_clipping=True
            )
            cls = _SecureDPOptimizerGhost if config.secure_mode else DPOptimizerFastGradientClipping
        elif fast:
            gsm = model  # closed-form per-sample gradients: no hooks
            cls = _SecureDPOptimizer if config.secure_mode else DPOptimizer
        else:
            gsm = GradSampleModule(model, loss_reduction="sum")
            cls = _SecureDPOptimizer if config.secure_mode else DPOptimizer
    except NotImplementedError as exc:  # Opacus: a trainable layer with buffers (e.g. BatchNorm)
        raise TrainingError(f"Opacus cannot train this model privately: {exc}") from exc
    optimizer = cls(inner, **common)
    target = regularized_model if regularized_model is not None else model
    losses: list[float] = []
    gsm.train()
    with warnings.catch_warnings():
        # Opacus' backward hooks on a model whose inputs need no grad (frozen backbone): harmless.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        try:
            for _ in range(steps):
                optimizer.zero_grad(set_to_none=True)
                chosen = torch.from_numpy(randomness.poisson_indices(n, sample_rate))
                if fast:
                    x, y = _batch(data, chosen)
                    grad_w, grad_b, per_sample = _linear_ce_clipped_sum(
                        model, x.to(device), y.to(device), config.max_grad_norm  # type: ignore[arg-type]
                    )
                    model.weight.summed_grad = grad_w  # type: ignore[union-attr]
                    if grad_b is not None:
                        model.bias.summed_grad = grad_b  # type: ignore[union-attr]
                    if audit is not None:
                        audit.parameter.summed_grad = audit.clipped_sum(  # type: ignore[attr-defined]
                            randomness, sample_rate, config.max_grad_norm)
                    losses.append(_finite_mean(per_sample))
                    # Opacus adds the noise; divide by the fixed expected_batch_size as its
                    # scale_grad does (one accumulated iteration).
                    optimizer.add_noise()
                    if audit is not None:
                        audit.observe([p.grad.detach().clone() for p in params])  # type: ignore[union-attr]
                    for p in params:
                        p.grad /= config.expected_batch_size
                    if regularizer is not None:
                        regularizer.add_gradient(target)
                    inner.step()
                    continue
                if chosen.numel() == 0:
                    # Empty Poisson batch: zero clipped sum, noise still added and the step still taken.
                    for p in params:
                        if ghost:
                            p.grad = torch.zeros_like(p)
                        else:
                            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
                    losses.append(0.0)
                else:
                    x, y = _batch(data, chosen)
                    x, y = x.to(device), y.to(device)
                    per_sample = loss_fn(gsm, x, y)
                    if per_sample.shape != (x.shape[0],):
                        raise TrainingError(
                            f"loss_fn must return one loss per example, got shape {tuple(per_sample.shape)}"
                        )
                    if ghost and not torch.isfinite(per_sample).all():
                        # Ghost clipping cannot set one record's gradient aside after the fact:
                        # drop the records whose loss is not finite and run the batch again
                        # (the same as a zero contribution from each of them).
                        keep = torch.isfinite(per_sample.detach())
                        optimizer.zero_grad(set_to_none=True)
                        for module in gsm.modules():  # forget the first forward's activations
                            if hasattr(module, "activations"):
                                module.activations = []
                        for p in params:
                            if hasattr(p, "_forward_counter"):
                                p._forward_counter = 0
                        x, y = x[keep], y[keep]
                        per_sample = loss_fn(gsm, x, y) if len(y) else per_sample.detach()[keep]
                    if ghost:
                        per_sample.sum().backward(retain_graph=True)
                        optimizer.zero_grad(set_to_none=True)
                        coeff = gsm.get_clipping_coef()  # type: ignore[operator]
                        gsm.disable_hooks()  # type: ignore[operator]
                        (coeff.to(per_sample.device) * per_sample).sum().backward()
                        gsm.enable_hooks()  # type: ignore[operator]
                    else:
                        per_sample.sum().backward()
                        _zero_non_finite_samples(params, per_sample.detach())
                    losses.append(_finite_mean(per_sample.detach()))
                if optimizer.pre_step():
                    if regularizer is not None:
                        regularizer.add_gradient(target)
                    inner.step()
            # Non-finite weights make the next step's loss non-finite; check the last step here.
            if not all(bool(torch.isfinite(p).all()) for p in params):
                raise TrainingError("non-finite parameters after DP-SGD")
        finally:
            optimizer.zero_grad(set_to_none=True)
            for p in params:
                for attr in ("grad_sample", "summed_grad", "_norm_sample"):
                    if hasattr(p, attr):
                        try:
                            delattr(p, attr)
                        except AttributeError:
                            pass
            if hasattr(gsm, "_close"):
                gsm._close()  # removes hooks and Opacus attributes
    return losses
