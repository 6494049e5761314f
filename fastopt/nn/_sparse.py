"""Sparse-input first layer: ``X @ W`` and ``X^T @ D`` skipping exact zeros.

Inputs such as MNIST images are mostly exact zeros (19% of the test set's
pixels are non-zero). For the first layer only, whose input is the data
itself, the compiled backends can index the batch's non-zeros once and then
run the two matmuls that read the input (forward ``Z = X @ W`` and the
weight gradient ``gW = X^T @ D``; the input needs no gradient) over them:

* **rows** (CSR, for the forward pass): per sample, the non-zero values and
  their feature indices, left-packed into ``[Kx, B, n_in]`` buffers, and the
  count per sample. Built in one branch-free pass (every element is written,
  the position advances only on a non-zero).
* **columns** (CSC, for the weight gradient): the same entries sorted by
  feature with a counting sort (``cptr[j]:cptr[j + 1]`` are feature ``j``'s
  entries), so each row of ``gW`` is summed in registers and written once,
  with no scattered read-modify-write.

Each non-zero costs one fused multiply-add per output over a whole row of
``W`` (or ``D``); eight non-zeros are combined per pass over the output row
so that row is loaded and stored once per eight.

Arrays are stacked like the other kernels: ``Kx`` is 1 when every model
sees the same batch (indexed once for all K models) or K for a batch per
model. The dense result is the specification; these agree with it to
rounding (only the summation order differs), except that a zero input
meeting an inf/NaN weight contributes 0 here and NaN in a dense product.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .._numba_cache import install as _fresh_cache

_fresh_cache()      # before the cache=True kernels: fastopt._numba_cache says why

# No nnan/ninf: NaN must stay visible (DESIGN.md). Serial, like the other
# fused passes of the MLP (fastopt.nn._numba): BLAS's threads are the one
# level of parallelism. A prange version was slower in a training loop at
# 2 threads (MNIST 784-256-256-10 epoch 0.23-0.25 s against 0.09-0.14 s for
# the serial kernels or the dense matmuls): its team and BLAS's spinning
# workers took turns.
_OPTS = dict(fastmath={"contract", "arcp", "reassoc", "nsz"}, cache=True, nogil=True,
             error_model="numpy")

# Cost model for "auto", in units of one dense multiply-add of the BLAS
# matmul on one thread (0.021 ns here). Fitted to kernel timings on the
# 2-core test machine (AVX-512, float32, batch 128, 784 inputs, one thread;
# OpenBLAS at ~95 GFLOP/s): indexing both ways costs ~60 units per input
# element; each non-zero ~89 + 2.35 * n_out units in the forward pass and as
# much in the gradient (at n_out = 256: 260 + 315 us for MNIST's 19.5k
# non-zeros; at 64: 118 + 82 us). The sparse kernels run on one thread and
# the dense matmuls on all of BLAS's, so the dense side is divided by BLAS's
# thread count (ideal scaling: the model leans to dense). On one thread at
# MNIST's density (0.19) the sparse layer is ~1.4x faster than sgemm for 256
# outputs and ~1.35x for 64 outputs when 16 models share the batch (index
# built once), and slower for 64 outputs with a batch per model (measured:
# layer time 0.78 vs 1.10 ms, 3.7 vs 5.0 ms, 6.9 vs 6.0 ms). On two BLAS
# threads MNIST into 256 units is slower sparse (a full step 1.48 vs 1.29
# ms), and the model picks sparse there only below ~14% density.
_INDEX_COST = 60.0
_NONZERO_COST = 89.0
_PER_OUTPUT_COST = 2.35


def worth_it(density, n_out, models_per_batch, blas_threads=1):
    """Whether the sparse layer should beat the dense matmuls: ``density``
    of non-zero inputs, ``n_out`` outputs, ``models_per_batch`` models
    reading each indexed batch (K when shared, else 1), dense matmuls on
    ``blas_threads`` threads."""
    per_input = (_INDEX_COST / models_per_batch
                 + 2.0 * density * (_NONZERO_COST + _PER_OUTPUT_COST * n_out))
    # dense: a multiply-add per output, forward and gradient
    return per_input < 2.0 * n_out / max(1, blas_threads)


@njit(**_OPTS)
def index_rows(X, val, idx, cnt):
    """CSR of ``X`` ``[Kx, B, n]`` into ``val``/``idx`` (same shape) and
    ``cnt`` ``[Kx, B]``; returns the number of non-zeros."""
    Kx, B, n = X.shape
    total = 0
    for k in range(Kx):
        for i in range(B):
            x_row = X[k, i]
            v_row = val[k, i]
            i_row = idx[k, i]
            c = 0
            for j in range(n):
                x = x_row[j]
                v_row[c] = x
                i_row[c] = j
                c += x != 0       # NaN counts as non-zero and stays visible
            cnt[k, i] = c
            total += c
    return total


@njit(**_OPTS)
def index_cols(val, idx, cnt, cval, crow, cptr):
    """CSC from the CSR: ``cval``/``crow`` ``[Kx, B * n]`` hold each entry's
    value and sample, feature ``j``'s entries at ``cptr[k, j]:cptr[k, j + 1]``
    (``cptr`` ``[Kx, n + 1]``), samples in increasing order."""
    Kx, B, n = val.shape
    for k in range(Kx):
        p = cptr[k]
        for j in range(n + 1):
            p[j] = 0
        for i in range(B):
            for c in range(cnt[k, i]):
                p[idx[k, i, c] + 1] += 1
        for j in range(n):
            p[j + 1] += p[j]
        # p[j] is now where feature j starts; fill, advancing p[j] to its end
        for i in range(B):
            for c in range(cnt[k, i]):
                j = idx[k, i, c]
                q = p[j]
                cval[k, q] = val[k, i, c]
                crow[k, q] = i
                p[j] = q + 1
        for j in range(n, 0, -1):   # back to starts: the end of j - 1 is the start of j
            p[j] = p[j - 1]
        p[0] = 0


@njit(inline="always", **_OPTS)
def _sum_rows(out, rows, values, entries, lo, hi):
    """``out = sum(values[e] * rows[entries[e]] for e in lo:hi)``, eight
    entries per pass over ``out``."""
    m = out.shape[0]
    zero = out.dtype.type(0)
    for o in range(m):
        out[o] = zero
    e = lo
    while e + 8 <= hi:
        x0, x1, x2, x3 = values[e], values[e + 1], values[e + 2], values[e + 3]
        x4, x5, x6, x7 = values[e + 4], values[e + 5], values[e + 6], values[e + 7]
        r0, r1, r2, r3 = (rows[entries[e]], rows[entries[e + 1]], rows[entries[e + 2]],
                          rows[entries[e + 3]])
        r4, r5, r6, r7 = (rows[entries[e + 4]], rows[entries[e + 5]], rows[entries[e + 6]],
                          rows[entries[e + 7]])
        for o in range(m):
            out[o] += (((x0 * r0[o] + x1 * r1[o]) + (x2 * r2[o] + x3 * r3[o]))
                       + ((x4 * r4[o] + x5 * r5[o]) + (x6 * r6[o] + x7 * r7[o])))
        e += 8
    while e < hi:
        x = values[e]
        r = rows[entries[e]]
        for o in range(m):
            out[o] += x * r[o]
        e += 1


@njit(**_OPTS)
def linear(val, idx, cnt, W, Z):
    """``Z[k] = X[k'] @ W[k]`` from the CSR of X (``k' = 0`` when shared)."""
    shared = cnt.shape[0] == 1
    for k in range(Z.shape[0]):
        kx = 0 if shared else k
        Wk, Zk, vk, ik, ck = W[k], Z[k], val[kx], idx[kx], cnt[kx]
        for i in range(Zk.shape[0]):
            _sum_rows(Zk[i], Wk, vk[i], ik[i], 0, ck[i])


@njit(**_OPTS)
def linear_grad_w(cval, crow, cptr, D, gW):
    """``gW[k] = X[k']^T @ D[k]`` from the CSC of X (``k' = 0`` when shared);
    a feature with no non-zero in the batch gets a zero row."""
    shared = cptr.shape[0] == 1
    for k in range(gW.shape[0]):
        kx = 0 if shared else k
        gk, Dk, vk, rk, p = gW[k], D[k], cval[kx], crow[kx], cptr[kx]
        for j in range(gk.shape[0]):
            _sum_rows(gk[j], Dk, vk, rk, p[j], p[j + 1])


def workspace(Kx, B, n, dtype, columns=True):
    """Buffers for the row index of a ``[Kx, B, n]`` batch, and with
    ``columns`` for its column index too (training; inference needs rows only)."""
    ws = {"val": np.empty((Kx, B, n), dtype), "idx": np.empty((Kx, B, n), np.int32),
          "cnt": np.empty((Kx, B), np.int64)}
    if columns:
        add_columns(ws)
    return ws


def add_columns(ws):
    """Add the column-index buffers to a :func:`workspace` made without them."""
    Kx, B, n = ws["val"].shape
    ws.update(cval=np.empty((Kx, B * n), ws["val"].dtype),
              crow=np.empty((Kx, B * n), np.int32), cptr=np.empty((Kx, n + 1), np.int64))
