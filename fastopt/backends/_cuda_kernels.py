"""The CUDA kernels of the ``cuda`` backend (see ``numba_cuda.py``).

Kept apart from the backend so they import (and compile to PTX with
``numba.cuda.compile_ptx``) on a machine without a GPU: the backend module
refuses to import there, this one does not.
"""

from __future__ import annotations

import math

import numpy as np
from numba import config, cuda, types
from numba.core.extending import overload


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


# -- kernels -------------------------------------------------------------------------
# ``fc`` is the step's control block in the compute dtype: fc[0] multiplies
# the gradient (clip coefficient / loss scale), fc[1] != 0 skips the step.

@cuda.jit(cache=True)
def _adam_kernel(p, g, m, v, vmax, out, fc, step_size, bc2_sqrt, beta1, omb1, beta2,
                 omb2, eps, l2, decay, grad_scale, use_l2, amsgrad, mixed):
    if fc[1]:       # the step was judged non-finite on the device: write nothing
        return
    gs = grad_scale * fc[0]
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    for i in range(start, p.size, stride):
        gi = _widen(g[i]) * gs
        pi = p[i]
        if use_l2:
            gi += l2 * pi
        mi = beta1 * m[i] + omb1 * gi
        vi = beta2 * v[i] + omb2 * gi * gi
        m[i] = mi
        v[i] = vi
        if amsgrad:
            vm = vmax[i]
            if vm > vi or vm != vm:   # np.maximum: NaN on either side propagates
                vi = vm
            vmax[i] = vi
        denom = math.sqrt(vi) / bc2_sqrt + eps
        pi = pi * decay - step_size * mi / denom
        p[i] = pi
        if mixed:
            out[i] = _narrow(pi, out)


@cuda.jit(cache=True)
def _sgd_kernel(p, g, buf, out, fc, lr, l2, grad_scale, buf_decay, grad_coef, momentum,
                use_l2, has_buf, nesterov, mixed):
    if fc[1]:       # the step was judged non-finite on the device: write nothing
        return
    gs = grad_scale * fc[0]
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    for i in range(start, p.size, stride):
        gi = _widen(g[i]) * gs
        pi = p[i]
        if use_l2:
            gi += l2 * pi
        if has_buf:
            b = buf_decay * buf[i] + grad_coef * gi
            buf[i] = b
            if nesterov:
                gi += momentum * b
            else:
                gi = b
        pi = pi - lr * gi
        p[i] = pi
        if mixed:
            out[i] = _narrow(pi, out)


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
    "sgd": (_sgd_kernel, "elementwise"),
    "scale": (_scale_kernel, "elementwise"),
    "convert": (_convert_kernel, "elementwise"),
    "sumsq_partial": (_sumsq_partial_kernel, "reduction"),
    "finalize": (_finalize_kernel, "reduction"),
}



def ptx_signatures(dtype="float32", storage=None):
    """Kernel name -> type signature for ``compile_ptx``, for params and state
    in ``dtype`` and grads/params storage ``storage`` (default ``dtype``;
    "float16", or "uint16" for bfloat16 bits, with a float32 ``dtype``)."""
    c = dtype
    st = storage or dtype
    A, S = f"{c}[::1]", f"{st}[::1]"
    return {
        "adam": f"({A},{S},{A},{A},{A},{S},{A}," + ",".join([c] * 10) + ",b1,b1,b1)",
        "sgd": f"({A},{S},{A},{S},{A}," + ",".join([c] * 6) + ",b1,b1,b1,b1)",
        "scale": f"({A},{A},{c})",
        "convert": f"({S},{A})" if st != c else f"({A},{A})",
        "sumsq_partial": f"({S},float64[::1],int32[::1],int64)",
        "finalize": "(float64[::1],int32[::1],int64,float64[::1],float32[::1],float64,"
                    "float64,b1)",
    }
