"""The CUDA kernels of the MLP's ``cuda`` backend (dispatch: :mod:`._cuda`).

Kept apart from the dispatch so they import, and compile to PTX with
``numba.cuda.compile_ptx``, on a machine without a GPU (as
``fastopt/backends/_cuda_kernels.py`` is for the optimizers).

Every array is a flat 1-D device buffer; a batch of K row-major matrices in
one is addressed by an element offset and a stride between models (``off``,
``ks``), so the kernels read the weights and write the gradients straight
into the model's flat ``params``/``grads`` buffers (model k's run of ``P``
elements: ``ks = P``), and a batch shared by all K models is the same matrix
K times (``ks = 0``). Workspaces (pre-activations Z, activations A,
upstream gradients D) are ``[K, B, n]`` flat.

The math is the CPU backends' (:mod:`._ref` is the spec): the activation and
its derivative are one device function each, parameterised by the
activation id of :mod:`.activations`. Everything runs in the arrays' dtype:
constants are typed from the array (``Z.dtype.type``), so the float32
kernels hold no double-precision instruction (``tests/test_nn_cuda.py``
reads the PTX). Reductions (bias gradients, the loss) use shared memory in
a fixed tree order, no atomics and no warp intrinsics: deterministic for a
launch configuration, and they run under the CUDA simulator.
"""

from __future__ import annotations

import math

from numba import config, cuda, types

# loads numba-cuda's array typing with NumPy >= 2.5 too (see that module)
from ..backends import _cuda_kernels  # noqa: F401

from .._numba_cache import install_cuda as _fresh_cache

_fresh_cache()      # before the cache=True kernels: fastopt._numba_cache says why

SIMULATOR = bool(getattr(config, "ENABLE_CUDASIM", False))
#: threads of the 1-D kernels (elementwise, one block per model for the
#: loss). The simulator runs every thread as a Python thread and each
#: ``syncthreads`` as a barrier across them: it gets small blocks.
THREADS = 16 if SIMULATOR else 256
#: the matmul's square tile (TILE x TILE threads per block), the same under
#: the simulator (fewer, larger blocks ran faster there than 4 x 4 tiles)
TILE = 16
#: the column reductions' block: COLS output columns x ROWS partial sums (a power of two)
COLS, ROWS = (16, 2) if SIMULATOR else (32, 8)
#: the tiles' row length: one padding column (a shared-array shape must be constants)
_PADDED = TILE + 1

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)


# -- activations (ids of fastopt.nn.activations) --------------------------------------

@cuda.jit(device=True)
def _consts(like, alpha):
    """The activations' constants in ``like``'s dtype: (alpha, 0, 1, 1/2,
    1/sqrt(2), 1/sqrt(2 pi)). A Python float in float32 code would promote
    the arithmetic to float64."""
    t = like.dtype.type
    return alpha, t(0), t(1), t(0.5), t(_INV_SQRT2), t(_INV_SQRT2PI)


@cuda.jit(device=True)
def _f(z, act, c):
    """f(z) for activation ``act``."""
    alpha, zero, one, half, rs2, _ = c
    if act == 1:
        return z if z > zero else zero
    if act == 2:
        return z if z > zero else alpha * z
    if act == 3:
        return math.tanh(z)
    if act == 4:                 # stable both ways: exp of a non-positive number only
        if z >= zero:
            return one / (one + math.exp(-z))
        e = math.exp(z)
        return e / (one + e)
    if act == 5:
        return half * z * (one + math.erf(z * rs2))
    return z


@cuda.jit(device=True)
def _df(z, a, act, c):
    """f'(z); ``a = f(z)`` (tanh and sigmoid use it)."""
    alpha, zero, one, half, rs2, rs2pi = c
    if act == 1:
        return one if z > zero else zero
    if act == 2:
        return one if z > zero else alpha
    if act == 3:
        return one - a * a
    if act == 4:
        return a * (one - a)
    if act == 5:
        return half * (one + math.erf(z * rs2)) + z * math.exp(-half * z * z) * rs2pi
    return one


# -- reductions ------------------------------------------------------------------------------

@cuda.jit(device=True)
def _sum_rows(part, r, c, n):
    """``part[0, c] = sum of part[:n, c]`` in shared memory, a fixed tree
    order (``n`` a power of two; thread (r, c) holds ``part[r, c]``, and
    every thread of the block calls this)."""
    cuda.syncthreads()
    h = n // 2
    while h > 0:
        if r < h:
            part[r, c] += part[r + h, c]
        cuda.syncthreads()
        h //= 2
    return part[0, c]


# -- forward: bias + activation ------------------------------------------------------------

@cuda.jit(cache=True)
def _bias_act_kernel(Z, A, b, b_off, b_ks, rows, n, act, alpha):
    """``Z[k, i, :] += b[k]``, then ``A = f(Z)`` (``A`` may be ``Z``: identity).
    Grid-stride over the K x rows x n elements."""
    c = _consts(Z, alpha)
    per_model = rows * n
    for idx in range(cuda.grid(1), Z.size, cuda.gridsize(1)):
        v = Z[idx] + b[b_off + (idx // per_model) * b_ks + idx % n]
        Z[idx] = v
        A[idx] = _f(v, act, c)


# -- backward: activation derivative x upstream gradient, bias gradient ---------------------

@cuda.jit(cache=True)
def _act_grad_kernel(D, Z, A, gb, g_off, g_ks, rows, n, act, alpha):
    """``D *= f'(Z)`` in place and ``gb[k, j] = sum_i D[k, i, j]`` (into the
    flat grads at ``g_off + k * g_ks``). Grid (ceil(n / COLS), K), blocks of
    COLS x ROWS threads: each thread sums every ROWS-th row of its column
    (coalesced across the block's columns), then the block adds its ROWS
    partials in shared memory in a fixed tree order."""
    part = cuda.shared.array((ROWS, COLS), D.dtype)
    c = _consts(D, alpha)
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    j = cuda.blockIdx.x * COLS + tx
    k = cuda.blockIdx.y
    s = c[1]
    if j < n:
        base = k * rows * n + j
        for i in range(ty, rows, ROWS):
            idx = base + i * n
            d = D[idx] * _df(Z[idx], A[idx], act, c)
            D[idx] = d
            s += d
    part[ty, tx] = s
    s = _sum_rows(part, ty, tx, ROWS)
    if ty == 0 and j < n:
        gb[g_off + k * g_ks + j] = s


# -- the loss: value and gradient in one pass ---------------------------------------------

@cuda.jit(cache=True)
def _xent_kernel(Z, y, y_ks, D, losses, rows, n, inv_b):
    """Softmax cross-entropy of the logits ``Z`` ``[K, rows, n]`` against the
    integer labels ``y`` (model k's at ``k * y_ks``: 0 when shared):
    ``losses[k]`` = the mean over the batch, ``D = dloss/dZ``. One block per
    model; each thread takes whole rows.

    Stable: ``log sum exp`` after subtracting the row max. The label's
    gradient ``(p_t - 1) / B`` is written as ``-(sum of the other
    exponentials) / s / B``, which keeps its precision in float32 where
    ``p_t`` is close to 1. A label outside ``[0, n)`` (device labels are
    not checked on the host: that would wait for the GPU) makes its row's
    loss and gradient NaN, so it cannot pass unnoticed."""
    acc = cuda.shared.array((THREADS, 1), Z.dtype)
    k = cuda.blockIdx.x
    t = cuda.threadIdx.x
    zero = Z.dtype.type(0)
    nan = Z.dtype.type(math.nan)
    total = zero
    for i in range(t, rows, THREADS):
        r = (k * rows + i) * n
        lab = y[k * y_ks + i]
        m = Z[r]
        for j in range(1, n):
            m = max(m, Z[r + j])
        s = zero
        others = zero
        for j in range(n):       # one exp per element, kept in D
            e = math.exp(Z[r + j] - m)
            D[r + j] = e
            s += e
            if j != lab:
                others += e
        if 0 <= lab < n:
            total += math.log(s) - (Z[r + lab] - m)
            scale = inv_b / s
            for j in range(n):
                D[r + j] = -others * scale if j == lab else D[r + j] * scale
        else:
            total += nan
            for j in range(n):
                D[r + j] = nan
    acc[t, 0] = total
    total = _sum_rows(acc, t, 0, THREADS)
    if t == 0:
        losses[k] = total * inv_b


@cuda.jit(cache=True)
def _mse_kernel(Z, T, t_ks, D, losses, rows, n, scale, inv_count):
    """Mean squared error of ``Z`` ``[K, rows, n]`` against the targets ``T``
    (model k's at ``k * t_ks``): ``losses[k] = mean (Z - T)^2``,
    ``D = scale (Z - T)`` with ``scale = 2 / (rows n)``. One block per model."""
    acc = cuda.shared.array((THREADS, 1), Z.dtype)
    k = cuda.blockIdx.x
    t = cuda.threadIdx.x
    total = Z.dtype.type(0)
    for i in range(t, rows, THREADS):
        r = (k * rows + i) * n
        tr = k * t_ks + i * n
        for j in range(n):
            d = Z[r + j] - T[tr + j]
            total += d * d
            D[r + j] = scale * d
    acc[t, 0] = total
    total = _sum_rows(acc, t, 0, THREADS)
    if t == 0:
        losses[k] = total * inv_count


# -- batched matmul --------------------------------------------------------------------------

@cuda.jit(cache=True)
def _bmm_kernel(A, a_off, a_ks, B, b_off, b_ks, C, c_off, c_ks, M, N, Kd, ta, tb):
    """``C[k] = op(A[k]) @ op(B[k])``, all row-major: ``op(A)`` is ``[M, Kd]``
    (stored ``[Kd, M]`` when ``ta``: the weight gradient's ``X^T D``) and
    ``op(B)`` is ``[Kd, N]`` (stored ``[N, Kd]`` when ``tb``: the upstream
    gradient's ``D W^T``); matrix k of each starts at ``off + k * ks``.

    Grid (ceil(N / TILE), ceil(M / TILE), K), blocks of TILE x TILE threads,
    one output each. Both operands go through shared-memory tiles loaded so
    that neighbouring threads read neighbouring addresses whichever way the
    operand is stored (a transposed operand is stored transposed into its
    tile; the padding column keeps those stores free of bank conflicts).
    Edges that are not multiples of TILE read zeros and write nothing."""
    As = cuda.shared.array((TILE, _PADDED), C.dtype)
    Bs = cuda.shared.array((TILE, _PADDED), C.dtype)
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    k = cuda.blockIdx.z
    i0 = cuda.blockIdx.y * TILE
    j0 = cuda.blockIdx.x * TILE
    a0 = a_off + k * a_ks
    b0 = b_off + k * b_ks
    zero = C.dtype.type(0)
    acc = zero
    for p0 in range(0, Kd, TILE):
        if ta:      # stored [Kd, M]: the row index runs along the threads
            p, i = p0 + ty, i0 + tx
            As[tx, ty] = A[a0 + p * M + i] if p < Kd and i < M else zero
        else:
            i, p = i0 + ty, p0 + tx
            As[ty, tx] = A[a0 + i * Kd + p] if i < M and p < Kd else zero
        if tb:      # stored [N, Kd]
            j, p = j0 + ty, p0 + tx
            Bs[tx, ty] = B[b0 + j * Kd + p] if j < N and p < Kd else zero
        else:
            p, j = p0 + ty, j0 + tx
            Bs[ty, tx] = B[b0 + p * N + j] if p < Kd and j < N else zero
        cuda.syncthreads()
        for q in range(TILE):
            acc += As[ty, q] * Bs[q, tx]
        cuda.syncthreads()
    i, j = i0 + ty, j0 + tx
    if i < M and j < N:
        C[c_off + k * c_ks + i * N + j] = acc


#: every kernel, for the PTX checks: name -> dispatcher
KERNELS = {
    "bias_act": _bias_act_kernel,
    "act_grad": _act_grad_kernel,
    "xent": _xent_kernel,
    "mse": _mse_kernel,
    "bmm": _bmm_kernel,
}


def ptx_signatures(dtype="float32", labels="int64"):
    """Kernel name -> argument types for ``compile_ptx``, as :mod:`._cuda`
    launches them for ``dtype`` arrays (and ``labels`` integer labels)."""
    c = getattr(types, dtype)
    A, i64 = c[::1], types.int64
    return {
        "bias_act": (A, A, A, i64, i64, i64, i64, i64, c),
        "act_grad": (A, A, A, A, i64, i64, i64, i64, i64, c),
        "xent": (A, getattr(types, labels)[::1], i64, A, A, i64, i64, c),
        "mse": (A, A, i64, A, A, i64, i64, c, c),
        "bmm": (A, i64, i64, A, i64, i64, A, i64, i64, i64, i64, i64, types.boolean,
                types.boolean),
    }
