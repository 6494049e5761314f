"""Cython kernels: the optimizer steps over step tables, and the
functional API's loops over one array.

A ``nogil`` helper updates ``[start, stop)`` of raw pointers (a plain loop
gcc vectorises with ``-O3 -fno-math-errno``). An optimizer step runs its
table's tasks on fastopt's own thread team (``pool_impl.pxi``); the
functional API's entry points run fixed chunks under
``prange(schedule='static')`` (OpenMP). The Python wrapper
(``cython_cpu.py``) has already validated every index and shape, so bounds
and wraparound checks are off here.

This body is compiled three times (see setup.py): ``kernels`` for baseline
x86-64 (SSE2), ``kernels_v3`` for x86-64-v3 (AVX2 + FMA) and ``kernels_v4``
for x86-64-v4 (AVX-512), picked at import time by what the CPU reports, as
NumPy dispatches its own SIMD loops. The source is one; only the compiler's
target differs.
"""

import numpy as np

cimport numpy as cnp
from cython.parallel cimport prange
from libc.math cimport INFINITY, sqrt, sqrtf

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define FASTOPT_OPENMP 1
    static int fastopt_max_threads(void) { return omp_get_max_threads(); }
    #else
    #define FASTOPT_OPENMP 0
    static int fastopt_max_threads(void) { return 1; }
    #endif
    """
    int FASTOPT_OPENMP
    int fastopt_max_threads() nogil

# Where a step's workers run (fastopt's own team, pool_impl.pxi, or OpenMP's
# with FASTOPT_THREAD_POOL=openmp). Measured with OpenMP's team, whose
# closing barrier waited for each worker's share. In a NumPy training loop
# the step comes right after BLAS calls, and OpenBLAS's workers keep
# spinning (yielding) on the other cores for a while. A woken OpenMP worker
# is then often queued by the kernel on the core of the thread that woke it, the master, which is busy
# with its own share: the worker's share waits for it, and a threaded step
# took 0.5-1.9 ms instead of ~0.1 ms (MLP 784-256-256-10, 2 cores; the hot
# step suffered too once OpenBLAS had run). With each worker allowed every
# core but the master's current one it ran in 0.10-0.17 ms (measured with
# GOMP_CPU_AFFINITY, which pins the master too; fastopt never pins the
# user's thread). So before each job the master, when it has moved to
# another core (sched_getcpu, no system call), sets its workers' allowed
# cores to the process's minus its own; each worker notes its thread id once.
# A thread id is only used while it is a thread of this process (tgkill 0).
# Off where the user binds threads (OMP_PROC_BIND, OMP_PLACES,
# GOMP_CPU_AFFINITY) or sets FASTOPT_PLACE_WORKERS=0 (cython_cpu.py), and for
# teams above 8 threads (not measured there; see fo_place_team).
cdef extern from *:
    """
    #if defined(__linux__)
    #include <sched.h>
    #include <unistd.h>
    #include <sys/syscall.h>
    #define FO_PLACE_MAX_THREADS 8
    static int fo_place_on = 1;
    /* tids[1..nthreads-1]: the team's workers (0: not started yet);
       *master_cpu: where the master was when they were last placed */
    static void fo_place_team(const pid_t* tids, int nthreads, int* new_worker,
                              int* master_cpu) {
        cpu_set_t set;
        int cpu, i;
        pid_t me;
        /* measured on 2 cores only; a large team would pay a system call per
           worker each time the master moves, for a queueing the kernel
           rarely does when most cores are idle */
        if (!fo_place_on || nthreads < 2 || nthreads > FO_PLACE_MAX_THREADS) return;
        cpu = sched_getcpu();
        if (cpu < 0) return;
        /* taken and cleared in one step: a worker that notes its id after
           this is placed at the next job */
        if (!__atomic_exchange_n(new_worker, 0, __ATOMIC_ACQ_REL) && cpu == *master_cpu) return;
        *master_cpu = cpu;
        if (sched_getaffinity(0, sizeof set, &set) != 0 || CPU_COUNT(&set) < 2
                || !CPU_ISSET(cpu, &set)) return;
        CPU_CLR(cpu, &set);
        me = getpid();
        for (i = 1; i < nthreads; i++) {
            pid_t tid = __atomic_load_n(&tids[i], __ATOMIC_ACQUIRE);
            if (tid > 0 && syscall(SYS_tgkill, me, tid, 0) == 0)
                sched_setaffinity(tid, sizeof set, &set);
        }
    }
    #else
    static void fo_place_team(const pid_t* tids, int nthreads, int* new_worker,
                              int* master_cpu) {
        (void)tids; (void)nthreads; (void)new_worker; (void)master_cpu;
    }
    #endif
    #if defined(__linux__) && defined(_OPENMP)
    #define FO_MAX_WORKERS 1024
    /* OpenMP's team, when it runs a step (set_thread_pool(False)) */
    static pid_t fo_worker_tid[FO_MAX_WORKERS];
    static int fo_new_worker = 0, fo_master_cpu = -1, fo_pool_master_cpu = -1;
    static void fo_note_worker(int num) {
        if (fo_place_on && num > 0 && num < FO_MAX_WORKERS && fo_worker_tid[num] == 0) {
            __atomic_store_n(&fo_worker_tid[num], (pid_t)syscall(SYS_gettid), __ATOMIC_RELEASE);
            __atomic_store_n(&fo_new_worker, 1, __ATOMIC_RELEASE);
        }
    }
    static void fo_place_workers(int nthreads) {
        if (nthreads < FO_MAX_WORKERS)
            fo_place_team(fo_worker_tid, nthreads, &fo_new_worker, &fo_master_cpu);
    }
    #else
    static int fo_pool_master_cpu = -1;
    static void fo_note_worker(int num) { (void)num; }
    static void fo_place_workers(int nthreads) { (void)nthreads; }
    #endif
    #if defined(__linux__)
    static void fo_set_place_workers(int on) {
        fo_place_on = on;
    #if defined(_OPENMP)
        fo_master_cpu = -1;
    #endif
        fo_pool_master_cpu = -1;
    }
    #else
    static void fo_set_place_workers(int on) { (void)on; }
    #endif
    """
    void fo_note_worker(int num) nogil
    void fo_place_workers(int nthreads) nogil
    void fo_set_place_workers(int on) nogil


include "pool_impl.pxi"


def set_place_workers(bint on):
    """Keep a step's workers off the calling thread's core (see above)."""
    fo_set_place_workers(on)


# ``_span_unswitched`` inlines the driver loop once per flag value, where the
# constant flags make each copy branch-free so that it vectorises. gcc stops
# inlining ``inline`` functions once this large module has grown by its
# unit-growth limit, or a function by its own; a loop left out of line keeps
# its runtime flags and stays scalar. So ``_span_unswitched`` returns
# ``flattened``: gcc's ``flatten`` on a void function, which inlines every
# call in it, whatever the limits.
cdef extern from *:
    """
    #define FO_FLATTEN __attribute__((flatten)) void
    """
    ctypedef void flattened "FO_FLATTEN"

# 16-bit storage: bfloat16 arrives as a uint16 view, float16 as an int16 view
# (lowp.py explains the formulas; the Numba backend uses the same ones).
cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    static inline float fo_f32_from_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
    static inline uint32_t fo_bits_from_f32(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
    /* Branch-free select: with ?: gcc sinks the float work feeding one side
       into a branch (it may trap) and then will not vectorise the loop. */
    static inline uint32_t fo_sel(int c, uint32_t a, uint32_t b) {
        uint32_t m = 0u - (uint32_t)c; return (a & m) | (b & ~m);
    }
    static inline uint64_t fo_sel64(int c, uint64_t a, uint64_t b) {
        uint64_t m = 0ull - (uint64_t)c; return (a & m) | (b & ~m);
    }
    static inline double fo_f64_from_bits(uint64_t u) { double f; memcpy(&f, &u, 8); return f; }
    static inline uint64_t fo_bits_from_f64(double f) { uint64_t u; memcpy(&u, &f, 8); return u; }
    /* lr * sign(u), sign(+-0) = +-0 and a NaN staying NaN (lr * u there),
       from u's bits: as ?: on float compares, gcc sank u * lr into a branch
       and ran Lion scalar without masked vectors (the portable and x86-64-v3
       builds: 16M at 8% of the memory roofline, random gradient signs) */
    static inline float fo_sign_step_f32(float u, float lr) {
        uint32_t b = fo_bits_from_f32(u), a = b & 0x7FFFFFFFu;
        return fo_f32_from_bits(fo_sel(a - 1u >= 0x7F800000u, fo_bits_from_f32(u * lr),
                                       fo_bits_from_f32(lr) | (b & 0x80000000u)));
    }
    static inline double fo_sign_step_f64(double u, double lr) {
        uint64_t b = fo_bits_from_f64(u), a = b & 0x7FFFFFFFFFFFFFFFull;
        return fo_f64_from_bits(fo_sel64(a - 1u >= 0x7FF0000000000000ull, fo_bits_from_f64(u * lr),
                                         fo_bits_from_f64(lr) | (b & 0x8000000000000000ull)));
    }
    static inline float fo_bf16_to_f32(uint16_t h) { return fo_f32_from_bits((uint32_t)h << 16); }
    static inline uint16_t fo_f32_to_bf16(float x) {
        uint32_t b = fo_bits_from_f32(x);
        uint32_t r = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
        return (uint16_t)fo_sel((b & 0x7FFFFFFFu) > 0x7F800000u,
                                ((b >> 16) & 0x8000u) | 0x7FC0u, r);
    }
    static inline float fo_f16_to_f32(int16_t hs) {
        uint32_t u = (uint16_t)hs, em = u & 0x7FFFu;
        uint32_t f = fo_bits_from_f32(fo_f32_from_bits(em << 13) * 0x1p112f);
        f = fo_sel(em >= 0x7C00u, (em << 13) | 0x7F800000u, f);
        return fo_f32_from_bits(f | ((u & 0x8000u) << 16));
    }
    static inline int16_t fo_f32_to_f16(float x) {
        uint32_t b = fo_bits_from_f32(x), sign = (b >> 16) & 0x8000u, a = b & 0x7FFFFFFFu;
        uint32_t r = (a - (112u << 23) + 0xFFFu + ((a >> 13) & 1u)) >> 13;
        uint32_t sub = fo_bits_from_f32(fo_f32_from_bits(a) + 0.5f) - 0x3F000000u;
        uint32_t m = (a & 0x7FFFFFu) >> 13;
        r = fo_sel(a < 0x38800000u, sub, r);
        r = fo_sel(a >= 0x47800000u, 0x7C00u, r);
        r = fo_sel(a > 0x7F800000u, 0x7C00u | m | (uint32_t)(m == 0), r);
        return (int16_t)(uint16_t)(r | sign);
    }
    """
    float fo_sign_step_f32(float u, float lr) noexcept nogil
    double fo_sign_step_f64(double u, double lr) noexcept nogil
    float fo_bf16_to_f32(unsigned short h) noexcept nogil
    unsigned short fo_f32_to_bf16(float x) noexcept nogil
    float fo_f16_to_f32(short h) noexcept nogil
    short fo_f32_to_f16(float x) noexcept nogil

# Compact optimizer state: the bit helpers its C codecs share (the codecs
# themselves are in compact_impl.pxi; compact.py's NumPy functions are the
# specification, same bits).
cdef extern from *:
    """
    /* stochastic rounding to bfloat16: 16 random bits from (key, index),
       the top half of the Weyl product (compact.random_bits) */
    static inline uint32_t fo_sr_bits(uint32_t key, uint32_t index) {
        return ((index ^ key) * 0x9E3779B1u) >> 16;
    }
    static inline uint16_t fo_bf16_sr(float x, uint32_t key, uint32_t index) {
        /* a NaN keeps its top bits, made quiet; any other value gets the
           random bits. The select is on the 32-bit sums, before the
           narrowing (a select of the two 16-bit results, gcc narrowed each
           side apart, a pack apiece), and tests the float (one compare into
           a mask register on x86-64-v4). With the integer masks it had
           before and the old two-xor-shift hash, a C replica of the
           bfloat16 AdamW loop took 0.48 ns per element in cache instead of
           0.34 (one thread, x86-64-v4; 0.69 and 0.49 on v3); the hash alone
           was 0.07 ns of it. The step itself: 0.54 -> 0.41 (docs/performance.md) */
        uint32_t b = fo_bits_from_f32(x);
        uint32_t t = x != x ? (b | 0x00400000u) : b + fo_sr_bits(key, index);
        return (uint16_t)(t >> 16);
    }
    /* |x| as bits: their integer order is the float order (NaN above inf) */
    static inline uint32_t fo_abs_bits(float x) { return fo_bits_from_f32(x) & 0x7FFFFFFFu; }
    """
    float fo_f32_from_bits(unsigned int u) noexcept nogil
    unsigned int fo_sr_bits(unsigned int key, unsigned int index) noexcept nogil
    unsigned short fo_bf16_sr(float x, unsigned int key, unsigned int index) noexcept nogil
    unsigned int fo_abs_bits(float x) noexcept nogil

ctypedef fused floating:
    float
    double

ctypedef unsigned short bf16_bits   # bfloat16 as the bits of a uint16 view
ctypedef short f16_bits             # float16 as the bits of an int16 view

# What the params and grads are stored as: the compute type itself, or
# 16 bits with a float32 master copy.
ctypedef fused storage:
    float
    double
    bf16_bits
    f16_bits

cdef enum:
    CHUNK = 16384        # elements per parallel work item
    SERIAL_MAX = 32768   # below this, threads cost more than they save

cnp.import_array()
OPENMP = bool(FASTOPT_OPENMP)
cdef int _num_threads = fastopt_max_threads()


def set_num_threads(int n):
    global _num_threads
    _num_threads = n if OPENMP else 1


def get_num_threads():
    return _num_threads


# How a step's state is held: float buffers, or compact codes
# (fastopt/backends/compact.py). Compile-time tags, like ``Op``: each driver
# loop is specialised once per layout, so each one inlines with constant
# flags and vectorises. ``ShiftedState`` is float state whose weights are
# first moved by an offset (``w - e``: SAM's restore fused into the step,
# see tables.StepTable.set_shift and ``_span_restored``); only the float
# loops take it, so the loops without an offset are exactly those compiled
# before offsets existed.
cdef enum:
    BLOCK = 256         # elements per absmax block (compact.BLOCK)
    STATE_BF16 = 1
    STATE_8BIT = 2

ctypedef struct FloatState:
    char tag
ctypedef struct Bf16State:
    char tag
ctypedef struct Q8State:
    char tag
ctypedef struct ShiftedState:
    char tag
ctypedef fused Layout:
    FloatState
    ShiftedState
    Bf16State
    Q8State


cdef inline floating _sqrt(floating x) noexcept nogil:
    if floating is float:
        return sqrtf(x)
    else:
        return sqrt(x)


cdef inline floating _load(const storage* a, Py_ssize_t i, floating like) noexcept nogil:
    """``a[i]`` in the compute type (resolved at compile time)."""
    if storage is bf16_bits:
        return fo_bf16_to_f32(a[i])
    elif storage is f16_bits:
        return fo_f16_to_f32(a[i])
    else:
        return <floating>a[i]


cdef inline void _store(storage* out, Py_ssize_t i, float x) noexcept nogil:
    """Mixed precision: write the rounded master value (no-op otherwise)."""
    if storage is bf16_bits:
        out[i] = fo_f32_to_bf16(x)
    elif storage is f16_bits:
        out[i] = fo_f32_to_f16(x)


cdef inline Py_ssize_t _nchunks(Py_ssize_t n) noexcept nogil:
    return (n + CHUNK - 1) // CHUNK


cdef inline bint _serial(Py_ssize_t n) noexcept nogil:
    return n <= SERIAL_MAX or _num_threads == 1


# -- the per-element math, once per optimizer family ------------------------------
# Each update is one ``cdef inline`` function of one element: the weight and
# the state values are in/out pointers to locals (registers once inlined),
# ``g`` is the scaled gradient, ``c`` the step's scalars in the compute type
# (their order is fastopt.backends.scalars' ``*_ELEMENT`` tuples) and
# ``flags`` the options that change the formula. The drivers below know
# nothing of the optimizer; they reach it through ``_apply``. The Numba
# backend's twin of each function is in fastopt/backends/elements.py.

cdef enum:
    F_L2 = 1          # L2 weight decay added to the gradient (Adam, SGD)
    F_AMSGRAD = 2     # Adam: max of the second moments
    F_MOMENTUM = 2    # SGD: a momentum buffer
    F_NESTEROV = 4    # SGD: Nesterov look-ahead

cdef enum:
    OP_ADAM = 0
    OP_SGD = 1

# Compile-time tags that pick the element function in the generic drivers
# (a fused type over them specialises each driver once per optimizer).
ctypedef struct AdamOp:
    char tag
ctypedef struct SgdOp:
    char tag
ctypedef struct RmspropOp:
    char tag
ctypedef struct AdagradOp:
    char tag
ctypedef struct LionOp:
    char tag
ctypedef struct AdamaxOp:
    char tag
ctypedef struct NadamOp:
    char tag
ctypedef struct RadamOp:
    char tag
ctypedef struct LambOp:
    char tag
ctypedef fused Op:
    AdamOp
    SgdOp
    RmspropOp
    AdagradOp
    LionOp
    AdamaxOp
    NadamOp
    RadamOp
    LambOp


cdef inline void _adam_elem(floating* p, floating g, floating* m, floating* v,
                            floating* vmax, const floating* c, int flags) noexcept nogil:
    # c: step_size, inv_bc2 = 1/sqrt(1 - beta2**t), beta1, 1 - beta1, beta2,
    #    1 - beta2, eps, l2, decay. One division per element instead of
    #    torch's two: gcc (without -ffast-math) will not turn a loop-invariant
    #    division into a multiply, and on the portable build divisions and
    #    square roots, not memory, bound this loop. Differs by at most an ulp.
    cdef floating mi, vi
    if flags & F_L2:
        g = g + c[7] * p[0]
    mi = c[2] * m[0] + c[3] * g
    vi = c[4] * v[0] + c[5] * g * g
    m[0] = mi
    v[0] = vi
    if flags & F_AMSGRAD:
        # np.maximum semantics: a NaN on either side propagates.
        if vmax[0] > vi or vmax[0] != vmax[0]:
            vi = vmax[0]
        vmax[0] = vi
    p[0] = p[0] * c[8] - c[0] * mi / (_sqrt(vi) * c[1] + c[6])


cdef inline void _sgd_elem(floating* p, floating g, floating* buf,
                           const floating* c, int flags) noexcept nogil:
    # c: lr, l2, buf_decay (0 on the first step), grad_coef (1 - dampening,
    #    1 on the first step), momentum.
    cdef floating b
    if flags & F_L2:
        g = g + c[1] * p[0]
    if flags & F_MOMENTUM:
        b = c[2] * buf[0] + c[3] * g
        buf[0] = b
        if flags & F_NESTEROV:
            g = g + c[4] * b
        else:
            g = b
    p[0] = p[0] - c[0] * g


# RMSprop, Adagrad, Lion (fastopt.backends.scalars: OP_*, F_* and the
# *Element tuples give the values and the scalars' order)
cdef enum:
    OP_RMSPROP = 2
    OP_ADAGRAD = 3
    OP_LION = 4
    F_CENTERED = 4    # RMSprop: centered (F_L2, F_MOMENTUM as above)
    F_INITIAL = 2     # Adagrad: first step, the sum starts at initial_accumulator_value


cdef inline void _rmsprop_elem(floating* p, floating g, floating* sq, floating* ga,
                               floating* buf, const floating* c, int flags) noexcept nogil:
    # c: lr, alpha, 1 - alpha, eps, l2, momentum. ``ga`` is read only when
    #    centered, ``buf`` only with momentum.
    cdef floating s, a, avg, b
    if flags & F_L2:
        g = g + c[4] * p[0]
    s = c[1] * sq[0] + c[2] * g * g
    sq[0] = s
    if flags & F_CENTERED:
        a = c[1] * ga[0] + c[2] * g
        ga[0] = a
        avg = _sqrt(s - a * a) + c[3]
    else:
        avg = _sqrt(s) + c[3]
    if flags & F_MOMENTUM:
        b = c[5] * buf[0] + g / avg
        buf[0] = b
        p[0] = p[0] - c[0] * b
    else:
        p[0] = p[0] - c[0] * g / avg


cdef inline void _adagrad_elem(floating* p, floating g, floating* acc,
                               const floating* c, int flags) noexcept nogil:
    # c: clr = lr / (1 + (t - 1) * lr_decay), eps, l2, initial_accumulator_value
    cdef floating s
    if flags & F_L2:
        g = g + c[2] * p[0]
    if flags & F_INITIAL:
        s = c[3]
    else:
        s = acc[0]
    s = s + g * g
    acc[0] = s
    p[0] = p[0] - c[0] * g / (_sqrt(s) + c[1])


cdef inline void _lion_elem(floating* p, floating g, floating* m,
                            const floating* c, int flags) noexcept nogil:
    # c: lr, beta1, 1 - beta1, beta2, 1 - beta2, decay = 1 - lr * wd.
    #    lr * sign(u) with sign(0) = 0; a NaN u stays NaN. Selected on u's
    #    bits (fo_sign_step_*): written as if/elif, the portable and
    #    x86-64-v3 builds ran Lion scalar with a mispredicted branch an
    #    element (16M, random signs: 103-160 ms against Numba's 13-17 ms).
    cdef floating u = c[1] * m[0] + c[2] * g
    cdef floating d
    if floating is float:
        d = fo_sign_step_f32(u, c[0])
    else:
        d = fo_sign_step_f64(u, c[0])
    p[0] = p[0] * c[5] - d
    m[0] = c[3] * m[0] + c[4] * g


# Adamax, NAdam, RAdam (fastopt.backends.scalars: OP_*, F_RECTIFIED and the
# *Element tuples)
cdef enum:
    OP_ADAMAX = 5
    OP_NADAM = 6
    OP_RADAM = 7
    F_RECTIFIED = 2   # RAdam: rho_t > 5, the rectified adaptive update (F_L2 as above)


cdef inline void _adamax_elem(floating* p, floating g, floating* m, floating* u,
                              const floating* c, int flags) noexcept nogil:
    # c: clr = lr / (1 - beta1**t), beta1, 1 - beta1, beta2, eps, l2.
    #    u = max(beta2 u, |g| + eps), a NaN on either side propagating.
    cdef floating mi, ui, a
    if flags & F_L2:
        g = g + c[5] * p[0]
    mi = c[1] * m[0] + c[2] * g
    a = (g if g >= <floating>0 else -g) + c[4]
    ui = c[3] * u[0]
    if not (ui > a or ui != ui):
        ui = a
    m[0] = mi
    u[0] = ui
    p[0] = p[0] - c[0] * mi / ui


cdef inline void _nadam_elem(floating* p, floating g, floating* m, floating* v,
                             const floating* c, int flags) noexcept nogil:
    # c: beta1, 1 - beta1, beta2, 1 - beta2, 1 / (1 - beta2**t), eps, l2, decay,
    #    grad_coef, avg_coef (NAdam's momentum schedule, host scalars)
    cdef floating mi, vi, denom
    if flags & F_L2:
        g = g + c[6] * p[0]
    mi = c[0] * m[0] + c[1] * g
    vi = c[2] * v[0] + c[3] * g * g
    m[0] = mi
    v[0] = vi
    denom = _sqrt(vi * c[4]) + c[5]
    p[0] = p[0] * c[7] - (c[8] * g + c[9] * mi) / denom


cdef inline void _radam_elem(floating* p, floating g, floating* m, floating* v,
                             const floating* c, int flags) noexcept nogil:
    # c: adaptive_lr (with the rectification), sgd_lr = lr / (1 - beta1**t),
    #    beta1, 1 - beta1, beta2, 1 - beta2, eps, l2, decay
    cdef floating mi, vi
    if flags & F_L2:
        g = g + c[7] * p[0]
    mi = c[2] * m[0] + c[3] * g
    vi = c[4] * v[0] + c[5] * g * g
    m[0] = mi
    v[0] = vi
    if flags & F_RECTIFIED:
        p[0] = p[0] * c[8] - c[0] * mi / (_sqrt(vi) + c[6])
    else:
        p[0] = p[0] * c[8] - c[1] * mi


# LAMB (fastopt.backends.scalars: OP_LAMB, F_DECAY, LAMBElement): a
# two-phase update (ElementStep.phases; the drivers' ``_span_sums``,
# ``_array_factor`` and ``_span_finish``)
cdef enum:
    OP_LAMB = 8
    F_DECAY = 1       # LAMB: the weight decay term wd * p in the update direction


cdef inline floating _lamb_dir(floating p, floating m, floating v, const floating* c,
                               int flags) noexcept nogil:
    # c: lr, beta1, 1 - beta1, beta2, 1 - beta2, 1 / (1 - beta1**t),
    #    1 / sqrt(1 - beta2**t), eps, wd (the corrections 1 without bias correction).
    #    r = m_hat / (sqrt(v_hat) + eps) + wd p
    cdef floating r = c[5] * m / (_sqrt(v) * c[6] + c[7])
    if flags & F_DECAY:
        r = r + c[8] * p
    return r


cdef inline void _lamb_moments(floating p, floating g, floating* m, floating* v,
                               const floating* c, int flags, floating* r) noexcept nogil:
    # phase one: the new moments and the direction r (its norm and the
    # weight's make the tensor's trust ratio)
    cdef floating mi = c[1] * m[0] + c[2] * g
    cdef floating vi = c[3] * v[0] + c[4] * g * g
    m[0] = mi
    v[0] = vi
    r[0] = _lamb_dir(p, mi, vi, c, flags)


cdef inline double _lamb_step_size(double lr, double p_sumsq, double r_sumsq) noexcept nogil:
    # lr * ||p|| / ||r||, lr alone when either norm is 0; a NaN norm gives NaN
    if p_sumsq == 0 or r_sumsq == 0:
        return lr
    return lr * (sqrt(p_sumsq) / sqrt(r_sumsq))


# -- generic drivers -----------------------------------------------------------
# ``_span``: one contiguous stretch of one array. ``p`` is what the step
# updates (the params, or their float32 master copy), ``g`` the gradients as
# stored, ``out`` the 16-bit params under mixed precision (else unused),
# ``s0..s2`` the state at the same elements (unused slots point at a used
# one and are never touched).

cdef inline void _elem(Op* op, floating* p, floating g, floating* s0, floating* s1,
                       floating* s2, const floating* c, int flags) noexcept nogil:
    """One element of the optimizer ``Op``: ``p`` and ``s0..s2`` in/out."""
    if Op is AdamOp:
        _adam_elem(p, g, s0, s1, s2, c, flags)
    elif Op is RmspropOp:    # s1: grad_avg when centered, else the momentum buffer
        _rmsprop_elem(p, g, s0, s1, s2 if flags & F_CENTERED else s1, c, flags)
    elif Op is AdagradOp:
        _adagrad_elem(p, g, s0, c, flags)
    elif Op is LionOp:
        _lion_elem(p, g, s0, c, flags)
    elif Op is AdamaxOp:
        _adamax_elem(p, g, s0, s1, c, flags)
    elif Op is NadamOp:
        _nadam_elem(p, g, s0, s1, c, flags)
    elif Op is RadamOp:
        _radam_elem(p, g, s0, s1, c, flags)
    else:
        _sgd_elem(p, g, s0, c, flags)


cdef inline int _nslots(Op* op, int flags) noexcept nogil:
    """The state buffers ``_elem`` reads and writes with these flags, in slot
    order (a constant once inlined with constant flags: the compact loops
    touch only these)."""
    if Op is AdamOp:
        return 3 if flags & F_AMSGRAD else 2
    elif Op is RmspropOp:
        return 1 + (1 if flags & F_CENTERED else 0) + (1 if flags & F_MOMENTUM else 0)
    elif Op is AdamaxOp:
        return 2
    elif Op is NadamOp:
        return 2
    elif Op is RadamOp:
        return 2
    elif Op is LambOp:
        return 2
    else:    # SGD's momentum buffer, Adagrad's sum, Lion's average
        return 1


cdef inline int _flag_bits(Op* op) noexcept nogil:
    """The flags ``Op`` reads (fastopt.backends.scalars): ``_span_unswitched``
    specialises only the combinations that can occur."""
    if Op is AdamOp:
        return F_L2 | F_AMSGRAD
    elif Op is SgdOp:
        return F_L2 | F_MOMENTUM | F_NESTEROV
    elif Op is RmspropOp:
        return F_L2 | F_MOMENTUM | F_CENTERED
    elif Op is AdagradOp:
        return F_L2 | F_INITIAL
    elif Op is RadamOp:
        return F_L2 | F_RECTIFIED
    elif Op is LionOp:
        return 0
    else:    # Adamax, NAdam: F_L2; LAMB: F_DECAY
        return 1


# 16-bit params and grads are stepped a block at a time: the block's
# gradients widened to float32 in L1, the float32 element loop over them
# and the master copy, then the block's params rounded from the master. In
# one loop, the 16-bit lanes made gcc run 16 elements a vector on x86-64-v3
# (two vectors for every float value: the registers spilled), and the
# bfloat16 AdamW step took 1.9x the float32 one in cache, 1.35x at 16M
# (Numba's, one loop at 8 lanes: 1.2x and 1.1x). The same operations in the
# same order: the results are bit for bit those of the single loop.
cdef enum:
    LOW_BLOCK = 512         # elements a block (2 KiB of widened gradients)


cdef inline void _span(Op* op, floating* p, const storage* g, storage* out,
                       floating* s0, floating* s1, floating* s2, Py_ssize_t n,
                       const floating* c, floating gs, int flags) noexcept nogil:
    cdef Py_ssize_t i, lo = 0, m
    cdef floating gi, pi
    cdef floating wide[LOW_BLOCK]
    if storage is bf16_bits or storage is f16_bits:
        while lo < n:
            m = min(<Py_ssize_t>LOW_BLOCK, n - lo)
            for i in range(m):
                wide[i] = _load(g + lo, i, gs)
            _span(op, p + lo, <const floating*>wide, <floating*>NULL, s0 + lo, s1 + lo,
                  s2 + lo, m, c, gs, flags)
            for i in range(m):
                _store(out + lo, i, p[lo + i])
            lo += m
        return
    for i in range(n):
        gi = _load(g, i, gs) * gs
        pi = p[i]
        _elem(op, &pi, gi, &s0[i], &s1[i], &s2[i], c, flags)
        p[i] = pi
        _store(out, i, pi)


# An offset (SAM's perturbation ``e``) is applied a block at a time: the
# block's weights restored (``p -= e``, the same rounding as a pass of its
# own), then stepped by ``_span`` while they are still in L1. Memory sees
# one pass, and the element loop is the one without an offset: read inside
# it, ``e`` is one pointer more for gcc's runtime alias checks, past their
# limit for Adam (the loop then stays scalar: measured 3-5x slower).
cdef enum:
    SHIFT_BLOCK = 1024      # elements restored, then stepped (4-8 KiB of weights)


cdef inline void _restore(floating* p, const floating* e, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        p[i] = p[i] - e[i]


cdef inline void _span_restored(Op* op, floating* p, const floating* e, const storage* g,
                                storage* out, floating* s0, floating* s1, floating* s2,
                                Py_ssize_t n, const floating* c, floating gs,
                                int flags) noexcept nogil:
    cdef Py_ssize_t lo = 0, m
    while lo < n:
        m = min(<Py_ssize_t>SHIFT_BLOCK, n - lo)
        _restore(p + lo, e + lo, m)
        _span(op, p + lo, g + lo, _off(out, lo), s0 + lo, s1 + lo, s2 + lo, m, c, gs, flags)
        lo += m


cdef inline void _span_layout(Op* op, Layout* lay, floating* p, const floating* e,
                              const storage* g, storage* out, floating* s0, floating* s1,
                              floating* s2, const Compact* cs, float* scratch, Py_ssize_t o,
                              Py_ssize_t n, const floating* c, floating gs,
                              int flags) noexcept nogil:
    # the offset's blocks here; float and compact state in ``_span_state``
    if Layout is ShiftedState:
        _span_restored(op, p, e, g, out, s0, s1, s2, n, c, gs, flags)
    else:
        _span_state(op, lay, p, g, out, s0, s1, s2, cs, scratch, o, n, c, gs, flags)


cdef flattened _span_unswitched(Op* op, Layout* lay, floating* p, const floating* e,
                                const storage* g, storage* out, floating* s0, floating* s1,
                                floating* s2, const Compact* cs, Py_ssize_t o, Py_ssize_t n,
                                const floating* c, floating gs, int flags) noexcept nogil:
    # Unswitched by hand: each call inlines the loop with constant flags, so
    # every variant is branch-free and vectorises (gcc unswitches small
    # float32 bodies itself, but gives up on the larger 16-bit ones).
    # ``lay``: float state at s0..s2 (``ShiftedState``: the weights first
    # moved by the offset ``e``), or compact state ``cs`` (see ``_span_state``).
    # 8-bit state's block scratch lives in this frame.
    cdef float scratch[3 * BLOCK]
    flags = flags & _flag_bits(op)      # a constant per Op: the impossible cases fold away
    if flags == 0:
        _span_layout(op, lay, p, e, g, out, s0, s1, s2, cs, scratch, o, n, c, gs, 0)
    elif flags == 1:
        _span_layout(op, lay, p, e, g, out, s0, s1, s2, cs, scratch, o, n, c, gs, 1)
    elif flags == 2:
        _span_layout(op, lay, p, e, g, out, s0, s1, s2, cs, scratch, o, n, c, gs, 2)
    elif flags == 3:
        _span_layout(op, lay, p, e, g, out, s0, s1, s2, cs, scratch, o, n, c, gs, 3)
    elif flags == 4:
        _span_layout(op, lay, p, e, g, out, s0, s1, s2, cs, scratch, o, n, c, gs, 4)
    elif flags == 5:
        _span_layout(op, lay, p, e, g, out, s0, s1, s2, cs, scratch, o, n, c, gs, 5)
    elif flags == 6:
        _span_layout(op, lay, p, e, g, out, s0, s1, s2, cs, scratch, o, n, c, gs, 6)
    else:
        _span_layout(op, lay, p, e, g, out, s0, s1, s2, cs, scratch, o, n, c, gs, 7)


# Two-phase updates (ElementStep.phases == 2): phase one updates the state
# and gives two values per element, whose squares are summed (float64, in
# element order) per piece; each array's factor is made of its pieces'
# sums; phase two writes the weights with their array's factor. Each
# optimizer of this kind has one line in each of the four functions below.

cdef inline bint _two_phase(Op* op) noexcept nogil:
    return Op is LambOp


cdef enum:
    SUM_LANES = 64    # phase one's float64 accumulators per sum


cdef inline void _span_sums(Op* op, const floating* p, const storage* g, floating* s0,
                            floating* s1, floating* s2, Py_ssize_t n, const floating* c,
                            floating gs, int flags, double* sums) noexcept nogil:
    # Accumulator i of 64 adds the squares of elements i, i + 64, ... in the
    # elementwise loop itself (it vectorises as the one-pass updates do), and
    # the 64 are added in order at the end. A single running sum would keep
    # the loop scalar: gcc reorders no float sum without -ffast-math. The
    # Numba kernels sum in the same order.
    cdef Py_ssize_t lo = 0, i
    cdef floating x = 0, y = 0
    cdef double a[SUM_LANES]
    cdef double b[SUM_LANES]
    cdef double sa = 0, sb = 0
    for i in range(SUM_LANES):
        a[i] = 0
        b[i] = 0
    while lo < n:
        for i in range(min(<Py_ssize_t>SUM_LANES, n - lo)):
            if Op is LambOp:        # sums of p^2 and r^2
                x = p[lo + i]
                _lamb_moments(x, _load(g, lo + i, gs) * gs, &s0[lo + i], &s1[lo + i], c,
                              flags, &y)
            a[i] += <double>x * <double>x
            b[i] += <double>y * <double>y
        lo += SUM_LANES
    for i in range(SUM_LANES):
        sa += a[i]
        sb += b[i]
    sums[0] = sa
    sums[1] = sb


cdef inline double _array_factor(Op* op, double a, double b,
                                 const floating* c) noexcept nogil:
    if Op is LambOp:
        return _lamb_step_size(<double>c[0], a, b)
    else:
        return 1


cdef inline void _span_finish(Op* op, floating* p, storage* out, floating* s0, floating* s1,
                              floating* s2, Py_ssize_t n, const floating* c, floating f,
                              int flags) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating pi
    for i in range(n):
        pi = p[i]
        if Op is LambOp:
            pi = pi - f * _lamb_dir(pi, s0[i], s1[i], c, flags)
        p[i] = pi
        _store(out, i, pi)


include "compact_impl.pxi"


# A step's work, whatever the layout, is a table over the arrays
# (fastopt/backends/tables.py builds it once per param group): for array k
# its weight, 16-bit output and gradient addresses, its size and its offset
# in the group's flat state buffers; then *pieces* (array, lo, hi), no longer
# than CHUNK, and *tasks*: runs of consecutive pieces of about CHUNK elements
# in all. Threads take whole tasks, so a thousand small arrays and one large
# array split alike, and the norm's per-task partial sums are added in task
# order (the result does not depend on the thread count).

ctypedef long long i64

cdef struct Table:
    const i64* waddr    # weights the step updates (params or master copy)
    const i64* oaddr    # 16-bit params to write (mixed precision) or NULL
    const i64* gaddr    # gradients
    const i64* soff     # element offset of each array in the state buffers
    const i64* pk       # piece -> array
    const i64* plo      # piece -> first element
    const i64* phi      # piece -> past its last element
    const i64* tasks    # task t = pieces tasks[t] .. tasks[t + 1]
    Py_ssize_t ntasks
    const i64* pfirst   # array k = pieces pfirst[k] .. pfirst[k + 1]
    Py_ssize_t narrays
    double* psum        # two-phase updates: two sums per piece,
    double* factor      # and one factor per array
    const i64* eaddr    # an offset read with the weights (``w - e``) or NULL
    const Compact* compact   # NULL: float state; else the compact state's codes


cdef inline double _task_sumsq(const Table* tb, Py_ssize_t t, storage* like) noexcept nogil:
    cdef Py_ssize_t j
    cdef double acc = 0
    for j in range(tb.tasks[t], tb.tasks[t + 1]):
        acc += _sumsq_chunk(<const storage*><size_t>tb.gaddr[tb.pk[j]] + tb.plo[j], 0,
                            tb.phi[j] - tb.plo[j])
    return acc


cdef inline void _task_update(Op* op, const Table* tb, Py_ssize_t t, storage* like,
                              floating* st0, floating* st1, floating* st2,
                              const floating* c, floating gs, int flags) noexcept nogil:
    cdef Py_ssize_t j, k, lo, o, n
    cdef storage* out
    cdef floating* p
    cdef const storage* g
    cdef FloatState* flt = NULL
    cdef ShiftedState* shifted = NULL
    cdef Bf16State* bf16 = NULL
    cdef Q8State* q8 = NULL
    for j in range(tb.tasks[t], tb.tasks[t + 1]):
        k = tb.pk[j]
        lo = tb.plo[j]
        o = tb.soff[k] + lo
        out = NULL if tb.oaddr == NULL else <storage*><size_t>tb.oaddr[k] + lo
        p = <floating*><size_t>tb.waddr[k] + lo
        g = <const storage*><size_t>tb.gaddr[k] + lo
        n = tb.phi[j] - lo
        if tb.compact != NULL:      # (never with an offset: cython_cpu refuses it)
            if tb.compact.kind == STATE_BF16:
                _span_unswitched(op, bf16, p, NULL, g, out, st0, st1, st2, tb.compact, o, n, c,
                                 gs, flags)
            else:
                _span_unswitched(op, q8, p, NULL, g, out, st0, st1, st2, tb.compact, o, n, c,
                                 gs, flags)
        elif tb.eaddr == NULL:
            _span_unswitched(op, flt, p, NULL, g, out, st0 + o, st1 + o, st2 + o, NULL, o, n,
                             c, gs, flags)
        else:
            _span_unswitched(op, shifted, p, <const floating*><size_t>tb.eaddr[k] + lo, g, out,
                             st0 + o, st1 + o, st2 + o, NULL, o, n, c, gs, flags)


cdef inline void _task_sums(Op* op, const Table* tb, Py_ssize_t t, storage* like,
                            floating* st0, floating* st1, floating* st2,
                            const floating* c, floating gs, int flags) noexcept nogil:
    # phase one: piece j's two sums in psum[2j], psum[2j + 1]. An offset
    # restores the piece's weights first (while they are in cache): phase
    # two then reads them restored.
    cdef Py_ssize_t j, k, lo, o
    cdef floating* p
    for j in range(tb.tasks[t], tb.tasks[t + 1]):
        k = tb.pk[j]
        lo = tb.plo[j]
        o = tb.soff[k] + lo
        p = <floating*><size_t>tb.waddr[k] + lo
        if tb.eaddr != NULL:
            _restore(p, <const floating*><size_t>tb.eaddr[k] + lo, tb.phi[j] - lo)
        _span_sums(op, p, <const storage*><size_t>tb.gaddr[k] + lo, st0 + o, st1 + o, st2 + o,
                   tb.phi[j] - lo, c, gs, flags, tb.psum + 2 * j)


cdef inline void _array_factors(Op* op, const Table* tb, Py_ssize_t k,
                                const floating* c) noexcept nogil:
    # array k's factor from its pieces' sums, added in piece order (whichever
    # thread ran each piece)
    cdef Py_ssize_t j
    cdef double a = 0, b = 0
    for j in range(tb.pfirst[k], tb.pfirst[k + 1]):
        a += tb.psum[2 * j]
        b += tb.psum[2 * j + 1]
    tb.factor[k] = _array_factor(op, a, b, c)


cdef inline void _task_finish(Op* op, const Table* tb, Py_ssize_t t, storage* like,
                              floating* st0, floating* st1, floating* st2,
                              const floating* c, int flags) noexcept nogil:
    # phase two: each piece with its array's factor
    cdef Py_ssize_t j, k, lo, o
    cdef storage* out
    for j in range(tb.tasks[t], tb.tasks[t + 1]):
        k = tb.pk[j]
        lo = tb.plo[j]
        o = tb.soff[k] + lo
        out = NULL if tb.oaddr == NULL else <storage*><size_t>tb.oaddr[k] + lo
        _span_finish(op, <floating*><size_t>tb.waddr[k] + lo, out, st0 + o, st1 + o, st2 + o,
                     tb.phi[j] - lo, c, <floating>tb.factor[k], flags)


cdef inline double _combine(const double* partial, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t t
    cdef double total = 0
    for t in range(n):      # fixed order: independent of the thread count
        total += partial[t]
    return total


cdef inline double _clip_coef(double norm, double max_norm) noexcept nogil:
    # torch's clip_grad_norm_ factor; a NaN norm gives a NaN factor
    cdef double coef = max_norm / (norm + 1e-6)
    if coef < 1.0 or coef != coef:
        return coef
    return 1.0


# One step's arguments, shared by the threads that run its tasks (see
# pool_impl.pxi): the master fills it, then runs each pass as a job of
# tasks, setting ``phase`` (and, after the norm, ``gs``) between passes.
cdef enum:
    PH_SUMSQ = 0       # partial[t]: task t's sum of squared gradients
    PH_UPDATE = 1      # task t's update
    PH_SUMS = 2        # two-phase updates: phase one of task t (its pieces' sums)
    PH_FACTORS = 3     # array t's factor from its pieces' sums
    PH_FINISH = 4      # phase two of task t

cdef struct StepJob:
    const Table* tb
    int op, compute, store, flags, nscal, phase
    i64 st0, st1, st2
    const double* scal      # the element scalars (float64)
    double gs               # the gradients' factor (scale x clip coefficient)
    double* partial         # the norm's per-task sums


cdef double _run(StepJob* j, double gscale, double max_norm, double inv_scale,
                 int norm_mode, bint serial, int* skipped) noexcept nogil:
    """One step over a table: (optionally) the norm pass, then the update.

    ``norm_mode``: 0 none; 1 compute the norm (clip with ``max_norm`` > 0);
    2 as 1 and skip the update when the norm is not finite. A two-phase
    update (``_two_phase``) is three passes: phase one per task, the
    per-array factors, phase two per task. Returns the unscaled global norm.
    """
    cdef double norm = 0, coef = 1
    cdef int skip = 0
    cdef Py_ssize_t ntasks = j.tb.ntasks
    if norm_mode:
        _pass(j, PH_SUMSQ, ntasks, serial)
        norm, coef, skip = _decide(j.partial, ntasks, max_norm, inv_scale, norm_mode)
    if not skip:
        j.gs = gscale * coef
        if j.op == OP_LAMB:
            _pass(j, PH_SUMS, ntasks, serial)
            _pass(j, PH_FACTORS, j.tb.narrays, serial)
            _pass(j, PH_FINISH, ntasks, serial)
        else:
            _pass(j, PH_UPDATE, ntasks, serial)
    skipped[0] = skip
    return norm


cdef inline void _pass(StepJob* j, int phase, Py_ssize_t n, bint serial) noexcept nogil:
    # one pass over n tasks: on this thread, or as a job of the thread team
    j.phase = phase
    if serial:
        _dispatch(j, 0, n)
    else:
        fo_pool_run(_pool_task, j, n, _num_threads)


cdef void _pool_task(void* job, long long t) noexcept nogil:
    _dispatch(<StepJob*>job, <Py_ssize_t>t, <Py_ssize_t>t + 1)


cdef inline void _tasks(Op* op, storage* like, floating* st0, floating* st1, floating* st2,
                        const StepJob* j, Py_ssize_t t0, Py_ssize_t t1) noexcept nogil:
    """Tasks ``t0..t1 - 1`` of the job's current pass, specialised."""
    cdef floating c[16]
    cdef floating gs = <floating>j.gs
    cdef const Table* tb = j.tb
    cdef Py_ssize_t t, i
    for i in range(j.nscal):
        c[i] = <floating>j.scal[i]
    if st1 == NULL:
        st1 = st0
    if st2 == NULL:
        st2 = st1
    if j.phase == PH_SUMSQ:
        for t in range(t0, t1):
            j.partial[t] = _task_sumsq(tb, t, like)
    elif j.phase == PH_UPDATE:
        for t in range(t0, t1):
            _task_update(op, tb, t, like, st0, st1, st2, c, gs, j.flags)
    elif _two_phase(op):       # (the branches below exist only where they are used)
        if j.phase == PH_SUMS:
            for t in range(t0, t1):
                _task_sums(op, tb, t, like, st0, st1, st2, c, gs, j.flags)
        elif j.phase == PH_FACTORS:
            for t in range(t0, t1):
                _array_factors(op, tb, t, c)
        else:
            for t in range(t0, t1):
                _task_finish(op, tb, t, like, st0, st1, st2, c, j.flags)


cdef inline (double, double, int) _decide(const double* partial, Py_ssize_t n,
                                          double max_norm, double inv_scale,
                                          int norm_mode) noexcept nogil:
    """``(unscaled norm, clip coefficient x inv_scale, skip?)`` from the partials."""
    cdef double norm = sqrt(_combine(partial, n)) * inv_scale
    cdef double coef = inv_scale
    if max_norm > 0:
        coef = coef * _clip_coef(norm, max_norm)
    return norm, coef, norm_mode == 2 and not (norm - norm == 0)


cdef void _dispatch(const StepJob* j, Py_ssize_t t0, Py_ssize_t t1) noexcept nogil:
    """Pick the optimizer's specialisation (one line per optimizer)."""
    cdef AdamOp* adam = NULL
    cdef SgdOp* sgd = NULL
    cdef RmspropOp* rmsprop = NULL
    cdef AdagradOp* adagrad = NULL
    cdef LionOp* lion = NULL
    cdef AdamaxOp* adamax = NULL
    cdef NadamOp* nadam = NULL
    cdef RadamOp* radam = NULL
    cdef LambOp* lamb = NULL
    if j.op == OP_ADAM:
        _dispatch_types(adam, j, t0, t1)
    elif j.op == OP_RMSPROP:
        _dispatch_types(rmsprop, j, t0, t1)
    elif j.op == OP_ADAGRAD:
        _dispatch_types(adagrad, j, t0, t1)
    elif j.op == OP_LION:
        _dispatch_types(lion, j, t0, t1)
    elif j.op == OP_ADAMAX:
        _dispatch_types(adamax, j, t0, t1)
    elif j.op == OP_NADAM:
        _dispatch_types(nadam, j, t0, t1)
    elif j.op == OP_RADAM:
        _dispatch_types(radam, j, t0, t1)
    elif j.op == OP_LAMB:
        _dispatch_types(lamb, j, t0, t1)
    elif j.op == OP_SGD:
        _dispatch_types(sgd, j, t0, t1)
    # (another op is refused before it gets here: KNOWN_OPS)


#: the ops ``_dispatch`` steps, one per line there: fastopt.backends.cython_cpu
#: refuses to load an extension built before an op of fastopt.backends.scalars
#: (it ran such an optimizer's steps as SGD's, silently)
KNOWN_OPS = (OP_ADAM, OP_SGD, OP_RMSPROP, OP_ADAGRAD, OP_LION, OP_ADAMAX, OP_NADAM, OP_RADAM,
             OP_LAMB)


cdef inline void _dispatch_types(Op* op, const StepJob* j, Py_ssize_t t0,
                                 Py_ssize_t t1) noexcept nogil:
    """Pick the compute type x gradient storage specialisation (storage 0:
    the compute type, 1: bfloat16, 2: float16)."""
    cdef float* f = NULL
    cdef double* d = NULL
    cdef bf16_bits* bf = NULL
    cdef f16_bits* hf = NULL
    cdef float* f0 = <float*><size_t>j.st0
    cdef float* f1 = <float*><size_t>j.st1
    cdef float* f2 = <float*><size_t>j.st2
    if j.compute == 64:
        _tasks(op, d, <double*><size_t>j.st0, <double*><size_t>j.st1, <double*><size_t>j.st2,
               j, t0, t1)
    elif j.store == 1:
        _tasks(op, bf, f0, f1, f2, j, t0, t1)
    elif j.store == 2:
        _tasks(op, hf, f0, f1, f2, j, t0, t1)
    else:
        _tasks(op, f, f0, f1, f2, j, t0, t1)


# Positions in a table's header (fastopt.backends.tables.StepTable.header):
# the addresses of its int64/float64 arrays and its sizes, fixed for the
# table's life, so a step passes one address instead of a dozen arguments.
cdef enum:
    H_WADDR, H_OADDR, H_GADDR, H_SOFF, H_PK, H_PLO, H_PHI, H_TASKS, H_NTASKS, \
        H_NELEM, H_PARTIAL, H_COMPUTE, H_STORE, H_PFIRST, H_NARRAYS, H_PSUM, H_FACTOR, \
        H_OUTCOME, H_SHIFT


cdef inline void _note_outcome(const i64* h, double norm, int skipped) noexcept nogil:
    """The table's ``outcome`` (calls, norm, skipped), written as the step's
    last act: a Ctrl-C is raised as the native call returns, and the
    optimizer reads here what the call did (fastopt.optim.interrupt)."""
    cdef double* o = <double*><size_t>h[H_OUTCOME]
    o[1] = norm
    o[2] = skipped
    o[0] += 1


cdef int _scalars(tuple scal, double* sc) except -1:
    """An element step's scalars (at most 16) as doubles; their number."""
    cdef Py_ssize_t i, n = len(scal)
    if n > 16:
        raise ValueError("at most 16 scalars")
    for i in range(n):
        sc[i] = scal[i]
    return <int>n


cdef inline void _load_table(Table* tb, const i64* h) noexcept nogil:
    """A table's arrays and counts from its int64 header (``H_*``); no compact state."""
    tb.compact = NULL
    tb.waddr = <const i64*><size_t>h[H_WADDR]
    tb.oaddr = <const i64*><size_t>h[H_OADDR]
    tb.gaddr = <const i64*><size_t>h[H_GADDR]
    tb.soff = <const i64*><size_t>h[H_SOFF]
    tb.pk = <const i64*><size_t>h[H_PK]
    tb.plo = <const i64*><size_t>h[H_PLO]
    tb.phi = <const i64*><size_t>h[H_PHI]
    tb.tasks = <const i64*><size_t>h[H_TASKS]
    tb.ntasks = h[H_NTASKS]
    tb.pfirst = <const i64*><size_t>h[H_PFIRST]
    tb.narrays = h[H_NARRAYS]
    tb.psum = <double*><size_t>h[H_PSUM]
    tb.factor = <double*><size_t>h[H_FACTOR]
    tb.eaddr = <const i64*><size_t>h[H_SHIFT]      # 0: no offset


cdef inline bint _step_serial(bint threaded, const Table* tb, const i64* h) noexcept nogil:
    """Whether a step runs on this thread: not asked to thread, a small
    table, one thread, or a single task (the callers' ``threaded`` is the
    table's ThreadChoice pick)."""
    return not threaded or _serial(h[H_NELEM]) or tb.ntasks < 2


cdef inline void _job_of(StepJob* j, const Table* tb, const i64* h, int op, i64 st0, i64 st1,
                         i64 st2, const double* scal, int nscal, int flags) noexcept nogil:
    """A step's job over table ``tb`` (loaded from header ``h``)."""
    j.tb = tb
    j.op = op
    j.compute = <int>h[H_COMPUTE]
    j.store = <int>h[H_STORE]
    j.flags = flags
    j.nscal = nscal
    j.st0 = st0
    j.st1 = st1
    j.st2 = st2
    j.scal = scal
    j.gs = 1
    j.partial = <double*><size_t>h[H_PARTIAL]


def step(i64 header, int op, i64 st0, i64 st1, i64 st2, tuple scal, int flags,
         double gscale, double max_norm, double inv_scale, int norm_mode, bint threaded,
         tuple compact=None):
    """One optimizer step over a table (see ``Table``): ``header`` is the
    address of the table's int64 header, ``st0..st2`` the addresses of the
    group's state buffers (0 when unused), ``scal`` the optimizer's element
    scalars (float64, at most 16). fastopt.backends.tables keeps every
    array alive and has validated it. ``threaded``: use the thread team (the
    caller's choice, see fastopt.backends.threads); small tables and one
    thread run serially whatever it says.

    ``compact``: None for float state, else ``(kind, codes, absmax, keys,
    signed)``, one entry per state buffer in each tuple (see ``Compact``;
    float32 compute, one-phase updates only: cython_cpu checks).

    Returns ``(norm, skipped)``: the unscaled global norm (0.0 when
    ``norm_mode`` is 0) and whether the update was skipped."""
    cdef const i64* h = <const i64*><size_t>header
    cdef Table tb
    cdef int skipped = 0
    cdef double norm
    cdef double sc[16]
    cdef Py_ssize_t i
    cdef int nscal = _scalars(scal, sc)
    cdef Compact cs
    cdef StepJob job
    _load_table(&tb, h)
    if compact is not None:
        kind, codes, absmax, keys, signed = compact
        cs.kind = kind
        cs.nslots = len(codes)
        if not 1 <= cs.nslots <= 3:
            raise ValueError("compact state: 1 to 3 buffers")
        for i in range(cs.nslots):
            cs.codes[i] = <void*><size_t><i64>codes[i]
            cs.absmax[i] = <float*><size_t><i64>absmax[i]
            cs.key[i] = <unsigned int>keys[i]
            cs.is_signed[i] = signed[i]
        tb.compact = &cs
    with nogil:
        _job_of(&job, &tb, h, op, st0, st1, st2, sc, nscal, flags)
        norm = _run(&job, gscale, max_norm, inv_scale, norm_mode,
                    _step_serial(threaded, &tb, h), &skipped)
        _note_outcome(h, norm, skipped)
    return norm, bool(skipped)


def sumsq_table(int compute, int store, i64 gaddr, i64 pk, i64 plo, i64 phi, i64 tasks,
                Py_ssize_t ntasks, Py_ssize_t nelem, i64 partial):
    """Sum of squares of a table's gradients (float64, fixed order): the
    global norm of several param groups is one of these per group. Threaded
    on the step's team, like a step's own norm pass."""
    cdef Table tb
    cdef SumsqJob job
    cdef double* part = <double*><size_t>partial
    tb.gaddr = <const i64*><size_t>gaddr
    tb.pk = <const i64*><size_t>pk
    tb.plo = <const i64*><size_t>plo
    tb.phi = <const i64*><size_t>phi
    tb.tasks = <const i64*><size_t>tasks
    tb.ntasks = ntasks
    job.tb = &tb
    job.compute = compute
    job.store = store
    job.part = part
    with nogil:
        fo_pool_run(_sumsq_task, &job, ntasks, 1 if _serial(nelem) else _num_threads)
    return _combine(part, ntasks)


cdef struct SumsqJob:
    const Table* tb
    int compute, store
    double* part


cdef void _sumsq_task(void* job, long long t) noexcept nogil:
    cdef SumsqJob* j = <SumsqJob*>job
    j.part[t] = _sumsq_any(j.tb, <Py_ssize_t>t, j.compute, j.store)


cdef inline double _sumsq_any(const Table* tb, Py_ssize_t t, int compute,
                              int store) noexcept nogil:
    cdef float* f = NULL
    cdef double* d = NULL
    cdef bf16_bits* bf = NULL
    cdef f16_bits* hf = NULL
    if compute == 64:
        return _task_sumsq(tb, t, d)
    if store == 1:
        return _task_sumsq(tb, t, bf)
    if store == 2:
        return _task_sumsq(tb, t, hf)
    return _task_sumsq(tb, t, f)


def update(int op, floating[::1] p, const storage[::1] g, storage[::1] out,
           floating[::1] s0, floating[::1] s1, floating[::1] s2, tuple scal, int flags,
           double gscale):
    """One step of one 1-D array in place (the functional API's layout):
    ``s0..s2`` the state buffers the element function reads (None when
    unused), ``out`` the 16-bit params under mixed precision (else None)."""
    cdef Py_ssize_t n = p.shape[0], c, i, nscal = len(scal)
    if n == 0:
        return
    cdef floating cs[16]
    cdef floating gs = <floating>gscale
    cdef AdamOp* adam = NULL
    cdef SgdOp* sgd = NULL
    cdef FloatState* flt = NULL
    for i in range(nscal):
        cs[i] = <floating>scal[i]
    cdef floating* pp = &p[0]
    cdef const storage* gp = &g[0]
    cdef storage* op_ = &out[0] if out is not None else NULL
    cdef floating* a0 = &s0[0] if s0 is not None else NULL
    cdef floating* a1 = &s1[0] if s1 is not None else a0
    cdef floating* a2 = &s2[0] if s2 is not None else a1
    with nogil:
        if _serial(n):
            if op == OP_ADAM:
                _span_unswitched(adam, flt, pp, NULL, gp, op_, a0, a1, a2, NULL, 0, n, cs, gs,
                                 flags)
            else:
                _span_unswitched(sgd, flt, pp, NULL, gp, op_, a0, a1, a2, NULL, 0, n, cs, gs,
                                 flags)
        else:
            for c in prange(_nchunks(n), schedule="static", num_threads=_num_threads):
                i = c * CHUNK
                if op == OP_ADAM:
                    _span_unswitched(adam, flt, pp + i, NULL, gp + i, _off(op_, i), a0 + i,
                                     a1 + i, a2 + i, NULL, 0, min(n - i, CHUNK), cs, gs, flags)
                else:
                    _span_unswitched(sgd, flt, pp + i, NULL, gp + i, _off(op_, i), a0 + i,
                                     a1 + i, a2 + i, NULL, 0, min(n - i, CHUNK), cs, gs, flags)


cdef inline storage* _off(storage* a, Py_ssize_t i) noexcept nogil:
    return NULL if a == NULL else a + i


# -- gradients as users hold them: a list of separate arrays ---------------------

def gather(grads, list params, i64 out, i64 written, Py_ssize_t nwritten, i64 given):
    """Write the data address of each of ``grads`` (a list or tuple of arrays,
    new every step) to the int64 array at ``out``, checking each against
    ``params[k]`` as ``fastopt._validate.check_like`` would (an ndarray of
    the same dtype and shape, C-contiguous) and that it overlaps none of the
    ``nwritten`` sorted, disjoint byte ranges ``[lo, hi)`` at ``written``
    (everything the step writes).

    Returns -1 when all pass, else the index of the first grad that does
    not: the caller then runs the full Python checks for the message.
    Nothing is written through these addresses here."""
    return _gather(grads, params, None, out, written, nwritten, given)


def params_as_given(list params, i64 given):
    """-1 when every param still has the data address, bytes and dtype
    object its table recorded (``given``, StepTable.given) and is
    C-contiguous and writable; else the index of the first that does not (changed in
    place: the caller's check says how)."""
    cdef const i64* gv = <const i64*><size_t>given
    cdef Py_ssize_t k
    cdef cnp.ndarray p
    for k in range(len(params)):
        p = <cnp.ndarray?>params[k]
        if not _at_given(p, gv + 3 * k) or <i64>cnp.PyArray_NBYTES(p) != gv[3 * k + 1]:
            return k
    return -1


cdef inline bint _at_given(cnp.ndarray p, const i64* given) noexcept:
    # ``p`` still at the data address and with the dtype object its table
    # recorded (``given``: StepTable.given's row), C-contiguous and writable
    # (one made read-only to freeze it was written all the same); its bytes
    # are the caller's to compare
    return (<i64><size_t>cnp.PyArray_DATA(p) == given[0]
            and <i64><size_t>cnp.PyArray_DESCR(p) == given[2]
            and cnp.PyArray_IS_C_CONTIGUOUS(p) and cnp.PyArray_ISWRITEABLE(p))


# subclasses the full checks refuse (a masked array's mask, np.matrix's *)
_REFUSED_SUBCLASSES = (np.ma.MaskedArray, np.matrix)


cdef Py_ssize_t _gather(grads, list params, tuple at, i64 out, i64 written,
                        Py_ssize_t nwritten, i64 given):
    # ``at``: None (grads[k] goes with params[k]), or each param's position
    # in ``grads`` (a table's share of a longer list, whose length the
    # caller checked); ``given``: each param's data address, bytes and
    # dtype object when the table was made (StepTable.given)
    cdef Py_ssize_t k, n = len(params), a, b, mid
    cdef i64* dst = <i64*><size_t>out
    cdef const i64* w = <const i64*><size_t>written
    cdef const i64* gv = <const i64*><size_t>given
    cdef cnp.ndarray g, p
    cdef i64 lo, hi, nb
    cdef object seq
    if type(grads) is list:
        seq = grads
    elif type(grads) is tuple:
        seq = grads
    else:
        return 0
    if at is None and len(seq) != n:
        return 0
    for k in range(n):
        item = seq[k] if at is None else seq[<Py_ssize_t>at[k]]
        if not cnp.PyArray_CheckExact(item) and (
                not cnp.PyArray_Check(item) or isinstance(item, _REFUSED_SUBCLASSES)):
            return k        # to the full checks, which refuse it
        g = <cnp.ndarray>item
        p = <cnp.ndarray>params[k]
        # the param still as the table has it: its memory and dtype, and (below,
        # from the grad of its shape) its bytes; one changed in place since
        # goes to the full checks, which refuse it
        if not _at_given(p, gv + 3 * k):
            return k
        if (cnp.PyArray_DESCR(g) != cnp.PyArray_DESCR(p)
                and not cnp.PyArray_EquivTypes(g.dtype, p.dtype)):
            return k
        if not cnp.PyArray_IS_C_CONTIGUOUS(g) or cnp.PyArray_NDIM(g) != cnp.PyArray_NDIM(p):
            return k
        if not cnp.PyArray_CompareLists(cnp.PyArray_DIMS(g), cnp.PyArray_DIMS(p),
                                        cnp.PyArray_NDIM(g)):
            return k
        nb = cnp.PyArray_NBYTES(g)          # the param's bytes too: same shape and dtype
        if nb != gv[3 * k + 1]:
            return k
        lo = <i64><size_t>cnp.PyArray_DATA(g)
        hi = lo + nb
        if hi > lo and nwritten:
            # the first written range ending after lo; overlap if it starts before hi
            a, b = 0, nwritten
            while a < b:
                mid = (a + b) >> 1
                if w[2 * mid + 1] <= lo:
                    a = mid + 1
                else:
                    b = mid
            if a < nwritten and w[2 * a] < hi:
                return k
        dst[k] = lo
    return -1


cdef enum:
    # ListStep's int64 row per table
    L_GADDR, L_WRITTEN, L_NWRITTEN, L_HEADER, L_ST0, L_ST1, L_ST2, L_GIVEN, L_COLUMNS


cdef class ListStep:
    """Tables' whole step over a list of new gradient arrays, bound once:
    every table's grads checked and pointed at (as ``gather``) and its
    element step read, then, only if all passed, each table's update
    without a norm pass (as ``step``), in one call from Python: the step
    plan's fast path for small models, where the calls are the cost, and
    for one large table (threaded or not as its ``ThreadChoice`` picks), whose
    Python around the kernel runs cold after a training loop's
    forward/backward pass.

    Built from the tables' constant addresses while their state buffers are
    the same objects (``keep`` holds what those addresses point into):
    ``params[k]`` table k's params, ``at[k]`` None (one table reading the
    whole list) or the positions of its grads in the list, ``rows`` an
    int64 array of ``L_COLUMNS`` addresses and counts per table. A table
    with an offset set (SAM's restore) is refused: ``step`` applies those."""

    cdef list params, at
    cdef Py_ssize_t ntables, total
    cdef cnp.ndarray rows, scal, ints
    cdef object keep

    def __init__(self, list params, list at, rows, Py_ssize_t total, keep):
        if (len(at) != len(params) or rows.dtype != np.int64 or rows.ndim != 2
                or rows.shape[0] != len(params) or rows.shape[1] != L_COLUMNS
                or not rows.flags.c_contiguous):
            raise ValueError("one row of L_COLUMNS int64 per table, and one entry of at")
        self.params, self.at, self.rows, self.total = params, at, rows, total
        self.ntables = len(params)
        self.keep = keep
        # each table's element step, read before anything is written
        self.scal = np.zeros((self.ntables, 17))     # the scalars, then grad_scale
        self.ints = np.zeros((self.ntables, 3), np.int32)    # op, flags, the scalars' count

    def run(self, grads, tuple els, tuple values, bint threaded=False, opt=None,
            last_lr=None, double max_norm=-1.0, int norm_mode=0):
        """Step ``grads`` with table k's element step ``els[k]`` (an
        ``ElementStep``: op, values, flags, grad_scale first) and
        ``values[k]`` in place of its own: True, or False when a grad does
        not pass or an offset is set (nothing written then). ``threaded``:
        on the thread team (small tables and one thread run serially
        whatever it says, as with ``step``).

        ``opt``: the optimizer whose counters the step then advances, as
        its base ``_finish_step`` does for a step without a norm (each
        ``opt.state`` entry's ``"step"``, ``iterations``, ``grad_norm``
        None, ``last_lr`` the list given), in this same call: no Python
        runs between the writes and the counting, so a Ctrl-C (raised as
        the call returns) finds both done or neither
        (fastopt.optim.interrupt).

        ``norm_mode`` (1 or 2): the global norm of every table's gradients
        first, each table's sum of squares as ``sumsq_table`` makes it,
        added in table order, its root (as the full step of several groups
        computes it, in one call instead of one per table and one per
        update); clipped to ``max_norm`` (>= 0; < 0: no clipping) by
        torch's coefficient, which scales each table's gradients. A norm
        that is not finite writes nothing and returns False: the full step
        settles it (an overflow recomputed, or the step skipped). With a
        norm, a step that ran returns the norm (a float, 0.0 included; also
        the counted ``grad_norm``), a refused one False."""
        cdef const i64* r = <const i64*>cnp.PyArray_DATA(self.rows)
        cdef double* sc = <double*>cnp.PyArray_DATA(self.scal)
        cdef int* ints = <int*>cnp.PyArray_DATA(self.ints)
        cdef const i64* row
        cdef const i64* h
        cdef Table tb
        cdef StepJob job
        cdef int skipped = 0
        cdef Py_ssize_t k
        cdef tuple e
        cdef dict counted
        cdef SumsqJob sj
        cdef double total = 0, norm = 0, coef = 1
        if len(els) != self.ntables or len(values) != self.ntables:
            raise ValueError("one element step and one values tuple per table")
        if self.ntables > 1 and (type(grads) is not list or len(grads) != self.total):
            return False
        for k in range(self.ntables):       # every table's checks before any write
            row = r + k * L_COLUMNS
            if not isinstance(els[k], tuple):
                raise TypeError("els must hold ElementSteps")
            e = <tuple>els[k]           # a NamedTuple: a tuple subclass
            ints[3 * k] = e[0]
            ints[3 * k + 1] = e[2]
            sc[17 * k + 16] = e[3]
            ints[3 * k + 2] = _scalars(<tuple?>values[k], sc + 17 * k)
            if (<const i64*><size_t>row[L_HEADER])[H_SHIFT]:
                return False
            if _gather(grads, <list>self.params[k], <tuple>self.at[k], row[L_GADDR],
                       row[L_WRITTEN], row[L_NWRITTEN], row[L_GIVEN]) != -1:
                return False
        if norm_mode:
            with nogil:
                for k in range(self.ntables):
                    h = <const i64*><size_t>(r + k * L_COLUMNS)[L_HEADER]
                    _load_table(&tb, h)
                    sj.tb = &tb
                    sj.compute = <int>h[H_COMPUTE]
                    sj.store = <int>h[H_STORE]
                    sj.part = <double*><size_t>h[H_PARTIAL]
                    fo_pool_run(_sumsq_task, &sj, tb.ntasks,
                                1 if _serial(h[H_NELEM]) else _num_threads)
                    total += _combine(sj.part, tb.ntasks)
                norm = sqrt(total)
            if not (norm < INFINITY):       # NaN or inf: the full step's to settle
                return False
            if max_norm >= 0:       # clip_coefficient (fastopt.backends.scalars)
                coef = max_norm / (norm + 1e-6)
                if not (coef < 1.0 or coef != coef):
                    coef = 1.0
        with nogil:
            for k in range(self.ntables):
                row = r + k * L_COLUMNS
                h = <const i64*><size_t>row[L_HEADER]
                _load_table(&tb, h)
                _job_of(&job, &tb, h, ints[3 * k], row[L_ST0], row[L_ST1], row[L_ST2],
                        sc + 17 * k, ints[3 * k + 2], ints[3 * k + 1])
                _run(&job, sc[17 * k + 16] * coef, 0.0, 1.0, 0,
                     _step_serial(threaded, &tb, h), &skipped)
                _note_outcome(h, 0.0, 0)
        if opt is not None:
            # through the dicts, typed (the optimizer's counters are plain
            # instance attributes): about 140 ns, as the same lines in Python
            for st in opt.state:
                counted = <dict?>st
                counted["step"] = counted["step"] + 1
            counted = <dict?>opt.__dict__
            counted["iterations"] = counted["iterations"] + 1
            counted["grad_norm"] = norm if norm_mode else None
            counted["last_lr"] = last_lr
        return norm if norm_mode else True


cdef double _sumsq_chunk(const storage* x, Py_ssize_t start,
                         Py_ssize_t stop) noexcept nogil:
    # Eight independent float64 accumulators (lanes): the adds pipeline
    # without -ffast-math, and the summation order is fixed by the code, not
    # the compiler or the thread count. Written so that gcc vectorizes them
    # (x86-64-v3: two 4-wide vectors, the same sums lane by lane): an array
    # of lanes and a counted loop over blocks of eight. Python's -fwrapv
    # (signed overflow defined) stops the vectorizer on `i + j` indexing, and
    # eight named lanes stayed scalar, the norm pass at 2.3x this time
    # (0.62 -> 0.27 ns per float32 element, one thread, in cache).
    cdef double acc[8]
    cdef Py_ssize_t k, j, n8 = (stop - start) >> 3
    cdef const storage* p = x + start
    cdef double v, w = 0   # (w only selects the float64 load)
    for j in range(8):
        acc[j] = 0
    for k in range(n8):
        for j in range(8):
            v = _load(p, 8 * k + j, w)
            acc[j] += v * v
    for k in range(8 * n8, stop - start):
        v = _load(p, k, w)
        acc[0] += v * v
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))


def sumsq(const storage[::1] x):
    """Sum of squares in float64, independent of the thread count."""
    cdef Py_ssize_t n = x.shape[0], c, nchunks = _nchunks(x.shape[0])
    if n == 0:
        return 0.0
    cdef const storage* xp = &x[0]
    if nchunks == 1:
        return _sumsq_chunk(xp, 0, n)
    cdef double[::1] partial = np.empty(nchunks, dtype=np.float64)
    cdef double total = 0
    with nogil:
        if _num_threads == 1:       # no OpenMP region at all (forked children)
            for c in range(nchunks):
                partial[c] = _sumsq_chunk(xp, c * CHUNK, min(n, (c + 1) * CHUNK))
        else:
            for c in prange(nchunks, schedule="static", num_threads=_num_threads):
                partial[c] = _sumsq_chunk(xp, c * CHUNK, min(n, (c + 1) * CHUNK))
        for c in range(nchunks):  # fixed order
            total += partial[c]
    return total


cdef void _scale_chunk(floating* x, Py_ssize_t start, Py_ssize_t stop,
                       floating c) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(start, stop):
        x[i] = x[i] * c


def scale(floating[::1] x, double c):
    """``x *= c`` in the array's dtype."""
    cdef Py_ssize_t n = x.shape[0], k
    if n == 0:
        return
    cdef floating* xp = &x[0]
    cdef floating cc = <floating>c
    with nogil:
        if _serial(n):
            _scale_chunk(xp, 0, n, cc)
        else:
            for k in prange(_nchunks(n), schedule="static", num_threads=_num_threads):
                _scale_chunk(xp, k * CHUNK, min(n, (k + 1) * CHUNK), cc)


def widen(const storage[::1] src, float[::1] dst):
    """16-bit ``src`` (uint16: bfloat16, int16: float16) -> float32 ``dst``."""
    cdef Py_ssize_t i
    cdef float w = 0
    for i in range(src.shape[0]):
        dst[i] = _load(&src[0], i, w)


def narrow(const float[::1] src, storage[::1] dst):
    """float32 ``src`` -> 16-bit ``dst``, round to nearest even."""
    cdef Py_ssize_t i
    for i in range(src.shape[0]):
        _store(&dst[0], i, src[i])
