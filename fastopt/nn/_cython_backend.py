"""Cython backend: gemm through ``scipy.linalg.cython_blas``, fused serial passes.

Thin adapter over ``fastopt/nn/_cython/nn_kernels.pyx`` (built by setup.py).
The sparse-input first layer (:mod:`fastopt.nn._sparse`) is Numba code that
both compiled backends share: the nn extension is one portable build (its
time is in BLAS), whose baseline x86-64 loops would run the sparse kernels'
row updates at a quarter of the AVX-512 width Numba compiles for.
"""

from __future__ import annotations

from ._cython import nn_kernels as _k

name = "cython"

linear = _k.linear
linear_grad_w = _k.linear_grad_w
linear_grad_x = _k.linear_grad_x
bias_act = _k.bias_act
act_grad = _k.act_grad
softmax_xent = _k.softmax_xent
mse = _k.mse
