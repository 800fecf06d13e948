"""Tests for secfedtl.privacy.distributed: the policy, calibration and one step's shares end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from scipy.special import ive

from secfedtl.crypto.stream import KeyStream
from secfedtl.encoding.distributed import DistributedEncoding
from secfedtl.errors import ConfigError, TooFewSurvivorsError
from secfedtl.privacy.accountants import compute_epsilon
from secfedtl.privacy.distributed import CollusionPolicy, calibrate_distributed, noisy_share, plan_distributed

SEED = b"job|round=1|step=4"


def test_policy_counts_only_honest_survivors_and_refuses_small_sums() -> None:
    policy = CollusionPolicy(min_survivors=7, colluders=2)
    assert policy.honest_parties == 5
    policy.check_survivors(7)
    policy.check_survivors(10)
    with pytest.raises(TooFewSurvivorsError):
        policy.check_survivors(6)
    for bad in (dict(min_survivors=3, colluders=3), dict(min_survivors=0, colluders=0),
                dict(min_survivors=3, colluders=-1), dict(min_survivors=3.0, colluders=0)):
        with pytest.raises(ConfigError):
            CollusionPolicy(**bad)  # type: ignore[arg-type]


def test_calibrated_event_describes_the_encoding_and_meets_the_target() -> None:
    enc = DistributedEncoding(dimension=3000, clip_norm=1.0, scale=900.0, bits=18)
    policy = CollusionPolicy(min_survivors=6, colluders=1)
    event = calibrate_distributed(encoding=enc, policy=policy, target_epsilon=2.0, target_delta=1e-5,
                                  sample_rate=0.02, steps=300)
    assert (event.l2_bound, event.l1_bound, event.dimension, event.scale, event.bits, event.honest_parties) == (
        enc.l2_bound, enc.l1_bound, 4096, 900.0, 18, 5)
    assert 1.99 <= compute_epsilon([event], 1e-5) <= 2.0
    # more colluders tolerated: fewer honest parties, so each must add more
    wary = calibrate_distributed(encoding=enc, policy=CollusionPolicy(min_survivors=6, colluders=3),
                                 target_epsilon=2.0, target_delta=1e-5, sample_rate=0.02, steps=300)
    assert wary.share_variance == pytest.approx(event.share_variance * 5 / 3, rel=1e-6)


def test_noisy_share_refuses_an_event_for_another_encoding() -> None:
    enc = DistributedEncoding(dimension=100, clip_norm=1.0, scale=200.0, bits=20)
    event = calibrate_distributed(encoding=enc, policy=CollusionPolicy(min_survivors=3, colluders=0),
                                  target_epsilon=5.0, target_delta=1e-5, sample_rate=0.1, steps=10)
    other = DistributedEncoding(dimension=100, clip_norm=1.0, scale=201.0, bits=20)
    with pytest.raises(ConfigError):
        noisy_share(other, np.zeros((1, 100)), event=event, rotation_seed=SEED, stream=KeyStream.fresh())


def test_shares_of_empty_batches_sum_to_the_target_skellam() -> None:
    """With no examples, the summed shares are pure noise: exactly Sk(parties * share / 2)."""
    enc = DistributedEncoding(dimension=20_000, clip_norm=1.0, scale=50.0, bits=20)
    policy = CollusionPolicy(min_survivors=4, colluders=1)
    event = calibrate_distributed(encoding=enc, policy=policy, target_epsilon=4.0, target_delta=1e-5,
                                  sample_rate=0.05, steps=50)
    parties = 4
    total = np.zeros(enc.padded_dimension, dtype=np.int64)
    for p in range(parties):
        share = noisy_share(enc, np.zeros((0, 20_000)), event=event, rotation_seed=SEED,
                            stream=KeyStream.insecure_seeded(p))
        total += enc.unwrap(share)
    noise = enc.unwrap(enc.wrap(total))
    mu = parties * event.share_variance / 2
    assert noise.var() == pytest.approx(2 * mu, rel=6 * math.sqrt(2 / noise.size))
    # the honest parties alone (3 of the 4) carry the accounted noise
    assert 2 * event.total_mu == pytest.approx(3 * event.share_variance)
    # chi-square on quantile bins of the Skellam cdf
    k = np.arange(-int(12 * math.sqrt(2 * mu)), int(12 * math.sqrt(2 * mu)) + 1)
    cdf = np.cumsum(ive(np.abs(k), 2 * mu))
    edges = np.searchsorted(cdf, np.linspace(0, 1, 41)[1:-1])
    observed = np.bincount(np.searchsorted(k[edges], noise, side="left"), minlength=40)
    expected = np.diff(np.concatenate([[0.0], cdf[edges], [1.0]])) * noise.size
    assert stats.chisquare(observed, expected).pvalue > 1e-4


def test_a_step_end_to_end_decodes_to_the_sum_plus_accounted_noise() -> None:
    """Five hospitals, one step: the server's decode is the sum of clipped gradients plus noise
    whose variance, in gradient units, is what the plan says."""
    policy = CollusionPolicy(min_survivors=5, colluders=1)
    plan, event = plan_distributed(dimension=5000, clip_norm=1.0, bits=16, policy=policy, num_parties=5,
                                   max_batch=300, target_epsilon=3.0, target_delta=1e-5, sample_rate=0.01,
                                   steps=1000)
    enc = plan.encoding
    assert math.sqrt(2 * event.total_mu) / event.l2_bound <= plan.noise_multiplier
    assert plan.share_variance >= event.share_variance and 2.9 < compute_epsilon([event], 1e-5) <= 3.0
    rng = np.random.default_rng(11)
    batches = [rng.normal(size=(int(rng.integers(20, 60)), 5000)) * 0.05 for _ in range(5)]
    field_sum = np.zeros(enc.padded_dimension, dtype=np.int64)
    for i, batch in enumerate(batches):
        field_sum += noisy_share(enc, batch, event=event, rotation_seed=SEED, stream=KeyStream.fresh()).astype(np.int64)
    decoded = enc.decode_sum(enc.wrap(field_sum), rotation_seed=SEED)  # the server's view, mod 2**16
    truth = sum((b * np.minimum(1.0, 1.0 / np.linalg.norm(b, axis=1, keepdims=True))).sum(axis=0) for b in batches)
    residual = decoded - truth
    noise_var = 5 * event.share_variance / enc.scale**2  # all five shares
    rounding_var_max = sum(len(b) for b in batches) / 4 / enc.scale**2
    assert abs(residual.mean()) < 5 * math.sqrt((noise_var + rounding_var_max) / residual.size)
    assert noise_var * 0.95 <= residual.var() <= (noise_var + rounding_var_max) * 1.05


def test_randomness_hands_out_key_streams_with_its_label() -> None:
    from secfedtl.privacy.randomness import Randomness

    secure = Randomness.secure()
    assert secure.key_stream().label == "csprng" and secure.key_stream().read(16) != secure.key_stream().read(16)
    a, b = Randomness.insecure_seeded(5), Randomness.insecure_seeded(5)
    assert a.key_stream().label == b.key_stream().label == "insecure_seeded"
    assert [a.key_stream().read(8) for _ in range(3)] == [b.key_stream().read(8) for _ in range(3)]


def test_policy_from_a_secure_aggregation_configuration() -> None:
    from secfedtl.secagg.config import SecAggConfig

    config = SecAggConfig(num_clients=10, threshold=8, min_survivors=9)  # complete graph: 2t - k - 1 = 6
    policy = CollusionPolicy.for_secagg(config, colluders=2)
    assert (policy.min_survivors, policy.colluders, policy.honest_parties) == (9, 2, 7)
    with pytest.raises(ConfigError):
        CollusionPolicy.for_secagg(config, colluders=7)
    with pytest.raises(ConfigError):
        CollusionPolicy.for_secagg(object(), colluders=0)
