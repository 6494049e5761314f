"""Numba twins of the compact-state codecs (:mod:`fastopt.backends.compact`).

One element at a time, for the compiled CPU drivers
(:mod:`fastopt.backends.numba_cpu`) and the CUDA kernel
(:mod:`fastopt.backends._cuda_compact`; the CUDA simulator runs them as
plain Python, so each also runs as Python, with NumPy scalars): they compute the same bits as the NumPy
functions there, which are the specification (tested bit for bit on every
code and around every rounding boundary). The Cython kernels' C twins are in
``_cython/compact_impl.pxi``. Kept apart from :mod:`~fastopt.backends.compact`
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
    return np.uint32(h >> np.uint32(16))


@register_jitable
def bf16_decode_one(h):
    return np.uint32(np.uint32(h) << np.uint32(16))


@register_jitable
def bf16_encode_sr_one(b, key, index):
    """``b``: the float32's bits (uint32); returns the bfloat16 bits (uint32).
    A NaN keeps its top bits, made quiet. (A select on the 32-bit sums, as
    the Cython twin: with an early return for NaN instead, the Numba
    bfloat16 AdamW step at 16M took 11.5 ms, with the select 10.2 ms.)"""
    nan = (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    t = np.uint32(b | np.uint32(0x00400000)) if nan else np.uint32(
        b + random_bits_one(key, index))
    return np.uint32(t >> np.uint32(16))


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


# Each grid's constants: the lowest binade's float exponent field, the
# largest code magnitude, 2**(low - 127) (linear steps below it) and
# 2**(150 - low) (a value there in 2**-20 steps of the grid's ulp).
_SIGNED = (_SIGNED_LOW, SIGNED_TOP, np.float32(2.0 ** (_SIGNED_LOW - 127)),
           np.float32(2.0 ** (150 - _SIGNED_LOW)))
_UNSIGNED = (_UNSIGNED_LOW, UNSIGNED_TOP, np.float32(2.0 ** (_UNSIGNED_LOW - 127)),
             np.float32(2.0 ** (150 - _UNSIGNED_LOW)))

_INF_BITS = np.uint32(0x7F800000)
_F32_INF = np.float32(np.inf)

# The forms below are the C twins' (_cython/compact_impl.pxi): selects of
# values computed on both sides, so that the block loops vectorise.


@register_jitable
def q8_decode_one(code, scale, signed):
    """float32 value of one 8-bit ``code`` (int8 when ``signed``, else
    uint8) in a block of absmax ``scale``: the scalar twin of
    :func:`q8_decode_signed` / :func:`q8_decode_unsigned`. A magnitude of 8
    or more is a float whose exponent and mantissa fields are the code's
    shifted; below 8, linear steps of the lowest binade's ulp,
    ``2 * that float - edge`` (exact)."""
    low, _, edge, _ = _SIGNED if signed else _UNSIGNED
    c = np.int64(code)
    mag = -c if c < 0 else c
    f = f32_from_bits(np.uint32((mag << 20) + ((low - 1) << 23)))
    v = f if mag >= 8 else f * np.float32(2) - edge
    # the code of inf (compact.SIGNED_INF): inf whatever the scale
    v = v * scale if mag != (C.SIGNED_INF if signed else C.UNSIGNED_INF) else _F32_INF
    return -v if c < 0 else v


@register_jitable
def q8_encode_one(x, scale, signed, key, index):
    """The 8-bit code (as an int) of float32 ``x`` in a block of absmax
    ``scale``, rounded stochastically with the bits of (``key``, ``index``):
    the scalar twin of :func:`q8_encode_signed` / :func:`q8_encode_unsigned`.
    (Each integer step cast back to uint32: Numba widens it to 64 bits, and
    a block loop on 64-bit lanes takes twice the vector operations.)"""
    if f32_bits(abs(x)) == _INF_BITS:     # its own code (compact.SIGNED_INF)
        mag = np.int64(C.SIGNED_INF if signed else C.UNSIGNED_INF)
        return -mag if signed and x < 0 else mag
    if not scale > np.float32(0):
        return 0
    low, top, edge, sub_scale = _SIGNED if signed else _UNSIGNED
    b = np.uint32(f32_bits(abs(x) / scale) & np.uint32(0x7FFFFFFF))
    rnd = np.uint32(random_bits_one(key, index) << np.uint32(4))
    # below the lowest binade: the value in 2**-20 steps of its ulp, exact
    # (clamped to the edge as integers: |rel|'s bits order as the floats)
    steps = np.uint32(np.int32(f32_from_bits(np.uint32(min(b, f32_bits(edge)))) * sub_scale))
    # at or above it: the exponent (counted from the lowest binade, code 8)
    # and 3 mantissa bits; rounded up with the probability of the dropped bits
    t = np.uint32(b - np.uint32((low - 1) << 23)) if b >= np.uint32(low << 23) else steps
    code = np.uint32(np.uint32(t + rnd) >> np.uint32(20))
    if signed:
        code = np.uint32(min(code, np.uint32(top)))
        return -np.int64(code) if f32_bits(x) >> np.uint32(31) else np.int64(code)
    code = np.uint32(max(code, np.uint32(b != np.uint32(0))))      # a positive value never gets 0
    return np.int64(min(code, np.uint32(top)))


@register_jitable
def absmax_bits_one(x):
    """The bits of ``|x|`` (uint32): for non-negative floats the integer
    order is the float order, with NaN above inf, so a block's absmax is an
    integer max (NaN when the block holds one, as ``np.max``). Inf has a
    code of its own (compact.SIGNED_INF) and is no block's absmax:
    :func:`without_inf` (in a second pass on the CPU, where the max was inf:
    a select in the max's loop keeps it from vectorising)."""
    return np.uint32(f32_bits(x) & np.uint32(0x7FFFFFFF))


@register_jitable
def without_inf(b):
    """``absmax_bits_one``'s bits, 0 for inf."""
    return np.uint32(0) if b == _INF_BITS else b


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
    ``key`` and the indices ``o + i``; 8-bit against the block's new absmax.
    (The index a uint32 counter of its own and the max in uint32: on 64-bit
    lanes the loops take twice the vector operations.)"""
    at = np.uint32(o)
    if bf16:
        for i in range(m):
            codes[o + i] = bf16_encode_sr_one(f32_bits(x[i]), key, at)
            at = np.uint32(at + np.uint32(1))
        return
    top = np.uint32(0)
    for i in range(m):
        top = np.uint32(max(top, absmax_bits_one(x[i])))
    if top == _INF_BITS:               # (rare) inf: its own code, not the scale
        top = np.uint32(0)
        for i in range(m):
            top = np.uint32(max(top, without_inf(absmax_bits_one(x[i]))))
    scale = f32_from_bits(top)
    absmax[o // BLOCK] = scale
    for i in range(m):
        codes[o + i] = q8_encode_one(x[i], scale, signed, key, at)
        at = np.uint32(at + np.uint32(1))
