"""The memory roofline of a step: streaming kernels that move the same bytes
with trivial arithmetic, timed in the same run as the step.

A fused elementwise optimizer step is bound by memory bandwidth, so the
fastest it can be on this machine, now, is the time of a loop that reads
and writes the same arrays and does nothing else. ``fraction of roofline``
in every report is that loop's time over the step's.
"""

from __future__ import annotations

import numpy as np

_STREAM = {}
_LOOP = {}      # loop_streaming_step's kernel (stream_kernels fills _STREAM whole)

SERIAL_MAX = 1 << 15   # fastopt's kernels (numba_cpu, Cython) run serially up to this size


def stream_kernels():
    """Numba kernels that move a step's bytes with no real math, keyed
    ``rw<read>_<written>`` by the arrays each reads and writes (``rw4_3``:
    AdamW's traffic, ``rw3_2``: SGD with momentum's), and ``read1``, one read
    pass like a norm. ``*_serial``: the same loops on one thread (up to
    ``SERIAL_MAX`` elements a thread launch costs more than the loop, which
    is why fastopt's kernels run serially there too)."""
    if not _STREAM:
        from numba import njit, prange

        from .._openmp import start_numba_threads
        start_numba_threads()     # the same thread pool (and spin) as fastopt's kernels

        def rw4_3(p, g, m, v):
            for i in prange(p.size):
                gi = g[i]
                p[i] += gi
                m[i] += gi
                v[i] += gi

        def rw3_2(p, g, b):
            for i in prange(p.size):
                gi = g[i]
                p[i] += gi
                b[i] += gi

        def rw4_2(p, g, m, v):   # a first pass that updates the state only
            for i in prange(p.size):
                gi = g[i]
                m[i] += gi
                v[i] += gi + p[i]

        def rw3_1(p, m, v):      # a second pass that writes the weights
            for i in prange(p.size):
                p[i] += m[i] + v[i]

        def read1(g):  # fastmath: a vectorised sum
            acc = 0.0
            for i in prange(g.size):
                acc += g[i]
            return acc

        # Only the threaded kernels are cached: Numba's on-disk cache is keyed
        # by the Python function, so a serial twin compiled from the same
        # function would share (and could load) the threaded one's entry.
        for parallel, suffix in ((True, ""), (False, "_serial")):
            jit = dict(parallel=parallel, cache=parallel)
            for fn in (rw4_3, rw3_2, rw4_2, rw3_1):
                _STREAM[fn.__name__ + suffix] = njit(**jit)(fn)
            _STREAM["read1" + suffix] = njit(**jit, fastmath=True)(read1)
    return _STREAM


def streaming_step(passes, arrays, clip=False):
    """A zero-argument callable streaming a step's memory ``passes``
    (``(arrays read, arrays written)`` each, see :attr:`cases.Kind.passes`)
    over ``arrays`` (p, g, then state: as many as the widest pass reads; one
    pool, so a later pass reads what an earlier one wrote, as the step's
    passes do), after one read of g when the step clips."""
    k = stream_kernels()
    suffix = "_serial" if arrays[0].size <= SERIAL_MAX else ""
    kernels = [(k[f"rw{r}_{w}{suffix}"], arrays[:r]) for r, w in passes]
    if clip:
        kernels.insert(0, (k["read1" + suffix], arrays[1:2]))

    def step():
        for kernel, args in kernels:
            kernel(*args)
    if len(kernels) > 1:
        return step
    kernel, args = kernels[0]     # no loop around the one call: it times 1-element steps
    return lambda: kernel(*args)


def loop_streaming_step(params):
    """The roofline of an Adam step inside a training loop: a ``step(grads)``
    that moves that step's bytes over the plain list ``params`` and the
    gradients the loop just made (each array: p and g read, m and v read and
    written, p written: 28 B per float32 element) on one thread.

    ``p += 1e-9 * g`` keeps the model's weights where training left them
    (its loss does not fall) while its forward/backward pass still reads
    them. One thread, so that its time in the loop over its time hot is
    where the loop leaves the bytes (which caches, or memory), with no
    worker to wake: ``fastopt.bench.in_loop``'s roofline row. (The loop of
    ``rw4_3_serial`` with a scale on p's increment: with ``p += g`` the
    weights would run away.)"""
    if "adam_traffic" not in _LOOP:
        from numba import njit

        @njit(cache=True)
        def adam_traffic(p, g, m, v, a):
            for i in range(p.size):
                gi = g[i]
                p[i] += a * gi
                m[i] += gi
                v[i] += gi
        _LOOP["adam_traffic"] = adam_traffic
    kernel = _LOOP["adam_traffic"]
    flat = [p.reshape(-1) for p in params]
    state = [(np.zeros_like(p), np.zeros_like(p)) for p in flat]
    scales = [p.dtype.type(1e-9) for p in flat]     # p's own dtype: no float64 promotion

    def step(grads):
        for p, g, (m, v), a in zip(flat, grads, state, scales):
            kernel(p, g.reshape(-1), m, v, a)
    step.state = state      # (m, v) per array, for tests
    return step
