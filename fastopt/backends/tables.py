"""A param group as the compiled step sees it: one table, one native call.

A model is dozens to thousands of arrays, held the way their user holds
them: views of one packed buffer, a plain list, a dict. The compiled CPU
backends step all of a group's arrays in one call, whatever the layout,
from a :class:`StepTable` built once per group:

* per array ``k``: the address of the weights the step updates (the param,
  or its float32 master copy under mixed precision), of the 16-bit param to
  write back (mixed precision only), of its gradient (refreshed every step:
  users make new gradient arrays each step), its size and its offset in the
  group's flat state buffers (one buffer per state name, whatever the
  layout);
* *pieces* ``(k, lo, hi)`` of at most ``CHUNK`` elements, and *tasks*: runs
  of consecutive pieces of about ``CHUNK`` elements. Threads take whole
  tasks, so a thousand small arrays and one large one split alike (PyTorch's
  fused/foreach kernels and apex's ``multi_tensor_apply`` chunk the same
  way), and a norm's per-task partial sums are added in task order: the
  result does not depend on the thread count;
* for updates with a per-array reduction between two passes (LAMB's trust
  ratio, ``ElementStep.phases == 2``): each array's range of pieces
  (``pfirst``), room for two float64 sums per piece (``psum``) and one
  factor per array (``factor``). The pieces' sums are added per array in
  piece order, so these too do not depend on the thread count;
* an optional *offset* per array (``shift``, SAM's perturbation ``e``):
  while one is set the kernels read each weight as ``w - e`` and write the
  stepped weight, so undoing the perturbation and the step are one pass
  (:meth:`StepTable.set_shift`). The header's ``H_SHIFT`` slot is 0 without
  one, and the drivers then run the loops they ran before offsets existed.

Everything here is plain NumPy; the kernels that read a table are in
``_cython/kernels_impl.pxi`` and ``numba_cpu.py``. Backends without a
compiled step (the NumPy reference) walk the same table array by array
(:func:`step_per_array`).
"""

from __future__ import annotations

import numpy as np

from .lowp import compute_dtype, is_low_precision
from . import compact as C
from . import scalars as S
from .threads import ThreadChoice

CHUNK = 1 << 14          # elements per piece and (about) per task
_I64 = np.int64


def address(a) -> int:
    """The data address of a host array."""
    return a.__array_interface__["data"][0]


def storage_code(dtype) -> int:
    """How the kernels read a gradient: 0 the compute type, 1 bfloat16 bits,
    2 float16 bits."""
    name = np.dtype(dtype).name
    return {"bfloat16": 1, "float16": 2}.get(name, 0)


def plan(sizes, chunk=CHUNK):
    """``(pk, plo, phi, tasks)`` for arrays of ``sizes`` (see the module doc)."""
    pk, plo, phi = [], [], []
    for k, n in enumerate(sizes):
        for lo in range(0, n, chunk):
            pk.append(k)
            plo.append(lo)
            phi.append(min(n, lo + chunk))
    tasks, acc = [0], 0
    for j in range(len(pk)):
        acc += phi[j] - plo[j]
        if acc >= chunk:
            tasks.append(j + 1)
            acc = 0
    if tasks[-1] != len(pk):
        tasks.append(len(pk))
    return tuple(np.asarray(x, _I64) for x in (pk, plo, phi, tasks))


def _byte_pairs(arrays) -> np.ndarray:
    """``(start, end)`` byte addresses of each non-empty array, one row each."""
    return np.asarray([(address(a), address(a) + a.nbytes) for a in arrays if a.nbytes],
                      _I64).reshape(-1, 2)


def merged_ranges(arrays, ranges=None) -> np.ndarray:
    """Sorted, disjoint byte ranges ``[lo0, hi0, lo1, hi1, ...]`` covered by
    ``arrays`` (what a step writes), and by ``ranges`` (more such ranges)
    where given: grads are checked against them."""
    pairs = _byte_pairs(arrays)
    if ranges is not None and ranges.size:
        pairs = np.concatenate([pairs, ranges.reshape(-1, 2)])
    if not len(pairs):
        return np.zeros(0, _I64)
    pairs = pairs[np.argsort(pairs[:, 0], kind="stable")]
    reach = np.maximum.accumulate(pairs[:, 1])     # the furthest end so far
    starts = np.flatnonzero(np.r_[True, pairs[1:, 0] > reach[:-1]])
    ends = np.r_[starts[1:] - 1, len(pairs) - 1]
    return np.column_stack([pairs[starts, 0], reach[ends]]).reshape(-1)


class StepTable:
    """One param group's arrays of one storage dtype, as the kernels read them.

    ``weights[k]``: 1-D compute-dtype array the step updates; ``outs[k]``:
    the 16-bit param written back (None unless mixed precision);
    ``params[k]``: the user's array (what a gradient must match);
    ``given[k]``: its data address, bytes and dtype object when the table
    was made (host arrays), which the compiled gradient readers check the
    array still has (an array whose dtype, size or memory changed in place
    goes to the full checks, which refuse it);
    ``index[k]``: its position among the group's params; ``offsets[k]``: its
    element offset in the group's state buffers.
    """

    def __init__(self, weights, outs, params, index, offsets):
        self.weights, self.outs, self.params = list(weights), outs, list(params)
        self.given = np.asarray([(address(p), p.nbytes, id(p.dtype))
                                 if isinstance(p, np.ndarray) else (0, -1, 0)
                                 for p in params], _I64).reshape(-1, 3)
        self.index = list(index)
        self.sizes = [int(w.size) for w in weights]
        self.nelem = sum(self.sizes)
        self.dtype = compute_dtype(params[0].dtype)
        self.grad_dtype = params[0].dtype
        self.compute = 64 if self.dtype == np.float64 else 32
        self.store = storage_code(self.grad_dtype)
        self.waddr = np.asarray([address(w) for w in weights], _I64)
        self.oaddr = (None if outs is None else np.asarray([address(o) for o in outs], _I64))
        self.soff = np.asarray(offsets, _I64)
        self.pk, self.plo, self.phi, self.tasks = plan(self.sizes)
        self.ntasks = len(self.tasks) - 1
        self.partial = np.zeros(max(self.ntasks, 1))
        # two-phase updates: array k's pieces are pfirst[k]:pfirst[k + 1]
        self.pfirst = np.searchsorted(self.pk, np.arange(len(self.sizes) + 1)).astype(_I64)
        self.psum = np.zeros(max(2 * self.pk.size, 1))
        self.factor = np.zeros(max(len(self.sizes), 1))
        self.gaddr = np.zeros(len(weights), _I64)
        self.eaddr = np.zeros(len(weights), _I64)   # the offset column (set_shift)
        self.shift = None         # the offset arrays while one is set, else None
        self._shift_checked = None    # the last offsets set_shift checked (a tuple)
        self.threads = ThreadChoice()    # serial or threaded, from its own timings
        self.grads = None         # 1-D gradient views, for backends that walk arrays
        self.index_global = self.index   # positions among all the optimizer's params
        self._others = None       # byte ranges the step's other tables write (also_written)
        self._set_written(self._writes())
        self._state = (None, (0, 0, 0))
        self.compact_header = None    # set by state_addresses for compact state
        # written by the native step as its last act: calls, norm, skipped
        # (what a step interrupted by Ctrl-C did: fastopt.optim.interrupt);
        # read through a memoryview, whose items are Python floats (half
        # the cost of an ndarray's, on every planned step)
        self.outcome_array = np.zeros(3)
        self.outcome = memoryview(self.outcome_array)
        a = address
        self.addrs = dict(waddr=a(self.waddr), oaddr=0 if outs is None else a(self.oaddr),
                          gaddr=a(self.gaddr), soff=a(self.soff), pk=a(self.pk),
                          plo=a(self.plo), phi=a(self.phi), tasks=a(self.tasks),
                          partial=a(self.partial), pfirst=a(self.pfirst),
                          psum=a(self.psum), factor=a(self.factor), eaddr=a(self.eaddr),
                          given=a(self.given))
        # the same, in the order of the Cython kernels' H_* positions; the
        # last (H_SHIFT) is the offset column's address while one is set
        self.header = np.asarray(list(self.addrs.values())[:8]
                                 + [self.ntasks, self.nelem, self.addrs["partial"],
                                    self.compute, self.store, self.addrs["pfirst"],
                                    len(self.sizes), self.addrs["psum"],
                                    self.addrs["factor"], address(self.outcome_array), 0], _I64)
        self.header_addr = address(self.header)

    def state_addresses(self, buffers, compact=None) -> tuple:
        """Addresses of the group's state buffers in kernel slot order (0 for
        an unused slot), cached while the buffers are the same objects.
        ``compact`` (a :class:`~fastopt.backends.compact.CompactStep`): its
        absmax arrays are written too."""
        cached = self._state[0]
        if buffers is cached:          # the same tuple as the last step (immutable)
            return self._state[1]
        extra = () if compact is None else tuple(a for a in compact.absmax if a is not None)
        # The key holds the arrays themselves, not their ids: a buffer a
        # skipped step made and dropped is freed, and a new one could reuse its
        # id at another address (a stale cached address is a use-after-free).
        key = buffers if type(buffers) is tuple and not extra else tuple(buffers) + extra
        if cached is None or len(cached) != len(key) or any(
                a is not b for a, b in zip(cached, key)):
            addrs = [address(b) for b in buffers] + [0] * (3 - len(buffers))
            self._set_written(self._writes() + list(buffers) + list(extra))
            # compact state, as the Cython kernels take it: kind (1 bfloat16, 2
            # 8-bit), the codes' and absmax arrays' addresses, int8 (signed) codes
            self.compact_header = None if compact is None else (
                1 if buffers[0].dtype == np.uint16 else 2, tuple(addrs[:len(buffers)]),
                tuple(0 if a is None else address(a) for a in compact.absmax),
                tuple(b.dtype == np.int8 for b in buffers))
            # the key last: an exception (a Ctrl-C) before it leaves the cache
            # missing, to be made again, never hit with the rest unmade
            self._state = (key, tuple(addrs))
        elif key is not cached:
            self._state = (key, self._state[1])   # the same arrays: the newest key hits next
        return self._state[1]

    def set_shift(self, offsets) -> None:
        """Make the next step read each weight as ``weights[k] - offsets[k]``
        (1-D arrays of the weights' dtype and sizes, checked here) and write
        the stepped weight: SAM's restore fused into the base step (a
        tuple: the same tuple again is not checked again). The
        backend's ``step`` clears it once a step has applied it; a step that
        skips (non-finite gradients) leaves it set and writes nothing, so
        the caller sees it still pending (SAM's ``_settle_shifts`` restores
        it then)."""
        if offsets is not self._shift_checked:     # the same tuple again: checked already
            if self.outs is not None:
                raise ValueError("an offset reads the weights as they are stored: not with "
                                 "16-bit params and their float32 master copy")
            if type(offsets) is not tuple or len(offsets) != len(self.weights) or any(
                    not isinstance(e, np.ndarray) or e.dtype != w.dtype or e.shape != w.shape
                    or not e.flags.c_contiguous for e, w in zip(offsets, self.weights)):
                raise ValueError("offsets must be a tuple of one 1-D contiguous array per "
                                 "weight, of its dtype and size")
            self.eaddr[:] = [address(e) for e in offsets]
            self._shift_checked = offsets
        self.shift = offsets
        self.header[-1] = self.addrs["eaddr"]

    def clear_shift(self) -> None:
        """No offset: the next step reads the weights as they are."""
        self.header[-1] = 0
        self.shift = None

    def _set_written(self, arrays):
        """Everything the step writes, as sorted byte ranges grads must miss:
        ``arrays`` (this table's) and what :meth:`also_written` gave. Where
        those ranges cover ``arrays`` already, they are used as they are: one
        array shared by all the step's tables (its gather reads it for every
        grad: a copy per table of a thousand groups' ranges took 16 MB and a
        cache miss per grad)."""
        self._own_written = list(arrays)
        shared = self._others
        self.written = (shared if shared is not None and _covers(shared, arrays)
                        else merged_ranges(self._own_written, shared))
        self.written_addr = address(self.written) if self.written.size else 0

    def also_written(self, ranges) -> None:
        """Byte ranges (as :func:`merged_ranges` makes them) of what the
        step's other tables write (other param groups' params and state, or
        another dtype's in this group): this table's grads must miss them
        too, since those may be updated before this table reads its grads."""
        self._others = ranges
        self._set_written(self._own_written)

    def _writes(self):
        return list(self.weights) + list(self.outs or ())

    def grads_from_flat(self, data, starts):
        """Gradient addresses from one flat buffer: array k at element ``starts[k]``."""
        base, item = address(data), data.itemsize
        self.gaddr[:] = base + np.asarray(starts, _I64) * item
        self.grads = [data[s:s + n] for s, n in zip(starts, self.sizes)]

    def grads_from_arrays(self, flats):
        """Gradient addresses (and 1-D views) from checked arrays."""
        self.gaddr[:] = [address(g) for g in flats]
        self.grads = flats


def _covers(ranges, arrays) -> bool:
    """Whether the merged ``ranges`` hold every byte of ``arrays``."""
    pairs = _byte_pairs(arrays)
    if not len(pairs):
        return True
    starts, ends = ranges[0::2], ranges[1::2]
    at = np.searchsorted(starts, pairs[:, 0], side="right") - 1
    return bool(np.all(at >= 0) and np.all(pairs[:, 1] <= ends[np.maximum(at, 0)]))


def refuse_each_other(tables, extra=()) -> list:
    """Make each of a step's ``tables`` refuse grads that overlap what any of
    them writes (their params) or ``extra`` (state buffers): a table's
    grads may be read after another table was updated. Returns ``extra``."""
    extra = list(extra)
    everything = merged_ranges([a for t in tables for a in t._writes()] + extra)
    for t in tables:
        t.also_written(everything)
    return extra


def check_unshifted(table) -> None:
    """Compact state steps without an offset (SAM keeps its two passes
    there): refuse one before anything is written."""
    if table.shift is not None:
        raise ValueError("a table offset (SAM's fused restore) is not read by the "
                         "compact-state kernels")


def group_tables(params, weights, outs, offsets):
    """The tables of one param group: one per gradient storage dtype (a
    group mixing float32 and bfloat16 params steps each kind in its own call).

    ``weights[k]``/``outs[k]`` as in :class:`StepTable` for every param of
    the group; ``offsets[k]`` the element offset of param ``k``."""
    kinds = {}
    for k, p in enumerate(params):
        kinds.setdefault(p.dtype, []).append(k)
    tables = []
    for dt, ks in kinds.items():
        low = is_low_precision(dt)
        tables.append(StepTable([weights[k] for k in ks],
                                [outs[k] for k in ks] if low else None,
                                [params[k] for k in ks], ks, [offsets[k] for k in ks]))
    return tables


# Step scalars -> the compiled kernels' element step (with the number of
# state buffers, where it says which options are on).
_ELEMENTS = {
    S.AdamScalars: lambda s, nstate: S.adam_element(s, nstate == 3),       # amsgrad
    S.SGDScalars: lambda s, nstate: S.sgd_element(s, nstate == 1),         # momentum
    S.RMSpropScalars: lambda s, nstate: S.rmsprop_element(s),
    S.AdagradScalars: lambda s, nstate: S.adagrad_element(s),
    S.LionScalars: lambda s, nstate: S.lion_element(s),
    S.AdamaxScalars: lambda s, nstate: S.adamax_element(s),
    S.NAdamScalars: lambda s, nstate: S.nadam_element(s),
    S.RAdamScalars: lambda s, nstate: S.radam_element(s),
    S.LAMBScalars: lambda s, nstate: S.lamb_element(s),
}


def element_maker(kind):
    """``make(s, nstate)``: :func:`element_of` for step scalars of type
    ``kind``, looked up once (the step plan keeps it)."""
    make = _ELEMENTS.get(kind)
    if make is None:
        raise TypeError(f"no element function for {kind.__name__}")
    return make


def element_of(s, nstate):
    """The compiled kernels' :class:`~fastopt.backends.scalars.ElementStep`
    for an optimizer's step scalars and its number of state buffers."""
    return element_maker(type(s))(s, nstate)


def step_per_array(be, table, s, buffers, coef, compact=None):
    """The table's step array by array with ``be``'s per-array functions:
    for backends without a compiled table step (the NumPy reference).

    Compact state (``compact`` a :class:`~fastopt.backends.compact.CompactStep`,
    ``buffers`` the codes): each array's state is decoded to float32, stepped
    by the same functions, and encoded again (:mod:`fastopt.backends.compact`)."""
    s = s._replace(grad_scale=s.grad_scale * coef)
    for k, (w, g) in enumerate(zip(table.weights, table.grads)):
        lo = int(table.soff[k])
        if compact is None:
            st = [b[lo:lo + w.size] for b in buffers]
        else:
            st = [C.decode_span(b, a, lo, w.size) for b, a in zip(buffers, compact.absmax)]
        _update_array(be, s, w, g, st, None if table.outs is None else table.outs[k])
        if compact is not None:
            for x, b, a, key in zip(st, buffers, compact.absmax, compact.keys):
                C.encode_span(x, b, a, lo, key)


def _update_array(be, s, w, g, st, out):
    """One array's step with ``be``'s per-array function of ``s``'s optimizer
    (``st``: its state, 1-D float arrays in kernel order)."""
    if isinstance(s, S.AdamScalars):
        be.adam_update(w, g, st[0], st[1], st[2] if len(st) == 3 else None, s, out)
    elif isinstance(s, S.RMSpropScalars):   # square_avg [grad_avg] [momentum_buffer]
        ga = st[1] if s.centered else None
        buf = st[-1] if s.momentum > 0.0 else None
        be.rmsprop_update(w, g, st[0], ga, buf, s, out)
    elif isinstance(s, S.AdagradScalars):
        be.adagrad_update(w, g, st[0], s, out)
    elif isinstance(s, S.LionScalars):
        be.lion_update(w, g, st[0], s, out)
    elif isinstance(s, S.AdamaxScalars):
        be.adamax_update(w, g, st[0], st[1], s, out)
    elif isinstance(s, S.NAdamScalars):
        be.nadam_update(w, g, st[0], st[1], s, out)
    elif isinstance(s, S.RAdamScalars):
        be.radam_update(w, g, st[0], st[1], s, out)
    elif isinstance(s, S.LAMBScalars):
        be.lamb_update(w, g, st[0], st[1], s, out)
    else:
        be.sgd_update(w, g, st[0] if st else None, s, out)
