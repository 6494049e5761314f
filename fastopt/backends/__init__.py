"""Backend registry.

A backend is a small math-only module exposing the same four functions over
1-D contiguous arrays, updated in place:

``adam_update(p, g, m, v, vmax, s)``, ``sgd_update(p, g, buf, s)``,
``sumsq(x) -> float`` and ``scale(x, c)``,

with the per-step scalars ``s`` from :mod:`fastopt.backends.scalars`.
Modules load lazily: ``import fastopt`` does not import Numba.

``"cuda"`` (:mod:`fastopt.backends.numba_cuda`) works on device arrays. It
is listed only where it imports (numba-cuda installed and a GPU, or the CUDA
simulator, usable), and ``"auto"`` never picks it: host arrays stay on the
CPU backends (the optimizers pick it for device arrays themselves).
"""

from __future__ import annotations

import contextlib

from .. import _openmp
from .._registry import LazyModules

# Preference order for backend="auto": fastest first. Measured with
# `fastopt bench` on the 2-core AVX-512 VM, Cython is as fast as Numba or
# faster for every layout and size: plain lists of 1000 x 1k AdamW 225 vs
# 315 us, a one-element step's fixed cost 6 vs 15 us (Numba's dispatcher
# types each of the table step's 21 arguments), packed 1M 0.24 vs 0.25+ ms,
# 16M level (both at the memory roofline).
_MODULES = {
    "cython": "fastopt.backends.cython_cpu",
    "numba": "fastopt.backends.numba_cpu",
    "numpy": "fastopt.backends.reference",
    "cuda": "fastopt.backends.numba_cuda",
}
#: backends whose arrays live on a device: never chosen by "auto" for host arrays
DEVICE_BACKENDS = ("cuda",)
_ALIASES = {"reference": "numpy"}
_REGISTRY = LazyModules(_MODULES, "backend", _ALIASES, never_auto=DEVICE_BACKENDS)
_load = _REGISTRY.load


def available_backends() -> list:
    """Names of the backends that import on this machine, fastest first."""
    return _REGISTRY.available()


def get_backend(name: str = "auto"):
    """The backend module for ``name`` ("auto", "numba", "cython", "numpy", "cuda").

    "auto" is the fastest available CPU backend; "cuda" must be asked for
    (or is picked by the optimizers when their params are device arrays)."""
    return _REGISTRY.get(name)


def is_device_array(a) -> bool:
    """A GPU array: exposes ``__cuda_array_interface__`` (numba, CuPy, torch
    CUDA), or is the CUDA simulator's stand-in. Never imports numba."""
    if isinstance(a, (list, tuple)):
        a = a[0] if a else None
        if isinstance(a, dict):   # param groups: look at the first group's params
            return is_device_array(a.get("params"))
    return a is not None and not isinstance(a, (str, bytes, dict)) and \
        type(a).__module__ != "numpy" and (hasattr(a, "__cuda_array_interface__")
                                           or type(a).__name__ == "FakeCUDAArray")


def backend_for(name, arrays) -> str:
    """``name``, except that "auto" becomes "cuda" for device arrays (host
    arrays keep "auto": it never picks cuda for them)."""
    if name == "auto" and is_device_array(arrays):
        return "cuda"
    return name


def auto_backend() -> str:
    """The backend ``backend="auto"`` picks for host arrays here."""
    return _REGISTRY.get("auto").name


def thread_pools() -> dict:
    """The thread pools a step shares the cores with, as fastopt sees them:
    the BLAS and OpenMP libraries loaded in this process (threadpoolctl),
    Numba's threading layer and fastopt's own thread count."""
    out = {"fastopt_threads": get_num_threads()}
    numba_mod = _REGISTRY.loaded("numba")
    if numba_mod is not None:
        import numba
        try:
            out["numba_threading_layer"] = numba.threading_layer()
        except ValueError:           # no parallel region has run yet
            out["numba_threading_layer"] = "not started"
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        out["pools"] = "threadpoolctl not installed"
        return out
    out["pools"] = [{k: p.get(k) for k in ("user_api", "internal_api", "num_threads",
                                           "version", "architecture", "filepath")
                     if p.get(k) is not None} for p in threadpool_info()]
    return out


def backend_info() -> dict:
    """What each backend is and whether it runs threaded."""
    info = {}
    for name in _MODULES:
        mod = _load(name)
        if mod is None:
            info[name] = {"available": False, "reason": _REGISTRY.reason(name)}
        else:
            info[name] = {"available": True, "threaded": bool(mod.threaded)}
            if hasattr(mod, "simd"):
                info[name]["simd"] = mod.simd
            if getattr(mod, "simd_cap", None):
                info[name]["simd_cap"] = f"FASTOPT_CYTHON_SIMD={mod.simd_cap}"
            if hasattr(mod, "get_num_threads"):
                info[name]["num_threads"] = mod.get_num_threads()
            if mod.threaded:
                info[name]["openmp_wait"] = _openmp.wait_policy()
            if mod.threaded and hasattr(mod, "worker_placement"):
                info[name]["worker_placement"] = mod.worker_placement
            if mod.threaded and hasattr(mod, "thread_pool"):
                kind, workers, spin = mod.thread_pool()
                info[name]["thread_team"] = {"kind": kind, "workers_started": workers,
                                             "spin_us": spin}
    return info


def set_num_threads(n: int) -> None:
    """Threads for every threaded CPU backend: Numba's ``prange``, and the
    Cython step's own thread team (and its OpenMP loops).

    The step kernels never call BLAS, so limiting these threads is enough to
    avoid oversubscription inside a step.
    """
    from .._validate import check_int
    n = check_int("n", n, low=1)
    for name in ("numba", "cython"):
        mod = _load(name)
        if mod is not None:
            mod.set_num_threads(n)


@contextlib.contextmanager
def kernel_threads(n: int):
    """Every threaded CPU backend on ``n`` threads for the block, then as
    before (on this thread: Numba's count is per thread)."""
    # only the ones already loaded: a hot-path call must not import a backend
    mods = [m for m in map(_REGISTRY.loaded, ("numba", "cython")) if m is not None]
    saved = [m.get_num_threads() for m in mods]
    # (Numba's count on this thread alone: its set_num_threads is the process's)
    setters = [getattr(m, "set_threads_here", m.set_num_threads) for m in mods]
    for set_n in setters:
        set_n(n)
    try:
        yield
    finally:
        for set_n, k in zip(setters, saved):
            set_n(k)


def get_num_threads() -> int:
    """The threads a threaded CPU step of ``backend="auto"`` uses
    (:func:`set_num_threads`; by default, for the Cython step,
    ``OMP_NUM_THREADS`` where it is set, else the CPUs this process may run
    on; for Numba's, ``NUMBA_NUM_THREADS``)."""
    # the auto backend's (Numba's said 2 while the Cython step ran on 1), and
    # without loading Numba where Cython is there
    mod = _load("cython") or _load("numba")
    return mod.get_num_threads() if mod is not None else 1
