"""Freezing policies: which parameters of a transferred model are trained.

A policy is a small immutable value; :meth:`apply` sets ``requires_grad`` on every parameter of a
model and returns the sorted names of the trainable ones. A policy that does not fit the model
(unknown head, too few blocks, unknown names) raises :class:`~secfedtl.errors.ConfigError` before
any flag is changed.

:func:`replace_head` swaps the classification head for the target task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import nn

from secfedtl.errors import ConfigError, InputError

__all__ = [
    "FreezingPolicy",
    "HeadOnly",
    "LastBlocks",
    "ParameterNames",
    "replace_head",
    "trainable_names",
]


class FreezingPolicy(Protocol):
    """Anything with ``apply(model) -> list[str]`` (names of the parameters left trainable)."""

    def apply(self, model: nn.Module) -> list[str]: ...


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the parameters with ``requires_grad``, in ``named_parameters`` order."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def _get_submodule(model: nn.Module, attr: str) -> nn.Module:
    try:
        return model.get_submodule(attr)
    except AttributeError as exc:
        raise ConfigError(f"model has no submodule {attr!r}") from exc


def _set_trainable(model: nn.Module, prefixes: list[str]) -> list[str]:
    """Train exactly the parameters under one of ``prefixes`` (module paths); freeze the rest."""
    chosen = []
    for name, param in model.named_parameters():
        keep = any(name == p or name.startswith(p + ".") for p in prefixes)
        param.requires_grad_(keep)
        if keep:
            chosen.append(name)
    return chosen


@dataclass(frozen=True, kw_only=True, slots=True)
class HeadOnly:
    """Train only the head submodule ``head`` (e.g. ``"fc"`` for a ResNet); freeze the backbone."""

    head: str = "fc"

    def apply(self, model: nn.Module) -> list[str]:
        head = _get_submodule(model, self.head)
        if not any(True for _ in head.parameters()):
            raise ConfigError(f"head {self.head!r} has no parameters to train")
        return _set_trainable(model, [self.head])


@dataclass(frozen=True, kw_only=True, slots=True)
class LastBlocks:
    """Train the last ``k`` children of the container ``blocks`` plus the head ``head``."""

    k: int
    blocks: str = "layers"
    head: str = "fc"

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 0:
            raise ConfigError(f"k must be a non-negative int, got {self.k!r}")

    def apply(self, model: nn.Module) -> list[str]:
        container = _get_submodule(model, self.blocks)
        _get_submodule(model, self.head)
        children = [name for name, _ in container.named_children()]
        if self.k > len(children):
            raise ConfigError(
                f"{self.blocks!r} has {len(children)} blocks, cannot train the last {self.k}"
            )
        chosen = children[len(children) - self.k :]
        return _set_trainable(model, [f"{self.blocks}.{c}" for c in chosen] + [self.head])


@dataclass(frozen=True, kw_only=True, slots=True)
class ParameterNames:
    """Train exactly the named parameters; every name must exist in the model."""

    names: tuple[str, ...]

    def __init__(self, names: list[str] | tuple[str, ...]) -> None:
        if isinstance(names, str) or not all(isinstance(n, str) for n in names):
            raise ConfigError("names must be a list of parameter names")
        if not names:
            raise ConfigError("names must not be empty")
        object.__setattr__(self, "names", tuple(names))

    def apply(self, model: nn.Module) -> list[str]:
        known = {name for name, _ in model.named_parameters()}
        unknown = sorted(set(self.names) - known)
        if unknown:
            raise ConfigError(f"no such parameters: {', '.join(unknown)}")
        wanted = set(self.names)
        chosen = []
        for name, param in model.named_parameters():
            param.requires_grad_(name in wanted)
            if name in wanted:
                chosen.append(name)
        return chosen


def replace_head(model: nn.Module, attr: str, new_module: nn.Module) -> nn.Module:
    """Replace the submodule at dotted path ``attr`` with ``new_module`` (trainable) and return it.

    The new head is moved to the device and dtype of the model's existing parameters.
    """
    if not isinstance(new_module, nn.Module):
        raise InputError(f"new head must be an nn.Module, not {type(new_module).__name__}")
    old = _get_submodule(model, attr)
    parent_name, _, child = attr.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    ref = next(old.parameters(), None)
    if ref is None:
        ref = next(model.parameters(), None)
    if ref is not None:
        new_module = new_module.to(device=ref.device, dtype=ref.dtype)
    for p in new_module.parameters():
        p.requires_grad_(True)
    setattr(parent, child, new_module)
    return model
