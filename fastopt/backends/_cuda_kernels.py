"""The CUDA kernels of the ``cuda`` backend (see ``numba_cuda.py``).

Kept apart from the backend so they import (and compile to PTX with
``numba.cuda.compile_ptx``) on a machine without a GPU: the backend module
refuses to import there, this one does not.
"""

from __future__ import annotations

import math

import numpy as np
from numba import config, cuda, types
from llvmlite import ir
from numba.core.extending import intrinsic, overload

from . import elements
from .scalars import F_AMSGRAD, F_MOMENTUM, AdamElement, SGDElement


def _numpy_2_5_stand_in(tup):   # pragma: no cover - never called
    raise AttributeError("numpy.row_stack was removed in NumPy 2.5; use numpy.vstack")


def _load_cuda_array_typing():
    """Load numba-cuda's NumPy array typing with NumPy >= 2.5 too.

    numba-cuda (0.30.4, the newest release when written) registers an
    overload for ``np.row_stack`` whenever NumPy >= 2.0, but NumPy 2.5
    removed it, so the first kernel compile fails with "module 'numpy' has
    no attribute 'row_stack'" (seen on an H200 with numpy 2.5.2; numba's CPU
    target already checks for < 2.5). While that module loads, ``np.row_stack``
    is a stand-in nothing calls; it is removed right after, so NumPy's
    namespace is left as it was.
    """
    if hasattr(np, "row_stack") or getattr(config, "ENABLE_CUDASIM", False):
        return
    np.row_stack = _numpy_2_5_stand_in
    try:
        import numba.cuda.np.arrayobj  # noqa: F401
    except ImportError:   # pragma: no cover - another numba-cuda layout: nothing to do
        pass
    finally:
        del np.row_stack


_load_cuda_array_typing()

#: threads per block (a power of two: the tree reduction needs it). The
#: simulator runs each thread as a Python thread, so it gets small blocks.
THREADS = 64 if getattr(config, "ENABLE_CUDASIM", False) else 256

_BF16_BITS = np.dtype(np.uint16)


# -- 16-bit storage ---------------------------------------------------------------
# Python bodies serve the simulator (it runs kernels as Python); the
# overloads below are what the CUDA target compiles.

def _widen(x):
    """Stored value -> compute value (float32 for 16-bit storage)."""
    if isinstance(x, np.uint16):
        return np.array([np.uint32(x) << np.uint32(16)], np.uint32).view(np.float32)[0]
    if isinstance(x, np.float16):
        return np.float32(x)
    return x


def _narrow(x, like):
    """float32 ``x`` -> the storage type of array ``like``."""
    if like.dtype == _BF16_BITS:
        b = int(np.array([x], np.float32).view(np.uint32)[0])
        if x != x:
            return np.uint16(((b >> 16) & 0x8000) | 0x7FC0)
        return np.uint16((b + 0x7FFF + ((b >> 16) & 1)) >> 16)
    return like.dtype.type(x)


@overload(_widen, target="cuda")
def _widen_cuda(x):
    if isinstance(x, types.Float) and x.bitwidth >= 32:
        return lambda x: x
    if x == types.float16:
        return lambda x: types.float32(x)
    if x == types.uint16:
        def bf16(x):
            # bit cast through a one-element local array: NVVM turns it into
            # one ``mov.b32`` (no local memory traffic)
            tmp = cuda.local.array(1, types.uint32)
            tmp[0] = types.uint32(x) << types.uint32(16)
            return tmp.view(np.float32)[0]
        return bf16
    return None


@overload(_narrow, target="cuda")
def _narrow_cuda(x, like):
    if like.dtype == types.float16:
        return lambda x, like: types.float16(x)
    if like.dtype == types.uint16:
        def bf16(x, like):
            tmp = cuda.local.array(1, types.float32)
            tmp[0] = x
            b = tmp.view(np.uint32)[0]
            if x != x:   # NaN: quiet NaN with the sign kept (ml_dtypes' choice)
                return types.uint16(((b >> types.uint32(16)) & types.uint32(0x8000))
                                    | types.uint32(0x7FC0))
            r = (b + types.uint32(0x7FFF) + ((b >> types.uint32(16)) & types.uint32(1)))
            return types.uint16(r >> types.uint32(16))
        return bf16
    if isinstance(like.dtype, types.Float):
        return lambda x, like: x
    return None


# -- four-element vector loads and stores ------------------------------------------
# NVVM cannot prove an array's alignment, so four neighbouring scalar loads
# stay four ``ld.global.f32``. These intrinsics load/store four elements as
# one vector (``ld.global.v4.f32``: 16 bytes per thread and instruction, a
# quarter of the memory instructions). The caller guarantees the alignment:
# the backend takes the vector path only when every array's address is a
# multiple of four elements' size (``vector_ok``). Python bodies serve the
# simulator.

def _load4(a, i):
    return a[i], a[i + 1], a[i + 2], a[i + 3]


def _store4(a, i, x0, x1, x2, x3):
    a[i] = x0
    a[i + 1] = x1
    a[i + 2] = x2
    a[i + 3] = x3


def _vector_pointer(context, builder, aryty, ary, i):
    data = context.make_array(aryty)(context, builder, ary).data
    vty = ir.VectorType(context.get_value_type(aryty.dtype), 4)
    align = 4 * context.get_abi_sizeof(context.get_value_type(aryty.dtype))
    return builder.bitcast(builder.gep(data, [i]), vty.as_pointer()), vty, align


@intrinsic
def _load4_vector(typingctx, a, i):
    def codegen(context, builder, sig, args):
        ptr, _, align = _vector_pointer(context, builder, sig.args[0], args[0], args[1])
        vec = builder.load(ptr, align=align)
        return context.make_tuple(builder, sig.return_type, [
            builder.extract_element(vec, ir.Constant(ir.IntType(32), k)) for k in range(4)])
    return types.UniTuple(a.dtype, 4)(a, i), codegen


@intrinsic
def _store4_vector(typingctx, a, i, x0, x1, x2, x3):
    def codegen(context, builder, sig, args):
        ptr, vty, align = _vector_pointer(context, builder, sig.args[0], args[0], args[1])
        vec = ir.Constant(vty, ir.Undefined)
        for k in range(4):
            x = context.cast(builder, args[2 + k], sig.args[2 + k], sig.args[0].dtype)
            vec = builder.insert_element(vec, x, ir.Constant(ir.IntType(32), k))
        builder.store(vec, ptr, align=align)
        return context.get_dummy_value()
    return types.void(a, i, x0, x1, x2, x3), codegen


@overload(_load4, target="cuda")
def _load4_cuda(a, i):
    return lambda a, i: _load4_vector(a, i)


@overload(_store4, target="cuda")
def _store4_cuda(a, i, x0, x1, x2, x3):
    return lambda a, i, x0, x1, x2, x3: _store4_vector(a, i, x0, x1, x2, x3)


# -- storing the updated params ----------------------------------------------------------
# The per-element math is not here: every kernel calls the functions of
# ``fastopt.backends.elements`` (``elements.adam``, ``elements.sgd``), the
# ones the CPU Numba backend calls, with the step's scalars ``c`` (an
# AdamElement / SGDElement of compute-dtype values) and option ``flags``
# (scalars.F_*): both are kernel arguments, uniform across the grid.

@cuda.jit(device=True)
def _put_params4(p, out, i, x0, x1, x2, x3, mixed):
    """Store four updated params, and their 16-bit copies when ``mixed``."""
    _store4(p, i, x0, x1, x2, x3)
    if mixed:
        _store4(out, i, _narrow(x0, out), _narrow(x1, out), _narrow(x2, out),
                _narrow(x3, out))


@cuda.jit(device=True)
def _put_param(p, out, i, x, mixed):
    p[i] = x
    if mixed:
        out[i] = _narrow(x, out)


# -- the scalar loops (whole kernels, or the tail after the vector loop) -----------------

@cuda.jit(device=True)
def _adam_elements(p, g, m, v, vmax, out, gs, begin, stride, c, flags, mixed):
    """Adam over elements ``begin, begin + stride, ... < p.size``:
    ``elements.adam`` in its three steps, each result stored as soon as it
    is known and ``vmax`` read only when needed: fewer live registers than
    one call storing at the end (38 vs 44 for fp32, ptxas sm_90), so more
    resident blocks."""
    amsgrad = flags & F_AMSGRAD
    for i in range(begin, p.size, stride):
        pi = p[i]
        mi, vi = elements.adam_moments(pi, _widen(g[i]) * gs, m[i], v[i], c, flags)
        m[i] = mi
        v[i] = vi
        if amsgrad:
            vi = elements.amsgrad_max(vmax[i], vi)
            vmax[i] = vi
        _put_param(p, out, i, elements.adam_param(pi, mi, vi, c), mixed)


@cuda.jit(device=True)
def _sgd_elements(p, g, buf, out, gs, begin, stride, c, flags, mixed):
    """SGD over elements ``begin, begin + stride, ... < p.size``. ``buf`` is
    read and written only with momentum on."""
    has_buf = flags & F_MOMENTUM
    for i in range(begin, p.size, stride):
        pi, bi = elements.sgd(p[i], _widen(g[i]) * gs, buf[i] if has_buf else p[i], c, flags)
        if has_buf:
            buf[i] = bi
        _put_param(p, out, i, pi, mixed)


# -- kernels -------------------------------------------------------------------------
# ``fc`` is the step's control block in the compute dtype: fc[0] multiplies
# the gradient (clip coefficient / loss scale), fc[1] != 0 skips the step.
# ``c`` is the element function's NamedTuple of scalars in the compute dtype,
# ``grad_scale`` the maximize sign, ``flags`` the scalars.F_* bits, ``mixed``
# whether ``out`` (16-bit params) is written too: see ``adam_args``.
#
# Each update comes as two kernels with the same arguments: the scalar one,
# and the ``_vec`` one for arrays that are all aligned for four-element
# vectors (grid-stride over groups of four, then the scalar loop over the
# last ``size % 4``). Two kernels, not one with a runtime flag: the vector
# loop's registers (60 vs 38 for fp32 Adam, ptxas for sm_90) would lower the
# scalar loop's occupancy too, and unaligned views then ran at 0.58 of the
# copy roofline on the H200 instead of 0.90.

@cuda.jit(cache=True)
def _adam_kernel(p, g, m, v, vmax, out, fc, c, grad_scale, flags, mixed):
    if fc[1]:       # the step was judged non-finite on the device: write nothing
        return
    _adam_elements(p, g, m, v, vmax, out, grad_scale * fc[0], cuda.grid(1),
                   cuda.gridsize(1), c, flags, mixed)


@cuda.jit(cache=True)
def _adam_vec_kernel(p, g, m, v, vmax, out, fc, c, grad_scale, flags, mixed):
    if fc[1]:
        return
    gs = grad_scale * fc[0]
    stride = cuda.gridsize(1)
    amsgrad = flags & F_AMSGRAD
    for j in range(cuda.grid(1), p.size // 4, stride):
        i = 4 * j
        g0, g1, g2, g3 = _load4(g, i)
        p0, p1, p2, p3 = _load4(p, i)
        m0, m1, m2, m3 = _load4(m, i)
        v0, v1, v2, v3 = _load4(v, i)
        w0, w1, w2, w3 = _load4(vmax, i) if amsgrad else (v0, v1, v2, v3)
        p0, m0, v0, w0 = elements.adam(p0, _widen(g0) * gs, m0, v0, w0, c, flags)
        p1, m1, v1, w1 = elements.adam(p1, _widen(g1) * gs, m1, v1, w1, c, flags)
        p2, m2, v2, w2 = elements.adam(p2, _widen(g2) * gs, m2, v2, w2, c, flags)
        p3, m3, v3, w3 = elements.adam(p3, _widen(g3) * gs, m3, v3, w3, c, flags)
        _store4(m, i, m0, m1, m2, m3)
        _store4(v, i, v0, v1, v2, v3)
        if amsgrad:
            _store4(vmax, i, w0, w1, w2, w3)
        _put_params4(p, out, i, p0, p1, p2, p3, mixed)
    _adam_elements(p, g, m, v, vmax, out, gs, p.size - p.size % 4 + cuda.grid(1), stride,
                   c, flags, mixed)


@cuda.jit(cache=True)
def _sgd_kernel(p, g, buf, out, fc, c, grad_scale, flags, mixed):
    if fc[1]:       # the step was judged non-finite on the device: write nothing
        return
    _sgd_elements(p, g, buf, out, grad_scale * fc[0], cuda.grid(1), cuda.gridsize(1), c,
                  flags, mixed)


@cuda.jit(cache=True)
def _sgd_vec_kernel(p, g, buf, out, fc, c, grad_scale, flags, mixed):
    if fc[1]:
        return
    gs = grad_scale * fc[0]
    stride = cuda.gridsize(1)
    has_buf = flags & F_MOMENTUM
    for j in range(cuda.grid(1), p.size // 4, stride):
        i = 4 * j
        g0, g1, g2, g3 = _load4(g, i)
        p0, p1, p2, p3 = _load4(p, i)
        b0, b1, b2, b3 = _load4(buf, i) if has_buf else (p0, p1, p2, p3)
        p0, b0 = elements.sgd(p0, _widen(g0) * gs, b0, c, flags)
        p1, b1 = elements.sgd(p1, _widen(g1) * gs, b1, c, flags)
        p2, b2 = elements.sgd(p2, _widen(g2) * gs, b2, c, flags)
        p3, b3 = elements.sgd(p3, _widen(g3) * gs, b3, c, flags)
        if has_buf:
            _store4(buf, i, b0, b1, b2, b3)
        _put_params4(p, out, i, p0, p1, p2, p3, mixed)
    _sgd_elements(p, g, buf, out, gs, p.size - p.size % 4 + cuda.grid(1), stride, c, flags,
                  mixed)


@cuda.jit(device=True)
def _block_reduce(acc, flag, t, s, f):
    """Sum ``s`` and OR ``f`` over the block's THREADS threads into
    ``acc[0]`` / ``flag[0]``: shared memory, a fixed tree order."""
    acc[t] = s
    flag[t] = f
    cuda.syncthreads()
    half = THREADS // 2
    while half > 0:
        if t < half:
            acc[t] += acc[t + half]
            flag[t] |= flag[t + half]
        cuda.syncthreads()
        half //= 2


@cuda.jit(cache=True)
def _sumsq_partial_kernel(x, partial, bad, offset):
    """Stage 1: one float64 partial sum of squares (and a non-finite flag)
    per block, reduced in shared memory in a fixed tree order.

    Each thread keeps four loads in flight (four independent accumulators
    over four grid strides): with one load per iteration the memory system
    sat idle and the pass read 0.8 TB/s on an H200."""
    acc = cuda.shared.array(THREADS, types.float64)
    flag = cuda.shared.array(THREADS, types.int32)
    t = cuda.threadIdx.x
    n = x.size
    stride = cuda.gridsize(1)
    i = cuda.grid(1)
    s0 = np.float64(0.0)
    s1 = np.float64(0.0)
    s2 = np.float64(0.0)
    s3 = np.float64(0.0)
    f = np.int32(0)
    while i + 3 * stride < n:
        a0 = np.float64(_widen(x[i]))
        a1 = np.float64(_widen(x[i + stride]))
        a2 = np.float64(_widen(x[i + 2 * stride]))
        a3 = np.float64(_widen(x[i + 3 * stride]))
        s0 += a0 * a0
        s1 += a1 * a1
        s2 += a2 * a2
        s3 += a3 * a3
        if not (math.isfinite(a0) and math.isfinite(a1) and math.isfinite(a2)
                and math.isfinite(a3)):
            f = np.int32(1)
        i += 4 * stride
    while i < n:
        a0 = np.float64(_widen(x[i]))
        s0 += a0 * a0
        if not math.isfinite(a0):
            f = np.int32(1)
        i += stride
    _block_reduce(acc, flag, t, (s0 + s1) + (s2 + s3), f)
    if t == 0:
        partial[offset + cuda.blockIdx.x] = acc[0]
        bad[offset + cuda.blockIdx.x] = flag[0]


@cuda.jit(cache=True)
def _finalize_kernel(partial, bad, count, ctrl64, ctrl32, max_norm, inv_scale, check):
    """Stage 2 (one block of THREADS): add the partials (each thread a fixed
    strided share, then the shared-memory tree), then thread 0 decides the
    clip coefficient and the skip on the device. One thread adding ~1000
    partials alone waited on each load in turn: 0.2 ms on an H200.

    ctrl64 = [sum of squares, norm of the unscaled grads, grad factor, skip];
    ctrl32 = [grad factor, skip] for the float32 kernels.
    """
    acc = cuda.shared.array(THREADS, types.float64)
    flag = cuda.shared.array(THREADS, types.int32)
    t = cuda.threadIdx.x
    s = np.float64(0.0)
    f = np.int32(0)
    for k in range(t, count, THREADS):
        s += partial[k]
        f |= bad[k]
    _block_reduce(acc, flag, t, s, f)
    if t != 0:
        return
    total = acc[0]
    anybad = flag[0]
    norm = math.sqrt(total) * inv_scale
    coef = np.float64(1.0)
    if max_norm > 0.0:
        c = max_norm / (norm + 1e-6)    # torch's clip_grad_norm_ factor
        if c < 1.0 or c != c:
            coef = c
    skip = np.float64(1.0) if (check and anybad != 0) else np.float64(0.0)
    factor = coef * inv_scale
    ctrl64[0] = total
    ctrl64[1] = norm
    ctrl64[2] = factor
    ctrl64[3] = skip
    ctrl32[0] = np.float32(factor)
    ctrl32[1] = np.float32(skip)


@cuda.jit(cache=True)
def _scale_kernel(x, fc, c):
    if fc[1]:       # the step was judged non-finite on the device: write nothing
        return
    cc = c * fc[0]
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        x[i] *= cc


@cuda.jit(cache=True)
def _convert_kernel(src, dst):
    """widen (16-bit -> float32) or narrow (float32 -> 16-bit), by dtype."""
    for i in range(cuda.grid(1), dst.size, cuda.gridsize(1)):
        dst[i] = _narrow(_widen(src[i]), dst)


#: every kernel, for the PTX checks: name -> (dispatcher, "elementwise"|"reduction")
KERNELS = {
    "adam": (_adam_kernel, "elementwise"),
    "adam_vec": (_adam_vec_kernel, "elementwise"),
    "sgd": (_sgd_kernel, "elementwise"),
    "sgd_vec": (_sgd_vec_kernel, "elementwise"),
    "scale": (_scale_kernel, "elementwise"),
    "convert": (_convert_kernel, "elementwise"),
    "sumsq_partial": (_sumsq_partial_kernel, "reduction"),
    "finalize": (_finalize_kernel, "reduction"),
}



def ptx_signatures(dtype="float32", storage=None):
    """Kernel name -> argument types for ``compile_ptx``, for params and state
    in ``dtype`` and grads/params storage ``storage`` (default ``dtype``;
    "float16", or "uint16" for bfloat16 bits, with a float32 ``dtype``).
    The update kernels' scalars are their element NamedTuple of ``dtype``
    values, as ``adam_args``/``sgd_args`` in numba_cuda.py pass them."""
    c = getattr(types, dtype)
    st = getattr(types, storage or dtype)
    A, S = c[::1], st[::1]
    ctl = (c, types.int64, types.boolean)            # grad_scale, flags, mixed
    adam = (A, S, A, A, A, S, A, types.NamedUniTuple(c, len(AdamElement._fields),
                                                      AdamElement)) + ctl
    sgd = (A, S, A, S, A, types.NamedUniTuple(c, len(SGDElement._fields), SGDElement)) + ctl
    f64, i32 = types.float64[::1], types.int32[::1]
    return {
        "adam": adam, "adam_vec": adam, "sgd": sgd, "sgd_vec": sgd,
        "scale": (A, A, c),
        "convert": (S, A) if st != c else (A, A),
        "sumsq_partial": (S, f64, i32, types.int64),
        "finalize": (f64, i32, types.int64, f64, types.float32[::1], types.float64,
                     types.float64, types.boolean),
    }
