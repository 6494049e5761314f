"""Device arrays: the public home of fastopt's CUDA helpers.

The optimizers take device arrays directly (numba device arrays, CuPy
arrays, torch CUDA tensors: anything with ``__cuda_array_interface__``) and
step them where they live. These helpers are for what a model needs around
that::

    from fastopt import cuda
    params = cuda.pack([w1, b1, w2, b2])   # one device buffer; use these views from now on
    grads = params.zeros_like()            # same layout: one launch per step
    opt = fastopt.AdamW(params, lr=1e-3)

Importing this module imports numba-cuda (``pip install "fastopt[cuda]"``)
and needs a GPU, or the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``).
"""

from __future__ import annotations

from .backends.numba_cuda import (DeviceFlatArrays, DeviceNorm, flat_zeros, is_device_array,
                                  pack, synchronize, zeros)

__all__ = ["pack", "flat_zeros", "zeros", "DeviceFlatArrays", "DeviceNorm",
           "is_device_array", "synchronize"]
