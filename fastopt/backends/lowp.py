"""Low-precision storage (float16, bfloat16) for the compiled kernels.

Mixed precision keeps params and grads in 16 bits and a float32 master copy
in the optimizer. The compiled kernels see the 16-bit arrays as integer
views of their bits, and the view's integer type says which format it is:

* ``uint16`` view: **bfloat16** (ml_dtypes' ``bfloat16`` dtype);
* ``int16`` view: **float16** (IEEE binary16, NumPy's ``float16``).

Numba's CPU target has no float16 arrays (``NotImplementedError: float16``
in numba 0.68), so both conversions are bit manipulation there, and the
Cython kernels use the same formulas, so every backend rounds alike:
bit-exact against ml_dtypes (bfloat16) and NumPy (float16) conversions,
round-to-nearest-even, NaN kept NaN (tested on every 16-bit value and on
the float32 values around every rounding boundary).

Formulas (32-bit words ``b`` of float32 ``x``):

* bf16 -> f32: ``b = h << 16`` (exact).
* f32 -> bf16: ``(b + 0x7fff + ((b >> 16) & 1)) >> 16``; NaN becomes
  ``0x7fc0`` with the sign kept (ml_dtypes' choice).
* f16 -> f32: ``from_bits((h & 0x7fff) << 13) * 2**112`` rebiases the
  exponent and is exact for normals and subnormals; inf/NaN (exponent 31)
  map to exponent 255 with the mantissa kept; the sign is ORed back.
* f32 -> f16: normals ``(b - (112 << 23) + 0xfff + ((b >> 13) & 1)) >> 13``
  (round to nearest even, carrying into inf above 65504); below 2**-14 the
  float addition ``|x| + 0.5`` rounds to the half subnormal grid (its ulp
  is 2**-24) and the bits above 0.5's are the result; NaN keeps the top 10
  mantissa bits (or becomes ``0x7c01`` if they are all zero), as NumPy does.
"""

from __future__ import annotations

import numpy as np

#: dtype names with 16-bit storage and a float32 master copy
LOW_PRECISION = ("float16", "bfloat16")


def is_low_precision(dtype) -> bool:
    return np.dtype(dtype).name in LOW_PRECISION


def compute_dtype(dtype) -> np.dtype:
    """The dtype the step computes in (and keeps its state in)."""
    return np.dtype(np.float32) if is_low_precision(dtype) else np.dtype(dtype)


def bits(a):
    """``a`` as the integer view the compiled kernels take (see the module
    docstring); float32/float64 arrays and None pass through unchanged."""
    # Called on every kernel launch: the float32/float64 path must cost next
    # to nothing (``dtype.name`` builds a string; ``itemsize`` does not).
    if a is None or a.dtype.itemsize != 2:
        return a
    if a.dtype == _F16:
        return a.view(np.int16)
    if a.dtype.name == "bfloat16":
        return a.view(np.uint16)
    return a


_F16 = np.dtype(np.float16)


def bfloat16():
    """ml_dtypes' bfloat16 dtype (imported on first use)."""
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)
