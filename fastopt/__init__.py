"""fastopt: fused optimizer steps for NumPy code.

>>> import numpy as np, fastopt
>>> params = fastopt.pack([np.ones((3, 2), np.float32), np.zeros(2, np.float32)])
>>> grads = params.zeros_like()
>>> opt = fastopt.AdamW(params, lr=1e-3)
>>> opt.step(grads)          # one fused kernel call for the whole model

Backends: ``numpy`` (the reference), ``numba`` (CPU, parallel) and
``cython`` (OpenMP); ``backend="auto"`` picks the fastest available.
Nothing heavy is imported here: Numba loads on first use. libgomp (the
OpenMP runtime of the threaded kernels) is loaded here, with a short idle
spin, so that torch imported afterwards shares it; libgomp reads the OpenMP
environment (``OMP_NUM_THREADS``...) then. ``FASTOPT_PRELOAD_OPENMP=0``
leaves it for the first threaded step (see ``fastopt._openmp.preload``).
"""

from . import _openmp, functional, schedules
from .backends import (available_backends, backend_info, get_num_threads,
                       set_num_threads)
from .checkpoint import CheckpointError, load, save
from .clip import clip_by_global_norm, global_norm
from .optim import (SGD, Adagrad, Adam, Adamax, AdamW, Lion, LossScaler, NAdam, Optimizer,
                    RAdam, RMSprop)
from .optim import LAMB
from .optim import SAM
from .optim import LBFGS
from .optim import group_params
from .params import FlatArrays, flat_zeros, pack

__version__ = "0.1.0"

# libgomp with a short idle spin, before torch (if imported next) loads its
# own copy at its default spin: see fastopt._openmp.preload
_openmp.preload()

__all__ = [
    "SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Lion", "Adamax", "NAdam", "RAdam",
    "Optimizer", "LossScaler",
    "global_norm", "clip_by_global_norm",
    "FlatArrays", "pack", "flat_zeros",
    "available_backends", "backend_info", "set_num_threads", "get_num_threads",
    "functional", "schedules",
    "save", "load", "CheckpointError",
]
__all__ += ["LAMB"]
__all__ += ["SAM"]
__all__ += ["LBFGS"]
__all__ += ["group_params"]


def __getattr__(name):
    # fastopt.nn (MLPs, ensembles), fastopt.data (dataset readers),
    # fastopt.distributed (MPI) and fastopt.cuda (device arrays) load on first
    # use, so `import fastopt` stays light.
    if name in ("nn", "data", "distributed", "cuda"):
        import importlib
        try:
            return importlib.import_module(f".{name}", __name__)
        except ImportError as exc:      # (hasattr and getattr(..., default) expect this)
            raise AttributeError(f"fastopt.{name} is not available here: {exc}") from exc
    raise AttributeError(f"module 'fastopt' has no attribute {name!r}")
