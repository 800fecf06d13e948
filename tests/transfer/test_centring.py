"""Tests for secfedtl.transfer.centring: DP mean of frozen features, centring and scaling."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secfedtl.errors import ConfigError, InputError, PrivacyBudgetExceeded
from secfedtl.privacy.accountants import compute_epsilon
from secfedtl.privacy.budget import BudgetGuard, PrivacyBudget
from secfedtl.privacy.events import PoissonGaussianEvent
from secfedtl.privacy.ledger import Ledger, verify_ledger
from secfedtl.transfer.centring import (
    CentreScale,
    MeanMechanism,
    clipped_feature_sum,
    noisy_mean,
    private_feature_sum,
)

DELTA = 1e-5


def make_guard(tmp_path: Path, epsilon: float = 1.0, name: str = "a") -> BudgetGuard:
    return BudgetGuard(client=name, budget=PrivacyBudget(epsilon=epsilon, delta=DELTA),
                       ledger=Ledger(tmp_path / f"{name}.jsonl"), state_path=tmp_path / f"{name}.json")


@settings(max_examples=60, deadline=None)
@given(dim=st.integers(1, 6), clip=st.floats(0.1, 5.0), rows=st.integers(0, 5), data=st.data())
def test_one_record_moves_the_vector_by_at_most_the_sensitivity(dim, clip, rows, data):
    finite = st.floats(-20.0, 20.0, allow_nan=False)
    base = np.array(data.draw(st.lists(st.lists(finite, min_size=dim, max_size=dim), min_size=rows,
                                       max_size=rows)), dtype=np.float64).reshape(rows, dim)
    extra = np.array(data.draw(st.lists(finite, min_size=dim, max_size=dim)), dtype=np.float64).reshape(1, dim)
    mech = MeanMechanism(dim=dim, noise_multiplier=1.0, row_clip=clip)
    bigger = clipped_feature_sum(np.vstack([base, extra]), row_clip=clip)
    smaller = clipped_feature_sum(base, row_clip=clip) if rows else np.zeros(dim + 1)
    assert np.linalg.norm(bigger - smaller) <= mech.sensitivity * (1 + 1e-9)


def test_clipped_feature_sum_scales_long_rows_down_and_counts_in_units_of_the_clip():
    x = np.array([[3.0, 4.0], [0.3, 0.4]])  # norms 5 and 0.5
    stats = clipped_feature_sum(x, row_clip=1.0)
    assert np.allclose(stats, [0.6 + 0.3, 0.8 + 0.4, 2.0])
    assert np.allclose(clipped_feature_sum(x, row_clip=2.0), [1.2 + 0.3, 1.6 + 0.4, 4.0])


def test_release_noise_has_the_calibrated_scale():
    mech = MeanMechanism(dim=3, noise_multiplier=1.5, row_clip=2.0)
    assert mech.sensitivity == pytest.approx(2.0 * math.sqrt(2))
    stats = np.array([1.0, -2.0, 3.0, 4.0])
    rng = np.random.default_rng(0)
    draws = np.array([mech.release(stats, rng=rng) for _ in range(20_000)])
    assert np.allclose(draws.mean(axis=0), stats, atol=0.15)
    assert np.allclose(draws.std(axis=0), 1.5 * 2.0 * math.sqrt(2), rtol=0.03)
    secure = np.array([mech.release(np.zeros(4)) for _ in range(3_000)])  # os.urandom
    assert np.allclose(secure.std(axis=0), mech.noise_std, rtol=0.08)
    assert not np.array_equal(secure[0], secure[1])


@pytest.mark.parametrize("target", [0.2, 0.5])
def test_calibration_meets_the_target_after_prior_events(target):
    prior = [PoissonGaussianEvent(sample_rate=0.1, noise_multiplier=10.0, steps=100)]
    total = compute_epsilon(prior, DELTA, accountant="rdp") + target
    mech = MeanMechanism.calibrate(dim=4, target_epsilon=total, target_delta=DELTA, prior_events=prior)
    eps = compute_epsilon([*prior, mech.event()], DELTA, accountant="rdp")
    assert total - 0.02 <= eps <= total
    alone = MeanMechanism.calibrate(dim=4, target_epsilon=target, target_delta=DELTA, accountant="prv")
    assert compute_epsilon([alone.event()], DELTA, accountant="prv") <= target


def test_private_feature_sum_charges_the_ledger_before_computing(tmp_path):
    guard = make_guard(tmp_path)
    mech = MeanMechanism(dim=2, noise_multiplier=20.0)
    x = np.array([[0.6, 0.8], [1.0, 0.0]])
    out = private_feature_sum(features=x, mechanism=mech, guard=guard, round=0, model_hash="h",
                              rng=np.random.default_rng(1))
    assert out.shape == (3,)
    entries = verify_ledger(tmp_path / "a.jsonl")
    assert len(entries) == 2 and entries[0]["params"]["task"] == "feature_mean"  # begin + complete
    assert entries[0]["release"] == "feature_mean" and entries[0]["randomness"] == "insecure_seeded"
    assert entries[0]["noise_multiplier"] == 20.0 and entries[0]["sample_rate"] == 1.0
    assert guard.budget.events == (mech.event(),)


def test_private_feature_sum_refuses_when_the_budget_is_spent_and_changes_nothing(tmp_path):
    guard = make_guard(tmp_path, epsilon=0.2)
    mech = MeanMechanism(dim=2, noise_multiplier=2.0)  # far more than 0.2
    with pytest.raises(PrivacyBudgetExceeded):
        private_feature_sum(features=np.ones((3, 2)), mechanism=mech, guard=guard, round=0, model_hash="h")
    assert not (tmp_path / "a.jsonl").exists() or (tmp_path / "a.jsonl").read_text() == ""
    assert guard.budget.events == ()


@pytest.mark.parametrize("features", [np.ones((3, 5)), np.ones(3)])
def test_features_of_the_wrong_shape_are_refused_after_the_charge(tmp_path, features):
    """Charge first: even the check of the private features runs inside the charged block."""
    guard = make_guard(tmp_path)
    mech = MeanMechanism(dim=2, noise_multiplier=20.0)
    with pytest.raises(InputError):
        private_feature_sum(features=features, mechanism=mech, guard=guard, round=0, model_hash="h")
    assert guard.budget.events == (mech.event(),)
    assert [e["status"] for e in verify_ledger(tmp_path / "a.jsonl")] == ["pending"]


def test_non_finite_rows_and_empty_features_are_released_not_refused(tmp_path):
    """No refusal depends on a record: a non-finite row contributes zero (its count stays), and
    empty features release zeros plus noise."""
    mech = MeanMechanism(dim=2, noise_multiplier=20.0)
    guard = make_guard(tmp_path, epsilon=5.0)
    noise = np.random.default_rng(0).standard_normal(3) * mech.noise_std  # what rng=default_rng(0) adds
    out = private_feature_sum(features=np.array([[0.6, 0.8], [np.nan, 1.0]]), mechanism=mech, guard=guard, round=0,
                              model_hash="h", rng=np.random.default_rng(0))
    np.testing.assert_allclose(out - noise, [0.6, 0.8, 2.0], atol=1e-9)
    empty = private_feature_sum(features=np.zeros((0, 2)), mechanism=mech, guard=guard, round=1, model_hash="h",
                                rng=np.random.default_rng(0))
    np.testing.assert_allclose(empty - noise, [0.0, 0.0, 0.0], atol=1e-9)


def test_bad_mechanisms_are_refused():
    with pytest.raises(InputError):
        MeanMechanism(dim=0, noise_multiplier=1.0)
    with pytest.raises(ConfigError):
        MeanMechanism(dim=2, noise_multiplier=-1.0)
    with pytest.raises(ConfigError):
        MeanMechanism(dim=2, noise_multiplier=1.0, row_clip=math.inf)


def test_noisy_mean_divides_by_the_count_and_refuses_a_tiny_count():
    mech = MeanMechanism(dim=2, noise_multiplier=1.0, row_clip=2.0)
    assert np.allclose(noisy_mean(np.array([4.0, 6.0, 4.0]), mechanism=mech), [2.0, 3.0])  # count 4 / R = 2
    with pytest.raises(InputError):
        noisy_mean(np.array([4.0, 6.0, -3.0]), mechanism=mech)
    with pytest.raises(InputError):
        noisy_mean(np.array([4.0, 6.0]), mechanism=mech)


def test_mean_of_many_clients_is_close_to_the_true_mean():
    rng = np.random.default_rng(3)
    mech = MeanMechanism(dim=8, noise_multiplier=2.0)
    shift = np.linspace(-0.3, 0.3, 8)
    parts = [shift + 0.05 * rng.standard_normal((500, 8)) for _ in range(4)]
    total = sum(mech.release(clipped_feature_sum(p), rng=rng) for p in parts)
    est = noisy_mean(total, mechanism=mech)
    true = np.vstack(parts).mean(axis=0)
    assert np.abs(est - true).max() < 0.02  # noise std per coordinate: 2 * sqrt(2) * 2 / 2000


def test_centre_scale_is_a_row_wise_map():
    t = CentreScale(centre=(1.0, 2.0), scale=3.0)
    x = np.array([[1.0, 2.0], [2.0, 0.0]], dtype=np.float32)
    out = t(x)
    assert out.dtype == np.float32
    assert np.allclose(out, [[0.0, 0.0], [3.0, -6.0]])
    assert np.allclose(t(x[1:]), out[1:])  # one record's image does not depend on the others
    with pytest.raises(InputError):
        t(np.ones((2, 3)))
    with pytest.raises(InputError):
        CentreScale(centre=(np.nan,), scale=1.0)
    with pytest.raises(ConfigError):
        CentreScale(centre=(0.0,), scale=0.0)
