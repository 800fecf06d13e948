import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from secfedtl.errors import ConfigError, InputError
from secfedtl.transfer.distillation import DistillationLoss, distillation_loss


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), t=st.floats(0.5, 8.0))
def test_alpha_zero_is_cross_entropy(seed, t):
    g = torch.Generator().manual_seed(seed)
    s, te = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    y = torch.randint(0, 4, (6,), generator=g)
    out = distillation_loss(s, te, y, alpha=0.0, temperature=t)
    assert torch.allclose(out, F.cross_entropy(s, y, reduction="none"))


def test_matches_formula_and_is_per_sample():
    g = torch.Generator().manual_seed(1)
    s, te = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    y = torch.tensor([0, 1, 2, 0, 1])
    alpha, t = 0.7, 3.0
    out = distillation_loss(s, te, y, alpha=alpha, temperature=t)
    kl = F.kl_div(F.log_softmax(s / t, 1), F.softmax(te / t, 1), reduction="none").sum(1)
    assert torch.allclose(out, F.cross_entropy(s, y, reduction="none") + alpha * t * t * kl, atol=1e-6)
    # example i's loss depends on example i only
    out2 = distillation_loss(torch.cat([s[:1], s[1:] * 5]), te, y, alpha=alpha, temperature=t)
    assert torch.allclose(out[0], out2[0])
    # teacher == student -> KL term vanishes
    same = distillation_loss(s, s, y, alpha=alpha, temperature=t)
    assert torch.allclose(same, F.cross_entropy(s, y, reduction="none"), atol=1e-6)


def test_bad_arguments():
    s = torch.randn(2, 3)
    with pytest.raises(InputError):
        distillation_loss(s, torch.randn(2, 4), torch.tensor([0, 1]), alpha=1.0, temperature=1.0)
    with pytest.raises(ConfigError):
        distillation_loss(s, s, torch.tensor([0, 1]), alpha=1.0, temperature=0.0)
    with pytest.raises(ConfigError):
        DistillationLoss(teacher=nn.Linear(2, 3), alpha=-1.0)


def test_teacher_is_a_frozen_eval_copy():
    teacher = nn.Sequential(nn.Linear(2, 3), nn.Dropout(0.9))
    loss = DistillationLoss(teacher=teacher, alpha=1.0, temperature=2.0)
    assert loss.teacher is not teacher and not loss.teacher.training
    assert all(not p.requires_grad for p in loss.teacher.parameters())
    with torch.no_grad():
        teacher[0].weight.add_(100.0)  # later changes to the source do not leak in
    student = nn.Linear(2, 3)
    x, y = torch.randn(4, 2), torch.tensor([0, 1, 2, 0])
    a, b = loss(student, x, y), loss(student, x, y)
    assert torch.equal(a, b)  # deterministic teacher (dropout off)
    a.sum().backward()
    assert student.weight.grad is not None
