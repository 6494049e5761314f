# Included by kernels_impl.pxi (after the generic drivers): the compact-state
# loops, kept in a file of their own.

# -- compact state (fastopt/backends/compact.py) ---------------------------------
# The same element function over state held as codes, inlined with constant
# flags like the float path. bfloat16 needs no blocks: each value is decoded,
# updated and rounded back inside the element loop (``_span_bf16``: one pass,
# no scratch, the rounding hash on uint32 lanes). 8-bit state is stepped a
# block at a time (``_span_q8``), in three loops over L1: each slot's codes
# decoded into scratch, the element loop over the scratch finding each
# slot's new absmax as it goes, then each slot's codes. (Decoding inside the
# element loop measured 3% faster on x86-64-v4 but 10% slower on v3: with
# 8-bit codes in it gcc runs it 64 lanes at a time, and 16 registers spill.)
# Rounding is stochastic, with each element's index in the group's buffer.
# ``Layout`` picks the loop per piece.

# The 8-bit codecs, as compact.py computes them, in forms that vectorise
# with few operations (each one measured; together, one thread in cache, the
# 8-bit AdamW step went from 4.6x the float32 step's time to 3.0x on
# x86-64-v4, from 22x to 3.5x on x86-64-v3, whose encoding loops had stayed
# scalar, and from 13x to 4.3x on the portable build: docs/performance.md).
cdef extern from *:
    """
    /* One 8-bit grid's constants: signed (int8 codes of first moments) or
       unsigned (uint8 codes of second moments). The loops pass a constant
       grid, so its fields are immediates. */
    typedef struct {
        uint32_t low_field;     /* the lowest binade's float exponent field: 113 / 97 */
        uint32_t top;           /* the largest code magnitude (x = 1): 120 / 248 */
        uint32_t is_signed;     /* int8 codes with a sign (else uint8, never 0 for x > 0) */
        float edge;             /* 2**(low_field - 127): linear steps below it */
        float sub_scale;        /* 2**(150 - low_field): x in 2**-20 steps of its grid's ulp */
        uint32_t inf_mag;       /* the code magnitude of inf (compact.SIGNED_INF): 127 / 255 */
    } fo_q8_map;
    static inline fo_q8_map fo_q8_map_of(int is_signed) {
        fo_q8_map s = {113u, 120u, 1u, 0x1p-14f, 0x1p37f, 127u};
        fo_q8_map u = {97u, 248u, 0u, 0x1p-30f, 0x1p53f, 255u};
        return is_signed ? s : u;
    }
    /* A block's absmax bits without its infinities (which have a code of
       their own), where its plain maximum was inf: a rare second pass, as a
       select inside the element loop's max kept gcc from vectorising it
       (the 8-bit AdamW step took 2-3.5x as long) */
    static inline uint32_t fo_top_without_inf(const float* x, Py_ssize_t m) {
        uint32_t top = 0u;
        for (Py_ssize_t i = 0; i < m; i++) {
            uint32_t b = fo_bits_from_f32(x[i]) & 0x7FFFFFFFu;
            b = b == 0x7F800000u ? 0u : b;
            top = b > top ? b : top;
        }
        return top;
    }
    /* The value of a code (c: an int8 code sign-extended, or a uint8 one) in
       a block of absmax scale. A magnitude of 8 or more is a float whose
       exponent and mantissa fields are the code's shifted; below 8, linear
       steps of the lowest binade's ulp, 2 * that float - edge (exact). */
    static inline float fo_q8_value(int32_t c, fo_q8_map q, float scale) {
        uint32_t mag = (uint32_t)(c < 0 ? -c : c);
        float f = fo_f32_from_bits((mag << 20) + ((q.low_field - 1u) << 23));
        uint32_t v = fo_sel(mag >= 8u, fo_bits_from_f32(f), fo_bits_from_f32(f * 2.0f - q.edge));
        uint32_t sign = (uint32_t)c & 0x80000000u;
        uint32_t value = fo_bits_from_f32(fo_f32_from_bits(v | sign) * scale);
        /* the code of inf: inf whatever the scale. On bits, as every select
           here: a ?: on floats, gcc sank the multiply into a branch and ran
           every 8-bit codec loop scalar without masked vectors (the
           x86-64-v3 and portable builds: the 8-bit AdamW step 0.10x torch's speed) */
        return fo_f32_from_bits(fo_sel(mag == q.inf_mag, 0x7F800000u | sign, value));
    }
    /* The rounding hash split for a block: index base + i (base a multiple
       of 256, i < 256) xor key is ((base ^ key) & ~0xFF) + ((i ^ key) & 0xFF),
       so its product with the multiplier is a per-block constant plus a
       per-key row entry (the rows are made once per piece). */
    static inline uint32_t fo_sr_row(uint32_t key, uint32_t i) {
        return ((i ^ key) & 0xFFu) * 0x9E3779B1u;
    }
    static inline uint32_t fo_sr_block(uint32_t key, uint32_t base) {
        return ((base ^ key) & ~0xFFu) * 0x9E3779B1u;
    }
    /* fo_sr_bits' 16 bits of the product h, shifted up by 4: 20-bit random
       steps below a 3-bit mantissa */
    static inline uint32_t fo_sr_rnd20(uint32_t h) {
        return (h >> 12) & 0xFFFF0u;
    }
    /* The code (low 8 bits) of x in a block of absmax scale > 0, rounded up
       with the probability of the dropped bits (rnd: 20 random bits). */
    static inline uint32_t fo_q8_code_of(float x, float scale, fo_q8_map q, uint32_t rnd) {
        uint32_t xb = fo_bits_from_f32(x);
        float rel = fo_f32_from_bits(xb & 0x7FFFFFFFu) / scale;
        uint32_t b = fo_abs_bits(rel), eb = fo_bits_from_f32(q.edge);
        /* below the lowest binade: x counted in 2**-20 steps of its ulp, exact
           (clamped to the edge as integers, so that the float work feeds no
           select: gcc would sink it into a branch and not vectorise) */
        uint32_t steps = (uint32_t)(int32_t)(fo_f32_from_bits(b < eb ? b : eb) * q.sub_scale);
        /* at or above it: the float's exponent and top 3 mantissa bits, the
           exponent counted from the lowest binade (code 8). No select: as
           int32, this is negative below the binade under the lowest, below
           steps in that binade (there steps = 2**22 + mantissa / 2), and at
           or above steps = 2**23 from the lowest binade up (NaN included) */
        int32_t above = (int32_t)(b - ((q.low_field - 1u) << 23));
        uint32_t t = (uint32_t)(above > (int32_t)steps ? above : (int32_t)steps);
        uint32_t code = (t + rnd) >> 20;
        uint32_t sign = (uint32_t)((int32_t)xb >> 31);
        if (!q.is_signed) {     /* a positive value never gets code 0 */
            uint32_t nonzero = b != 0u;
            code = code > nonzero ? code : nonzero;
        }
        code = code < q.top ? code : q.top;
        code = fo_sel((xb & 0x7FFFFFFFu) == 0x7F800000u, q.inf_mag, code);   /* inf: its own */
        return q.is_signed ? (code ^ sign) - sign : code;
    }
    /* The code of x in a block whose absmax is 0 or NaN: 0, or inf's own */
    static inline uint32_t fo_q8_code_of_unscaled(float x, fo_q8_map q) {
        uint32_t xb = fo_bits_from_f32(x);
        uint32_t sign = (uint32_t)((int32_t)xb >> 31);
        uint32_t code = (xb & 0x7FFFFFFFu) == 0x7F800000u ? q.inf_mag : 0u;
        return q.is_signed ? (code ^ sign) - sign : code;
    }
    """
    ctypedef struct fo_q8_map:
        pass
    fo_q8_map fo_q8_map_of(int is_signed) noexcept nogil
    float fo_q8_value(int c, fo_q8_map q, float scale) noexcept nogil
    unsigned int fo_sr_row(unsigned int key, unsigned int i) noexcept nogil
    unsigned int fo_sr_block(unsigned int key, unsigned int base) noexcept nogil
    unsigned int fo_sr_rnd20(unsigned int h) noexcept nogil
    unsigned int fo_q8_code_of(float x, float scale, fo_q8_map q, unsigned int rnd) noexcept nogil
    unsigned int fo_q8_code_of_unscaled(float x, fo_q8_map q) noexcept nogil
    unsigned int fo_top_without_inf(const float* x, Py_ssize_t m) noexcept nogil


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


cdef inline void _decode_q8(const void* codes, float* x, Py_ssize_t m, bint is_signed,
                            float scale) noexcept nogil:
    # a loop per grid, its constants immediates (with the grid a variable,
    # the 8-bit AdamW step measured 1.97 ns per element instead of 1.67)
    cdef Py_ssize_t i
    if is_signed:
        for i in range(m):
            x[i] = fo_q8_value((<const signed char*>codes)[i], fo_q8_map_of(1), scale)
    else:
        for i in range(m):
            x[i] = fo_q8_value((<const unsigned char*>codes)[i], fo_q8_map_of(0), scale)


cdef inline void _encode_q8(const float* x, unsigned char* codes, Py_ssize_t m, float scale,
                            bint is_signed, unsigned int key, unsigned int at,
                            const unsigned int* rows) noexcept nogil:
    # one block of one slot against its new absmax ``scale``; ``at``: the
    # block's first rounding index, ``rows``: the key's hash rows
    cdef Py_ssize_t i
    cdef unsigned int h = fo_sr_block(key, at)
    if not scale > 0:          # all zero (or a NaN block): code 0, as compact.py
        for i in range(m):     # (inf's own code kept)
            codes[i] = fo_q8_code_of_unscaled(x[i], fo_q8_map_of(is_signed))
    elif is_signed:
        for i in range(m):
            codes[i] = fo_q8_code_of(x[i], scale, fo_q8_map_of(1), fo_sr_rnd20(h + rows[i]))
    else:
        for i in range(m):
            codes[i] = fo_q8_code_of(x[i], scale, fo_q8_map_of(0), fo_sr_rnd20(h + rows[i]))


cdef inline void _span_absmax(Op* op, float* p, const storage* g, storage* out, float* x0,
                              float* x1, float* x2, Py_ssize_t n, const float* c, float gs,
                              int flags, unsigned int* top) noexcept nogil:
    # ``_span`` over the slots' scratch, with each slot's new absmax as bits
    # (an integer max: their order is |x|'s, NaN on top) in ``top``
    cdef int ns = _nslots(op, flags)
    cdef Py_ssize_t i
    cdef float gi, pi, a, b = 0, d = 0
    cdef unsigned int t0 = 0, t1 = 0, t2 = 0, u
    for i in range(n):
        gi = _load(g, i, gs) * gs
        pi = p[i]
        a = x0[i]
        if ns > 1:
            b = x1[i]
        if ns > 2:
            d = x2[i]
        _elem(op, &pi, gi, &a, &b, &d, c, flags)
        p[i] = pi
        _store(out, i, pi)
        x0[i] = a
        u = fo_abs_bits(a)
        t0 = u if u > t0 else t0
        if ns > 1:
            x1[i] = b
            u = fo_abs_bits(b)
            t1 = u if u > t1 else t1
        if ns > 2:
            x2[i] = d
            u = fo_abs_bits(d)
            t2 = u if u > t2 else t2
    top[0] = t0
    top[1] = t1
    top[2] = t2


cdef inline void _span_q8(Op* op, float* p, const storage* g, storage* out,
                          const Compact* cs, float* scratch, Py_ssize_t o, Py_ssize_t n,
                          const float* c, float gs, int flags) noexcept nogil:
    # ``o``: a multiple of BLOCK (compact.block_offsets and the table's
    # pieces); ``scratch``: 3 * BLOCK floats, a block's values per slot
    cdef int ns = _nslots(op, flags)
    cdef unsigned char* u[3]
    cdef float* a[3]
    cdef float* x[3]
    cdef unsigned int rows[3 * BLOCK]
    cdef unsigned int top[3]
    cdef float scale
    cdef Py_ssize_t lo = 0, m, k, i, nrows = min(<Py_ssize_t>BLOCK, n)
    cdef int s
    for s in range(3):
        x[s] = scratch + s * BLOCK
    for s in range(ns):
        u[s] = <unsigned char*>cs.codes[s] + o
        a[s] = cs.absmax[s] + o // BLOCK
        for i in range(nrows):
            rows[s * BLOCK + i] = fo_sr_row(cs.key[s], <unsigned int>i)
    while lo < n:
        m = min(<Py_ssize_t>BLOCK, n - lo)
        k = lo // BLOCK
        for s in range(ns):
            _decode_q8(u[s] + lo, x[s], m, cs.is_signed[s], a[s][k])
        _span_absmax(op, p + lo, g + lo, _off(out, lo), x[0], x[1], x[2], m, c, gs, flags,
                     top)
        for s in range(ns):
            if top[s] == 0x7F800000u:      # inf: its own code, not the scale
                top[s] = fo_top_without_inf(x[s], m)
            scale = fo_f32_from_bits(top[s])
            a[s][k] = scale
            _encode_q8(x[s], u[s] + lo, m, scale, cs.is_signed[s], cs.key[s],
                       <unsigned int>(o + lo), rows + s * BLOCK)
        lo += BLOCK
