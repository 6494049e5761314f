"""Cython backend: thin adapter over the compiled kernels.

A threaded optimizer step runs on fastopt's own thread team
(``_cython/pool_impl.pxi``; OpenMP's outside Linux or with
``FASTOPT_THREAD_POOL=openmp``), the functional API's loops on OpenMP.
The kernels are built from one source for three targets (see setup.py):
the best one this CPU runs is imported, as NumPy dispatches its own SIMD
loops: x86-64-v4 (AVX-512), x86-64-v3 (AVX2 + FMA), or baseline x86-64.
"""

from __future__ import annotations

import os
import sys
import warnings

import numpy as np

from .._cpuinfo import SIMD_BUILDS, SIMD_CAP_VAR, cpuinfo_field
from .._openmp import env_threads, in_forked_child, on_fork_serial, short_spin
from .._warn import warn_user
from .compact import check_compact
from .lowp import bits
from .scalars import AdamScalars, SGDScalars, adam_element, sgd_element
from .tables import check_unshifted


def _numpy_cpu_features() -> dict:
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as cpu
    except ImportError:  # NumPy < 2
        from numpy.core._multiarray_umath import __cpu_features__ as cpu
    return cpu


#: features that NumPy before 2.4 does not list, as Linux's /proc/cpuinfo
#: names them (without them the AVX2 and AVX-512 builds were never loaded
#: there, silently: NumPy 1.26 to 2.3 said BMI, BMI2, LZCNT, MOVBE missing)
_CPUINFO_FLAGS = {"BMI": "bmi1", "BMI2": "bmi2", "LZCNT": "abm", "MOVBE": "movbe"}


def _cpuinfo_flags() -> frozenset:
    return frozenset((cpuinfo_field("flags") or "").split())


def _cpu_has(*features) -> bool:
    cpu = _numpy_cpu_features()
    missing = [f for f in features if not cpu.get(f, False)]
    if any(f in cpu or f not in _CPUINFO_FLAGS for f in missing):
        return False        # (one NumPy checked and found absent, or no other source)
    flags = _cpuinfo_flags() if missing else frozenset()
    return all(_CPUINFO_FLAGS[f] in flags for f in missing)


# X86_V3/X86_V4 are NumPy's own checks for the whole feature sets (newer
# NumPy); the explicit lists cover NumPy versions without those keys.
_V3 = ("X86_V3",) if _cpu_has("X86_V3") else (
    "AVX", "AVX2", "FMA3", "F16C", "BMI", "BMI2", "LZCNT", "MOVBE")
_V4 = ("X86_V4",) if _cpu_has("X86_V4") else (
    *_V3, "AVX512F", "AVX512CD", "AVX512BW", "AVX512DQ", "AVX512VL")


#: the SIMD builds, fastest first: (module, name, the CPU features it needs)
_BUILDS = tuple(zip(("kernels_v4", "kernels_v3", "kernels"), SIMD_BUILDS, (_V4, _V3, ())))


def cpu_runs(simd) -> bool:
    """Whether this CPU has the features build ``simd`` needs."""
    return _cpu_has(*dict((b[1], b[2]) for b in _BUILDS)[simd])


def _simd_cap() -> int:
    """Index into :data:`_BUILDS` of the fastest build allowed: a misspelt
    cap is named in a warning and ignored (refused, backend "auto" went on
    with Numba, unsaid, at several times the fixed cost per step)."""
    cap = os.environ.get(SIMD_CAP_VAR, "").strip()
    if not cap:
        return 0
    if cap not in SIMD_BUILDS:
        warn_user(f"{SIMD_CAP_VAR}={cap!r} ignored: use one of {', '.join(SIMD_BUILDS)} "
                  "(the fastest Cython build to load), or unset it", RuntimeWarning)
        return 0
    return SIMD_BUILDS.index(cap)


def _import_kernels(cap):
    """The fastest build this CPU can run, from ``_BUILDS[cap]`` down:
    ``(module, name)``."""
    for name, simd, needs in _BUILDS[cap:-1]:
        if _cpu_has(*needs):
            try:
                mod = __import__(f"{__package__}._cython.{name}", fromlist=["step"])
            except ImportError:      # a build without this variant (not x86-64)
                continue
            return mod, simd
    from ._cython import kernels
    return kernels, "baseline"


with short_spin():         # the extension links libgomp: see fastopt._openmp
    _cap = _simd_cap()
    _k, simd = _import_kernels(_cap)
#: the FASTOPT_CYTHON_SIMD cap in force (None: the fastest build the CPU runs)
simd_cap = SIMD_BUILDS[_cap] if _cap else None


def _refuse_a_stale_build(kernels):
    """An extension built before an optimizer was added (a checkout updated,
    or a new op's Python side written, without a rebuild) stepped it as
    SGD, with no error: such a build does not load (backend "auto" then
    picks another, and ``fastopt info`` says why)."""
    from . import scalars
    missing = sorted(k for k, v in vars(scalars).items()
                     if k.startswith("OP_") and v not in getattr(kernels, "KNOWN_OPS", ()))
    if missing:
        raise ImportError(f"the compiled Cython kernels ({kernels.__file__}) predate "
                          f"{', '.join(missing)} of fastopt.backends.scalars: rebuild them "
                          "(python setup.py build_ext --inplace, or pip install -e . again)")


_refuse_a_stale_build(_k)

name = "cython"
threaded = _k.OPENMP
compiled_tables = True     # steps a whole param group in one call (tables.py)

# The OpenMP workers are kept off the master thread's core (kernels_impl.pxi
# says why): not where the user binds threads themselves, or turns it off.
_BINDING_VARS = ("OMP_PROC_BIND", "OMP_PLACES", "GOMP_CPU_AFFINITY")


def _worker_placement() -> str:
    if not sys.platform.startswith("linux"):
        return "off (Linux only)"
    if os.environ.get("FASTOPT_PLACE_WORKERS") == "0":
        return "off (FASTOPT_PLACE_WORKERS=0)"
    bound = [v for v in _BINDING_VARS if os.environ.get(v)]
    if bound:
        return f"off ({bound[0]} is set: the user binds threads)"
    return "on: workers kept off the master thread's core (teams of up to 8 threads)"


worker_placement = _worker_placement()
_k.set_place_workers(worker_placement.startswith("on"))


def _thread_pool_setting() -> tuple[bool, int]:
    """Which team runs threaded steps (``_cython/pool_impl.pxi``):
    ``FASTOPT_THREAD_POOL`` = ``fastopt`` (default, Linux) or ``openmp``;
    ``FASTOPT_POOL_SPIN_US``: how long a worker waits awake for the next
    job, in microseconds (default 50). A value it cannot use is named in a
    warning and the default taken: the backend stays usable."""
    kind = os.environ.get("FASTOPT_THREAD_POOL", "fastopt").strip().lower()
    if kind not in ("fastopt", "openmp"):
        warnings.warn(f"FASTOPT_THREAD_POOL={kind!r} is not 'fastopt' or 'openmp': "
                      "using 'fastopt'", RuntimeWarning, stacklevel=2)
        kind = "fastopt"
    spin = os.environ.get("FASTOPT_POOL_SPIN_US", "50").strip()
    if not spin.isdigit() or int(spin) > 1_000_000:
        warnings.warn(f"FASTOPT_POOL_SPIN_US={spin!r} is not microseconds from 0 to "
                      "1000000: using 50", RuntimeWarning, stacklevel=2)
        spin = "50"
    return kind == "fastopt", int(spin)


_k.set_thread_pool(*_thread_pool_setting())
thread_pool = _k.thread_pool


def step(table, el, buffers, gscale, max_norm=0.0, inv_scale=1.0, norm_mode=0,
         parallel=True, compact=None):
    """One step over ``table`` (see :mod:`fastopt.backends.tables`) with the
    group's state ``buffers`` in kernel order; returns ``(unscaled norm,
    skipped)``. ``compact``: None for float state, else the
    :class:`~fastopt.backends.compact.CompactStep` of code ``buffers``.

    A table offset (``table.shift``, SAM's restore) is read by the kernels
    (its address is in the header) and cleared once a step applied it; a
    skipped step leaves it pending (see :meth:`StepTable.set_shift`)."""
    st0, st1, st2 = table.state_addresses(buffers, compact)
    if compact is None:
        out = _k.step(table.header_addr, el.op, st0, st1, st2, el.values, el.flags, gscale,
                      max_norm, inv_scale, norm_mode, parallel)
        if table.shift is not None and not out[1]:
            table.clear_shift()
        return out
    check_unshifted(table)
    check_compact(table, el)
    kind, codes, absmax, signed = table.compact_header
    return _k.step(table.header_addr, el.op, 0, 0, 0, el.values, el.flags, gscale,
                   max_norm, inv_scale, norm_mode, parallel,
                   (kind, codes, absmax, compact.keys, signed))


def gather(table, grads) -> bool:
    """Point ``table`` at ``grads`` (a list of arrays), each checked in C;
    False when one does not pass (the caller's full checks say why)."""
    return _k.gather(grads, table.params, table.addrs["gaddr"], table.written_addr,
                     table.written.size // 2, table.addrs["given"]) == -1


def params_as_given(table) -> bool:
    """Whether ``table``'s params are still as it recorded them (checked in C)."""
    return _k.params_as_given(table.params, table.addrs["given"]) == -1


def list_step(tables, buffers, nparams):
    """``run(grads, els, values, threaded=False, opt=None, last_lr=None,
    max_norm=-1.0, norm_mode=0)``: the whole step of ``tables`` (small
    tables, one or more groups' worth, or one table of any size, threaded
    when ``threaded`` says so) in one native call: every table's grads
    checked and read from the list of ``nparams`` arrays first, then (with
    ``norm_mode``, several small tables) their global norm and clip, then
    each table updated with its element step ``els[k]`` and ``values[k]``
    in place of that one's values. For float state ``buffers[k]`` (a tuple
    per table), valid while they are the tables' state. Returns True (with
    a norm: the norm), or False when a grad does not pass, an offset is set
    or the norm is not finite, with nothing written. ``opt``: the optimizer
    whose counters the same call then advances (see ``ListStep``)."""
    rows = np.zeros((len(tables), 8), np.int64)
    keep = []
    for k, (t, bufs) in enumerate(zip(tables, buffers)):
        st = t.state_addresses(bufs)          # may re-derive the written ranges
        rows[k] = ((t.addrs["gaddr"], t.written_addr, t.written.size // 2, t.header_addr) + st
                   + (t.addrs["given"],))
        keep.append((t, bufs, t.written))
    at = [None] if len(tables) == 1 else [tuple(t.index_global) for t in tables]
    return _k.ListStep([t.params for t in tables], at, rows, nparams, keep).run


def sumsq_table(table) -> float:
    a = table.addrs
    return _k.sumsq_table(table.compute, table.store, a["gaddr"], a["pk"], a["plo"], a["phi"],
                          a["tasks"], table.ntasks, table.nelem, a["partial"])


# Per-array entry points (the functional API). 16-bit arrays go in as
# integer views of their bits (uint16: bfloat16, int16: float16); ``out`` is
# the 16-bit params under mixed precision.

def adam_update(p, g, m, v, vmax, s: AdamScalars, out=None) -> None:
    el = adam_element(s, vmax is not None)
    _k.update(el.op, p, bits(g), bits(out), m, v, vmax, el.values, el.flags, el.grad_scale)


def sgd_update(p, g, buf, s: SGDScalars, out=None) -> None:
    el = sgd_element(s, buf is not None)
    _k.update(el.op, p, bits(g), bits(out), buf, None, None, el.values, el.flags,
              el.grad_scale)


def sumsq(x) -> float:
    return _k.sumsq(bits(x))


def widen(src, dst) -> None:
    _k.widen(bits(src), dst)


def narrow(src, dst) -> None:
    _k.narrow(src, bits(dst))

scale = _k.scale
get_num_threads = _k.get_num_threads


def set_num_threads(n: int) -> None:
    # a forked child stays on one thread: OpenMP's team is the parent's
    _k.set_num_threads(1 if in_forked_child() else n)


on_fork_serial(_k.set_num_threads)
if in_forked_child():      # first imported after a fork
    _k.set_num_threads(1)
elif env_threads():
    _k.set_num_threads(env_threads())
