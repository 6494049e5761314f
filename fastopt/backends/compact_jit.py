"""Numba twins of the compact-state codecs (:mod:`fastopt.backends.compact`).

One element at a time, for the compiled CPU drivers
(:mod:`fastopt.backends.numba_cpu`) and the CUDA kernel
(:mod:`fastopt.backends._cuda_compact`; the CUDA simulator runs them as
plain Python, so each also runs as Python, with NumPy scalars): they compute the same bits as the NumPy
functions there, which are the specification (tested bit for bit on every
code and around every rounding boundary). The Cython kernels' C twins are in
``_cython/kernels_impl.pxi``. Kept apart from :mod:`~fastopt.backends.compact`
so that the optimizers can use the formats without importing Numba.

Numba widens uint32 arithmetic to 64 bits: products are masked back to 32
bits, and float <-> bits conversions are bitcasts (intrinsics), as in C.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba.core import types
from numba.core.extending import intrinsic, overload, register_jitable

from . import compact as C

# -- stochastic rounding to bfloat16 ---------------------------------------------------

@register_jitable
def random_bits_one(key, index):
    # the product in 64 bits, its low 32 kept (as NumPy's uint32 product
    # wraps): Numba widens uint32 products to 64 bits anyway, and a NumPy
    # scalar run as Python (the CUDA simulator) must not overflow
    h = np.uint32((np.uint64(np.uint32(index) ^ np.uint32(key)) * np.uint64(0x9E3779B1))
                  & np.uint64(0xFFFFFFFF))
    h ^= h >> np.uint32(16)
    h ^= h >> np.uint32(8)
    return h & np.uint32(0xFFFF)


@register_jitable
def bf16_decode_one(h):
    return np.uint32(np.uint32(h) << np.uint32(16))


@register_jitable
def bf16_encode_sr_one(b, key, index):
    """``b``: the float32's bits (uint32); returns the bfloat16 bits (uint32)."""
    if (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):      # NaN
        return (b >> np.uint32(16)) | np.uint32(0x0040)
    return (b + random_bits_one(key, index)) >> np.uint32(16)


# -- float <-> bits ----------------------------------------------------------------------
# Plain Python functions (the CUDA simulator runs device code as Python) whose
# generic overloads, for the CPU and CUDA targets alike, are bitcasts.

def f32_from_bits(b):
    """The float32 whose bits are the uint32 ``b``."""
    return np.uint32(b).view(np.float32)


def f32_bits(x):
    """The bits (uint32) of the float32 ``x``."""
    return np.float32(x).view(np.uint32)


def _bitcast(fn, src, dst, llvm_type):
    """``fn``'s compiled form: an intrinsic reinterpreting a ``src`` scalar's
    bits as ``dst``."""
    @intrinsic
    def cast(typingctx, x):
        if x != src:
            return None

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], llvm_type)

        return dst(x), codegen

    @overload(fn)
    def compiled(x):
        if x == src:
            return lambda x: cast(x)
        return None


_bitcast(f32_from_bits, types.uint32, types.float32, ir.FloatType())
_bitcast(f32_bits, types.float32, types.uint32, ir.IntType(32))


# -- the 8-bit grid ---------------------------------------------------------------------

_SIGNED_LOW, SIGNED_TOP = C.SIGNED_GRID            # 113, 120
_UNSIGNED_LOW, UNSIGNED_TOP = C.UNSIGNED_GRID      # 97, 248


@register_jitable
def _magnitude_one(mag, low_field, ulp):
    """float32 of a code magnitude (``_decode_magnitude``'s twin)."""
    e = mag >> 3
    m = mag & 7
    if e > 0:
        return f32_from_bits(np.uint32(((e + low_field - 1) << 23) | (m << 20)))
    return np.float32(m) * ulp


@register_jitable
def q8_decode_one(code, scale, signed):
    """float32 value of one 8-bit ``code`` (int8 when ``signed``, else
    uint8) in a block of absmax ``scale``: the scalar twin of
    :func:`q8_decode_signed` / :func:`q8_decode_unsigned`."""
    if signed:
        c = np.int64(code)
        v = _magnitude_one(-c if c < 0 else c, _SIGNED_LOW, np.float32(2.0 ** -17))
        return (-v if c < 0 else v) * scale
    return _magnitude_one(np.int64(code), _UNSIGNED_LOW, np.float32(2.0 ** -33)) * scale


@register_jitable
def _code_one(rel, low_field, top, keep_positive, rnd):
    """Code magnitude of ``rel`` (>= 0, or NaN) rounded up with the
    probability of the dropped bits (``rnd``: 20 random bits):
    ``_encode_magnitude``'s twin."""
    b = np.int64(f32_bits(rel)) & 0x7FFFFFFF
    if (b >> 23) >= low_field:
        r = (b + rnd) >> 20
        code = (((r >> 3) - low_field + 1) << 3) | (r & 7)
    else:       # linear steps of the lowest binade's ulp, counted in 2**-20 steps
        steps = np.int64(rel * f32_from_bits(np.uint32((127 + 150 - low_field) << 23)))
        code = (steps + rnd) >> 20
        if keep_positive and code == 0 and b != 0:
            code = 1
    return min(code, top)


@register_jitable
def q8_encode_one(x, scale, signed, key, index):
    """The 8-bit code (as an int) of float32 ``x`` in a block of absmax
    ``scale``, rounded stochastically with the bits of (``key``, ``index``):
    the scalar twin of :func:`q8_encode_signed` / :func:`q8_encode_unsigned`."""
    if not scale > np.float32(0):
        return 0
    rel = abs(x) / scale
    rnd = np.int64(random_bits_one(key, index)) << 4
    if signed:
        mag = _code_one(rel, _SIGNED_LOW, SIGNED_TOP, False, rnd)
        return -mag if (f32_bits(x) >> np.uint32(31)) and mag > 0 else mag
    return _code_one(rel, _UNSIGNED_LOW, UNSIGNED_TOP, True, rnd)


@register_jitable
def absmax_bits_one(x):
    """The bits of ``|x|`` (uint32): for non-negative floats the integer
    order is the float order, with NaN above inf, so a block's absmax is an
    integer max (NaN when the block holds one, as ``np.max``)."""
    return f32_bits(x) & np.uint32(0x7FFFFFFF)


# -- a block of one state buffer ------------------------------------------------------------
# ``codes[o:o + m]`` (``o`` a multiple of BLOCK for 8-bit codes, whose block's
# absmax is ``absmax[o // BLOCK]``); ``bf16`` and ``signed`` say which codec
# (constants where the drivers call these: the other branch is never taken).

BLOCK = np.uint64(C.BLOCK)    # unsigned: the drivers' indices are


@register_jitable
def decode_block(codes, absmax, o, m, x, bf16, signed):
    """``codes[o:o + m]`` decoded into ``x[:m]``."""
    if bf16:
        for i in range(m):
            x[i] = f32_from_bits(bf16_decode_one(codes[o + i]))
    else:
        scale = absmax[o // BLOCK]
        for i in range(m):
            x[i] = q8_decode_one(codes[o + i], scale, signed)


@register_jitable
def encode_block(codes, absmax, key, o, m, x, bf16, signed):
    """``x[:m]`` encoded as ``codes[o:o + m]``, rounded stochastically with
    ``key`` and the indices ``o + i``; 8-bit against the block's new absmax."""
    if bf16:
        for i in range(m):
            codes[o + i] = bf16_encode_sr_one(f32_bits(x[i]), key, o + i)
        return
    top = np.uint32(0)
    for i in range(m):
        top = max(top, absmax_bits_one(x[i]))
    scale = f32_from_bits(np.uint32(top))
    absmax[o // BLOCK] = scale
    for i in range(m):
        codes[o + i] = q8_encode_one(x[i], scale, signed, key, o + i)
