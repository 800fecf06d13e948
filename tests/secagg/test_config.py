"""secfedtl.secagg.config: hard rules refuse bad configs; the recommended rule meets its bounds."""

from __future__ import annotations

import math

import pytest

from secfedtl.errors import ConfigError, SecFedTLError
from secfedtl.secagg import SecAggConfig
from secfedtl.secagg.config import failure_probabilities, tolerated_colluders


@pytest.mark.parametrize("kwargs", [
    dict(num_clients=20, threshold=5, neighbours=10),     # threshold == k/2
    dict(num_clients=20, threshold=4, neighbours=10),     # threshold < k/2
    dict(num_clients=20, threshold=9, neighbours=None),   # complete graph, k=19: 9 <= 9.5
    dict(num_clients=20, threshold=11, neighbours=10),    # threshold > k
    dict(num_clients=20, threshold=20, neighbours=None),  # threshold > n-1
    dict(num_clients=20, threshold=11, neighbours=20),    # neighbours >= n
    dict(num_clients=20, threshold=15, neighbours=25),
    dict(num_clients=20, threshold=1, neighbours=1),
    dict(num_clients=21, threshold=4, neighbours=5),      # odd k with odd n
    dict(num_clients=2, threshold=1),                    # n < 3
    dict(num_clients=1, threshold=1),
    dict(num_clients=True, threshold=1),
    dict(num_clients=20, threshold=11, min_survivors=10),  # below threshold
    dict(num_clients=20, threshold=11, min_survivors=21),  # above n
    dict(num_clients=20, threshold=11.0),
    dict(num_clients=20, threshold=11, bits=7),
    dict(num_clients=20, threshold=11, clip=-1.0),
    dict(num_clients=20, threshold=11, bits=16, scale=2.0**20),  # explicit scale wraps
])
def test_bad_configs_raise_config_error(kwargs):
    with pytest.raises(ConfigError):
        SecAggConfig(**kwargs)
    assert issubclass(ConfigError, SecFedTLError)


def test_good_configs():
    cfg = SecAggConfig(num_clients=20, threshold=11, neighbours=None, clip=1.0, bits=32)
    assert cfg.degree == 19 and cfg.full_graph and cfg.min_survivors == 11
    cfg = SecAggConfig(num_clients=21, threshold=4, neighbours=6, min_survivors=21)
    assert cfg.degree == 6 and not cfg.full_graph and cfg.min_survivors == 21
    assert SecAggConfig(num_clients=20, threshold=3, neighbours=5).degree == 5  # odd k, even n
    assert SecAggConfig(num_clients=20, threshold=11, bits=16).encoding.bits == 16


def _independent_tail_ge(k: int, p: float, t: int) -> float:
    # complementary sum, to cross-check the library's tail
    return 1.0 - sum(math.comb(k, i) * p**i * (1 - p) ** (k - i) for i in range(0, t))


def test_failure_probabilities_match_binomial_tails():
    priv, corr = failure_probabilities(num_clients=100, degree=20, threshold=11, dropout_rate=0.1,
                                       corrupt_fraction=0.1)
    assert priv == pytest.approx(min(1, 100 * _independent_tail_ge(20, 0.1, 11)), rel=1e-6, abs=1e-15)
    assert corr == pytest.approx(min(1, 100 * (1 - _independent_tail_ge(20, 0.9, 11))), rel=1e-6, abs=1e-15)


@pytest.mark.parametrize("n", [50, 100, 1000])
def test_recommended_meets_its_bounds(n):
    cfg = SecAggConfig.recommended(num_clients=n, dropout_rate=0.05, corrupt_fraction=0.05, clip=2.0)
    k, t = cfg.degree, cfg.threshold
    assert cfg.num_clients == n and cfg.clip == 2.0
    assert k / 2 < t <= k
    assert cfg.tolerated_colluders == 2 * t - k - 1 >= math.floor(0.05 * n)  # active server, c colluders
    priv, corr = failure_probabilities(num_clients=n, degree=k, threshold=t, dropout_rate=0.05,
                                       corrupt_fraction=0.05)
    if cfg.full_graph:  # worst-case counts instead of probabilities
        assert t > math.floor(0.05 * n) and k - math.ceil(0.05 * n) >= t
    else:
        assert priv <= 2.0**-40 and corr <= 2.0**-20


def test_recommended_degree_grows_slowly_without_colluders():
    # O(log n) only with a fixed number of colluders; floor(gamma * n) colluders need k ~ 2 gamma n
    k100 = SecAggConfig.recommended(num_clients=100, colluders=0).degree
    k1000 = SecAggConfig.recommended(num_clients=1000, colluders=0).degree
    assert k1000 <= 2 * k100
    assert k1000 < 1000 // 4


def test_recommended_is_minimal():
    cfg = SecAggConfig.recommended(num_clients=1000, colluders=0)
    k, t = cfg.degree, cfg.threshold
    # a smaller threshold breaks privacy, or a smaller even degree meets nothing
    priv, _ = failure_probabilities(num_clients=1000, degree=k, threshold=t - 1, dropout_rate=0.05,
                                    corrupt_fraction=0.05)
    assert t - 1 <= k // 2 or priv > 2.0**-40
    kk = k - 2
    ok = any(all(p <= b for p, b in zip(
        failure_probabilities(num_clients=1000, degree=kk, threshold=tt, dropout_rate=0.05, corrupt_fraction=0.05),
        (2.0**-40, 2.0**-20))) for tt in range(kk // 2 + 1, kk + 1))
    assert not ok


@pytest.mark.parametrize(("n", "c"), [(20, 1), (100, 5), (100, 0), (1000, 50), (50, 10)])
def test_recommended_tolerates_the_declared_colluders_with_the_smallest_threshold(n, c):
    cfg = SecAggConfig.recommended(num_clients=n, colluders=c)
    k, t = cfg.degree, cfg.threshold
    assert cfg.tolerated_colluders >= c
    # one less and the split-view attack (docs/protocol.md) has enough honest neighbours
    assert t - 1 <= k // 2 or tolerated_colluders(degree=k, threshold=t - 1) < c or \
        failure_probabilities(num_clients=n, degree=k, threshold=t - 1, dropout_rate=0.05,
                              corrupt_fraction=0.05)[0] > 2.0**-40


def test_the_issue_parameters_tolerate_what_the_attack_needed():
    # the old rule's n=20 (k=19, t=10) fell to 1 colluder, n=100 (k=28, t=17) to 6 (issue 11)
    assert tolerated_colluders(degree=19, threshold=10) == 0
    assert tolerated_colluders(degree=28, threshold=17) == 5
    assert SecAggConfig.recommended(num_clients=20).tolerated_colluders >= 1


@pytest.mark.parametrize("kwargs", [
    dict(num_clients=100, dropout_rate=1.0), dict(num_clients=100, colluders=99), dict(num_clients=20, colluders=17), dict(num_clients=100, corrupt_fraction=0.5),
    dict(num_clients=100, dropout_rate=0.3, corrupt_fraction=0.3), dict(num_clients=2),
])
def test_recommended_refuses_impossible_requests(kwargs):
    with pytest.raises(ConfigError):
        SecAggConfig.recommended(**kwargs)
