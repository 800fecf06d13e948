"""Tests for secfedtl.privacy.noise: Gaussian noise from the OS CSPRNG."""

from __future__ import annotations

import numpy as np
import pytest

from secfedtl.errors import InputError
from secfedtl.privacy.noise import secure_gaussian_array


def test_statistics_and_freshness():
    z = secure_gaussian_array(200_000, std=3.0)
    assert z.dtype == np.float64 and z.shape == (200_000,) and np.isfinite(z).all()
    assert abs(z.mean()) < 0.05
    assert z.std() == pytest.approx(3.0, rel=0.02)
    # tails as a normal distribution has them (P(|z| > 2 std) = 0.0455)
    assert np.mean(np.abs(z) > 6.0) == pytest.approx(0.0455, abs=0.003)
    assert not np.array_equal(z[:10], secure_gaussian_array(10, std=3.0))


def test_shapes_and_zero_std():
    assert secure_gaussian_array((2, 3), std=1.0).shape == (2, 3)
    assert secure_gaussian_array(0, std=1.0).shape == (0,)
    assert np.array_equal(secure_gaussian_array(4, std=0.0), np.zeros(4))


@pytest.mark.parametrize(("shape", "std"), [(-1, 1.0), ((2, -1), 1.0), (3, -1.0), (3, float("nan")), (3, True), (2.5, 1.0)])
def test_bad_arguments(shape, std):
    with pytest.raises(InputError):
        secure_gaussian_array(shape, std=std)


def test_add_gaussian_noise_scales_each_coordinate_by_its_std():
    import numpy as np
    from secfedtl.privacy.noise import add_gaussian_noise

    values = np.array([10.0, -3.0, 0.0])
    std = np.array([1.0, 0.0, 100.0])
    draws = np.stack([add_gaussian_noise(values, std) for _ in range(400)])  # from os.urandom
    assert np.all(draws[:, 1] == -3.0)  # std 0: untouched
    assert abs(draws[:, 0].mean() - 10.0) < 0.5 and 0.8 < draws[:, 0].std() < 1.2
    assert 80 < draws[:, 2].std() < 120
    seeded = [add_gaussian_noise(values, 2.0, rng=np.random.default_rng(7)) for _ in range(2)]
    assert np.array_equal(seeded[0], seeded[1])


def test_add_gaussian_noise_refuses_a_non_generator_rng():
    import random

    import numpy as np
    import pytest
    from secfedtl.errors import InputError
    from secfedtl.privacy.noise import add_gaussian_noise

    with pytest.raises(InputError, match="rng"):
        add_gaussian_noise(np.zeros(3), 1.0, rng=random.Random(0))
