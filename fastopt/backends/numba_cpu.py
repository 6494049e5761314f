"""Numba CPU backend: ``@njit(parallel=True)`` kernels.

Layout of every kernel: a serial ``*_chunk`` function that updates
``[start, stop)`` and a parallel driver that splits the array into fixed
chunks and runs them under ``prange``. Small arrays call the chunk function
directly, skipping the thread pool's launch cost. Reductions sum their
per-chunk float64 partials in chunk order, so the result does not depend on
the thread count.

Conventions (see DESIGN.md): scalars arrive already cast to the array dtype,
so the loops contain no float64 literal that would promote float32 math;
``fastmath`` is an explicit subset without ``nnan``/``ninf``, so NaN and inf
propagate and stay visible.
"""

from __future__ import annotations

import threading
import types as types_

import numpy as np
from llvmlite import ir
from numba import carray, njit, prange
from numba.core import types
from numba.extending import intrinsic, overload

from .._openmp import in_forked_child, start_numba_threads
from . import compact_jit, elements
from .compact import check_compact
from .lowp import bits
from .scalars import (AdamElement, AdamScalars, SGDElement, SGDScalars, adam_element,
                      sgd_element)
from .tables import check_unshifted

from .._numba_cache import install as _fresh_cache

_fresh_cache()      # before the cache=True kernels: fastopt._numba_cache says why

name = "numba"
threaded = True
start_numba_threads()     # the omp layer loads libgomp: see fastopt._openmp

# contract: fused multiply-add; arcp/reassoc: vectorised division and
# reductions; nsz: ignore the sign of zero. No nnan/ninf/afn.
FASTMATH = {"contract", "arcp", "reassoc", "nsz"}
CHUNK = 1 << 14          # elements per parallel work item (64 KiB of float32)
SERIAL_MAX = 1 << 15     # below this a thread-pool launch costs more than it saves

# error_model="numpy": a float division by zero gives inf/nan as in NumPy
# instead of a ZeroDivisionError check inside the loop.
_OPTIONS = dict(fastmath=FASTMATH, cache=True, nogil=True, error_model="numpy")
_jit = njit(**_OPTIONS)
_pjit = njit(parallel=True, **_OPTIONS)
# The update loops (no reductions) without fast-math: with reassoc/arcp LLVM
# may hoist loop-invariant products such as lr * grad_scale out of one loop
# and not another, and with contract fuse multiply-adds in one inlining
# context and not another, so the same step would round differently in the
# per-array and the table drivers. Strict IEEE order costs nothing here:
# these loops wait on memory.
_UPDATE = dict(_OPTIONS, fastmath=False)
_ujit = njit(**_UPDATE)
_upjit = njit(parallel=True, **_UPDATE)


# Chunk bounds are unsigned: with a signed runtime start Numba must emit a
# negative-index wraparound check for every access, which stops LLVM from
# vectorising the loop.
_U0 = np.uint64(0)


@_jit
def _span(c, n):
    """Unsigned [start, stop) of chunk ``c`` of an ``n``-element array."""
    return np.uint64(c * CHUNK), np.uint64(min(n, (c + 1) * CHUNK))


# -- 16-bit storage ---------------------------------------------------------------
# Low-precision arrays arrive as integer views of their bits: uint16 is
# bfloat16, int16 is float16 (see lowp.py for the formulas). ``_widen`` and
# ``_narrow`` dispatch on that type at compile time; for float32/float64
# arrays they are the identity, so the fast path compiles exactly as before.

# The conversions are written as LLVM IR on 32-bit integers: in Python
# syntax Numba widens uint32 arithmetic to uint64, which halves the vector
# width of these loops.

def _ir_consts(width):
    t = ir.IntType(width)
    return t, (lambda v: ir.Constant(t, v))


@intrinsic
def _bf16_to_f32(typingctx, h):
    """bfloat16 bits (uint16) -> float32: ``h << 16``, exact."""
    if h != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        i32, c = _ir_consts(32)
        b = builder.shl(builder.zext(args[0], i32), c(16))
        return builder.bitcast(b, ir.FloatType())

    return types.float32(h), codegen


@intrinsic
def _f32_to_bf16(typingctx, x):
    """float32 -> bfloat16 bits, round to nearest even; NaN -> 0x7fc0 | sign."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        i32, c = _ir_consts(32)
        b = builder.bitcast(args[0], i32)
        hi = builder.lshr(b, c(16))
        r = builder.lshr(builder.add(builder.add(b, c(0x7FFF)), builder.and_(hi, c(1))), c(16))
        nan = builder.or_(builder.and_(hi, c(0x8000)), c(0x7FC0))
        isnan = builder.fcmp_unordered("uno", args[0], args[0])
        return builder.trunc(builder.select(isnan, nan, r), ir.IntType(16))

    return types.uint16(x), codegen


@intrinsic
def _f16_to_f32(typingctx, h):
    """float16 bits (int16) -> float32, exact (subnormals, inf, NaN payloads)."""
    if h != types.int16:
        return None

    def codegen(context, builder, signature, args):
        i32, c = _ir_consts(32)
        f32 = ir.FloatType()
        u = builder.zext(args[0], i32)
        em = builder.and_(u, c(0x7FFF))
        shifted = builder.shl(em, c(13))
        scaled = builder.fmul(builder.bitcast(shifted, f32), ir.Constant(f32, 2.0 ** 112))
        special = builder.icmp_unsigned(">=", em, c(0x7C00))
        f = builder.select(special, builder.or_(shifted, c(0x7F800000)),
                           builder.bitcast(scaled, i32))
        sign = builder.shl(builder.and_(u, c(0x8000)), c(16))
        return builder.bitcast(builder.or_(f, sign), f32)

    return types.float32(h), codegen


@intrinsic
def _f32_to_f16(typingctx, x):
    """float32 -> float16 bits, round to nearest even, NaN as NumPy converts it."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        i32, c = _ir_consts(32)
        f32 = ir.FloatType()
        b = builder.bitcast(args[0], i32)
        sign = builder.and_(builder.lshr(b, c(16)), c(0x8000))
        a = builder.and_(b, c(0x7FFFFFFF))
        odd = builder.and_(builder.lshr(a, c(13)), c(1))
        normal = builder.lshr(builder.add(builder.add(builder.sub(a, c(112 << 23)), c(0xFFF)),
                                          odd), c(13))
        half = builder.fadd(builder.bitcast(a, f32), ir.Constant(f32, 0.5))
        sub = builder.sub(builder.bitcast(half, i32), c(0x3F000000))
        m = builder.lshr(builder.and_(a, c(0x7FFFFF)), c(13))
        nan = builder.or_(builder.or_(c(0x7C00), m),
                          builder.zext(builder.icmp_unsigned("==", m, c(0)), i32))
        r = builder.select(builder.icmp_unsigned("<", a, c(0x38800000)), sub, normal)
        r = builder.select(builder.icmp_unsigned(">=", a, c(0x47800000)), c(0x7C00), r)
        r = builder.select(builder.icmp_unsigned(">", a, c(0x7F800000)), nan, r)
        return builder.trunc(builder.or_(r, sign), ir.IntType(16))

    return types.int16(x), codegen


def _widen(x):
    """Stored value -> compute value (identity for float32/float64)."""


def _narrow(x, like):
    """float32 ``x`` -> the storage type of array ``like``."""


@overload(_widen, jit_options=_OPTIONS)
def _widen_impl(x):
    if isinstance(x, types.Float):
        return lambda x: x
    if x == types.uint16:
        return lambda x: _bf16_to_f32(x)
    if x == types.int16:
        return lambda x: _f16_to_f32(x)
    return None


@overload(_narrow, jit_options=_OPTIONS)
def _narrow_impl(x, like):
    if like.dtype == types.uint16:
        return lambda x, like: _f32_to_bf16(x)
    if like.dtype == types.int16:
        return lambda x, like: _f32_to_f16(x)
    return None


@_jit
def _widen_array(src, dst):
    for i in range(src.size):
        dst[i] = _widen(src[i])


@_jit
def _narrow_array(src, dst):
    for i in range(src.size):
        dst[i] = _narrow(src[i], dst)


# -- the drivers ---------------------------------------------------------------------
# The math is in fastopt.backends.elements (one function per optimizer).
# These loops know nothing of it: ``_element`` picks the function at compile
# time by the type of the step's scalars (AdamElement, SGDElement), and a
# state buffer the options do not use is None (so the loop has no code for
# it, and LLVM's runtime alias checks see only real arrays). ``w`` is what
# the step updates (the params, or their float32 master copy), ``e`` None or
# an offset the step reads the weights at (``w - e``: SAM's restore fused
# into the step, see tables.StepTable.set_shift), ``g`` the gradients as
# stored, ``out`` None or (mixed precision) the 16-bit params, written as
# the rounded weight in the same pass.

def _element(c, w, g, i, s0, s1, s2, flags):
    """Update element ``i``: the state in ``s0..s2``, the new weight returned."""


@overload(_element, jit_options=_UPDATE)
def _element_impl(c, w, g, i, s0, s1, s2, flags):
    kind = getattr(c, "instance_class", None)
    if kind is AdamElement:
        if s2 is None or isinstance(s2, types.NoneType):
            def adam(c, w, g, i, s0, s1, s2, flags):
                p, s0[i], s1[i], _ = elements.adam(w, g, s0[i], s1[i], g, c, flags)
                return p
            return adam

        def amsgrad(c, w, g, i, s0, s1, s2, flags):
            p, s0[i], s1[i], s2[i] = elements.adam(w, g, s0[i], s1[i], s2[i], c, flags)
            return p
        return amsgrad
    if kind is SGDElement:
        if s0 is None or isinstance(s0, types.NoneType):
            def plain(c, w, g, i, s0, s1, s2, flags):
                return elements.sgd(w, g, g, c, flags)[0]
            return plain

        def momentum(c, w, g, i, s0, s1, s2, flags):
            p, s0[i] = elements.sgd(w, g, s0[i], c, flags)
            return p
        return momentum
    from .scalars import F_CENTERED, AdagradElement, LionElement, RMSpropElement
    if kind is RMSpropElement:
        # s0 square_avg; then grad_avg (centered) and/or momentum_buffer
        if s1 is None or isinstance(s1, types.NoneType):
            def rms(c, w, g, i, s0, s1, s2, flags):
                p, s0[i], _, _ = elements.rmsprop(w, g, s0[i], g, g, c, flags)
                return p
            return rms
        if s2 is None or isinstance(s2, types.NoneType):
            def rms_one(c, w, g, i, s0, s1, s2, flags):   # s1: grad_avg or momentum
                if flags & F_CENTERED:
                    p, s0[i], s1[i], _ = elements.rmsprop(w, g, s0[i], s1[i], g, c, flags)
                else:
                    p, s0[i], _, s1[i] = elements.rmsprop(w, g, s0[i], g, s1[i], c, flags)
                return p
            return rms_one

        def rms_both(c, w, g, i, s0, s1, s2, flags):
            p, s0[i], s1[i], s2[i] = elements.rmsprop(w, g, s0[i], s1[i], s2[i], c, flags)
            return p
        return rms_both
    if kind is AdagradElement:
        def adagrad(c, w, g, i, s0, s1, s2, flags):
            p, s0[i] = elements.adagrad(w, g, s0[i], c, flags)
            return p
        return adagrad
    if kind is LionElement:
        def lion(c, w, g, i, s0, s1, s2, flags):
            p, s0[i] = elements.lion(w, g, s0[i], c, flags)
            return p
        return lion
    from .scalars import AdamaxElement, NAdamElement, RAdamElement
    if kind is AdamaxElement:           # s0 exp_avg, s1 exp_inf
        def adamax(c, w, g, i, s0, s1, s2, flags):
            p, s0[i], s1[i] = elements.adamax(w, g, s0[i], s1[i], c, flags)
            return p
        return adamax
    if kind is NAdamElement:            # s0 exp_avg, s1 exp_avg_sq
        def nadam(c, w, g, i, s0, s1, s2, flags):
            p, s0[i], s1[i] = elements.nadam(w, g, s0[i], s1[i], c, flags)
            return p
        return nadam
    if kind is RAdamElement:            # s0 exp_avg, s1 exp_avg_sq
        def radam(c, w, g, i, s0, s1, s2, flags):
            p, s0[i], s1[i] = elements.radam(w, g, s0[i], s1[i], c, flags)
            return p
        return radam
    return None


# Two-phase element steps (ElementStep.phases == 2, LAMB): phase one updates
# the state and hands back two values per element, whose squares the driver
# sums per array; each array's factor is made of its two sums; phase two
# writes the weight with its array's factor.

def _element_sums(c, w, g, i, s0, s1, s2, flags):
    """Phase one at element ``i``: the state updated, two values returned."""


def _element_finish(c, w, i, s0, s1, s2, flags, f):
    """Phase two at element ``i`` with its array's factor ``f``: the new weight."""


def _array_factor(c, a, b):
    """An array's factor (float64) from its two sums of squares."""


def _kind(c):
    return getattr(c, "instance_class", None)


@overload(_element_sums, jit_options=_UPDATE)
def _element_sums_impl(c, w, g, i, s0, s1, s2, flags):
    from .scalars import LAMBElement
    if _kind(c) is LAMBElement:         # s0 exp_avg, s1 exp_avg_sq; sums p^2, r^2
        def lamb(c, w, g, i, s0, s1, s2, flags):
            s0[i], s1[i], r = elements.lamb_moments(w, g, s0[i], s1[i], c, flags)
            return w, r
        return lamb
    return None


@overload(_element_finish, jit_options=_UPDATE)
def _element_finish_impl(c, w, i, s0, s1, s2, flags, f):
    from .scalars import LAMBElement
    if _kind(c) is LAMBElement:
        return lambda c, w, i, s0, s1, s2, flags, f: elements.lamb_param(
            w, s0[i], s1[i], c, flags, f)
    return None


@overload(_array_factor, jit_options=_UPDATE)
def _array_factor_impl(c, a, b):
    from .scalars import LAMBElement
    if _kind(c) is LAMBElement:
        return lambda c, a, b: elements.lamb_step_size(np.float64(c.lr), a, b)
    return None


def _weight(w, e, i):
    """Element ``i`` of the weights as the step reads them: ``w[i] - e[i]``,
    or ``w[i]`` when ``e`` is None (settled at compile time: no code for it)."""


@overload(_weight, jit_options=_UPDATE)
def _weight_impl(w, e, i):
    if e is None or isinstance(e, types.NoneType):
        return lambda w, e, i: w[i]
    return lambda w, e, i: w[i] - e[i]


@_ujit
def _apply(c, w, e, g, out, s0, s1, s2, n, gs, flags):
    for i in range(n):
        p = _element(c, _weight(w, e, i), _widen(g[i]) * gs, i, s0, s1, s2, flags)
        w[i] = p
        if out is not None:    # mixed precision; resolved at compile time
            out[i] = _narrow(p, out)


def _part(a, lo, hi):
    """``a[lo:hi]``, or None for None."""


@overload(_part, jit_options=_UPDATE)
def _part_impl(a, lo, hi):
    if a is None or isinstance(a, types.NoneType):
        return lambda a, lo, hi: None
    return lambda a, lo, hi: a[lo:hi]


@_ujit
def _flat_chunk(c, w, g, out, s0, s1, s2, lo, hi, gs, flags):
    _apply(c, w[lo:hi], None, g[lo:hi], _part(out, lo, hi), _part(s0, lo, hi),
           _part(s1, lo, hi), _part(s2, lo, hi), hi - lo, gs, flags)


@_upjit
def _flat_parallel(c, w, g, out, s0, s1, s2, gs, flags):
    n = w.size
    for k in prange((n + CHUNK - 1) // CHUNK):
        lo, hi = _span(k, n)
        _flat_chunk(c, w, g, out, s0, s1, s2, lo, hi, gs, flags)


def _scalars(el, t):
    """The element scalars as their NamedTuple of dtype ``t`` values: a
    float64 scalar inside a float32 loop would promote the whole loop."""
    return el.kind(*[t(x) for x in el.values])


def _update(el, p, g, out, s0, s1, s2):
    """One step of one 1-D array (the functional API's layout)."""
    t = p.dtype.type
    c, gs = _scalars(el, t), t(el.grad_scale)
    g, out = bits(g), bits(out)
    if p.size <= SERIAL_MAX or _serial_only():
        _flat_chunk(c, p, g, out, s0, s1, s2, _U0, np.uint64(p.size), gs, el.flags)
    else:
        _flat_parallel(c, p, g, out, s0, s1, s2, gs, el.flags)


# -- tables: a whole param group in one call (see fastopt/backends/tables.py) -----

@intrinsic
def _as_pointer(typingctx, addr, like):
    """An int64 address as a pointer to ``like``'s element type."""
    sig = types.CPointer(like.dtype)(addr, like)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

    return sig, codegen


@intrinsic
def _load_i64(typingctx, addr):
    """The int64 at an address."""
    def codegen(context, builder, signature, args):
        ptr = builder.inttoptr(args[0], ir.IntType(64).as_pointer())
        return builder.load(ptr)

    return types.int64(addr), codegen


@intrinsic
def _load_i32(typingctx, addr):
    """The int32 at an address, widened to int64."""
    def codegen(context, builder, signature, args):
        ptr = builder.inttoptr(args[0], ir.IntType(32).as_pointer())
        return builder.sext(builder.load(ptr), ir.IntType(64))

    return types.int64(addr), codegen


def _piece(addr, pk, plo, phi, j, like):
    """Piece ``j`` (elements ``plo[j]:phi[j]`` of array ``pk[j]``) of the
    arrays at ``addr``, typed as ``like``; None for None."""


@overload(_piece, jit_options=_UPDATE)
def _piece_impl(addr, pk, plo, phi, j, like):
    if addr is None or isinstance(addr, types.NoneType):
        return lambda addr, pk, plo, phi, j, like: None
    return lambda addr, pk, plo, phi, j, like: carray(
        _as_pointer(addr[pk[j]], like), (phi[j],))[plo[j]:]


@_ujit
def _state_pieces(st0, st1, st2, soff, pk, plo, phi, j):
    """Piece ``j`` of each state buffer, and its length, unsigned: signed
    indices make Numba check for negative ones on every access, and LLVM
    then will not vectorise the loop."""
    n = phi[j] - plo[j]
    o = soff[pk[j]] + plo[j]
    return (_part(st0, o, o + n), _part(st1, o, o + n), _part(st2, o, o + n),
            np.uint64(n))


@_ujit
def _task_update(t, c, waddr, eaddr, oaddr, gaddr, soff, pk, plo, phi, tasks, st0, st1, st2,
                 like_w, like_g, like_o, gs, flags):
    for j in range(tasks[t], tasks[t + 1]):
        _apply_piece(c, _piece(waddr, pk, plo, phi, j, like_w),
                     _piece(eaddr, pk, plo, phi, j, like_w),
                     _piece(gaddr, pk, plo, phi, j, like_g),
                     _piece(oaddr, pk, plo, phi, j, like_o),
                     st0, st1, st2, soff, pk, plo, phi, j, gs, flags)


# -- compact state (fastopt/backends/compact.py) ---------------------------------------
# A state slot is a float array (the update reads and writes it in place) or,
# for compact state, a tuple ``(codes, absmax, key)``: codes uint16
# (bfloat16 bits), int8 (signed 8-bit) or uint8 (unsigned 8-bit), the float32
# absmax per block (8-bit) and the uint32 rounding key (bfloat16). A compact
# piece is stepped a block at a time: each slot decoded into float32 scratch,
# the unchanged ``_apply`` over the block, the scratch encoded back. The
# codes' type picks the codec at compile time: float state compiles as before.

def _apply_piece(c, w, e, g, out, st0, st1, st2, soff, pk, plo, phi, j, gs, flags):
    """Update piece ``j`` (``w``, ``e``, ``g``, ``out`` its weights, offset,
    gradients and 16-bit params) and its state at the same elements of
    ``st0..st2``."""


def _is_none(a):
    return a is None or isinstance(a, types.NoneType)


@overload(_apply_piece, jit_options=_UPDATE)
def _apply_piece_impl(c, w, e, g, out, st0, st1, st2, soff, pk, plo, phi, j, gs, flags):
    if not isinstance(st0, types.BaseTuple):      # float state (or none): in place
        def in_place(c, w, e, g, out, st0, st1, st2, soff, pk, plo, phi, j, gs, flags):
            s0, s1, s2, n = _state_pieces(st0, st1, st2, soff, pk, plo, phi, j)
            _apply(c, w, e, g, out, s0, s1, s2, n, gs, flags)
        return in_place

    def blockwise(c, w, e, g, out, st0, st1, st2, soff, pk, plo, phi, j, gs, flags):
        n = np.uint64(phi[j] - plo[j])
        o = np.uint64(soff[pk[j]] + plo[j])     # a multiple of BLOCK for 8-bit state
        x0 = np.empty(_BLOCK, np.float32)
        x1 = np.empty(_BLOCK, np.float32)
        x2 = np.empty(_BLOCK, np.float32)
        b = _U0
        while b < n:
            m = min(_BLOCK, n - b)
            s0 = _decode_block(st0, o + b, m, x0)
            s1 = _decode_block(st1, o + b, m, x1)
            s2 = _decode_block(st2, o + b, m, x2)
            _apply(c, w[b:b + m], _part(e, b, b + m), g[b:b + m], _part(out, b, b + m), s0, s1,
                   s2, m, gs, flags)
            _encode_block(st0, o + b, m, x0)
            _encode_block(st1, o + b, m, x1)
            _encode_block(st2, o + b, m, x2)
            b += _BLOCK
    return blockwise


_BLOCK = compact_jit.BLOCK


def _decode_block(slot, o, m, x):
    """Slot ``slot``'s elements ``o .. o + m - 1`` decoded into ``x[:m]``
    (returned), None for an unused slot."""


def _encode_block(slot, o, m, x):
    """``x[:m]`` encoded as slot ``slot``'s elements ``o .. o + m - 1``."""


def _codec(slot):
    """``(bfloat16?, signed?)`` of a compact slot's codes (typing time)."""
    dtype = slot.types[0].dtype
    return dtype == types.uint16, dtype == types.int8


@overload(_decode_block, jit_options=_UPDATE)
def _decode_block_impl(slot, o, m, x):
    if _is_none(slot):
        return lambda slot, o, m, x: None
    bf16, signed = _codec(slot)

    def decode(slot, o, m, x):
        compact_jit.decode_block(slot[0], slot[1], o, m, x, bf16, signed)
        return x[:m]
    return decode


@overload(_encode_block, jit_options=_UPDATE)
def _encode_block_impl(slot, o, m, x):
    if _is_none(slot):
        return lambda slot, o, m, x: None
    bf16, signed = _codec(slot)
    return lambda slot, o, m, x: compact_jit.encode_block(slot[0], slot[1], slot[2], o, m,
                                                          x, bf16, signed)


# Phase one's sums: accumulator i of 64 adds the squares of elements i,
# i + 64, ... of the piece, in the elementwise loop itself (it vectorises as
# the one-pass updates do), and the 64 are added in order at the end. A
# single running sum would keep the loop scalar: LLVM and gcc vectorise a
# float reduction only where they may reorder it. The Cython kernels sum in
# the same order.
_LANES = np.uint64(64)


@_ujit
def _sums(c, w, e, g, s0, s1, s2, n, gs, flags):
    """Phase one over a piece: the float64 sums of squares of the two values."""
    a = np.zeros(_LANES)
    b = np.zeros(_LANES)
    lo = _U0
    while lo < n:
        for i in range(min(_LANES, n - lo)):
            k = lo + i
            x, y = _element_sums(c, _weight(w, e, k), _widen(g[k]) * gs, k, s0, s1, s2, flags)
            xf, yf = np.float64(x), np.float64(y)
            a[i] += xf * xf
            b[i] += yf * yf
        lo += _LANES
    sa = sb = 0.0
    for i in range(_LANES):
        sa += a[i]
        sb += b[i]
    return sa, sb


@_ujit
def _finish(c, w, e, out, s0, s1, s2, n, f, flags):
    """Phase two over a piece of one array, with the array's factor ``f``."""
    for i in range(n):
        p = _element_finish(c, _weight(w, e, i), i, s0, s1, s2, flags, f)
        w[i] = p
        if out is not None:    # mixed precision; resolved at compile time
            out[i] = _narrow(p, out)


@_ujit
def _task_sums(t, c, waddr, eaddr, gaddr, soff, pk, plo, phi, tasks, st0, st1, st2, like_w,
               like_g, gs, flags, psum):
    """Phase one over task ``t``: piece ``j``'s two sums in ``psum[2j:2j+2]``."""
    for j in range(tasks[t], tasks[t + 1]):
        s0, s1, s2, n = _state_pieces(st0, st1, st2, soff, pk, plo, phi, j)
        psum[2 * j], psum[2 * j + 1] = _sums(
            c, _piece(waddr, pk, plo, phi, j, like_w), _piece(eaddr, pk, plo, phi, j, like_w),
            _piece(gaddr, pk, plo, phi, j, like_g), s0, s1, s2, n, gs, flags)


@_ujit
def _array_factors(c, pfirst, psum, factor, k):
    """Array ``k``'s factor from its pieces' sums, added in piece order (the
    result does not depend on which thread ran which piece)."""
    a = 0.0
    b = 0.0
    for j in range(pfirst[k], pfirst[k + 1]):
        a += psum[2 * j]
        b += psum[2 * j + 1]
    factor[k] = _array_factor(c, a, b)


@_ujit
def _task_finish(t, c, waddr, eaddr, oaddr, soff, pk, plo, phi, tasks, st0, st1, st2, like_w,
                 like_o, flags, factor):
    """Phase two over task ``t``, each piece with its array's factor."""
    for j in range(tasks[t], tasks[t + 1]):
        s0, s1, s2, n = _state_pieces(st0, st1, st2, soff, pk, plo, phi, j)
        _finish(c, _piece(waddr, pk, plo, phi, j, like_w), _piece(eaddr, pk, plo, phi, j, like_w),
                _piece(oaddr, pk, plo, phi, j, like_o), s0, s1, s2, n,
                like_w.dtype.type(factor[pk[j]]), flags)


@_jit
def _task_sumsq(t, gaddr, pk, plo, phi, tasks, like_g):
    acc = 0.0
    for j in range(tasks[t], tasks[t + 1]):
        g = carray(_as_pointer(gaddr[pk[j]], like_g), (phi[j],))
        acc += _sumsq_chunk(g, np.uint64(plo[j]), np.uint64(phi[j]))
    return acc


@_jit
def _decide(partial, max_norm, inv_scale, norm_mode):
    """``(unscaled norm, coefficient, skip?)`` from the per-task partial sums,
    added in task order (independent of the thread count)."""
    total = 0.0
    for t in range(partial.size):
        total += partial[t]
    norm = np.sqrt(total) * inv_scale
    coef = inv_scale
    if max_norm > 0:
        clip = max_norm / (norm + 1e-6)     # torch's clip_grad_norm_ factor
        if clip < 1.0 or clip != clip:
            coef *= clip
    return norm, coef, norm_mode == 2 and not (norm - norm == 0)


def _table_step(c, waddr, eaddr, oaddr, gaddr, soff, pk, plo, phi, tasks, st0, st1, st2,
                like_w, like_g, like_o, gscale, flags, max_norm, inv_scale, norm_mode,
                partial, outcome, one_phase, two_phase):
    """One step over a table: the norm pass (``norm_mode`` 1: for clipping,
    2: and skip a non-finite step), then the update. Compiled twice below:
    threaded (``prange`` is a parallel loop: one parallel region per loop,
    as Numba has no barrier inside one; the workers are still spinning from
    the one before when the next starts) and serial (``prange`` is ``range``).

    The update is one pass (``one_phase`` True, ``two_phase`` None) or two
    (ElementStep.phases; ``one_phase`` None, ``two_phase`` the table's
    ``(pfirst, psum, factor)``, see tables.StepTable): phase one per task,
    the per-array factors from the pieces' sums, phase two per task. Numba
    settles ``argument is None`` at compile time, so each compilation holds
    only its own update (an element type has the functions of one kind).
    ``eaddr``: None, or the table's offset column (the weights read as
    ``w - e``); a skipped step writes nothing, offset or not. ``outcome``:
    the table's (calls, norm, skipped), written last (what a step
    interrupted by Ctrl-C did: fastopt.optim.interrupt)."""
    ntasks = tasks.size - 1
    norm, coef, skip = 0.0, 1.0, False
    if norm_mode:
        for t in prange(ntasks):
            partial[t] = _task_sumsq(t, gaddr, pk, plo, phi, tasks, like_g)
        norm, coef, skip = _decide(partial[:ntasks], max_norm, inv_scale, norm_mode)
    if not skip:
        gs = like_w.dtype.type(gscale * coef)
        if one_phase is not None:       # resolved at compile time
            for t in prange(ntasks):
                _task_update(t, c, waddr, eaddr, oaddr, gaddr, soff, pk, plo, phi, tasks, st0,
                             st1, st2, like_w, like_g, like_o, gs, flags)
        if two_phase is not None:
            pfirst, psum, factor = two_phase
            for t in prange(ntasks):
                _task_sums(t, c, waddr, eaddr, gaddr, soff, pk, plo, phi, tasks, st0, st1,
                           st2, like_w, like_g, gs, flags, psum)
            for k in prange(pfirst.size - 1):
                _array_factors(c, pfirst, psum, factor, k)
            for t in prange(ntasks):
                _task_finish(t, c, waddr, eaddr, oaddr, soff, pk, plo, phi, tasks, st0, st1,
                             st2, like_w, like_o, flags, factor)
    outcome[1] = norm
    outcome[2] = 1.0 if skip else 0.0
    outcome[0] += 1.0
    return norm, skip


def _named(fn, name):
    """``fn``'s code under another name: Numba's on-disk cache is keyed by the
    function's name, so two compilations of one function with different
    options would otherwise share (and load) each other's entries."""
    twin = types_.FunctionType(fn.__code__, fn.__globals__, name, fn.__defaults__,
                               fn.__closure__)
    twin.__qualname__ = name
    return twin


_table_serial = _jit(_named(_table_step, "_table_serial"))
_table_parallel = _pjit(_named(_table_step, "_table_parallel"))


@_pjit
def _sumsq_tasks_parallel(gaddr, pk, plo, phi, tasks, like_g, partial):
    for t in prange(tasks.size - 1):
        partial[t] = _task_sumsq(t, gaddr, pk, plo, phi, tasks, like_g)


@_jit
def _sumsq_tasks(gaddr, pk, plo, phi, tasks, like_g, partial, parallel):
    ntasks = tasks.size - 1
    if parallel:
        _sumsq_tasks_parallel(gaddr, pk, plo, phi, tasks, like_g, partial)
    else:
        for t in range(ntasks):
            partial[t] = _task_sumsq(t, gaddr, pk, plo, phi, tasks, like_g)
    total = 0.0
    for t in range(ntasks):      # task order: independent of the thread count
        total += partial[t]
    return total


@_jit
def _at_given(p, given, k):
    """The param at address ``p`` still at the data address and with the
    dtype object its table recorded (``given[k]``), C-contiguous and
    writable (flags NPY_ARRAY_C_CONTIGUOUS 0x1, NPY_ARRAY_WRITEABLE 0x400);
    its bytes are the caller's to compare."""
    return (_load_i64(p + 16) == given[k, 0] and _load_i64(p + 56) == given[k, 2]
            and (_load_i32(p + 64) & 0x401) == 0x401)


@_jit
def _gather(ids, ndarray_type, pids, given, itemsizes, gaddr, written):
    """Read each gradient's data address from its PyArrayObject (``ids``:
    the objects' addresses), checking it as ``_validate.check_like`` would:
    exactly an ndarray, the param's dtype object, C-contiguous, the param's
    shape; and that its bytes overlap none of the sorted, disjoint
    ``written`` ranges. Each param (``pids``) must still be as its table
    recorded it (``given``: data address, bytes, dtype object; see
    ``StepTable.given``) and C-contiguous: one whose dtype, size or memory
    changed in place goes to the full checks, which refuse it (a reshape in
    place keeps all three: its grads are read in its new shape). Returns
    -1, or the index of the first gradient that does not pass (the
    caller's full checks then say why; nothing is written through these
    addresses here).

    NumPy's array struct (the same layout since NumPy 1.7, and in 2.x):
    ob_refcnt, ob_type, data, nd (int), dimensions, strides, base, descr,
    flags (int).
    """
    nw = written.size // 2
    for k in range(ids.size):
        p = pids[k]
        if not _at_given(p, given, k):
            return k
        a = ids[k]
        if _load_i64(a + 8) != ndarray_type:          # ob_type: exactly ndarray
            return k
        if _load_i64(a + 56) != given[k, 2]:          # descr: the param's dtype
            return k
        if not (_load_i32(a + 64) & 1):               # NPY_ARRAY_C_CONTIGUOUS
            return k
        nd = _load_i32(a + 24)
        if nd != _load_i32(p + 24):                   # the param's shape, as it is now
            return k
        dp = _load_i64(a + 32)
        pdims = _load_i64(p + 32)
        size = 1
        for d in range(nd):
            dk = _load_i64(dp + 8 * d)
            if dk != _load_i64(pdims + 8 * d):
                return k
            size *= dk
        if size * itemsizes[k] != given[k, 1]:        # and the bytes it was given with
            return k
        lo = _load_i64(a + 16)
        hi = lo + size * itemsizes[k]
        if hi > lo and nw:
            # the first written range ending after lo overlaps if it starts before hi
            left, right = 0, nw
            while left < right:
                mid = (left + right) >> 1
                if written[2 * mid + 1] <= lo:
                    left = mid + 1
                else:
                    right = mid
            if left < nw and written[2 * left] < hi:
                return k
        gaddr[k] = lo
    return -1


@_jit
def _sumsq_chunk(x, start, stop):
    acc = 0.0  # float64 accumulator on purpose
    for i in range(start, stop):
        xi = np.float64(_widen(x[i]))
        acc += xi * xi
    return acc


@_pjit
def _sumsq_parallel(x):
    n = x.size
    nchunks = (n + CHUNK - 1) // CHUNK
    partial = np.empty(nchunks, dtype=np.float64)
    for c in prange(nchunks):
        start, stop = _span(c, n)
        partial[c] = _sumsq_chunk(x, start, stop)
    total = 0.0
    for c in range(nchunks):  # fixed order: independent of the thread count
        total += partial[c]
    return total


@_jit
def _scale_chunk(x, start, stop, c):
    for i in range(start, stop):
        x[i] *= c


@_pjit
def _scale_parallel(x, c):
    n = x.size
    for k in prange((n + CHUNK - 1) // CHUNK):
        start, stop = _span(k, n)
        _scale_chunk(x, start, stop, c)


def adam_update(p, g, m, v, vmax, s: AdamScalars, out=None) -> None:
    # vmax / out are None when amsgrad / mixed precision are off
    _update(adam_element(s, vmax is not None), p, g, out, m, v, vmax)


def sgd_update(p, g, buf, s: SGDScalars, out=None) -> None:
    _update(sgd_element(s, buf is not None), p, g, out, buf, None, None)


compiled_tables = True    # steps a whole param group in one call (tables.py)
_NDARRAY = id(np.ndarray)
_NO_ABSMAX = np.empty(0, np.float32)     # a bfloat16 slot's (unread) absmax


def _table_info(table):
    """What the Numba drivers need beyond the table itself, built once."""
    info = table.__dict__.get("_numba")
    if info is None:
        store = bits(np.empty(0, table.grad_dtype))
        info = table._numba = dict(
            like_w=np.empty(0, table.dtype),
            like_g=store, like_o=None if table.oaddr is None else store,
            dtype=table.dtype.type,
            # a group's params share the grad dtype (the table's): its itemsize
            itemsizes=np.full(len(table.params), table.grad_dtype.itemsize, np.int64),
            ids=np.zeros(len(table.params), np.int64),
            pids=np.asarray([id(p) for p in table.params], np.int64))
    return info


def step(table, el, buffers, gscale, max_norm=0.0, inv_scale=1.0, norm_mode=0,
         parallel=True, compact=None):
    """One step over ``table`` (see :mod:`fastopt.backends.tables`) with the
    group's state ``buffers`` in kernel order; returns ``(unscaled norm,
    skipped)``. ``compact``: None for float state, else the
    :class:`~fastopt.backends.compact.CompactStep` of code ``buffers``.

    A table offset (``table.shift``, SAM's restore) is read by the kernels
    and cleared once a step applied it; a skipped step leaves it pending
    (see :meth:`StepTable.set_shift`)."""
    info = _table_info(table)
    table.state_addresses(buffers, compact)    # keeps the table's written ranges current
    shift = table.shift
    if compact is not None:
        check_unshifted(table)
        check_compact(table, el)
        buffers = [(b, _NO_ABSMAX if a is None else a, np.uint32(k))
                   for b, a, k in zip(buffers, compact.absmax, compact.keys)]
    st0, st1, st2 = (list(buffers) + [None] * 3)[:3]
    parallel = (parallel and table.nelem > SERIAL_MAX and table.ntasks > 1
                and not _serial_only())
    run = _table_parallel if parallel else _table_serial
    norm, skip = run(_scalars(el, info["dtype"]), table.waddr,
                     None if shift is None else table.eaddr, table.oaddr, table.gaddr,
                     table.soff, table.pk, table.plo, table.phi, table.tasks, st0, st1, st2,
                     info["like_w"], info["like_g"], info["like_o"], float(gscale), el.flags,
                     float(max_norm), float(inv_scale), norm_mode, table.partial,
                     table.outcome_array,
                     *((True, None) if el.phases == 1 else
                       (None, (table.pfirst, table.psum, table.factor))))
    if shift is not None and not skip:
        table.clear_shift()
    return float(norm), bool(skip)


def gather(table, grads) -> bool:
    """Point ``table`` at ``grads`` (a list of arrays), each checked in
    compiled code; False when one does not pass (the caller's full checks
    say why)."""
    info = _table_info(table)
    ids = info["ids"]
    if type(grads) not in (list, tuple) or len(grads) != ids.size:
        return False
    ids[:] = np.fromiter(map(id, grads), np.int64, ids.size)
    return _gather(ids, _NDARRAY, info["pids"], table.given, info["itemsizes"], table.gaddr,
                   table.written) == -1


@_jit
def _params_as_given(pids, given, itemsizes):
    """-1, or the first param (``pids``: the objects' addresses) no longer
    at the data address, with the bytes and dtype object, its table
    recorded (``given``), or no longer C-contiguous and writable."""
    for k in range(pids.size):
        p = pids[k]
        if not _at_given(p, given, k):
            return k
        dp = _load_i64(p + 32)
        size = 1
        for d in range(_load_i32(p + 24)):
            size *= _load_i64(dp + 8 * d)
        if size * itemsizes[k] != given[k, 1]:
            return k
    return -1


def params_as_given(table) -> bool:
    """Whether ``table``'s params are still as it recorded them."""
    info = _table_info(table)
    return _params_as_given(info["pids"], table.given, info["itemsizes"]) == -1


def sumsq_table(table) -> float:
    info = _table_info(table)
    return float(_sumsq_tasks(table.gaddr, table.pk, table.plo, table.phi, table.tasks,
                              info["like_g"], table.partial,
                              table.nelem > SERIAL_MAX and table.ntasks > 1
                              and not _serial_only()))


def widen(src, dst) -> None:
    """16-bit ``src`` (bfloat16/float16) -> float32 ``dst``, elementwise."""
    _widen_array(bits(src), dst)


def narrow(src, dst) -> None:
    """float32 ``src`` -> 16-bit ``dst`` (bfloat16/float16), rounded to nearest even."""
    _narrow_array(src, bits(dst))


def sumsq(x) -> float:
    # One chunk is summed identically by both paths, so the result is the
    # same whichever runs.
    x = bits(x)
    if x.size <= CHUNK or _serial_only():
        return float(_sumsq_chunk(x, _U0, np.uint64(x.size)))
    return float(_sumsq_parallel(x))


def scale(x, c: float) -> None:
    c = x.dtype.type(c)
    if x.size <= SERIAL_MAX or _serial_only():
        _scale_chunk(x, _U0, np.uint64(x.size), c)
    else:
        _scale_parallel(x, c)


def set_num_threads(n: int) -> None:
    global _wanted, _generation
    import numba
    most = numba.config.NUMBA_NUM_THREADS
    if n > most:     # Numba's own message names neither the limit's source nor a way out
        # (one setting for the Numba and the Cython steps: said, as a Cython
        # user reading "Numba" would not know why it applies)
        raise ValueError(f"{n} threads asked for, but Numba's thread pool has {most} "
                         "(NUMBA_NUM_THREADS, by default the number of CPUs; set it before "
                         "the first import for more). The thread count is one setting for "
                         "the Numba and the Cython steps; more threads than cores seldom "
                         "make a step faster")
    if not in_forked_child():       # a forked child steps serially (fastopt._openmp)
        numba.set_num_threads(n)
        _wanted, _generation = n, _generation + 1
        _synced.generation = _generation


def get_num_threads() -> int:
    import numba
    return 1 if _serial_only() else numba.get_num_threads()


def set_threads_here(n: int) -> None:
    """This thread's Numba count alone (``kernel_threads``' block), leaving
    the process's setting, and other threads, as they are."""
    import numba
    if not in_forked_child():
        _serial_only()                  # the process's setting first, so it does not
        numba.set_num_threads(n)        # replace this one at the next kernel


# Numba's thread count is per thread: a thread started after
# set_num_threads(1) (a ThreadPoolExecutor's, joblib's threading backend)
# ran its steps on Numba's default, all the cores, while the Cython step
# keeps one count for the process. So the count set_num_threads gave is
# applied on each thread before its first parallel kernel after a change
# (only then: a count the user sets on a thread later, for their own Numba
# code too, stays; without a set_num_threads call nothing is applied).
_wanted = None          # the count set_num_threads gave the process
_generation = 0         # how many times it was given (0: never)
_synced = threading.local()     # .generation: the one this thread has applied


def _serial_only() -> bool:
    """Whether kernels must run serially here (a forked child); else, this
    thread's Numba count made the process's first, where it is behind."""
    if in_forked_child():
        return True
    if _generation and getattr(_synced, "generation", 0) != _generation:
        import numba
        numba.set_num_threads(_wanted)
        _synced.generation = _generation
    return False
