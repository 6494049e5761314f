# Included by kernels_impl.pxi (after the generic drivers): the compact-state
# loops, kept in a file of their own.

# -- compact state (fastopt/backends/compact.py) ---------------------------------
# The same element function over state held as codes, inlined with constant
# flags like the float path. bfloat16 needs no blocks: each value is decoded,
# updated and rounded back inside the element loop (``_span_bf16``: one pass,
# no scratch, the rounding hash on uint32 lanes). 8-bit state is stepped a
# block at a time (``_span_q8``): each slot decoded into L1 scratch, the
# float loop over it, then each slot's new absmax and its codes. (Decoding
# inside the update loop measured slower: with 8-bit codes in it gcc runs
# that loop 64 lanes at a time and spills.) Rounding is stochastic, with each
# element's index in the group's buffer. ``Layout`` picks the loop per piece.


cdef struct Compact:
    int kind            # STATE_BF16 or STATE_8BIT
    int nslots          # state buffers the element function reads (1..3)
    void* codes[3]      # uint16 bits; int8 (signed) or uint8 (unsigned) codes
    float* absmax[3]    # 8-bit: one float32 per block of the buffer
    unsigned int key[3]     # the rounding key of each buffer
    int is_signed[3]    # 8-bit: int8 codes (else uint8)


cdef inline void _span_state(Op* op, Layout* lay, floating* p, const storage* g,
                             storage* out, floating* s0, floating* s1, floating* s2,
                             const Compact* cs, float* scratch, Py_ssize_t o, Py_ssize_t n,
                             const floating* c, floating gs, int flags) noexcept nogil:
    # float state at s0..s2, or compact state from element ``o`` of the
    # group's buffers (float32 compute only: cython_cpu checks)
    if Layout is FloatState:
        _span(op, p, g, out, s0, s1, s2, n, c, gs, flags)
    elif floating is float:
        if Layout is Bf16State:
            _span_bf16(op, p, g, out, cs, o, n, c, gs, flags)
        else:
            _span_q8(op, p, g, out, cs, scratch, o, n, c, gs, flags)


cdef inline void _span_bf16(Op* op, float* p, const storage* g, storage* out,
                            const Compact* cs, Py_ssize_t o, Py_ssize_t n, const float* c,
                            float gs, int flags) noexcept nogil:
    cdef int ns = _nslots(op, flags)
    cdef unsigned short* h0 = <unsigned short*>cs.codes[0] + o
    cdef unsigned short* h1 = <unsigned short*>cs.codes[1 if ns > 1 else 0] + o
    cdef unsigned short* h2 = <unsigned short*>cs.codes[2 if ns > 2 else 0] + o
    cdef unsigned int k0 = cs.key[0]
    cdef unsigned int k1 = cs.key[1] if ns > 1 else 0
    cdef unsigned int k2 = cs.key[2] if ns > 2 else 0
    cdef unsigned int idx = <unsigned int>o     # the rounding index (32 bits, wraps)
    cdef Py_ssize_t i
    cdef float gi, pi, a, b = 0, d = 0
    for i in range(n):      # idx: its own uint32 counter, so one vector add per lane set
        gi = _load(g, i, gs) * gs
        pi = p[i]
        a = fo_bf16_to_f32(h0[i])
        if ns > 1:
            b = fo_bf16_to_f32(h1[i])
        if ns > 2:
            d = fo_bf16_to_f32(h2[i])
        _elem(op, &pi, gi, &a, &b, &d, c, flags)
        p[i] = pi
        _store(out, i, pi)
        h0[i] = fo_bf16_sr(a, k0, idx)
        if ns > 1:
            h1[i] = fo_bf16_sr(b, k1, idx)
        if ns > 2:
            h2[i] = fo_bf16_sr(d, k2, idx)
        idx += 1


cdef inline unsigned int _absmax_bits(const float* x, Py_ssize_t m) noexcept nogil:
    # a block's absmax as bits: an integer max (their order is |x|'s, NaN on top)
    cdef unsigned int top = 0, b
    cdef Py_ssize_t i
    for i in range(m):
        b = fo_abs_bits(x[i])
        top = b if b > top else top
    return top


cdef inline void _decode_q8(const unsigned char* codes, float* x, Py_ssize_t m, bint is_signed,
                            float scale) noexcept nogil:
    # a loop per grid, its constants immediates (with the grid a variable,
    # the 8-bit AdamW step measured 1.97 ns per element instead of 1.67)
    cdef Py_ssize_t i
    if is_signed:
        for i in range(m):
            x[i] = fo_q8_decode(codes[i], fo_q8_grid_of(1), scale)
    else:
        for i in range(m):
            x[i] = fo_q8_decode(codes[i], fo_q8_grid_of(0), scale)


cdef inline void _encode_q8(const float* x, unsigned char* codes, Py_ssize_t m, float* absmax,
                            bint is_signed, unsigned int key, unsigned int at) noexcept nogil:
    # one block of one slot: its new absmax, then its codes
    cdef Py_ssize_t i
    cdef float scale = fo_f32_from_bits(_absmax_bits(x, m))
    absmax[0] = scale
    if not scale > 0:          # all zero (or a NaN block): code 0, as compact.py
        for i in range(m):
            codes[i] = 0
    elif is_signed:            # the rounding index: a uint32 counter of its own
        for i in range(m):
            codes[i] = fo_q8_encode(x[i], scale, fo_q8_grid_of(1), fo_sr_bits(key, at))
            at += 1
    else:
        for i in range(m):
            codes[i] = fo_q8_encode(x[i], scale, fo_q8_grid_of(0), fo_sr_bits(key, at))
            at += 1


cdef inline void _span_q8(Op* op, float* p, const storage* g, storage* out,
                          const Compact* cs, float* scratch, Py_ssize_t o, Py_ssize_t n,
                          const float* c, float gs, int flags) noexcept nogil:
    # ``o``: a multiple of BLOCK (compact.block_offsets and the table's
    # pieces); ``scratch``: 3 * BLOCK floats, a block's values per slot
    cdef int ns = _nslots(op, flags)
    cdef int s1 = 1 if ns > 1 else 0, s2 = 2 if ns > 2 else 0
    cdef unsigned char* u0 = <unsigned char*>cs.codes[0] + o
    cdef unsigned char* u1 = <unsigned char*>cs.codes[s1] + o
    cdef unsigned char* u2 = <unsigned char*>cs.codes[s2] + o
    cdef float* a0 = cs.absmax[0] + o // BLOCK
    cdef float* a1 = cs.absmax[s1] + o // BLOCK
    cdef float* a2 = cs.absmax[s2] + o // BLOCK
    cdef float* x0 = scratch
    cdef float* x1 = scratch + BLOCK
    cdef float* x2 = scratch + 2 * BLOCK
    cdef float sc0, sc1 = 0, sc2 = 0
    cdef Py_ssize_t lo = 0, m, k
    while lo < n:
        m = min(<Py_ssize_t>BLOCK, n - lo)
        k = lo // BLOCK
        sc0 = a0[k]
        if ns > 1:
            sc1 = a1[k]
        if ns > 2:
            sc2 = a2[k]
        _decode_q8(u0 + lo, x0, m, cs.is_signed[0], sc0)
        if ns > 1:
            _decode_q8(u1 + lo, x1, m, cs.is_signed[s1], sc1)
        if ns > 2:
            _decode_q8(u2 + lo, x2, m, cs.is_signed[s2], sc2)
        _span(op, p + lo, g + lo, _off(out, lo), x0, x1, x2, m, c, gs, flags)
        _encode_q8(x0, u0 + lo, m, a0 + k, cs.is_signed[0], cs.key[0], <unsigned int>(o + lo))
        if ns > 1:
            _encode_q8(x1, u1 + lo, m, a1 + k, cs.is_signed[s1], cs.key[s1],
                       <unsigned int>(o + lo))
        if ns > 2:
            _encode_q8(x2, u2 + lo, m, a2 + k, cs.is_signed[s2], cs.key[s2],
                       <unsigned int>(o + lo))
        lo += BLOCK
