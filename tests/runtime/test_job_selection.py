"""The heart job's DP source selection: config schema, the ``select`` secure round, its ledger
entries, training calibrated after it, resume, and a node that refuses other candidates."""

from __future__ import annotations

import json

import numpy as np
import pytest

from secfedtl.errors import ConfigError
from secfedtl.privacy.accountants import compute_epsilon
from secfedtl.privacy.ledger import Ledger, read_verified_ledger, spent_events
from secfedtl.federated import wire
from secfedtl.jobs.heart import (
    HeartConfig,
    build_job,
    build_selection_node,
    build_source,
    open_hospital_state,
    planned_prior_events,
    run_job,
    selection_mechanism,
    selection_options,
)
from secfedtl.federated.roster import Roster
from secfedtl.transfer.models import state_hash

CANDIDATES = [{"kind": "mlp", "hidden": 8}, {"kind": "linear", "weight_decay": 0.1}]


def config_with(selection: dict | None = None, **overrides: object) -> HeartConfig:
    data = HeartConfig.load(None).to_dict()
    data["job"]["rounds"] = 1
    data["privacy"]["personalise"] = False
    data["model"]["source_epochs"] = 40
    data["job"]["id"] = "selection-test"
    if selection is not None:
        data["selection"] = selection
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        data[section][key] = value
    return HeartConfig.from_mapping(data)


def selection(**changes: object) -> dict:
    return {"epsilon": 0.3, "loss_clip": 2.0, "candidates": [dict(c) for c in CANDIDATES], **changes}


def test_selection_section_is_optional_and_completed_from_model():
    assert "selection" not in config_with().sections
    model = {"model__hidden": 32, "model__source_weight_decay": 0.1}
    assert config_with(**model, model__kind="linear").source_specs() == [
        {"kind": "linear", "hidden": 0, "weight_decay": 0.1}]
    assert config_with(**model, model__kind="mlp").source_specs() == [{"kind": "mlp", "hidden": 32, "weight_decay": 0.1}]
    cfg = config_with(selection(), **model)
    assert cfg.source_specs() == [{"kind": "mlp", "hidden": 8, "weight_decay": 0.1},
                                  {"kind": "linear", "hidden": 0, "weight_decay": 0.1}]
    assert HeartConfig.from_mapping(cfg.to_dict()).source_specs() == cfg.source_specs()  # config.json round trip


@pytest.mark.parametrize(
    "bad",
    [
        selection(candidates=[]),
        selection(candidates=[{"kind": "cnn"}]),
        selection(candidates=[{"hidden": 8}]),
        selection(candidates=[{"kind": "mlp", "depth": 2}]),
        selection(candidates=[{"kind": "mlp", "hidden": 0}]),
        selection(candidates=[{"kind": "mlp", "hidden": "8"}]),
        selection(candidates=[{"kind": "linear", "weight_decay": -1.0}]),
        selection(candidates=["mlp"]),
        selection(epsilon=1.0),
        selection(epsilon=0.0),
        selection(loss_clip=0.0),
        {"epsilon": 0.3, "candidates": CANDIDATES},
    ],
)
def test_bad_selection_sections_are_refused(bad):
    with pytest.raises(ConfigError):
        config_with(bad)


def test_selection_epsilon_below_the_rdp_floor_is_a_config_error():
    with pytest.raises(ConfigError, match="cannot be met"):
        selection_mechanism(config_with(selection(epsilon=0.05)))


def test_linear_source_is_logistic_regression():
    cfg = config_with(**{"model__kind": "linear"})
    source = build_source(cfg)
    assert [n for n, p in source.model.named_parameters()] == ["head.weight", "head.bias"]
    assert source.model.head.weight.shape == (2, 16)
    # inputs that are constant at the source start at weight 0 (the hospitals may learn them)
    assert source.info["constant_inputs_zeroed"] == 3
    with pytest.raises(ConfigError):
        config_with(**{"model__kind": "tree"})


def test_job_selects_with_dp_then_trains_within_the_budget(tmp_path):
    cfg = config_with(selection())
    metrics = run_job(cfg, tmp_path, progress=False)
    record = json.loads((tmp_path / "selection.json").read_text())
    assert metrics["server"]["selection"] == record
    assert record["status"] == "ok" and sorted(record["included"]) == sorted(cfg["job"]["clients"])
    assert 0 <= record["index"] < len(CANDIDATES)
    assert metrics["server"]["source"]["spec"] == cfg.source_specs()[record["index"]]
    mech = selection_mechanism(cfg)
    assert record["noise_multiplier"] == mech.noise_multiplier
    for name in cfg["job"]["clients"]:
        entries, _ = read_verified_ledger(metrics["simulation_only"]["ledgers"][name])
        mine = [e for e in entries if e["client"] == name and e["status"] == "pending"]
        # the selection entry comes first, then one training round
        assert [e["release"] for e in mine] == ["selection_statistics", "dpsgd_update"]
        assert (mine[0]["sample_rate"], mine[0]["steps"], mine[0]["noise_multiplier"]) == (1.0, 1, mech.noise_multiplier)
        events = [event for _, event, _ in spent_events(entries)[name]]
        assert events[0] == mech.event()
        spent = compute_epsilon(events, cfg["privacy"]["delta"], "rdp")
        assert spent <= cfg["privacy"]["epsilon"]
        assert spent == pytest.approx(metrics["simulation_only"]["final"]["epsilon"][name])
        # training was calibrated with the selection counted: it used (nearly) all of the rest
        assert spent > cfg["privacy"]["epsilon"] - 0.02
    assert metrics["server"]["rounds"][0]["status"] == "ok"


def test_resume_reuses_the_selection(tmp_path):
    cfg = config_with(selection(), **{"job__rounds": 2})
    job = build_job(cfg, tmp_path)
    job.federation.run(1, checkpoint=tmp_path / "checkpoint.json")
    job.close()
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    first = json.loads((tmp_path / "selection.json").read_text())
    resumed = build_job(cfg, tmp_path, resume=True)
    assert resumed.selection == first
    assert resumed.federation.rounds_done == 1
    selects = []
    for state in resumed.states.values():
        entries, _ = read_verified_ledger(state.ledger.path)
        selects += [e for e in entries if e["status"] == "pending" and e["release"] == "selection_statistics"]
    assert len(selects) == len(cfg["job"]["clients"])  # not run again
    # the training noise does not change on resume: it is calibrated from public values alone
    assert [c.noise_multiplier for c in resumed.clients.values()] == [c.noise_multiplier for c in job.clients.values()]
    resumed.close()


def test_planned_prior_events_only_with_selection():
    assert planned_prior_events(config_with()) == []
    cfg = config_with(selection())
    assert planned_prior_events(cfg) == [selection_mechanism(cfg).event()]


def _select_request(cfg: HeartConfig, sources, round: int = 0, **option_changes) -> bytes:
    mech = selection_mechanism(cfg)
    options = {"candidates": [state_hash(c.model) for c in sources], "mechanism": selection_options(mech),
               "encoding": {"clip": 5000.0, "bits": 32, "num_clients": 3, "max_weight": 1}, **option_changes}
    return wire.encode(wire.TaskRequest.with_weights(round=round, task="select", weights=np.zeros(0), options=options))


ROSTER, KEYS = Roster.generate(["hungary", "switzerland", "va"])


def test_select_node_refuses_other_candidates_or_mechanism_before_spending(tmp_path):
    cfg = config_with(selection())
    candidates = [build_source(cfg, spec) for spec in cfg.source_specs()]
    state = open_hospital_state(cfg, "hungary", candidates[0].centres, tmp_path)
    node = build_selection_node(cfg, "hungary", candidates, state, identity=KEYS["hungary"], roster=ROSTER)
    for round, changes in enumerate(({"candidates": ["0" * 64, "1" * 64]},
                                     {"mechanism": {**selection_options(selection_mechanism(cfg)),
                                                    "noise_multiplier": 0.5}})):
        [reply] = node.handle(_select_request(cfg, candidates, round, **changes))
        assert wire.decode(reply).status == "failed"
    assert Ledger(tmp_path / "hungary" / "ledger.jsonl").entries == []
    [reply] = node.handle(_select_request(cfg, candidates, 2))
    assert wire.decode(reply).status == "ready"
    assert [e["params"]["task"] for e in Ledger(tmp_path / "hungary" / "ledger.jsonl").entries
            if e["status"] == "pending"] == ["select"]


def test_select_node_refuses_when_the_budget_is_spent(tmp_path):
    cfg = config_with(selection(epsilon=0.6), **{"privacy__epsilon": 0.7})
    candidates = [build_source(cfg, spec) for spec in cfg.source_specs()]
    state = open_hospital_state(cfg, "va", candidates[0].centres, tmp_path)
    node = build_selection_node(cfg, "va", candidates, state, identity=KEYS["va"], roster=ROSTER)
    [reply] = node.handle(_select_request(cfg, candidates))
    assert wire.decode(reply).status == "ready"
    before = (tmp_path / "va" / "ledger.jsonl").read_bytes()
    [reply] = node.handle(_select_request(cfg, candidates, 1))  # the node releases its selection once
    assert wire.decode(reply).status == "failed"
    assert (tmp_path / "va" / "ledger.jsonl").read_bytes() == before
    state.close()
    # a restarted node has forgotten that; its budget guard has not: a second selection would exceed 0.7
    node = build_selection_node(cfg, "va", candidates, open_hospital_state(cfg, "va", candidates[0].centres, tmp_path),
                                identity=KEYS["va"], roster=ROSTER)
    [reply] = node.handle(_select_request(cfg, candidates, 1))
    assert wire.decode(reply).status == "refused"
    assert wire.decode(reply).info == {"reason": "budget"}  # no projected epsilon or other detail
    assert (tmp_path / "va" / "ledger.jsonl").read_bytes() == before
