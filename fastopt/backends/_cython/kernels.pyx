# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
# Built for baseline x86-64 (any CPU); the kernels themselves are in kernels_impl.pxi.
include "kernels_impl.pxi"
