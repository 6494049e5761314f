"""Cython + OpenMP backend: thin adapter over the compiled kernels.

The kernels are built twice from one source (see setup.py); the x86-64-v3
build (AVX2 + FMA) is used when NumPy reports that this CPU has both.
"""

from __future__ import annotations

from .._openmp import short_spin
from .lowp import bits
from .scalars import AdamScalars, SGDScalars


def _cpu_has(*features) -> bool:
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as cpu
    except ImportError:  # NumPy < 2
        from numpy.core._multiarray_umath import __cpu_features__ as cpu
    return all(cpu.get(f, False) for f in features)


# X86_V3 is NumPy's own check for the whole x86-64-v3 feature set (newer
# NumPy); the explicit list covers NumPy versions without that key.
_V3 = ("X86_V3",) if _cpu_has("X86_V3") else (
    "AVX", "AVX2", "FMA3", "F16C", "BMI", "BMI2", "LZCNT", "MOVBE")

with short_spin():         # the extension links libgomp: see fastopt._openmp
    try:
        if not _cpu_has(*_V3):
            raise ImportError("CPU lacks AVX2/FMA")
        from ._cython import kernels_v3 as _k
        simd = "x86-64-v3"
    except ImportError:
        from ._cython import kernels as _k
        simd = "baseline"

name = "cython"
threaded = _k.OPENMP


# 16-bit arrays go in as integer views of their bits (uint16: bfloat16,
# int16: float16); ``out`` is the 16-bit params under mixed precision.

def adam_update(p, g, m, v, vmax, s: AdamScalars, out=None) -> None:
    _k.adam_update(p, bits(g), m, v, vmax, bits(out), *s)


def sgd_update(p, g, buf, s: SGDScalars, out=None) -> None:
    _k.sgd_update(p, bits(g), buf, bits(out), *s)


def sumsq(x) -> float:
    return _k.sumsq(bits(x))


def widen(src, dst) -> None:
    _k.widen(bits(src), dst)


def narrow(src, dst) -> None:
    _k.narrow(src, bits(dst))

scale = _k.scale
set_num_threads = _k.set_num_threads
get_num_threads = _k.get_num_threads
