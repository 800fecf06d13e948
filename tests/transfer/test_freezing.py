import pytest
import torch
from torch import nn

from secfedtl.errors import ConfigError
from secfedtl.transfer.freezing import HeadOnly, LastBlocks, ParameterNames, replace_head, trainable_names


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 8)
        self.layers = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8))
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.layers(self.stem(x)))


def _flags(m):
    return {n: p.requires_grad for n, p in m.named_parameters()}


def test_head_only():
    m = Net()
    names = HeadOnly(head="fc").apply(m)
    assert names == ["fc.weight", "fc.bias"] == trainable_names(m)


def test_last_blocks():
    m = Net()
    names = LastBlocks(k=2, blocks="layers", head="fc").apply(m)
    assert names == ["layers.1.weight", "layers.1.bias", "layers.2.weight", "layers.2.bias", "fc.weight", "fc.bias"]
    assert not m.stem.weight.requires_grad and not m.layers[0].weight.requires_grad
    assert LastBlocks(k=0).apply(m) == ["fc.weight", "fc.bias"]


def test_parameter_names():
    m = Net()
    assert ParameterNames(["stem.bias", "fc.weight"]).apply(m) == ["stem.bias", "fc.weight"]


@pytest.mark.parametrize(
    "policy",
    [HeadOnly(head="classifier"), LastBlocks(k=4), LastBlocks(k=1, blocks="nope"), ParameterNames(["fc.w"])],
)
def test_bad_policies_change_nothing(policy):
    m = Net()
    HeadOnly().apply(m)
    before = _flags(m)
    with pytest.raises(ConfigError):
        policy.apply(m)
    assert _flags(m) == before


def test_policy_values_validated():
    with pytest.raises(ConfigError):
        LastBlocks(k=-1)
    with pytest.raises(ConfigError):
        ParameterNames([])
    with pytest.raises(TypeError):
        HeadOnly("fc")  # keyword-only


def test_replace_head():
    m = Net()
    HeadOnly().apply(m)
    for p in m.parameters():
        p.requires_grad_(False)
    new = nn.Linear(8, 5)
    replace_head(m, "fc", new)
    assert m.fc is new and m(torch.zeros(2, 4)).shape == (2, 5)
    assert trainable_names(m) == ["fc.weight", "fc.bias"]
    with pytest.raises(ConfigError):
        replace_head(m, "head", nn.Linear(8, 2))
