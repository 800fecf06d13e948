"""Tests for secfedtl.training.examples: per-example gradients for distributed DP.

The closed form for a linear head under cross entropy must give what ``vmap(grad(...))`` gives
(the generic path, reached here through a loss that is not the default function object), in the
same column order, with the same zero rows for records whose gradient is not finite."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from secfedtl.errors import InputError
from secfedtl.training.examples import per_example_gradients
from secfedtl.transfer.distillation import cross_entropy_loss


def generic_loss(model, inputs, targets):  # same loss, another object: the vmap path
    return cross_entropy_loss(model, inputs, targets)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_cross_entropy_closed_form_matches_vmap(bias: bool) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(13, 5, bias=bias)
    x = torch.randn(9, 13) * 3.0
    y = torch.tensor([0, 4, 1, 2, 3, 4, 0, 1, 2])
    x[2, 1] = float("nan")
    x[6, 0] = float("inf")
    fast = per_example_gradients(layer, x, y, loss_fn=cross_entropy_loss, prefix="head.")
    slow = per_example_gradients(layer, x, y, loss_fn=generic_loss, prefix="head.")
    assert fast.dtype == slow.dtype == np.float32
    assert fast.shape == slow.shape == (9, 5 * 13 + (5 if bias else 0))
    assert np.allclose(fast, slow, rtol=1e-5, atol=1e-6)
    assert not fast[2].any() and not fast[6].any() and fast[0].any()


def test_the_closed_form_is_not_used_for_other_models_or_losses() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 1, 0, 1])
    rows = per_example_gradients(model, x, y, loss_fn=cross_entropy_loss)
    one = torch.autograd.grad(cross_entropy_loss(model, x[:1], y[:1]).sum(), list(model.parameters()))
    names = sorted(n for n, _ in model.named_parameters())
    by_name = dict(zip([n for n, _ in model.named_parameters()], one))
    assert np.allclose(rows[0], torch.cat([by_name[n].reshape(-1) for n in names]).numpy(), atol=1e-6)
    assert per_example_gradients(model, x[:0], y[:0], loss_fn=cross_entropy_loss).shape == (0, rows.shape[1])


@pytest.mark.parametrize("label", [-1, 5])
def test_the_closed_form_refuses_labels_outside_the_classes(label: int) -> None:
    """A negative index would silently take the last class's row; too large a one used to raise a
    bare IndexError from torch (which a node did not catch)."""
    layer = nn.Linear(13, 5)
    y = torch.tensor([0, 4, label])
    with pytest.raises(InputError, match=r"class labels must lie in \[0, 5\)"):
        per_example_gradients(layer, torch.randn(3, 13), y, loss_fn=cross_entropy_loss)


@pytest.mark.parametrize("label", [-1, 2, -100])
def test_the_generic_path_refuses_labels_outside_the_classes(label: int) -> None:
    """Inside vmap the loss cannot read label values, so the generic path (a non-linear head, as the
    heart job's MLP under distributed noise) checks them first: before, -1 took the last class and
    -100 was skipped, silently."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    x = torch.randn(5, 4)
    with pytest.raises(InputError, match=r"class labels must lie in \[0, 2\)"):
        per_example_gradients(model, x, torch.tensor([0, 1, label, 0, 1]), loss_fn=cross_entropy_loss)
    with pytest.raises(InputError, match="1-D"):
        per_example_gradients(model, x, torch.zeros(5, 1, dtype=torch.long), loss_fn=cross_entropy_loss)
    # valid labels still pass, and the check leaves the module's mode as it was
    for training in (True, False):
        model.train(training)
        rows = per_example_gradients(model, x, torch.tensor([0, 1, 1, 0, 1]), loss_fn=cross_entropy_loss)
        assert rows.shape == (5, sum(p.numel() for p in model.parameters())) and np.isfinite(rows).all()
        assert model.training is training
