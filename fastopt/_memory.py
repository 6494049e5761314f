"""Where a large optimizer-state buffer starts in memory.

An optimizer makes its state buffers one after another, the same size: two
``np.zeros`` of a power-of-two byte count ``S`` land exactly ``S + 4096``
bytes apart (glibc maps each with a one-page header, the next map right
below the last). On the development machine (2-core Zen 4 VM) a stream pair
at that distance is pathological: the bfloat16 AdamW step at 64M
parameters, whose m and v codes are two such buffers, took 27-29 ms with
them ``S + 4096`` apart and 22-24 ms at ``S``, ``S + 1024``, ``S + 2048``,
``S + 3072``, ``S + 5120`` or ``S + 7168`` (same process, one kernel,
buffers carved from one allocation; docs/performance.md). Only that distance
(within about 200 bytes) was slow, which looks like DRAM bank conflicts
rather than anything in the cache.

So a large state buffer starts 64-byte aligned (whole cache lines, for the
512-bit loads) at an address whose offset in its page turns through four
quarter pages, so two made one after the other are never a whole number of
pages apart. (The offset is taken from the address, not into the
allocation: glibc serves a freed size from its heap once it has raised its
mmap threshold, at any place in a page, and an offset into the allocation
then left two buffers a whole number of pages apart in about one case in
64: a CI run saw it.) Small buffers are ordinary arrays. The params' and grads'
places matter too (docs/performance.md), and those are the user's.
"""

from __future__ import annotations

import itertools

import numpy as np

#: buffers of at least this many bytes get a placed start
LARGE = 1 << 22
_PAGE = 4096
_turn = itertools.count()


def state_zeros(n: int, dtype) -> np.ndarray:
    """A zero 1-D array of ``n`` elements of ``dtype``; a large one starts
    at the next quarter page's offset in a page (64-byte aligned; a view
    of its allocation: ``.base``)."""
    dtype = np.dtype(dtype)
    nbytes = int(n) * dtype.itemsize
    if nbytes < LARGE:
        return np.zeros(n, dtype)
    in_page = 1024 * (next(_turn) % 4)      # where in its page it starts (64-byte aligned)
    raw = np.zeros(nbytes + _PAGE, np.uint8)
    start = (in_page - raw.ctypes.data) % _PAGE
    return raw[start:start + nbytes].view(dtype)


def state_copy(a, dtype=None) -> np.ndarray:
    """A copy of ``a`` (its shape; in ``dtype``, by default its own) placed
    as :func:`state_zeros` places it."""
    a = np.asarray(a)
    out = state_zeros(a.size, a.dtype if dtype is None else dtype)
    out[...] = a.reshape(-1)
    return out.reshape(a.shape)
