"""The nn backends: which module runs the fused passes of a model's layers.

``numba`` (np.dot through NumPy's BLAS + ``@njit`` fused passes), ``cython``
(gemm through ``scipy.linalg.cython_blas`` + compiled passes, no JIT),
``numpy`` (the reference, the spec) and, asked for by name, ``cuda``
(:mod:`._cuda`). Each module has the same functions (``linear``,
``bias_act``, ``softmax_xent``, ``mse``, ``linear_grad_w``,
``linear_grad_x``, ``act_grad``); :mod:`.layers` calls them.
"""

from __future__ import annotations

from .._registry import LazyModules

# backend="auto" preference, fastest first (the nn benchmarks): numba's np.dot
# goes through NumPy's OpenBLAS, a few % faster here than SciPy's behind
# cython_blas. The cython backend needs no JIT (no first-run compile).
_MODULES = {
    "numba": "fastopt.nn._numba",
    "cython": "fastopt.nn._cython_backend",
    "numpy": "fastopt.nn._ref",
}
_REGISTRY = LazyModules(_MODULES, "nn backend", {"reference": "numpy"})


_pools = {}


def _pool(n):
    """A process-wide pool of ``n`` worker threads, created on first use."""
    pool = _pools.get(n)
    if pool is None:
        from concurrent.futures import ThreadPoolExecutor
        pool = _pools[n] = ThreadPoolExecutor(n, thread_name_prefix="fastopt-nn")
    return pool


def available_backends() -> list:
    """nn backends that import here, in ``backend="auto"`` preference order."""
    return _REGISTRY.available()


def get_backend(name="auto"):
    if name == "cuda":
        return _cuda_backend()
    return _REGISTRY.get(name)


def _cuda_backend():
    """:mod:`fastopt.nn._cuda`, or a ValueError saying in one line why not.
    Asked for by name only: "auto" stays on the CPU backends, and
    :func:`available_backends` lists those (importing numba-cuda to probe
    for a GPU is not free)."""
    try:
        from . import _cuda
    except ImportError as exc:
        raise ValueError(f"nn backend 'cuda' is not available here: {exc}") from None
    return _cuda
