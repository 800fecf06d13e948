"""The distributed DP step as a hospital runs it (``PrivateClient.distributed_share``), for what
the accounting assumes about it: every charged step releases a share, whatever the secret Poisson
batch turned out to be. A step that failed only when the batch was empty would tell the server
that the batch was empty, an event whose probability depends on the records (``(1 - q)^n``) and
which no ledger entry accounts for. And a step samples at the rate its event charges."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from secfedtl.encoding.distributed import DistributedEncoding
from secfedtl.errors import ConfigError
from secfedtl.privacy.events import PoissonSkellamEvent
from secfedtl.privacy.randomness import Randomness
from secfedtl.training.client import PrivateClient
from secfedtl.training.config import DPTrainingConfig


class _Guard:
    def __init__(self) -> None:
        self.completed: list[object] = []

    @contextlib.contextmanager
    def charge(self, event, *, round: int, model_hash: str, **fields):  # noqa: A002, ARG002
        yield event
        self.completed.append(event)


class _MapStyle(Dataset):
    """A map-style dataset that is not a TensorDataset (an image folder, a CSV reader...)."""

    def __init__(self, base: TensorDataset) -> None:
        self._base = base

    def __len__(self) -> int:
        return len(self._base)

    def __getitem__(self, i: int):
        return self._base[i]


def _share(data: Dataset, sample_rate: float) -> tuple[np.ndarray, _Guard]:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    guard = _Guard()
    config = DPTrainingConfig(lr=0.1, expected_batch_size=2, max_grad_norm=1.0, steps=1, noise_multiplier=1.0,
                              public_dataset_size=len(data))
    client = PrivateClient(client_id="h1", model=model, train_data=data, config=config, guard=guard,
                           randomness=Randomness.insecure_seeded(11))
    state = client.trainable_state()
    encoding = DistributedEncoding(dimension=15, clip_norm=1.0, scale=32.0, bits=32)
    event = PoissonSkellamEvent(sample_rate=sample_rate, steps=1, share_variance=50.0, honest_parties=1,
                                l2_bound=encoding.l2_bound, l1_bound=encoding.l1_bound,
                                dimension=encoding.padded_dimension, scale=32.0, bits=32)
    field = client.distributed_share(global_state=state, round=0, model_hash="h", encoding=encoding, event=event,
                                     rotation_seed=b"rotation", params={})
    return field, guard


def _records(n: int = 12) -> TensorDataset:
    g = torch.Generator().manual_seed(3)
    return TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g))


def test_an_empty_poisson_batch_still_releases_a_share_for_any_dataset() -> None:
    records = _records()
    # sample_rate 1e-12: the batch is empty (the chance of any of 12 records is about 1e-11)
    tensor_field, tensor_guard = _share(records, 1e-12)
    plain_field, plain_guard = _share(_MapStyle(records), 1e-12)
    assert len(tensor_guard.completed) == len(plain_guard.completed) == 1
    assert plain_field.shape == (16,) and plain_field.dtype == np.uint32
    # the same seeded randomness and an empty batch: the share is the noise alone, whatever the dataset type
    np.testing.assert_array_equal(plain_field, tensor_field)
    assert np.any(plain_field != 0)


def test_a_non_empty_batch_gives_the_same_share_for_any_dataset() -> None:
    records = _records()
    tensor_field, _ = _share(records, 1.0)
    plain_field, _ = _share(_MapStyle(records), 1.0)
    np.testing.assert_array_equal(plain_field, tensor_field)


def test_a_step_samples_at_the_rate_its_event_charges_and_refuses_an_event_without_one(monkeypatch) -> None:
    records = _records()
    torch.manual_seed(0)
    guard = _Guard()
    config = DPTrainingConfig(lr=0.1, expected_batch_size=2, max_grad_norm=1.0, steps=1, noise_multiplier=1.0,
                              public_dataset_size=len(records))
    randomness = Randomness.insecure_seeded(11)
    rates: list[float] = []
    real = Randomness.poisson_indices
    monkeypatch.setattr(Randomness, "poisson_indices", lambda self, n, rate: rates.append(rate) or real(self, n, rate))
    client = PrivateClient(client_id="h1", model=nn.Linear(4, 3), train_data=records, config=config, guard=guard,
                           randomness=randomness)
    encoding = DistributedEncoding(dimension=15, clip_norm=1.0, scale=32.0, bits=32)
    event = PoissonSkellamEvent(sample_rate=0.1, steps=1, share_variance=50.0, honest_parties=1,
                                l2_bound=encoding.l2_bound, l1_bound=encoding.l1_bound,
                                dimension=encoding.padded_dimension, scale=32.0, bits=32)
    client.distributed_share(global_state=client.trainable_state(), round=0, model_hash="h", encoding=encoding,
                             event=event, rotation_seed=b"rotation", params={})
    assert rates == [0.1] and len(guard.completed) == 1
    for bad in (object(), SimpleNamespace(sample_rate=0.0), SimpleNamespace(sample_rate=True),
                SimpleNamespace(sample_rate="0.1")):
        with pytest.raises(ConfigError, match="Poisson-sampled"):
            client.distributed_share(global_state=client.trainable_state(), round=1, model_hash="h",
                                     encoding=encoding, event=bad, rotation_seed=b"rotation", params={})
    assert len(guard.completed) == 1 and rates == [0.1]  # refused before charging or sampling
