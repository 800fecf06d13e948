"""Knowledge distillation from the source model, computed per sample.

``loss_i = CE(student_i, y_i) + alpha * T^2 * KL(softmax(teacher_i / T) || softmax(student_i / T))``

The teacher is the frozen source model in eval mode. Under DP-SGD the teacher only ever sees the
client's own example inside that example's loss, so the per-sample gradient still depends on one
example only and per-sample clipping still bounds each example's influence; no extra privacy cost.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from secfedtl.errors import ConfigError, InputError

__all__ = ["check_class_labels", "distillation_loss", "DistillationLoss", "cross_entropy_loss"]


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
) -> torch.Tensor:
    """Per-sample distillation loss, shape ``(batch,)``. ``alpha = 0`` gives plain cross entropy."""
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise InputError(
            f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} "
            "logits must both be (batch, classes)"
        )
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    if not alpha >= 0:
        raise ConfigError(f"alpha must be >= 0, got {alpha}")
    ce = F.cross_entropy(student_logits, targets, reduction="none")
    if alpha == 0:
        return ce
    t = float(temperature)
    log_p_student = F.log_softmax(student_logits / t, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / t, dim=1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1)
    return ce + alpha * t * t * kl


def check_class_labels(targets: torch.Tensor, classes: int) -> None:
    """Cross entropy takes class indices in ``[0, classes)``; anything else raises
    :class:`InputError`. torch would silently read a negative index from the end (the closed
    forms) or skip the record (``-100``, ``F.cross_entropy``'s ignore index), and raise a bare
    ``IndexError`` for one too large."""
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise InputError(f"class labels must be integers, got dtype {targets.dtype}")
    if targets.dim() != 1:
        raise InputError(f"class labels must be a 1-D tensor, got shape {tuple(targets.shape)}")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= classes):
        raise InputError(f"class labels must lie in [0, {classes}), got {int(targets.min())}..{int(targets.max())}")


def cross_entropy_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The default per-sample loss: cross entropy of ``model(inputs)``, shape ``(batch,)``
    (class-index labels checked by :func:`check_class_labels`; inside ``torch.func.vmap`` the caller
    checks them: :func:`~secfedtl.training.examples.per_example_gradients`)."""
    logits = model(inputs)
    # class indices (float targets are probabilities); inside torch.func's vmap (the generic
    # per-example gradients of distributed noise) a check that reads values cannot run
    if not targets.dtype.is_floating_point and not _is_batched(targets):
        check_class_labels(targets, logits.shape[-1])
    return F.cross_entropy(logits, targets, reduction="none")


def _is_batched(tensor: torch.Tensor) -> bool:
    return bool(torch._C._functorch.is_functorch_wrapped_tensor(tensor))  # noqa: SLF001


@dataclass(frozen=True, kw_only=True)
class DistillationLoss:
    """Per-sample loss ``(model, inputs, targets) -> (batch,)`` distilling from ``teacher``.

    The teacher is deep-copied, frozen and put in eval mode when the loss is built, so later
    changes to the source model do not leak into it.
    """

    teacher: nn.Module = field(repr=False)
    alpha: float = 0.5
    temperature: float = 2.0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if not self.alpha >= 0:
            raise ConfigError(f"alpha must be >= 0, got {self.alpha}")
        teacher = copy.deepcopy(self.teacher).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        object.__setattr__(self, "teacher", teacher)

    def __call__(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if any(p.device != inputs.device for p in self.teacher.parameters()):
                self.teacher.to(inputs.device)  # the student trains on CUDA when present
            teacher_logits = self.teacher(inputs)
        return distillation_loss(
            model(inputs), teacher_logits, targets, alpha=self.alpha, temperature=self.temperature
        )
