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

# 16-bit storage: bfloat16 arrives as a uint16 view, float16 as an int16 view
# (lowp.py explains the formulas; the Numba backend uses the same ones).
cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    static inline float fo_f32_from_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
    static inline uint32_t fo_bits_from_f32(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
    /* Branch-free select: with ?: gcc sinks the float work feeding one side
       into a branch (it may trap) and then will not vectorise the loop. */
    static inline uint32_t fo_sel(int c, uint32_t a, uint32_t b) {
        uint32_t m = 0u - (uint32_t)c; return (a & m) | (b & ~m);
    }
    static inline float fo_bf16_to_f32(uint16_t h) { return fo_f32_from_bits((uint32_t)h << 16); }
    static inline uint16_t fo_f32_to_bf16(float x) {
        uint32_t b = fo_bits_from_f32(x);
        uint32_t r = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
        return (uint16_t)fo_sel((b & 0x7FFFFFFFu) > 0x7F800000u,
                                ((b >> 16) & 0x8000u) | 0x7FC0u, r);
    }
    static inline float fo_f16_to_f32(int16_t hs) {
        uint32_t u = (uint16_t)hs, em = u & 0x7FFFu;
        uint32_t f = fo_bits_from_f32(fo_f32_from_bits(em << 13) * 0x1p112f);
        f = fo_sel(em >= 0x7C00u, (em << 13) | 0x7F800000u, f);
        return fo_f32_from_bits(f | ((u & 0x8000u) << 16));
    }
    static inline int16_t fo_f32_to_f16(float x) {
        uint32_t b = fo_bits_from_f32(x), sign = (b >> 16) & 0x8000u, a = b & 0x7FFFFFFFu;
        uint32_t r = (a - (112u << 23) + 0xFFFu + ((a >> 13) & 1u)) >> 13;
        uint32_t sub = fo_bits_from_f32(fo_f32_from_bits(a) + 0.5f) - 0x3F000000u;
        uint32_t m = (a & 0x7FFFFFu) >> 13;
        r = fo_sel(a < 0x38800000u, sub, r);
        r = fo_sel(a >= 0x47800000u, 0x7C00u, r);
        r = fo_sel(a > 0x7F800000u, 0x7C00u | m | (uint32_t)(m == 0), r);
        return (int16_t)(uint16_t)(r | sign);
    }
    """
    float fo_bf16_to_f32(unsigned short h) noexcept nogil
    unsigned short fo_f32_to_bf16(float x) noexcept nogil
    float fo_f16_to_f32(short h) noexcept nogil
    short fo_f32_to_f16(float x) noexcept nogil

ctypedef fused floating:
    float
    double

ctypedef unsigned short bf16_bits   # bfloat16 as the bits of a uint16 view
ctypedef short f16_bits             # float16 as the bits of an int16 view

# What the params and grads are stored as: the compute type itself, or
# 16 bits with a float32 master copy.
ctypedef fused storage:
    float
    double
    bf16_bits
    f16_bits

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


cdef inline floating _load(const storage* a, Py_ssize_t i, floating like) noexcept nogil:
    """``a[i]`` in the compute type (resolved at compile time)."""
    if storage is bf16_bits:
        return fo_bf16_to_f32(a[i])
    elif storage is f16_bits:
        return fo_f16_to_f32(a[i])
    else:
        return <floating>a[i]


cdef inline void _store(storage* out, Py_ssize_t i, float x) noexcept nogil:
    """Mixed precision: write the rounded master value (no-op otherwise)."""
    if storage is bf16_bits:
        out[i] = fo_f32_to_bf16(x)
    elif storage is f16_bits:
        out[i] = fo_f32_to_f16(x)


cdef inline Py_ssize_t _nchunks(Py_ssize_t n) noexcept nogil:
    return (n + CHUNK - 1) // CHUNK


cdef inline bint _serial(Py_ssize_t n) noexcept nogil:
    return n <= SERIAL_MAX or _num_threads == 1


cdef inline void _adam_loop(floating* p, const storage* g, floating* m, floating* v,
                      floating* vmax, storage* out, Py_ssize_t start, Py_ssize_t stop,
                      floating step_size, floating bc2_sqrt, floating beta1,
                      floating omb1, floating beta2, floating omb2, floating eps,
                      floating l2, floating decay, floating grad_scale,
                      bint use_l2) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating gi, mi, vi, pi
    # One division per element instead of torch's two: gcc (without
    # -ffast-math) will not turn the loop-invariant division by bc2_sqrt into
    # a multiply by itself, and on the portable SSE2 build divisions and
    # square roots, not memory, bound this loop. Differs from torch by at
    # most an ulp.
    cdef floating inv_bc2 = 1 / bc2_sqrt
    for i in range(start, stop):
        gi = _load(g, i, grad_scale) * grad_scale
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
        pi = p[i] * decay - step_size * mi / (_sqrt(vi) * inv_bc2 + eps)
        p[i] = pi
        _store(out, i, pi)


cdef void _adam_chunk(floating* p, const storage* g, floating* m, floating* v,
                      floating* vmax, storage* out, Py_ssize_t start, Py_ssize_t stop,
                      floating step_size, floating bc2_sqrt, floating beta1,
                      floating omb1, floating beta2, floating omb2, floating eps,
                      floating l2, floating decay, floating grad_scale,
                      bint use_l2) noexcept nogil:
    # Unswitched by hand: each call below inlines the loop with constant
    # flags, so every variant is branch-free and vectorises. gcc unswitches
    # the float32 loop by itself, but gives up on the larger 16-bit bodies.
    if vmax == NULL:
        if use_l2:
            _adam_loop(p, g, m, v, NULL, out, start, stop, step_size, bc2_sqrt, beta1,
                       omb1, beta2, omb2, eps, l2, decay, grad_scale, True)
        else:
            _adam_loop(p, g, m, v, NULL, out, start, stop, step_size, bc2_sqrt, beta1,
                       omb1, beta2, omb2, eps, l2, decay, grad_scale, False)
    elif use_l2:
        _adam_loop(p, g, m, v, vmax, out, start, stop, step_size, bc2_sqrt, beta1,
                   omb1, beta2, omb2, eps, l2, decay, grad_scale, True)
    else:
        _adam_loop(p, g, m, v, vmax, out, start, stop, step_size, bc2_sqrt, beta1,
                   omb1, beta2, omb2, eps, l2, decay, grad_scale, False)


def adam_update(floating[::1] p, const storage[::1] g, floating[::1] m,
                floating[::1] v, floating[::1] vmax, storage[::1] out, double step_size,
                double bc2_sqrt, double beta1, double omb1, double beta2,
                double omb2, double eps, double l2, double decay,
                double grad_scale, bint use_l2):
    """One Adam/AdamW step in place; ``vmax`` is None unless amsgrad; ``out``
    is None unless ``g`` is 16-bit (then the rounded ``p`` is written there)."""
    cdef Py_ssize_t n = p.shape[0], c
    if n == 0:
        return
    cdef floating* pp = &p[0]
    cdef const storage* gp = &g[0]
    cdef storage* op = &out[0] if out is not None else NULL
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
            _adam_chunk(pp, gp, mp, vp, vmp, op, 0, n, s0, s1, s2, s3, s4, s5, s6,
                        s7, s8, s9, use_l2)
        else:
            for c in prange(_nchunks(n), schedule="static", num_threads=_num_threads):
                _adam_chunk(pp, gp, mp, vp, vmp, op, c * CHUNK, min(n, (c + 1) * CHUNK),
                            s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, use_l2)


cdef inline void _sgd_loop(floating* p, const storage* g, floating* buf, storage* out,
                           Py_ssize_t start, Py_ssize_t stop, floating lr, floating l2,
                           floating grad_scale, floating buf_decay, floating grad_coef,
                           floating momentum, bint use_l2, bint nesterov) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating gi, b, pi
    for i in range(start, stop):
        gi = _load(g, i, grad_scale) * grad_scale
        if use_l2:
            gi = gi + l2 * p[i]
        if buf != NULL:
            b = buf_decay * buf[i] + grad_coef * gi
            buf[i] = b
            if nesterov:
                gi = gi + momentum * b
            else:
                gi = b
        pi = p[i] - lr * gi
        p[i] = pi
        _store(out, i, pi)


cdef void _sgd_chunk(floating* p, const storage* g, floating* buf, storage* out,
                     Py_ssize_t start, Py_ssize_t stop, floating lr, floating l2,
                     floating grad_scale, floating buf_decay, floating grad_coef,
                     floating momentum, bint use_l2, bint nesterov) noexcept nogil:
    # Unswitched by hand, as _adam_chunk (nesterov only matters with a buffer).
    if buf == NULL:
        if use_l2:
            _sgd_loop(p, g, NULL, out, start, stop, lr, l2, grad_scale, buf_decay,
                      grad_coef, momentum, True, False)
        else:
            _sgd_loop(p, g, NULL, out, start, stop, lr, l2, grad_scale, buf_decay,
                      grad_coef, momentum, False, False)
    elif use_l2:
        if nesterov:
            _sgd_loop(p, g, buf, out, start, stop, lr, l2, grad_scale, buf_decay,
                      grad_coef, momentum, True, True)
        else:
            _sgd_loop(p, g, buf, out, start, stop, lr, l2, grad_scale, buf_decay,
                      grad_coef, momentum, True, False)
    elif nesterov:
        _sgd_loop(p, g, buf, out, start, stop, lr, l2, grad_scale, buf_decay,
                  grad_coef, momentum, False, True)
    else:
        _sgd_loop(p, g, buf, out, start, stop, lr, l2, grad_scale, buf_decay,
                  grad_coef, momentum, False, False)


def sgd_update(floating[::1] p, const storage[::1] g, floating[::1] buf,
               storage[::1] out, double lr, double l2, double grad_scale, double buf_decay,
               double grad_coef, double momentum, bint use_l2, bint nesterov):
    """One SGD step in place; ``buf`` is None without momentum."""
    cdef Py_ssize_t n = p.shape[0], c
    if n == 0:
        return
    cdef floating* pp = &p[0]
    cdef const storage* gp = &g[0]
    cdef storage* op = &out[0] if out is not None else NULL
    cdef floating* bp = &buf[0] if buf is not None else NULL
    cdef floating s0 = <floating>lr, s1 = <floating>l2, s2 = <floating>grad_scale
    cdef floating s3 = <floating>buf_decay, s4 = <floating>grad_coef
    cdef floating s5 = <floating>momentum
    with nogil:
        if _serial(n):
            _sgd_chunk(pp, gp, bp, op, 0, n, s0, s1, s2, s3, s4, s5, use_l2, nesterov)
        else:
            for c in prange(_nchunks(n), schedule="static", num_threads=_num_threads):
                _sgd_chunk(pp, gp, bp, op, c * CHUNK, min(n, (c + 1) * CHUNK),
                           s0, s1, s2, s3, s4, s5, use_l2, nesterov)


cdef double _sumsq_chunk(const storage* x, Py_ssize_t start,
                         Py_ssize_t stop) noexcept nogil:
    # Eight independent float64 accumulators: the adds pipeline without
    # -ffast-math, and the summation order is fixed by the code, not the
    # compiler or the thread count.
    cdef double a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0
    cdef Py_ssize_t i = start
    cdef double x0, x1, x2, x3, x4, x5, x6, x7
    cdef double w = 0   # only selects the float64 load
    while i + 8 <= stop:
        x0 = _load(x, i, w); x1 = _load(x, i + 1, w); x2 = _load(x, i + 2, w)
        x3 = _load(x, i + 3, w); x4 = _load(x, i + 4, w); x5 = _load(x, i + 5, w)
        x6 = _load(x, i + 6, w); x7 = _load(x, i + 7, w)
        a0 += x0 * x0; a1 += x1 * x1; a2 += x2 * x2; a3 += x3 * x3
        a4 += x4 * x4; a5 += x5 * x5; a6 += x6 * x6; a7 += x7 * x7
        i += 8
    while i < stop:
        x0 = _load(x, i, w)
        a0 += x0 * x0
        i += 1
    return ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))


def sumsq(const storage[::1] x):
    """Sum of squares in float64, independent of the thread count."""
    cdef Py_ssize_t n = x.shape[0], c, nchunks = _nchunks(x.shape[0])
    if n == 0:
        return 0.0
    cdef const storage* xp = &x[0]
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


def widen(const storage[::1] src, float[::1] dst):
    """16-bit ``src`` (uint16: bfloat16, int16: float16) -> float32 ``dst``."""
    cdef Py_ssize_t i
    cdef float w = 0
    for i in range(src.shape[0]):
        dst[i] = _load(&src[0], i, w)


def narrow(const float[::1] src, storage[::1] dst):
    """float32 ``src`` -> 16-bit ``dst``, round to nearest even."""
    cdef Py_ssize_t i
    for i in range(src.shape[0]):
        _store(&dst[0], i, src[i])
