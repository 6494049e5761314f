"""Shared pieces of the asv suite.

Every measurement goes through :mod:`fastopt.bench`, the package behind
``fastopt bench`` and the CI regression guard, and every case comes from
:mod:`fastopt.bench.cases`, so the three report the same quantities of the
same workloads. asv skips a parameter combination whose ``setup`` raises
NotImplementedError: that is how a missing torch, backend or GPU shows up
("n/a" in the tables) instead of failing the run.
"""

import os
import tracemalloc

import fastopt
from fastopt.bench import cases, ratios, steps, timing


def _check_measured_checkout():
    """``asv run --python=same`` imports the fastopt installed in this
    environment (asv drops PYTHONPATH). Where that is another checkout's
    editable install, its code would be measured and filed under this
    checkout's commit: refused, saying how to measure this one."""
    here = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    imported = os.path.dirname(os.path.dirname(os.path.realpath(fastopt.__file__)))
    if imported != here and os.path.isfile(os.path.join(imported, "pyproject.toml")):
        raise ImportError(
            f"these benchmarks are {here}'s, but fastopt is imported from the checkout "
            f"{imported} (an editable install or PYTHONPATH): the numbers would be that code's, filed "
            f"under this checkout's commit. Measure this checkout with ASV_PYTHONPATH={here} "
            "(after pip install 'Cython>=3.1' and python setup.py build_ext --inplace there), "
            "or pip install -e . in it")


_check_measured_checkout()

# Implementations timed by the ``time_*`` benchmarks: fastopt's fast
# backends, then the baselines. "numpy" is the straightforward NumPy step a
# user would write (not fastopt's reference backend).
CPU_IMPLS = [*cases.CPU_BACKENDS, "numpy", *cases.TORCH_PATHS]
# Implementations whose ratios the ``track_*`` benchmarks report.
FASTOPT_BACKENDS = list(cases.CPU_BACKENDS)

SIZES = cases.ASV_SIZES
DTYPES = cases.ASV_DTYPES

# setup_cache measures a whole matrix in one process (the ratios must be
# same-run); give it room on a slow machine.
CACHE_TIMEOUT = 900


def build_step(impl, kind, shapes, dtype="float32", clip=False, layout="packed",
               state="float32"):
    """A warmed-up step callable, or NotImplementedError (asv: skipped)."""
    fn, note = steps.make_step(impl, kind, shapes, dtype, clip, layout, state)
    if fn is None:
        raise NotImplementedError(note)
    timing.warm_up(fn)   # compile (Numba), fault pages in, the first steps' checks
    return fn


def require_backend(name):
    if name not in fastopt.available_backends():
        raise NotImplementedError(f"backend {name!r} not available")


def temporary_bytes(fn):
    """Peak bytes allocated by one call of ``fn`` beyond what it started with
    (NumPy reports its buffers to tracemalloc): for fastopt's in-place step,
    only the Python objects of the call (hundreds of bytes to about 2 kB,
    whatever the size of the params); a NumPy step's temporaries are whole
    arrays."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        fn()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def ratio_matrix(rows, impls, rounds=3):
    """``{case_key: {impl: {"gbps", "roofline", "numpy", "torch", "torch_best"}}}``
    for ``rows = {key: fastopt.bench.cases.Row}``, each case timed in one
    interleaved comparison (with every torch path, so that ``torch_best`` is
    torch's fastest in that case)."""
    out = {}
    for key, row in rows.items():
        results = ratios.compare(row, impls=(*impls, "roofline", "numpy", *cases.TORCH_PATHS),
                                 rounds=rounds)
        speedups = ratios.speedups(results)
        out[key] = {r.impl: dict(speedups[r.impl], gbps=r.gbps) for r in results}
    return out


#: the ``threads`` param of the nn ratio classes: every library on one
#: thread in one process, or each at its default in its own process
THREADS = ["1", "default"]


def by_threads(bench_fn):
    """``{threads: bench_fn(...)}`` for each of :data:`THREADS`: a
    :mod:`fastopt.bench.nn` benchmark's ratios (3 rounds) for the
    ``setup_cache`` of a class with a ``threads`` param."""
    return {"1": bench_fn(rounds=3, threads=1), "default": bench_fn(rounds=3, threads=None)}


try:
    # raised inside a benchmark (not its setup), only this subclass of
    # NotImplementedError makes asv record n/a instead of a failure
    from asv_runner.benchmarks.mark import SkipNotImplemented
except ImportError:          # run outside asv (tests): any NotImplementedError
    SkipNotImplemented = NotImplementedError


def lookup(cache, *keys):
    """``cache[k0][k1]...``, or SkipNotImplemented (asv: n/a) when any level
    is missing or the value could not be measured (no torch, or an optimizer
    torch lacks, for the torch ratios)."""
    value = cache
    for k in keys:
        value = value.get(k) if isinstance(value, dict) else None
    if value is None:
        raise SkipNotImplemented(f"not measured: {' / '.join(map(str, keys))}")
    return value


class _RatioTracks:
    """``track_*`` benchmarks of same-run ratios, for a subclass that defines

    * ``params``/``param_names`` whose last entry is the fastopt backend;
    * ``setup_cache`` returning :func:`ratio_matrix` (define it in the
      subclass: asv keys the cache by the function's source line, so an
      inherited one would be shared between classes);
    * ``case_key(*params)``: the cache key of the case the params select.

    The leading underscore keeps asv from collecting this base class itself.
    """

    def setup(self, cache, *params):
        require_backend(params[-1])

    def _get(self, cache, params, metric):
        return lookup(cache, self.case_key(*params[:-1]), params[-1], metric)

    def track_gbps(self, cache, *params):
        return self._get(cache, params, "gbps")

    track_gbps.unit = "GB/s"

    def track_fraction_of_roofline(self, cache, *params):
        return self._get(cache, params, "roofline")

    track_fraction_of_roofline.unit = "fraction of streaming kernel"

    def track_speedup_vs_numpy(self, cache, *params):
        return self._get(cache, params, "numpy")

    track_speedup_vs_numpy.unit = "x NumPy"

    def track_speedup_vs_torch_fused(self, cache, *params):
        return self._get(cache, params, "torch")

    track_speedup_vs_torch_fused.unit = "x torch fused"

    def track_speedup_vs_torch_best(self, cache, *params):
        """Against torch's fastest path in the same run (fused, foreach or
        for-loop, whichever won that case)."""
        return self._get(cache, params, "torch_best")

    track_speedup_vs_torch_best.unit = "x torch's fastest"
