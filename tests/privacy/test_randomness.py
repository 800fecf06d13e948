"""secfedtl.privacy.randomness: Poisson sampling from os.urandom, and the test-only seeded kind."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from secfedtl.errors import ConfigError, InputError
from secfedtl.privacy import randomness as rmod
from secfedtl.privacy.randomness import Randomness, secure_poisson_mask


def test_secure_mask_has_the_sample_rate():
    mask = secure_poisson_mask(200_000, 0.1)
    assert mask.dtype == bool and mask.shape == (200_000,)
    # Binomial(200000, 0.1): sd ~ 134; 6 sd
    assert abs(int(mask.sum()) - 20_000) < 6 * 134
    assert secure_poisson_mask(10, 1.0).all()
    assert secure_poisson_mask(0, 0.5).shape == (0,)


def test_secure_mask_comes_from_os_urandom(monkeypatch):
    calls = []

    def fake(n):
        calls.append(n)
        return b"\xff" * n

    monkeypatch.setattr(rmod.os, "urandom", fake)
    assert not secure_poisson_mask(5, 0.5).any()  # all-ones words are above every threshold
    assert calls == [40]


def test_two_secure_randomness_objects_disagree_whatever_public_seeds_say():
    np.random.seed(0)
    torch.manual_seed(0)
    a = Randomness.secure().poisson_indices(1000, 0.3)
    np.random.seed(0)
    torch.manual_seed(0)
    b = Randomness.secure().poisson_indices(1000, 0.3)
    assert not np.array_equal(a, b)


def test_seeded_randomness_is_reproducible_and_labelled():
    a, b = Randomness.insecure_seeded(3), Randomness.insecure_seeded(3)
    assert np.array_equal(a.poisson_indices(100, 0.2), b.poisson_indices(100, 0.2))
    assert a.label == "insecure_seeded" and not a.certified
    assert Randomness.secure().certified and Randomness.secure().label == "csprng"
    ga, gb = a.noise_generator(), b.noise_generator()
    assert torch.equal(torch.randn(4, generator=ga), torch.randn(4, generator=gb))


def test_noise_generators():
    assert Randomness.secure(secure_mode=True).noise_generator() is None
    g1, g2 = Randomness.secure(secure_mode=False).noise_generator(), Randomness.secure(secure_mode=False).noise_generator()
    assert not torch.equal(torch.randn(4, generator=g1), torch.randn(4, generator=g2))


@pytest.mark.parametrize("args", [(-1, 0.5), (3, 0.0), (3, 1.5), (3, float("nan")), (2.5, 0.5), (3, True)])
def test_bad_arguments(args):
    with pytest.raises(InputError):
        secure_poisson_mask(*args)
    with pytest.raises(InputError):
        Randomness.insecure_seeded(1).poisson_indices(*args)


def test_bad_construction():
    with pytest.raises(ConfigError):
        Randomness.insecure_seeded(-1)
    with pytest.raises(ConfigError):
        Randomness.secure(secure_mode="yes")
    with pytest.raises(ConfigError):
        Randomness(label="numpy", secure_noise=False)
