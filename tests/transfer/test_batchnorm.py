import warnings

import pytest
import torch
from torch import nn

from secfedtl.transfer.batchnorm import fix_trainable_batchnorm, pin_frozen_in_eval, prepare_for_dp, unpin
from secfedtl.transfer.freezing import HeadOnly


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Flatten()
        )
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(self.backbone(x))


def _pretrained() -> BNNet:
    torch.manual_seed(0)
    m = BNNet()
    m.train()
    with torch.no_grad():  # give BN non-trivial running statistics
        for _ in range(3):
            m(torch.randn(16, 1, 8, 8) * 3 + 1)
    return m


def test_frozen_bn_output_does_not_depend_on_batch_peers():
    m = _pretrained()
    HeadOnly(head="fc").apply(m)
    pinned = pin_frozen_in_eval(m)
    assert pinned == ["backbone.1", "backbone.3"]
    m.train()  # what the trainer / Opacus do
    assert m.training and not m.backbone[1].training and not m.backbone[3].training
    stats = m.backbone[1].running_mean.clone()
    x = torch.randn(1, 1, 8, 8)
    a = m(torch.cat([x, torch.randn(7, 1, 8, 8)]))[0]
    b = m(torch.cat([x, 10 * torch.randn(3, 1, 8, 8) + 5]))[0]
    assert torch.allclose(a, b, atol=1e-6)
    assert torch.equal(m.backbone[1].running_mean, stats)  # no update from private data


def test_unpinned_bn_would_mix_samples():
    # the control: the property above is not vacuous
    m = _pretrained()
    HeadOnly(head="fc").apply(m)
    m.train()
    x = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        m.backbone[3].p = 0.0
        a = m(torch.cat([x, torch.randn(7, 1, 8, 8)]))[0]
        b = m(torch.cat([x, 10 * torch.randn(3, 1, 8, 8) + 5]))[0]
    assert not torch.allclose(a, b, atol=1e-3)


def test_pin_survives_deepcopy_and_unpin_restores():
    import copy

    m = _pretrained()
    HeadOnly().apply(m)
    pin_frozen_in_eval(m)
    c = copy.deepcopy(m)
    c.train()
    assert not c.backbone[1].training
    unpin(m)
    m.train()
    assert m.backbone[1].training


def test_dropout_in_trainable_part_is_not_pinned():
    m = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), nn.Linear(3, 2))
    for p in m[0].parameters():
        p.requires_grad_(False)
    # parent (the Sequential) has trainable parameters -> dropout stays active
    assert pin_frozen_in_eval(m) == []
    assert pin_frozen_in_eval(m, include_dropout=False) == []


def test_trainable_bn_replaced_with_warning():
    m = _pretrained()
    for p in m.parameters():
        p.requires_grad_(True)
    with pytest.warns(UserWarning, match="statistics are lost"):
        fixed = fix_trainable_batchnorm(m)
    assert isinstance(fixed.backbone[1], nn.GroupNorm)
    assert isinstance(m.backbone[1], nn.BatchNorm2d)  # input model untouched


def test_frozen_bn_kept_without_warning():
    m = _pretrained()
    HeadOnly().apply(m)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = prepare_for_dp(m)
    assert isinstance(out.backbone[1], nn.BatchNorm2d)
    out.train()
    assert not out.backbone[1].training
