"""MNIST in its original IDX format (gzip-compressed or raw), never downloaded.

Where the files are looked for, first match wins:

1. an explicit ``path`` (a directory holding the IDX files),
2. the ``FASTOPT_DATA`` environment variable: a directory holding the files,
   or a data root with an ``mnist/`` subdirectory,
3. only when ``FASTOPT_DATA`` is not set (a wrong setting is an error,
   not a fallback), and in a development checkout only: the data folder
   kept beside the repository (``../shared/data/mnist`` relative to the repository root),
   where the project's own tests and benchmarks find the 10k test set. An
   installed package has no such folder: use 1 or 2.

The IDX format: a big-endian header (two zero bytes, a type code, the number
of dimensions, then one uint32 per dimension), then the data. MNIST images
are magic 2051 (uint8, 3-D), labels magic 2049 (uint8, 1-D).
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

from .. import _validate as V

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_FILES = {"images": "{split}-images-idx3-ubyte", "labels": "{split}-labels-idx1-ubyte"}
_SPLITS = ("t10k", "train")


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (EOFError, OSError, gzip.BadGzipFile) as exc:
            raise ValueError(f"{path}: truncated or corrupt gzip stream ({exc})") from None
    return raw


def read_idx(path, expect_magic=None) -> np.ndarray:
    """Read one IDX file (gzip or raw, detected from its first bytes).

    Raises ValueError naming the file on a wrong magic number, a header
    that does not fit, or a data section shorter or longer than the header
    says.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise ValueError(f"{path}: truncated IDX file ({len(data)} bytes, no header)")
    magic = struct.unpack(">I", data[:4])[0]
    if expect_magic is not None and magic != expect_magic:
        raise ValueError(f"{path}: wrong magic number {magic} (0x{magic:08x}); expected "
                         f"{expect_magic} (0x{expect_magic:08x})")
    zero, code, ndim = data[0:2], data[2], data[3]
    if zero != b"\x00\x00" or code not in _IDX_TYPES or ndim == 0:
        raise ValueError(f"{path}: wrong magic number {magic} (0x{magic:08x}); not an IDX "
                         "file")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(data)} of {header} bytes)")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_TYPES[code])
    need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    have = len(data) - header
    if have < need:
        raise ValueError(f"{path}: truncated: header says shape {shape} ({need} bytes of "
                         f"data) but the file has {have}")
    if have > need:
        raise ValueError(f"{path}: {have - need} unexpected bytes after the data of shape "
                         f"{shape}")
    arr = np.frombuffer(data, dtype=dtype, count=need // dtype.itemsize, offset=header)
    return arr.reshape(shape).astype(dtype.newbyteorder("="), copy=False)


def _repo_default() -> Path:
    # fastopt/data/mnist.py -> repository root is two levels above the package dir
    return Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "mnist"


def _has_split(d: Path, split: str) -> bool:
    return any((d / (_FILES["images"].format(split=split) + ext)).exists()
               for ext in (".gz", ""))


def find_mnist(path=None, split="t10k") -> Path:
    """The directory holding MNIST's ``split`` files (see the module docstring)."""
    tried = []
    candidates = []
    if path is not None:
        candidates.append(("path", Path(path)))
    else:
        env = os.environ.get("FASTOPT_DATA")
        if env:     # the user's setting, and no other: a wrong one is an error
            candidates += [("FASTOPT_DATA", Path(env)), ("FASTOPT_DATA", Path(env) / "mnist")]
        else:
            candidates.append(("repository default", _repo_default()))
    for how, d in candidates:
        if d.is_dir() and _has_split(d, split):
            return d.resolve()
        tried.append(f"{d} ({how}{'' if d.is_dir() else ': no such folder'})")
    raise FileNotFoundError(
        f"MNIST {split} files ({_FILES['images'].format(split=split)}[.gz] and labels) not "
        f"found; looked in: {'; '.join(tried)}. Point fastopt at the directory holding "
        "them: --data-dir DIR on the command line, path=DIR in Python, or the FASTOPT_DATA "
        "environment variable. fastopt never downloads data.")


def _file(d: Path, kind: str, split: str) -> Path:
    base = _FILES[kind].format(split=split)
    for ext in (".gz", ""):
        if (d / (base + ext)).exists():
            return d / (base + ext)
    raise FileNotFoundError(f"{d}: no {base}[.gz]")


def load_mnist(path=None, split="t10k"):
    """``(images, labels)``: uint8 ``[N, 28, 28]`` and uint8 ``[N]``.

    ``split`` is "t10k" (the 10k test set) or "train" (60k, if you have it).
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {list(_SPLITS)}, got {split!r}")
    d = find_mnist(path, split)
    images = read_idx(_file(d, "images", split), IMAGES_MAGIC)
    labels = read_idx(_file(d, "labels", split), LABELS_MAGIC)
    if images.ndim != 3:
        raise ValueError(f"{d}: images must be 3-D [N, rows, cols], got shape {images.shape}")
    if labels.ndim != 1:
        raise ValueError(f"{d}: labels must be 1-D, got shape {labels.shape}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{d}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels


def mnist_split(path=None, n_train=8000, seed=0, dtype=np.float32):
    """A fixed, seeded train/held-out split of the 10k MNIST test set.

    Returns ``(X_train, y_train, X_heldout, y_heldout)``: images flattened
    to 784 features scaled to [0, 1] in ``dtype``, labels int64. The default
    (8000 / 2000, seed 0) is the split this project's experiments use.
    """
    n_train = V.check_int("n_train", n_train, low=1)
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):       # pixels / 255 are fractions
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    images, labels = load_mnist(path, "t10k")
    n = images.shape[0]
    if not 0 < n_train < n:
        raise ValueError(f"n_train must be in [1, {n - 1}], got {n_train}")
    order = np.random.default_rng(seed).permutation(n)
    X = images.reshape(n, -1).astype(dtype) / dtype.type(255)
    y = labels.astype(np.int64)
    tr, te = order[:n_train], order[n_train:]
    return X[tr], y[tr], X[te], y[te]
