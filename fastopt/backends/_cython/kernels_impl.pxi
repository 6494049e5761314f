"""Cython + OpenMP kernels: typed memoryviews, ``prange`` over fixed chunks.

Mirrors the Numba backend chunk for chunk: a ``nogil`` helper updates
``[start, stop)`` of raw pointers (a plain loop gcc vectorises with
``-O3 -fno-math-errno``), and the ``def`` entry points run it over fixed
chunks under ``prange(schedule='static')``. The Python wrapper
(``cython_cpu.py``) has already validated every index and shape, so bounds
and wraparound checks are off here.

This body is compiled twice (see setup.py): ``kernels`` for baseline
x86-64 (SSE2) and ``kernels_v3`` for x86-64-v3 (AVX2 + FMA), picked at import
time by what the CPU reports, as NumPy dispatches its own SIMD loops. The
source is one; only the compiler's target differs.
"""

import numpy as np

from cython.parallel cimport prange
from libc.math cimport sqrt, sqrtf

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define FASTOPT_OPENMP 1
    static int fastopt_max_threads(void) { return omp_get_max_threads(); }
    #else
    #define FASTOPT_OPENMP 0
    static int fastopt_max_threads(void) { return 1; }
    #endif
    """
    int FASTOPT_OPENMP
    int fastopt_max_threads() nogil

ctypedef fused floating:
    float
    double

cdef enum:
    CHUNK = 16384        # elements per parallel work item
    SERIAL_MAX = 32768   # below this, threads cost more than they save

OPENMP = bool(FASTOPT_OPENMP)
cdef int _num_threads = fastopt_max_threads()


def set_num_threads(int n):
    global _num_threads
    _num_threads = n if OPENMP else 1


def get_num_threads():
    return _num_threads


cdef inline floating _sqrt(floating x) noexcept nogil:
    if floating is float:
        return sqrtf(x)
    else:
        return sqrt(x)


cdef inline Py_ssize_t _nchunks(Py_ssize_t n) noexcept nogil:
    return (n + CHUNK - 1) // CHUNK


cdef inline bint _serial(Py_ssize_t n) noexcept nogil:
    return n <= SERIAL_MAX or _num_threads == 1


cdef void _adam_chunk(floating* p, const floating* g, floating* m, floating* v,
                      floating* vmax, Py_ssize_t start, Py_ssize_t stop,
                      floating step_size, floating bc2_sqrt, floating beta1,
                      floating omb1, floating beta2, floating omb2, floating eps,
                      floating l2, floating decay, floating grad_scale,
                      bint use_l2) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating gi, mi, vi
    # One division per element instead of torch's two: gcc (without
    # -ffast-math) will not turn the loop-invariant division by bc2_sqrt into
    # a multiply by itself, and on the portable SSE2 build divisions and
    # square roots, not memory, bound this loop. Differs from torch by at
    # most an ulp.
    cdef floating inv_bc2 = 1 / bc2_sqrt
    for i in range(start, stop):
        gi = g[i] * grad_scale
        if use_l2:
            gi = gi + l2 * p[i]
        mi = beta1 * m[i] + omb1 * gi
        vi = beta2 * v[i] + omb2 * gi * gi
        m[i] = mi
        v[i] = vi
        if vmax != NULL:
            # np.maximum semantics: a NaN on either side propagates.
            if vmax[i] > vi or vmax[i] != vmax[i]:
                vi = vmax[i]
            vmax[i] = vi
        p[i] = p[i] * decay - step_size * mi / (_sqrt(vi) * inv_bc2 + eps)


def adam_update(floating[::1] p, const floating[::1] g, floating[::1] m,
                floating[::1] v, floating[::1] vmax, double step_size,
                double bc2_sqrt, double beta1, double omb1, double beta2,
                double omb2, double eps, double l2, double decay,
                double grad_scale, bint use_l2):
    """One Adam/AdamW step in place; ``vmax`` is None unless amsgrad."""
    cdef Py_ssize_t n = p.shape[0], c
    if n == 0:
        return
    cdef floating* pp = &p[0]
    cdef const floating* gp = &g[0]
    cdef floating* mp = &m[0]
    cdef floating* vp = &v[0]
    cdef floating* vmp = &vmax[0] if vmax is not None else NULL
    # Scalars drop to the array dtype once, outside the loop.
    cdef floating s0 = <floating>step_size, s1 = <floating>bc2_sqrt
    cdef floating s2 = <floating>beta1, s3 = <floating>omb1, s4 = <floating>beta2
    cdef floating s5 = <floating>omb2, s6 = <floating>eps, s7 = <floating>l2
    cdef floating s8 = <floating>decay, s9 = <floating>grad_scale
    with nogil:
        if _serial(n):
            _adam_chunk(pp, gp, mp, vp, vmp, 0, n, s0, s1, s2, s3, s4, s5, s6,
                        s7, s8, s9, use_l2)
        else:
            for c in prange(_nchunks(n), schedule="static", num_threads=_num_threads):
                _adam_chunk(pp, gp, mp, vp, vmp, c * CHUNK, min(n, (c + 1) * CHUNK),
                            s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, use_l2)


cdef void _sgd_chunk(floating* p, const floating* g, floating* buf,
                     Py_ssize_t start, Py_ssize_t stop, floating lr, floating l2,
                     floating grad_scale, floating buf_decay, floating grad_coef,
                     floating momentum, bint use_l2, bint nesterov) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating gi, b
    for i in range(start, stop):
        gi = g[i] * grad_scale
        if use_l2:
            gi = gi + l2 * p[i]
        if buf != NULL:
            b = buf_decay * buf[i] + grad_coef * gi
            buf[i] = b
            if nesterov:
                gi = gi + momentum * b
            else:
                gi = b
        p[i] = p[i] - lr * gi


def sgd_update(floating[::1] p, const floating[::1] g, floating[::1] buf,
               double lr, double l2, double grad_scale, double buf_decay,
               double grad_coef, double momentum, bint use_l2, bint nesterov):
    """One SGD step in place; ``buf`` is None without momentum."""
    cdef Py_ssize_t n = p.shape[0], c
    if n == 0:
        return
    cdef floating* pp = &p[0]
    cdef const floating* gp = &g[0]
    cdef floating* bp = &buf[0] if buf is not None else NULL
    cdef floating s0 = <floating>lr, s1 = <floating>l2, s2 = <floating>grad_scale
    cdef floating s3 = <floating>buf_decay, s4 = <floating>grad_coef
    cdef floating s5 = <floating>momentum
    with nogil:
        if _serial(n):
            _sgd_chunk(pp, gp, bp, 0, n, s0, s1, s2, s3, s4, s5, use_l2, nesterov)
        else:
            for c in prange(_nchunks(n), schedule="static", num_threads=_num_threads):
                _sgd_chunk(pp, gp, bp, c * CHUNK, min(n, (c + 1) * CHUNK),
                           s0, s1, s2, s3, s4, s5, use_l2, nesterov)


cdef double _sumsq_chunk(const floating* x, Py_ssize_t start,
                         Py_ssize_t stop) noexcept nogil:
    # Eight independent float64 accumulators: the adds pipeline without
    # -ffast-math, and the summation order is fixed by the code, not the
    # compiler or the thread count.
    cdef double a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0
    cdef Py_ssize_t i = start
    cdef double x0, x1, x2, x3, x4, x5, x6, x7
    while i + 8 <= stop:
        x0 = x[i]; x1 = x[i + 1]; x2 = x[i + 2]; x3 = x[i + 3]
        x4 = x[i + 4]; x5 = x[i + 5]; x6 = x[i + 6]; x7 = x[i + 7]
        a0 += x0 * x0; a1 += x1 * x1; a2 += x2 * x2; a3 += x3 * x3
        a4 += x4 * x4; a5 += x5 * x5; a6 += x6 * x6; a7 += x7 * x7
        i += 8
    while i < stop:
        x0 = x[i]
        a0 += x0 * x0
        i += 1
    return ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))


def sumsq(const floating[::1] x):
    """Sum of squares in float64, independent of the thread count."""
    cdef Py_ssize_t n = x.shape[0], c, nchunks = _nchunks(x.shape[0])
    if n == 0:
        return 0.0
    cdef const floating* xp = &x[0]
    if nchunks == 1:
        return _sumsq_chunk(xp, 0, n)
    cdef double[::1] partial = np.empty(nchunks, dtype=np.float64)
    cdef double total = 0
    with nogil:
        for c in prange(nchunks, schedule="static", num_threads=_num_threads):
            partial[c] = _sumsq_chunk(xp, c * CHUNK, min(n, (c + 1) * CHUNK))
        for c in range(nchunks):  # fixed order
            total += partial[c]
    return total


cdef void _scale_chunk(floating* x, Py_ssize_t start, Py_ssize_t stop,
                       floating c) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(start, stop):
        x[i] = x[i] * c


def scale(floating[::1] x, double c):
    """``x *= c`` in the array's dtype."""
    cdef Py_ssize_t n = x.shape[0], k
    if n == 0:
        return
    cdef floating* xp = &x[0]
    cdef floating cc = <floating>c
    with nogil:
        if _serial(n):
            _scale_chunk(xp, 0, n, cc)
        else:
            for k in prange(_nchunks(n), schedule="static", num_threads=_num_threads):
                _scale_chunk(xp, k * CHUNK, min(n, (k + 1) * CHUNK), cc)
