r"""Compact optimizer state: the codecs that store a float32 state value in
16 or 8 bits, and read it back.

A step with compact state is the same step: each state value is decoded to
float32, the optimizer's element function runs unchanged, and the new value
is encoded again. This module is the specification of the two encodings
(NumPy, whole arrays; no Numba import) and of the state layout; the compiled
kernels' scalar twins (:mod:`fastopt.backends.compact_jit` for Numba,
``_cython/compact_impl.pxi`` for Cython) round exactly as the NumPy
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
xor, one multiply and one shift, vectorisable and table-free: the top 16
bits of ``(key ^ index) * 0x9E3779B1``. Each step's key is a fresh
splitmix64 draw, so an element's bits are uniform from step to step; within
a step, consecutive indices step through the top bits by about the golden
ratio (evenly spread), and the draws are linked rather than independent
(indices 2**16 apart differ by a constant mod 2**16). Unbiased rounding
needs each element's draw to be uniform and fresh every step, which the key
gives; tests/test_compact_codecs.py checks both properties. The two
xor-shifts more of the first version cost about 15% of the bfloat16 loop's
compute in cache (x86-64-v4) and bought nothing measurable: the accuracy
tasks of tests/test_compact_state.py gave the same losses and noise floors
with either hash (docs/performance.md).

**8-bit blockwise** (``state_dtype="int8"``). Values are stored relative to
their block's absolute maximum (a float32 per block of :data:`BLOCK`
elements) on a logarithmic grid read straight from a float's exponent bits,
never a table search:

* signed (first moments): a sign bit, 4 exponent bits and 3 mantissa bits of
  ``x = |value| / absmax`` in [0, 1], like a float with 15 binades: codes
  cover ``2**-14 <= x <= 1`` with 3 mantissa bits (a grid step is 1/8 to
  1/16 of the value) and a linear subnormal range below (steps of ``2**-17``);
* unsigned (second moments, never negative): 5 exponent bits and 3 mantissa
  bits, 31 binades down to ``2**-30``, and a positive value never becomes 0:
  below the smallest code it is stored as the smallest code, so ``sqrt(v)``
  cannot collapse to 0 and blow up a step;
* +-inf: a code of its own past the grid's top (:data:`SIGNED_INF`,
  :data:`UNSIGNED_INF`), left out of the block's absmax and decoded as +-inf
  whatever the scale, as float state holds it.

The 8-bit codes are rounded stochastically too, with the same random bits
(16 of them, below the kept ones): rounded to nearest, a grid step of 6-12%
freezes both moments (``v`` moves by 0.1% a step), and measured on
logistic regression the final loss was 4-6% above float32 state after 500
steps and 8-11% after 1500, and a noisy quadratic's noise floor 1.36-1.44x;
stochastically rounded, within 0.3% and 1.02-1.03x (3 seeds each).

A linear 8-bit grid (absmax / 127 steps) loses every value much smaller than
its block's largest; measured, it diverged on a noisy quadratic where this
map stayed within its accuracy budget.

**Layout.** A param group keeps one buffer per state name, as with float
state, holding codes instead of values: uint16 (bfloat16 bits), int8 (signed
8-bit) or uint8 (unsigned 8-bit), plus a float32 absmax per block (8-bit).
In an 8-bit buffer each array starts at a multiple of :data:`BLOCK`
(:func:`block_offsets`), so no block spans two arrays and the kernels' pieces
(cut at multiples of 16384 within an array) start on block boundaries. The
rounding index of an element is its position in the group's buffer.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

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
    """16 random bits per element index (uint32 in [0, 65536)): the top half
    of the product of ``key ^ index`` with the Weyl multiplier. NumPy twin of
    :func:`random_bits_one`."""
    return ((np.asarray(index).astype(_U32) ^ _U32(key)) * _MIX) >> _U32(16)


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


# -- 8-bit logarithmic grid relative to a block's absmax -----------------------------

# A float's exponent field for 2**0 is 127; the grid's top binade is 2**0.
_SIGNED_EXP_BITS, _UNSIGNED_EXP_BITS = 4, 5
_MANT_BITS = 3


def _grid(exp_bits):
    """(lowest normal binade's float exponent field, largest code magnitude)"""
    binades = (1 << exp_bits) - 1                  # exponent codes 1..binades
    return 127 - binades + 1, (binades << _MANT_BITS)   # magnitude of x = 1.0


SIGNED_GRID, UNSIGNED_GRID = _grid(_SIGNED_EXP_BITS), _grid(_UNSIGNED_EXP_BITS)

# The code magnitude of an infinite value, above the grid's top (120 / 248):
# a gradient past about 1.8e19 squares to inf in a second moment. Float
# state holds that element as inf (it stops stepping); an 8-bit block had no
# code for it, its absmax became inf, and every value of the block decoded
# as NaN (0 * inf). An infinite value is kept as this code, outside the
# block's absmax, and decodes as inf whatever the scale; NaN still makes the
# block NaN, as float state would have it NaN.
SIGNED_INF, UNSIGNED_INF = 127, 255


_DROPPED = 23 - _MANT_BITS        # float mantissa bits below the kept ones


def _encode_magnitude(x, exp_bits, keep_positive, rbits):
    """Code magnitudes (int) of ``x`` in [0, 1] (float32 array), rounded
    stochastically with ``rbits`` (16 random bits per element)."""
    low_field, top = _grid(exp_bits)
    x = x.astype(np.float32)
    b = x.view(_U32).astype(np.int64)
    rnd = rbits.astype(np.int64) << (_DROPPED - 16)      # up to one step, in 2**-20 steps
    # the kept mantissa bits, rounded up with the probability of the dropped
    # ones (a carry moves to the next binade)
    r = (b + rnd) >> _DROPPED
    code = (((r >> _MANT_BITS) - low_field + 1) << _MANT_BITS) | (r & ((1 << _MANT_BITS) - 1))
    # below the lowest binade: linear steps of its ulp (codes 0..8), the value
    # counted in 2**-20 steps (exact: a power-of-two scale of a value < 2**-14)
    edge = np.float32(2.0 ** (low_field - 127))
    steps = np.floor(np.where(x < edge, x, edge) * np.float32(2.0 ** (127 + 23 - low_field)))
    sub = (steps.astype(np.int64) + rnd) >> _DROPPED
    code = np.where((b >> 23) >= low_field, code, sub)
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
    a[np.isinf(a)] = 0            # kept as their own code (SIGNED_INF / UNSIGNED_INF)
    return a.reshape(-1, block).max(axis=1)


def _per_element(absmax, n, block):
    return np.repeat(absmax.astype(np.float32), block)[:n]


def _relative(x, absmax, block):
    """``|x| / absmax`` per element in [0, 1] (0 in a block of absmax 0, or NaN)."""
    scale = _per_element(absmax, x.size, block)
    rel = np.where(scale > 0, np.abs(x) / np.where(scale > 0, scale, 1), 0).astype(np.float32)
    return np.minimum(rel, np.float32(1))


def q8_encode_signed(x, absmax, key, index, block=BLOCK):
    """int8 codes of ``x`` (float32) against its blocks' ``absmax``, rounded
    stochastically with the bits of (``key``, ``index``)."""
    mag = _encode_magnitude(_relative(x, absmax, block), _SIGNED_EXP_BITS, False,
                            random_bits(key, index))
    mag = np.where(np.isinf(x), SIGNED_INF, mag)
    return np.where(np.signbit(x) & (mag > 0), -mag, mag).astype(np.int8)


def q8_decode_signed(code, absmax, block=BLOCK):
    scale = _per_element(absmax, code.size, block)
    code = code.astype(np.int64)
    mag = _decode_magnitude(np.abs(code), _SIGNED_EXP_BITS)
    value = (np.where(code < 0, -mag, mag) * scale).astype(np.float32)
    return np.where(np.abs(code) == SIGNED_INF, np.where(code < 0, -np.inf, np.inf),
                    value).astype(np.float32)


def q8_encode_unsigned(x, absmax, key, index, block=BLOCK):
    """uint8 codes of ``x >= 0`` (float32) against its blocks' ``absmax``,
    rounded stochastically with the bits of (``key``, ``index``); a positive
    value never gets code 0. The magnitude is encoded (a ``-0.0`` is 0, as
    :func:`q8_absmax` sees it)."""
    mag = _encode_magnitude(_relative(x, absmax, block), _UNSIGNED_EXP_BITS, True,
                            random_bits(key, index))
    return np.where(np.isinf(x), UNSIGNED_INF, mag).astype(np.uint8)


def q8_decode_unsigned(code, absmax, block=BLOCK):
    scale = _per_element(absmax, code.size, block)
    value = (_decode_magnitude(code, _UNSIGNED_EXP_BITS) * scale).astype(np.float32)
    return np.where(code == UNSIGNED_INF, np.float32(np.inf), value).astype(np.float32)


# -- compact state buffers: formats, layout, and one span's decode / encode -----------

#: the ``state_dtype`` values an optimizer takes
STATE_DTYPES = ("float32", "bfloat16", "int8")


def code_dtype(state_dtype: str, signed: bool) -> np.dtype:
    """The dtype of a compact buffer's codes: bfloat16 bits as uint16; 8-bit
    codes as int8 (signed values, first moments) or uint8 (non-negative
    values, second moments)."""
    if state_dtype == "bfloat16":
        return np.dtype(np.uint16)
    return np.dtype(np.int8 if signed else np.uint8)


def is_codes(a) -> bool:
    """Whether a state buffer holds codes (not float32/float64 values)."""
    return a.dtype.kind in "iu"


def nblocks(n: int) -> int:
    """Absmax blocks of ``n`` elements (the last may be short)."""
    return -(-int(n) // BLOCK)


def block_offsets(sizes) -> np.ndarray:
    """Element offsets of arrays of ``sizes`` in an 8-bit group buffer: each
    starts at a multiple of :data:`BLOCK`, so no block spans two arrays."""
    room = [nblocks(n) * BLOCK for n in sizes]
    return np.concatenate([[0], np.cumsum(room)[:-1]]).astype(np.int64)


class CompactStep(NamedTuple):
    """What a compact-state step passes to a backend beside the code
    buffers, per state slot in kernel order: the stochastic-rounding key
    (see :func:`sr_key`) and the per-block absmax array (8-bit; None for
    bfloat16)."""
    keys: tuple
    absmax: tuple


def decode_span(codes, absmax, lo: int, n: int):
    """float32 values of ``codes[lo:lo + n]`` (``lo`` a multiple of BLOCK
    for 8-bit codes, whose blocks then start at ``absmax[lo // BLOCK]``)."""
    part = codes[lo:lo + n]
    if codes.dtype == np.uint16:
        return bf16_decode(part)
    scale = absmax[lo // BLOCK:lo // BLOCK + nblocks(n)]
    decode = q8_decode_signed if codes.dtype == np.int8 else q8_decode_unsigned
    with np.errstate(invalid="ignore"):       # a NaN/inf block decodes to NaN, quietly
        return decode(part, scale)


def encode_span(x, codes, absmax, lo: int, key: int) -> None:
    """Write float32 ``x`` as ``codes[lo:lo + n]``, rounded stochastically
    with ``key`` and the elements' indices ``lo..lo + n - 1`` in the buffer;
    8-bit against the new absmax of each block (written to ``absmax``)."""
    x = np.asarray(x, np.float32)
    n = x.size
    index = np.arange(lo, lo + n)
    if codes.dtype == np.uint16:
        codes[lo:lo + n] = bf16_encode_sr(x, key, index)
        return
    scale = q8_absmax(x)
    absmax[lo // BLOCK:lo // BLOCK + scale.size] = scale
    encode = q8_encode_signed if codes.dtype == np.int8 else q8_encode_unsigned
    with np.errstate(invalid="ignore"):       # NaN/inf values get the top code
        codes[lo:lo + n] = encode(x, scale, key, index)


def check_compact(table, el) -> None:
    """What the compiled compact-state drivers step: float32 compute (the
    optimizers refuse float64 params) and one-phase updates (they refuse
    LAMB). A check for the kernels' own sake, never reached from the API."""
    if table.compute != 32 or el.phases != 1:
        raise ValueError("compact state steps float32 weights with one-phase updates")
