"""Fashion-MNIST loader and Dirichlet partition, on small synthetic IDX files made here (CI does
not have the Debian package; the real files are checked when present)."""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secfedtl.data.fashion_mnist import (
    DEBIAN_DIR,
    FILE_NAMES,
    ZALANDO_URL,
    client_splits,
    dirichlet_partition,
    load_fashion_mnist,
    read_idx,
)
from secfedtl.data import record_split, split_key
from secfedtl.errors import ConfigError, DataError, InputError


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    dtype = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[type_code]
    header = bytes([0, 0, type_code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=dtype).tobytes()


def write(path: Path, data: bytes, *, gz: bool) -> Path:
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def make_dataset(root: Path, *, n_train: int = 40, n_test: int = 20, gz: bool = True, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for role, arr in arrays.items():
        write(root / FILE_NAMES[role], idx_bytes(arr), gz=gz)
    return arrays


# -- read_idx ---------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("type_code", [0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E])
def test_read_idx_round_trips_every_type(tmp_path: Path, gz: bool, type_code: int) -> None:
    rng = np.random.default_rng(type_code)
    arr = rng.integers(-100 if type_code != 0x08 else 0, 100, (3, 4, 5))
    path = write(tmp_path / "a-idx3", idx_bytes(arr, type_code), gz=gz)
    out = read_idx(path)
    assert out.shape == (3, 4, 5)
    assert out.dtype.isnative
    np.testing.assert_array_equal(out, arr)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b"\x01" + b[1:], "not an IDX"),  # first magic byte
        (lambda b: b[:2] + b"\x07" + b[3:], "not an IDX"),  # unknown element type
        (lambda b: b[:3] + b"\x00" + b[4:], "no dimensions"),
        (lambda b: b[:-1], "truncated"),
        (lambda b: b + b"\x00", "trailing"),
        (lambda b: b[:6], "truncated"),  # header cut inside the dimensions
        (lambda b: b"", "truncated"),
        (lambda b: b[:4] + struct.pack(">I", 4) + b[8:], "truncated"),  # dimension says more than there is
    ],
)
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_refuses_malformed_files(tmp_path: Path, mutate, message: str, gz: bool) -> None:
    good = idx_bytes(np.arange(6, dtype=np.uint8).reshape(2, 3))
    path = write(tmp_path / "bad", mutate(good), gz=gz)
    with pytest.raises(DataError, match=message):
        read_idx(path)


def test_read_idx_refuses_huge_declared_shape_without_allocating(tmp_path: Path) -> None:
    header = bytes([0, 0, 0x08, 3]) + struct.pack(">III", 60000, 60000, 60000)
    path = write(tmp_path / "bomb", header + b"\x00" * 16, gz=True)
    with pytest.raises(DataError, match="max_bytes"):
        read_idx(path)


def test_read_idx_refuses_broken_gzip_and_missing_file(tmp_path: Path) -> None:
    data = gzip.compress(idx_bytes(np.zeros((4, 4), dtype=np.uint8)))
    path = tmp_path / "broken.gz"
    path.write_bytes(data[:-12])  # cut off the gzip trailer (CRC, size)
    with pytest.raises(DataError):
        read_idx(path)
    corrupt = bytearray(data)
    corrupt[len(corrupt) // 2] ^= 0xFF
    path.write_bytes(bytes(corrupt))
    with pytest.raises(DataError):
        read_idx(path)
    with pytest.raises(DataError, match="no IDX file"):
        read_idx(tmp_path / "missing")
    with pytest.raises(ConfigError):
        read_idx(path, max_bytes=0)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=64))
def test_read_idx_on_arbitrary_bytes_raises_only_data_error(tmp_path_factory, data: bytes) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "f"
    path.write_bytes(data)
    try:
        out = read_idx(path)
    except DataError:
        return
    assert isinstance(out, np.ndarray)  # a valid tiny IDX file is possible


# -- load_fashion_mnist -----------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_load_synthetic_dataset(tmp_path: Path, gz: bool) -> None:
    arrays = make_dataset(tmp_path, gz=gz)
    ds = load_fashion_mnist(tmp_path, checksums=None)
    np.testing.assert_array_equal(ds.x_train, arrays["train_images"])
    np.testing.assert_array_equal(ds.y_test, arrays["test_labels"])
    assert ds.y_train.dtype == np.int64 and ds.x_train.dtype == np.uint8


def test_load_checks_content_checksums(tmp_path: Path) -> None:
    make_dataset(tmp_path, gz=True)
    digests = {}
    for role, name in FILE_NAMES.items():
        digests[role] = hashlib.sha256(gzip.decompress((tmp_path / f"{name}.gz").read_bytes())).hexdigest()
    load_fashion_mnist(tmp_path, checksums=digests)  # the content digest, whatever the compression
    wrong = {**digests, "test_labels": "0" * 64}
    with pytest.raises(DataError, match="SHA-256"):
        load_fashion_mnist(tmp_path, checksums=wrong)


def test_load_refuses_missing_and_inconsistent_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist") as missing:
        load_fashion_mnist(tmp_path, checksums=None)
    assert ZALANDO_URL in str(missing.value) and "\n" not in str(missing.value)  # the no-apt way, one line
    make_dataset(tmp_path, gz=False)
    # more labels than images
    write(tmp_path / FILE_NAMES["train_labels"], idx_bytes(np.zeros(41, dtype=np.uint8)), gz=False)
    with pytest.raises(DataError, match="40 images but 41 labels"):
        load_fashion_mnist(tmp_path, checksums=None)
    # a label out of range
    write(tmp_path / FILE_NAMES["train_labels"], idx_bytes(np.full(40, 10, dtype=np.uint8)), gz=False)
    with pytest.raises(DataError, match="0..9"):
        load_fashion_mnist(tmp_path, checksums=None)
    # images of the wrong size
    write(tmp_path / FILE_NAMES["train_labels"], idx_bytes(np.zeros(40, dtype=np.uint8)), gz=False)
    write(tmp_path / FILE_NAMES["train_images"], idx_bytes(np.zeros((40, 32, 32), dtype=np.uint8)), gz=False)
    with pytest.raises(DataError, match="28, 28"):
        load_fashion_mnist(tmp_path, checksums=None)


@pytest.mark.skipif(not DEBIAN_DIR.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_real_files_when_installed() -> None:
    ds = load_fashion_mnist()
    assert ds.x_train.shape == (60000, 28, 28) and ds.x_test.shape == (10000, 28, 28)
    assert np.bincount(ds.y_train).tolist() == [6000] * 10
    assert np.bincount(ds.y_test).tolist() == [1000] * 10


# -- Dirichlet partition ----------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(num_clients=st.integers(1, 12), alpha=st.floats(0.05, 100), seed=st.integers(0, 2**31))
def test_partition_covers_every_index_once_and_no_client_is_empty(num_clients: int, alpha: float, seed: int) -> None:
    labels = np.repeat(np.arange(10), 30)
    try:
        parts = dirichlet_partition(labels, num_clients=num_clients, alpha=alpha, seed=seed, min_size=5)
    except ConfigError:
        return  # only very small alpha with many clients may fail to meet min_size
    assert len(parts) == num_clients
    assert all(len(p) >= 5 for p in parts)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(labels.size))


def test_partition_is_seeded_and_skew_follows_alpha() -> None:
    labels = np.repeat(np.arange(10), 600)
    a = dirichlet_partition(labels, num_clients=10, alpha=0.5, seed=3)
    b = dirichlet_partition(labels, num_clients=10, alpha=0.5, seed=3)
    c = dirichlet_partition(labels, num_clients=10, alpha=0.5, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))

    def skew(parts: list[np.ndarray]) -> float:  # mean total-variation distance to the uniform label mix
        return float(np.mean([0.5 * np.abs(np.bincount(labels[p], minlength=10) / len(p) - 0.1).sum() for p in parts]))

    skewed = skew(dirichlet_partition(labels, num_clients=10, alpha=0.1, seed=0))
    mild = skew(dirichlet_partition(labels, num_clients=10, alpha=0.5, seed=0))
    near_iid = skew(dirichlet_partition(labels, num_clients=10, alpha=1000.0, seed=0))
    assert skewed > mild > near_iid
    assert near_iid < 0.05


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_clients=0, alpha=0.5, seed=0),
        dict(num_clients=2, alpha=0.0, seed=0),
        dict(num_clients=2, alpha=float("nan"), seed=0),
        dict(num_clients=2, alpha=0.5, seed=-1),
        dict(num_clients=2, alpha=0.5, seed=0, min_size=0),
        dict(num_clients=20, alpha=0.5, seed=0, min_size=10),  # 100 labels cannot give 20 x 10
        dict(num_clients=True, alpha=0.5, seed=0),
    ],
)
def test_partition_refuses_bad_parameters(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        dirichlet_partition(np.repeat(np.arange(10), 10), **kwargs)


def test_partition_gives_up_with_a_clear_error() -> None:
    labels = np.repeat(np.arange(2), 50)
    with pytest.raises(ConfigError, match="draws"):
        dirichlet_partition(labels, num_clients=10, alpha=0.001, seed=0, min_size=10, max_tries=5)


def test_partition_refuses_bad_labels() -> None:
    for labels in (np.array([]), np.array([0.5, 1.0]), np.zeros((2, 2), dtype=int)):
        with pytest.raises(InputError):
            dirichlet_partition(labels, num_clients=1, alpha=1.0, seed=0, min_size=1)


def test_client_splits_hold_out_validation_per_client() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(10), 50)
    x = rng.integers(0, 256, (y.size, 28, 28), dtype=np.uint8)
    x[:, 0, 0] = np.arange(y.size) % 256  # not unique, but rows keep their label below
    splits = client_splits(x, y, num_clients=4, alpha=0.5, seed=1, validation_fraction=0.2)
    assert len(splits) == 4
    total = sum(len(s.y_fit) + len(s.y_val) for s in splits)
    assert total == y.size
    assert 0.1 * y.size < sum(len(s.y_val) for s in splits) < 0.3 * y.size  # 0.2 in expectation
    key = split_key(1, "fashion_mnist")
    for s in splits:
        assert s.x_fit.shape[1:] == (28, 28) and len(s.x_fit) == len(s.y_fit) and len(s.y_val) > 0
        # Record-stable: the client without its first fit row splits every other row as before.
        x_rest = np.concatenate([s.x_fit[1:], s.x_val])
        y_rest = np.concatenate([s.y_fit[1:], s.y_val])
        x_fit, y_fit, x_val, y_val = record_split(x_rest, y_rest, 0.2, key)
        assert np.array_equal(x_fit, s.x_fit[1:]) and np.array_equal(y_fit, s.y_fit[1:])
        assert np.array_equal(x_val, s.x_val) and np.array_equal(y_val, s.y_val)
    with pytest.raises(InputError):
        client_splits(x[:-1], y, num_clients=4, alpha=0.5, seed=1)
