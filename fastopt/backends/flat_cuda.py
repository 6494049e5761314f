"""The device twin of :mod:`fastopt.backends.flat_ops`: L-BFGS's vector
operations and SAM's perturbation on 1-D device arrays (numba-cuda).

The same functions as the NumPy reference, with its conventions (arrays
1-D, contiguous, of one float dtype, updated in place; scalars arrive as
Python floats and are cast to the arrays' dtype; reductions accumulate in
float64), as kernels (:mod:`fastopt.backends._flat_cuda_kernels`):

* each vector operation is one elementwise kernel over fixed chunks; one
  that returns sums (``dot``, ``axpy_dot``, ``pair_dots``, ...) adds each
  chunk's float64 sums in shared memory and the chunks' in a one-block
  kernel, in a fixed order (the result does not depend on the grid), and
  the host reads the 16-byte result: that read waits for the GPU, and it
  is inherent to L-BFGS, whose next step (a coefficient of the two-loop
  recursion, a curvature test, a stopping test) is decided on the host
  from that number;
* SAM's norm is the device norm pass of the optimizers
  (:func:`fastopt.backends.numba_cuda.norm_control`, weighted by ``|p|``
  for ASAM), its scale decided on the device (``sam_scale``), and the
  perturbation reads it there; :func:`sam_result` reads the sum back.

Importing this module needs a usable GPU or the CUDA simulator, as
:mod:`fastopt.backends.numba_cuda` does.
"""

from __future__ import annotations

import numpy as np
from numba import cuda

from . import numba_cuda as C
from ._flat_cuda_kernels import (ABS, AXPY, AXPY_DOT, CHUNK, DOT, NEGATE, PAIR, SCALE,
                                 SCALE_DOT, _chunks_kernel, _sam_perturb_kernel,
                                 _sam_scale_kernel, _vector_kernel)

name = "cuda"

_results: dict = {}


def _buffers(nchunks):
    """The chunks' two partial sums and the 2-value result, reused per
    stream (every launch goes to the default stream, and the host reads the
    result before the next operation: see numba_cuda._stream_key)."""
    key = C._stream_key()
    have = _results.get(key)
    if have is None or have[0].size < nchunks:
        size = 1 << max(6, (nchunks - 1).bit_length())
        have = (cuda.device_array(size, np.float64), cuda.device_array(size, np.float64),
                cuda.device_array(2, np.float64))
        _results[key] = have
    return have


def _run(mode, a, x, y, z):
    """``mode`` over ``y``'s elements; its two sums (read back) when it has any."""
    n = y.size
    nchunks = max(1, -(-n // CHUNK))
    part1, part2, out = _buffers(nchunks)
    args = (mode, np.dtype(y.dtype).type(a), x, y, z, part1, part2, out)
    if n:
        blocks = C.grid_blocks(_vector_kernel, (y.dtype, "flat"), nchunks * C.THREADS, args)
        _vector_kernel[blocks, C.THREADS](*args)
    if mode >= AXPY:
        return None
    if not n:
        return 0.0, 0.0
    if nchunks > 1:                  # (one chunk: the vector kernel wrote out)
        _chunks_kernel[1, C.THREADS](part1, part2, nchunks, out, mode == ABS)
    s1, s2 = out.copy_to_host()
    return float(s1), float(s2)


# -- vectors (L-BFGS) ---------------------------------------------------------------

def dot(x, y) -> float:
    """``x . y``, accumulated in float64 (waits for the result)."""
    return _run(DOT, 0.0, x, y, y)[0]


def axpy(a, x, y) -> None:
    """``y += a * x``."""
    _run(AXPY, a, x, y, y)


def axpy_dot(a, x, y, z) -> float:
    """``y += a * x``, then ``z . y``, in one pass."""
    return _run(AXPY_DOT, a, x, y, z)[0]


def scale_dot(a, y, z) -> float:
    """``y *= a``, then ``z . y``, in one pass."""
    return _run(SCALE_DOT, a, y, y, z)[0]


def scale(a, y) -> None:
    """``y *= a``."""
    _run(SCALE, a, y, y, y)


def negate(x, y) -> None:
    """``y = -x``."""
    _run(NEGATE, 0.0, x, y, y)


def pair_dots(t, g, pg, d) -> tuple:
    """L-BFGS's new curvature pair, in place: ``pg <- g - pg`` (y) and
    ``d <- t * d`` (s); returns ``(y . s, y . y)``."""
    return _run(PAIR, t, g, pg, d)


def abs_sum_max(x) -> tuple:
    """``(sum |x|, max |x|)`` in float64; a NaN anywhere gives NaN max."""
    return _run(ABS, 0.0, x, x, x)


def copy(src, dst) -> None:
    """``dst[...] = src`` (a device-to-device copy)."""
    if dst.size:
        dst.copy_to_device(src)


def empty(n, dtype):
    """A new 1-D device vector (contents undefined)."""
    return cuda.device_array(n, dtype)


def to_host(x) -> np.ndarray:
    """A host copy of a device vector."""
    return x.copy_to_host()


def from_host(a):
    """A new device vector holding a copy of host array ``a``."""
    return cuda.to_device(np.ascontiguousarray(a))


# -- SAM ------------------------------------------------------------------------------

def sam_scale(ctrl, rho) -> None:
    """After the norm pass ``ctrl`` (:func:`numba_cuda.norm_control`): the
    perturbation's scale and skip flag, decided on the device."""
    _sam_scale_kernel[1, 1](ctrl.ctrl64, ctrl.ctrl32, float(rho))


def sam_perturb(p, g, e, ctrl, adaptive) -> None:
    """``e = c g`` (``adaptive``: ``c p^2 g``) and ``p += e``, ``c`` the
    scale :func:`sam_scale` left in ``ctrl``; nothing when it said skip."""
    if p.size:
        args = (p, g, e, ctrl.for_dtype(p.dtype), bool(adaptive))
        C._launch(_sam_perturb_kernel, p.dtype, p.size, args)


def sam_result(ctrl) -> float:
    """The norm pass's sum of squares (waits for it): non-finite when the
    perturbation was skipped."""
    return float(ctrl.ctrl64.copy_to_host()[0])
