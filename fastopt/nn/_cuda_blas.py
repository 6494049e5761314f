"""cuBLAS for the MLP's matmuls on CUDA, through a maintained Python binding.

The matmuls of :mod:`._cuda` are batches of K row-major products in flat
device buffers (an offset, and a stride between models that is 0 for a
batch all models share). cuBLAS's strided-batched GEMM takes exactly that:
one call per product, written straight into the model's workspaces and
gradient buffer, no copies, no allocation. Two bindings expose it with the
same raw arguments: CuPy (``cupy_backends.cuda.libs.cublas``) and
nvmath-python (``nvmath.bindings.cublas``). The first that imports is used
(``FASTOPT_NN_MATMUL=numba|cupy|nvmath`` or :func:`select` choose one);
without either, the numba kernel of :mod:`._cuda_kernels` runs the products.

No epilogue (cuBLASLt's bias/ReLU fusion): the backward pass needs the
pre-activation for every activation but ReLU, nvmath-python's matmul with an
epilogue allocates its result instead of writing into the workspace, and
the fused bias + activation pass after the product moves only the layer's
output once. Row-major mapping: cuBLAS is column-major, and a row-major
``C = op(A) @ op(B)`` is the column-major ``C^T = op(B)^T @ op(A)^T``, so
cuBLAS's first operand is B (:func:`gemm_args`).
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import numpy as np

#: cublasOperation_t
OP_N, OP_T = 0, 1
#: bindings in preference order
BINDINGS = ("cupy", "nvmath")
CHOICES = ("auto", "numba") + BINDINGS


def gemm_args(M, N, Kd, ta, tb) -> dict:
    """cuBLAS's arguments for the row-major ``C[M, N] = op(A)[M, Kd] @
    op(B)[Kd, N]`` (``op(A)`` stored ``[Kd, M]`` when ``ta``, ``op(B)``
    stored ``[N, Kd]`` when ``tb``), as the column-major ``C^T = op(B)^T
    op(A)^T``: cuBLAS's A is our B and its B our A.

    A row-major ``[r, c]`` matrix is the column-major ``[c, r]`` one with
    leading dimension ``c``: B stored ``[Kd, N]`` is already ``op(B)^T``
    (no transpose, ld N); stored ``[N, Kd]`` it is ``op(B)`` seen
    column-major, so cuBLAS transposes it (ld Kd). The same for A."""
    return {"transa": OP_T if tb else OP_N, "transb": OP_T if ta else OP_N,
            "m": N, "n": M, "k": Kd, "lda": Kd if tb else N, "ldb": M if ta else Kd,
            "ldc": N}


class Cublas:
    """One binding's strided-batched GEMM behind the products of :mod:`._cuda`.

    ``sgemm``/``dgemm`` take cuBLAS's arguments in its order (handle, transa,
    transb, m, n, k, alpha pointer, A, lda, strideA, B, ldb, strideB, beta
    pointer, C, ldc, strideC, batch); ``handle()`` gives the current
    device's handle, set to the legacy default stream, the one the numba
    kernels run on, so the products and the kernels stay in order.
    """

    def __init__(self, name, version, handle, sgemm, dgemm, pointer):
        self.name, self.version = name, version
        self._handle = handle
        self._pointer = pointer
        self._fns = {np.dtype(np.float32): sgemm, np.dtype(np.float64): dgemm}
        # alpha = 1, beta = 0 as host scalars (cuBLAS's default pointer mode)
        self._scalars = {dt: (np.ones(1, dt), np.zeros(1, dt)) for dt in self._fns}

    def __str__(self):
        return f"{self.name} {self.version}"

    def __call__(self, C, A, B, M, N, Kd, ta, tb, batch):
        """``C[k] = op(A[k]) @ op(B[k])`` for ``k < batch``: each of C, A, B a
        ``(flat device array, offset, stride between models)``."""
        dt = np.dtype(C[0].dtype)
        one, zero = self._scalars[dt]
        g = gemm_args(M, N, Kd, ta, tb)
        item = dt.itemsize
        self._fns[dt](self._handle(), g["transa"], g["transb"], g["m"], g["n"], g["k"],
                      one.ctypes.data,
                      self._pointer(B[0]) + B[1] * item, g["lda"], B[2],
                      self._pointer(A[0]) + A[1] * item, g["ldb"], A[2],
                      zero.ctypes.data,
                      self._pointer(C[0]) + C[1] * item, g["ldc"], C[2], batch)


def _cupy(pointer):
    import cupy
    from cupy_backends.cuda.libs import cublas

    null = cupy.cuda.Stream.null

    def on_default_stream(gemm):
        # CuPy points its handle at CuPy's current stream before each call:
        # make that the legacy default stream, whatever the caller chose
        def call(*args):
            with null:
                gemm(*args)
        return call
    return Cublas("cupy", cupy.__version__, cupy.cuda.device.get_cublas_handle,
                  on_default_stream(cublas.sgemmStridedBatched),
                  on_default_stream(cublas.dgemmStridedBatched), pointer)


def _nvmath(pointer):
    import nvmath
    from nvmath.bindings import cublas
    from numba import cuda
    handles = {}

    def handle():
        dev = cuda.get_current_device().id
        h = handles.get(dev)
        if h is None:
            h = handles[dev] = cublas.create()
            cublas.set_stream(h, 0)      # the legacy default stream
        return h
    return Cublas("nvmath-python", nvmath.__version__, handle, cublas.sgemm_strided_batched,
                  cublas.dgemm_strided_batched, pointer)


_LOADERS = {"cupy": _cupy, "nvmath": _nvmath}
_MODULE_OF = {"cupy": "cupy", "nvmath": "nvmath"}


def _present(name) -> bool:
    return importlib.util.find_spec(_MODULE_OF[name]) is not None


def load(name, pointer):
    """The binding ``name`` as a :class:`Cublas`, or None when it does not import."""
    if not _present(name):
        return None
    try:
        return _LOADERS[name](pointer)
    except ImportError:
        return None


def requested() -> str:
    """The choice in ``FASTOPT_NN_MATMUL`` (default "auto"), checked."""
    choice = os.environ.get("FASTOPT_NN_MATMUL", "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"FASTOPT_NN_MATMUL must be one of {list(CHOICES)}, got {choice!r}")
    return choice


def describe() -> str:
    """What runs the MLP's products on CUDA here, in words (``fastopt info``);
    imports the bindings but not numba-cuda, and needs no GPU."""
    try:
        choice = requested()
    except ValueError as exc:
        return f"numba kernels ({exc})"
    if choice == "numba":
        return "numba kernels (FASTOPT_NN_MATMUL=numba)"
    names = BINDINGS if choice == "auto" else (choice,)
    for name in names:
        if _present(name):
            try:
                mod = importlib.import_module(_MODULE_OF[name])
            except ImportError:
                continue
            label = "nvmath-python" if name == "nvmath" else name
            return f"cuBLAS via {label} {getattr(mod, '__version__', '')}".rstrip()
    return "numba kernels (pip install cupy-cuda13x or nvmath-python for cuBLAS)"
