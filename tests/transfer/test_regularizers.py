import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from secfedtl.errors import ConfigError, InputError
from secfedtl.transfer.regularizers import L2SP


def _moved(seed: int) -> tuple[nn.Module, L2SP]:
    torch.manual_seed(seed)
    m = nn.Linear(4, 3)
    reg = L2SP.from_model(m, strength=0.3)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p))
    return m, reg


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_gradient_is_two_lambda_w_minus_w0(seed):
    m, reg = _moved(seed)
    reg.penalty(m).backward()
    for name, p in m.named_parameters():
        expected = 2 * 0.3 * (p.detach() - reg.source[name])
        assert torch.allclose(p.grad, expected, atol=1e-6)
    auto = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)
    reg.add_gradient(m)
    for n, p in m.named_parameters():
        assert torch.allclose(p.grad, auto[n], atol=1e-6)


def test_penalty_value_and_anchor_copy():
    m = nn.Linear(2, 2)
    reg = L2SP.from_model(m, strength=2.0)
    assert reg.penalty(m).item() == 0.0
    with torch.no_grad():
        m.weight.add_(1.0)  # anchor must be a copy, not a view of the live weights
    assert reg.penalty(m).item() == pytest.approx(2.0 * 4)


def test_validation():
    with pytest.raises(ConfigError):
        L2SP(strength=-1.0, source={"w": torch.zeros(1)})
    with pytest.raises(InputError):
        L2SP(strength=1.0, source={"w": torch.tensor([float("nan")])})
    reg = L2SP(strength=1.0, source={"other.weight": torch.zeros(1)})
    with pytest.raises(InputError):
        reg.add_gradient(nn.Linear(1, 1))
