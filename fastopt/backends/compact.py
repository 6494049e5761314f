r"""Compact optimizer state: the codecs that store a float32 state value in
16 or 8 bits, and read it back.

A step with compact state is the same step: each state value is decoded to
float32, the optimizer's element function runs unchanged, and the new value
is encoded again. This module is the specification of the two encodings
(NumPy, whole arrays) and their scalar twins for the compiled kernels
(Numba ``register_jitable``); the kernels round exactly as the NumPy
functions do.

**bfloat16, stochastic rounding** (``state_dtype="bfloat16"``). A float32
keeps its top 16 bits. Rounding to nearest freezes a slowly decaying
average: with ``beta2 = 0.999`` the per-step change of ``v`` is 0.1%, below
half a bfloat16 ulp (0.39%), so ``v`` stops moving. Stochastic rounding adds
16 random bits below the kept ones before truncating, so a value rounds up
with probability equal to its distance from the lower neighbour: unbiased
on average, and small changes accumulate. The random bits come from a
counter-based hash of (key, element index), the key mixing the seed, the
step and the state buffer: results do not depend on the thread count, and a
resumed run draws the same bits as an uninterrupted one. The hash is one
multiply and two xor-shifts, vectorisable and table-free.

**8-bit blockwise** (``state_dtype="int8"``). Values are stored relative to
their block's absolute maximum (a float32 per block of :data:`BLOCK`
elements) on a logarithmic grid read straight from a float's exponent bits,
never a table search:

* signed (first moments): a sign bit, 4 exponent bits and 3 mantissa bits of
  ``x = |value| / absmax`` in [0, 1], like a float with 15 binades: codes
  cover ``2**-14 <= x <= 1`` with 3 mantissa bits (relative error <= 1/16)
  and a linear subnormal range below (steps of ``2**-17``);
* unsigned (second moments, never negative): 5 exponent bits and 3 mantissa
  bits, 31 binades down to ``2**-30``, and a positive value never becomes 0:
  below the smallest code it is stored as the smallest code, so ``sqrt(v)``
  cannot collapse to 0 and blow up a step.

A linear 8-bit grid (absmax / 127 steps) loses every value much smaller than
its block's largest; measured, it diverged on a noisy quadratic where this
map stayed within its accuracy budget.
"""

from __future__ import annotations

import numpy as np
from numba.core.extending import register_jitable

#: elements per absmax block of the 8-bit state
BLOCK = 256

_U32 = np.uint32
_MIX = np.uint32(0x9E3779B1)        # 2**32 / golden ratio: a Weyl step per index


# -- the random bits of stochastic rounding ------------------------------------------

def sr_key(seed: int, step: int, buffer: int) -> int:
    """The 32-bit key of one state buffer's rounding at one step (host side,
    once per step): splitmix64 of the three, folded to 32 bits."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + int(step) * 0xBF58476D1CE4E5B9
         + int(buffer) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    z ^= z >> 31
    return (z ^ (z >> 32)) & 0xFFFFFFFF


def random_bits(key: int, index):
    """16 random bits per element index (uint32 in [0, 65536)): the hash of
    ``key ^ index``. NumPy twin of :func:`random_bits_one`."""
    h = (np.asarray(index).astype(_U32) ^ _U32(key)) * _MIX
    h ^= h >> _U32(16)
    h ^= h >> _U32(8)
    return h & _U32(0xFFFF)


@register_jitable
def random_bits_one(key, index):
    # Numba widens uint32 products to 64 bits: keep the low 32 as NumPy does
    h = np.uint32(((np.uint32(index) ^ np.uint32(key)) * np.uint32(0x9E3779B1))
                  & np.uint32(0xFFFFFFFF))
    h ^= h >> np.uint32(16)
    h ^= h >> np.uint32(8)
    return h & np.uint32(0xFFFF)


# -- bfloat16 with stochastic rounding -----------------------------------------------

def bf16_decode(bits):
    """float32 values of bfloat16 bit patterns (uint16): exact."""
    return (bits.astype(_U32) << _U32(16)).view(np.float32)


def bf16_encode_sr(x, key: int, index):
    """bfloat16 bits (uint16) of float32 ``x``, rounded stochastically with
    the bits of (``key``, ``index``). NaN stays NaN (a quiet NaN with the sign
    kept); inf stays inf; a finite value within one ulp of the largest
    bfloat16 may round up to inf, with the probability of its distance."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(_U32)
    nan = (b & _U32(0x7FFFFFFF)) > _U32(0x7F800000)
    out = (b + random_bits(key, index)) >> _U32(16)
    out = np.where(nan, (b >> _U32(16)) | _U32(0x0040), out)
    return out.astype(np.uint16)


@register_jitable
def bf16_decode_one(h):
    return np.uint32(np.uint32(h) << np.uint32(16))


@register_jitable
def bf16_encode_sr_one(b, key, index):
    """``b``: the float32's bits (uint32); returns the bfloat16 bits (uint32)."""
    if (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):      # NaN
        return (b >> np.uint32(16)) | np.uint32(0x0040)
    return (b + random_bits_one(key, index)) >> np.uint32(16)


# -- 8-bit logarithmic grid relative to a block's absmax -----------------------------

# A float's exponent field for 2**0 is 127; the grid's top binade is 2**0.
_SIGNED_EXP_BITS, _UNSIGNED_EXP_BITS = 4, 5
_MANT_BITS = 3


def _grid(exp_bits):
    """(lowest normal binade's float exponent field, largest code magnitude)"""
    binades = (1 << exp_bits) - 1                  # exponent codes 1..binades
    return 127 - binades + 1, (binades << _MANT_BITS)   # magnitude of x = 1.0


def _encode_magnitude(x, exp_bits, keep_positive):
    """Code magnitudes (int) of x in [0, 1] (float32 array)."""
    low_field, top = _grid(exp_bits)
    b = x.astype(np.float32).view(_U32).astype(np.int64)
    # round to nearest on the kept mantissa bits (a carry moves to the next binade)
    r = (b + (1 << (22 - _MANT_BITS))) >> (23 - _MANT_BITS)
    field = r >> _MANT_BITS                         # float exponent field after rounding
    code = ((field - low_field + 1) << _MANT_BITS) | (r & ((1 << _MANT_BITS) - 1))
    # below the lowest binade: linear steps of its ulp (subnormal codes 0..7)
    ulp = np.float32(2.0 ** (low_field - 127 - _MANT_BITS))
    sub = np.rint(x.astype(np.float32) / ulp).astype(np.int64)
    code = np.where(field >= low_field, code, sub)
    if keep_positive:
        code = np.where((code == 0) & (x > 0), 1, code)
    return np.minimum(code, top)


def _decode_magnitude(code, exp_bits):
    low_field, _ = _grid(exp_bits)
    code = code.astype(np.int64)
    e, m = code >> _MANT_BITS, code & ((1 << _MANT_BITS) - 1)
    normal = (((e + low_field - 1) << 23) | (m << (23 - _MANT_BITS))).astype(_U32)
    value = normal.view(np.float32)
    ulp = np.float32(2.0 ** (low_field - 127 - _MANT_BITS))
    return np.where(e > 0, value, m.astype(np.float32) * ulp)


def q8_absmax(x, block=BLOCK):
    """float32 absmax per block of ``x`` (the last block may be short)."""
    x = np.asarray(x, np.float32)
    n = x.size
    pad = (-n) % block
    a = np.abs(np.concatenate([x.ravel(), np.zeros(pad, np.float32)]))
    return a.reshape(-1, block).max(axis=1)


def _per_element(absmax, n, block):
    return np.repeat(absmax.astype(np.float32), block)[:n]


def q8_encode_signed(x, absmax, block=BLOCK):
    """int8 codes of ``x`` (float32) against its blocks' ``absmax``."""
    scale = _per_element(absmax, x.size, block)
    rel = np.where(scale > 0, np.abs(x) / np.where(scale > 0, scale, 1), 0).astype(np.float32)
    mag = _encode_magnitude(np.minimum(rel, np.float32(1)), _SIGNED_EXP_BITS, False)
    return np.where(np.signbit(x) & (mag > 0), -mag, mag).astype(np.int8)


def q8_decode_signed(code, absmax, block=BLOCK):
    scale = _per_element(absmax, code.size, block)
    mag = _decode_magnitude(np.abs(code.astype(np.int64)), _SIGNED_EXP_BITS)
    return (np.where(code < 0, -mag, mag) * scale).astype(np.float32)


def q8_encode_unsigned(x, absmax, block=BLOCK):
    """uint8 codes of ``x >= 0`` (float32) against its blocks' ``absmax``;
    a positive value never gets code 0."""
    scale = _per_element(absmax, x.size, block)
    rel = np.where(scale > 0, x / np.where(scale > 0, scale, 1), 0).astype(np.float32)
    return _encode_magnitude(np.minimum(rel, np.float32(1)), _UNSIGNED_EXP_BITS,
                             True).astype(np.uint8)


def q8_decode_unsigned(code, absmax, block=BLOCK):
    scale = _per_element(absmax, code.size, block)
    return (_decode_magnitude(code, _UNSIGNED_EXP_BITS) * scale).astype(np.float32)
