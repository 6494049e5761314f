"""The compiled twin of :mod:`fastopt.backends.flat_ops`: the same functions
as Numba kernels.

* ``parallel=True`` over fixed chunks (vectors) or the table's tasks (SAM),
  each chunk's float64 partial sums added in chunk order afterwards, so a
  result does not depend on the thread count; small inputs run serially
  (a thread-pool launch costs more than it saves).
* fastmath off: the same IEEE operations in the same order as the NumPy
  reference, and NaN/inf stay visible (SAM's skip depends on it).
* Each operation is one call: a fused operation (``axpy_dot``: an axpy and
  the next dot product of L-BFGS's two-loop recursion; ``sam_fused``: SAM's
  norm pass and its scaled copy-and-add) reads memory once per pass.

The SAM kernels walk a param group's :class:`~fastopt.backends.tables.StepTable`
(addresses of the params and gradients, pieces and tasks), the layout the
optimizers' compiled steps use, so any layout is one call per group.
"""

from __future__ import annotations

import numpy as np
from numba import carray, njit, prange

from .._openmp import in_forked_child
# the operations that are one NumPy call already (no reduction to fuse)
from .flat_ops import copy, empty, from_host, negate, scale, to_host  # noqa: F401
from .numba_cpu import _as_pointer, _named, get_num_threads
from .tables import CHUNK
from .threads import SERIAL_MAX

from .._numba_cache import install as _fresh_cache

_fresh_cache()      # before the cache=True kernels: fastopt._numba_cache says why

name = "numba"

_OPTIONS = dict(cache=True, nogil=True, error_model="numpy", fastmath=False)
_jit = njit(**_OPTIONS)

# vector operations (mode of _vector_op)
_DOT, _AXPY, _AXPY_DOT, _SCALE_DOT, _PAIR, _ABS = range(6)
# SAM table operations (mode of _sam_table)
_NORM, _FUSED, _PERTURB, _RESTORE = range(4)


def _parallel(n, parts) -> bool:
    return n > SERIAL_MAX and parts > 1 and get_num_threads() > 1 and not in_forked_child()


# -- vectors ---------------------------------------------------------------------------

@_jit
def _vector_chunk(mode, a, x, y, z, lo, hi):
    """``mode``'s work on ``[lo, hi)``: two float64 partial sums."""
    s1, s2 = 0.0, 0.0
    ca = y.dtype.type(a)
    # unsigned bounds: no negative-index checks, so the loops can vectorise
    ulo, uhi = np.uint64(lo), np.uint64(hi)
    if mode == _DOT:
        for i in range(ulo, uhi):
            s1 += np.float64(x[i]) * np.float64(y[i])
    elif mode == _AXPY:
        for i in range(ulo, uhi):
            y[i] = y[i] + ca * x[i]
    elif mode == _AXPY_DOT:
        for i in range(ulo, uhi):
            yi = y[i] + ca * x[i]
            y[i] = yi
            s1 += np.float64(z[i]) * np.float64(yi)
    elif mode == _SCALE_DOT:
        for i in range(ulo, uhi):
            yi = y[i] * ca
            y[i] = yi
            s1 += np.float64(z[i]) * np.float64(yi)
    elif mode == _PAIR:        # x: g, y: pg -> g - pg, z: d -> a * d
        for i in range(ulo, uhi):
            yi = x[i] - y[i]
            si = z[i] * ca
            y[i] = yi
            z[i] = si
            s1 += np.float64(yi) * np.float64(si)
            s2 += np.float64(yi) * np.float64(yi)
    else:                      # _ABS: sum and max of |x|, NaN propagating
        for i in range(ulo, uhi):
            v = abs(np.float64(x[i]))
            s1 += v
            if v > s2 or v != v:     # a NaN stays
                s2 = v
    return s1, s2


def _vector_op(mode, a, x, y, z, partial):
    """Every chunk of ``mode`` (``prange``: compiled threaded and serial
    below), then the partial sums in chunk order (max for ``_ABS``)."""
    n = y.size
    nchunks = (n + CHUNK - 1) // CHUNK
    for c in prange(nchunks):
        s1, s2 = _vector_chunk(mode, a, x, y, z, c * CHUNK, min(n, (c + 1) * CHUNK))
        partial[c, 0] = s1
        partial[c, 1] = s2
    s1, s2 = 0.0, 0.0
    for c in range(nchunks):
        s1 += partial[c, 0]
        if mode == _ABS:
            m = partial[c, 1]
            if m > s2 or m != m:
                s2 = m
        else:
            s2 += partial[c, 1]
    return s1, s2


_vector_serial = _jit(_named(_vector_op, "_flat_vector_serial"))
_vector_parallel = njit(parallel=True, **_OPTIONS)(_named(_vector_op, "_flat_vector_parallel"))


def _run(mode, a, x, y, z):
    n = y.size
    nchunks = (n + CHUNK - 1) // CHUNK
    partial = np.empty((max(nchunks, 1), 2))
    run = _vector_parallel if _parallel(n, nchunks) else _vector_serial
    return run(mode, float(a), x, y, z, partial)


def dot(x, y) -> float:
    return float(_run(_DOT, 0.0, x, y, y)[0])


def axpy(a, x, y) -> None:
    _run(_AXPY, a, x, y, y)


def axpy_dot(a, x, y, z) -> float:
    return float(_run(_AXPY_DOT, a, x, y, z)[0])


def scale_dot(a, y, z) -> float:
    return float(_run(_SCALE_DOT, a, y, y, z)[0])


def pair_dots(t, g, pg, d) -> tuple:
    ys, yy = _run(_PAIR, t, g, pg, d)
    return float(ys), float(yy)


def abs_sum_max(x) -> tuple:
    s, m = _run(_ABS, 0.0, x, x, x)
    return float(s), float(m)


# -- SAM over a param group's table ----------------------------------------------------

@_jit
def _task_sumsq(t, waddr, gaddr, pk, plo, phi, tasks, like, adaptive):
    """Sum of ``g^2`` (``adaptive``: ``(p g)^2``) over task ``t``'s pieces."""
    acc = 0.0
    for j in range(tasks[t], tasks[t + 1]):
        n = phi[j]
        g = carray(_as_pointer(gaddr[pk[j]], like), (n,))
        ulo, uhi = np.uint64(plo[j]), np.uint64(n)
        if adaptive:
            p = carray(_as_pointer(waddr[pk[j]], like), (phi[j],))
            for i in range(ulo, uhi):
                x = np.float64(p[i]) * np.float64(g[i])
                acc += x * x
        else:
            for i in range(ulo, uhi):
                x = np.float64(g[i])
                acc += x * x
    return acc


@_jit
def _task_update(t, waddr, gaddr, soff, pk, plo, phi, tasks, e, like, c, adaptive, restore):
    """Task ``t``'s pieces: ``e = c g`` (``c p^2 g``) and ``p += e``, or with
    ``restore`` ``p -= e``."""
    for j in range(tasks[t], tasks[t + 1]):
        k = pk[j]
        n = phi[j]
        p = carray(_as_pointer(waddr[k], like), (n,))
        ek = e[soff[k]:soff[k] + n]
        ulo, uhi = np.uint64(plo[j]), np.uint64(n)
        if restore:
            for i in range(ulo, uhi):
                p[i] = p[i] - ek[i]
            continue
        g = carray(_as_pointer(gaddr[k], like), (n,))
        if adaptive:
            for i in range(ulo, uhi):
                ei = p[i] * p[i] * g[i] * c
                ek[i] = ei
                p[i] = p[i] + ei
        else:
            for i in range(ulo, uhi):
                ei = g[i] * c
                ek[i] = ei
                p[i] = p[i] + ei


def _sam_table(mode, waddr, gaddr, soff, pk, plo, phi, tasks, e, like, value, adaptive,
               partial, outcome):
    """SAM's pass(es) over one table in one call: ``_NORM`` the sum of
    squares; ``_FUSED`` that, then (when finite) the perturbation with
    scale ``rho / norm`` (``value`` is rho); ``_PERTURB`` with scale
    ``value``; ``_RESTORE``. Each pass that writes is counted in
    ``outcome[0]`` as its last act (so that a caller interrupted as it
    returns knows it ran), ``_FUSED`` with its sum of squares in
    ``outcome[1]`` (its return value is lost then). Returns the sum of
    squares (0 without a norm pass)."""
    ntasks = tasks.size - 1
    total = 0.0
    if mode == _NORM or mode == _FUSED:
        for t in prange(ntasks):
            partial[t] = _task_sumsq(t, waddr, gaddr, pk, plo, phi, tasks, like, adaptive)
        for t in range(ntasks):      # task order: independent of the thread count
            total += partial[t]
        if mode == _NORM or not np.isfinite(total):
            return total
        value = value / np.sqrt(total) if total > 0.0 else 0.0
    c = like.dtype.type(value)
    for t in prange(ntasks):
        _task_update(t, waddr, gaddr, soff, pk, plo, phi, tasks, e, like, c, adaptive,
                     mode == _RESTORE)
    outcome[1] = total
    outcome[0] += 1.0
    return total


_sam_serial = _jit(_named(_sam_table, "_flat_sam_serial"))
_sam_parallel = njit(parallel=True, **_OPTIONS)(_named(_sam_table, "_flat_sam_parallel"))


def _sam(mode, table, e, value, adaptive) -> float:
    like = table.__dict__.get("_flat_like")
    if like is None:
        like = table._flat_like = np.empty(0, table.dtype)
    if e is None:       # a pass that writes no e: any array of the dtype (one compilation)
        e = like
    run = _sam_parallel if _parallel(table.nelem, table.ntasks) else _sam_serial
    return float(run(mode, table.waddr, table.gaddr, table.soff, table.pk, table.plo,
                     table.phi, table.tasks, e, like, float(value), bool(adaptive),
                     table.partial, table.outcome_array))


def sam_sumsq(table, adaptive) -> float:
    return _sam(_NORM, table, None, 0.0, adaptive)


def sam_perturb(table, e, scale, adaptive) -> None:
    """``e_k = scale g_k`` and ``p_k += e_k``, counted in ``table.outcome[0]``."""
    _sam(_PERTURB, table, e, scale, adaptive)


def sam_fused(table, e, rho, adaptive) -> float:
    """The norm pass, then (finite) the perturbation, counted in
    ``table.outcome[0]`` with the sum of squares in ``table.outcome[1]``."""
    return _sam(_FUSED, table, e, rho, adaptive)


def sam_restore(table, e) -> None:
    """``p_k -= e_k``, counted in ``table.outcome[0]`` in the same call."""
    _sam(_RESTORE, table, e, 0.0, False)
