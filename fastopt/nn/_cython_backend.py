"""Cython backend: gemm through ``scipy.linalg.cython_blas``, fused serial passes.

Thin adapter over ``fastopt/nn/_cython/nn_kernels.pyx`` (built by setup.py).
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
