"""Numba CPU backend: ``@njit(parallel=True)`` kernels.

Layout of every kernel: a serial ``*_chunk`` function that updates
``[start, stop)`` and a parallel driver that splits the array into fixed
chunks and runs them under ``prange``. Small arrays call the chunk function
directly, skipping the thread pool's launch cost. Reductions sum their
per-chunk float64 partials in chunk order, so the result does not depend on
the thread count.

Conventions (see DESIGN.md): scalars arrive already cast to the array dtype,
so the loops contain no float64 literal that would promote float32 math;
``fastmath`` is an explicit subset without ``nnan``/``ninf``, so NaN and inf
propagate and stay visible.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange
from numba.core import types
from numba.extending import intrinsic

from .scalars import AdamScalars, SGDScalars

name = "numba"
threaded = True

# contract: fused multiply-add; arcp/reassoc: vectorised division and
# reductions; nsz: ignore the sign of zero. No nnan/ninf/afn.
FASTMATH = {"contract", "arcp", "reassoc", "nsz"}
CHUNK = 1 << 14          # elements per parallel work item (64 KiB of float32)
SERIAL_MAX = 1 << 15     # below this a thread-pool launch costs more than it saves

# error_model="numpy": a float division by zero gives inf/nan as in NumPy
# instead of a ZeroDivisionError check inside the loop.
_OPTIONS = dict(fastmath=FASTMATH, cache=True, nogil=True, error_model="numpy")
_jit = njit(**_OPTIONS)
_pjit = njit(parallel=True, **_OPTIONS)


@intrinsic
def _sqrt(typingctx, x):
    """sqrt as the ``llvm.sqrt`` intrinsic, in the argument's own precision.

    Numba lowers ``math.sqrt``/``np.sqrt`` on scalars to a libm call
    (``sqrtf``), which LLVM will not vectorise; the intrinsic vectorises to
    ``vsqrtps`` and still returns NaN for negative input.
    """
    if not isinstance(x, types.Float):
        return None

    def codegen(context, builder, signature, args):
        fn = builder.module.declare_intrinsic("llvm.sqrt", [args[0].type])
        return builder.call(fn, args)

    return x(x), codegen


# Chunk bounds are unsigned: with a signed runtime start Numba must emit a
# negative-index wraparound check for every access, which stops LLVM from
# vectorising the loop.
_U0 = np.uint64(0)


@_jit
def _span(c, n):
    """Unsigned [start, stop) of chunk ``c`` of an ``n``-element array."""
    return np.uint64(c * CHUNK), np.uint64(min(n, (c + 1) * CHUNK))


@_jit
def _adam_chunk(p, g, m, v, vmax, start, stop, step_size, bc2_sqrt, beta1, omb1,
                beta2, omb2, eps, l2, decay, grad_scale, use_l2):
    for i in range(start, stop):
        gi = g[i] * grad_scale
        if use_l2:
            gi += l2 * p[i]
        mi = beta1 * m[i] + omb1 * gi
        vi = beta2 * v[i] + omb2 * gi * gi
        m[i] = mi
        v[i] = vi
        if vmax is not None:  # amsgrad; resolved at compile time
            # np.maximum semantics: a NaN on either side propagates. The
            # builtin max(a, b) keeps ``a`` when b is NaN, which would hide
            # a NaN gradient in the amsgrad state.
            vm = vmax[i]
            if vm > vi or vm != vm:
                vi = vm
            vmax[i] = vi
        denom = _sqrt(vi) / bc2_sqrt + eps
        p[i] = p[i] * decay - step_size * mi / denom


@_pjit
def _adam_parallel(p, g, m, v, vmax, *scalars):
    n = p.size
    for c in prange((n + CHUNK - 1) // CHUNK):
        start, stop = _span(c, n)
        _adam_chunk(p, g, m, v, vmax, start, stop, *scalars)


@_jit
def _sgd_chunk(p, g, buf, start, stop, lr, l2, grad_scale, buf_decay, grad_coef,
               momentum, use_l2, nesterov):
    for i in range(start, stop):
        gi = g[i] * grad_scale
        if use_l2:
            gi += l2 * p[i]
        if buf is not None:  # momentum; resolved at compile time
            b = buf_decay * buf[i] + grad_coef * gi
            buf[i] = b
            if nesterov:
                gi += momentum * b
            else:
                gi = b
        p[i] = p[i] - lr * gi


@_pjit
def _sgd_parallel(p, g, buf, *scalars):
    n = p.size
    for c in prange((n + CHUNK - 1) // CHUNK):
        start, stop = _span(c, n)
        _sgd_chunk(p, g, buf, start, stop, *scalars)


@_jit
def _sumsq_chunk(x, start, stop):
    acc = 0.0  # float64 accumulator on purpose
    for i in range(start, stop):
        xi = np.float64(x[i])
        acc += xi * xi
    return acc


@_pjit
def _sumsq_parallel(x):
    n = x.size
    nchunks = (n + CHUNK - 1) // CHUNK
    partial = np.empty(nchunks, dtype=np.float64)
    for c in prange(nchunks):
        start, stop = _span(c, n)
        partial[c] = _sumsq_chunk(x, start, stop)
    total = 0.0
    for c in range(nchunks):  # fixed order: independent of the thread count
        total += partial[c]
    return total


@_jit
def _scale_chunk(x, start, stop, c):
    for i in range(start, stop):
        x[i] *= c


@_pjit
def _scale_parallel(x, c):
    n = x.size
    for k in prange((n + CHUNK - 1) // CHUNK):
        start, stop = _span(k, n)
        _scale_chunk(x, start, stop, c)


def _cast(t, values):
    # Every non-flag scalar becomes the array's dtype: an int or a float64
    # here would promote the whole float32 loop to float64.
    return tuple(x if isinstance(x, bool) else t(x) for x in values)


def adam_update(p, g, m, v, vmax, s: AdamScalars) -> None:
    scalars = _cast(p.dtype.type, s)
    # vmax / buf are None when amsgrad / momentum are off: Numba then compiles
    # a specialisation without that array, which keeps the loop vectorisable.
    if p.size <= SERIAL_MAX:
        _adam_chunk(p, g, m, v, vmax, _U0, np.uint64(p.size), *scalars)
    else:
        _adam_parallel(p, g, m, v, vmax, *scalars)


def sgd_update(p, g, buf, s: SGDScalars) -> None:
    scalars = _cast(p.dtype.type, s)
    if p.size <= SERIAL_MAX:
        _sgd_chunk(p, g, buf, _U0, np.uint64(p.size), *scalars)
    else:
        _sgd_parallel(p, g, buf, *scalars)


def sumsq(x) -> float:
    # One chunk is summed identically by both paths, so the result is the
    # same whichever runs.
    if x.size <= CHUNK:
        return float(_sumsq_chunk(x, _U0, np.uint64(x.size)))
    return float(_sumsq_parallel(x))


def scale(x, c: float) -> None:
    c = x.dtype.type(c)
    if x.size <= SERIAL_MAX:
        _scale_chunk(x, _U0, np.uint64(x.size), c)
    else:
        _scale_parallel(x, c)


def set_num_threads(n: int) -> None:
    import numba
    numba.set_num_threads(n)


def get_num_threads() -> int:
    import numba
    return numba.get_num_threads()
