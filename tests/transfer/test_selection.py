"""Tests for secfedtl.transfer.selection: DP source-model selection."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import TensorDataset

from secfedtl.errors import ConfigError, InputError, PrivacyBudgetExceeded
from secfedtl.privacy.accountants import compute_epsilon
from secfedtl.privacy.budget import BudgetGuard, PrivacyBudget
from secfedtl.privacy.events import PoissonGaussianEvent
from secfedtl.privacy.ledger import Ledger, verify_ledger
from secfedtl.transfer.selection import (
    SelectionMechanism,
    clipped_loss_sums,
    private_selection_statistics,
    select_candidate,
)

DELTA = 1e-5


class Column(nn.Module):
    """A fake candidate whose per-sample loss is column ``k`` of the input (see ``column_loss``)."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.k]


def column_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(x)


def loss_data(losses: np.ndarray) -> TensorDataset:
    """A dataset whose record i has loss ``losses[i, k]`` under candidate ``Column(k)``."""
    x = torch.as_tensor(np.asarray(losses, dtype=np.float64))
    return TensorDataset(x, torch.zeros(len(x), dtype=torch.long))


def make_guard(tmp_path: Path, epsilon: float = 1.0, name: str = "a") -> BudgetGuard:
    return BudgetGuard(client=name, budget=PrivacyBudget(epsilon=epsilon, delta=DELTA),
                       ledger=Ledger(tmp_path / f"{name}.jsonl"), state_path=tmp_path / f"{name}.json")


# --- sensitivity and noise -----------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    k=st.integers(1, 5),
    clip=st.floats(0.1, 10.0),
    rows=st.integers(0, 6),
    data=st.data(),
)
def test_one_record_moves_the_scaled_vector_by_at_most_the_sensitivity(k, clip, rows, data):
    finite = st.floats(-5.0, 50.0, allow_nan=False)
    base = np.array(data.draw(st.lists(st.lists(finite, min_size=k, max_size=k), min_size=rows, max_size=rows)),
                    dtype=np.float64).reshape(rows, k)
    extra = np.array(data.draw(st.lists(finite, min_size=k, max_size=k)), dtype=np.float64).reshape(1, k)
    models = [Column(j) for j in range(k)]
    mech = SelectionMechanism(num_candidates=k, loss_clip=clip, noise_multiplier=1.0)
    bigger = clipped_loss_sums(models, loss_data(np.vstack([base, extra])), loss_clip=clip, loss_fn=column_loss)
    if rows:
        smaller = clipped_loss_sums(models, loss_data(base), loss_clip=clip, loss_fn=column_loss)
    else:
        smaller = np.zeros(k + 1)
    diff = bigger - smaller
    diff[-1] *= clip  # the count, in units of C
    assert np.linalg.norm(diff) <= mech.sensitivity * (1 + 1e-9)
    # a record whose every loss is clipped at C attains the bound
    worst = clipped_loss_sums(models, loss_data(np.full((1, k), 2 * clip)), loss_clip=clip, loss_fn=column_loss)
    worst[-1] *= clip
    assert np.linalg.norm(worst) == pytest.approx(mech.sensitivity)


def test_clipped_loss_sums_clip_both_ends_and_count():
    losses = np.array([[-1.0, 0.5, 9.0], [0.25, 3.0, 1.0]])
    stats = clipped_loss_sums([Column(j) for j in range(3)], loss_data(losses), loss_clip=2.0, loss_fn=column_loss)
    assert stats.tolist() == [0.25, 2.5, 3.0, 2.0]


def test_noise_standard_deviation_matches_the_calibration():
    mech = SelectionMechanism(num_candidates=3, loss_clip=2.0, noise_multiplier=1.5)
    assert mech.sensitivity == pytest.approx(2.0 * 2.0)  # C * sqrt(K + 1)
    assert mech.loss_noise_std == pytest.approx(6.0)
    assert mech.count_noise_std == pytest.approx(3.0)
    stats = np.array([1.0, 2.0, 3.0, 4.0])
    rng = np.random.default_rng(0)
    draws = np.array([mech.release(stats, rng=rng) for _ in range(20_000)])
    assert np.allclose(draws.mean(axis=0), stats, atol=0.15)
    assert np.allclose(draws.std(axis=0), [6.0, 6.0, 6.0, 3.0], rtol=0.03)
    # in the scaled coordinates (count * C) every coordinate has std sigma * sensitivity
    scaled = draws.copy()
    scaled[:, -1] *= mech.loss_clip
    assert np.allclose(scaled.std(axis=0), mech.noise_multiplier * mech.sensitivity, rtol=0.03)


def test_secure_noise_is_fresh_and_has_the_right_scale():
    mech = SelectionMechanism(num_candidates=1, loss_clip=1.0, noise_multiplier=2.0)
    draws = np.array([mech.release(np.zeros(2)) for _ in range(5_000)])
    assert np.allclose(draws.std(axis=0), [2.0 * math.sqrt(2), 2.0 * math.sqrt(2)], rtol=0.05)
    assert not np.array_equal(draws[0], draws[1])


# --- calibration, cross-checked ---------------------------------------------------------------


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def exact_gaussian_epsilon(noise_multiplier: float, delta: float) -> float:
    """Exact epsilon of the Gaussian mechanism (Balle and Wang 2018, Theorem 8), by bisection."""
    s = noise_multiplier

    def delta_at(eps: float) -> float:
        return _phi(1 / (2 * s) - eps * s) - math.exp(eps) * _phi(-1 / (2 * s) - eps * s)

    lo, hi = 0.0, 50.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_at(mid) > delta else (lo, mid)
    return hi


@pytest.mark.parametrize("target", [0.2, 0.5, 1.0])
def test_calibrated_event_meets_the_target_and_agrees_with_the_accountants(target):
    mech = SelectionMechanism.calibrate(num_candidates=4, loss_clip=1.0, target_epsilon=target, target_delta=DELTA)
    event = mech.event()
    assert event == PoissonGaussianEvent(sample_rate=1.0, noise_multiplier=mech.noise_multiplier, steps=1)
    rdp = compute_epsilon([event], DELTA, "rdp")
    prv = compute_epsilon([event], DELTA, "prv")
    exact = exact_gaussian_epsilon(mech.noise_multiplier, DELTA)
    assert rdp <= target
    assert rdp >= target - 0.011  # calibration tolerance
    # three independent computations, ordered as they must be: exact <= PRV upper bound <= RDP
    assert exact <= prv + 1e-9 <= rdp + 1e-9
    assert prv - exact < 0.05


def test_calibration_counts_prior_spending():
    prior = [PoissonGaussianEvent(sample_rate=0.02, noise_multiplier=1.0, steps=100)]
    alone = SelectionMechanism.calibrate(num_candidates=2, loss_clip=1.0, target_epsilon=3.0, target_delta=DELTA)
    after = SelectionMechanism.calibrate(num_candidates=2, loss_clip=1.0, target_epsilon=3.0, target_delta=DELTA,
                                         prior_events=prior)
    assert after.noise_multiplier > alone.noise_multiplier
    assert compute_epsilon([*prior, after.event()], DELTA, "rdp") <= 3.0


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_candidates=0, loss_clip=1.0, noise_multiplier=1.0),
        dict(num_candidates=True, loss_clip=1.0, noise_multiplier=1.0),
        dict(num_candidates=2, loss_clip=0.0, noise_multiplier=1.0),
        dict(num_candidates=2, loss_clip=math.inf, noise_multiplier=1.0),
        dict(num_candidates=2, loss_clip=1.0, noise_multiplier=-1.0),
        dict(num_candidates=2, loss_clip=1.0, noise_multiplier=math.nan),
    ],
)
def test_bad_mechanism_is_refused(kwargs):
    with pytest.raises((InputError, ConfigError)):
        SelectionMechanism(**kwargs)


# --- the client release through the budget guard ------------------------------------------------


def test_release_is_charged_to_the_ledger_before_computing(tmp_path):
    guard = make_guard(tmp_path)
    mech = SelectionMechanism.calibrate(num_candidates=2, loss_clip=1.0, target_epsilon=0.5, target_delta=DELTA)
    seen = []

    def spying_loss(model, x, y):
        seen.append([e["status"] for e in verify_ledger(tmp_path / "a.jsonl")])
        return model(x)

    data = loss_data(np.array([[0.1, 0.9], [0.2, 0.4], [0.3, 0.3]]))
    out = private_selection_statistics(candidates=[Column(0), Column(1)], data=data, mechanism=mech, guard=guard,
                                       round=0, model_hash="select:abc", loss_fn=spying_loss,
                                       rng=np.random.default_rng(1))
    assert seen and all(s == ["pending"] for s in seen)
    entries = verify_ledger(tmp_path / "a.jsonl")
    assert [e["status"] for e in entries] == ["pending", "complete"]
    first = entries[0]
    assert (first["mechanism"], first["sample_rate"], first["steps"]) == ("poisson_gaussian", 1.0, 1)
    assert first["noise_multiplier"] == mech.noise_multiplier
    assert first["params"] == {"task": "select", "num_candidates": 2, "loss_clip": 1.0,
                               "sensitivity": pytest.approx(math.sqrt(3))}
    assert first["release"] == "selection_statistics" and first["randomness"] == "insecure_seeded"
    assert guard.budget.events == (mech.event(),)
    assert guard.budget.spent_epsilon == pytest.approx(compute_epsilon([mech.event()], DELTA, "rdp"))
    assert out.shape == (3,) and np.isfinite(out).all()
    assert PrivacyBudget.load(tmp_path / "a.json").events == (mech.event(),)


def test_exhausted_budget_refuses_and_changes_nothing(tmp_path):
    guard = make_guard(tmp_path, epsilon=0.5)
    mech = SelectionMechanism.calibrate(num_candidates=2, loss_clip=1.0, target_epsilon=0.4, target_delta=DELTA)
    data = loss_data(np.array([[0.1, 0.9]]))
    calls = []

    def counting_loss(model, x, y):
        calls.append(1)
        return model(x)

    kwargs = dict(candidates=[Column(0), Column(1)], data=data, mechanism=mech, guard=guard, loss_fn=counting_loss)
    private_selection_statistics(round=0, model_hash="m", **kwargs)  # spends ~0.4 of 0.5
    calls.clear()
    ledger_before = (tmp_path / "a.jsonl").read_bytes()
    state_before = (tmp_path / "a.json").read_bytes()
    budget_before = guard.budget.to_dict()
    with pytest.raises(PrivacyBudgetExceeded):
        private_selection_statistics(round=1, model_hash="m", **kwargs)
    assert calls == []
    assert (tmp_path / "a.jsonl").read_bytes() == ledger_before
    assert (tmp_path / "a.json").read_bytes() == state_before
    assert guard.budget.to_dict() == budget_before


def test_bad_arguments_are_refused_before_the_charge(tmp_path):
    guard = make_guard(tmp_path)
    mech = SelectionMechanism(num_candidates=2, loss_clip=1.0, noise_multiplier=5.0)
    data = loss_data(np.array([[0.1, 0.9]]))
    common = dict(mechanism=mech, guard=guard, round=0, model_hash="m", loss_fn=column_loss)
    with pytest.raises(InputError, match="at least one"):
        private_selection_statistics(candidates=[], data=data, **common)
    with pytest.raises(InputError, match="3 candidate models"):
        private_selection_statistics(candidates=[Column(0), Column(1), Column(1)], data=data, **common)
    with pytest.raises(InputError, match="nn.Module"):
        private_selection_statistics(candidates=[Column(0), "model"], data=data, **common)
    with pytest.raises(InputError, match="Generator"):
        private_selection_statistics(candidates=[Column(0), Column(1)], data=data, rng=1, **common)
    assert not (tmp_path / "a.jsonl").exists() or verify_ledger(tmp_path / "a.jsonl") == []
    assert guard.budget.events == ()


def test_empty_private_data_is_released_as_zeros_after_the_charge(tmp_path):
    """Charge first, and no refusal that depends on the data: an empty split releases zeros
    plus noise, like any other."""
    guard = make_guard(tmp_path)
    mech = SelectionMechanism(num_candidates=2, loss_clip=1.0, noise_multiplier=5.0)
    out = private_selection_statistics(candidates=[Column(0), Column(1)], data=loss_data(np.zeros((0, 2))),
                                       mechanism=mech, guard=guard, round=0, model_hash="m", loss_fn=column_loss)
    assert out.shape == (3,) and np.isfinite(out).all()
    assert guard.budget.events == (mech.event(),)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_loss_counts_as_the_clip_and_fails_nothing(tmp_path, bad):
    """A record that breaks a candidate's loss must not show as a failure: it counts as the
    clipped maximum (the sum's sensitivity is unchanged)."""
    data = loss_data(np.array([[0.1, 0.9], [0.2, bad]]))
    sums = clipped_loss_sums([Column(0), Column(1)], data, loss_clip=1.0, loss_fn=column_loss)
    np.testing.assert_allclose(sums, [0.3, 1.9, 2.0])
    guard = make_guard(tmp_path)
    mech = SelectionMechanism(num_candidates=2, loss_clip=1.0, noise_multiplier=5.0)
    out = private_selection_statistics(candidates=[Column(0), Column(1)], data=data, mechanism=mech, guard=guard,
                                       round=0, model_hash="m", loss_fn=column_loss)
    assert np.isfinite(out).all()
    assert [e["status"] for e in verify_ledger(tmp_path / "a.jsonl")] == ["pending", "complete"]


def test_candidates_that_do_not_fit_the_data_are_refused():
    data = TensorDataset(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(InputError, match="candidate 1"):
        clipped_loss_sums([nn.Linear(3, 2), nn.Linear(5, 2)], data, loss_clip=1.0)
    with pytest.raises(InputError, match="one value per example"):
        clipped_loss_sums([nn.Linear(3, 2)], data, loss_clip=1.0, loss_fn=lambda m, x, y: m(x).sum())


def test_real_models_use_cross_entropy_in_eval_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    model.train()
    x, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
    stats = clipped_loss_sums([model], TensorDataset(x, y), loss_clip=100.0)
    model.eval()
    with torch.no_grad():
        expected = float(nn.functional.cross_entropy(model(x), y, reduction="sum"))
    assert stats[0] == pytest.approx(expected, rel=1e-6) and stats[1] == 10
    # the mode was restored
    model.train()
    clipped_loss_sums([model], TensorDataset(x, y), loss_clip=1.0)
    assert model.training


# --- the server's choice ----------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(
    k=st.integers(2, 5),
    clients=st.integers(3, 5),
    rows=st.integers(1, 20),
    seed=st.integers(0, 2**32 - 1),
    margin=st.floats(0.01, 0.5),
)
def test_server_picks_the_truly_best_candidate_when_noise_is_small(k, clients, rows, seed, margin):
    rng = np.random.default_rng(seed)
    best = int(rng.integers(k))
    mech = SelectionMechanism(num_candidates=k, loss_clip=1.0, noise_multiplier=1e-6)
    models = [Column(j) for j in range(k)]
    total = np.zeros(k + 1)
    true_sums = np.zeros(k)
    for _ in range(clients):
        losses = rng.uniform(0.3, 0.9, size=(rows, k))
        others = np.delete(losses, best, axis=1)
        losses[:, best] = others.min(axis=1) - margin  # the best candidate is better on every record
        stats = clipped_loss_sums(models, loss_data(losses), loss_clip=1.0, loss_fn=column_loss)
        true_sums += stats[:-1]
        total += mech.release(stats, rng=rng)  # what secure aggregation sums
    result = select_candidate(total, num_candidates=k)
    assert result.index == best == int(np.argmin(true_sums))
    assert result.noisy_count == pytest.approx(clients * rows, abs=1e-3)
    assert result.mean_losses is not None
    assert result.mean_losses[best] == pytest.approx(true_sums[best] / (clients * rows), abs=1e-4)


def test_non_positive_count_keeps_the_order_of_the_sums():
    # dividing by a negative count would make the worst candidate look best
    result = select_candidate(np.array([10.0, 3.0, 7.0, -2.0]), num_candidates=3)
    assert result.index == 1 and result.mean_losses is None
    result = select_candidate(np.array([10.0, 3.0, 7.0, 0.5]), num_candidates=3)
    assert result.mean_losses is None
    result = select_candidate(np.array([10.0, 3.0, 7.0, 2.0]), num_candidates=3, min_count=1.0)
    assert result.mean_losses == (5.0, 1.5, 3.5)
    assert result.to_dict()["index"] == 1


@pytest.mark.parametrize(
    ("aggregate", "k"),
    [
        (np.array([1.0, 2.0]), 2),  # too short
        (np.array([1.0, 2.0, 3.0, 4.0]), 2),  # too long
        (np.array([[1.0, 2.0, 3.0]]), 2),  # not a vector
        (np.array([1.0, math.nan, 3.0]), 2),
        (np.array([1.0, 2.0, math.inf]), 2),
        (np.array([1.0]), 0),
        ("abc", 2),
    ],
)
def test_bad_aggregates_are_refused(aggregate, k):
    with pytest.raises(InputError):
        select_candidate(aggregate, num_candidates=k)
