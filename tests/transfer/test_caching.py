import copy

import pytest
import torch

from secfedtl.privacy.randomness import Randomness
from torch import nn
from torch.utils.data import TensorDataset

from secfedtl.errors import ConfigError, InputError
from secfedtl.training.config import DPTrainingConfig
from secfedtl.training.dpsgd import run_dp_sgd
from secfedtl.transfer.batchnorm import pin_frozen_in_eval
from secfedtl.transfer.caching import cache_features, check_frozen_deterministic, split_head
from secfedtl.transfer.distillation import cross_entropy_loss
from secfedtl.transfer.freezing import HeadOnly


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.3), nn.Flatten()
        )
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(self.features(x))


def _data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g))


def _model():
    torch.manual_seed(3)
    m = CNN()
    HeadOnly(head="fc").apply(m)
    pin_frozen_in_eval(m)
    return m


def test_refuses_trainable_or_stochastic_backbone():
    m = CNN()
    backbone, _ = split_head(m, "fc")
    with pytest.raises(ConfigError, match="trainable"):
        cache_features(backbone, _data(), batch_size=8)
    for p in backbone.parameters():
        p.requires_grad_(False)
    backbone.train()  # BN and dropout active, not pinned
    with pytest.raises(ConfigError, match="train mode"):
        cache_features(backbone, _data(), batch_size=8)
    backbone.eval()
    check_frozen_deterministic(backbone)  # now fine


def test_refuses_nondeterministic_custom_module():
    class Noisy(nn.Module):
        def forward(self, x):
            return x + torch.randn_like(x)

    with pytest.raises(ConfigError, match="deterministic"):
        cache_features(Noisy(), _data(), batch_size=8)


def test_bad_inputs():
    backbone, _ = split_head(_model(), "fc")
    with pytest.raises(InputError):
        cache_features(backbone, _data(), batch_size=0)
    with pytest.raises(InputError):
        cache_features(backbone, TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0)), batch_size=4)


def test_features_equal_backbone_in_training_mode():
    m = _model()
    backbone, head = split_head(m, "fc")
    backbone.train()
    data = _data()
    cached = cache_features(backbone, data, batch_size=7)
    assert cached.tensors[0].shape == (40, 144)
    assert torch.equal(cached.tensors[1], data.tensors[1])
    m.train()
    with torch.no_grad():
        assert torch.allclose(head(cached.tensors[0]), m(data.tensors[0]), atol=1e-6)


@pytest.mark.parametrize("clipping", ["flat", "ghost"])
def test_cached_training_equals_training_through_backbone(clipping):
    data = _data()
    config = DPTrainingConfig(
        lr=0.5, expected_batch_size=8, max_grad_norm=0.5, steps=12, noise_multiplier=0.7, clipping=clipping
    )
    full = _model()
    head_only = copy.deepcopy(full)
    backbone, head = split_head(head_only, "fc")
    backbone.train()
    cached = cache_features(backbone, data, batch_size=16)
    before = full.fc.weight.detach().clone()

    def train(model, dataset):
        return run_dp_sgd(
            model=model, data=dataset, config=config, noise_multiplier=0.7, steps=12, sample_rate=0.2,
            loss_fn=cross_entropy_loss, randomness=Randomness.insecure_seeded(11),
            noise_generator=torch.Generator().manual_seed(12),
        )

    losses_full = train(full, data)
    losses_cached = train(head, cached)
    assert losses_full == pytest.approx(losses_cached, abs=1e-5)
    assert not torch.allclose(full.fc.weight, before)  # it did train
    assert torch.allclose(full.fc.weight, head.weight, atol=1e-5)
    assert torch.allclose(full.fc.bias, head.bias, atol=1e-5)
    # frozen parts untouched, BN statistics not updated from private data
    assert torch.equal(full.features[1].running_mean, head_only.features[1].running_mean)


# --- cached_features: features on disk, keyed by what produced them ----------------------------

import hashlib  # noqa: E402

import numpy as np  # noqa: E402

from secfedtl.transfer.caching import cached_features  # noqa: E402

KEY = hashlib.sha256(b"model+texts").hexdigest()


class _Counter:
    def __init__(self, array):
        self.array = array
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return self.array


def test_cached_features_miss_then_hit(tmp_path):
    compute = _Counter(np.arange(12, dtype=np.float32).reshape(4, 3))
    first, hit1 = cached_features(tmp_path / "cache", KEY, compute, num_rows=4)
    second, hit2 = cached_features(tmp_path / "cache", KEY, compute, num_rows=4)
    assert (hit1, hit2) == (False, True) and compute.calls == 1
    np.testing.assert_array_equal(first, second)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f"{KEY}.npz"]  # no temp files left


@pytest.mark.parametrize("damage", ["truncate", "other_key", "pickle", "rows", "nan"])
def test_cached_features_recomputes_a_bad_file(tmp_path, damage):
    path = tmp_path / f"{KEY}.npz"
    good = np.ones((3, 2), dtype=np.float32)
    if damage == "truncate":
        cached_features(tmp_path, KEY, lambda: good)
        path.write_bytes(path.read_bytes()[:40])
    elif damage == "other_key":
        np.savez(path, features=good * 5, key=np.array(hashlib.sha256(b"x").hexdigest()))
    elif damage == "pickle":  # an object array would need unpickling: never loaded
        np.savez(path, features=np.array([{"a": 1}], dtype=object), key=np.array(KEY))
    elif damage == "rows":
        np.savez(path, features=np.ones((5, 2), dtype=np.float32), key=np.array(KEY))
    else:
        np.savez(path, features=np.full((3, 2), np.nan, dtype=np.float32), key=np.array(KEY))
    compute = _Counter(good * 2)
    out, hit = cached_features(tmp_path, KEY, compute, num_rows=3)
    assert not hit and compute.calls == 1
    np.testing.assert_array_equal(out, good * 2)
    again, hit = cached_features(tmp_path, KEY, compute, num_rows=3)
    assert hit and compute.calls == 1


@pytest.mark.parametrize("bad", [np.ones((2, 2)), np.ones(3, dtype=np.float32),
                                 np.array([[np.inf]], dtype=np.float32)])
def test_cached_features_refuses_bad_computed_arrays(tmp_path, bad):
    with pytest.raises(InputError):
        cached_features(tmp_path, KEY, lambda: bad)
    assert not list(tmp_path.iterdir())


def test_cached_features_checks_key_and_rows(tmp_path):
    with pytest.raises(InputError):
        cached_features(tmp_path, "../../etc/passwd", lambda: np.ones((1, 1), dtype=np.float32))
    with pytest.raises(InputError):
        cached_features(tmp_path, KEY.upper(), lambda: np.ones((1, 1), dtype=np.float32))
    with pytest.raises(InputError, match="rows"):
        cached_features(tmp_path, KEY, lambda: np.ones((2, 1), dtype=np.float32), num_rows=3)


class _Items(torch.utils.data.Dataset):
    """A dataset that is not a TensorDataset: read through a DataLoader."""

    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i]


def test_cache_is_float32_written_in_place_and_the_same_for_any_dataset():
    backbone, _ = split_head(_model(), "fc")
    backbone.eval()
    data = _data(n=37)
    sliced = cache_features(backbone, data, batch_size=8)
    collated = cache_features(backbone, _Items(data), batch_size=8)
    assert sliced.tensors[0].dtype == torch.float32 and sliced.tensors[0].shape == (37, 144)
    assert torch.equal(sliced.tensors[0], collated.tensors[0])
    assert torch.equal(sliced.tensors[1], data.tensors[1]) and torch.equal(collated.tensors[1], data.tensors[1])
    # out=: a row slice of a larger buffer is written and returned itself (same storage).
    buffer = torch.full((50, 144), float("nan"))
    into = cache_features(backbone, data, batch_size=8, out=buffer[5:42])
    assert into.tensors[0].data_ptr() == buffer[5:42].data_ptr()
    assert torch.equal(buffer[5:42], sliced.tensors[0])
    assert torch.isnan(buffer[:5]).all() and torch.isnan(buffer[42:]).all()  # nothing outside it
    for bad in (torch.empty(36, 144), torch.empty(37, 143), torch.empty(37, 144, dtype=torch.float64), "x"):
        with pytest.raises(InputError, match="out must"):
            cache_features(backbone, data, batch_size=8, out=bad)


def test_cache_into_a_memmap(tmp_path):
    backbone, _ = split_head(_model(), "fc")
    backbone.eval()
    data = _data(n=21)
    mm = np.lib.format.open_memmap(tmp_path / "f.npy", mode="w+", dtype=np.float32, shape=(21, 144))
    cached = cache_features(backbone, data, batch_size=4, out=torch.from_numpy(mm))
    mm.flush()
    assert np.array_equal(np.load(tmp_path / "f.npy"), cached.tensors[0].numpy())
    assert np.array_equal(np.load(tmp_path / "f.npy"), cache_features(backbone, data, batch_size=5).tensors[0].numpy())


def test_cache_refuses_non_finite_features():
    class Inf(nn.Module):
        def forward(self, x):
            return x.flatten(1) / 0.0

    with pytest.raises(InputError, match="non-finite"):
        cache_features(Inf(), _data(n=5), batch_size=2)
