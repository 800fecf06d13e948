"""Feature caching for head-only private training.

When everything below the head is frozen and deterministic, the backbone maps each example to the
same feature vector at every step, so running it once per client dataset and training the head on
the cached features gives the same per-sample gradients, the same clipping and (with the same
Poisson batches and noise) the same head weights as running the backbone every step -- at a
fraction of the cost. Privacy is unchanged: the features are a fixed, data-independent function of
each example, computed and kept on the client.

:func:`cache_features` refuses (:class:`~secfedtl.errors.ConfigError`) a backbone with trainable
parameters, a BatchNorm or dropout in train mode, or one whose output differs between two runs on
the same batch.
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, Dataset, TensorDataset

from secfedtl._atomic import atomic_write
from secfedtl.errors import ConfigError, InputError

__all__ = ["cache_features", "cached_features", "check_frozen_deterministic", "iter_batches", "split_head"]

_MODE_DEPENDENT = (_BatchNorm, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


def check_frozen_deterministic(backbone: nn.Module) -> None:
    """Raise :class:`ConfigError` unless ``backbone`` has no trainable parameter and no
    BatchNorm/dropout in train mode."""
    trainable = [n for n, p in backbone.named_parameters() if p.requires_grad]
    if trainable:
        raise ConfigError(
            f"cannot cache features: backbone has trainable parameters {', '.join(trainable)}"
        )
    active = [
        n or type(m).__name__
        for n, m in backbone.named_modules()
        if isinstance(m, _MODE_DEPENDENT) and m.training
    ]
    if active:
        raise ConfigError(
            "cannot cache features: backbone modules in train mode (non-deterministic or "
            f"batch-dependent): {', '.join(active)}"
        )


def split_head(model: nn.Module, head: str) -> tuple[nn.Module, nn.Module]:
    """Return ``(backbone, head_module)`` for a model whose forward ends with ``head``.

    The backbone is a deep copy of ``model`` with the head replaced by ``nn.Identity`` (the
    torchvision convention: ``model.fc`` applied last). The head module is the model's own object.
    The caller should check ``head_module(backbone(x)) == model(x)`` on a probe batch; the client
    trainer does.
    """
    import copy

    try:
        head_module = model.get_submodule(head)
    except AttributeError as exc:
        raise ConfigError(f"model has no head {head!r}") from exc
    backbone = copy.deepcopy(model)
    parent_name, _, child = head.rpartition(".")
    parent = backbone.get_submodule(parent_name) if parent_name else backbone
    setattr(parent, child, nn.Identity())
    return backbone, head_module


def iter_batches(dataset: Dataset, batch_size: int) -> Iterator[tuple[torch.Tensor, Any]]:
    """``(inputs, labels)`` batches of ``dataset`` in order: slices (views, no copy) of a
    two-tensor :class:`TensorDataset`, else a non-shuffling :class:`DataLoader`'s batches."""
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        xs, ys = dataset.tensors
        for start in range(0, len(xs), batch_size):
            yield xs[start : start + batch_size], ys[start : start + batch_size]
    else:
        yield from DataLoader(dataset, batch_size=batch_size, shuffle=False)


def _check_out(out: Any, rows: int, dim: int | None) -> None:
    """``out`` must be a float32 ``(rows, dim)`` tensor (``dim`` is checked once it is known)."""
    if not isinstance(out, torch.Tensor):
        raise InputError(f"out must be a torch.Tensor, not {type(out).__name__}")
    if out.dtype != torch.float32 or out.dim() != 2 or out.shape[0] != rows or dim not in (None, out.shape[1]):
        want = f"({rows}, {'d' if dim is None else dim})"
        raise InputError(f"out must be float32 of shape {want}, got {out.dtype} {tuple(out.shape)}")
    if out.requires_grad:
        raise InputError("out must not require gradients")


@torch.no_grad()
def cache_features(
    backbone: nn.Module, dataset: Dataset, batch_size: int, *, out: torch.Tensor | None = None
) -> TensorDataset:
    """Run the frozen ``backbone`` once over ``dataset`` ((input, label) pairs, in order) and return
    ``TensorDataset(features, labels)`` with float32 features flattened to ``(n, d)``.

    Memory: the features are written batch by batch into one float32 ``(n, d)`` tensor allocated
    once (on the backbone output's device), never gathered in a list and concatenated, so the
    peak is the cache plus one batch's activations. A two-tensor :class:`TensorDataset` is read in
    slices (no per-example collation). ``out`` (optional) is where to write instead: a float32
    CPU or device tensor of exactly that shape, e.g. a row slice of a larger buffer shared with
    other datasets, or ``torch.from_numpy`` of a float32 ``np.memmap``; the returned features are
    ``out`` itself (same storage, no copy). If an exception is raised, ``out``'s contents are
    undefined.

    Raises :class:`ConfigError` when the backbone is not frozen and deterministic (checked
    statically and by running the first batch twice), :class:`InputError` for an empty dataset,
    a bad ``batch_size``, an ``out`` of the wrong dtype or shape, or non-finite features.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
    try:
        n = len(dataset)  # type: ignore[arg-type]
    except TypeError as exc:
        raise InputError("dataset must have a length") from exc
    if n == 0:
        raise InputError("cannot cache features of an empty dataset")
    if out is not None:
        _check_out(out, n, None)
    check_frozen_deterministic(backbone)
    features: torch.Tensor | None = out
    labels: torch.Tensor | None = None
    start = 0
    for x, y in iter_batches(dataset, batch_size):
        f = backbone(x)
        f = f.reshape(f.shape[0], -1)
        y = torch.as_tensor(y)
        if labels is None:  # first batch: check determinism, then allocate once
            if not torch.equal(f, backbone(x).reshape(f.shape[0], -1)):
                raise ConfigError("cannot cache features: backbone output is not deterministic")
            if features is None:
                features = torch.empty((n, f.shape[1]), dtype=torch.float32, device=f.device)
            else:
                _check_out(features, n, f.shape[1])
            labels = torch.empty((n, *y.shape[1:]), dtype=y.dtype, device=y.device)
        if start + f.shape[0] > n or f.shape[1] != features.shape[1]:  # type: ignore[union-attr]
            raise InputError("the dataset yielded more rows than its length, or rows of different sizes")
        if not torch.isfinite(f).all():
            raise InputError("backbone produced non-finite features")
        features[start : start + f.shape[0]] = f  # type: ignore[index]
        labels[start : start + f.shape[0]] = y
        start += f.shape[0]
    if start != n or features is None or labels is None:
        raise InputError(f"the dataset has length {n} but yielded {start} rows")
    return TensorDataset(features, labels)


_KEY = re.compile(r"[0-9a-f]{64}")


def _read_cached(path: Path, key: str, num_rows: int | None) -> np.ndarray | None:
    """The features in ``path`` if it is a valid cache file for ``key``, else ``None``."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if set(data.files) != {"key", "features"} or str(data["key"]) != key:
                return None
            features = data["features"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None  # unreadable, truncated, or not an npz of plain arrays
    if features.dtype != np.float32 or features.ndim != 2 or not np.isfinite(features).all():
        return None
    if num_rows is not None and features.shape[0] != num_rows:
        return None
    return features


def cached_features(
    directory: str | os.PathLike[str],
    key: str,
    compute: Callable[[], np.ndarray],
    *,
    num_rows: int | None = None,
) -> tuple[np.ndarray, bool]:
    """Features stored under ``key`` in ``directory``, computed by ``compute()`` on a miss.

    Returns ``(features, hit)``. ``key`` is a SHA-256 hex digest naming exactly what was computed
    (e.g. :func:`secfedtl.transfer.text.embedding_key`: model weights + inputs). The file is
    ``<key>.npz`` holding ``features`` (float32, 2-D, finite) and ``key``; it is read with
    ``allow_pickle=False`` and used only if all of that holds (and it has ``num_rows`` rows when
    given); otherwise it is recomputed and replaced atomically. ``compute`` must return such an
    array, or :class:`InputError` is raised and nothing is written.
    """
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise InputError("key must be a lower-case SHA-256 hex digest")
    folder = Path(directory)
    path = folder / f"{key}.npz"
    if path.is_file():
        cached = _read_cached(path, key, num_rows)
        if cached is not None:
            return cached, True
    features = np.asarray(compute())
    if features.dtype != np.float32 or features.ndim != 2 or not np.isfinite(features).all():
        raise InputError("compute() must return a finite 2-D float32 array")
    if num_rows is not None and features.shape[0] != num_rows:
        raise InputError(f"compute() returned {features.shape[0]} rows, expected {num_rows}")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda fh: np.savez(fh, features=features, key=np.array(key)))
    return features, False
