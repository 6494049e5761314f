"""Stacked matmuls through NumPy's BLAS (``np.dot`` with ``out=``).

One sgemm/dgemm call per model, written straight into the caller's
workspace or gradient view (each model's block is C-contiguous; only the
stride between models is arbitrary, and a shared batch is a stride-0
broadcast). BLAS runs its own threads; nothing else runs alongside it.
"""

from __future__ import annotations

import numpy as np


def linear(X, W, Z):
    """``Z[k] = X[k] @ W[k]``."""
    for k in range(Z.shape[0]):
        np.dot(X[k], W[k], out=Z[k])


def linear_grad_w(X, D, gW):
    """``gW[k] = X[k]^T @ D[k]`` (into a view of the flat gradient buffer)."""
    for k in range(D.shape[0]):
        np.dot(X[k].T, D[k], out=gW[k])


def linear_grad_x(D, W, DX):
    """``DX[k] = D[k] @ W[k]^T``."""
    for k in range(D.shape[0]):
        np.dot(D[k], W[k].T, out=DX[k])
