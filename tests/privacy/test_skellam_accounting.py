"""Accounting of the distributed Skellam mechanism, cross-checked against independent computations:

* the exact Renyi divergence of 1-D Skellam distributions (and of their Poisson-subsampled
  mixtures), summed numerically from scipy's Bessel functions, must never exceed our bound;
* in the Gaussian limit (huge noise in integer units) our epsilon must upper-bound Opacus' RDP
  accountant for the subsampled Gaussian of the same variance, and stay close to it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import ive, logsumexp

from secfedtl.errors import AccountingError
from secfedtl.privacy._rdp_skellam import absent_never_worse, rdp_poisson_skellam, rdp_skellam
from secfedtl.privacy.accountants import (
    PRVAccountant,
    RDPAccountant,
    calibrate_noise_multiplier,
    calibrate_skellam_share,
    compute_epsilon,
)
from secfedtl.privacy.events import PoissonGaussianEvent, PoissonSkellamEvent, event_from_dict


def log_skellam_pmf(mu: float, half_width: int) -> tuple[np.ndarray, np.ndarray]:
    k = np.arange(-half_width, half_width + 1)
    with np.errstate(divide="ignore"):
        return k, np.log(ive(np.abs(k), 2.0 * mu))


def exact_divergence(log_p: np.ndarray, log_q: np.ndarray, order: int) -> float:
    """D_order(P || Q) for pmfs on the same support, in log space."""
    mask = np.isfinite(log_p) & np.isfinite(log_q)
    return float(logsumexp(order * log_p[mask] + (1 - order) * log_q[mask]) / (order - 1))


def shifted(log_p: np.ndarray, shift: int) -> np.ndarray:
    out = np.full_like(log_p, -np.inf)
    out[shift:] = log_p[:-shift]
    return out


def support(mu: float) -> int:
    return int(60 * math.sqrt(2 * mu + 1) + 200)


@pytest.mark.parametrize("mu", [0.5, 4.0, 50.0, 800.0])
@pytest.mark.parametrize("shift", [1, 3, 12])
@pytest.mark.parametrize("order", [2, 5, 16])
def test_skellam_bound_covers_the_exact_one_dimensional_divergence(mu: float, shift: int, order: int) -> None:
    _, log_p = log_skellam_pmf(mu, support(mu))
    exact = exact_divergence(shifted(log_p, shift), log_p, order)
    bound = rdp_skellam(order, mu=mu, l2=shift, l1=shift)  # one coordinate: L1 = L2 = shift
    assert exact <= bound * (1 + 1e-9)
    if mu >= 800:  # large noise: the bound is close to exact (the Gaussian term dominates)
        assert bound <= exact * 1.05


def test_skellam_bound_covers_a_spread_out_integer_vector() -> None:
    """Divergence adds over independent coordinates: v = (1, ..., 1) in m coordinates has
    L2 = sqrt(m), L1 = m, and exact divergence m * D(shift by 1)."""
    mu, m = 20.0, 400
    _, log_p = log_skellam_pmf(mu, support(mu))
    for order in (2, 8, 32):
        exact = m * exact_divergence(shifted(log_p, 1), log_p, order)
        assert exact <= rdp_skellam(order, mu=mu, l2=math.sqrt(m), l1=m)


@pytest.mark.parametrize(("mu", "shift", "q"), [(2.0, 1, 0.05), (30.0, 4, 0.01), (30.0, 4, 0.3), (400.0, 20, 0.02)])
@pytest.mark.parametrize("order", [2, 3, 8, 24])
def test_subsampled_bound_covers_both_directions_exactly_computed(mu: float, shift: int, q: float, order: int) -> None:
    """Poisson subsampling (add/remove one record): output is P without the record and the
    mixture (1-q) P + q P_shift with it; our bound must cover both divergences."""
    _, log_p = log_skellam_pmf(mu, support(mu))
    log_mix = np.logaddexp(math.log1p(-q) + log_p, math.log(q) + shifted(log_p, shift))
    exact = max(exact_divergence(log_mix, log_p, order), exact_divergence(log_p, log_mix, order))
    bound = rdp_poisson_skellam(q, order, mu=mu, l2=shift, l1=shift)
    assert exact <= bound * (1 + 1e-9)
    assert bound <= rdp_skellam(order, mu=mu, l2=shift, l1=shift) + 1e-12  # subsampling never costs more


@pytest.mark.parametrize(("q", "steps", "sigma"), [(0.01, 1000, 1.0), (0.05, 200, 1.5), (1.0, 10, 8.0)])
def test_gaussian_limit_upper_bounds_opacus(q: float, steps: int, sigma: float) -> None:
    """Skellam with variance 2 mu = (sigma * l2)^2 and huge l2 behaves like the Gaussian: our
    epsilon must be at least Opacus' subsampled-Gaussian epsilon (it is an upper bound for a
    mechanism that is not exactly Gaussian) and within 1% of it (the binomial expansion at integer
    orders only: 2.108 against 2.101 at q=0.01, T=1000, sigma=1; 2.612 against 2.603 at q=0.05,
    T=200, sigma=1.5). The general subsampling theorem this replaced (Zhu-Wang) gave 2.45 and 3.46."""
    from opacus.accountants.analysis import rdp as opacus_rdp

    l2 = 1.0e5
    event = PoissonSkellamEvent(sample_rate=q, steps=steps, share_variance=(sigma * l2) ** 2, honest_parties=1,
                                l2_bound=l2, l1_bound=l2 * 1000, dimension=10**6, scale=1.0, bits=40)
    ours = compute_epsilon([event], 1e-5)
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    rdp = opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders)
    theirs, _ = opacus_rdp.get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)
    assert ours >= theirs * (1 - 1e-9)
    assert ours <= theirs * 1.01


def skellam(**overrides: object) -> PoissonSkellamEvent:
    fields: dict[str, object] = dict(sample_rate=0.02, steps=300, share_variance=4.0e5, honest_parties=6,
                                     l2_bound=1500.0, l1_bound=1500.0 * 256, dimension=65536, scale=1000.0, bits=20)
    fields.update(overrides)
    return PoissonSkellamEvent(**fields)  # type: ignore[arg-type]


def test_event_round_trips_and_counts_only_honest_noise() -> None:
    event = skellam()
    assert event_from_dict(event.to_dict()) == event
    assert event.total_mu == 6 * 4.0e5 / 2
    # the same total noise split over more honest parties is the same mechanism
    assert compute_epsilon([skellam(honest_parties=12, share_variance=2.0e5)], 1e-5) == pytest.approx(
        compute_epsilon([event], 1e-5), rel=1e-12)
    # fewer honest parties assumed: less noise counted, more epsilon
    assert compute_epsilon([skellam(honest_parties=3)], 1e-5) > compute_epsilon([event], 1e-5)


@pytest.mark.parametrize("overrides", [
    {"sample_rate": 0.0}, {"sample_rate": 1.5}, {"steps": 0}, {"steps": 2.0}, {"share_variance": 0.0},
    {"share_variance": float("inf")}, {"honest_parties": 0}, {"l2_bound": -1.0}, {"dimension": 0},
    {"bits": 65}, {"bits": 1}, {"scale": 0.0}, {"honest_parties": True},
    {"l1_bound": 1500.0 * 255},  # below sqrt(d) * l2 = 1500 * 256: the encoder never enforces it
])
def test_invalid_events_are_refused(overrides: dict[str, object]) -> None:
    with pytest.raises(AccountingError):
        skellam(**overrides)


def test_rdp_composes_gaussian_and_skellam_and_prv_refuses_skellam() -> None:
    gauss = PoissonGaussianEvent(sample_rate=0.02, noise_multiplier=1.1, steps=100)
    both = compute_epsilon([gauss, skellam()], 1e-5)
    assert both > max(compute_epsilon([gauss], 1e-5), compute_epsilon([skellam()], 1e-5))
    acc = RDPAccountant([gauss])
    acc.compose(skellam())
    assert acc.get_epsilon(1e-5) == both
    assert RDPAccountant.from_dict(acc.to_dict()).get_epsilon(1e-5) == both
    prv = PRVAccountant([gauss])
    assert not PRVAccountant.supports(skellam()) and PRVAccountant.supports(gauss)
    with pytest.raises(AccountingError):
        prv.compose(skellam())
    assert prv.events == (gauss,)  # refused before changing anything


@pytest.mark.parametrize("target", [0.5, 1.0, 3.0, 8.0])
def test_calibration_never_overshoots(target: float) -> None:
    kwargs = dict(target_delta=1e-5, sample_rate=0.01, steps=500, honest_parties=4, l2_bound=800.0,
                  l1_bound=800.0 * 128, dimension=16384, scale=700.0, bits=18)
    event = calibrate_skellam_share(target_epsilon=target, **kwargs)
    eps = compute_epsilon([event], 1e-5)
    assert target - 0.01 <= eps <= target
    assert (event.honest_parties, event.l2_bound, event.bits) == (4, 800.0, 18)
    # twice the honest parties: each adds half the share, the same total noise
    doubled = calibrate_skellam_share(target_epsilon=target, **{**kwargs, "honest_parties": 8})
    assert doubled.total_mu == pytest.approx(event.total_mu, rel=1e-9)


def test_calibration_leaves_room_for_prior_events_and_is_close_to_gaussian() -> None:
    prior = [PoissonGaussianEvent(sample_rate=0.01, noise_multiplier=1.0, steps=200)]
    kwargs = dict(target_epsilon=3.0, target_delta=1e-5, sample_rate=0.01, steps=800, honest_parties=5,
                  l2_bound=2000.0, l1_bound=2000.0 * 512, dimension=262144, scale=1900.0, bits=20)
    alone = calibrate_skellam_share(**kwargs)
    after = calibrate_skellam_share(**kwargs, prior_events=prior)
    assert after.share_variance > alone.share_variance
    assert compute_epsilon([*prior, after], 1e-5) <= 3.0
    z_skellam = math.sqrt(2 * alone.total_mu) / alone.l2_bound
    z_gauss = calibrate_noise_multiplier(target_epsilon=3.0, target_delta=1e-5, sample_rate=0.01, steps=800)
    assert z_gauss <= z_skellam <= 1.03 * z_gauss  # within the calibration tolerances


def test_calibration_refuses_impossible_targets() -> None:
    with pytest.raises(AccountingError):
        calibrate_skellam_share(target_epsilon=1e-4, target_delta=1e-5, sample_rate=1.0, steps=10_000,
                                honest_parties=1, l2_bound=10.0, l1_bound=10.0, dimension=1, scale=1.0, bits=16)
    with pytest.raises(AccountingError):
        calibrate_skellam_share(target_epsilon=-1.0, target_delta=1e-5, sample_rate=0.1, steps=1,
                                honest_parties=1, l2_bound=10.0, l1_bound=10.0, dimension=1, scale=1.0, bits=16)


@pytest.mark.parametrize("order", [1.5, 2, 3, 7.3, 16, 63, 256])
def test_absent_never_worse_on_randomized_response(order: float) -> None:
    """The lemma behind bounding only the 'record present' direction, checked directly on its
    elementary case (randomized response with privacy loss l), independently of its proof:
    E_P[Y^alpha] >= E_P[Y^(1-alpha)], with equality at q = 1 (a symmetric pair's two divergences
    are equal) and at l = 0."""
    for q in [1e-6, 1e-3, 0.01, 0.1, 0.3, 0.5, 0.9, 0.999]:
        for loss in [1e-6, 1e-3, 0.05, 0.3, 1.0, 3.0, 10.0, 50.0]:
            present, absent = absent_never_worse(order, q, loss)
            assert present >= absent - 1e-12 * max(1.0, abs(absent)), (order, q, loss)
    present, absent = absent_never_worse(order, 1.0, 2.0)
    assert present == pytest.approx(absent, rel=1e-12)
    assert absent_never_worse(order, 0.3, 0.0) == (pytest.approx(0.0, abs=1e-15), pytest.approx(0.0, abs=1e-15))


def test_absent_is_worse_for_an_asymmetric_pair() -> None:
    """The lemma needs the symmetry: for an asymmetric pair (Q puts no mass where P puts 1/2) the
    'record absent' divergence is the larger one, so the check above is not vacuous."""
    q, order = 0.1, 8
    log_p = np.log(np.array([0.5, 0.5]))
    log_q = np.log(np.array([1e-300, 1.0]))
    log_mix = np.logaddexp(math.log1p(-q) + log_p, math.log(q) + log_q)
    assert exact_divergence(log_p, log_mix, order) > exact_divergence(log_mix, log_p, order)


@pytest.mark.parametrize(("mu", "shift", "q"), [(1.0, (2, 1), 0.1), (6.0, (3, -2), 0.2), (0.5, (1, 1), 0.5)])
@pytest.mark.parametrize("order", [2, 4, 12])
def test_subsampled_bound_covers_an_exact_two_dimensional_mixture(
        mu: float, shift: tuple[int, int], q: float, order: int) -> None:
    """A shift spread over two coordinates (no reduction to one dimension): the exact divergences
    of the Poisson mixture on the 2-D grid, both directions, against our bound at L2 and L1 of
    the shift."""
    half = support(mu) // 4
    _, log_1d = log_skellam_pmf(mu, half)
    log_p = log_1d[:, None] + log_1d[None, :]
    log_shifted = np.full_like(log_p, -np.inf)
    a, b = shift
    src = log_p[max(0, -a):log_p.shape[0] - max(0, a), max(0, -b):log_p.shape[1] - max(0, b)]
    log_shifted[max(0, a):max(0, a) + src.shape[0], max(0, b):max(0, b) + src.shape[1]] = src
    log_mix = np.logaddexp(math.log1p(-q) + log_p, math.log(q) + log_shifted)
    exact = max(exact_divergence(log_mix.ravel(), log_p.ravel(), order),
                exact_divergence(log_p.ravel(), log_mix.ravel(), order))
    bound = rdp_poisson_skellam(q, order, mu=mu, l2=math.hypot(a, b), l1=abs(a) + abs(b))
    assert 0.0 < exact <= bound * (1 + 1e-9)


def _zhu_wang(order: int, q: float, base: list[float]) -> float:
    """Zhu and Wang (ICML 2019) Theorem 6, the general bound this accountant used before, written
    out independently in the test."""
    log_terms = [(order - 1) * math.log1p(-q) + math.log(order * q - q + 1),
                 math.log(math.comb(order, 2)) + 2 * math.log(q) + (order - 2) * math.log1p(-q) + base[2]]
    log_terms += [math.log(3 * math.comb(order, ell)) + ell * math.log(q) + (order - ell) * math.log1p(-q)
                  + (ell - 1) * base[ell] for ell in range(3, order + 1)]
    return min(float(logsumexp(log_terms)) / (order - 1), base[order])


@pytest.mark.parametrize(("mu", "q"), [(5.0, 0.1), (200.0, 0.02), (2.0e4, 0.3)])
def test_never_above_the_general_bound_it_replaced(mu: float, q: float) -> None:
    """Term by term no larger than Zhu-Wang: every ledger charged under the older accountant stays
    a valid upper bound when the audit recomputes it with this one."""
    for order in range(2, 40):
        base = [math.nan, math.nan] + [rdp_skellam(ell, mu=mu, l2=10.0, l1=40.0) for ell in range(2, order + 1)]
        ours = rdp_poisson_skellam(q, order, mu=mu, l2=10.0, l1=40.0)
        assert ours <= _zhu_wang(order, q, base) * (1 + 1e-12)
