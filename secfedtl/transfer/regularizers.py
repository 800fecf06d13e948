"""L2-SP: keep the fine-tuned weights close to the pretrained source weights.

``penalty(w) = strength * sum_i ||w_i - w_source_i||^2`` over the trainable parameters, with
gradient ``2 * strength * (w - w_source)``.

How it is handled under DP-SGD: the penalty depends only on the current weights and on the public
source weights, never on a training example. Its gradient is therefore added to the *noisy,
normalised* gradient after Opacus has clipped, noised and scaled (:meth:`L2SP.add_gradient`), just
before the optimizer step. This is post-processing of a DP output, so it costs no privacy, and it is
not distorted by per-sample clipping (folding it into each per-sample loss would get it clipped
together with the data gradient, shrinking both by an example-dependent factor, and would spend
clipping budget on a term that needs none).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from secfedtl.errors import ConfigError, InputError

__all__ = ["L2SP"]


@dataclass(frozen=True, kw_only=True)
class L2SP:
    """The L2-SP regulariser, anchored at ``source`` (name -> tensor, copied)."""

    strength: float
    source: dict[str, torch.Tensor] = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.strength, (int, float)) or isinstance(self.strength, bool):
            raise ConfigError("strength must be a number")
        if not (self.strength >= 0 and self.strength < float("inf")):
            raise ConfigError(f"strength must be finite and >= 0, got {self.strength}")
        if not self.source:
            raise ConfigError("L2-SP needs at least one source tensor")
        copied = {}
        for name, t in self.source.items():
            if not isinstance(t, torch.Tensor) or not torch.isfinite(t).all():
                raise InputError(f"source weight {name!r} must be a finite tensor")
            copied[name] = t.detach().clone()
        object.__setattr__(self, "source", copied)

    @classmethod
    def from_model(cls, model: nn.Module, *, strength: float) -> L2SP:
        """Anchor at the model's current trainable parameters (call before fine-tuning)."""
        source = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        return cls(strength=strength, source=source)

    def _pairs(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        params = dict(model.named_parameters())
        missing = sorted(set(self.source) - set(params))
        if missing:
            raise InputError(f"model has no parameters {', '.join(missing)}")
        for name in self.source:
            if params[name].shape != self.source[name].shape:
                raise InputError(f"shape mismatch for {name!r}")
        return [(name, params[name]) for name in self.source]

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """``strength * sum ||w - w_source||^2`` (differentiable)."""
        total = torch.zeros(())
        for name, p in self._pairs(model):
            total = total + ((p - self.source[name].to(p.device)) ** 2).sum().to(total.device)
        return self.strength * total

    @torch.no_grad()
    def add_gradient(self, model: nn.Module) -> None:
        """Add ``2 * strength * (w - w_source)`` to ``p.grad`` of each anchored trainable parameter.

        Call after the DP optimizer's ``pre_step`` (clip, noise, scale) and before the inner
        optimizer's ``step``. Parameters without a gradient get one.
        """
        if self.strength == 0:
            return
        for name, p in self._pairs(model):
            if not p.requires_grad:
                continue
            g = 2.0 * self.strength * (p.detach() - self.source[name].to(p.device))
            p.grad = g if p.grad is None else p.grad + g
