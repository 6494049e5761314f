"""The CUDA kernels of the ``cuda`` backend (see ``numba_cuda.py``).

Kept apart from the backend so they import (and compile to PTX with
``numba.cuda.compile_ptx``) on a machine without a GPU: the backend module
refuses to import there, this one does not.
"""

from __future__ import annotations

import math

import numpy as np
from numba import config, cuda, types
from llvmlite import ir
from numba.core.extending import intrinsic, overload

from . import elements
from .scalars import (F_CENTERED, AdagradElement, AdamaxElement, AdamElement, LAMBElement,
                      LionElement, NAdamElement, RAdamElement, RMSpropElement, SGDElement)

from .._numba_cache import install_cuda as _fresh_cache

_fresh_cache()      # before the cache=True kernels: fastopt._numba_cache says why


def _numpy_2_5_stand_in(tup):   # pragma: no cover - never called
    raise AttributeError("numpy.row_stack was removed in NumPy 2.5; use numpy.vstack")


def _load_cuda_array_typing():
    """Load numba-cuda's NumPy array typing with NumPy >= 2.5 too.

    numba-cuda (0.30.4, the newest release when written) registers an
    overload for ``np.row_stack`` whenever NumPy >= 2.0, but NumPy 2.5
    removed it, so the first kernel compile fails with "module 'numpy' has
    no attribute 'row_stack'" (seen on an H200 with numpy 2.5.2; numba's CPU
    target already checks for < 2.5). While that module loads, ``np.row_stack``
    is a stand-in nothing calls; it is removed right after, so NumPy's
    namespace is left as it was.
    """
    if hasattr(np, "row_stack") or getattr(config, "ENABLE_CUDASIM", False):
        return
    np.row_stack = _numpy_2_5_stand_in
    try:
        import numba.cuda.np.arrayobj  # noqa: F401
    except ImportError:   # pragma: no cover - another numba-cuda layout: nothing to do
        pass
    finally:
        del np.row_stack


_load_cuda_array_typing()

#: threads per block (a power of two: the tree reduction needs it). The
#: simulator runs each thread as a Python thread, so it gets small blocks.
THREADS = 64 if getattr(config, "ENABLE_CUDASIM", False) else 256

_BF16_BITS = np.dtype(np.uint16)


# -- 16-bit storage ---------------------------------------------------------------
# Python bodies serve the simulator (it runs kernels as Python); the
# overloads below are what the CUDA target compiles.

def _widen(x):
    """Stored value -> compute value (float32 for 16-bit storage)."""
    if isinstance(x, np.uint16):
        return np.array([np.uint32(x) << np.uint32(16)], np.uint32).view(np.float32)[0]
    if isinstance(x, np.float16):
        return np.float32(x)
    return x


def _narrow(x, like):
    """float32 ``x`` -> the storage type of array ``like``."""
    if like.dtype == _BF16_BITS:
        b = int(np.array([x], np.float32).view(np.uint32)[0])
        if x != x:
            return np.uint16(((b >> 16) & 0x8000) | 0x7FC0)
        return np.uint16((b + 0x7FFF + ((b >> 16) & 1)) >> 16)
    return like.dtype.type(x)


@overload(_widen, target="cuda")
def _widen_cuda(x):
    if isinstance(x, types.Float) and x.bitwidth >= 32:
        return lambda x: x
    if x == types.float16:
        return lambda x: types.float32(x)
    if x == types.uint16:
        def bf16(x):
            # bit cast through a one-element local array: NVVM turns it into
            # one ``mov.b32`` (no local memory traffic)
            tmp = cuda.local.array(1, types.uint32)
            tmp[0] = types.uint32(x) << types.uint32(16)
            return tmp.view(np.float32)[0]
        return bf16
    return None


@overload(_narrow, target="cuda")
def _narrow_cuda(x, like):
    if like.dtype == types.float16:
        return lambda x, like: types.float16(x)
    if like.dtype == types.uint16:
        def bf16(x, like):
            tmp = cuda.local.array(1, types.float32)
            tmp[0] = x
            b = tmp.view(np.uint32)[0]
            if x != x:   # NaN: quiet NaN with the sign kept (ml_dtypes' choice)
                return types.uint16(((b >> types.uint32(16)) & types.uint32(0x8000))
                                    | types.uint32(0x7FC0))
            r = (b + types.uint32(0x7FFF) + ((b >> types.uint32(16)) & types.uint32(1)))
            return types.uint16(r >> types.uint32(16))
        return bf16
    if isinstance(like.dtype, types.Float):
        return lambda x, like: x
    return None


# -- four-element vector loads and stores ------------------------------------------
# NVVM cannot prove an array's alignment, so four neighbouring scalar loads
# stay four ``ld.global.f32``. These intrinsics load/store four elements as
# one vector (``ld.global.v4.f32``: 16 bytes per thread and instruction, a
# quarter of the memory instructions). The caller guarantees the alignment:
# the backend takes the vector path only when every array's address is a
# multiple of four elements' size (``vector_ok``). Python bodies serve the
# simulator.

def _load4(a, i):
    return a[i], a[i + 1], a[i + 2], a[i + 3]


def _store4(a, i, x0, x1, x2, x3):
    a[i] = x0
    a[i + 1] = x1
    a[i + 2] = x2
    a[i + 3] = x3


def _vector_pointer(context, builder, aryty, ary, i):
    data = context.make_array(aryty)(context, builder, ary).data
    vty = ir.VectorType(context.get_value_type(aryty.dtype), 4)
    align = 4 * context.get_abi_sizeof(context.get_value_type(aryty.dtype))
    return builder.bitcast(builder.gep(data, [i]), vty.as_pointer()), vty, align


@intrinsic
def _load4_vector(typingctx, a, i):
    def codegen(context, builder, sig, args):
        ptr, _, align = _vector_pointer(context, builder, sig.args[0], args[0], args[1])
        vec = builder.load(ptr, align=align)
        return context.make_tuple(builder, sig.return_type, [
            builder.extract_element(vec, ir.Constant(ir.IntType(32), k)) for k in range(4)])
    return types.UniTuple(a.dtype, 4)(a, i), codegen


@intrinsic
def _store4_vector(typingctx, a, i, x0, x1, x2, x3):
    def codegen(context, builder, sig, args):
        ptr, vty, align = _vector_pointer(context, builder, sig.args[0], args[0], args[1])
        vec = ir.Constant(vty, ir.Undefined)
        for k in range(4):
            x = context.cast(builder, args[2 + k], sig.args[2 + k], sig.args[0].dtype)
            vec = builder.insert_element(vec, x, ir.Constant(ir.IntType(32), k))
        builder.store(vec, ptr, align=align)
        return context.get_dummy_value()
    return types.void(a, i, x0, x1, x2, x3), codegen


@overload(_load4, target="cuda")
def _load4_cuda(a, i):
    return lambda a, i: _load4_vector(a, i)


@overload(_store4, target="cuda")
def _store4_cuda(a, i, x0, x1, x2, x3):
    return lambda a, i, x0, x1, x2, x3: _store4_vector(a, i, x0, x1, x2, x3)


# -- the element function, picked by the scalars' type ------------------------------------
# The per-element math is not here: it is the functions of
# ``fastopt.backends.elements`` (the ones the CPU Numba backend calls), with
# the step's scalars ``c`` (an AdamElement, SGDElement, RMSpropElement, ...
# of compute-dtype values) and option ``flags`` (scalars.F_*): both kernel
# arguments, uniform across the grid. The update kernels below know nothing
# of the optimizer: they hand an element and its three state slots (s0, s1,
# s2: the buffers in the order the optimizer's ``_element_step`` names
# them) to ``_step``, which calls the element function of ``c``'s type. A
# slot the optimizer does not use carries its value through unchanged.

def _one_state(element):
    """``element(p, g, s, c, flags) -> (p, s)`` over the three slots."""
    def over_slots(c, p, g, a, b, d, flags):
        p, a = element(p, g, a, c, flags)
        return p, a, b, d
    over_slots.element, over_slots.states = element, 1
    return over_slots


def _two_states(element):
    """``element(p, g, s, t, c, flags) -> (p, s, t)`` over the three slots."""
    def over_slots(c, p, g, a, b, d, flags):
        p, a, b = element(p, g, a, b, c, flags)
        return p, a, b, d
    over_slots.element, over_slots.states = element, 2
    return over_slots


def _adam_slots(c, p, g, a, b, d, flags):
    """exp_avg, exp_avg_sq, max_exp_avg_sq (amsgrad)."""
    return elements.adam(p, g, a, b, d, c, flags)


def _rmsprop_slots(c, p, g, a, b, d, flags):
    """square_avg; then grad_avg (centered) and/or momentum_buffer, so slot
    1 is the momentum buffer when not centered."""
    if flags & F_CENTERED:
        return elements.rmsprop(p, g, a, b, d, c, flags)
    p, a, d, b = elements.rmsprop(p, g, a, d, b, c, flags)
    return p, a, b, d


_adam_slots.element, _adam_slots.states = elements.adam, 3
_rmsprop_slots.element, _rmsprop_slots.states = elements.rmsprop, 3

#: element scalars' type -> its element function over the three slots
OVER_SLOTS = {
    AdamElement: _adam_slots,
    SGDElement: _one_state(elements.sgd),
    RMSpropElement: _rmsprop_slots,
    AdagradElement: _one_state(elements.adagrad),
    LionElement: _one_state(elements.lion),
    AdamaxElement: _two_states(elements.adamax),
    NAdamElement: _two_states(elements.nadam),
    RAdamElement: _two_states(elements.radam),
}


def _step(c, p, g, a, b, d, flags):
    """One element's update by the element function of ``c``'s type:
    ``(p, a, b, d)`` after the step. (The simulator runs this body; the
    CUDA target compiles the overload's pick, once per scalars type.)"""
    return OVER_SLOTS[type(c)](c, p, g, a, b, d, flags)


@overload(_step, target="cuda")
def _step_cuda(c, p, g, a, b, d, flags):
    return OVER_SLOTS.get(getattr(c, "instance_class", None))


# -- two-phase element steps (ElementStep.phases == 2: LAMB) ------------------------------
# As on the CPU (numba_cpu's _element_sums / _array_factor / _element_finish):
# phase one updates an element's state and hands back two values, whose
# squares the kernel sums per piece of an array; each array's factor is
# made of its pieces' sums; phase two writes the weight with its array's
# factor. Per optimizer, three functions over the three slots:
#   one(c, p, g, a, b, d, flags) -> (a, b, d, x, y)
#   two(c, p, a, b, d, flags, f) -> p
#   factor(c, sx, sy) -> the array's float64 factor

def _lamb_one(c, p, g, a, b, d, flags):
    """exp_avg, exp_avg_sq; sums p^2 and r^2 (r the update direction)."""
    a, b, r = elements.lamb_moments(p, g, a, b, c, flags)
    return a, b, d, p, r


def _lamb_two(c, p, a, b, d, flags, f):
    return elements.lamb_param(p, a, b, c, flags, f)


def _lamb_factor(c, sx, sy):
    return elements.lamb_step_size(np.float64(c.lr), sx, sy)


#: element scalars' type -> (phase one, phase two, factor, slots used)
TWO_PHASE = {LAMBElement: (_lamb_one, _lamb_two, _lamb_factor, 2)}


def _phase_one(c, p, g, a, b, d, flags):
    return TWO_PHASE[type(c)][0](c, p, g, a, b, d, flags)


def _phase_two(c, p, a, b, d, flags, f):
    return TWO_PHASE[type(c)][1](c, p, a, b, d, flags, f)


def _array_factor(c, sx, sy):
    return TWO_PHASE[type(c)][2](c, sx, sy)


def _two_phase_of(c, k):
    """The CUDA target's pick: function ``k`` of ``c``'s optimizer."""
    got = TWO_PHASE.get(getattr(c, "instance_class", None))
    return None if got is None else got[k]


@overload(_phase_one, target="cuda")
def _phase_one_cuda(c, p, g, a, b, d, flags):
    return _two_phase_of(c, 0)


@overload(_phase_two, target="cuda")
def _phase_two_cuda(c, p, a, b, d, flags, f):
    return _two_phase_of(c, 1)


@overload(_array_factor, target="cuda")
def _array_factor_cuda(c, sx, sy):
    return _two_phase_of(c, 2)


#: element scalars' type -> the most state slots its optimizer uses
SLOTS = {**{kind: fn.states for kind, fn in OVER_SLOTS.items()},
         **{kind: fns[3] for kind, fns in TWO_PHASE.items()}}


def _slots_used(c, nstate):
    """``nstate``, capped by the most slots ``c``'s optimizer ever uses: a
    constant once compiled, so the kernels for a one-buffer optimizer (SGD,
    Lion, ...) have no code for slots 1 and 2 (42 vs 46 registers for the
    fp32 SGD vector kernel, ptxas sm_90)."""
    return min(nstate, SLOTS[type(c)])


@overload(_slots_used, target="cuda")
def _slots_used_cuda(c, nstate):
    most = SLOTS[c.instance_class]
    return lambda c, nstate: min(nstate, most)


# -- an offset subtracted from the weights as they are read --------------------------------
# ``off`` is a buffer laid out like the state (SAM's perturbation ``e``: the
# step restores ``p - e`` and updates it in the same pass), or ``()`` for
# none: the overloads then return their input, so a kernel compiled without
# an offset has exactly the code it had before offsets existed. A skipped
# step (the non-finite skip) still restores the weights.

def _shift(p, off, i):
    return p if isinstance(off, tuple) else p - off[i]


def _shift4(p0, p1, p2, p3, off, i):
    if isinstance(off, tuple):
        return p0, p1, p2, p3
    o0, o1, o2, o3 = _load4(off, i)
    return p0 - o0, p1 - o1, p2 - o2, p3 - o3


@overload(_shift, target="cuda")
def _shift_cuda(p, off, i):
    if isinstance(off, types.BaseTuple):
        return lambda p, off, i: p
    return lambda p, off, i: p - off[i]


@overload(_shift4, target="cuda")
def _shift4_cuda(p0, p1, p2, p3, off, i):
    if isinstance(off, types.BaseTuple):
        return lambda p0, p1, p2, p3, off, i: (p0, p1, p2, p3)

    def shifted(p0, p1, p2, p3, off, i):
        o0, o1, o2, o3 = _load4(off, i)
        return p0 - o0, p1 - o1, p2 - o2, p3 - o3
    return shifted


# -- storing the updated params ----------------------------------------------------------

@cuda.jit(device=True)
def _put_params4(p, out, i, x0, x1, x2, x3, mixed):
    """Store four updated params, and their 16-bit copies when ``mixed``."""
    _store4(p, i, x0, x1, x2, x3)
    if mixed:
        _store4(out, i, _narrow(x0, out), _narrow(x1, out), _narrow(x2, out),
                _narrow(x3, out))


@cuda.jit(device=True)
def _put_param(p, out, i, x, mixed):
    p[i] = x
    if mixed:
        out[i] = _narrow(x, out)


# -- the restore of a skipped step that was handed an offset ------------------------------

@cuda.jit(device=True)
def _restore_elements(w, out, off, begin, stride, mixed):
    for i in range(begin, w.size, stride):
        _put_param(w, out, i, w[i] - off[i], mixed)


def _restore(w, out, off, begin, stride, mixed):
    """``w -= off`` over the grid's elements (nothing without an offset)."""
    if not isinstance(off, tuple):
        _restore_elements(w, out, off, begin, stride, mixed)


@overload(_restore, target="cuda")
def _restore_cuda(w, out, off, begin, stride, mixed):
    if isinstance(off, types.BaseTuple):
        return lambda w, out, off, begin, stride, mixed: None
    return lambda w, out, off, begin, stride, mixed: _restore_elements(
        w, out, off, begin, stride, mixed)


# -- one element's state slots ------------------------------------------------------

@cuda.jit(device=True)
def _load_slots(s0, s1, s2, i, p, nstate):
    """Element ``i`` of the first ``nstate`` slots; ``p`` for the others
    (never read from memory, handed back unchanged)."""
    a = s0[i] if nstate > 0 else p
    b = s1[i] if nstate > 1 else p
    d = s2[i] if nstate > 2 else p
    return a, b, d


@cuda.jit(device=True)
def _store_slots(s0, s1, s2, i, a, b, d, nstate):
    """Element ``i`` of the first ``nstate`` slots written."""
    if nstate > 0:
        s0[i] = a
    if nstate > 1:
        s1[i] = b
    if nstate > 2:
        s2[i] = d


# -- the scalar loop (whole kernel, or the tail after the vector loop) -------------------

@cuda.jit(device=True)
def _update_elements(w, g, s0, s1, s2, off, out, gs, begin, stride, c, flags, nstate, mixed):
    """Elements ``begin, begin + stride, ... < w.size``; the first
    ``nstate`` slots are read and written, the others never touched."""
    nstate = _slots_used(c, nstate)
    for i in range(begin, w.size, stride):
        p = _shift(w[i], off, i)
        a, b, d = _load_slots(s0, s1, s2, i, p, nstate)
        p, a, b, d = _step(c, p, _widen(g[i]) * gs, a, b, d, flags)
        _store_slots(s0, s1, s2, i, a, b, d, nstate)
        _put_param(w, out, i, p, mixed)


# -- kernels -------------------------------------------------------------------------
# ``w`` is what the step updates (the params, or their float32 master copy),
# ``g`` the gradients as stored, ``s0..s2`` the state slots (an unused one is
# any array of the compute dtype: ``w``), ``off`` an offset subtracted from
# ``w`` as it is read (``()``: none), ``out`` the 16-bit params written
# when ``mixed``. ``fc`` is the step's control block in the compute dtype:
# fc[0] multiplies the gradient (clip coefficient / loss scale), fc[1] != 0
# skips the step. ``c`` is the element function's NamedTuple of scalars in
# the compute dtype, ``grad_scale`` the maximize sign, ``flags`` the
# scalars.F_* bits, ``nstate`` how many slots are real: see ``update_args``
# in numba_cuda.py.
#
# The update comes as two kernels with the same arguments: the scalar one,
# and the ``_vec`` one for arrays that are all aligned for four-element
# vectors (grid-stride over groups of four, then the scalar loop over the
# last ``size % 4``). Two kernels, not one with a runtime flag: the vector
# loop's registers (60 vs 40 for fp32 Adam, ptxas for sm_90) would lower the
# scalar loop's occupancy too, and unaligned views then ran at 0.58 of the
# copy roofline on the H200 instead of 0.90. Each is compiled once per
# scalars type (optimizer) and dtypes.

@cuda.jit(cache=True)
def _update_kernel(w, g, s0, s1, s2, off, out, fc, c, grad_scale, flags, nstate, mixed):
    if fc[1]:       # the step was judged non-finite on the device: write nothing
        _restore(w, out, off, cuda.grid(1), cuda.gridsize(1), mixed)
        return
    _update_elements(w, g, s0, s1, s2, off, out, grad_scale * fc[0], cuda.grid(1),
                     cuda.gridsize(1), c, flags, nstate, mixed)


@cuda.jit(cache=True)
def _update_vec_kernel(w, g, s0, s1, s2, off, out, fc, c, grad_scale, flags, nstate, mixed):
    if fc[1]:
        _restore(w, out, off, cuda.grid(1), cuda.gridsize(1), mixed)
        return
    gs = grad_scale * fc[0]
    stride = cuda.gridsize(1)
    nstate = _slots_used(c, nstate)
    for j in range(cuda.grid(1), w.size // 4, stride):
        i = 4 * j
        g0, g1, g2, g3 = _load4(g, i)
        p0, p1, p2, p3 = _load4(w, i)
        p0, p1, p2, p3 = _shift4(p0, p1, p2, p3, off, i)
        a0, a1, a2, a3 = _load4(s0, i) if nstate > 0 else (p0, p1, p2, p3)
        b0, b1, b2, b3 = _load4(s1, i) if nstate > 1 else (p0, p1, p2, p3)
        d0, d1, d2, d3 = _load4(s2, i) if nstate > 2 else (p0, p1, p2, p3)
        p0, a0, b0, d0 = _step(c, p0, _widen(g0) * gs, a0, b0, d0, flags)
        p1, a1, b1, d1 = _step(c, p1, _widen(g1) * gs, a1, b1, d1, flags)
        p2, a2, b2, d2 = _step(c, p2, _widen(g2) * gs, a2, b2, d2, flags)
        p3, a3, b3, d3 = _step(c, p3, _widen(g3) * gs, a3, b3, d3, flags)
        if nstate > 0:
            _store4(s0, i, a0, a1, a2, a3)
        if nstate > 1:
            _store4(s1, i, b0, b1, b2, b3)
        if nstate > 2:
            _store4(s2, i, d0, d1, d2, d3)
        _put_params4(w, out, i, p0, p1, p2, p3, mixed)
    _update_elements(w, g, s0, s1, s2, off, out, gs, w.size - w.size % 4 + cuda.grid(1),
                     stride, c, flags, nstate, mixed)


# -- block reductions ------------------------------------------------------------------

@cuda.jit(device=True)
def _combine(a, b, largest):
    """``a + b``, or with ``largest`` the larger (a NaN on either side wins)."""
    if not largest:
        return a + b
    if b > a or b != b:
        return b
    return a


@cuda.jit(device=True)
def _block_reduce(acc, acc2, t, x, y, y_largest):
    """Over the block's THREADS threads: the sum of ``x`` into ``acc[0]``,
    and of ``y`` (``y_largest``: the largest ``y``) into ``acc2[0]``; two
    float64 shared arrays, a fixed tree order."""
    acc[t] = x
    acc2[t] = y
    cuda.syncthreads()
    half = THREADS // 2
    while half > 0:
        if t < half:
            acc[t] += acc[t + half]
            acc2[t] = _combine(acc2[t], acc2[t + half], y_largest)
        cuda.syncthreads()
        half //= 2


@cuda.jit(device=True)
def _add_partials(xs, ys, lo, hi, acc, acc2, y_largest):
    """``xs[lo:hi]`` summed, and ``ys[lo:hi]`` summed (``y_largest``: the
    largest), by the block's threads (each a fixed strided share, then the
    tree) into ``acc[0]`` / ``acc2[0]``: a fixed order, whatever the grid."""
    t = cuda.threadIdx.x
    sx = np.float64(0.0)
    sy = np.float64(0.0)
    for k in range(lo + t, hi, THREADS):
        sx += xs[k]
        sy = _combine(sy, np.float64(ys[k]), y_largest)
    _block_reduce(acc, acc2, t, sx, sy, y_largest)


def _weigh(a, w, i):
    """``a`` times ``w[i]`` in float64, or ``a`` for ``w = ()`` (no weights)."""
    return a if isinstance(w, tuple) else a * np.float64(_widen(w[i]))


@overload(_weigh, target="cuda")
def _weigh_cuda(a, w, i):
    if isinstance(w, types.BaseTuple):
        return lambda a, w, i: a
    return lambda a, w, i: a * np.float64(_widen(w[i]))


@cuda.jit(device=True)
def _sumsq_partial(x, w, partial, bad, offset):
    """Stage 1: one float64 partial sum of squares of ``x`` (times ``w``
    elementwise, unless ``w`` is ``()``) and a non-finite flag per block,
    reduced in shared memory in a fixed tree order.

    Each thread keeps four loads in flight (four independent accumulators
    over four grid strides): with one load per iteration the memory system
    sat idle and the pass read 0.8 TB/s on an H200."""
    acc = cuda.shared.array(THREADS, types.float64)
    flag = cuda.shared.array(THREADS, types.float64)
    t = cuda.threadIdx.x
    n = x.size
    stride = cuda.gridsize(1)
    i = cuda.grid(1)
    s0 = np.float64(0.0)
    s1 = np.float64(0.0)
    s2 = np.float64(0.0)
    s3 = np.float64(0.0)
    f = np.float64(0.0)
    while i + 3 * stride < n:
        a0 = _weigh(np.float64(_widen(x[i])), w, i)
        a1 = _weigh(np.float64(_widen(x[i + stride])), w, i + stride)
        a2 = _weigh(np.float64(_widen(x[i + 2 * stride])), w, i + 2 * stride)
        a3 = _weigh(np.float64(_widen(x[i + 3 * stride])), w, i + 3 * stride)
        s0 += a0 * a0
        s1 += a1 * a1
        s2 += a2 * a2
        s3 += a3 * a3
        if not (math.isfinite(a0) and math.isfinite(a1) and math.isfinite(a2)
                and math.isfinite(a3)):
            f = np.float64(1.0)
        i += 4 * stride
    while i < n:
        a0 = _weigh(np.float64(_widen(x[i])), w, i)
        s0 += a0 * a0
        if not math.isfinite(a0):
            f = np.float64(1.0)
        i += stride
    _block_reduce(acc, flag, t, (s0 + s1) + (s2 + s3), f, True)
    if t == 0:
        partial[offset + cuda.blockIdx.x] = acc[0]
        bad[offset + cuda.blockIdx.x] = np.int32(flag[0] != 0.0)


@cuda.jit(cache=True)
def _sumsq_partial_kernel(x, partial, bad, offset):
    """Stage 1 of the global norm (see ``_sumsq_partial``)."""
    _sumsq_partial(x, (), partial, bad, offset)


@cuda.jit(cache=True)
def _weighted_sumsq_partial_kernel(x, w, partial, bad, offset):
    """Stage 1 of the norm of ``x * w`` (adaptive SAM's ``|p| g``)."""
    _sumsq_partial(x, w, partial, bad, offset)


@cuda.jit(cache=True)
def _finalize_kernel(partial, bad, count, ctrl64, ctrl32, max_norm, inv_scale, check):
    """Stage 2 (one block of THREADS): add the partials (each thread a fixed
    strided share, then the shared-memory tree), then thread 0 decides the
    clip coefficient and the skip on the device. One thread adding ~1000
    partials alone waited on each load in turn: 0.2 ms on an H200.

    ctrl64 = [sum of squares, norm of the unscaled grads, grad factor, skip];
    ctrl32 = [grad factor, skip] for the float32 kernels.
    """
    acc = cuda.shared.array(THREADS, types.float64)
    flag = cuda.shared.array(THREADS, types.float64)
    _add_partials(partial, bad, 0, count, acc, flag, True)     # flags: any is the largest
    if cuda.threadIdx.x != 0:
        return
    total = acc[0]
    anybad = flag[0]
    norm = math.sqrt(total) * inv_scale
    coef = np.float64(1.0)
    if max_norm > 0.0:
        c = max_norm / (norm + 1e-6)    # torch's clip_grad_norm_ factor
        if c < 1.0 or c != c:
            coef = c
    skip = np.float64(1.0) if (check and anybad != 0) else np.float64(0.0)
    factor = coef * inv_scale
    ctrl64[0] = total
    ctrl64[1] = norm
    ctrl64[2] = factor
    ctrl64[3] = skip
    ctrl32[0] = np.float32(factor)
    ctrl32[1] = np.float32(skip)


# -- two-phase steps over pieces: per-array sums, factors, then the weights ---------------
# An array is cut in pieces of at most PIECE elements (a piece never spans
# two arrays); ``plo[j]:phi[j]`` is piece ``j``'s element range, ``pk[j]``
# its array, ``pfirst[k]:pfirst[k + 1]`` array ``k``'s pieces. Each block
# takes whole pieces (grid-stride over them), its threads stride through a
# piece's elements, and the shared-memory tree adds their sums: a piece's
# sums, and so every factor, depend on PIECE and THREADS only, never on the
# grid (no float atomics). Built once per layout by ``numba_cuda.pieces``.

#: elements per piece (the simulator gets small pieces so tests span several)
PIECE = 2 * THREADS if getattr(config, "ENABLE_CUDASIM", False) else 32 * THREADS


@cuda.jit(cache=True)
def _sums_kernel(w, g, s0, s1, s2, off, fc, c, grad_scale, flags, nstate, plo, phi, psx,
                 psy):
    """Phase one: the state updated; piece ``j``'s two float64 sums of
    squares in ``psx[j]``, ``psy[j]``."""
    if fc[1]:
        return
    acc = cuda.shared.array(THREADS, types.float64)
    acc2 = cuda.shared.array(THREADS, types.float64)
    t = cuda.threadIdx.x
    gs = grad_scale * fc[0]
    nstate = _slots_used(c, nstate)
    for j in range(cuda.blockIdx.x, plo.size, cuda.gridDim.x):
        sx = np.float64(0.0)
        sy = np.float64(0.0)
        for i in range(plo[j] + t, phi[j], THREADS):
            p = _shift(w[i], off, i)
            a, b, d = _load_slots(s0, s1, s2, i, p, nstate)
            a, b, d, x, y = _phase_one(c, p, _widen(g[i]) * gs, a, b, d, flags)
            _store_slots(s0, s1, s2, i, a, b, d, nstate)
            x64 = np.float64(x)
            y64 = np.float64(y)
            sx += x64 * x64
            sy += y64 * y64
        _block_reduce(acc, acc2, t, sx, sy, False)
        if t == 0:
            psx[j] = acc[0]
            psy[j] = acc2[0]


@cuda.jit(cache=True)
def _factors_kernel(psx, psy, pfirst, factor, fc, c):
    """Array ``k``'s factor from its pieces' sums (a block per array),
    stored in the compute dtype."""
    if fc[1]:
        return
    acc = cuda.shared.array(THREADS, types.float64)
    acc2 = cuda.shared.array(THREADS, types.float64)
    for k in range(cuda.blockIdx.x, factor.size, cuda.gridDim.x):
        _add_partials(psx, psy, pfirst[k], pfirst[k + 1], acc, acc2, False)
        if cuda.threadIdx.x == 0:
            factor[k] = _array_factor(c, acc[0], acc2[0])


@cuda.jit(cache=True)
def _finish_kernel(w, s0, s1, s2, off, out, fc, c, flags, nstate, mixed, plo, phi, pk,
                   factor):
    """Phase two: each piece's weights with its array's factor."""
    if fc[1]:
        _restore(w, out, off, cuda.grid(1), cuda.gridsize(1), mixed)
        return
    t = cuda.threadIdx.x
    nstate = _slots_used(c, nstate)
    for j in range(cuda.blockIdx.x, plo.size, cuda.gridDim.x):
        f = factor[pk[j]]
        for i in range(plo[j] + t, phi[j], THREADS):
            p = _shift(w[i], off, i)
            a, b, d = _load_slots(s0, s1, s2, i, p, nstate)
            _put_param(w, out, i, _phase_two(c, p, a, b, d, flags, f), mixed)


@cuda.jit(cache=True)
def _scale_kernel(x, fc, c):
    if fc[1]:       # the step was judged non-finite on the device: write nothing
        return
    cc = c * fc[0]
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        x[i] *= cc


@cuda.jit(cache=True)
def _convert_kernel(src, dst):
    """widen (16-bit -> float32) or narrow (float32 -> 16-bit), by dtype."""
    for i in range(cuda.grid(1), dst.size, cuda.gridsize(1)):
        dst[i] = _narrow(_widen(src[i]), dst)


#: the optimizers the update kernels step, by name: their element scalars' type
ELEMENTS = {"adam": AdamElement, "sgd": SGDElement, "rmsprop": RMSpropElement,
            "adagrad": AdagradElement, "lion": LionElement, "adamax": AdamaxElement,
            "nadam": NAdamElement, "radam": RAdamElement}
#: the two-phase ones (the sums, factors and finish kernels), by name
TWO_PHASE_ELEMENTS = {"lamb": LAMBElement}

#: every kernel specialization, for the PTX checks: name -> (dispatcher,
#: "elementwise"|"reduction"); "<optimizer>" and "<optimizer>_vec" are the
#: two update kernels compiled for that optimizer's element function,
#: "<optimizer>_shifted" those with an offset buffer (SAM's restore fused
#: into the step); "<optimizer>_sums/_factors/_finish" a two-phase step's
KERNELS = {
    **{name: (_update_kernel, "elementwise") for name in ELEMENTS},
    **{name + "_vec": (_update_vec_kernel, "elementwise") for name in ELEMENTS},
    "adam_shifted": (_update_kernel, "elementwise"),
    "adam_vec_shifted": (_update_vec_kernel, "elementwise"),
    **{name + "_sums": (_sums_kernel, "reduction") for name in TWO_PHASE_ELEMENTS},
    **{name + "_factors": (_factors_kernel, "reduction") for name in TWO_PHASE_ELEMENTS},
    **{name + "_finish": (_finish_kernel, "elementwise") for name in TWO_PHASE_ELEMENTS},
    **{name + "_finish_shifted": (_finish_kernel, "elementwise")
       for name in TWO_PHASE_ELEMENTS},
    "scale": (_scale_kernel, "elementwise"),
    "convert": (_convert_kernel, "elementwise"),
    "sumsq_partial": (_sumsq_partial_kernel, "reduction"),
    "weighted_sumsq_partial": (_weighted_sumsq_partial_kernel, "reduction"),
    "finalize": (_finalize_kernel, "reduction"),
}

#: the type of ``off`` when a kernel is given no offset
NO_OFFSET = types.Tuple(())


def ptx_signatures(dtype="float32", storage=None):
    """Kernel name -> argument types for ``compile_ptx``, for params and state
    in ``dtype`` and grads/params storage ``storage`` (default ``dtype``;
    "float16", or "uint16" for bfloat16 bits, with a float32 ``dtype``).
    The update kernels' scalars are their element NamedTuple of ``dtype``
    values, as ``update_args`` in numba_cuda.py passes them."""
    c = getattr(types, dtype)
    st = getattr(types, storage or dtype)
    A, S = c[::1], st[::1]
    ctl = (c, types.int64, types.int64, types.boolean)   # grad_scale, flags, nstate, mixed
    f64, i32, i64 = types.float64[::1], types.int32[::1], types.int64[::1]

    def scalars(kind):
        return types.NamedUniTuple(c, len(kind._fields), kind)

    sigs = {}
    for name, kind in ELEMENTS.items():
        sigs[name] = sigs[name + "_vec"] = (A, S, A, A, A, NO_OFFSET, S, A,
                                            scalars(kind)) + ctl
    sigs["adam_shifted"] = sigs["adam_vec_shifted"] = (A, S, A, A, A, A, S, A,
                                                       scalars(AdamElement)) + ctl
    for name, kind in TWO_PHASE_ELEMENTS.items():
        sigs[name + "_sums"] = (A, S, A, A, A, NO_OFFSET, A, scalars(kind), c, types.int64,
                                types.int64, i64, i64, f64, f64)
        sigs[name + "_factors"] = (f64, f64, i64, A, A, scalars(kind))
        for suffix, off in (("_finish", NO_OFFSET), ("_finish_shifted", A)):
            sigs[name + suffix] = (A, A, A, A, off, S, A, scalars(kind), types.int64,
                                   types.int64, types.boolean, i64, i64, i64, A)
    return sigs | {
        "scale": (A, A, c),
        "convert": (S, A) if st != c else (A, A),
        "sumsq_partial": (S, f64, i32, types.int64),
        "weighted_sumsq_partial": (S, S, f64, i32, types.int64),
        "finalize": (f64, i32, types.int64, f64, types.float32[::1], types.float64,
                     types.float64, types.boolean),
    }
