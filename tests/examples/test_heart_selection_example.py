"""examples/heart_selection: the bundled defaults come from the public tuning procedure
(tune_on_source.py, on Cleveland's training rows only), and selection.toml follows the schema."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from secfedtl.data import load_fed_heart_disease, record_split, split_key
from secfedtl.jobs.heart import HeartConfig

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "heart_selection"


@pytest.fixture(scope="module")
def tune():
    spec = importlib.util.spec_from_file_location("heart_tune_on_source", EXAMPLE / "tune_on_source.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cleveland(tune):
    return tune.cleveland_train()


def _rows(x: np.ndarray) -> set[bytes]:
    return {np.ascontiguousarray(r).tobytes() for r in x}


def test_selection_toml_parses_and_matches_the_defaults_outside_selection() -> None:
    selection = HeartConfig.load(EXAMPLE / "selection.toml")
    default = HeartConfig.load(None)
    assert "selection" in selection.sections and "selection" not in default.sections
    assert selection["declared"] == default["declared"]
    for section in ("job", "privacy", "model", "training", "server", "secagg"):
        assert selection[section] == default[section], section


def test_bundled_defaults_are_the_public_tuning_result() -> None:
    chosen = json.loads((EXAMPLE / "tune_on_source.json").read_text(encoding="utf-8"))["chosen"]
    default = HeartConfig.load(None)
    for section, values in chosen.items():
        for key, value in values.items():
            assert default[section][key] == value, (section, key)
    assert default["privacy"]["epsilon"] == 1.0 and default["privacy"]["delta"] == 1e-5


def test_tuning_data_is_cleveland_train_only(tune, cleveland) -> None:
    x, y, names = cleveland
    raw = load_fed_heart_disease()["cleveland"]
    assert x.shape == raw.x_train.shape and np.array_equal(y, raw.y_train)
    public = _rows(x)
    for repeat in range(3):
        centres = tune.pseudo_centres(x, y, names, repeat=repeat, source_fraction=0.5, validation_fraction=0.2)
        assert set(centres) == {"pseudo_source", *tune.PSEUDO}
        for centre in centres.values():
            assert _rows(centre.x_train) <= public and _rows(centre.x_test) <= public


def test_pseudo_hospitals_have_the_declared_counts_and_disjoint_validation(tune, cleveland) -> None:
    x, y, names = cleveland
    for repeat in range(3):
        centres = tune.pseudo_centres(x, y, names, repeat=repeat, source_fraction=0.5, validation_fraction=0.2)
        source = _rows(centres["pseudo_source"].x_train)
        validation: set[bytes] = set()
        fit: set[bytes] = set()
        for name, (_, declared) in tune.PSEUDO.items():
            c = centres[name]
            # the job's own record-stable split gives the pseudo-hospital exactly its declared fit count
            xf, _, xv, yv = record_split(c.x_train, c.y_train, 0.2, split_key(repeat))
            assert len(xf) == declared
            assert np.array_equal(xv, c.x_test) and np.array_equal(yv, c.y_test)
            assert not _rows(xv) & validation  # each validation row belongs to one pseudo-hospital
            validation |= _rows(xv)
            fit |= _rows(xf)
        assert not source & validation and not fit & validation


def test_one_pseudo_federated_job_runs_the_dp_pipeline(tune, cleveland) -> None:
    result = tune.run_once(tune.START, 0, cleveland, 0.5)
    assert 0.9 < result["epsilon"] <= 1.0 + 1e-9  # the job spends (nearly) its whole budget, never more
    for key in ("source", "global", "personalised"):
        assert 0.0 <= result[key] <= 1.0
    assert result["score"] == pytest.approx((result["global"] + result["personalised"]) / 2)


def test_bundled_distributed_job_is_its_public_tuning_result() -> None:
    """secfedtl/configs/heart_distributed.toml holds what tune_on_source.py --noise distributed
    --label-shift chose (examples/heart_distributed/tuned_distributed.json), with heart.toml's
    source model; tuned_local.json (--side-by-side) searched the same settings from the same start."""
    tuned = json.loads((ROOT / "examples" / "heart_distributed" / "tuned_distributed.json").read_text(encoding="utf-8"))
    assert tuned["noise"] == "distributed" and tuned["label_shift"] is True
    bundled = HeartConfig.load_bundled("heart_distributed.toml")
    for section, values in tuned["chosen"].items():
        for key, value in values.items():
            assert bundled[section][key] == value, (section, key)
    default = HeartConfig.load(None)
    assert bundled["model"] == default["model"] and bundled["declared"] == default["declared"]
    assert bundled["privacy"]["epsilon"] == 1.0 and bundled["privacy"]["delta"] == 1e-5
    local = json.loads((ROOT / "examples" / "heart_distributed" / "tuned_local.json").read_text(encoding="utf-8"))
    assert local["noise"] == "local" and local["side_by_side"] and local["label_shift"]
    assert {k: v for k, v in local["start"].items() if k != "privacy"} == {
        k: v for k, v in tuned["start"].items() if k != "privacy"}
    assert local["chosen"]["model"] == tuned["chosen"]["model"]
