"""Tests for secfedtl.data.heart: checksums, FLamby split, standardisation, validation split."""

from __future__ import annotations

import builtins
import hashlib
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secfedtl.data import heart
from secfedtl.data.heart import (
    CENTER_FILES,
    DATA_DIR,
    NUM_FEATURES,
    load_fed_heart_disease,
    standardize,
    validation_split,
    verify_files,
)
from secfedtl.errors import ConfigError, DataError, InputError

EXPECTED_COUNTS = {
    "cleveland": (199, 104),
    "hungary": (172, 89),
    "switzerland": (30, 16),
    "va": (85, 45),
}


@pytest.fixture(scope="module")
def centers() -> dict[str, heart.Center]:
    return load_fed_heart_disease()


def test_bundled_digests_match_the_readme() -> None:
    """The digests in the code are the ones the bundled README lists, and the files match them."""
    readme = (DATA_DIR / "README.md").read_text(encoding="utf-8")
    listed = dict(
        (name, digest)
        for digest, name in re.findall(r"^([0-9a-f]{64})  (processed\.\w+\.data)$", readme, re.M)
    )
    assert len(listed) == 4
    for spec in CENTER_FILES.values():
        assert listed[spec.file_name] == spec.sha256
        data = (DATA_DIR / spec.file_name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == spec.sha256


def test_licence_files_travel_with_the_data() -> None:
    assert "CC BY 4.0" in (DATA_DIR / "README.md").read_text(encoding="utf-8")
    assert "CC BY 4.0" in (DATA_DIR / "NOTICE").read_text(encoding="utf-8")


def test_counts_and_features(centers: dict[str, heart.Center]) -> None:
    assert tuple(centers) == ("cleveland", "hungary", "switzerland", "va")
    for name, (n_train, n_test) in EXPECTED_COUNTS.items():
        c = centers[name]
        assert (c.num_train, c.num_test) == (n_train, n_test)
        assert c.x_train.shape == (n_train, NUM_FEATURES)
        assert c.x_test.shape == (n_test, NUM_FEATURES)
        assert c.x_train.dtype == np.float32 and c.y_train.dtype == np.int64
        assert set(np.unique(np.concatenate([c.y_train, c.y_test]))) <= {0, 1}
        assert len(c.feature_names) == NUM_FEATURES
    assert sum(c.num_train for c in centers.values()) == 486
    assert sum(c.num_test for c in centers.values()) == 254


def test_arrays_are_read_only(centers: dict[str, heart.Center]) -> None:
    with pytest.raises(ValueError):
        centers["va"].x_train[0, 0] = 1.0
    mine = np.zeros((2, NUM_FEATURES), dtype=np.float32)
    c = heart.Center(name="t", x_train=mine, y_train=np.zeros(2, dtype=np.int64), x_test=mine,
                     y_test=np.ones(2, dtype=np.int64), feature_names=heart.FEATURE_NAMES)
    mine[0, 0] = 5.0  # the caller's array stays writable and the centre does not see the change
    assert c.x_train[0, 0] == 0.0


@pytest.mark.parametrize(
    "change",
    [{"x_train": np.zeros((2, 3), dtype=np.float32)},
     {"x_train": np.zeros((2, NUM_FEATURES), dtype=np.float64)},
     {"y_train": np.zeros(3, dtype=np.int64)},
     {"y_train": np.full(2, 2, dtype=np.int64)},
     {"x_test": np.full((2, NUM_FEATURES), np.nan, dtype=np.float32)}],
)
def test_center_rejects_bad_arrays(change: dict[str, np.ndarray]) -> None:
    good = dict(name="t", x_train=np.zeros((2, NUM_FEATURES), dtype=np.float32),
                y_train=np.zeros(2, dtype=np.int64),
                x_test=np.zeros((2, NUM_FEATURES), dtype=np.float32),
                y_test=np.zeros(2, dtype=np.int64), feature_names=heart.FEATURE_NAMES)
    with pytest.raises(InputError):
        heart.Center(**{**good, **change})


def _raw_rows(name: str) -> list[list[str]]:
    text = (DATA_DIR / CENTER_FILES[name].file_name).read_text(encoding="ascii")
    return [line.split(",") for line in text.splitlines()]


def _clean_rows(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Independent re-derivation (no pandas) of the cleaned rows: plain features and labels."""
    feats, labels = [], []
    for row in _raw_rows(name):
        kept = row[:10] + row[13:]
        if "?" in kept:
            continue
        feats.append([float(v) for v in row[:10]])
        labels.append(0 if float(row[13]) == 0 else 1)
    return np.array(feats), np.array(labels)


@pytest.mark.parametrize("name", list(CENTER_FILES))
def test_rows_are_the_cleaned_file_rows(centers: dict[str, heart.Center], name: str) -> None:
    """Train and test rows together are exactly the file's complete rows, features and labels."""
    raw_x, raw_y = _clean_rows(name)
    c = centers[name]
    plain = [0, 1, 3, 4, 5, 7, 8, 9]  # raw columns kept as plain features, in output order
    got = np.concatenate([c.x_train, c.x_test])[:, : len(plain)]
    got_y = np.concatenate([c.y_train, c.y_test])
    want = raw_x[:, plain].astype(np.float32)
    key = lambda x, y: sorted(map(tuple, np.column_stack([x, y]).tolist()))  # noqa: E731
    assert key(got, got_y) == key(want, raw_y)


@pytest.mark.parametrize("name", list(CENTER_FILES))
def test_one_hot_columns_encode_cp_and_restecg(
    centers: dict[str, heart.Center], name: str
) -> None:
    c = centers[name]
    x = np.concatenate([c.x_train, c.x_test])
    names = c.feature_names
    cp = x[:, [names.index(f"cp_{lvl}") for lvl in ("2.0", "3.0", "4.0")]]
    assert set(np.unique(cp)) <= {0.0, 1.0}
    assert (cp.sum(axis=1) <= 1).all()
    restecg = x[:, 11:16]
    # each row has at most one restecg dummy; text levels only in Hungary/Switzerland
    assert (restecg.sum(axis=1) <= 1).all()
    text_levels = x[:, [names.index(n) for n in ("restecg_0", "restecg_1", "restecg_2")]]
    if name in ("hungary", "switzerland"):
        assert (text_levels.sum(axis=1) == 1).all()
    else:
        assert (text_levels == 0).all()


def test_split_is_stratified_where_flamby_stratifies(centers: dict[str, heart.Center]) -> None:
    for name in ("cleveland", "hungary", "va"):
        c = centers[name]
        p_train, p_test = c.y_train.mean(), c.y_test.mean()
        assert abs(p_train - p_test) < 0.02, name


def test_split_is_deterministic(centers: dict[str, heart.Center]) -> None:
    again = load_fed_heart_disease()
    for name, c in centers.items():
        np.testing.assert_array_equal(c.x_train, again[name].x_train)
        np.testing.assert_array_equal(c.y_test, again[name].y_test)


def _copy_files(tmp_path: Path) -> Path:
    for spec in CENTER_FILES.values():
        shutil.copyfile(DATA_DIR / spec.file_name, tmp_path / spec.file_name)
    return tmp_path


def test_copied_files_load(tmp_path: Path, centers: dict[str, heart.Center]) -> None:
    loaded = load_fed_heart_disease(data_dir=_copy_files(tmp_path))
    np.testing.assert_array_equal(loaded["hungary"].x_test, centers["hungary"].x_test)


@pytest.mark.parametrize("name", list(CENTER_FILES))
def test_corrupt_file_raises(tmp_path: Path, name: str) -> None:
    folder = _copy_files(tmp_path)
    path = folder / CENTER_FILES[name].file_name
    data = bytearray(path.read_bytes())
    data[10] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="SHA-256"):
        verify_files(data_dir=folder)
    with pytest.raises(DataError):
        load_fed_heart_disease(data_dir=folder)


def test_missing_file_raises(tmp_path: Path) -> None:
    folder = _copy_files(tmp_path)
    (folder / CENTER_FILES["va"].file_name).unlink()
    with pytest.raises(DataError, match="cannot read"):
        load_fed_heart_disease(data_dir=folder)


def test_missing_extras_raise_data_error(
    monkeypatch: pytest.MonkeyPatch, centers: dict[str, heart.Center]
) -> None:
    real_import = builtins.__import__

    def no_pandas(name: str, *args: object, **kwargs: object) -> object:
        if name.split(".")[0] in ("pandas", "sklearn"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pandas)
    with pytest.raises(DataError, match=r"secfedtl\[data\]"):
        load_fed_heart_disease(engine="pandas")
    # the default engine needs neither
    again = load_fed_heart_disease()
    np.testing.assert_array_equal(again["va"].x_train, centers["va"].x_train)


def test_unknown_engine_is_refused() -> None:
    with pytest.raises(ConfigError):
        load_fed_heart_disease(engine="polars")


def test_numpy_engine_equals_pandas_sklearn_engine(centers: dict[str, heart.Center]) -> None:
    """The dependency-free default reproduces FLamby's pandas/scikit-learn recipe exactly."""
    reference = load_fed_heart_disease(engine="pandas")
    assert tuple(reference) == tuple(centers)
    for name, ref in reference.items():
        got = centers[name]
        assert got.feature_names == ref.feature_names == heart.FEATURE_NAMES
        for field in ("x_train", "y_train", "x_test", "y_test"):
            a, b = getattr(got, field), getattr(ref, field)
            assert a.dtype == b.dtype and a.shape == b.shape
            assert a.tobytes() == b.tobytes(), (name, field)


@settings(max_examples=150, deadline=None)
@given(labels=st.lists(st.integers(0, 1), min_size=4, max_size=400))
def test_numpy_split_matches_sklearn_train_test_split(labels: list[int]) -> None:
    """Same train/test positions as sklearn's train_test_split, stratified or not, any labels."""
    from sklearn.model_selection import train_test_split

    y = np.array(labels, dtype=np.int64)
    want_train, want_test = heart._split_positions(y, train_test_split)
    got_train, got_test = heart._split_positions_numpy(y)
    np.testing.assert_array_equal(got_train, want_train)
    np.testing.assert_array_equal(got_test, want_test)


def test_standardize_uses_only_the_named_centre(centers: dict[str, heart.Center]) -> None:
    scaled, stats = standardize(centers, stats_from="cleveland")
    assert stats.source == "cleveland"
    cle = scaled["cleveland"].x_train.astype(np.float64)
    varying = centers["cleveland"].x_train.std(axis=0) > 0
    np.testing.assert_allclose(cle.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(cle.std(axis=0)[varying], 1.0, rtol=1e-4)
    # constant-in-source columns are centred but not divided by zero
    assert np.isfinite(scaled["hungary"].x_train).all()
    assert (~varying).any()
    # statistics do not depend on any other centre's data
    others_changed = dict(centers)
    va = centers["va"]
    others_changed["va"] = heart.Center(
        name="va",
        x_train=va.x_train * 3 + 7,
        y_train=va.y_train,
        x_test=va.x_test,
        y_test=va.y_test,
        feature_names=va.feature_names,
    )
    _, stats2 = standardize(others_changed, stats_from="cleveland")
    np.testing.assert_array_equal(stats.mean, stats2.mean)
    np.testing.assert_array_equal(stats.scale, stats2.scale)
    # the input is not modified, test rows are scaled with the same statistics
    np.testing.assert_allclose(
        scaled["va"].x_test,
        (va.x_test.astype(np.float64) - stats.mean) / stats.scale,
        rtol=1e-5,
        atol=1e-5,
    )


def test_standardize_rejects_unknown_source(centers: dict[str, heart.Center]) -> None:
    with pytest.raises(ConfigError):
        standardize(centers, stats_from="boston")


def test_logistic_regression_from_cleveland_transfers(centers: dict[str, heart.Center]) -> None:
    """Sanity: a model fitted on Cleveland train only does reasonably on every centre's test."""
    from sklearn.linear_model import LogisticRegression

    scaled, _ = standardize(centers, stats_from="cleveland")
    src = scaled["cleveland"]
    model = LogisticRegression(max_iter=1000).fit(src.x_train, src.y_train)
    for name, c in scaled.items():
        assert model.score(c.x_test, c.y_test) > 0.65, name


@settings(max_examples=50, deadline=None)
@given(
    n=st.integers(min_value=2, max_value=300),
    fraction=st.floats(min_value=0.01, max_value=0.99),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_validation_split_partitions_rows(n: int, fraction: float, seed: int) -> None:
    x = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    y = np.arange(n, dtype=np.int64)
    num_val = max(1, int(round(fraction * n)))
    if num_val >= n:
        with pytest.raises(InputError):
            validation_split(x, y, fraction, seed)
        return
    x_fit, y_fit, x_val, y_val = validation_split(x, y, fraction, seed)
    assert len(y_val) == num_val and len(y_fit) == n - num_val
    assert sorted(np.concatenate([y_fit, y_val]).tolist()) == list(range(n))
    np.testing.assert_array_equal(x_fit[:, 0], y_fit * 3)
    np.testing.assert_array_equal(x_val[:, 0], y_val * 3)
    again = validation_split(x, y, fraction, seed)
    np.testing.assert_array_equal(again[3], y_val)


def test_validation_split_seed_changes_the_split() -> None:
    x = np.zeros((100, 2), dtype=np.float32)
    y = np.arange(100)
    a = validation_split(x, y, 0.2, 1)[3]
    b = validation_split(x, y, 0.2, 2)[3]
    assert not np.array_equal(a, b)


@pytest.mark.parametrize(
    ("fraction", "seed", "exc"),
    [(0.0, 0, ConfigError), (1.0, 0, ConfigError), (float("nan"), 0, ConfigError),
     (0.2, -1, ConfigError), (0.2, 1.5, ConfigError), ("0.2", 0, ConfigError)],
)
def test_validation_split_rejects_bad_config(fraction: object, seed: object, exc: type) -> None:
    with pytest.raises(exc):
        validation_split(np.zeros((10, 2)), np.zeros(10), fraction, seed)  # type: ignore[arg-type]


def test_validation_split_rejects_mismatched_rows() -> None:
    with pytest.raises(InputError):
        validation_split(np.zeros((10, 2)), np.zeros(9), 0.2, 0)
