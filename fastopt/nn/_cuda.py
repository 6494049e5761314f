"""The MLP on CUDA: ``Ensemble(..., backend="cuda")`` / ``MLP(..., backend="cuda")``.

Params, grads, workspaces and the optimizer state live on the device; a
training step launches the kernels of :mod:`._cuda_kernels` (and cuBLAS's
GEMM where a binding imports, :mod:`._cuda_blas`) in order on the legacy
default stream, the optimizer's step after them, and reads back only the K
losses. Per layer, as on the CPU: forward is a product then one fused bias
+ activation pass; backward is the loss kernel (value and gradient in one
pass), then per layer the weight gradient ``X^T D``, the upstream gradient
``D W^T`` and one fused pass (activation derivative x upstream gradient,
the bias gradient reduced in the same pass).

Importing this module raises ImportError when numba-cuda is missing or no
GPU (and no simulator) is usable; :mod:`.model` turns that into one line.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

import numpy as np

from ..backends import numba_cuda as C   # raises ImportError where CUDA is unusable
from numba import cuda
from . import _cuda_blas
from . import _cuda_kernels as K

name = "cuda"
SIMULATOR = C.SIMULATOR


class Mat(NamedTuple):
    """K row-major matrices in a flat device buffer: matrix k starts at
    element ``off + k * ks`` (``ks = 0``: one matrix all models share)."""
    data: object
    off: int
    ks: int


# -- which code runs the products --------------------------------------------------------

_gemm = None          # None: not chosen yet; False: the numba kernel; else a _cuda_blas.Cublas


def select(choice="auto") -> str:
    """Choose what runs the MLP's products: "auto" (cuBLAS through the first
    binding that imports, else the numba kernel; always the kernel under the
    simulator, whose arrays are host memory), "numba", "cupy", "nvmath", or
    a callable with :class:`._cuda_blas.Cublas`'s call signature (tests pass
    a fake). Returns :func:`matmul_engine`."""
    global _gemm
    if callable(choice):
        _gemm = choice
        return matmul_engine()
    if choice not in _cuda_blas.CHOICES:
        raise ValueError(f"matmul must be one of {list(_cuda_blas.CHOICES)}, got {choice!r}")
    found = None
    if choice != "numba" and not (choice == "auto" and SIMULATOR):
        for binding in (_cuda_blas.BINDINGS if choice == "auto" else (choice,)):
            found = _cuda_blas.load(binding, C._pointer)
            if found:
                break
        if not found and choice != "auto":
            raise ValueError(f"matmul {choice!r}: the binding does not import here")
    _gemm = found or False
    return matmul_engine()


def engines() -> list:
    """What can run the products here, for :func:`select`: "numba", then
    each cuBLAS binding that imports (none under the simulator: its device
    arrays are host memory that cuBLAS cannot read)."""
    if SIMULATOR:
        return ["numba"]
    return ["numba"] + [b for b in _cuda_blas.BINDINGS if _cuda_blas.load(b, C._pointer)]


def _engine():
    if _gemm is None:
        select(_cuda_blas.requested())
    return _gemm


def matmul_engine() -> str:
    """What runs the products, in words: "cuBLAS via <binding> <version>"
    or "numba kernels"."""
    eng = _engine()
    return f"cuBLAS via {eng}" if eng else "numba kernels"


def _cdiv(a, b):
    return -(-a // b)


def matmul(c: Mat, a: Mat, b: Mat, M, N, Kd, ta, tb, batch) -> None:
    """``c[k] = op(a[k]) @ op(b[k])`` for ``k < batch`` (see ``_bmm_kernel``)."""
    eng = _engine()
    if eng:
        eng(c, a, b, M, N, Kd, ta, tb, batch)
        return
    grid = (_cdiv(N, K.TILE), _cdiv(M, K.TILE), batch)
    K._bmm_kernel[grid, (K.TILE, K.TILE)](a.data, a.off, a.ks, b.data, b.off, b.ks,
                                         c.data, c.off, c.ks, M, N, Kd, bool(ta), bool(tb))


# -- the fused passes ------------------------------------------------------------------------

def bias_act(Z, A, b: Mat, rows, n, act, alpha) -> None:
    blocks = max(1, min(_cdiv(Z.size, K.THREADS), C.max_blocks()))
    K._bias_act_kernel[blocks, K.THREADS](Z, A, b.data, b.off, b.ks, rows, n, act,
                                          Z.dtype.type(alpha))


def act_grad(D, Z, A, gb: Mat, rows, n, act, alpha, models) -> None:
    K._act_grad_kernel[(_cdiv(n, K.COLS), models), (K.COLS, K.ROWS)](
        D, Z, A, gb.data, gb.off, gb.ks, rows, n, act, D.dtype.type(alpha))


def softmax_xent(Z, y: Mat, D, losses, rows, n, models) -> None:
    K._xent_kernel[models, K.THREADS](Z, y.data, y.ks, D, losses, rows, n,
                                      Z.dtype.type(1.0 / rows))


def mse(Z, T: Mat, D, losses, rows, n, models) -> None:
    t = Z.dtype.type
    K._mse_kernel[models, K.THREADS](Z, T.data, T.ks, D, losses, rows, n,
                                     t(2.0 / (rows * n)), t(1.0 / (rows * n)))


# -- device inputs -----------------------------------------------------------------------------

is_device_array = C.is_device_array


def device_input(name, a, dtype=None):
    """A device batch (X, labels or targets: numba, CuPy, torch CUDA) as a
    numba device array (zero copy), checked: C-contiguous, on the current
    GPU, of ``dtype`` if given. Its values are not read: that would wait
    for the GPU."""
    d = C.as_device(name, a)
    dt = np.dtype(d.dtype)
    if dtype is not None and dt != dtype:
        raise TypeError(f"{name} on the device must be {np.dtype(dtype)} (the model's dtype; "
                        f"device data is not converted), got {dt}")
    if not C._contiguous(d):
        raise ValueError(f"{name} must be C-contiguous")
    C.check_devices([(name, d)])
    return d


class DeviceNet:
    """The device half of an :class:`~fastopt.nn.Ensemble` built with
    ``backend="cuda"``: its flat params and grads (``DeviceFlatArrays``, the
    CPU layout), the layer offsets, the workspaces, forward and backward."""

    def __init__(self, model, host_params):
        self.k, self.sizes, self.dtype = model.k, model.sizes, model.dtype
        self.act, self.alpha, self.loss = model.act, model.alpha, model.loss
        self.params = C.DeviceFlatArrays(cuda.to_device(host_params.data), host_params.shapes)
        self.grads = self.params.zeros_like()
        self.n_per_model = host_params.data.size // self.k
        self.w_off, self.b_off = [], []
        off = 0
        for n_in, n_out in zip(self.sizes, self.sizes[1:]):
            self.w_off.append(off)
            self.b_off.append(off + n_in * n_out)
            off += n_in * n_out + n_out
        self._ws = OrderedDict()

    # -- layout ------------------------------------------------------------------------
    def model_params(self, i, flat=None) -> "C.DeviceFlatArrays":
        """Model ``i``'s tensors: views of its contiguous run of ``params``
        (or of ``flat``, laid out as they are: the grads)."""
        flat = self.params if flat is None else flat
        n = self.n_per_model
        per = len(flat) // self.k
        return C.DeviceFlatArrays(flat.data[i * n:(i + 1) * n],
                                  flat.shapes[i * per:(i + 1) * per])

    def owns(self, arrays) -> bool:
        """Whether every array lies inside this model's params buffer."""
        lo, hi = C._device_bounds(self.params.data)
        for a in arrays:
            if not C.is_device_array(a):
                return False
            a_lo, a_hi = C._device_bounds(a)
            if a_lo < lo or a_hi > hi:
                return False
        return True

    # -- workspaces --------------------------------------------------------------------
    def _workspace(self, B, shared):
        key = (B, shared)
        ws = self._ws.get(key)
        if ws is not None:
            self._ws.move_to_end(key)
            return ws
        Z = [cuda.device_array(self.k * B * n, self.dtype) for n in self.sizes[1:]]
        ws = {"Z": Z, "A": [cuda.device_array_like(z) for z in Z[:-1]] + [Z[-1]],
              "D": [cuda.device_array_like(z) for z in Z],
              "losses": cuda.device_array(self.k, self.dtype)}
        self._ws[key] = ws
        while len(self._ws) > 8:   # e.g. train + last partial batch + eval chunks
            self._ws.popitem(last=False)
        return ws

    def _staged(self, ws, key, host, dtype):
        """``host`` copied into the workspace's device buffer ``key`` (one
        host-to-device copy); the buffer is made on first use."""
        host = np.ascontiguousarray(host, dtype).reshape(-1)
        buf = ws.get((key, host.size, host.dtype.str))
        if buf is None:
            buf = ws[(key, host.size, host.dtype.str)] = cuda.device_array(host.size, host.dtype)
        buf.copy_to_device(host)
        return buf

    def _input(self, X, shared):
        B = tuple(X.shape)[-2]   # the simulator's shapes take no negative index
        ws = self._workspace(B, shared)
        if is_device_array(X):
            flat = C.flat(X)
        else:
            flat = self._staged(ws, "X", X, self.dtype)
        return ws, Mat(flat, 0, 0 if shared else B * self.sizes[0])

    def _targets(self, ws, y, B):
        """Labels (int32 when they come from the host) or targets, flat on the
        device, with the stride between models (0: shared)."""
        xent = self.loss == "cross_entropy"
        per_model = y.ndim == (2 if xent else 3)
        ks = B * (1 if xent else self.sizes[-1]) if per_model else 0
        if is_device_array(y):
            return Mat(C.flat(y), 0, ks)
        return Mat(self._staged(ws, "y", y, np.int32 if xent else self.dtype), 0, ks)

    # -- compute -----------------------------------------------------------------------
    def _forward(self, ws, x: Mat, B):
        data, P, last = self.params.data, self.n_per_model, len(self.sizes) - 2
        inp = x
        for l, (n_in, n_out) in enumerate(zip(self.sizes, self.sizes[1:])):
            Z, A = ws["Z"][l], ws["A"][l]
            matmul(Mat(Z, 0, B * n_out), inp, Mat(data, self.w_off[l], P), B, n_out, n_in,
                   False, False, self.k)
            bias_act(Z, A, Mat(data, self.b_off[l], P), B, n_out, 0 if l == last else self.act,
                     self.alpha)
            inp = Mat(A, 0, B * n_out)

    def _backward(self, ws, x: Mat, y: Mat, B):
        params, grads, P = self.params.data, self.grads.data, self.n_per_model
        Z, A, D, n = ws["Z"], ws["A"], ws["D"], self.sizes
        last = len(n) - 2
        if self.loss == "cross_entropy":
            softmax_xent(Z[last], y, D[last], ws["losses"], B, n[-1], self.k)
        else:
            mse(Z[last], y, D[last], ws["losses"], B, n[-1], self.k)
        # the output layer's bias gradient: the column sums of D (identity)
        act_grad(D[last], Z[last], Z[last], Mat(grads, self.b_off[last], P), B, n[-1], 0,
                 self.alpha, self.k)
        for l in range(last, -1, -1):
            inp = x if l == 0 else Mat(A[l - 1], 0, B * n[l])
            matmul(Mat(grads, self.w_off[l], P), inp, Mat(D[l], 0, B * n[l + 1]),
                   n[l], n[l + 1], B, True, False, self.k)
            if l:
                matmul(Mat(D[l - 1], 0, B * n[l]), Mat(D[l], 0, B * n[l + 1]),
                       Mat(params, self.w_off[l], P), B, n[l], n[l + 1], False, True, self.k)
                act_grad(D[l - 1], Z[l - 1], A[l - 1], Mat(grads, self.b_off[l - 1], P), B,
                         n[l], self.act, self.alpha, self.k)

    def loss_and_grad(self, X, shared, y):
        """Forward + backward of checked inputs (host or device); gradients
        into ``grads``. Returns the K losses, still on the device."""
        B = tuple(X.shape)[-2]
        ws, x = self._input(X, shared)
        y = self._targets(ws, y, B)
        self._forward(ws, x, B)
        self._backward(ws, x, y, B)
        return ws["losses"]

    def forward(self, X, shared) -> np.ndarray:
        """The outputs ``[K, B, n_out]`` of a checked batch, copied to the host."""
        B = tuple(X.shape)[-2]
        ws, x = self._input(X, shared)
        self._forward(ws, x, B)
        return ws["Z"][-1].copy_to_host().reshape(self.k, B, self.sizes[-1])
