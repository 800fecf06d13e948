"""Loading a pretrained source model: an ``nn.Module`` plus weights from a file.

Weights are read without unpickling: ``.safetensors`` files through ``safetensors``, anything else
through ``torch.load(..., weights_only=True)``, which refuses arbitrary Python objects. A checkpoint
that does not fit the module (missing or unexpected names, different shapes) raises
:class:`~secfedtl.errors.ModelError` naming every offending tensor, and leaves the module untouched.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from secfedtl.errors import InputError, ModelError

__all__ = ["load_state_dict_file", "load_source_model", "check_state_dict", "state_hash"]


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a flat ``name -> tensor`` mapping from ``path`` without unpickling anything.

    ``.safetensors`` files are read with ``safetensors.torch.load_file``; other files with
    ``torch.load(weights_only=True)``. A checkpoint that wraps the weights in ``{"state_dict": ...}``
    is unwrapped. Raises :class:`ModelError` when the file is missing, unreadable, or does not hold a
    mapping of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"no weights file at {path}")
    try:
        if path.suffix == ".safetensors":
            try:
                from safetensors.torch import load_file
            except ModuleNotFoundError as exc:  # pragma: no cover - depends on the install
                raise ModelError("reading .safetensors needs the 'safetensors' package") from exc
            state: object = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except ModelError:
        raise
    except Exception as exc:  # torch/safetensors raise many unrelated types on bad files
        raise ModelError(f"cannot read weights from {path}: {exc}") from exc
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ModelError(f"{path} does not hold a mapping of parameter names to tensors")
    return dict(state)


def check_state_dict(
    model: nn.Module, state: Mapping[str, torch.Tensor], *, strict: bool = True
) -> None:
    """Raise :class:`ModelError` unless ``state`` fits ``model``.

    Every shape mismatch is reported with its name and both shapes. With ``strict`` (the default)
    missing and unexpected names are errors too; without it only names present in both are checked.
    """
    own = model.state_dict()
    problems: list[str] = []
    for name, tensor in state.items():
        if name in own and tuple(own[name].shape) != tuple(tensor.shape):
            problems.append(
                f"{name}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(own[name].shape)}"
            )
    if strict:
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing:
            problems.append(f"missing from checkpoint: {', '.join(missing)}")
        if unexpected:
            problems.append(f"not in model: {', '.join(unexpected)}")
    if problems:
        raise ModelError("checkpoint does not fit the model: " + "; ".join(problems))


def load_source_model(
    model: nn.Module,
    weights: str | Path | Mapping[str, torch.Tensor],
    *,
    strict: bool = True,
) -> nn.Module:
    """Load pretrained ``weights`` (a file path or a state dict) into ``model`` and return it.

    The checkpoint is checked in full before anything is copied, so a checkpoint that does not fit
    leaves ``model`` unchanged. Non-finite weights are refused with :class:`InputError`.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    state = weights if isinstance(weights, Mapping) else load_state_dict_file(weights)
    check_state_dict(model, state, strict=strict)
    bad = [n for n, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise InputError(f"checkpoint holds non-finite values in: {', '.join(sorted(bad))}")
    model.load_state_dict(dict(state), strict=strict)
    return model


def state_hash(model: nn.Module) -> str:
    """SHA-256 (hex) over the model's state dict in sorted name order: names, dtypes, shapes, bytes.

    Used as the ``model_hash`` that ties a ledger entry to the exact weights a round started from.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(t.dtype).encode())
        digest.update(repr(tuple(t.shape)).encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()
