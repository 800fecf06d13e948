"""Tests for secfedtl.aggregation.optimizers."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from secfedtl.aggregation import (
    SERVER_OPTIMIZERS,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedYogi,
    ServerOptimizer,
    average_update,
    make_server_optimizer,
)
from secfedtl.aggregation.optimizers import decode_vector, encode_vector
from secfedtl.errors import AggregationError, ConfigError, InputError

finite = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False)


OPTIMIZER_NAMES = ["fedavg", "fedavgm", "fedadagrad", "fedadam", "fedyogi"]


def fresh(name: str) -> ServerOptimizer:
    """A new optimiser of each kind with non-trivial hyperparameters."""
    return {o.name: o for o in all_optimizers()}[name]


def all_optimizers() -> list[ServerOptimizer]:
    return [
        FedAvg(server_lr=0.5),
        FedAvgM(server_lr=0.5, momentum=0.9),
        FedAdagrad(server_lr=0.1),
        FedAdam(server_lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3),
        FedYogi(server_lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3),
    ]


def aggregate(updates: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, float]:
    """What secure aggregation hands the server: the weighted sum and the total weight."""
    return (weights[:, None] * updates).sum(axis=0), float(weights.sum())


@settings(max_examples=60, deadline=None)
@given(data=st.data(), dim=st.integers(1, 20), num_clients=st.integers(1, 8))
def test_fedavg_is_the_weighted_mean(data: st.DataObject, dim: int, num_clients: int) -> None:
    params = data.draw(hnp.arrays(np.float64, dim, elements=finite))
    updates = data.draw(hnp.arrays(np.float64, (num_clients, dim), elements=finite))
    weights = np.array(data.draw(st.lists(st.integers(1, 1000), min_size=num_clients,
                                          max_size=num_clients)), dtype=np.float64)
    weighted_sum, total = aggregate(updates, weights)
    before = params.copy()
    new = FedAvg().step(params, weighted_sum, total)
    np.testing.assert_allclose(new, params + np.average(updates, axis=0, weights=weights),
                               rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(params, before)  # input not mutated
    assert new.dtype == np.float64


def test_fedavg_server_lr_scales_the_step() -> None:
    params = np.array([1.0, -2.0])
    new = FedAvg(server_lr=0.25).step(params, np.array([4.0, 8.0]), 2.0)
    np.testing.assert_allclose(new, params + 0.25 * np.array([2.0, 4.0]))


@settings(max_examples=30, deadline=None)
@given(
    rounds=st.lists(
        st.tuples(hnp.arrays(np.float64, 5, elements=finite), st.floats(0.5, 100.0)),
        min_size=1, max_size=6,
    ),
    lr=st.floats(0.01, 2.0),
)
def test_fedavgm_momentum_zero_is_fedavg(rounds: list[tuple[np.ndarray, float]], lr: float) -> None:
    a, b = FedAvgM(server_lr=lr, momentum=0.0), FedAvg(server_lr=lr)
    xa = xb = np.linspace(-1, 1, 5)
    for weighted_sum, total in rounds:
        xa, xb = a.step(xa, weighted_sum, total), b.step(xb, weighted_sum, total)
        np.testing.assert_array_equal(xa, xb)


def test_fedavgm_accumulates_momentum() -> None:
    opt = FedAvgM(server_lr=0.5, momentum=0.9)
    x0 = np.zeros(2)
    d1, d2 = np.array([1.0, -1.0]), np.array([0.5, 2.0])
    x1 = opt.step(x0, d1 * 3.0, 3.0)
    x2 = opt.step(x1, d2 * 7.0, 7.0)
    np.testing.assert_allclose(x1, 0.5 * d1)
    np.testing.assert_allclose(x2, x1 + 0.5 * (0.9 * d1 + d2))


@pytest.mark.parametrize(
    ("cls", "second_moment"),
    [
        (FedAdam, lambda v0, d2, b2: b2 * v0 + (1 - b2) * d2),
        (FedYogi, lambda v0, d2, b2: v0 - (1 - b2) * d2 * np.sign(v0 - d2)),
        (FedAdagrad, lambda v0, d2, b2: v0 + d2),
    ],
)
def test_adaptive_rules_match_reddi_et_al(cls: type, second_moment: Any) -> None:
    """Two rounds against Algorithm 2 written out by hand (m_0 = 0, v_0 = tau^2)."""
    lr, b1, b2, tau = 0.3, 0.8, 0.95, 1e-2
    opt = cls(server_lr=lr, beta1=b1, beta2=b2, tau=tau)
    x = np.array([0.5, -1.0, 2.0])
    m, v = np.zeros(3), np.full(3, tau**2)
    for update in (np.array([0.2, -0.4, 0.0]), np.array([-0.1, 0.3, 1e-3])):
        new = opt.step(x, update * 4.0, 4.0)
        m = b1 * m + (1 - b1) * update
        v = second_moment(v, update**2, b2)
        expected = x + lr * m / (np.sqrt(v) + tau)
        np.testing.assert_allclose(new, expected, rtol=1e-12, atol=1e-15)
        x = new


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_steps_follow_the_average_update(name: str) -> None:
    """Sign convention: clients' updates point towards their optimum; the server must follow.

    Each client k pulls towards its own target t_k; the weighted mean of the targets is the
    optimum of the weighted objective, and every optimiser should approach it.
    """
    opt = fresh(name)
    rng = np.random.default_rng(0)
    targets = rng.normal(size=(4, 6))
    weights = np.array([10.0, 20.0, 30.0, 40.0])
    optimum = np.average(targets, axis=0, weights=weights)
    x = np.zeros(6)
    start_gap = np.linalg.norm(x - optimum)
    for _ in range(300):
        updates = 0.5 * (targets - x)  # one local gradient step on 0.5 * |x - t_k|^2
        x = opt.step(x, *aggregate(updates, weights))
    assert np.linalg.norm(x - optimum) < 0.1 * start_gap


def _json_round_trip(state: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(state))


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_state_round_trip_gives_identical_continuation(name: str) -> None:
    rng = np.random.default_rng(1)
    rounds = [(rng.normal(size=8) * 10, float(rng.integers(1, 50))) for _ in range(6)]
    original = fresh(name)
    x = rng.normal(size=8)
    for weighted_sum, total in rounds[:3]:
        x = original.step(x, weighted_sum, total)
    state = _json_round_trip(original.state_dict())
    resumed = type(original)(**original.config())
    resumed.load_state_dict(state)
    assert resumed.num_steps == original.num_steps == 3
    xa = xb = x
    for weighted_sum, total in rounds[3:]:
        xa = original.step(xa, weighted_sum, total)
        xb = resumed.step(xb, weighted_sum, total)
        assert xa.tobytes() == xb.tobytes()
    assert original.state_dict() == resumed.state_dict()


def test_fresh_state_round_trips() -> None:
    opt = FedAdam(server_lr=0.1)
    other = FedAdam(server_lr=0.1)
    other.load_state_dict(_json_round_trip(opt.state_dict()))
    assert other.state_dict() == opt.state_dict()
    assert other.dim is None


def test_fedadam_resume_differs_from_fresh_start() -> None:
    """The restored moments actually matter (guards against a load that silently drops them)."""
    opt = FedAdam(server_lr=0.1)
    x = opt.step(np.zeros(3), np.array([1.0, 2.0, 3.0]), 1.0)
    resumed = FedAdam(server_lr=0.1)
    resumed.load_state_dict(opt.state_dict())
    fresh = FedAdam(server_lr=0.1)
    d = np.array([-1.0, 0.5, 0.0])
    assert not np.array_equal(resumed.step(x, d, 1.0), fresh.step(x, d, 1.0))


# --- invalid inputs leave state unchanged ------------------------------------------------------


def _primed(opt: ServerOptimizer) -> ServerOptimizer:
    opt.step(np.zeros(4), np.array([1.0, -2.0, 3.0, 0.5]), 2.0)
    return opt


bad_steps = [
    ("zero weight", np.zeros(4), np.ones(4), 0.0, AggregationError),
    ("negative weight", np.zeros(4), np.ones(4), -3.0, AggregationError),
    ("nan weight", np.zeros(4), np.ones(4), float("nan"), InputError),
    ("inf weight", np.zeros(4), np.ones(4), float("inf"), InputError),
    ("bool weight", np.zeros(4), np.ones(4), True, InputError),
    ("nan sum", np.zeros(4), np.array([1.0, np.nan, 0.0, 0.0]), 1.0, InputError),
    ("inf sum", np.zeros(4), np.array([1.0, np.inf, 0.0, 0.0]), 1.0, InputError),
    ("nan params", np.array([0.0, np.nan, 0.0, 0.0]), np.ones(4), 1.0, InputError),
    ("shape mismatch", np.zeros(4), np.ones(3), 1.0, InputError),
    ("2-D sum", np.zeros(4), np.ones((2, 2)), 1.0, InputError),
    ("dim changed", np.zeros(5), np.ones(5), 1.0, InputError),
    ("empty", np.zeros(0), np.zeros(0), 1.0, InputError),
    ("complex", np.zeros(4), np.ones(4) * 1j, 1.0, InputError),
    ("overflow", np.full(4, 1.7e308), np.full(4, 1.7e308), 1.0, AggregationError),
    ("tiny weight overflow", np.zeros(4), np.full(4, 1e300), 1e-300, AggregationError),
]


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
@pytest.mark.parametrize(("case", "params", "wsum", "total", "exc"), bad_steps,
                         ids=[c[0] for c in bad_steps])
def test_bad_step_raises_and_leaves_state(
    name: str, case: str, params: np.ndarray, wsum: np.ndarray, total: float, exc: type
) -> None:
    opt = _primed(fresh(name))
    before = opt.state_dict()
    params_copy, wsum_copy = params.copy(), wsum.copy()
    with pytest.raises(exc):
        opt.step(params, wsum, total)
    assert opt.state_dict() == before
    np.testing.assert_array_equal(params, params_copy)
    np.testing.assert_array_equal(wsum, wsum_copy)


@settings(max_examples=60, deadline=None)
@given(
    total=st.one_of(st.floats(max_value=0.0), st.just(float("nan")), st.just(float("-inf"))),
    idx=st.integers(0, 4),
)
def test_any_non_positive_weight_is_refused(total: float, idx: int) -> None:
    opt = _primed(all_optimizers()[idx])
    before = opt.state_dict()
    with pytest.raises((AggregationError, InputError)):
        opt.step(np.zeros(4), np.ones(4), total)
    assert opt.state_dict() == before


def test_average_update() -> None:
    np.testing.assert_allclose(average_update(np.array([2.0, 4.0]), 4), [0.5, 1.0])
    with pytest.raises(AggregationError):
        average_update(np.ones(2), 0)


# --- bad saved state ---------------------------------------------------------------------------


def _mutations() -> list[tuple[str, Any]]:
    def set_(key: str, value: Any) -> Any:
        return lambda s: {**s, key: value}

    return [
        ("wrong format", set_("format", "other")),
        ("future version", set_("version", 2)),
        ("wrong name", set_("name", "fedyogi")),
        ("other config", lambda s: {**s, "config": {**s["config"], "server_lr": 0.5}}),
        ("negative steps", set_("num_steps", -1)),
        ("dim without steps", set_("num_steps", 0)),
        ("wrong dim", set_("dim", 3)),
        ("extra key", lambda s: {**s, "pickle": "no"}),
        ("missing buffer", lambda s: {**s, "buffers": {"first_moment": s["buffers"]["first_moment"]}}),
        ("bad base64", lambda s: {**s, "buffers": {**s["buffers"], "first_moment": "!!notb64"}}),
        ("odd length", lambda s: {**s, "buffers": {**s["buffers"], "first_moment": "AAAA"}}),
        ("nan buffer", lambda s: {**s, "buffers": {**s["buffers"],
                                                   "first_moment": encode_vector(np.full(4, np.nan))}}),
        ("negative v", lambda s: {**s, "buffers": {**s["buffers"],
                                                   "second_moment": encode_vector(-np.ones(4))}}),
        ("not a mapping", lambda s: [s]),
    ]


@pytest.mark.parametrize(("case", "mutate"), _mutations(), ids=[m[0] for m in _mutations()])
def test_bad_state_is_refused_and_nothing_changes(case: str, mutate: Any) -> None:
    source = _primed(FedAdam(server_lr=0.1))
    source.step(np.zeros(4), np.array([0.3, 0.1, -0.2, 0.0]), 1.0)
    target = _primed(FedAdam(server_lr=0.1))
    before = target.state_dict()
    with pytest.raises((InputError, ConfigError)):
        target.load_state_dict(mutate(_json_round_trip(source.state_dict())))
    assert target.state_dict() == before


@settings(max_examples=100, deadline=None)
@given(vec=hnp.arrays(np.float64, st.integers(0, 16),
                      elements=st.floats(allow_nan=False, allow_infinity=False)))
def test_vector_codec_round_trips_exactly(vec: np.ndarray) -> None:
    decoded = decode_vector(encode_vector(vec), length=vec.shape[0])
    assert decoded.tobytes() == vec.astype("<f8").tobytes()


@settings(max_examples=200, deadline=None)
@given(text=st.one_of(st.text(max_size=40), st.binary(max_size=40), st.integers()))
def test_vector_decoder_raises_only_input_error(text: Any) -> None:
    try:
        decode_vector(text)
    except InputError:
        pass


# --- construction ------------------------------------------------------------------------------


def test_registry_builds_each_optimizer() -> None:
    assert set(SERVER_OPTIMIZERS) == {"fedavg", "fedavgm", "fedadagrad", "fedadam", "fedyogi"}
    for name, cls in SERVER_OPTIMIZERS.items():
        kwargs = {} if name in ("fedavg", "fedavgm") else {"server_lr": 0.1}
        opt = make_server_optimizer(name, **kwargs)
        assert isinstance(opt, cls) and opt.name == name
    assert isinstance(make_server_optimizer("FedAdam", server_lr=0.1, beta1=0.5), FedAdam)
    with pytest.raises(TypeError):
        SERVER_OPTIMIZERS["evil"] = FedAvg  # type: ignore[index]


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("sgd", {}),
        ("secfedtl.aggregation.FedAvg", {}),
        ("fedadam", {}),  # server_lr is required for adaptive optimisers
        ("fedavg", {"momentum": 0.9}),
        ("fedavg", {"server_lr": 0.0}),
        ("fedavg", {"server_lr": float("nan")}),
        ("fedavgm", {"momentum": 1.0}),
        ("fedavgm", {"momentum": -0.1}),
        ("fedadam", {"server_lr": 0.1, "beta2": 1.5}),
        ("fedyogi", {"server_lr": 0.1, "tau": 0.0}),
        ("fedyogi", {"server_lr": "0.1"}),
    ],
)
def test_bad_configuration_raises_config_error(name: str, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        make_server_optimizer(name, **kwargs)


def test_constructors_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        FedAvg(0.5)  # type: ignore[misc]
    with pytest.raises(TypeError):
        FedAdam(0.1, 0.9)  # type: ignore[misc]
