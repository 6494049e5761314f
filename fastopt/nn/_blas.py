"""Stacked matmuls through NumPy's BLAS (``np.dot`` with ``out=``).

One sgemm/dgemm call per model, written straight into the caller's
workspace or gradient view (each model's block is C-contiguous; only the
stride between models is arbitrary, and a shared batch is a stride-0
broadcast). BLAS runs its own threads; nothing else runs alongside it.
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np

_controllers = None
_lock = threading.Lock()


def _blas_libraries():
    """threadpoolctl's handles on the BLAS libraries loaded now (NumPy's, and
    SciPy's for the cython backend), found once: listing them walks every
    loaded shared object, setting their threads is a plain C call."""
    global _controllers
    if _controllers is None:
        from threadpoolctl import ThreadpoolController
        _controllers = [c for c in ThreadpoolController().lib_controllers
                        if c.user_api == "blas"]
    return _controllers


def blas_threads() -> int:
    """Threads the loaded BLAS libraries run a matmul on now (the most of
    them; ~2 us: a C call per library)."""
    return max((c.num_threads for c in _blas_libraries()), default=1)


_depth = 0
_saved = []


@contextlib.contextmanager
def single_threaded_blas():
    """Every loaded BLAS on one thread for the block, then as it was: the
    caller runs its own threads, each calling BLAS (one level of parallelism
    at a time, as DESIGN.md asks). Nested or concurrent blocks restore the
    threads when the last one ends."""
    global _depth, _saved
    with _lock:
        if _depth == 0:
            libs = _blas_libraries()
            _saved = [(c, c.num_threads) for c in libs]
            for c in libs:
                c.set_num_threads(1)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for c, n in _saved:
                    c.set_num_threads(n)


def linear(X, W, Z):
    """``Z[k] = X[k] @ W[k]``."""
    for k in range(Z.shape[0]):
        np.dot(X[k], W[k], out=Z[k])


def linear_grad_w(X, D, gW):
    """``gW[k] = X[k]^T @ D[k]`` (into a view of the flat gradient buffer)."""
    for k in range(D.shape[0]):
        np.dot(X[k].T, D[k], out=gW[k])


def linear_grad_x(D, W, DX):
    """``DX[k] = D[k] @ W[k]^T``."""
    for k in range(D.shape[0]):
        np.dot(D[k], W[k].T, out=DX[k])
