"""Record-stable splits: adding or removing a record moves only that record."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secfedtl.data import record_split, split_key
from secfedtl.errors import ConfigError, InputError


def _rows(fit_x: np.ndarray, val_x: np.ndarray) -> tuple[set, set]:
    return {r.tobytes() for r in fit_x}, {r.tobytes() for r in val_x}


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), extra=st.integers(0, 2**31))
def test_adding_a_record_moves_only_that_record(seed, extra):
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(60, 5)), rng.integers(0, 2, 60)
    key = split_key(seed % 1000)
    fit, val = _rows(*record_split(x, y, 0.3, key)[::2])
    new = np.random.default_rng(extra).normal(size=(1, 5)) + 100.0  # not a copy of an existing row
    x2, y2 = np.concatenate([x, new]), np.concatenate([y, [1]])
    fit2, val2 = _rows(*record_split(x2, y2, 0.3, key)[::2])
    assert fit <= fit2 and val <= val2  # nothing moved
    assert len(fit2 - fit) + len(val2 - val) == 1  # only the new record is new
    # removing it again gives back exactly the first split
    assert _rows(*record_split(x, y, 0.3, key)[::2]) == (fit, val)


def test_fraction_and_key_shape_the_split():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(2000, 3)), rng.integers(0, 2, 2000)
    _, _, xv, _ = record_split(x, y, 0.2, split_key(0))
    assert 300 < len(xv) < 500
    _, _, xv2, _ = record_split(x, y, 0.2, split_key(1))
    assert not np.array_equal(xv, xv2)
    assert split_key(0, "validation") != split_key(0, "test")


def test_bad_input():
    x, y = np.zeros((4, 2)), np.zeros(4)
    with pytest.raises(ConfigError):
        record_split(x, y, 1.0, split_key(0))
    with pytest.raises(ConfigError):
        record_split(x, y, 0.5, b"short")
    with pytest.raises(InputError):
        record_split(x, np.zeros(3), 0.5, split_key(0))
    with pytest.raises(InputError):  # identical rows share a split: one side is empty
        record_split(x, y, 0.5, split_key(0))
    with pytest.raises(ConfigError):
        split_key(-1)
