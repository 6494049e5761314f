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
from llvmlite import ir
from numba import njit, prange
from numba.core import types
from numba.extending import intrinsic, overload

from .._openmp import start_numba_threads
from .lowp import bits
from .scalars import AdamScalars, SGDScalars

name = "numba"
threaded = True
start_numba_threads()     # the omp layer loads libgomp: see fastopt._openmp

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


# -- 16-bit storage ---------------------------------------------------------------
# Low-precision arrays arrive as integer views of their bits: uint16 is
# bfloat16, int16 is float16 (see lowp.py for the formulas). ``_widen`` and
# ``_narrow`` dispatch on that type at compile time; for float32/float64
# arrays they are the identity, so the fast path compiles exactly as before.

# The conversions are written as LLVM IR on 32-bit integers: in Python
# syntax Numba widens uint32 arithmetic to uint64, which halves the vector
# width of these loops.

def _ir_consts(width):
    t = ir.IntType(width)
    return t, (lambda v: ir.Constant(t, v))


@intrinsic
def _bf16_to_f32(typingctx, h):
    """bfloat16 bits (uint16) -> float32: ``h << 16``, exact."""
    if h != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        i32, c = _ir_consts(32)
        b = builder.shl(builder.zext(args[0], i32), c(16))
        return builder.bitcast(b, ir.FloatType())

    return types.float32(h), codegen


@intrinsic
def _f32_to_bf16(typingctx, x):
    """float32 -> bfloat16 bits, round to nearest even; NaN -> 0x7fc0 | sign."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        i32, c = _ir_consts(32)
        b = builder.bitcast(args[0], i32)
        hi = builder.lshr(b, c(16))
        r = builder.lshr(builder.add(builder.add(b, c(0x7FFF)), builder.and_(hi, c(1))), c(16))
        nan = builder.or_(builder.and_(hi, c(0x8000)), c(0x7FC0))
        isnan = builder.fcmp_unordered("uno", args[0], args[0])
        return builder.trunc(builder.select(isnan, nan, r), ir.IntType(16))

    return types.uint16(x), codegen


@intrinsic
def _f16_to_f32(typingctx, h):
    """float16 bits (int16) -> float32, exact (subnormals, inf, NaN payloads)."""
    if h != types.int16:
        return None

    def codegen(context, builder, signature, args):
        i32, c = _ir_consts(32)
        f32 = ir.FloatType()
        u = builder.zext(args[0], i32)
        em = builder.and_(u, c(0x7FFF))
        shifted = builder.shl(em, c(13))
        scaled = builder.fmul(builder.bitcast(shifted, f32), ir.Constant(f32, 2.0 ** 112))
        special = builder.icmp_unsigned(">=", em, c(0x7C00))
        f = builder.select(special, builder.or_(shifted, c(0x7F800000)),
                           builder.bitcast(scaled, i32))
        sign = builder.shl(builder.and_(u, c(0x8000)), c(16))
        return builder.bitcast(builder.or_(f, sign), f32)

    return types.float32(h), codegen


@intrinsic
def _f32_to_f16(typingctx, x):
    """float32 -> float16 bits, round to nearest even, NaN as NumPy converts it."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        i32, c = _ir_consts(32)
        f32 = ir.FloatType()
        b = builder.bitcast(args[0], i32)
        sign = builder.and_(builder.lshr(b, c(16)), c(0x8000))
        a = builder.and_(b, c(0x7FFFFFFF))
        odd = builder.and_(builder.lshr(a, c(13)), c(1))
        normal = builder.lshr(builder.add(builder.add(builder.sub(a, c(112 << 23)), c(0xFFF)),
                                          odd), c(13))
        half = builder.fadd(builder.bitcast(a, f32), ir.Constant(f32, 0.5))
        sub = builder.sub(builder.bitcast(half, i32), c(0x3F000000))
        m = builder.lshr(builder.and_(a, c(0x7FFFFF)), c(13))
        nan = builder.or_(builder.or_(c(0x7C00), m),
                          builder.zext(builder.icmp_unsigned("==", m, c(0)), i32))
        r = builder.select(builder.icmp_unsigned("<", a, c(0x38800000)), sub, normal)
        r = builder.select(builder.icmp_unsigned(">=", a, c(0x47800000)), c(0x7C00), r)
        r = builder.select(builder.icmp_unsigned(">", a, c(0x7F800000)), nan, r)
        return builder.trunc(builder.or_(r, sign), ir.IntType(16))

    return types.int16(x), codegen


def _widen(x):
    """Stored value -> compute value (identity for float32/float64)."""


def _narrow(x, like):
    """float32 ``x`` -> the storage type of array ``like``."""


@overload(_widen, jit_options=_OPTIONS)
def _widen_impl(x):
    if isinstance(x, types.Float):
        return lambda x: x
    if x == types.uint16:
        return lambda x: _bf16_to_f32(x)
    if x == types.int16:
        return lambda x: _f16_to_f32(x)
    return None


@overload(_narrow, jit_options=_OPTIONS)
def _narrow_impl(x, like):
    if like.dtype == types.uint16:
        return lambda x, like: _f32_to_bf16(x)
    if like.dtype == types.int16:
        return lambda x, like: _f32_to_f16(x)
    return None


@_jit
def _widen_array(src, dst):
    for i in range(src.size):
        dst[i] = _widen(src[i])


@_jit
def _narrow_array(src, dst):
    for i in range(src.size):
        dst[i] = _narrow(src[i], dst)


# -- the kernels ---------------------------------------------------------------------
# One general kernel per algorithm. ``p`` (and the state) are in the compute
# dtype; ``g`` is in the params' storage dtype; ``out`` is None, or (mixed
# precision) the 16-bit params, written as the rounded ``p`` in the same pass.
# None arguments are resolved at compile time: no branch in the loop.

@_jit
def _adam_chunk(p, g, m, v, vmax, out, start, stop, step_size, bc2_sqrt, beta1, omb1,
                beta2, omb2, eps, l2, decay, grad_scale, use_l2):
    for i in range(start, stop):
        gi = _widen(g[i]) * grad_scale
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
        pi = p[i] * decay - step_size * mi / denom
        p[i] = pi
        if out is not None:  # mixed precision; resolved at compile time
            out[i] = _narrow(pi, out)


@_pjit
def _adam_parallel(p, g, m, v, vmax, out, *scalars):
    n = p.size
    for c in prange((n + CHUNK - 1) // CHUNK):
        start, stop = _span(c, n)
        _adam_chunk(p, g, m, v, vmax, out, start, stop, *scalars)


@_jit
def _sgd_chunk(p, g, buf, out, start, stop, lr, l2, grad_scale, buf_decay, grad_coef,
               momentum, use_l2, nesterov):
    for i in range(start, stop):
        gi = _widen(g[i]) * grad_scale
        if use_l2:
            gi += l2 * p[i]
        if buf is not None:  # momentum; resolved at compile time
            b = buf_decay * buf[i] + grad_coef * gi
            buf[i] = b
            if nesterov:
                gi += momentum * b
            else:
                gi = b
        pi = p[i] - lr * gi
        p[i] = pi
        if out is not None:  # mixed precision; resolved at compile time
            out[i] = _narrow(pi, out)


@_pjit
def _sgd_parallel(p, g, buf, out, *scalars):
    n = p.size
    for c in prange((n + CHUNK - 1) // CHUNK):
        start, stop = _span(c, n)
        _sgd_chunk(p, g, buf, out, start, stop, *scalars)


@_jit
def _sumsq_chunk(x, start, stop):
    acc = 0.0  # float64 accumulator on purpose
    for i in range(start, stop):
        xi = np.float64(_widen(x[i]))
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


def adam_update(p, g, m, v, vmax, s: AdamScalars, out=None) -> None:
    scalars = _cast(p.dtype.type, s)
    # vmax / buf / out are None when amsgrad / momentum / mixed precision are
    # off: Numba then compiles a specialisation without that array, which
    # keeps the loop vectorisable.
    g, out = bits(g), bits(out)
    if p.size <= SERIAL_MAX:
        _adam_chunk(p, g, m, v, vmax, out, _U0, np.uint64(p.size), *scalars)
    else:
        _adam_parallel(p, g, m, v, vmax, out, *scalars)


def sgd_update(p, g, buf, s: SGDScalars, out=None) -> None:
    scalars = _cast(p.dtype.type, s)
    g, out = bits(g), bits(out)
    if p.size <= SERIAL_MAX:
        _sgd_chunk(p, g, buf, out, _U0, np.uint64(p.size), *scalars)
    else:
        _sgd_parallel(p, g, buf, out, *scalars)


def widen(src, dst) -> None:
    """16-bit ``src`` (bfloat16/float16) -> float32 ``dst``, elementwise."""
    _widen_array(bits(src), dst)


def narrow(src, dst) -> None:
    """float32 ``src`` -> 16-bit ``dst`` (bfloat16/float16), rounded to nearest even."""
    _narrow_array(src, bits(dst))


def sumsq(x) -> float:
    # One chunk is summed identically by both paths, so the result is the
    # same whichever runs.
    x = bits(x)
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
