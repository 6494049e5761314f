"""The CUDA kernel of compact optimizer state (``state_dtype="bfloat16"`` or
``"int8"``, see :mod:`fastopt.backends.compact`).

One fused pass per absmax block of :data:`~fastopt.backends.compact.BLOCK`
elements, a thread block per absmax block (grid-stride over them): each
thread decodes its elements' state, runs the same element function the
float kernels call (``_cuda_kernels._step``), writes the weight, and keeps
the new state values in registers; for 8-bit codes the block's new absmax is
the largest ``|value|`` of its threads (an integer max of the bits, in shared
memory: order-free), then every thread encodes its values against it. The
codecs are :mod:`fastopt.backends.compact_jit`'s element functions, the ones
the CPU Numba drivers call: the same stochastic-rounding hash of (key, state
index) and the same 8-bit map, so codes and absmax come out bit for bit as on
the CPU for the same float values.

The blocks of a run of arrays are a table built once per layout
(``numba_cuda.compact_blocks``): block ``j`` steps ``bn[j]`` elements, from
``bp[j]`` in the run's weights and gradients and ``bs[j]`` in the group's
code buffers (an array's state starts where ``StateFormat.offsets`` puts it:
8-bit state at a multiple of BLOCK, so no block spans two arrays).

Kept apart from the backend so it compiles to PTX without a GPU, as
``_cuda_kernels`` does.
"""

from __future__ import annotations

import numpy as np
from numba import cuda, types
from numba.core.extending import overload

from . import compact_jit as CJ
from ._cuda_kernels import (ELEMENTS, NO_OFFSET, THREADS, _put_param, _restore, _shift,
                            _slots_used, _step, _widen)
from .compact import BLOCK
from .scalars import AdamElement

from .._numba_cache import install_cuda as _fresh_cache

_fresh_cache()      # before the cache=True kernels: fastopt._numba_cache says why

#: elements of an absmax block each thread steps (one on a GPU, where a thread
#: block is as long as an absmax block; the simulator's blocks are shorter)
PER_THREAD = BLOCK // THREADS
assert PER_THREAD * THREADS == BLOCK


# -- one state element: which codec, by the codes' dtype ----------------------------------
# Python bodies serve the simulator; the CUDA target compiles the overloads,
# whose codec is a constant of the codes' type (the other branch is folded
# away, as in the CPU drivers).

def _codec(codes):
    """``(bfloat16?, signed?)`` of a code buffer."""
    return codes.dtype == np.uint16, codes.dtype == np.int8


@overload(_codec, target="cuda")
def _codec_cuda(codes):
    bf16, signed = codes.dtype == types.uint16, codes.dtype == types.int8
    return lambda codes: (bf16, signed)


@cuda.jit(device=True)
def _decode(codes, absmax, i, o):
    """float32 value of state element ``i`` (its absmax block starts at ``o``)."""
    bf16, signed = _codec(codes)
    if bf16:
        return CJ.f32_from_bits(CJ.bf16_decode_one(codes[i]))
    return CJ.q8_decode_one(codes[i], absmax[o // BLOCK], signed)


@cuda.jit(device=True)
def _encode(codes, i, x, scale, key):
    """Store float32 ``x`` as state element ``i``, rounded stochastically
    with the bits of (``key``, ``i``); 8-bit codes against ``scale``."""
    bf16, signed = _codec(codes)
    if bf16:
        codes[i] = CJ.bf16_encode_sr_one(CJ.f32_bits(x), key, i)
    else:
        codes[i] = CJ.q8_encode_one(x, scale, signed, key, i)


@cuda.jit(device=True)
def _block_absmax(tops, t, h0, h1, h2):
    """The largest of the block's threads' ``h0``/``h1``/``h2`` (bits of
    ``|value|``, see ``compact_jit.absmax_bits_one``) as three float32:
    a shared-memory tree of integer maxima."""
    tops[0, t] = h0
    tops[1, t] = h1
    tops[2, t] = h2
    cuda.syncthreads()
    half = THREADS // 2
    while half > 0:
        if t < half:
            for s in range(3):
                tops[s, t] = max(tops[s, t], tops[s, t + half])
        cuda.syncthreads()
        half //= 2
    r0 = CJ.f32_from_bits(tops[0, 0])
    r1 = CJ.f32_from_bits(tops[1, 0])
    r2 = CJ.f32_from_bits(tops[2, 0])
    cuda.syncthreads()          # every thread has read them before the next block writes
    return r0, r1, r2


@cuda.jit(cache=True)
def _compact_kernel(w, g, c0, c1, c2, m0, m1, m2, keys, bp, bs, bn, off, out, fc, c,
                    grad_scale, flags, nstate, mixed):
    """One step of compact state: ``c0..c2`` the code slots (unused ones: any
    code buffer, never touched), ``m0..m2`` their absmax arrays (bfloat16
    codes: any float32 array, never touched), ``keys`` the slots' rounding
    keys; the other arguments as ``_update_kernel``'s. A skipped step (fc[1])
    writes no code and no absmax."""
    if fc[1]:
        _restore(w, out, off, cuda.grid(1), cuda.gridsize(1), mixed)
        return
    gs = grad_scale * fc[0]
    nstate = _slots_used(c, nstate)
    bf16, _ = _codec(c0)
    t = cuda.threadIdx.x
    tops = cuda.shared.array((3, THREADS), types.uint32)
    x0 = cuda.local.array(PER_THREAD, types.float32)
    x1 = cuda.local.array(PER_THREAD, types.float32)
    x2 = cuda.local.array(PER_THREAD, types.float32)
    for j in range(cuda.blockIdx.x, bp.size, cuda.gridDim.x):
        pb = bp[j]
        sb = bs[j]
        m = bn[j]
        h0 = np.uint32(0)
        h1 = np.uint32(0)
        h2 = np.uint32(0)
        for k in range(PER_THREAD):
            e = t + k * THREADS
            if e < m:
                pi = pb + e
                si = sb + e
                p = _shift(w[pi], off, pi)
                a = _decode(c0, m0, si, sb) if nstate > 0 else p
                b = _decode(c1, m1, si, sb) if nstate > 1 else p
                d = _decode(c2, m2, si, sb) if nstate > 2 else p
                p, a, b, d = _step(c, p, _widen(g[pi]) * gs, a, b, d, flags)
                _put_param(w, out, pi, p, mixed)
                x0[k] = a
                x1[k] = b
                x2[k] = d
                if not bf16:
                    h0 = max(h0, CJ.without_inf(CJ.absmax_bits_one(a)))
                    h1 = max(h1, CJ.without_inf(CJ.absmax_bits_one(b)))
                    h2 = max(h2, CJ.without_inf(CJ.absmax_bits_one(d)))
        s0 = s1 = s2 = np.float32(0)
        if not bf16:
            s0, s1, s2 = _block_absmax(tops, t, h0, h1, h2)
            if t == 0:      # every thread decoded with the old absmax before the tree's sync
                if nstate > 0:
                    m0[sb // BLOCK] = s0
                if nstate > 1:
                    m1[sb // BLOCK] = s1
                if nstate > 2:
                    m2[sb // BLOCK] = s2
        for k in range(PER_THREAD):
            e = t + k * THREADS
            if e < m:
                si = sb + e
                if nstate > 0:
                    _encode(c0, si, x0[k], s0, keys[0])
                if nstate > 1:
                    _encode(c1, si, x1[k], s1, keys[1])
                if nstate > 2:
                    _encode(c2, si, x2[k], s2, keys[2])


#: compact-state kernel specializations for the PTX checks, as
#: ``_cuda_kernels.KERNELS``: "<optimizer>_<codes>" for each optimizer the
#: kernel steps and each code format (bfloat16 bits; 8-bit: signed first
#: slot, unsigned second and third, Adam's layout), "adam_<codes>_shifted"
#: with an offset buffer
CODES = {"bf16": (types.uint16, types.uint16), "q8": (types.int8, types.uint8)}
KERNELS = {**{f"{name}_{codes}": (_compact_kernel, "elementwise")
              for name in ELEMENTS for codes in CODES},
           **{f"adam_{codes}_shifted": (_compact_kernel, "elementwise") for codes in CODES}}


def ptx_signatures(dtype="float32", storage=None):
    """Kernel name -> argument types for ``compile_ptx`` (compact state steps
    float32 weights: ``dtype`` is float32; ``storage`` the grads' and
    params' storage, float16 or uint16 for 16-bit params with a float32
    master, as in ``_cuda_kernels.ptx_signatures``)."""
    c = getattr(types, dtype)
    st = getattr(types, storage or dtype)
    A, S, i64 = c[::1], st[::1], types.int64[::1]
    ctl = (c, types.int64, types.int64, types.boolean)   # grad_scale, flags, nstate, mixed
    keys = types.UniTuple(types.uint32, 3)
    sigs = {}
    for name, (first, rest) in CODES.items():
        codes = (first[::1], rest[::1], rest[::1])
        for opt, kind in ELEMENTS.items():
            scalars = types.NamedUniTuple(c, len(kind._fields), kind)
            for suffix, off in (("", NO_OFFSET), ("_shifted", A)):
                if suffix and kind is not AdamElement:
                    continue
                sigs[f"{opt}_{name}{suffix}"] = (A, S, *codes, A, A, A, keys, i64, i64, i64,
                                                 off, S, A, scalars) + ctl
    return sigs
