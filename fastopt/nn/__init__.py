"""Neural networks on fastopt's flat buffers: MLPs and batched ensembles.

>>> from fastopt.nn import MLP, Ensemble
>>> net = MLP((784, 256, 256, 10), activation="relu", seed=0)
>>> opt = fastopt.AdamW(net.param_groups(), lr=1e-3)
>>> loss = net.train_step(opt, X, y)          # forward, backward, one AdamW call

>>> ens = Ensemble(5, (784, 64, 10), seed=0)   # 5 models, stacked weights
>>> opt = fastopt.AdamW(ens.param_groups(lr=[1e-1, 1e-2, 1e-3, 1e-4, 1e-5]))
>>> losses = ens.train_step(opt, X, y)         # all five, batched

Backends (``backend="auto"`` takes the first available): ``numba`` (np.dot
through NumPy's BLAS + ``@njit`` fused passes, cached after the first
compile), ``cython`` (gemm through ``scipy.linalg.cython_blas`` + compiled
fused passes; no JIT) and ``numpy`` (the reference). ``backend="cuda"``,
asked for by name (:mod:`._cuda`): params, grads, workspaces and the
optimizer state on the GPU, the products through cuBLAS (CuPy or
nvmath-python, where one imports) or tiled numba kernels, the fused passes
as CUDA kernels; a training step reads back only the losses.

Sparse inputs: when most of a batch is exact zeros (MNIST: 81%), both
compiled backends can run the first layer over the non-zeros only
(``sparse_input``, Numba kernels in :mod:`._sparse`); "auto" takes it where a
cost model says it is faster: on one thread MNIST 784-256-256-10 trained
~1.2x faster per epoch here, on two BLAS threads it stays dense. Results
agree with the dense matmuls to rounding (see ``Ensemble.sparse_input``).
"""

from .activations import ACTIVATIONS, LOSSES, parse_layers
from .backends import available_backends
from .ensemble import Ensemble
from .mlp import MLP

__all__ = ["MLP", "Ensemble", "ACTIVATIONS", "LOSSES", "parse_layers",
           "available_backends"]
