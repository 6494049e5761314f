"""Numba backend: fused ``@njit`` passes around BLAS matmuls.

The matmuls are ``np.dot`` into the workspaces (:mod:`._blas`, one BLAS
call per model, BLAS threads). Between them, each elementwise step is one
fused pass over memory: bias add + activation; activation derivative x
upstream gradient with the bias gradient summed in the same pass; softmax
cross-entropy (or MSE) loss, its gradient and the last bias gradient in one
pass. The activation is a runtime argument of one kernel (no per-activation
copies; changing it does not recompile). One level of parallelism: BLAS
threads inside the matmuls, serial fused passes (a ``prange`` team started
between BLAS calls fights BLAS's spinning workers on a 2-core machine).
Transcendentals are evaluated in float64 and stored in the array dtype.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from ._blas import linear, linear_grad_w, linear_grad_x  # noqa: F401  (backend API)

from .._numba_cache import install as _fresh_cache

_fresh_cache()      # before the cache=True kernels: fastopt._numba_cache says why

name = "numba"
# No nnan/ninf: NaN must stay visible (see DESIGN.md).
_OPTS = dict(fastmath={"contract", "arcp", "reassoc", "nsz"}, cache=True, nogil=True,
             error_model="numpy")
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)


@njit(inline="always", **_OPTS)
def _f(z, act, alpha):
    if act == 1:
        return z if z > 0.0 else 0.0
    if act == 2:
        return z if z > 0.0 else alpha * z
    if act == 3:
        return math.tanh(z)
    if act == 4:
        if z >= 0.0:
            return 1.0 / (1.0 + math.exp(-z))
        e = math.exp(z)
        return e / (1.0 + e)
    if act == 5:
        return 0.5 * z * (1.0 + math.erf(z * _INV_SQRT2))
    return z


@njit(inline="always", **_OPTS)
def _df(z, a, act, alpha):
    if act == 1:
        return 1.0 if z > 0.0 else 0.0
    if act == 2:
        return 1.0 if z > 0.0 else alpha
    if act == 3:
        return 1.0 - a * a
    if act == 4:
        return a * (1.0 - a)
    if act == 5:
        return (0.5 * (1.0 + math.erf(z * _INV_SQRT2))
                + z * math.exp(-0.5 * z * z) * _INV_SQRT2PI)
    return 1.0


@njit(**_OPTS)
def _bias_act(Z, b, A, act, alpha):
    K, B, n = Z.shape
    al = Z.dtype.type(alpha)
    zero = Z.dtype.type(0)
    for k in range(K):
        bk = b[k]
        for i in range(B):
            z = Z[k, i]
            a = A[k, i]
            # the activation is chosen once per row: the simple ones vectorise
            if act == 1:
                for j in range(n):
                    v = z[j] + bk[j]
                    z[j] = v
                    a[j] = v if v > 0 else zero
            elif act == 2:
                for j in range(n):
                    v = z[j] + bk[j]
                    z[j] = v
                    a[j] = v if v > 0 else al * v
            else:
                for j in range(n):
                    v = z[j] + bk[j]
                    z[j] = v
                    a[j] = _f(np.float64(v), act, alpha)


@njit(**_OPTS)
def _act_grad(D, Z, A, gb, act, alpha):
    K, B, n = D.shape
    al = D.dtype.type(alpha)
    one = D.dtype.type(1)
    zero = D.dtype.type(0)
    for k in range(K):
        g = gb[k]
        for j in range(n):
            g[j] = zero
        for i in range(B):
            d = D[k, i]
            z = Z[k, i]
            a = A[k, i]
            if act == 1:
                for j in range(n):
                    v = d[j] if z[j] > 0 else zero
                    d[j] = v
                    g[j] += v
            elif act == 2:
                for j in range(n):
                    v = d[j] if z[j] > 0 else al * d[j]
                    d[j] = v
                    g[j] += v
            elif act == 3:
                for j in range(n):
                    v = d[j] * (one - a[j] * a[j])
                    d[j] = v
                    g[j] += v
            elif act == 4:
                for j in range(n):
                    v = d[j] * a[j] * (one - a[j])
                    d[j] = v
                    g[j] += v
            else:
                for j in range(n):
                    v = d[j] * _df(np.float64(z[j]), np.float64(a[j]), act, alpha)
                    d[j] = v
                    g[j] += v


@njit(**_OPTS)
def _softmax_xent(Z, y, D, gb, losses):
    K, B, n = Z.shape
    inv_b = 1.0 / B
    for k in range(K):
        for j in range(n):
            gb[k, j] = 0.0
        total = 0.0
        for i in range(B):
            m = np.float64(Z[k, i, 0])
            for j in range(1, n):
                m = max(m, np.float64(Z[k, i, j]))
            s = 0.0
            for j in range(n):       # one exp per element, kept in D
                p = math.exp(Z[k, i, j] - m)
                s += p
                D[k, i, j] = p
            t = y[k, i]
            total += m + math.log(s) - Z[k, i, t]
            p = inv_b / s
            for j in range(n):
                d = D[k, i, j] * p - (inv_b if j == t else 0.0)
                D[k, i, j] = d
                gb[k, j] += D[k, i, j]
        losses[k] = total * inv_b


@njit(**_OPTS)
def _mse(Z, T, D, gb, losses):
    K, B, n = Z.shape
    scale = 2.0 / (B * n)
    for k in range(K):
        for j in range(n):
            gb[k, j] = 0.0
        total = 0.0
        for i in range(B):
            for j in range(n):
                r = np.float64(Z[k, i, j]) - T[k, i, j]
                total += r * r
                D[k, i, j] = scale * r
                gb[k, j] += D[k, i, j]
        losses[k] = total / (B * n)


def bias_act(Z, b, A, act, alpha):
    _bias_act(Z, b, A, act, alpha)


def act_grad(D, Z, A, gb, act, alpha):
    _act_grad(D, Z, A, gb, act, alpha)


def softmax_xent(Z, y, D, gb, losses):
    _softmax_xent(Z, y, D, gb, losses)


def mse(Z, T, D, gb, losses):
    _mse(Z, T, D, gb, losses)
