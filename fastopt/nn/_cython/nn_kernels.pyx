# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""Cython MLP kernels: BLAS gemm through ``scipy.linalg.cython_blas`` and
fused single passes.

Arrays are stacks of K models ``[K, rows, cols]`` with C-contiguous rows
(the inner stride is one element; checked by the caller); the stride
between models is arbitrary (a stride-0 broadcast for a shared
batch, ``P`` elements for views into the flat parameter buffer). Row-major
``C = A @ B`` is column-major ``C^T = B^T A^T``, so every call below swaps
its operands. Every shape and stride is checked in Python
(``fastopt.nn.inputs`` and ``fastopt.nn.layers``) before these run.

The activation is a runtime id (see ``fastopt.nn.activations``) of one
kernel; transcendentals are evaluated in double and stored in the array
dtype. One level of parallelism: BLAS runs its threads inside the gemm
calls; the fused passes are serial (on a 2-core machine an OpenMP team
started between BLAS calls fights BLAS's spinning workers and a step ran
~30x slower).
"""

from libc.math cimport erf, exp, log, tanh, sqrt
from libc.stdint cimport int64_t
from scipy.linalg.cython_blas cimport dgemm, sgemm

ctypedef fused floating:
    float
    double

cdef double INV_SQRT2 = 0.7071067811865476
cdef double INV_SQRT2PI = 0.3989422804014327


cdef inline void _gemm(char ta, char tb, int m, int n, int k, floating *a, int lda,
                       floating *b, int ldb, floating *c, int ldc) noexcept nogil:
    """Column-major ``c = op(a) @ op(b)`` (alpha 1, beta 0)."""
    cdef float one_s = 1.0, zero_s = 0.0
    cdef double one_d = 1.0, zero_d = 0.0
    if floating is float:
        sgemm(&ta, &tb, &m, &n, &k, &one_s, a, &lda, b, &ldb, &zero_s, c, &ldc)
    else:
        dgemm(&ta, &tb, &m, &n, &k, &one_d, a, &lda, b, &ldb, &zero_d, c, &ldc)


cdef inline int _ld(Py_ssize_t stride, Py_ssize_t rows, Py_ssize_t cols,
                    Py_ssize_t size) noexcept nogil:
    """Leading dimension of a row-major block: the row stride in elements
    (a single row's stride is meaningless to NumPy, so use its width)."""
    return <int>(cols if rows == 1 else stride // size)


def linear(const floating[:, :, :] X, const floating[:, :, :] W,
           floating[:, :, ::1] Z):
    """``Z[k] = X[k] @ W[k]``: X [K,B,n_in], W [K,n_in,n_out], Z [K,B,n_out]."""
    cdef Py_ssize_t k
    cdef int B = Z.shape[1], n_out = Z.shape[2], n_in = W.shape[1]
    cdef int ldx = _ld(X.strides[1], B, n_in, sizeof(floating))
    cdef int ldw = _ld(W.strides[1], n_in, n_out, sizeof(floating))
    cdef int ldz = _ld(Z.strides[1], B, n_out, sizeof(floating))
    with nogil:
        for k in range(Z.shape[0]):
            _gemm(c'N', c'N', n_out, B, n_in, <floating *>&W[k, 0, 0], ldw,
                  <floating *>&X[k, 0, 0], ldx, &Z[k, 0, 0], ldz)


def linear_grad_w(const floating[:, :, :] X, const floating[:, :, ::1] D,
                  floating[:, :, :] gW):
    """``gW[k] = X[k]^T @ D[k]``: X [K,B,n_in], D [K,B,n_out], gW [K,n_in,n_out]."""
    cdef Py_ssize_t k
    cdef int B = D.shape[1], n_out = D.shape[2], n_in = gW.shape[1]
    cdef int ldx = _ld(X.strides[1], B, n_in, sizeof(floating))
    cdef int ldd = _ld(D.strides[1], B, n_out, sizeof(floating))
    cdef int ldg = _ld(gW.strides[1], n_in, n_out, sizeof(floating))
    with nogil:
        for k in range(D.shape[0]):
            _gemm(c'N', c'T', n_out, n_in, B, <floating *>&D[k, 0, 0], ldd,
                  <floating *>&X[k, 0, 0], ldx, &gW[k, 0, 0], ldg)


def linear_grad_x(const floating[:, :, ::1] D, const floating[:, :, :] W,
                  floating[:, :, ::1] DX):
    """``DX[k] = D[k] @ W[k]^T``: D [K,B,n_out], W [K,n_in,n_out], DX [K,B,n_in]."""
    cdef Py_ssize_t k
    cdef int B = D.shape[1], n_out = D.shape[2], n_in = DX.shape[2]
    cdef int ldd = _ld(D.strides[1], B, n_out, sizeof(floating))
    cdef int ldw = _ld(W.strides[1], n_in, n_out, sizeof(floating))
    cdef int ldx = _ld(DX.strides[1], B, n_in, sizeof(floating))
    with nogil:
        for k in range(D.shape[0]):
            _gemm(c'T', c'N', n_in, B, n_out, <floating *>&W[k, 0, 0], ldw,
                  <floating *>&D[k, 0, 0], ldd, &DX[k, 0, 0], ldx)


cdef inline double _f(double z, int act, double alpha) noexcept nogil:
    cdef double e
    if act == 1:
        return z if z > 0.0 else 0.0
    if act == 2:
        return z if z > 0.0 else alpha * z
    if act == 3:
        return tanh(z)
    if act == 4:
        if z >= 0.0:
            return 1.0 / (1.0 + exp(-z))
        e = exp(z)
        return e / (1.0 + e)
    if act == 5:
        return 0.5 * z * (1.0 + erf(z * INV_SQRT2))
    return z


cdef inline double _df(double z, double a, int act, double alpha) noexcept nogil:
    if act == 1:
        return 1.0 if z > 0.0 else 0.0
    if act == 2:
        return 1.0 if z > 0.0 else alpha
    if act == 3:
        return 1.0 - a * a
    if act == 4:
        return a * (1.0 - a)
    if act == 5:
        return 0.5 * (1.0 + erf(z * INV_SQRT2)) + z * exp(-0.5 * z * z) * INV_SQRT2PI
    return 1.0


cdef inline void _bias_act_row(floating *z, const floating *b, floating *a, Py_ssize_t n,
                               int act, double alpha) noexcept nogil:
    """One row: ``z += b``; ``a = f(z)``. The activation is chosen once per row,
    so the simple ones run as vectorisable loops."""
    cdef Py_ssize_t j
    cdef floating v, al = <floating>alpha
    if act == 1:
        for j in range(n):
            v = z[j] + b[j]
            z[j] = v
            a[j] = v if v > 0 else 0
    elif act == 2:
        for j in range(n):
            v = z[j] + b[j]
            z[j] = v
            a[j] = v if v > 0 else al * v
    else:
        for j in range(n):
            v = z[j] + b[j]
            z[j] = v
            a[j] = <floating>_f(v, act, alpha)


cdef inline void _act_grad_row(floating *d, const floating *z, const floating *a,
                               floating *g, Py_ssize_t n, int act,
                               double alpha) noexcept nogil:
    """One row: ``d *= f'(z)``; ``g += d``."""
    cdef Py_ssize_t j
    cdef floating v, al = <floating>alpha
    if act == 1:
        for j in range(n):
            v = d[j] if z[j] > 0 else 0
            d[j] = v
            g[j] += v
    elif act == 2:
        for j in range(n):
            v = d[j] if z[j] > 0 else al * d[j]
            d[j] = v
            g[j] += v
    elif act == 3:
        for j in range(n):
            v = d[j] * (1 - a[j] * a[j])
            d[j] = v
            g[j] += v
    elif act == 4:
        for j in range(n):
            v = d[j] * a[j] * (1 - a[j])
            d[j] = v
            g[j] += v
    else:
        for j in range(n):
            v = <floating>(d[j] * _df(z[j], a[j], act, alpha))
            d[j] = v
            g[j] += v


def bias_act(floating[:, :, ::1] Z, const floating[:, :] b, floating[:, :, ::1] A,
             int act, double alpha):
    """``Z += b``; ``A = f(Z)`` in one pass. ``b`` rows must be contiguous."""
    cdef Py_ssize_t k, i
    cdef Py_ssize_t K = Z.shape[0], B = Z.shape[1], n = Z.shape[2]
    if n == 0:
        return
    with nogil:
        for k in range(K):
            for i in range(B):
                _bias_act_row(&Z[k, i, 0], &b[k, 0], &A[k, i, 0], n, act, alpha)


def act_grad(floating[:, :, ::1] D, const floating[:, :, ::1] Z,
             const floating[:, :, ::1] A, floating[:, :] gb, int act, double alpha):
    """``D *= f'(Z)``; ``gb[k] = sum_i D[k, i]`` in the same pass. ``gb`` rows
    must be contiguous."""
    cdef Py_ssize_t k, i, j
    cdef Py_ssize_t K = D.shape[0], B = D.shape[1], n = D.shape[2]
    if n == 0:
        return
    with nogil:
        for k in range(K):
            for j in range(n):
                gb[k, j] = 0
            for i in range(B):
                _act_grad_row(&D[k, i, 0], &Z[k, i, 0], &A[k, i, 0], &gb[k, 0], n, act,
                              alpha)


def softmax_xent(const floating[:, :, ::1] Z, const int64_t[:, ::1] y,
                 floating[:, :, ::1] D, floating[:, :] gb, double[::1] losses):
    """Mean softmax cross-entropy per model, its gradient and the bias gradient."""
    cdef Py_ssize_t k, i, j, t
    cdef Py_ssize_t K = Z.shape[0], B = Z.shape[1], n = Z.shape[2]
    cdef double m, s, lse, p, total, inv_b = 1.0 / B
    cdef floating d
    for k in range(K):
        for j in range(n):
            gb[k, j] = 0
        total = 0.0
        for i in range(B):
            m = Z[k, i, 0]
            for j in range(1, n):
                if Z[k, i, j] > m:
                    m = Z[k, i, j]
            s = 0.0
            for j in range(n):       # one exp per element, kept in D
                p = exp(Z[k, i, j] - m)
                s = s + p
                D[k, i, j] = <floating>p
            t = y[k, i]
            total = total + m + log(s) - Z[k, i, t]
            p = inv_b / s
            for j in range(n):
                d = <floating>(D[k, i, j] * p - (inv_b if j == t else 0.0))
                D[k, i, j] = d
                gb[k, j] += d
        losses[k] = total * inv_b


def mse(const floating[:, :, ::1] Z, const floating[:, :, ::1] T,
        floating[:, :, ::1] D, floating[:, :] gb, double[::1] losses):
    """torch's MSELoss (mean over batch and outputs), its gradient and the bias gradient."""
    cdef Py_ssize_t k, i, j
    cdef Py_ssize_t K = Z.shape[0], B = Z.shape[1], n = Z.shape[2]
    cdef double r, total, scale = 2.0 / (B * n)
    cdef floating d
    for k in range(K):
        for j in range(n):
            gb[k, j] = 0
        total = 0.0
        for i in range(B):
            for j in range(n):
                r = <double>Z[k, i, j] - T[k, i, j]
                total = total + r * r
                d = <floating>(scale * r)
                D[k, i, j] = d
                gb[k, j] += d
        losses[k] = total / (B * n)
