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
fused passes; no JIT) and ``numpy`` (the reference). CUDA: not yet (the
optimizers step device arrays, but the MLP's forward and backward run on
host arrays only).

Sparse inputs: when most of a batch is exact zeros (MNIST: 81%), both
compiled backends run the first layer over the non-zeros only
(``sparse_input="auto"``, Numba kernels in :mod:`._sparse`), which made the
MNIST step 784-256-256-10 ~1.3x faster here; results agree with the dense
matmuls to rounding.
"""

from .activations import ACTIVATIONS, LOSSES, parse_layers
from .model import MLP, Ensemble, available_backends

__all__ = ["MLP", "Ensemble", "ACTIVATIONS", "LOSSES", "parse_layers",
           "available_backends"]
