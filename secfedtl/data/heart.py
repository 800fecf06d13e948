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

The default ``engine="numpy"`` needs nothing but numpy: it reproduces pandas' type inference and
scikit-learn's split draws exactly (the tests compare it with the reference engine, row for row).
``engine="pandas"`` runs the recipe through pandas and scikit-learn, the optional extra
``secfedtl[data]``; without them it raises :class:`~secfedtl.errors.DataError` saying so.
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
    "FEATURE_NAMES",
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

FEATURE_NAMES: tuple[str, ...] = (
    "age", "sex", "trestbps", "chol", "fbs", "thalach", "exang", "oldpeak",
    "cp_2.0", "cp_3.0", "cp_4.0",
    "restecg_1.0", "restecg_2.0",  # numeric levels (Cleveland, VA)
    "restecg_0", "restecg_1", "restecg_2",  # text levels (Hungarian, Switzerland)
)
"""The 16 columns, named as pandas ``get_dummies`` names them (``1.0`` numeric, ``1`` text level)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Center:
    """One centre's train and test split.

    ``x_*`` are float32 arrays of shape ``(n, NUM_FEATURES)``, ``y_*`` int64 arrays of 0/1 labels.
    The arrays are read-only copies; copy them again to change them.
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
        for split in ("train", "test"):  # private read-only copies: the caller's arrays stay as they are
            for prefix in ("x", "y"):
                frozen = getattr(self, f"{prefix}_{split}").copy()
                frozen.setflags(write=False)
                object.__setattr__(self, f"{prefix}_{split}", frozen)

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


def load_fed_heart_disease(
    *, data_dir: Path | str | None = None, engine: str = "numpy"
) -> dict[str, Center]:
    """Load the four Fed-Heart-Disease centres with FLamby's split and 16 features.

    Returns ``{"cleveland", "hungary", "switzerland", "va"} -> Center`` in FLamby's centre order.
    ``data_dir`` defaults to the bundled files.

    ``engine="numpy"`` (default) needs only numpy: it re-implements the pandas parsing quirk and
    scikit-learn's (Stratified)ShuffleSplit draw from ``RandomState(43)``; the test suite checks
    that it gives exactly what ``engine="pandas"`` gives. ``engine="pandas"`` runs FLamby's own
    recipe through pandas and scikit-learn (``pip install 'secfedtl[data]'``).

    Raises :class:`ConfigError` for an unknown engine and :class:`DataError` if the extras are
    missing (pandas engine), a file fails its checksum, or the split does not give FLamby's counts.
    """
    if engine == "numpy":
        return _load_numpy(verify_files(data_dir=data_dir))
    if engine == "pandas":
        return _load_pandas(data_dir)
    raise ConfigError(f"engine must be 'numpy' or 'pandas', got {engine!r}")


def _check_counts(center: str, num_rows: int, num_train: int, num_test: int) -> None:
    spec = CENTER_FILES[center]
    counts = (num_rows, num_train, num_test)
    expected = (spec.num_rows_clean, spec.num_train, spec.num_test)
    if counts != expected:
        raise DataError(
            f"{center}: split gave rows/train/test {counts}, expected {expected}; "
            "FLamby's split was not reproduced"
        )


def _load_pandas(data_dir: Path | str | None) -> dict[str, Center]:
    """FLamby's recipe, through pandas and scikit-learn."""
    pd, _sklearn, train_test_split = _import_extras()
    paths = verify_files(data_dir=data_dir)

    features = []
    labels: dict[str, np.ndarray] = {}
    splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for center in CENTER_FILES:
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
        _check_counts(center, len(y), len(train_idx), len(test_idx))
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
    if feature_names != FEATURE_NAMES:
        raise DataError(f"one-hot columns {feature_names} differ from FLamby's {FEATURE_NAMES}")
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
        centers[center] = _make_center(center, block, y, *splits[center])
    return centers


def _make_center(
    center: str, x: np.ndarray, y: np.ndarray, train_idx: np.ndarray, test_idx: np.ndarray
) -> Center:
    return Center(
        name=center,
        x_train=np.ascontiguousarray(x[train_idx], dtype=np.float32),
        y_train=y[train_idx].astype(np.int64),
        x_test=np.ascontiguousarray(x[test_idx], dtype=np.float32),
        y_test=y[test_idx].astype(np.int64),
        feature_names=FEATURE_NAMES,
    )


# --- numpy engine ------------------------------------------------------------------------------

_PLAIN_COLUMNS: tuple[int, ...] = (0, 1, 3, 4, 5, 7, 8, 9)
_CP_LEVELS: tuple[float, ...] = (2.0, 3.0, 4.0)  # level 1 is the dropped first category
_RESTECG_NUMERIC_LEVELS: tuple[float, ...] = (1.0, 2.0)  # numeric 0 is the dropped first one
_RESTECG_TEXT_LEVELS: tuple[str, ...] = ("0", "1", "2")


def _parse_file(center: str, path: Path) -> tuple[np.ndarray, np.ndarray, bool]:
    """Cleaned rows of one file: raw columns 0-9 as float64, binary labels, and whether pandas
    would read ``restecg`` as text (it does when the column holds any non-numeric token)."""
    try:
        lines = path.read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{center}: cannot read {path}: {exc}") from exc
    rows = [line.split(",") for line in lines]
    if not rows or any(len(r) != _LABEL_COLUMN + 1 for r in rows):
        raise DataError(f"{center}: every line must have 14 comma-separated fields")

    def is_number(token: str) -> bool:
        try:
            float(token)
        except ValueError:
            return False
        return True

    restecg_is_text = not all(is_number(r[6]) for r in rows)
    features, labels = [], []
    for row in rows:
        kept = row[:10] + [row[_LABEL_COLUMN]]
        if "?" in kept:
            continue
        try:
            values = [float(v) for v in kept]
        except ValueError as exc:
            raise DataError(f"{center}: non-numeric field in {row}: {exc}") from exc
        features.append(values[:10])
        labels.append(0 if values[10] == 0 else 1)
    return np.array(features, dtype=np.float64), np.array(labels, dtype=np.int64), restecg_is_text


def _one_hot(center: str, raw: np.ndarray, restecg_is_text: bool) -> np.ndarray:
    """The 16 FLamby columns for one centre's cleaned rows (see :data:`FEATURE_NAMES`)."""
    cp = raw[:, 2]
    restecg = raw[:, 6]
    if not np.isin(cp, (1.0,) + _CP_LEVELS).all() or not np.isin(restecg, (0.0, 1.0, 2.0)).all():
        raise DataError(f"{center}: cp or restecg outside their documented levels")
    cp_dummies = np.stack([cp == lvl for lvl in _CP_LEVELS], axis=1)
    numeric = np.stack([restecg == lvl for lvl in _RESTECG_NUMERIC_LEVELS], axis=1)
    text = np.stack([restecg == float(lvl) for lvl in _RESTECG_TEXT_LEVELS], axis=1)
    if restecg_is_text:
        numeric[:] = False
    else:
        text[:] = False
    return np.concatenate(
        [raw[:, list(_PLAIN_COLUMNS)], cp_dummies, numeric, text], axis=1
    ).astype(np.float32)


def _approximate_mode(
    class_counts: np.ndarray, n_draws: int, rng: np.random.RandomState
) -> np.ndarray:
    """How many of each class to draw: floor of the proportional share, the rest given to the
    largest remainders, ties broken by ``rng.choice`` (scikit-learn's rule, same RNG calls)."""
    continuous = class_counts / class_counts.sum() * n_draws
    floored = np.floor(continuous)
    missing = int(n_draws - floored.sum())
    remainder = continuous - floored
    for value in np.sort(np.unique(remainder))[::-1]:
        if missing <= 0:
            break
        (candidates,) = np.where(remainder == value)
        take = min(len(candidates), missing)
        chosen = rng.choice(candidates, size=take, replace=False)
        floored[chosen] += 1
        missing -= take
    return floored.astype(np.int64)


def _split_positions_numpy(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FLamby's split of positions 0..n-1 without scikit-learn, drawing from ``RandomState(43)``
    in the same order as scikit-learn's ShuffleSplit / StratifiedShuffleSplit."""
    n = labels.shape[0]
    num_test = math.ceil((1.0 - TRAIN_FRACTION) * n)
    num_train = math.floor(TRAIN_FRACTION * n)
    rng = np.random.RandomState(SPLIT_RANDOM_STATE)
    classes, class_of, class_counts = np.unique(labels, return_inverse=True, return_counts=True)
    if len(classes) < 2 or class_counts.min() <= 2:
        order = rng.permutation(n)
        return order[num_test : num_test + num_train], order[:num_test]
    members = np.split(np.argsort(class_of, kind="stable"), np.cumsum(class_counts)[:-1])
    train_per_class = _approximate_mode(class_counts, num_train, rng)
    test_per_class = _approximate_mode(class_counts - train_per_class, num_test, rng)
    train: list[int] = []
    test: list[int] = []
    for rows, k_train, k_test in zip(members, train_per_class, test_per_class):
        shuffled = rows[rng.permutation(len(rows))]
        train.extend(shuffled[:k_train].tolist())
        test.extend(shuffled[k_train : k_train + k_test].tolist())
    return rng.permutation(train), rng.permutation(test)


def _load_numpy(paths: Mapping[str, Path]) -> dict[str, Center]:
    centers: dict[str, Center] = {}
    for center in CENTER_FILES:
        raw, y, restecg_is_text = _parse_file(center, paths[center])
        train_idx, test_idx = _split_positions_numpy(y)
        _check_counts(center, len(y), len(train_idx), len(test_idx))
        x = _one_hot(center, raw, restecg_is_text)
        centers[center] = _make_center(center, x, y, train_idx, test_idx)
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
