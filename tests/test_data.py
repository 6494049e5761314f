"""fastopt.data: the MNIST IDX reader, its error messages and the fixed split."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from fastopt.data import find_mnist, load_mnist, mnist_split, read_idx
from fastopt.data import mnist as mnist_mod

REAL = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "mnist"
needs_real = pytest.mark.skipif(
    not (REAL / "t10k-images-idx3-ubyte.gz").exists(),
    reason="MNIST test set not at ../shared/data/mnist")


def _idx(arr: np.ndarray, magic=None) -> bytes:
    arr = np.asarray(arr, np.uint8)
    if magic is None:
        magic = 0x0800 + arr.ndim
    return struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def _write(d: Path, images, labels, gz=True, split="t10k", img_magic=None, lab_magic=None):
    d.mkdir(parents=True, exist_ok=True)
    for name, arr, magic in ((f"{split}-images-idx3-ubyte", images, img_magic),
                             (f"{split}-labels-idx1-ubyte", labels, lab_magic)):
        data = _idx(arr, magic)
        if gz:
            (d / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (d / name).write_bytes(data)
    return d


@pytest.fixture
def tiny():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (12, 28, 28), dtype=np.uint8), np.arange(12, dtype=np.uint8) % 10


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "raw"])
def test_round_trip(tmp_path, tiny, gz):
    images, labels = tiny
    d = _write(tmp_path / "m", images, labels, gz=gz)
    got_i, got_l = load_mnist(d)
    np.testing.assert_array_equal(got_i, images)
    np.testing.assert_array_equal(got_l, labels)
    assert got_i.dtype == np.uint8 and got_l.shape == (12,)


def test_wrong_magic(tmp_path, tiny):
    images, labels = tiny
    d = _write(tmp_path / "m", images, labels, img_magic=2049)
    with pytest.raises(ValueError, match=r"wrong magic number 2049 .*expected 2051"):
        load_mnist(d)
    p = tmp_path / "junk.idx"
    p.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ValueError, match="wrong magic number.*not an IDX file"):
        read_idx(p)


def test_truncated(tmp_path, tiny):
    images, labels = tiny
    data = _idx(images)
    p = tmp_path / "t10k-images-idx3-ubyte"
    p.write_bytes(data[:-100])
    with pytest.raises(ValueError, match=r"truncated: header says shape \(12, 28, 28\)"):
        read_idx(p)
    p.write_bytes(data[:10])
    with pytest.raises(ValueError, match="truncated IDX header"):
        read_idx(p)
    g = tmp_path / "x.gz"
    g.write_bytes(gzip.compress(data)[:-40])
    with pytest.raises(ValueError, match="truncated or corrupt gzip"):
        read_idx(g)
    p.write_bytes(data + b"\x00\x00")
    with pytest.raises(ValueError, match="2 unexpected bytes"):
        read_idx(p)


def test_mismatched_counts(tmp_path, tiny):
    images, labels = tiny
    d = _write(tmp_path / "m", images, labels[:11])
    with pytest.raises(ValueError, match="12 images but 11 labels"):
        load_mnist(d)


def test_search_order(tmp_path, tiny, monkeypatch):
    images, labels = tiny
    root = tmp_path / "data"
    _write(root / "mnist", images, labels)
    monkeypatch.setenv("FASTOPT_DATA", str(root))
    assert find_mnist() == (root / "mnist").resolve()
    monkeypatch.setenv("FASTOPT_DATA", str(root / "mnist"))
    assert find_mnist() == (root / "mnist").resolve()
    other = _write(tmp_path / "explicit", images[:3], labels[:3])
    assert load_mnist(other)[0].shape == (3, 28, 28)   # explicit path beats the env var
    # a FASTOPT_DATA that holds no MNIST is an error, even where the
    # repository's default folder has the files
    monkeypatch.setattr(mnist_mod, "_repo_default", lambda: root / "mnist")
    monkeypatch.setenv("FASTOPT_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="never downloads") as err:
        load_mnist()
    assert "repository default" not in str(err.value)
    # the three ways to point at the data, by the names a user types
    for way in ("--data-dir DIR", "path=DIR", "FASTOPT_DATA"):
        assert way in str(err.value)
    with pytest.raises(ValueError, match="split must be one of"):
        load_mnist(other, split="valid")


@needs_real
def test_real_mnist_test_set():
    images, labels = load_mnist(REAL)
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    assert np.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028,
                                            974, 1009]


@needs_real
def test_fixed_split():
    Xtr, ytr, Xte, yte = mnist_split(REAL)
    assert Xtr.shape == (8000, 784) and Xte.shape == (2000, 784)
    assert Xtr.dtype == np.float32 and ytr.dtype == np.int64
    assert 0.0 <= Xtr.min() and Xtr.max() <= 1.0
    again = mnist_split(REAL)
    np.testing.assert_array_equal(again[1], ytr)
    np.testing.assert_array_equal(again[3], yte)
    # disjoint halves that together are the whole set (compare by label counts)
    assert (np.bincount(ytr, minlength=10) + np.bincount(yte, minlength=10)).tolist() == \
        [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    other = mnist_split(REAL, seed=1)
    assert not np.array_equal(other[1], ytr)


def test_split_arguments_are_checked_first(tmp_path, tiny):
    """``n_train=8000.5`` failed on a slice, ``n_train=True`` passed as 1,
    and ``dtype=np.int32`` gave float64 without a word."""
    images, labels = tiny
    d = _write(tmp_path / "m", images, labels)
    for bad, err, match in ((8000.5, TypeError, "n_train must be an int"),
                            (True, TypeError, "n_train must be an int"),
                            (0, ValueError, "n_train must be >= 1")):
        with pytest.raises(err, match=match):
            mnist_split(d, n_train=bad)
    with pytest.raises(TypeError, match="dtype must be float32 or float64, got int32"):
        mnist_split(d, n_train=6, dtype=np.int32)
    X, _, _, _ = mnist_split(d, n_train=6, dtype=np.float64)
    assert X.dtype == np.float64 and X.max() <= 1
