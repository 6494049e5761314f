"""Cython + OpenMP backend: thin adapter over the compiled ``kernels`` module."""

from __future__ import annotations

from ._cython import kernels as _k
from .scalars import AdamScalars, SGDScalars

name = "cython"
threaded = _k.OPENMP


def adam_update(p, g, m, v, vmax, s: AdamScalars) -> None:
    _k.adam_update(p, g, m, v, vmax, *s)


def sgd_update(p, g, buf, s: SGDScalars) -> None:
    _k.sgd_update(p, g, buf, *s)


sumsq = _k.sumsq
scale = _k.scale
set_num_threads = _k.set_num_threads
get_num_threads = _k.get_num_threads
