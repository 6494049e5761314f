"""Fused operations over flat vectors, for the optimizers that are not one
elementwise update: SAM (a global norm, then a scaled copy of the gradients
added to the params) and L-BFGS (dot products and axpys over the whole
parameter vector).

This module is the NumPy reference, the readable specification;
:mod:`fastopt.backends.flat_numba` is the compiled twin with the same
functions (``@njit(parallel=True)``, fastmath off, reductions over fixed
chunks summed in chunk order, so a result does not depend on the thread
count), and :mod:`fastopt.backends.flat_cuda` the device twin (numba-cuda
kernels over device vectors). :func:`ops_for` picks one by backend name:
"numpy" the reference, the compiled CPU backends ("numba", "cython") the
Numba kernels, "cuda" the device kernels. They agree to rounding: the
updates are the same IEEE operations in the same order; only the order of
a reduction's float64 additions differs.

Conventions (as in :mod:`fastopt.backends.reference`): arrays are 1-D,
contiguous, of one float dtype, updated in place; scalars arrive as Python
floats (float64) and are cast to the arrays' dtype before use; every
reduction accumulates in float64.

SAM's functions take a :class:`~fastopt.backends.tables.StepTable` (a param
group's arrays: ``weights[k]`` the params as 1-D views, ``grads[k]`` the
gradients, ``soff[k]`` array k's offset in the group's flat buffer ``e``)
so that a list of arrays, a dict or a packed buffer is one call per group.
"""

from __future__ import annotations

import math
import sys

import numpy as np

name = "numpy"


def ops_for(backend: str):
    """The flat operations for a backend name: this module for "numpy",
    the Numba kernels for the compiled CPU backends, the device kernels
    for "cuda"."""
    if backend == "numpy":
        return sys.modules[__name__]
    if backend in ("numba", "cython"):
        from . import flat_numba
        return flat_numba
    if backend == "cuda":
        from . import flat_cuda
        return flat_cuda
    raise ValueError(f"no flat operations for backend {backend!r}")


def _f64(x):
    return x.astype(np.float64, copy=False)


# -- vectors (L-BFGS) ---------------------------------------------------------------

def dot(x, y) -> float:
    """``x . y``, accumulated in float64."""
    return float(np.dot(_f64(x), _f64(y)))


def axpy(a, x, y) -> None:
    """``y += a * x``."""
    y += y.dtype.type(a) * x


def axpy_dot(a, x, y, z) -> float:
    """``y += a * x``, then ``z . y`` (one pass in the compiled twin)."""
    axpy(a, x, y)
    return dot(z, y)


def scale_dot(a, y, z) -> float:
    """``y *= a``, then ``z . y``."""
    scale(a, y)
    return dot(z, y)


def pair_dots(t, g, pg, d) -> tuple:
    """L-BFGS's new curvature pair, in place: ``pg <- g - pg`` (y) and
    ``d <- t * d`` (s); returns ``(y . s, y . y)``."""
    np.subtract(g, pg, out=pg)
    d *= d.dtype.type(t)
    return dot(pg, d), dot(pg, pg)


def abs_sum_max(x) -> tuple:
    """``(sum |x|, max |x|)`` in float64; a NaN anywhere gives NaN max."""
    a = np.abs(_f64(x))
    return float(a.sum()), float(a.max()) if a.size else 0.0


def scale(a, y) -> None:
    """``y *= a``."""
    y *= y.dtype.type(a)


def negate(x, y) -> None:
    """``y = -x``."""
    np.negative(x, out=y)


def copy(src, dst) -> None:
    """``dst[...] = src``."""
    dst[...] = src


# -- vectors where they live (the device twin allocates and copies on the GPU) -----

def empty(n, dtype):
    """A new 1-D vector (contents undefined)."""
    return np.empty(n, dtype)


def to_host(x) -> np.ndarray:
    """A host copy of a vector."""
    return np.array(x, copy=True)


def from_host(a):
    """A new vector holding a copy of host array ``a``."""
    return np.array(a, copy=True)


# -- SAM over a param group's table ------------------------------------------------

def sam_sumsq(table, adaptive) -> float:
    r""":math:`\sum_k \lVert g_k \rVert^2`, or with ``adaptive``
    :math:`\sum_k \lVert |p_k| \odot g_k \rVert^2`, in float64."""
    total = 0.0
    for p, g in zip(table.weights, table.grads):
        x = np.abs(_f64(p)) * _f64(g) if adaptive else _f64(g)
        total += float(np.dot(x, x))
    return total


def sam_perturb(table, e, scale, adaptive, total=0.0) -> None:
    r"""``e_k = c g_k`` (``adaptive``: :math:`c\,p_k^2 g_k`) and ``p_k += e_k``,
    with ``c = scale`` cast to the dtype; counted in ``table.outcome[0]``
    (``total`` in ``table.outcome[1]``), as the compiled passes count
    themselves."""
    for k, (p, g) in enumerate(zip(table.weights, table.grads)):
        lo = int(table.soff[k])
        ek = e[lo:lo + p.size]
        c = p.dtype.type(scale)
        ek[...] = (p * p * g if adaptive else g) * c
        p += ek
    table.outcome_array[1] = total
    table.outcome_array[0] += 1.0


def sam_fused(table, e, rho, adaptive) -> float:
    """The norm pass and, when it is finite, the perturbation with scale
    :func:`sam_scale`: what one compiled call does for a one-group SAM.
    Returns the sum of squares (non-finite: nothing was written), also in
    ``table.outcome[1]`` when it wrote."""
    total = sam_sumsq(table, adaptive)
    if math.isfinite(total):
        sam_perturb(table, e, sam_scale(rho, total), adaptive, total)
    return total


def sam_scale(rho, total) -> float:
    """``rho / sqrt(total)``, and 0 for a zero gradient (e = 0, no NaN)."""
    return rho / math.sqrt(total) if total > 0.0 else 0.0


def sam_restore(table, e) -> None:
    """``p_k -= e_k``: back to the point the perturbation started from;
    counted in ``table.outcome[0]`` (as the compiled restore counts itself,
    there in the same native call)."""
    for k, p in enumerate(table.weights):
        lo = int(table.soff[k])
        p -= e[lo:lo + p.size]
    table.outcome_array[0] += 1.0
