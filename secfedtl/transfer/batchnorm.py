"""BatchNorm and dropout under DP-SGD.

A BatchNorm in train mode normalises each sample with statistics of the whole batch and updates
its running statistics from the batch: one sample's output then depends on the others, and the
running statistics (which are shipped with the model) are computed from private data without any
clipping or noise. Both break DP-SGD's per-sample sensitivity argument.

* **Frozen** BatchNorm (no trainable parameter) is pinned in eval mode: it uses the pretrained
  running statistics and never updates them. :func:`pin_frozen_in_eval` installs this on the
  modules themselves, so it holds every time ``model.train()`` is called later (Opacus, a user loop
  and our trainer all call it).
* Dropout inside a frozen part of the model is pinned in eval mode too. Dropout is per-sample, so
  it does not break DP, but a frozen deterministic backbone is what lets features be cached
  (:mod:`secfedtl.transfer.caching`) and a pretrained feature extractor is normally used without
  its training-time dropout. A dropout is "in a frozen part" when its parent module has parameters
  and none of them is trainable.
* **Trainable** BatchNorm cannot be made private; :func:`fix_trainable_batchnorm` replaces it with
  GroupNorm through Opacus' ``ModuleValidator.fix`` and warns that the pretrained statistics are
  lost.
"""

from __future__ import annotations

import types
import warnings

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["pin_frozen_in_eval", "unpin", "fix_trainable_batchnorm", "prepare_for_dp"]

_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_PINNED = "_secfedtl_pinned_eval"


def _eval_only_train(self: nn.Module, mode: bool = True) -> nn.Module:
    """Replacement ``train`` for pinned modules: always eval, for the module and its children."""
    return nn.Module.train(self, False)


def _is_frozen(module: nn.Module) -> bool:
    params = list(module.parameters())
    return all(not p.requires_grad for p in params)


def _frozen_dropouts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    found = []
    for parent_name, parent in model.named_modules():
        own = list(parent.parameters())
        if not own or any(p.requires_grad for p in own):
            continue
        for child_name, child in parent.named_children():
            if isinstance(child, _DROPOUTS):
                found.append((f"{parent_name}.{child_name}" if parent_name else child_name, child))
    return found


def pin_frozen_in_eval(model: nn.Module, *, include_dropout: bool = True) -> list[str]:
    """Keep every frozen BatchNorm (and, by default, dropout in frozen parts) in eval mode.

    Works by giving each such module a ``train`` method that always selects eval mode, so the pin
    survives later ``model.train()`` calls. Call it after the freezing policy has been applied;
    call :func:`unpin` to undo. Returns the names of the pinned modules.
    """
    pinned: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm) and _is_frozen(module):
            pinned[name] = module
    if include_dropout:
        pinned.update(_frozen_dropouts(model))
    for module in pinned.values():
        module.train = types.MethodType(_eval_only_train, module)  # type: ignore[method-assign]
        setattr(module, _PINNED, True)
        nn.Module.train(module, False)
    return sorted(pinned)


def unpin(model: nn.Module) -> None:
    """Remove the eval pins installed by :func:`pin_frozen_in_eval`."""
    for module in model.modules():
        if getattr(module, _PINNED, False):
            del module.train
            delattr(module, _PINNED)


def fix_trainable_batchnorm(model: nn.Module) -> nn.Module:
    """Return ``model`` with every trainable BatchNorm replaced by GroupNorm (Opacus' fixer).

    Frozen BatchNorm is left alone (pin it with :func:`pin_frozen_in_eval`). Emits a
    ``UserWarning`` naming the replaced modules because their pretrained running statistics and
    affine parameters are lost. Returns ``model`` itself when there is nothing to replace, else a
    fixed copy (Opacus clones the module).
    """
    trainable_bn = [
        name
        for name, m in model.named_modules()
        if isinstance(m, _BatchNorm) and any(p.requires_grad for p in m.parameters())
    ]
    if not trainable_bn:
        return model
    from opacus.validators import ModuleValidator

    warnings.warn(
        "trainable BatchNorm cannot be trained with DP-SGD; replacing "
        f"{', '.join(trainable_bn)} with GroupNorm: their pretrained statistics are lost",
        UserWarning,
        stacklevel=2,
    )
    return ModuleValidator.fix(model)


def prepare_for_dp(model: nn.Module) -> nn.Module:
    """:func:`fix_trainable_batchnorm` then :func:`pin_frozen_in_eval`; returns the model to train."""
    model = fix_trainable_batchnorm(model)
    pin_frozen_in_eval(model)
    return model
