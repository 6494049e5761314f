"""The CUDA kernels of the device flat operations (``flat_cuda.py``): L-BFGS's
vector operations and SAM's perturbation.

Kept apart from ``flat_cuda.py`` for the reason ``_cuda_kernels.py`` is:
they import, and compile to PTX, on a machine without a GPU.

Vectors are walked in fixed chunks of ``CHUNK`` elements, a block per chunk
(grid-stride over the chunks), the block's threads striding through it;
a chunk's two float64 sums are added by the shared-memory tree of
``_cuda_kernels`` into ``part1[j]``, ``part2[j]``, and a one-block kernel
adds the chunks' sums in the same fixed order. So a dot product
depends on CHUNK and THREADS only, never on the grid (no float atomics),
as the CPU twin's (``flat_numba``) depends on its chunks only.
"""

from __future__ import annotations

import math

import numpy as np
from numba import config, cuda, types

from ._cuda_kernels import THREADS, _add_partials, _block_reduce, _combine

from .._numba_cache import install_cuda as _fresh_cache

_fresh_cache()      # before the cache=True kernels: fastopt._numba_cache says why

#: elements per chunk (small under the simulator, so tests span several)
CHUNK = 4 * THREADS if getattr(config, "ENABLE_CUDASIM", False) else 32 * THREADS

# vector operations (``mode``), as in flat_numba; the last three sum nothing
DOT, AXPY_DOT, SCALE_DOT, PAIR, ABS, AXPY, SCALE, NEGATE = range(8)


@cuda.jit(device=True)
def _element(mode, a, x, y, z, i, s1, s2):
    """``mode``'s work on element ``i``; the two running float64 sums."""
    if mode == DOT:
        s1 += np.float64(x[i]) * np.float64(y[i])
    elif mode == AXPY:
        y[i] = y[i] + a * x[i]
    elif mode == AXPY_DOT:     # y += a x, then z . y
        yi = y[i] + a * x[i]
        y[i] = yi
        s1 += np.float64(z[i]) * np.float64(yi)
    elif mode == SCALE:
        y[i] = y[i] * a
    elif mode == SCALE_DOT:    # y *= a, then z . y
        yi = y[i] * a
        y[i] = yi
        s1 += np.float64(z[i]) * np.float64(yi)
    elif mode == PAIR:         # x: g, y: pg -> g - pg, z: d -> a * d
        yi = x[i] - y[i]
        si = z[i] * a
        y[i] = yi
        z[i] = si
        s1 += np.float64(yi) * np.float64(si)
        s2 += np.float64(yi) * np.float64(yi)
    elif mode == ABS:          # sum and max of |x|, a NaN propagating
        v = abs(np.float64(x[i]))
        s1 += v
        s2 = _combine(s2, v, True)
    else:                      # NEGATE: y = -x
        y[i] = -x[i]
    return s1, s2


@cuda.jit(cache=True)
def _vector_kernel(mode, a, x, y, z, part1, part2, out):
    """``mode`` over every chunk; chunk ``j``'s sums in ``part1[j]``,
    ``part2[j]`` (the second is a max for ``ABS``), and in ``out[0:2]``
    when there is one chunk (no second kernel then). ``a`` is in the arrays' dtype. The
    modes that sum nothing (AXPY, SCALE, NEGATE) never touch the shared
    memory or the partial sums."""
    acc = cuda.shared.array(THREADS, types.float64)
    acc2 = cuda.shared.array(THREADS, types.float64)
    t = cuda.threadIdx.x
    n = y.size
    sums = mode < AXPY
    nchunks = (n + CHUNK - 1) // CHUNK
    for j in range(cuda.blockIdx.x, nchunks, cuda.gridDim.x):
        s1 = np.float64(0.0)
        s2 = np.float64(0.0)
        for i in range(j * CHUNK + t, min(n, (j + 1) * CHUNK), THREADS):
            s1, s2 = _element(mode, a, x, y, z, i, s1, s2)
        if sums:
            _block_reduce(acc, acc2, t, s1, s2, mode == ABS)
            if t == 0:
                part1[j] = acc[0]
                part2[j] = acc2[0]
                if nchunks == 1:
                    out[0] = acc[0]
                    out[1] = acc2[0]


@cuda.jit(cache=True)
def _chunks_kernel(part1, part2, count, out, largest):
    """One block: the ``count`` chunks' sums added (the second: the largest,
    with ``largest``) in a fixed order, into ``out[0:2]``."""
    acc = cuda.shared.array(THREADS, types.float64)
    acc2 = cuda.shared.array(THREADS, types.float64)
    _add_partials(part1, part2, 0, count, acc, acc2, largest)
    if cuda.threadIdx.x == 0:
        out[0] = acc[0]
        out[1] = acc2[0]


# -- SAM ----------------------------------------------------------------------------

@cuda.jit(cache=True)
def _sam_scale_kernel(ctrl64, ctrl32, rho):
    """One thread, after the norm pass (``numba_cuda.norm_control``): the
    perturbation's scale ``rho / ||.||`` from the sum of squares in
    ``ctrl64[0]`` (0 for a zero gradient), and a non-finite sum marks the
    perturbation skipped; written where the perturb kernel reads them, as
    the update kernels read the clip factor: ``ctrl64[2:4]`` and ``ctrl32``
    = [scale, skip]."""
    if cuda.grid(1) != 0:
        return
    total = ctrl64[0]
    skip = not math.isfinite(total)
    scale = np.float64(0.0)
    if not skip and total > 0.0:
        scale = rho / math.sqrt(total)
    ctrl64[2] = scale
    ctrl64[3] = np.float64(1.0) if skip else np.float64(0.0)
    ctrl32[0] = np.float32(scale)
    ctrl32[1] = np.float32(1.0) if skip else np.float32(0.0)


@cuda.jit(cache=True)
def _sam_perturb_kernel(p, g, e, fc, adaptive):
    """``e = c g`` (``adaptive``: ``c p^2 g``) and ``p += e``, with ``c =
    fc[0]`` the scale in the arrays' dtype; nothing when ``fc[1]`` says the
    perturbation is skipped. The host's order of operations (flat_ops)."""
    if fc[1]:
        return
    c = fc[0]
    for i in range(cuda.grid(1), p.size, cuda.gridsize(1)):
        x = g[i]
        if adaptive:
            x = p[i] * p[i] * x
        ei = x * c
        e[i] = ei
        p[i] = p[i] + ei


#: every kernel, for the PTX checks: name -> (dispatcher, "elementwise"|"reduction")
KERNELS = {
    "vector": (_vector_kernel, "reduction"),
    "chunks": (_chunks_kernel, "reduction"),
    "sam_scale": (_sam_scale_kernel, "reduction"),
    "sam_perturb": (_sam_perturb_kernel, "elementwise"),
}


def ptx_signatures(dtype="float32"):
    """Kernel name -> argument types for ``compile_ptx`` (arrays of ``dtype``)."""
    c = getattr(types, dtype)
    A, f64 = c[::1], types.float64[::1]
    return {
        "vector": (types.int64, c, A, A, A, f64, f64, f64),
        "chunks": (f64, f64, types.int64, f64, types.boolean),
        "sam_scale": (f64, types.float32[::1], types.float64),
        "sam_perturb": (A, A, A, A, types.boolean),
    }
