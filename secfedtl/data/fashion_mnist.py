"""Fashion-MNIST from its IDX files, and a Dirichlet label-skew partition into clients.

Fashion-MNIST (Xiao, Rasul, Vollgraf 2017; Zalando SE, MIT licence) is not bundled: Debian ships
it as ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``), which puts the four
gzipped IDX files under :data:`DEBIAN_DIR`. Without apt, download the same four files from
Zalando's repository (:data:`ZALANDO_URL`, folder ``data/fashion``) into any folder.
:func:`load_fashion_mnist` reads them from :data:`DEBIAN_DIR` or the folder it is given (gzipped or
raw) and, by default, checks the SHA-256 of each file's *decompressed* content against the
published files, so a gzipped and a raw copy of the same data both pass (Debian recompressed the
``.gz`` files, so only the content is comparable).

:func:`read_idx` is strict: a file that is not IDX (wrong magic, unknown element type, a header
claiming more data than the file holds, trailing bytes, a broken gzip stream) raises
:class:`~secfedtl.errors.DataError`, and it never decompresses more than the header announces
(plus one byte to detect trailing data), so a crafted gzip cannot make it allocate without bound.

:func:`dirichlet_partition` is the usual non-IID benchmark split (Hsu, Qi, Brown 2019): for every
class, the class's examples are divided among the clients in proportions drawn from
``Dirichlet(alpha)``; smaller ``alpha`` means stronger label skew. It is seeded (the partition is
a public simulation choice, not a secret) and redraws until every client holds at least
``min_size`` examples. :func:`client_splits` does both and then holds out validation rows per
client with :func:`secfedtl.data.record_split` (a keyed hash of each record: adding or removing
one record moves only that record between fit and validation); tuning never looks at the test
split.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Mapping

import numpy as np

from secfedtl.data.splits import record_split, split_key
from secfedtl.errors import ConfigError, DataError, InputError

__all__ = [
    "CLASS_NAMES",
    "DEBIAN_DIR",
    "FILE_NAMES",
    "FILE_SHA256",
    "ZALANDO_URL",
    "ClientSplit",
    "FashionMNIST",
    "client_splits",
    "dirichlet_partition",
    "load_fashion_mnist",
    "read_idx",
]

DEBIAN_DIR: Path = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's ``dataset-fashion-mnist`` package installs the IDX files."""

ZALANDO_URL: str = "https://github.com/zalandoresearch/fashion-mnist"
"""The dataset's home (Zalando SE, MIT licence); the four ``.gz`` files are in ``data/fashion``."""

CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

#: The four files by role; each may be present as ``NAME`` or ``NAME.gz``.
FILE_NAMES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

#: SHA-256 of each file's decompressed IDX content (the published Fashion-MNIST release).
FILE_SHA256: dict[str, str] = {
    "train_images": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train_labels": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "test_images": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "test_labels": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}

# IDX element types (third magic byte) -> big-endian numpy dtype.
_IDX_DTYPES: dict[int, str] = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_GZIP_MAGIC = b"\x1f\x8b"
_DEFAULT_MAX_BYTES = 1 << 30


def _read_exact(fh: BinaryIO, n: int, path: Path, what: str) -> bytes:
    data = fh.read(n)
    if len(data) != n:
        raise DataError(f"{path}: truncated IDX file ({what}: expected {n} bytes, got {len(data)})")
    return data


def read_idx(path: str | Path, *, max_bytes: int = _DEFAULT_MAX_BYTES) -> np.ndarray:
    """Read one IDX file (gzipped or raw, told apart by the gzip magic) into a numpy array.

    Returns an array of the file's element type in native byte order and its declared shape.
    Raises :class:`DataError` for a missing or malformed file, or one whose data would exceed
    ``max_bytes``.
    """
    path = Path(path)
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
        raise ConfigError(f"max_bytes must be a positive int, got {max_bytes!r}")
    if not path.is_file():
        raise DataError(f"no IDX file at {path}")
    try:
        with open(path, "rb") as raw:
            gzipped = raw.read(2) == _GZIP_MAGIC
        opener = gzip.open if gzipped else open
        with opener(path, "rb") as fh:  # type: ignore[operator]
            magic = _read_exact(fh, 4, path, "magic")
            if magic[0] != 0 or magic[1] != 0 or magic[2] not in _IDX_DTYPES:
                raise DataError(f"{path}: not an IDX file (magic {magic.hex()})")
            ndim = magic[3]
            if ndim < 1:
                raise DataError(f"{path}: IDX file declares no dimensions")
            header = _read_exact(fh, 4 * ndim, path, "dimensions")
            shape = tuple(int.from_bytes(header[4 * i: 4 * i + 4], "big") for i in range(ndim))
            dtype = np.dtype(_IDX_DTYPES[magic[2]])
            size = math.prod(shape) * dtype.itemsize
            if size > max_bytes:
                raise DataError(f"{path}: IDX shape {shape} needs {size} bytes, more than max_bytes={max_bytes}")
            body = _read_exact(fh, size, path, "data")
            if fh.read(1):
                raise DataError(f"{path}: trailing bytes after the IDX data of shape {shape}")
    except DataError:
        raise
    except (OSError, EOFError, zlib.error) as exc:  # gzip raises BadGzipFile (an OSError), EOFError
        raise DataError(f"{path}: cannot read: {exc}") from exc
    return np.frombuffer(body, dtype=dtype).astype(dtype.newbyteorder("="), copy=True).reshape(shape)


def _sha256_of_content(path: Path) -> str:
    with open(path, "rb") as raw:
        gzipped = raw.read(2) == _GZIP_MAGIC
    digest = hashlib.sha256()
    with (gzip.open if gzipped else open)(path, "rb") as fh:  # type: ignore[operator]
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _find(root: Path, name: str) -> Path:
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(
        f"Fashion-MNIST file {name}[.gz] not found in {root}: apt-get install dataset-fashion-mnist "
        f"(Debian/Ubuntu), or download the four IDX files from {ZALANDO_URL} (data/fashion, MIT licence) "
        "into a folder and load that folder (the example's --data-dir)"
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class FashionMNIST:
    """The training and test splits: uint8 images ``(n, 28, 28)`` and int64 labels in 0..9."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def _check_pair(images: np.ndarray, labels: np.ndarray, split: str) -> None:
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"{split} images must be uint8 of shape (n, 28, 28), got {images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DataError(f"{split} labels must be a uint8 vector, got {labels.dtype} {labels.shape}")
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{split}: {images.shape[0]} images but {labels.shape[0]} labels")
    if images.shape[0] == 0:
        raise DataError(f"{split} split is empty")
    if labels.max() >= len(CLASS_NAMES):
        raise DataError(f"{split} labels must lie in 0..{len(CLASS_NAMES) - 1}, found {int(labels.max())}")


def load_fashion_mnist(
    root: str | Path | None = None, *, checksums: Mapping[str, str] | None = FILE_SHA256
) -> FashionMNIST:
    """Load the four Fashion-MNIST IDX files from ``root`` (default :data:`DEBIAN_DIR`).

    ``checksums`` maps each role of :data:`FILE_NAMES` to the SHA-256 of its decompressed content
    (default: the published release); ``None`` skips the check (for other data in the same format).
    Raises :class:`DataError` for missing, corrupt or inconsistent files.
    """
    root = DEBIAN_DIR if root is None else Path(root)
    paths = {role: _find(root, name) for role, name in FILE_NAMES.items()}
    if checksums is not None:
        for role, path in paths.items():
            expected = checksums.get(role)
            if expected is not None and _sha256_of_content(path) != expected:
                raise DataError(f"{path}: SHA-256 of its content does not match the published file")
    arrays = {role: read_idx(path) for role, path in paths.items()}
    _check_pair(arrays["train_images"], arrays["train_labels"], "train")
    _check_pair(arrays["test_images"], arrays["test_labels"], "test")
    return FashionMNIST(
        x_train=arrays["train_images"], y_train=arrays["train_labels"].astype(np.int64),
        x_test=arrays["test_images"], y_test=arrays["test_labels"].astype(np.int64),
    )


def dirichlet_partition(
    labels: np.ndarray,
    *,
    num_clients: int,
    alpha: float,
    seed: int,
    min_size: int = 10,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Split example indices among ``num_clients`` with Dirichlet(``alpha``) label skew.

    For each class, its (shuffled) indices are cut among the clients in proportions drawn from
    ``Dirichlet(alpha * ones(num_clients))``. Draws are repeated (same seeded generator) until
    every client holds at least ``min_size`` examples; after ``max_tries`` draws a
    :class:`ConfigError` says the request cannot be met. Returns one sorted index array per
    client; together they cover every index exactly once.
    """
    y = np.asarray(labels)
    if y.ndim != 1 or y.size == 0 or not np.issubdtype(y.dtype, np.integer):
        raise InputError("labels must be a non-empty vector of integer class labels")
    for name, value in (("num_clients", num_clients), ("min_size", min_size), ("max_tries", max_tries)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ConfigError(f"{name} must be a positive int, got {value!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (math.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"alpha must be a finite positive number, got {alpha!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative int, got {seed!r}")
    if y.size < num_clients * min_size:
        raise ConfigError(f"{y.size} examples cannot give {num_clients} clients {min_size} each")
    rng = np.random.default_rng(int(seed))
    classes = np.unique(y)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(y == c))
            proportions = rng.dirichlet(np.full(num_clients, float(alpha)))
            cuts = np.floor(np.cumsum(proportions)[:-1] * idx.size).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].append(chunk)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(p.size for p in out) >= min_size:
            return out
    raise ConfigError(
        f"no Dirichlet({alpha}) partition into {num_clients} clients with at least {min_size} examples "
        f"each in {max_tries} draws: raise alpha or lower min_size"
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class ClientSplit:
    """One client's examples: ``x_fit``/``y_fit`` to train on, ``x_val``/``y_val`` to tune on."""

    x_fit: np.ndarray
    y_fit: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray


def client_splits(
    x: np.ndarray,
    y: np.ndarray,
    *,
    num_clients: int,
    alpha: float,
    seed: int,
    validation_fraction: float = 0.1,
    min_size: int = 10,
) -> list[ClientSplit]:
    """Dirichlet-partition a *training* split into clients, then hold out validation rows per
    client, record by record (:func:`~secfedtl.data.record_split` under the public key
    ``split_key(seed, "fashion_mnist")``): a record's side depends on the record alone, so a client
    holding one record more or less has every other record on the same side. The fraction is
    therefore ``validation_fraction`` in expectation, not exactly."""
    x_arr, y_arr = np.asarray(x), np.asarray(y)
    if x_arr.ndim < 1 or x_arr.shape[0] != y_arr.shape[0]:
        raise InputError(f"x and y must have the same number of rows, got {x_arr.shape}, {y_arr.shape}")
    parts = dirichlet_partition(y_arr, num_clients=num_clients, alpha=alpha, seed=seed, min_size=max(2, min_size))
    key = split_key(seed, "fashion_mnist")
    out = []
    for idx in parts:
        x_fit, y_fit, x_val, y_val = record_split(x_arr[idx], y_arr[idx], validation_fraction, key)
        out.append(ClientSplit(x_fit=x_fit, y_fit=y_fit, x_val=x_val, y_val=y_val))
    return out
