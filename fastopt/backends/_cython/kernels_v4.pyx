# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
# Built for x86-64-v4 (AVX-512), imported only where the CPU has it; the kernels themselves are in kernels_impl.pxi.
include "kernels_impl.pxi"
