"""secfedtl.secagg.simulate (and the round it drives): under every dropout pattern at every
phase the unmasked sum is exactly the modular sum of the included clients' field vectors, or
the round raises TooFewSurvivorsError; the dequantised total is within the error bound."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secfedtl.errors import InputError, TooFewSurvivorsError
from secfedtl.secagg import PHASES, SecAggConfig, simulate
from secfedtl.testing.harness import expected_field_sum, make_round, run_round
from secfedtl.testing.strategies import dropout_maps

CONFIGS = [
    dict(num_clients=7, threshold=4, neighbours=None),
    dict(num_clients=8, threshold=3, neighbours=4),
    dict(num_clients=8, threshold=2, neighbours=3),
]


def _included_expected(dropouts, n):
    """Clients whose masked input was sent: silent no earlier than 'consistency'."""
    return {i for i in range(n) if PHASES.index(dropouts.get(i, "unmask")) >= PHASES.index("consistency")
            or i not in dropouts}


@pytest.mark.parametrize("auth", [False, True])
@pytest.mark.parametrize("base", CONFIGS, ids=lambda c: f"n{c['num_clients']}k{c['neighbours']}")
@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_field_sum_is_exact_under_every_dropout_pattern(base, auth, data):
    cfg = SecAggConfig(**base, bits=data.draw(st.sampled_from([20, 32, 64])), authenticated=auth)
    drops = data.draw(dropout_maps(cfg.num_clients, max_dropouts=3))
    rnd = make_round(cfg, vector_length=5, seed=data.draw(st.integers(0, 1000)))
    try:
        res = run_round(rnd, drops)
    except TooFewSurvivorsError:
        return
    included = set(res.included)
    # exactly the clients that sent masked inputs and did not refuse before doing so
    assert included <= _included_expected(drops, cfg.num_clients)
    assert len(included) >= cfg.min_survivors
    expect = expected_field_sum(rnd.vectors, res.included, cfg.bits)
    np.testing.assert_array_equal(res.field_sum.astype(np.uint64), expect)


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("base", CONFIGS, ids=lambda c: f"n{c['num_clients']}k{c['neighbours']}")
def test_one_dropout_at_each_phase(base, phase):
    cfg = SecAggConfig(**base, bits=32)
    rnd = make_round(cfg, vector_length=3, seed=1)
    try:
        res = run_round(rnd, {2: phase})
    except TooFewSurvivorsError:
        pytest.skip("this graph cannot lose client 2")
    assert (2 in res.included) == (PHASES.index(phase) >= PHASES.index("consistency"))
    np.testing.assert_array_equal(res.field_sum.astype(np.uint64),
                                  expected_field_sum(rnd.vectors, res.included, 32))


def _float_reference(inputs, cfg, included):
    m = inputs[0].size
    ref = [Fraction(0)] * m
    for i in included:
        for j in range(m):
            ref[j] += Fraction(float(np.clip(inputs[i][j], -cfg.clip, cfg.clip)))
    return ref


@pytest.mark.parametrize("neighbours,threshold,auth", [(None, 11, False), (6, 4, True), (6, 4, False)])
@settings(max_examples=6, deadline=None)
@given(drops=dropout_maps(20, max_dropouts=4), seed=st.integers(0, 2**16))
def test_simulate_public_contract(neighbours, threshold, auth, drops, seed):
    cfg = SecAggConfig(num_clients=20, threshold=threshold, neighbours=neighbours, clip=1.0, bits=32,
                       authenticated=auth)
    rng = np.random.default_rng(seed)
    inputs = [rng.uniform(-1.5, 1.5, 4) for _ in range(20)]
    try:
        res = simulate(inputs, cfg, dropouts=drops, seed=seed)
    except TooFewSurvivorsError:
        return
    assert isinstance(res.total, np.ndarray) and res.total.dtype == np.float64
    assert isinstance(res.included, tuple) and list(res.included) == sorted(res.included)
    assert set(res.included) <= _included_expected(drops, 20)
    assert set(res.included).isdisjoint(res.refused)
    assert res.weight_total == len(res.included)
    # the exact modular sum of the encodings simulate made (same rng, client order)
    enc_rng = np.random.default_rng(seed)
    encoded = [cfg.encoding.encode(x, rng=enc_rng) for x in inputs]
    np.testing.assert_array_equal(res.field_sum.astype(np.uint64),
                                  expected_field_sum(encoded, res.included, 32))
    ref = _float_reference(inputs, cfg, res.included)
    assert res.error_bound == cfg.encoding.error_bound(len(res.included))
    for j, r in enumerate(ref):
        assert abs(Fraction(float(res.total[j])) - r) <= Fraction(res.error_bound)


def test_simulate_example_from_the_docs():
    cfg = SecAggConfig(num_clients=20, threshold=11, neighbours=None, clip=1.0, bits=32)
    inputs = [np.full(3, 0.01 * (i + 1)) for i in range(20)]
    res = simulate(inputs, cfg, dropouts={3: "mask", 7: "unmask"}, seed=0)
    assert res.included == tuple(i for i in range(20) if i != 3)
    expect = sum(0.01 * (i + 1) for i in res.included)
    np.testing.assert_allclose(res.total, expect, atol=res.error_bound)


def test_too_few_survivors_at_every_phase():
    cfg = SecAggConfig(num_clients=5, threshold=3, neighbours=None)
    inputs = [np.zeros(2)] * 5
    for phase in PHASES:
        with pytest.raises(TooFewSurvivorsError):
            simulate(inputs, cfg, dropouts={0: phase, 1: phase, 2: phase}, seed=0)


def test_simulate_rejects_bad_arguments():
    cfg = SecAggConfig(num_clients=4, threshold=3)
    good = [np.zeros(2)] * 4
    with pytest.raises(InputError):
        simulate(good[:3], cfg)
    with pytest.raises(InputError):
        simulate([np.zeros(2)] * 3 + [np.zeros(3)], cfg)
    with pytest.raises(InputError):
        simulate(good, cfg, dropouts={9: "mask"})
    with pytest.raises(InputError):
        simulate(good, cfg, dropouts={1: "lunch"})
    with pytest.raises(InputError):
        simulate(good, cfg, weights=[1, 1])
