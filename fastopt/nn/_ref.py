"""NumPy reference kernels for the MLP: the readable specification.

Every function works on stacks of K models (K = 1 for a single MLP):
``X`` ``[K, B, n_in]`` (a stride-0 broadcast when all models share a batch),
``W`` ``[K, n_in, n_out]``, ``b`` ``[K, n_out]``, activations ``[K, B, n]``.
Outputs are written in place into the caller's workspaces. The compiled
backends (:mod:`._numba`, :mod:`._cython_backend`) implement the same
functions as fused single passes and are tested against these.
"""

from __future__ import annotations

import numpy as np

name = "numpy"


def _erf(x):
    from scipy.special import erf
    return erf(x)


def act_forward(z, act, alpha):
    if act == 0:
        return z
    if act == 1:
        return np.maximum(z, 0)
    if act == 2:
        return np.where(z > 0, z, alpha * z)
    if act == 3:
        return np.tanh(z)
    if act == 4:
        # Stable both ways: exp of a non-positive number only.
        e = np.exp(-np.abs(z))
        return np.where(z >= 0, 1 / (1 + e), e / (1 + e))
    if act == 5:
        return 0.5 * z * (1 + _erf(z / np.sqrt(2.0)))
    raise ValueError(f"unknown activation id {act}")


def act_derivative(z, a, act, alpha):
    """f'(z); ``a = f(z)`` is passed too (tanh and sigmoid use it)."""
    if act == 0:
        return np.ones_like(z)
    if act == 1:
        return (z > 0).astype(z.dtype)
    if act == 2:
        return np.where(z > 0, 1, alpha).astype(z.dtype)
    if act == 3:
        return 1 - a * a
    if act == 4:
        return a * (1 - a)
    if act == 5:
        pdf = np.exp(-0.5 * z * z) / np.sqrt(2 * np.pi)
        return 0.5 * (1 + _erf(z / np.sqrt(2.0))) + z * pdf
    raise ValueError(f"unknown activation id {act}")


def linear(X, W, Z):
    """``Z[k] = X[k] @ W[k]``."""
    Z[...] = np.matmul(X, W)


def linear_grad_w(X, D, gW):
    """``gW[k] = X[k]^T @ D[k]``."""
    gW[...] = np.matmul(np.swapaxes(X, 1, 2), D)


def linear_grad_x(D, W, DX):
    """``DX[k] = D[k] @ W[k]^T``."""
    DX[...] = np.matmul(D, np.swapaxes(W, 1, 2))


def bias_act(Z, b, A, act, alpha):
    """``Z += b`` (broadcast over the batch), then ``A = f(Z)``."""
    Z += b[:, None, :]
    if A is not Z:
        A[...] = act_forward(Z, act, alpha)


def act_grad(D, Z, A, gb, act, alpha):
    """``D *= f'(Z)`` in place and ``gb[k] = sum over the batch of D[k]``."""
    D *= act_derivative(Z, A, act, alpha)
    gb[...] = D.sum(axis=1)


def softmax_xent(Z, y, D, gb, losses):
    """Mean softmax cross-entropy per model; ``D = dloss/dZ``, ``gb = sum_b D``.

    Stable: ``log sum exp`` after subtracting the row max. ``y`` holds
    integer labels ``[K, B]`` already checked to be in range.
    """
    B = Z.shape[1]
    z = Z.astype(np.float64)
    m = z.max(axis=2, keepdims=True)
    e = np.exp(z - m)
    s = e.sum(axis=2, keepdims=True)
    logp_y = np.take_along_axis(z - m - np.log(s), y[:, :, None], axis=2)[:, :, 0]
    losses[...] = -logp_y.sum(axis=1) / B
    p = e / s
    np.put_along_axis(p, y[:, :, None], np.take_along_axis(p, y[:, :, None], 2) - 1, 2)
    D[...] = p / B
    gb[...] = D.sum(axis=1)


def mse(Z, T, D, gb, losses):
    """torch's MSELoss: mean over batch and outputs of ``(Z - T)^2``."""
    n = Z.shape[1] * Z.shape[2]
    r = Z.astype(np.float64) - T
    losses[...] = (r * r).sum(axis=(1, 2)) / n
    D[...] = 2 * r / n
    gb[...] = D.sum(axis=1)
