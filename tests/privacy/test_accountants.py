"""Accountant contract suite (shared by every accountant) and reference values.

Reference values at delta = 1e-5 (Opacus 1.6 RDPAccountant with its default orders; PRV upper
bound with eps_error = 0.01; the PLD values are from Google's dp_accounting and are only
used as a lower sanity bound for PRV, which reports the upper end of its error interval).
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secfedtl.errors import AccountingError
from secfedtl.privacy.accountants import (
    ACCOUNTANTS,
    PRVAccountant,
    RDPAccountant,
    accountant_from_dict,
    calibrate_noise_multiplier,
    compute_epsilon,
    make_accountant,
)
from secfedtl.privacy.events import PoissonGaussianEvent

DELTA = 1e-5


def ev(q: float, sigma: float, steps: int) -> PoissonGaussianEvent:
    return PoissonGaussianEvent(sample_rate=q, noise_multiplier=sigma, steps=steps)


@pytest.fixture(params=sorted(ACCOUNTANTS))
def name(request: pytest.FixtureRequest) -> str:
    return request.param


# --- contract ------------------------------------------------------------------------------


def test_empty_accountant_spends_nothing(name: str) -> None:
    assert make_accountant(name).get_epsilon(DELTA) == 0.0


def test_monotone_in_steps(name: str) -> None:
    eps = [compute_epsilon([ev(0.02, 1.0, t)], DELTA, name) for t in (50, 200, 800)]
    assert 0 < eps[0] < eps[1] < eps[2]


def test_decreasing_in_noise(name: str) -> None:
    eps = [compute_epsilon([ev(0.02, s, 300)], DELTA, name) for s in (0.8, 1.2, 2.0)]
    assert eps[0] > eps[1] > eps[2] > 0


def test_increasing_in_sample_rate(name: str) -> None:
    eps = [compute_epsilon([ev(q, 1.0, 300)], DELTA, name) for q in (0.005, 0.02, 0.08)]
    assert eps[0] < eps[1] < eps[2]


def test_larger_delta_gives_smaller_epsilon(name: str) -> None:
    acc = make_accountant(name)
    acc.compose(ev(0.02, 1.0, 300))
    assert acc.get_epsilon(1e-3) < acc.get_epsilon(1e-6)


def test_compose_is_sum_of_steps_and_order_free(name: str) -> None:
    a, b = ev(0.02, 1.0, 120), ev(0.05, 1.5, 80)
    split = make_accountant(name)
    split.compose(ev(0.02, 1.0, 70))
    split.compose(b)
    split.compose(ev(0.02, 1.0, 50))
    joined = make_accountant(name)
    joined.compose(a)
    joined.compose(b)
    assert split.get_epsilon(DELTA) == pytest.approx(joined.get_epsilon(DELTA), rel=1e-9)
    # Composition spends more than either part alone.
    assert joined.get_epsilon(DELTA) > compute_epsilon([a], DELTA, name)
    assert joined.get_epsilon(DELTA) > compute_epsilon([b], DELTA, name)


def test_to_dict_round_trip(name: str) -> None:
    acc = make_accountant(name)
    for e in (ev(0.02, 1.0, 10), ev(1.0, 3.0, 1)):
        acc.compose(e)
    state = json.loads(json.dumps(acc.to_dict()))
    again = ACCOUNTANTS[name].from_dict(state)
    assert again.events == acc.events
    assert again.get_epsilon(DELTA) == acc.get_epsilon(DELTA)
    assert accountant_from_dict(state).events == acc.events


def test_copy_is_independent(name: str) -> None:
    acc = make_accountant(name)
    acc.compose(ev(0.02, 1.0, 10))
    other = acc.copy()
    other.compose(ev(0.02, 1.0, 10))
    assert len(acc.events) == 1 and len(other.events) == 2


@pytest.mark.parametrize("bad", [None, 1.0, {"sample_rate": 0.1}, (0.1, 1.0, 1)])
def test_invalid_event_raises_and_changes_nothing(name: str, bad: object) -> None:
    acc = make_accountant(name)
    acc.compose(ev(0.02, 1.0, 10))
    with pytest.raises(AccountingError):
        acc.compose(bad)  # type: ignore[arg-type]
    assert acc.events == (ev(0.02, 1.0, 10),)


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, float("nan"), "1e-5", True])
def test_invalid_delta_raises(name: str, delta: object) -> None:
    acc = make_accountant(name)
    acc.compose(ev(0.02, 1.0, 10))
    with pytest.raises(AccountingError):
        acc.get_epsilon(delta)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "state",
    [
        {"version": 2, "accountant": "rdp", "events": []},
        {"version": 1, "accountant": "nope", "events": []},
        {"version": 1, "accountant": "rdp", "events": {}},
        {"version": 1, "accountant": "rdp", "events": [{"mechanism": "laplace"}]},
        {"version": 1, "accountant": "rdp", "events": [], "extra": 0},
    ],
)
def test_bad_state_raises(state: dict) -> None:
    with pytest.raises(AccountingError):
        accountant_from_dict(state)


def test_from_dict_refuses_other_accountants_state() -> None:
    with pytest.raises(AccountingError):
        PRVAccountant.from_dict(RDPAccountant().to_dict())


def test_unknown_accountant_name() -> None:
    with pytest.raises(AccountingError):
        make_accountant("moments")
    with pytest.raises(AccountingError):
        compute_epsilon([], DELTA, accountant="pld")


# --- reference values ----------------------------------------------------------------------


def test_rdp_reference_values() -> None:
    assert compute_epsilon([ev(0.01, 1.0, 1000)], DELTA) == pytest.approx(2.1014, rel=1e-3)
    assert compute_epsilon([ev(0.01, 4.0, 10000)], DELTA) == pytest.approx(1.0355, rel=1e-3)
    mixed = [ev(0.032, 1.0, 310), ev(0.064, 1.5, 155)]
    assert compute_epsilon(mixed, DELTA) == pytest.approx(5.062, rel=1e-3)


def test_rdp_matches_opacus_accountant() -> None:
    """Cross-check against Opacus' own accountant driven step by step."""
    from opacus.accountants import RDPAccountant as OpacusRDP

    opacus = OpacusRDP()
    for _ in range(40):
        opacus.step(noise_multiplier=1.3, sample_rate=0.05)
    for _ in range(25):
        opacus.step(noise_multiplier=0.9, sample_rate=0.01)
    ours = compute_epsilon([ev(0.05, 1.3, 40), ev(0.01, 0.9, 25)], DELTA)
    assert ours == pytest.approx(opacus.get_epsilon(DELTA), rel=1e-9)


@given(
    q=st.floats(min_value=1e-4, max_value=1.0),
    sigma=st.floats(min_value=0.3, max_value=50.0),
    order=st.sampled_from([1.1, 1.5, 2.0, 3.7, 8.0, 10.9, 32.0, 63.0]),
)
@settings(max_examples=40, deadline=None)
def test_pure_python_rdp_matches_opacus_analysis(q: float, sigma: float, order: float) -> None:
    """Our torch-free RDP against Opacus' implementation of the same analysis."""
    from opacus.accountants.analysis.rdp import compute_rdp

    from secfedtl.privacy._rdp import rdp_poisson_gaussian

    theirs = float(compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=[order])[0])
    ours = rdp_poisson_gaussian(q, sigma, order)
    assert ours == pytest.approx(theirs, rel=1e-7, abs=1e-12)


def test_rdp_accounting_does_not_import_torch() -> None:
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys; from secfedtl.privacy.accountants import compute_epsilon; "
        "from secfedtl.privacy.events import PoissonGaussianEvent as E; "
        "import secfedtl.privacy, secfedtl.privacy.audit; "
        "compute_epsilon([E(sample_rate=0.1, noise_multiplier=1.0, steps=3)], 1e-5); "
        "assert 'torch' not in sys.modules and 'opacus' not in sys.modules"
    )
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", code], env={"PYTHONPATH": str(repo)}, capture_output=True, timeout=60
    )
    assert done.returncode == 0, done.stderr


def test_prv_reference_values() -> None:
    # q=0.01, sigma=1, T=1000: PLD (dp_accounting) 1.828; PRV upper bound 1.838.
    eps = compute_epsilon([ev(0.01, 1.0, 1000)], DELTA, "prv")
    assert eps == pytest.approx(1.838, rel=1e-3)
    assert 1.828 <= eps < 2.1014
    # q=0.01, sigma=4, T=10000: PLD 0.947; PRV upper bound 0.957, both far below RDP 1.0355.
    eps = compute_epsilon([ev(0.01, 4.0, 10000)], DELTA, "prv")
    assert 0.947 <= eps <= 0.947 + 0.02
    assert eps < 1.0355


def test_prv_is_tighter_than_rdp_on_mixed_rounds() -> None:
    mixed = [ev(0.032, 1.0, 310), ev(0.064, 1.5, 155)]
    prv = compute_epsilon(mixed, DELTA, "prv")
    assert prv == pytest.approx(4.575, rel=1e-3)
    assert prv < compute_epsilon(mixed, DELTA, "rdp")


def test_plain_gaussian_on_a_sum() -> None:
    """sample_rate=1, steps=1: RDP of the Gaussian mechanism is alpha / (2 sigma^2)."""
    import math

    from secfedtl.privacy.accountants import RDP_ORDERS

    sigma = 2.0
    expected = min(
        a / (2 * sigma**2) + math.log((a - 1) / a) - (math.log(DELTA) + math.log(a)) / (a - 1)
        for a in RDP_ORDERS
    )
    assert compute_epsilon([ev(1.0, sigma, 1)], DELTA) == pytest.approx(expected, rel=1e-9)
    assert 0 < compute_epsilon([ev(1.0, sigma, 1)], DELTA, "prv") < expected


# --- calibration ---------------------------------------------------------------------------


@given(
    target_epsilon=st.floats(min_value=0.3, max_value=10.0),
    sample_rate=st.floats(min_value=0.001, max_value=0.2),
    steps=st.integers(min_value=1, max_value=3000),
)
@settings(max_examples=15, deadline=None)
def test_calibrated_noise_never_overshoots(
    target_epsilon: float, sample_rate: float, steps: int
) -> None:
    sigma = calibrate_noise_multiplier(
        target_epsilon=target_epsilon, target_delta=DELTA, sample_rate=sample_rate, steps=steps
    )
    eps = compute_epsilon([ev(sample_rate, sigma, steps)], DELTA)
    assert eps <= target_epsilon
    # ...and it is close to the smallest such sigma: a bit less noise would overshoot,
    # unless the search stopped at its floor.
    if sigma > 0.1:
        assert eps >= target_epsilon - 0.01 or compute_epsilon(
            [ev(sample_rate, sigma * (1 - 1e-5), steps)], DELTA
        ) > target_epsilon


@pytest.mark.parametrize("name", ["rdp", "prv"])
def test_calibration_hits_target_from_below(name: str) -> None:
    sigma = calibrate_noise_multiplier(
        target_epsilon=2.0, target_delta=DELTA, sample_rate=0.01, steps=1000, accountant=name
    )
    eps = compute_epsilon([ev(0.01, sigma, 1000)], DELTA, name)
    assert 2.0 - 0.01 <= eps <= 2.0
    assert compute_epsilon([ev(0.01, sigma * 0.97, 1000)], DELTA, name) > 2.0


def test_calibration_counts_prior_events() -> None:
    prior = [ev(0.01, 1.0, 500)]
    fresh = calibrate_noise_multiplier(
        target_epsilon=3.0, target_delta=DELTA, sample_rate=0.01, steps=500
    )
    with_prior = calibrate_noise_multiplier(
        target_epsilon=3.0, target_delta=DELTA, sample_rate=0.01, steps=500, prior_events=prior
    )
    assert with_prior > fresh
    assert compute_epsilon([*prior, ev(0.01, with_prior, 500)], DELTA) <= 3.0


def test_calibration_impossible_raises() -> None:
    spent = [ev(0.01, 1.0, 1000)]  # RDP 2.10 already
    with pytest.raises(AccountingError):
        calibrate_noise_multiplier(
            target_epsilon=2.0,
            target_delta=DELTA,
            sample_rate=0.01,
            steps=10,
            prior_events=spent,
        )
    with pytest.raises(AccountingError):  # below RDP's floor over the default orders
        calibrate_noise_multiplier(
            target_epsilon=0.05, target_delta=DELTA, sample_rate=0.01, steps=10
        )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target_epsilon": 0.0},
        {"target_epsilon": float("inf")},
        {"target_delta": 0.0},
        {"sample_rate": 1.5},
        {"steps": 0},
        {"tolerance": 0.0},
        {"accountant": "pld"},
    ],
)
def test_calibration_bad_arguments(kwargs: dict) -> None:
    args = {
        "target_epsilon": 1.0,
        "target_delta": DELTA,
        "sample_rate": 0.01,
        "steps": 100,
        **kwargs,
    }
    with pytest.raises(AccountingError):
        calibrate_noise_multiplier(**args)
