"""secfedtl.data: loaders for the bundled example data sets.

Importing this package needs only numpy; the Fed-Heart-Disease loader itself needs the optional
extra ``secfedtl[data]`` (pandas, scikit-learn) and says so with a DataError when it is missing.
"""

from secfedtl.data.heart import (
    CENTER_NAMES,
    NUM_FEATURES,
    Center,
    FeatureStats,
    feature_stats,
    load_fed_heart_disease,
    standardize,
    validation_split,
    verify_files,
)
from secfedtl.data.splits import in_validation, record_split, split_key

__all__ = [
    "CENTER_NAMES",
    "NUM_FEATURES",
    "Center",
    "FeatureStats",
    "feature_stats",
    "in_validation",
    "load_fed_heart_disease",
    "record_split",
    "split_key",
    "standardize",
    "validation_split",
    "verify_files",
]
