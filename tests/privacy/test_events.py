"""Tests for secfedtl.privacy.events."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secfedtl.errors import AccountingError
from secfedtl.privacy.events import EVENT_TYPES, PoissonGaussianEvent, event_from_dict

events = st.builds(
    PoissonGaussianEvent,
    sample_rate=st.floats(min_value=1e-6, max_value=1.0, exclude_min=False),
    noise_multiplier=st.floats(min_value=1e-3, max_value=1e4),
    steps=st.integers(min_value=1, max_value=10**7),
)


@given(events)
@settings(max_examples=50)
def test_dict_round_trip_through_json(event: PoissonGaussianEvent) -> None:
    data = json.loads(json.dumps(event.to_dict()))
    assert event_from_dict(data) == event


@pytest.mark.parametrize(
    ("sample_rate", "noise_multiplier", "steps"),
    [
        (0.0, 1.0, 1),
        (-0.1, 1.0, 1),
        (1.0000001, 1.0, 1),
        (math.nan, 1.0, 1),
        (0.1, 0.0, 1),
        (0.1, -1.0, 1),
        (0.1, math.inf, 1),
        (0.1, math.nan, 1),
        (0.1, 1.0, 0),
        (0.1, 1.0, -3),
        (0.1, 1.0, 1.5),
        (0.1, 1.0, True),
        (True, 1.0, 1),
        ("0.1", 1.0, 1),
    ],
)
def test_invalid_events_raise(sample_rate: object, noise_multiplier: object, steps: object) -> None:
    with pytest.raises(AccountingError):
        PoissonGaussianEvent(sample_rate=sample_rate, noise_multiplier=noise_multiplier, steps=steps)  # type: ignore[arg-type]


def test_event_is_frozen_keyword_only_and_normalised() -> None:
    event = PoissonGaussianEvent(sample_rate=1, noise_multiplier=2, steps=3)
    assert isinstance(event.sample_rate, float) and isinstance(event.noise_multiplier, float)
    assert event == PoissonGaussianEvent(sample_rate=1.0, noise_multiplier=2.0, steps=3)
    assert event.mechanism == "poisson_gaussian"
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.steps = 4  # type: ignore[misc]
    with pytest.raises(TypeError):
        PoissonGaussianEvent(0.1, 1.0, 1)  # type: ignore[misc]


@pytest.mark.parametrize(
    "data",
    [
        {"mechanism": "os.system", "sample_rate": 0.1, "noise_multiplier": 1.0, "steps": 1},
        {"mechanism": "gaussian", "sample_rate": 0.1, "noise_multiplier": 1.0, "steps": 1},
        {"sample_rate": 0.1, "noise_multiplier": 1.0, "steps": 1},
        {"mechanism": "poisson_gaussian", "sample_rate": 0.1, "noise_multiplier": 1.0},
        {
            "mechanism": "poisson_gaussian",
            "sample_rate": 0.1,
            "noise_multiplier": 1.0,
            "steps": 1,
            "extra": 1,
        },
        {"mechanism": "poisson_gaussian", "sample_rate": 2, "noise_multiplier": 1.0, "steps": 1},
        ["poisson_gaussian"],
    ],
)
def test_event_from_bad_dict_raises(data: object) -> None:
    with pytest.raises(AccountingError):
        event_from_dict(data)  # type: ignore[arg-type]


def test_registry_is_fixed() -> None:
    from secfedtl.privacy.events import PoissonSkellamEvent

    assert dict(EVENT_TYPES) == {"poisson_gaussian": PoissonGaussianEvent, "poisson_skellam": PoissonSkellamEvent}
