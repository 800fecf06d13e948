"""Tests for secfedtl.federated.centring: the DP feature-mean task over secure aggregation."""

from __future__ import annotations

import numpy as np
import pytest

from secfedtl.aggregation import make_server_optimizer
from secfedtl.errors import AggregationError
from secfedtl.privacy.budget import BudgetGuard, PrivacyBudget
from secfedtl.privacy.ledger import Ledger, spent_events
from secfedtl.federated import wire
from secfedtl.federated.centring import secure_feature_mean
from secfedtl.federated.statistic import FeatureMean, StatisticTask
from secfedtl.federated.federation import Federation
from secfedtl.federated.node import ClientNode
from secfedtl.runtime.pool import LocalPool
from secfedtl.federated.roster import Roster
from secfedtl.transfer.centring import MeanMechanism

DELTA = 1e-5


def _federation(tmp_path, parts, mechanism, *, epsilon=1.0):
    ledger = Ledger(tmp_path / "ledger.jsonl")
    nodes = {}
    roster, keys = Roster.generate([f"c{k}" for k in range(len(parts))])
    for k, x in enumerate(parts):
        name = f"c{k}"
        guard = BudgetGuard(client=name, budget=PrivacyBudget(epsilon=epsilon, delta=DELTA), ledger=ledger)
        task = StatisticTask(FeatureMean(mechanism), data=x, guard=guard)
        nodes[name] = ClientNode(name=name, tasks={"mean": task}, seed=k, identity=keys[name], roster=roster)
    server = Federation(pool=LocalPool(nodes), roster=roster, names=["mean"], global_params=np.zeros(1),
                        optimizer=make_server_optimizer("fedavg", server_lr=1.0), bits=32, max_samples=1000, seed=0)
    return server, ledger


def _unit_rows(rng, n, centre):
    x = centre + 0.3 * rng.standard_normal((n, len(centre)))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_secure_mean_is_close_to_the_pooled_mean_and_every_client_is_charged_once(tmp_path):
    rng = np.random.default_rng(0)
    centre = np.array([0.8, 0.6, 0.0, 0.0])
    parts = [_unit_rows(rng, n, centre) for n in (300, 400, 500)]
    mech = MeanMechanism(dim=4, noise_multiplier=5.0)
    server, ledger = _federation(tmp_path, parts, mech)
    mean, record = secure_feature_mean(server, mech, round=0, max_samples=1000)
    true = np.vstack(parts).mean(axis=0)
    # noise per coordinate of the sum: sqrt(3) * 5 * sqrt(2) ~ 12, over a count of 1200
    assert np.abs(mean - true).max() < 0.06
    assert record["status"] == "ok" and sorted(record["included"]) == ["c0", "c1", "c2"]
    assert abs(record["noisy_count"] - 1200) < 80
    spent = spent_events(Ledger(tmp_path / "ledger.jsonl").entries)
    assert {n: [e for _, e, _ in evs] for n, evs in spent.items()} == {f"c{k}": [mech.event()] for k in range(3)}


def test_a_request_for_another_mechanism_is_refused_before_spending(tmp_path):
    rng = np.random.default_rng(1)
    mech = MeanMechanism(dim=3, noise_multiplier=5.0)
    guard = BudgetGuard(client="a", budget=PrivacyBudget(epsilon=1.0, delta=DELTA), ledger=Ledger(tmp_path / "l.jsonl"))
    roster, keys = Roster.generate(["a", "b", "c"])
    node = ClientNode(name="a", tasks={"mean": StatisticTask(FeatureMean(mech), data=_unit_rows(rng, 10, np.ones(3)),
                                                             guard=guard)},
                      identity=keys["a"], roster=roster)
    encoding = {"clip": 2000.0, "bits": 32, "num_clients": 3, "max_weight": 1}
    cheaper = {**mech.options(), "noise_multiplier": 0.5}
    for round, options in enumerate(({"mechanism": cheaper, "encoding": encoding}, {"encoding": encoding})):
        request = wire.TaskRequest.with_weights(round=round, task="mean", weights=np.zeros(0), options=options)
        [reply] = node.handle(wire.encode(request))
        assert wire.decode(reply).status == "failed"
    assert guard.budget.events == ()
    request = wire.TaskRequest.with_weights(round=2, task="mean", weights=np.zeros(0),
                                            options={"mechanism": mech.options(), "encoding": encoding})
    [reply] = node.handle(wire.encode(request))
    assert wire.decode(reply).status == "ready"
    assert guard.budget.events == (mech.event(),)


def test_clients_without_budget_refuse_and_the_mean_fails_cleanly(tmp_path):
    rng = np.random.default_rng(2)
    mech = MeanMechanism(dim=3, noise_multiplier=1.0)  # epsilon far above 0.3
    server, _ = _federation(tmp_path, [_unit_rows(rng, 20, np.ones(3)) for _ in range(3)], mech, epsilon=0.3)
    with pytest.raises(AggregationError):
        secure_feature_mean(server, mech, round=0, max_samples=1000)
