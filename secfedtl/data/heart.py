"""Fed-Heart-Disease (FLamby), rebuilt offline from the bundled UCI Heart Disease files.

The four "processed" files of the UCI *Heart Disease* data set (CC BY 4.0; attribution and
provenance in ``files/uci_heart_disease/README.md``) ship with secfedtl. Each file is one centre of
the FLamby benchmark *Fed-Heart-Disease*. :func:`load_fed_heart_disease` checks every file's SHA-256
before reading it and reproduces FLamby's per-centre train/test split and its 16 pooled features:

1. read with no header, ``?`` -> missing;
2. drop columns 10-12 (``slope``, ``ca``, ``thal``), then every row that still has a missing value;
3. label = 0 if ``num`` is 0 else 1;
4. ``sklearn.model_selection.train_test_split`` of the row positions, train fraction 0.66,
   ``random_state=43``, stratified on the label when both classes have more than 2 members;
5. pool the centres (Cleveland, Hungarian, Switzerland, VA) and one-hot encode ``cp`` and
   ``restecg`` with ``pandas.get_dummies(drop_first=True)``. Because ``restecg`` is read as text in
   the Hungarian and Switzerland files, text and numeric levels are distinct categories, which is
   why FLamby's model has 16 inputs (8 plain + 3 ``cp`` + 5 ``restecg``). We keep that quirk.

No scaling is part of the data set. :func:`standardize` scales every centre with the statistics of
one *named* centre's training split -- by default Cleveland, the long-public UCI set that plays the
transfer "source" -- so no private hospital's statistics leave it. :func:`validation_split` holds
out validation rows from a training split; tuning must never look at the test splits.

pandas and scikit-learn are needed only here, through the optional extra ``secfedtl[data]``;
without them :func:`load_fed_heart_disease` raises :class:`~secfedtl.errors.DataError`.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Mapping

import numpy as np

from secfedtl.errors import ConfigError, DataError, InputError

__all__ = [
    "CENTER_NAMES",
    "Center",
    "CenterFile",
    "CENTER_FILES",
    "DATA_DIR",
    "FeatureStats",
    "feature_stats",
    "NUM_FEATURES",
    "TRAIN_FRACTION",
    "SPLIT_RANDOM_STATE",
    "load_fed_heart_disease",
    "standardize",
    "validation_split",
    "verify_files",
]

DATA_DIR: Path = Path(__file__).resolve().parent / "files" / "uci_heart_disease"
"""Folder of the bundled UCI files, their README (attribution, provenance) and NOTICE."""

TRAIN_FRACTION: float = 0.66
SPLIT_RANDOM_STATE: int = 43
NUM_FEATURES: int = 16

_DROPPED_COLUMNS: tuple[int, ...] = (10, 11, 12)
_LABEL_COLUMN: int = 13
_ONE_HOT_COLUMNS: tuple[int, ...] = (2, 6)
_COLUMN_NAMES: dict[int, str] = {
    0: "age",
    1: "sex",
    2: "cp",
    3: "trestbps",
    4: "chol",
    5: "fbs",
    6: "restecg",
    7: "thalach",
    8: "exang",
    9: "oldpeak",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class CenterFile:
    """One bundled centre file: its name, SHA-256 and the counts the split must produce."""

    file_name: str
    sha256: str
    num_rows_clean: int
    num_train: int
    num_test: int


CENTER_FILES: dict[str, CenterFile] = {
    "cleveland": CenterFile(
        file_name="processed.cleveland.data",
        sha256="a74b7efa387bc9d108d7d0115d831fe9b414b29ae7124f331b622b4efa0427c8",
        num_rows_clean=303,
        num_train=199,
        num_test=104,
    ),
    "hungary": CenterFile(
        file_name="processed.hungarian.data",
        sha256="d1ad108f785768cd3d7e82dc522e6f5a61eea93cccfb3a46ee8076f73fc3d796",
        num_rows_clean=261,
        num_train=172,
        num_test=89,
    ),
    "switzerland": CenterFile(
        file_name="processed.switzerland.data",
        sha256="834a405ccf5b66ab4056bb77794adc8df0b7125186454c0a1d002d33c6c3b314",
        num_rows_clean=46,
        num_train=30,
        num_test=16,
    ),
    "va": CenterFile(
        file_name="processed.va.data",
        sha256="e7c93d8d0d2acdadfa4c5e8de768e2191e7f618b952e29623f1f0d5949ff6b8f",
        num_rows_clean=130,
        num_train=85,
        num_test=45,
    ),
}
"""FLamby centre order (0..3): the pooling order fixes the one-hot column order."""

CENTER_NAMES: tuple[str, ...] = tuple(CENTER_FILES)


@dataclass(frozen=True, slots=True, kw_only=True)
class Center:
    """One centre's train and test split.

    ``x_*`` are float32 arrays of shape ``(n, NUM_FEATURES)``, ``y_*`` int64 arrays of 0/1 labels.
    The arrays are read-only; copy them to change them.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    feature_names: tuple[str, ...]

    def __post_init__(self) -> None:
        num_features = len(self.feature_names)
        for split in ("train", "test"):
            x = getattr(self, f"x_{split}")
            y = getattr(self, f"y_{split}")
            if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 2:
                raise InputError(f"{self.name}: x_{split} must be a 2-D float32 array")
            if x.shape[1] != num_features:
                raise InputError(
                    f"{self.name}: x_{split} has {x.shape[1]} columns, "
                    f"feature_names has {num_features}"
                )
            if not isinstance(y, np.ndarray) or y.dtype != np.int64 or y.shape != (x.shape[0],):
                raise InputError(f"{self.name}: y_{split} must be an int64 array of {x.shape[0]}")
            if not np.isfinite(x).all():
                raise InputError(f"{self.name}: x_{split} contains NaN or inf")
            if not np.isin(y, (0, 1)).all():
                raise InputError(f"{self.name}: y_{split} must hold only 0/1 labels")
            x.setflags(write=False)
            y.setflags(write=False)

    @property
    def num_train(self) -> int:
        """Number of training rows."""
        return int(self.x_train.shape[0])

    @property
    def num_test(self) -> int:
        """Number of test rows."""
        return int(self.x_test.shape[0])


@dataclass(frozen=True, slots=True, kw_only=True)
class FeatureStats:
    """Per-feature mean and scale used by :func:`standardize`, and where they came from.

    ``scale`` is the population standard deviation, with 1.0 where a feature is constant in the
    source (several one-hot columns are all zero in Cleveland), so scaling never divides by zero.
    """

    source: str
    mean: np.ndarray
    scale: np.ndarray

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Return ``(x - mean) / scale`` as float32; ``x`` is not modified."""
        arr = np.asarray(x)
        if arr.ndim != 2 or arr.shape[1] != self.mean.shape[0]:
            raise InputError(f"expected shape (n, {self.mean.shape[0]}), got {arr.shape}")
        return ((arr.astype(np.float64) - self.mean) / self.scale).astype(np.float32)


def _import_extras() -> tuple[ModuleType, ModuleType, object]:
    """Import pandas and scikit-learn, or explain how to get them."""
    try:
        import pandas
        import sklearn
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise DataError(
            "the Fed-Heart-Disease loader needs pandas and scikit-learn; "
            "install them with: pip install 'secfedtl[data]'"
        ) from exc
    return pandas, sklearn, train_test_split


def verify_files(*, data_dir: Path | str | None = None) -> dict[str, Path]:
    """Check every centre file's SHA-256; return ``{centre: path}``.

    Raises :class:`DataError` if a file is missing, unreadable or has another digest.
    """
    folder = DATA_DIR if data_dir is None else Path(data_dir)
    paths: dict[str, Path] = {}
    for center, spec in CENTER_FILES.items():
        path = folder / spec.file_name
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as exc:
            raise DataError(f"{center}: cannot read {path}: {exc}") from exc
        if digest != spec.sha256:
            raise DataError(
                f"{center}: {path} has SHA-256 {digest}, expected {spec.sha256}; "
                "the file is corrupt or not the UCI original"
            )
        paths[center] = path
    return paths


def _split_positions(
    labels: np.ndarray, train_test_split: object
) -> tuple[np.ndarray, np.ndarray]:
    """FLamby's per-centre split of row positions 0..n-1 (see module docstring, step 4)."""
    levels = np.unique(labels)
    stratified = len(levels) > 1 and all(int((labels == lev).sum()) > 2 for lev in levels)
    train_idx, test_idx = train_test_split(  # type: ignore[operator]
        np.arange(labels.shape[0]),
        test_size=1.0 - TRAIN_FRACTION,
        train_size=TRAIN_FRACTION,
        random_state=SPLIT_RANDOM_STATE,
        shuffle=True,
        stratify=labels if stratified else None,
    )
    return np.asarray(train_idx, dtype=np.int64), np.asarray(test_idx, dtype=np.int64)


def _feature_name(column: object) -> str:
    if isinstance(column, int):
        return _COLUMN_NAMES[column]
    prefix, _, level = str(column).partition("_")
    # get_dummies names a dummy "<column>_<level>"; numeric levels print as "1.0", text as "1".
    return f"{_COLUMN_NAMES[int(prefix)]}_{level}"


def load_fed_heart_disease(*, data_dir: Path | str | None = None) -> dict[str, Center]:
    """Load the four Fed-Heart-Disease centres with FLamby's split and 16 features.

    Returns ``{"cleveland", "hungary", "switzerland", "va"} -> Center`` in FLamby's centre order.
    ``data_dir`` defaults to the bundled files. Raises :class:`DataError` if pandas/scikit-learn
    are missing, a file fails its checksum, or the split does not give FLamby's counts.
    """
    pd, _sklearn, train_test_split = _import_extras()
    paths = verify_files(data_dir=data_dir)

    features = []
    labels: dict[str, np.ndarray] = {}
    splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for center, spec in CENTER_FILES.items():
        try:
            frame = pd.read_csv(paths[center], header=None)
        except Exception as exc:  # pandas raises many kinds; all mean "not the expected file"
            raise DataError(f"{center}: cannot parse {paths[center]}: {exc}") from exc
        if frame.shape[1] != _LABEL_COLUMN + 1:
            raise DataError(f"{center}: expected 14 columns, found {frame.shape[1]}")
        frame = frame.replace("?", np.nan).drop(list(_DROPPED_COLUMNS), axis=1).dropna(axis=0)
        raw_label = pd.to_numeric(frame[_LABEL_COLUMN]).to_numpy()
        y = np.where(raw_label == 0, 0, 1).astype(np.int64)
        train_idx, test_idx = _split_positions(y, train_test_split)
        counts = (len(y), len(train_idx), len(test_idx))
        expected = (spec.num_rows_clean, spec.num_train, spec.num_test)
        if counts != expected:
            raise DataError(
                f"{center}: split gave rows/train/test {counts}, expected {expected}; "
                "this pandas/scikit-learn version does not reproduce FLamby's split"
            )
        features.append(frame.drop(columns=[_LABEL_COLUMN]))
        labels[center] = y
        splits[center] = (train_idx, test_idx)

    pooled = pd.concat(features, ignore_index=True)
    encoded = pd.get_dummies(pooled, columns=list(_ONE_HOT_COLUMNS), drop_first=True)
    if encoded.shape[1] != NUM_FEATURES:
        raise DataError(
            f"one-hot encoding gave {encoded.shape[1]} features, expected {NUM_FEATURES}"
        )
    feature_names = tuple(_feature_name(c) for c in encoded.columns)
    try:
        matrix = encoded.to_numpy().astype(np.float32)
    except (TypeError, ValueError) as exc:
        raise DataError(f"non-numeric feature values after cleaning: {exc}") from exc

    centers: dict[str, Center] = {}
    start = 0
    for center in CENTER_FILES:
        y = labels[center]
        block = matrix[start : start + len(y)]
        start += len(y)
        train_idx, test_idx = splits[center]
        centers[center] = Center(
            name=center,
            x_train=np.ascontiguousarray(block[train_idx]),
            y_train=y[train_idx].copy(),
            x_test=np.ascontiguousarray(block[test_idx]),
            y_test=y[test_idx].copy(),
            feature_names=feature_names,
        )
    return centers


def feature_stats(centers: Mapping[str, Center], *, stats_from: str = "cleveland") -> FeatureStats:
    """Mean and scale of ``centers[stats_from].x_train`` (the training split only)."""
    if stats_from not in centers:
        raise ConfigError(
            f"stats_from={stats_from!r} is not one of the centres {sorted(centers)}"
        )
    x = centers[stats_from].x_train.astype(np.float64)
    if x.shape[0] < 2:
        raise DataError(f"{stats_from}: need at least 2 training rows for statistics")
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    scale = np.where(std > 0.0, std, 1.0)
    mean.setflags(write=False)
    scale.setflags(write=False)
    return FeatureStats(source=stats_from, mean=mean, scale=scale)


def standardize(
    centers: Mapping[str, Center], *, stats_from: str = "cleveland"
) -> tuple[dict[str, Center], FeatureStats]:
    """Scale every centre with the training statistics of the one centre named ``stats_from``.

    The default, Cleveland, is the long-public UCI centre used as the transfer source, so no
    private hospital's statistics are used. Returns new centres and the statistics applied; the
    input is not modified.
    """
    stats = feature_stats(centers, stats_from=stats_from)
    scaled = {
        name: Center(
            name=c.name,
            x_train=stats.apply(c.x_train),
            y_train=c.y_train.copy(),
            x_test=stats.apply(c.x_test),
            y_test=c.y_test.copy(),
            feature_names=c.feature_names,
        )
        for name, c in centers.items()
    }
    return scaled, stats


def validation_split(
    x: np.ndarray, y: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Hold out ``fraction`` of a *training* split for validation.

    Returns ``(x_fit, y_fit, x_val, y_val)``: a seeded random permutation, with
    ``round(fraction * n)`` rows (at least 1) in validation and at least 1 left to fit.
    Give it training data only; tuning on test splits is never allowed.
    """
    x_arr = np.asarray(x)
    y_arr = np.asarray(y)
    if x_arr.ndim < 1 or y_arr.ndim != 1 or x_arr.shape[0] != y_arr.shape[0]:
        raise InputError(f"x and y must have the same number of rows, got {x_arr.shape}, {y_arr.shape}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise ConfigError(f"fraction must be a number, got {type(fraction).__name__}")
    if not (math.isfinite(fraction) and 0.0 < fraction < 1.0):
        raise ConfigError(f"fraction must lie in (0, 1), got {fraction}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    n = x_arr.shape[0]
    num_val = max(1, int(round(fraction * n)))
    if n < 2 or num_val >= n:
        raise InputError(f"cannot hold out {fraction} of {n} rows and keep rows to fit on")
    order = np.random.default_rng(int(seed)).permutation(n)
    val_idx, fit_idx = np.sort(order[:num_val]), np.sort(order[num_val:])
    return x_arr[fit_idx].copy(), y_arr[fit_idx].copy(), x_arr[val_idx].copy(), y_arr[val_idx].copy()
