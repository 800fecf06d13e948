import dataclasses

import pytest

from secfedtl.errors import ConfigError
from secfedtl.training.config import DPTrainingConfig

BASE = dict(lr=0.1, expected_batch_size=16, max_grad_norm=1.0)


def test_valid_and_frozen():
    c = DPTrainingConfig(**BASE, steps=5, noise_multiplier=1.0)
    assert c.clipping == "flat" and c.device == "auto" and not c.secure_mode
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.lr = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        DPTrainingConfig(0.1, 16, 1.0)  # type: ignore[misc]


@pytest.mark.parametrize(
    "extra",
    [
        dict(noise_multiplier=1.0),  # neither epochs nor steps
        dict(steps=1, epochs=1, noise_multiplier=1.0),
        dict(steps=0, noise_multiplier=1.0),
        dict(steps=1),  # no noise, no target
        dict(steps=1, noise_multiplier=1.0, target_epsilon=1.0),
        dict(steps=1, target_epsilon=1.0, target_delta=1e-5),  # no planned_rounds
        dict(steps=1, target_epsilon=1.0, target_delta=1.5, planned_rounds=3),
        dict(steps=1, noise_multiplier=-1.0),
        dict(steps=1, noise_multiplier=float("nan")),
        dict(steps=1, noise_multiplier=1.0, optimizer="rmsprop"),
        dict(steps=1, noise_multiplier=1.0, clipping="automatic"),
        dict(steps=1, noise_multiplier=1.0, device="tpu"),
        dict(steps=1, noise_multiplier=1.0, public_dataset_size=1.5),
        dict(steps=True, noise_multiplier=1.0),
    ],
)
def test_invalid(extra):
    with pytest.raises(ConfigError):
        DPTrainingConfig(**BASE, **extra)


def test_bad_base_values():
    with pytest.raises(ConfigError):
        DPTrainingConfig(lr=0.0, expected_batch_size=16, max_grad_norm=1.0, steps=1, noise_multiplier=1.0)
    with pytest.raises(ConfigError):
        DPTrainingConfig(lr=0.1, expected_batch_size=0, max_grad_norm=1.0, steps=1, noise_multiplier=1.0)
    with pytest.raises(ConfigError):
        DPTrainingConfig(lr=0.1, expected_batch_size=4, max_grad_norm=float("inf"), steps=1, noise_multiplier=1.0)


def test_local_steps():
    c = DPTrainingConfig(**BASE, epochs=2, noise_multiplier=1.0)
    assert c.local_steps(sample_rate=0.1) == 20
    assert c.local_steps(sample_rate=0.3) == 7
    assert DPTrainingConfig(**BASE, steps=9, noise_multiplier=1.0).local_steps(sample_rate=0.5) == 9


def test_device():
    import torch

    c = DPTrainingConfig(**BASE, steps=1, noise_multiplier=1.0, device="auto")
    assert c.resolve_device() == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError):
            DPTrainingConfig(**BASE, steps=1, noise_multiplier=1.0, device="cuda").resolve_device()
