"""Evaluation helper (not private: run it on data the evaluator may see)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from secfedtl.errors import InputError
from secfedtl.transfer.caching import iter_batches

__all__ = ["Evaluation", "evaluate"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Evaluation:
    """Accuracy in [0, 1] and mean cross-entropy loss over ``num_samples`` examples."""

    accuracy: float
    loss: float
    num_samples: int


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, *, batch_size: int = 256) -> Evaluation:
    """Accuracy and mean cross entropy of ``model`` on ``data`` ((input, label) pairs).

    The model runs in eval mode; its previous mode is restored afterwards.
    """
    try:
        n = len(data)  # type: ignore[arg-type]
    except TypeError as exc:
        raise InputError("data must have a length") from exc
    if n == 0:
        raise InputError("cannot evaluate on an empty dataset")
    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    correct, total_loss = 0, 0.0
    try:
        for x, y in iter_batches(data, batch_size):  # slices of a TensorDataset: no copy
            x, y = x.to(device), torch.as_tensor(y).to(device)
            logits = model(x)
            total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(dim=1) == y).sum())
    finally:
        model.train(was_training)
    return Evaluation(accuracy=correct / n, loss=total_loss / n, num_samples=n)
