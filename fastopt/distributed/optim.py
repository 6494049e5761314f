"""Data-parallel and sharded (ZeRO stage 1/2) optimizers over MPI.

Both wrap an ordinary fastopt optimizer and take the same ``step(grads)``,
plus ``weight=`` (this rank's share of the global batch) and ``error=`` (an
exception this rank hit before the step, shared with every rank so none is
left waiting in a collective).

Reduction order: every rank's gradient is summed with ``MPI_SUM``
(``MPI_Allreduce`` or ``MPI_Reduce_scatter``) in whatever order the MPI
library's algorithm uses, then multiplied by ``1/world_size`` (or each
rank multiplies its own by ``weight`` first). The result is the global
mean gradient up to float rounding of an N-term sum: with two ranks ``a + b``
is exact-order (commutative), so it equals the single-process mean bit for
bit when the single process forms the same sum; with more ranks it may
differ in the last bits. Global norms add per-rank float64 partial sums of
squares (one 16-byte Allreduce), so the clip coefficient matches the
single-process one to float64 rounding.

Overlapped reduction (:meth:`DataParallel.backward_hook`): the same sum per
element, in buckets posted with ``MPI_Iallreduce`` during the backward pass;
each element is still one ``MPI_SUM`` over the ranks followed by the same
scaling, so with two ranks it equals the blocking path bit for bit, and with
more ranks it may differ in the last bits only if the MPI library picks a
different algorithm for a different message size.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import numbers

import numpy as np

from .. import _validate as V
from ..backends.lowp import is_low_precision
from ..optim.base import (Optimizer, _InGroups, _all_finite, _brief, check_weight_values,
                          order_in_checkpoint, prepared_load, schedule_value)
from ..clip import ordered_sum, scaled_sumsq
from ..optim.interrupt import finished
from ..optim.named import KeyTree, is_tree
from ..optim.param_state import as_name
from ..optim.state_format import state_dtype_name
from ..params import FlatArrays, _address, _root, memory_runs
from ..optim.loss_scale import LossScaler
from ..schedules import Schedule, from_dict
from ._comm import DistributedError, agree, install_abort_hook, mpi, mpi_dtype, world
from .cores import check_threads, share_cores

__all__ = ["DataParallel", "ShardedOptimizer"]

#: Smallest overlapped bucket when ``bucket_elems`` is not given (256 KiB of float32).
OVERLAP_BUCKET_ELEMS = 1 << 16


def _setting(value):
    """``value`` as compared across ranks: numbers as floats (0.1 and
    np.float64(0.1) agree), a schedule or loss scaler by its state."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (tuple, list)):
        return tuple(_setting(v) for v in value)
    if isinstance(value, (Schedule, LossScaler)):
        return value.to_dict() if isinstance(value, Schedule) else value.state_dict()
    if callable(value):
        return f"a callable {getattr(value, '__qualname__', type(value).__name__)}"
    return repr(value)


def _frozen(d):
    """``d``'s items as a tuple in key order, lists (nested too) as tuples:
    a snapshot that an in-place edit of a value no longer equals."""
    def freeze(v):
        return tuple(map(freeze, v)) if isinstance(v, list) else v
    return tuple((k, freeze(d[k])) for k in sorted(d, key=str))


def _layout(arrays):
    return [{"shape": list(a.shape), "dtype": str(a.dtype)} for a in arrays]


def _refuse_closure_steps(cls):
    """L-BFGS: its step evaluates the loss through a closure (a line
    search), not the averaged gradients a wrapper hands it (it failed at
    the first step: 'needs a closure')."""
    if getattr(cls, "steps_with_closure", False):
        raise TypeError(f"{cls.__name__} steps with a closure (its line search evaluates "
                        "the loss), not with the averaged gradients this wrapper gives its "
                        "step: run it in one process")


def _check_weight(weight):
    if weight is None:
        return None
    return V.check_real("weight", weight, low=0.0)


def _scale(a, factor):
    if factor == 0.0:
        a.fill(0)      # a rank with no samples: its 0/0 mean gradient is NaN, and NaN * 0 too
    elif factor != 1.0:
        np.multiply(a, a.dtype.type(factor), out=a)


def _wire(a):
    """``[array, MPI type]`` that moves ``a`` bit for bit (16-bit floats as uint16)."""
    if is_low_precision(a.dtype):
        return [a.view(np.uint16), mpi().UINT16_T]
    return [a, mpi_dtype(a.dtype)]


def _reduce_buffer(a, scratch):
    """The buffer to reduce in place of ``a``: ``a`` itself, or for 16-bit
    floats (MPI has no 16-bit float sum) a float32 copy in ``scratch``
    (which exists for 16-bit buffers only: None otherwise)."""
    if scratch is None:
        return a
    np.copyto(scratch, a, casting="unsafe")
    return scratch


def _plan_buckets(offsets, min_elems):
    """Overlap buckets in posting order: runs of whole arrays taken from the
    end of the buffer (where the backward pass starts), each closed once it
    holds at least ``min_elems`` elements; the last one (at offset 0) may be
    smaller. ``offsets``: the arrays' element offsets, then the total."""
    buckets, hi = [], offsets[-1]
    for lo in reversed(offsets[:-1]):
        if hi - lo >= min_elems:
            buckets.append((lo, hi))
            hi = lo
    if hi > 0:
        buckets.append((0, hi))
    return buckets


class _Round:
    """One overlapped reduction: from :meth:`DataParallel.backward_hook` to
    the :meth:`DataParallel.step` that finishes it."""

    def __init__(self, grads, weight, error, data, buf, buckets):
        self.grads, self.weight, self.error = grads, weight, error
        self.data, self.buf = data, buf     # buf: data, its float32 copy, or zeros
        self.buckets = buckets              # posting order: decreasing offsets
        self.starts = [lo for lo, _ in reversed(buckets)]   # ascending, for bisect
        self.left = [hi - lo for lo, hi in buckets]        # elements not yet reported
        self.posted = 0                     # buckets[:posted] are in flight
        self.requests = []
        self.mpi_type = mpi_dtype(buf.dtype)


class _Distributed:
    """What both wrappers share: the communicator, agreement on errors,
    checkpoints written by rank 0, and the optimizer's public attributes."""

    # opt.lr = 0.5 set an attribute no step read: refused, naming the groups
    lr = _InGroups("lr", "lr")
    learning_rate = _InGroups("learning_rate", "lr")

    def _init_comm(self, comm, threads):
        self.comm = world() if comm is None else comm
        if comm is not None and comm.Get_size() > 1:
            # a rank dying of an uncaught exception would leave the others
            # blocked in their next collective: abort them (as world() does)
            install_abort_hook(comm)
        self.rank = self.comm.Get_rank()
        self.world_size = self.comm.Get_size()
        self.bytes_per_step = 0     # gradient + parameter bytes this rank sends per step
        self._threads = check_threads(threads)      # (applied once set up: _share_cores)

    def _share_cores(self):
        """Each rank's share of its machine's cores (``threads``), once every
        rank agreed on the setup: N ranks on one machine each sized their
        BLAS pool and kernel threads for all of it, 7-24x slower training
        (cores.py)."""
        self.threads_per_rank = share_cores(self.comm, self._threads)

    def _setup_agree(self, signature, error, what):
        """One allgather at setup: every rank's layout signature or error,
        and its ``threads`` (sized in a collective after it)."""
        if error is None and getattr(self, "_threads", "auto") != "auto":
            signature = {**signature, "threads": self._threads}
        items = self.comm.allgather(
            ("error", f"{type(error).__name__}: {error}") if error is not None
            else ("ok", signature))
        failed = [(r, m) for r, (kind, m) in enumerate(items) if kind == "error"]
        if failed:
            text = "; ".join(f"rank {r}: {m}" for r, m in failed)
            raise DistributedError(f"{what} failed on {len(failed)} of {self.world_size} "
                                   f"ranks ({text})") from error
        ref = items[0][1]
        threads = [sig.get("threads", "auto") for _, sig in items]
        if len(set(threads)) > 1:
            r = next(r for r, t in enumerate(threads) if t != threads[0])
            raise DistributedError(
                f"{what}: threads={threads[r]!r} on rank {r} but {threads[0]!r} on rank 0: "
                "give every rank the same threads")
        bad = [r for r, (_, sig) in enumerate(items) if sig["hash"] != ref["hash"]]
        if bad:
            r = bad[0]
            raise DistributedError(
                f"{what}: parameter layouts differ across ranks: rank {r} has "
                f"{items[r][1]['brief']} but rank 0 has {ref['brief']} (every rank must "
                "build the same model and param groups)")

    @staticmethod
    def _signature(kind, groups):
        text = repr([kind] + [_layout(g) for g in groups])
        flat = [a for g in groups for a in g]
        return {"hash": hashlib.sha256(text.encode()).hexdigest(),
                "brief": f"{kind} {_brief(_layout(flat))} in {len(groups)} group(s)"}

    def _broadcast(self, arrays):
        """Make every rank start from rank 0's parameters."""
        for _, _, flat in memory_runs(arrays):
            self.comm.Bcast(_wire(flat), root=0)

    # -- the optimizer's public attributes ------------------------------------
    iterations = property(lambda self: self._inner.iterations)
    skipped_steps = property(lambda self: self._inner.skipped_steps)
    grad_norm = property(lambda self: self._inner.grad_norm)
    last_lr = property(lambda self: self._inner.last_lr)
    backend = property(lambda self: self._inner.backend)

    def _forward(name):
        return property(lambda self: getattr(self._inner, name),
                        lambda self, value: setattr(self._inner, name, value))

    max_grad_norm = _forward("max_grad_norm")
    skip_nonfinite = _forward("skip_nonfinite")
    loss_scaler = _forward("loss_scaler")
    del _forward

    def state_nbytes(self) -> int:
        """Bytes of optimizer state (moments, momentum) held on this rank;
        not the float32 master copies of 16-bit params (weights), as for a
        single-process optimizer."""
        return sum(a.nbytes for st in self._inner.state for run in st["runs"]
                   for name, a in run.items() if name != "master")

    def zero_grad(self, grads=V.NOT_GIVEN) -> None:
        """Zero ``grads`` (a FlatArrays shaped like the params) in place."""
        if grads is V.NOT_GIVEN:
            V.refuse_no_grads(type(self).__name__, "zero_grad")
        self._grad_buffer(grads).fill(0)

    def add_param_group(self, param_group) -> None:
        raise NotImplementedError(
            f"{type(self).__name__} cannot add a param group: every rank's layout is "
            "checked and rank 0's params broadcast when it is made; build it over "
            "the optimizer (or params) with every group from the start")

    def bind(self, params) -> None:
        raise NotImplementedError(
            f"{type(self).__name__} cannot bind params later: build it over an "
            "optimizer that has its params")

    def sync_master(self, values=None) -> None:
        """The wrapped optimizer's :meth:`~fastopt.optim.base.Optimizer.sync_master`:
        after writing new values into 16-bit params in place, or with
        ``values``, full-precision weights (pretrained float32 weights for
        bfloat16 training), one array per param in param order (a list, a
        FlatArrays, or a dict by name where the params were given by name):
        the master copies take them exactly and the params their rounding.
        Call it on every rank, with the same values (no communication)."""
        if values is None:
            self._inner.sync_master()
        else:
            self._sync_master_values(values)

    def load_state_dict(self, state_dict) -> None:
        """As an optimizer's: a mismatch raises :class:`fastopt.CheckpointError`
        and changes nothing."""
        prepared_load(self, state_dict)()

    def _settings(self) -> dict:
        """What every rank's step must agree on (passed to :func:`agree`):
        each group's hyperparameters and the step's options. The same dict
        while they are unchanged (agree hashes it once), found by a cheap
        comparison of the raw values: the dict and its hash took 12 us."""
        inner, scaler = self._inner, self._inner.loss_scaler
        # lists as tuples: a list edited in place must not compare equal to itself
        fmt = inner._state_format
        raw = (inner.backend, inner.max_grad_norm, inner.skip_nonfinite, scaler, fmt.name,
               fmt.seed if fmt.compact else None,
               None if scaler is None else _frozen(vars(scaler)),
               tuple(_frozen({k: v for k, v in g.items() if k != "params"})
                     for g in self.param_groups))
        cached = getattr(self, "_settings_cache", None)
        try:
            if cached is not None and cached[0] == raw:
                return cached[1]
        except Exception:      # noqa: BLE001 - a value without ==: described anew
            pass
        out = self._described_settings()
        self._settings_cache = (raw, out)
        return out

    def _weighted(self, settings, weight):
        """``settings`` with whether this rank gave a ``weight``: one rank
        taking the default 1/N while another gives its share would sum the
        gradients with weights that do not add up (the same dict while
        ``settings`` is: hashed once)."""
        if weight is None or settings is None:
            return settings
        cached = getattr(self, "_weighted_cache", None)
        if cached is None or cached[0] is not settings:
            cached = self._weighted_cache = (
                settings, {**settings, "weight": "given (this rank's share of the batch)"})
        return cached[1]

    def _described_settings(self) -> dict:
        inner = self._inner
        # the backend too: each rounds its own way (FMA, summation order), and
        # ranks with different ones (backend="auto" on nodes without the same
        # builds) would step their replicas apart at the last bits
        out = {"backend": inner.backend,
               "max_grad_norm": _setting(inner.max_grad_norm),
               "skip_nonfinite": _setting(inner.skip_nonfinite),
               "loss_scaler": _setting(inner.loss_scaler),
               "state_dtype": inner._state_format.name}
        if inner._state_format.compact:
            # (a seed per rank, the usual habit, rounds each replica differently;
            # float32 state draws no rounding bits)
            out["state_seed"] = inner._state_format.seed
        for gi, group in enumerate(self.param_groups):
            for key in sorted(k for k in group if k != "params"):   # any insertion order
                out[f"param_groups[{gi}][{key!r}]"] = _setting(group[key])
        return out

    def _agree_save_checked(self, error):
        """fastopt.save calls this before the state_dict collective: every
        rank raises if any rank's params or extra failed their checks."""
        agree(self.comm, error, what="checking the checkpoint's params and extra")

    def _coordinate_save(self, write):
        """fastopt.save calls this: rank 0 writes, and every rank learns
        whether it worked (which also makes the save a barrier)."""
        error = None
        if self.rank == 0:
            try:
                write()
            except Exception as exc:   # noqa: BLE001 - shared with every rank below
                error = exc
        agree(self.comm, error, what="saving the checkpoint")


class DataParallel(_Distributed):
    """Replicated optimizer, gradients averaged with ``MPI_Allreduce``.

    ::

        opt = fastopt.distributed.DataParallel(fastopt.AdamW(params, lr=1e-3))
        opt.step(grads)             # grads: a FlatArrays (params.zeros_like())

    ``step`` averages ``grads`` in place across ranks (one in-place
    Allreduce on the flat buffer, or one per ``bucket_elems`` elements), then
    runs the wrapped optimizer's fused step, identical on every rank.
    :meth:`backward_hook` overlaps the averaging with the backward pass
    instead (non-blocking allreduces of buckets of at least
    ``bucket_elems`` elements, posted as the layers' gradients are final). At
    construction the parameter layouts of all ranks are compared (a
    mismatch raises :class:`DistributedError` on every rank) and rank 0's
    parameters are broadcast (``broadcast=False`` skips it).

    ``threads``: this rank's BLAS and kernel threads, set for the process
    when the wrapper is made (:func:`fastopt.distributed.cores.share_cores`):
    ``"auto"`` lowers each pool to the rank's share of its machine's cores
    where it has more; an int sets both; None leaves them. Every rank gives
    the same (compared at setup). ``threads_per_rank``: the rank's share, or
    the int; None with None (or one rank alone).
    """

    def __init__(self, optimizer, *, comm=None, bucket_elems=None, broadcast=True,
                 threads="auto"):
        self._init_comm(comm, threads)
        error = None
        try:
            if not isinstance(optimizer, Optimizer) or optimizer._device:
                raise TypeError("DataParallel wraps a fastopt optimizer over host arrays, got "
                                f"{type(optimizer).__name__}")
            _refuse_closure_steps(type(optimizer))
            if not optimizer.param_groups:
                raise TypeError("DataParallel wraps an optimizer that has its params: make "
                                "it with them (or bind(params) first)")
            if not optimizer._memory_ordered:
                raise ValueError(
                    "DataParallel averages the grads as one FlatArrays laid out like the "
                    "params, but the optimizer lists views of one buffer out of memory "
                    "order (its param groups' order, or a dict's key order: e.g. weights "
                    "and biases of pack([w1, b1, w2, b2]) as two groups): pack them in the "
                    "optimizer's order, pack([w1, w2, b1, b2]), or use ShardedOptimizer, "
                    "which takes any order")
            for p in optimizer._params:
                if not is_low_precision(p.dtype):
                    mpi_dtype(p.dtype)
            if bucket_elems is not None:
                bucket_elems = V.check_int("bucket_elems", bucket_elems, low=1)
            sig = self._signature(type(optimizer).__name__,
                                  [g["params"] for g in optimizer.param_groups])
        except Exception as exc:   # noqa: BLE001 - shared with every rank
            error, sig = exc, None
        self._setup_agree(sig, error, "DataParallel setup")
        self._share_cores()
        self._inner = optimizer
        self.bucket_elems = bucket_elems
        self._cached = None
        self._scratch = None    # float32 reduction buffer for 16-bit grads
        self._round = None      # the overlapped reduction in progress
        self._MPI = mpi()
        self._plan = None       # (min_elems, buckets) for overlapped reductions
        if broadcast:
            self._broadcast(optimizer._params)
            # 16-bit params step from float32 master copies made from each
            # rank's own values: taken again from rank 0's (else each rank's
            # first step brought its own weights back)
            optimizer.sync_master()

    @property
    def optimizer(self):
        return self._inner

    def _sync_master_values(self, values):
        self._inner.sync_master(values)      # a replica: the whole model on each rank

    def param_state(self, param) -> dict:
        """The wrapped optimizer's :meth:`~fastopt.optim.base.Optimizer.param_state`
        (every rank holds the whole state: no communication)."""
        return self._inner.param_state(param)

    @property
    def param_groups(self):
        return self._inner.param_groups

    def lr_schedule(self, group: int = 0):
        """The wrapped optimizer's :meth:`~fastopt.optim.base.Optimizer.lr_schedule`."""
        return self._inner.lr_schedule(group)

    def _grad_buffer(self, grads):
        if grads is self._cached:
            return grads.data
        if not isinstance(grads, FlatArrays):
            raise TypeError("grads must be a FlatArrays laid out like the params (the "
                            "average is one Allreduce over its buffer): params.zeros_like() "
                            "for packed params, fastopt.flat_zeros([p.shape for p in "
                            "params], dtype) for separate arrays (their grads' views are "
                            f"what the backward pass fills); got {type(grads).__name__}")
        self._inner.check_grads(grads)   # the optimizer's own checks, cached by identity
        self._cached = grads
        return grads.data

    def _reduction_buffer(self, data):
        """``data`` itself, or (16-bit grads) the float32 scratch buffer."""
        if is_low_precision(data.dtype) and (self._scratch is None
                                             or self._scratch.size != data.size):
            self._scratch = np.empty(data.size, np.float32)
        return data if not is_low_precision(data.dtype) else self._scratch

    def _buckets(self):
        """The overlap buckets: a function of the parameter layout alone
        (identical on every rank, checked at setup) and ``bucket_elems``."""
        size = self.bucket_elems or OVERLAP_BUCKET_ELEMS
        if self._plan is None or self._plan[0] != size:
            self._plan = (size, _plan_buckets(self._inner._elem_offsets, size))
        return self._plan[1]

    def backward_hook(self, grads, weight=None):
        """Start an overlapped average of ``grads``; returns the callback for
        ``model.loss_and_grad(X, y, on_grads_ready=hook)``.

        ::

            hook, error = opt.backward_hook(model.grads, weight=w), None
            try:
                model.loss_and_grad(xb, yb, on_grads_ready=hook)
            except Exception as exc:
                error = exc
            opt.step(model.grads, weight=w, error=error)   # waits, scales, steps

        ``hook(lo, hi)`` says that ``grads.data[lo:hi]`` holds its final value.
        The buffer is cut into buckets of whole arrays, from its end (the last
        layer, whose gradient the backward pass finishes first), each of at
        least ``bucket_elems`` elements (default :data:`OVERLAP_BUCKET_ELEMS`);
        as soon as every element of the next bucket has been reported, it is
        scaled by ``weight`` (if given) and handed to a non-blocking in-place
        ``MPI_Iallreduce``, and the rest of the backward pass runs while it
        travels. Buckets are always posted in the same order (decreasing
        offsets), whatever order the ranges arrive in, so every rank issues
        the same sequence of collectives.

        :meth:`step` then posts the buckets not yet posted (all of them when
        the backward pass failed part way or never ran, e.g. a rank without
        samples), waits for every request, and only then agrees on errors:
        a rank that failed still takes part in every reduction, so nobody
        waits forever, and every rank raises :class:`DistributedError`.
        Problems with ``grads`` or ``weight`` found here are reported the
        same way, by that ``step``. Every rank must use the hook for the same
        steps; ``step`` must get the same ``grads`` and ``weight``.
        """
        if self._round is not None:
            raise RuntimeError("an overlapped reduction is in progress: call step() to "
                               "finish it before starting another")
        buckets = self._buckets()
        error, w, data, buf = None, None, None, None
        try:
            data = self._grad_buffer(grads)
            w = _check_weight(weight)
            buf = self._reduction_buffer(data)
        except Exception as exc:   # noqa: BLE001 - reported by step(), on every rank
            error = exc
        if error is not None:      # take part in the reductions with zeros
            dtype = self._inner._params[0].dtype
            buf = np.zeros(self._inner._elem_offsets[-1],
                           np.float32 if is_low_precision(dtype) else dtype)
            data = None
        rnd = self._round = _Round(grads, w, error, data, buf, buckets)

        def hook(lo, hi):
            if self._round is not rnd:
                raise RuntimeError("this backward hook's reduction has already finished; "
                                   "get a new hook from backward_hook() for each step")
            if rnd.error is None:
                self._report(rnd, lo, hi)
        return hook

    def _report(self, rnd, lo, hi):
        n = len(rnd.buf)
        if not (0 <= lo <= hi <= n):
            raise ValueError(f"on_grads_ready({lo}, {hi}): not a range of the "
                             f"{n}-element gradient buffer")
        B = len(rnd.buckets)
        i = bisect.bisect_right(rnd.starts, lo) - 1     # ascending index of lo's bucket
        while i < B and rnd.starts[i] < hi:
            j = B - 1 - i                                # posting index
            blo, bhi = rnd.buckets[j]
            rnd.left[j] -= min(hi, bhi) - max(lo, blo)
            if rnd.left[j] < 0 or j < rnd.posted:
                raise ValueError(f"on_grads_ready({lo}, {hi}): part of this range was "
                                 "reported before")
            i += 1
        while rnd.posted < B and rnd.left[rnd.posted] == 0:
            self._post(rnd)
        if rnd.requests:     # let MPI move the buckets in flight along
            self._MPI.Request.Testall(rnd.requests)

    def _post(self, rnd):
        lo, hi = rnd.buckets[rnd.posted]
        view = rnd.buf[lo:hi]
        if rnd.error is None:
            if rnd.buf is not rnd.data:
                np.copyto(view, rnd.data[lo:hi], casting="unsafe")
            if rnd.weight is not None:
                _scale(view, rnd.weight)
        else:          # this rank failed: it adds zeros (nobody steps anyway)
            view[...] = 0
        MPI = self._MPI
        rnd.requests.append(self.comm.Iallreduce(MPI.IN_PLACE, [view, rnd.mpi_type],
                                                 op=MPI.SUM))
        rnd.posted += 1

    def _finish_round(self, grads, weight, error):
        """The step's part of an overlapped reduction: post what is left,
        wait for all of it, then agree on errors."""
        rnd = self._round
        if error is None:
            error = rnd.error
        if error is None:
            try:
                if grads is not rnd.grads:
                    raise ValueError("step() got other grads than backward_hook()")
                w = _check_weight(weight)
                if w != rnd.weight:
                    raise ValueError(f"step(weight={weight!r}) but backward_hook() "
                                     f"was given weight={rnd.weight!r}")
                for gi, g in enumerate(self._inner.param_groups):
                    self._inner._resolve(g, where=f"param_groups[{gi}]")
                settings = self._settings()
            except Exception as exc:   # noqa: BLE001 - shared with every rank
                error = exc
        if error is not None:
            rnd.error, settings = error, None     # the rest goes out as zeros
        try:
            while rnd.posted < len(rnd.buckets):
                self._post(rnd)
            self._MPI.Request.Waitall(rnd.requests)
        finally:
            self._round = None
        agree(self.comm, error, settings=self._weighted(settings, rnd.weight),
              position=self._inner.iterations)
        return rnd.data, rnd.buf, rnd.weight

    def step(self, grads=V.NOT_GIVEN, weight=None, *, error=None):
        """Average ``grads`` over ranks in place, then step.

        ``weight``: this rank's share of the global batch (its samples / all
        samples); the ranks' gradients, each the mean over its own samples,
        are then summed with these weights. Default: 1/world_size each.
        ``error``: an exception this rank hit while computing its gradients;
        every rank then raises :class:`DistributedError` instead of stepping.
        After :meth:`backward_hook`, this finishes that overlapped reduction.
        """
        if grads is V.NOT_GIVEN:
            V.refuse_no_grads(type(self).__name__, "step")
        if self._round is not None:
            data, buf, w = self._finish_round(grads, weight, error)
            return self._apply(grads, data, buf, w)
        w, settings = None, None
        if error is None:
            try:
                data = self._grad_buffer(grads)
                w = _check_weight(weight)
                for gi, g in enumerate(self._inner.param_groups):
                    self._inner._resolve(g, where=f"param_groups[{gi}]")
                settings = self._settings()
            except Exception as exc:   # noqa: BLE001 - shared with every rank
                error = exc
        agree(self.comm, error, settings=self._weighted(settings, w),
              position=self._inner.iterations)
        MPI = mpi()
        buf = self._reduction_buffer(data)
        if buf is not data:
            np.copyto(buf, data, casting="unsafe")
        if w is not None:
            _scale(buf, w)
        n = buf.size
        step = self.bucket_elems or max(n, 1)
        for lo in range(0, n, step):
            self.comm.Allreduce(MPI.IN_PLACE, buf[lo:lo + step], op=MPI.SUM)
        return self._apply(grads, data, buf, w)

    def _apply(self, grads, data, buf, w):
        """After the reduction: the 1/N scaling, 16-bit rounding, the step."""
        if w is None:
            _scale(buf, 1.0 / self.world_size)
        if buf is not data:    # round to the grads' 16-bit dtype (to nearest even)
            np.copyto(data, buf, casting="unsafe")
        # a ring allreduce sends 2 (N-1)/N of the buffer per rank
        self.bytes_per_step = int(2 * (self.world_size - 1) * data.nbytes // self.world_size)
        return self._inner.step(grads)

    def state_dict(self) -> dict:
        """The wrapped optimizer's (identical on every rank): a single-process
        optimizer loads it, and this loads a single-process one."""
        return self._inner.state_dict()

    def _prepare_load(self, sd):
        return self._inner._prepare_load(sd)


class ShardedOptimizer(_Distributed):
    """Optimizer state sharded across ranks (ZeRO stage 1/2).

    ::

        opt = fastopt.distributed.ShardedOptimizer(fastopt.AdamW, params, lr=1e-3,
                                                   max_grad_norm=1.0)
        opt.step(grads)             # grads: a FlatArrays with the params' layout

    ``params`` (an array, a list, or param-group dicts, as for any fastopt
    optimizer) must be views that together tile one contiguous buffer, e.g.
    all the views of :func:`fastopt.pack` (groups may list them in any
    order). Rank r owns the contiguous slice ``bounds[r]:bounds[r+1]`` of
    that buffer and keeps optimizer state only for it (1/N of the moments).

    A step: ``MPI_Reduce_scatter`` of the gradient buffer (each rank gets the
    summed gradient of its slice), the wrapped optimizer's fused step on the
    slice (global-norm clipping and the non-finite check combine per-rank
    partial sums with one 16-byte Allreduce), then ``MPI_Allgatherv`` of the
    updated parameters in place. ``grads`` is read, and scaled in place when
    ``weight`` is given.

    ``state_dict()`` (a collective: call it on every rank) returns the same
    format as the unsharded optimizer, so checkpoints move freely between
    sharded, replicated and single-process runs and across world sizes.
    ``threads``: as :class:`DataParallel`'s.
    """

    def __init__(self, optimizer_cls, params, *, comm=None, broadcast=True, threads="auto",
                 **options):
        self._init_comm(comm, threads)
        error, sig = None, None
        try:
            self._build(optimizer_cls, params, options)
            sig = self._signature(optimizer_cls.__name__, self._global_arrays)
        except Exception as exc:   # noqa: BLE001 - shared with every rank
            error = exc
        self._setup_agree(sig, error, "ShardedOptimizer setup")
        self._share_cores()
        if broadcast:
            self.comm.Bcast(_wire(self._buffer), root=0)
            self._inner.sync_master()     # the 16-bit params' master copies: rank 0's too

    # -- setup ----------------------------------------------------------------
    def _build(self, cls, params, options):
        if not (isinstance(cls, type) and issubclass(cls, Optimizer)):
            raise TypeError(f"optimizer_cls must be a fastopt optimizer class, got {cls!r}")
        _refuse_closure_steps(cls)
        if cls.__name__ == "NAdam":
            # its running momentum product is per-group state outside the
            # buffers this class merges across ranks: a resume would lose it
            raise NotImplementedError("ShardedOptimizer does not shard NAdam yet (its "
                                      "per-group momentum product); use DataParallel")
        if cls.__name__ == "LAMB":
            # its trust ratio needs each tensor's whole norm; a shard holds parts of tensors
            raise NotImplementedError("ShardedOptimizer does not shard LAMB (its per-tensor "
                                      "trust ratio needs whole tensors); use DataParallel")
        if state_dtype_name(options.get("state_dtype", "float32")) != "float32":
            # its checkpoints gather float state buffers element by element
            raise NotImplementedError("ShardedOptimizer does not shard compact state "
                                      "(state_dtype) yet; use DataParallel")
        specs = Optimizer._group_specs(params)
        # params by name are taken in the dict's order, and their names go
        # into checkpoints (which then load by name, as a plain optimizer's)
        arrays, self._names, merged = [], [], None
        for gi, s in enumerate(specs):
            where = f"param_groups[{gi}]['params']"
            if is_tree(s["params"]):
                tree, group = KeyTree.of(s["params"], where)
                # one name per array across the groups, as a plain optimizer
                # checks (two groups' lists of layers would both count from 0)
                merged = tree if merged is None else merged.merge(tree, where)
                arrays.append(group)
                self._names.append(tree.names)
            else:
                arrays.append(V.as_array_list(where, s["params"]))
                self._names.append(None)
        flat = [a for g in arrays for a in g]
        if not flat:
            raise ValueError("params is empty: nothing to optimize")
        root = _root(flat[0])
        dtype = flat[0].dtype
        low = is_low_precision(dtype)
        self._mpi_type = mpi_dtype(np.float32 if low else dtype)   # the reduction's type
        if root.ndim != 1 or not root.flags.c_contiguous or root.dtype != dtype:
            raise ValueError("ShardedOptimizer needs params that are views of one contiguous "
                             "1-D buffer, e.g. fastopt.pack(...) or model.param_groups()")
        offsets = []
        for gi, g in enumerate(arrays):
            offs = []
            for i, a in enumerate(g):
                if _root(a) is not root or a.dtype != dtype or not a.flags.c_contiguous:
                    raise ValueError(f"param_groups[{gi}]['params'][{i}] is not a contiguous "
                                     f"{dtype} view of the same buffer as params[0]; shard "
                                     "one buffer (fastopt.pack all params together)")
                offs.append((_address(a) - _address(root)) // dtype.itemsize)
            offsets.append(offs)
        spans = sorted((o, a.size) for offs, g in zip(offsets, arrays)
                       for o, a in zip(offs, g) if a.size)
        end = 0
        for o, s in spans:
            if o != end:
                raise ValueError("the params do not tile their buffer exactly (a gap or an "
                                 f"overlap at element {min(o, end)}); pass every view of "
                                 "the buffer once")
            end = o + s
        if end != root.size:
            raise ValueError(f"the params cover {end} of the buffer's {root.size} elements; "
                             "pass every view of the buffer")
        n, N, r = root.size, self.world_size, self.rank
        if n < N:
            raise ValueError(f"{n} parameters cannot be sharded over {N} ranks")
        align = 16 if n >= 64 * N else 1     # 64-byte shard starts for float32
        bounds = [min(n, (n * k // N + align // 2) // align * align) for k in range(N)] + [n]
        lo, hi = bounds[r], bounds[r + 1]
        self.bounds = bounds
        self._counts = [b - a for a, b in zip(bounds, bounds[1:])]
        self._buffer, self._n, self._lo, self._hi = root, n, lo, hi
        self._global_arrays = arrays
        self._group_offsets = offsets
        # local groups: the pieces of each group's params inside [lo, hi)
        local_specs, gmap, pieces = [], [], []
        for gi, (spec, g, offs) in enumerate(zip(specs, arrays, offsets)):
            ps, gpos, lpos = [], 0, 0
            for a, o in zip(g, offs):
                s, e = max(o, lo), min(o + a.size, hi)
                if s < e:
                    ps.append((s, e, lpos, gpos + s - o))
                    lpos += e - s
                gpos += a.size
            if ps:
                local_specs.append({**{k: v for k, v in spec.items() if k != "params"},
                                    "params": [root[s:e] for s, e, _, _ in ps]})
                gmap.append(gi)
                pieces.append(ps)
        self._gmap, self._pieces = gmap, pieces
        inner = cls(local_specs, **options)
        if inner._device:
            raise TypeError("ShardedOptimizer shards host arrays; device arrays are not supported")
        inner.grad_stats = self._grad_stats     # norms and finite flags over all shards
        self._inner, self._cls = inner, cls
        self.param_groups = []
        for gi, (spec, g) in enumerate(zip(specs, arrays)):
            hyp = {**inner.defaults, **{k: v for k, v in spec.items() if k != "params"}}
            self.param_groups.append({**inner._validated(hyp, where=f"param_groups[{gi}]"),
                                      "params": g})
        self._schedules, self._lr_shown = {}, {}    # as an unsharded optimizer's
        self._show_lr()
        self._last_lr = None
        self._gshard = np.zeros(hi - lo, dtype)
        # 16-bit grads are reduced in float32, then rounded for the step
        self._send32 = np.empty(n, np.float32) if low else None
        self._gshard32 = np.empty(hi - lo, np.float32) if low else self._gshard
        order = [(s, e) for ps in pieces for s, e, _, _ in ps]
        if inner._memory_ordered and order == sorted(order):
            self._local_grads = FlatArrays(self._gshard, [(e - s,) for s, e in order])
        else:   # groups out of memory order: a list, stepped piece by piece
            self._local_grads = [self._gshard[s - lo:e - lo] for s, e in order]
        self._buffer_shapes = tuple(tuple(a.shape) for _, a in sorted(
            ((o, a) for offs, g in zip(offsets, arrays) for o, a in zip(offs, g)),
            key=lambda t: t[0]))
        self._cached = None
        self._wire = _wire(self._buffer)       # the all-gather's [buffer, MPI type]

    def _grad_stats(self, backend, flats, check):
        """Global norm and finite flag of the reduced gradient: per-rank
        float64 partial sums of squares and non-finite flags, one Allreduce.
        Where the sum overflowed with every gradient finite (float64 values
        past ~1e154), two more, every rank alike (they all see the same
        sums): the largest magnitude, then the sum of squares scaled by it,
        as :func:`fastopt.clip.settled_norm` does in one process."""
        flats = list(flats)
        local = float(ordered_sum(backend.sumsq(f) for f in flats))
        # (the flag whenever the sum is not finite: only finite gradients rescale)
        bad = 0.0 if math.isfinite(local) or _all_finite(math.sqrt(local), flats) else 1.0
        buf = np.array([local, bad])
        MPI = mpi()
        self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        total, finite = buf[0], buf[1] == 0.0
        if total != math.inf or not finite:
            return math.sqrt(total), finite
        flats = [f for f in flats if f.size]
        top = np.array([max((float(np.max(np.abs(f))) for f in flats), default=0.0)])
        self.comm.Allreduce(MPI.IN_PLACE, top, op=MPI.MAX)
        part = np.array([scaled_sumsq(flats, top[0])])
        self.comm.Allreduce(MPI.IN_PLACE, part, op=MPI.SUM)
        return float(top[0]) * math.sqrt(part[0]), True

    # -- the step -------------------------------------------------------------
    @property
    def shard(self):
        """``(lo, hi)``: the slice of the parameter buffer this rank updates."""
        return self._lo, self._hi

    # -- per-param views of the whole model -----------------------------------
    def _locate(self, param) -> tuple:
        """``(group, index in it)`` of ``param``: one of the arrays the
        optimizer was made over, or its name (``"l1.W"``, ``("l1", "W")``)."""
        param = as_name(param)
        for gi, (g, names) in enumerate(zip(self._global_arrays, self._names)):
            for i, a in enumerate(g):
                if a is param or (isinstance(param, str) and names is not None
                                  and names[i] == param):
                    return gi, i
        if isinstance(param, str):
            raise ValueError(f"no param named {param!r} in this ShardedOptimizer")
        if not isinstance(param, np.ndarray):
            raise TypeError("param_state takes one of the arrays, or its name where the "
                            f"params were given by name, not a {type(param).__name__}")
        raise ValueError(f"this ShardedOptimizer does not update that array (shape "
                         f"{param.shape}): pass one of the arrays it was made over, the "
                         "same object, not a copy or a new view")

    def param_state(self, param) -> dict:
        """One param's state as torch's ``opt.state[p]`` holds it (as an
        unsharded optimizer's :meth:`~fastopt.optim.base.Optimizer.param_state`):
        ``{"step": n, "exp_avg": array shaped like param, ...}``, copies. A
        param's state lies on the ranks whose shards it spans, so this is a
        collective, as :meth:`state_dict` (whose state it gathers): call it
        on every rank with the same param; every rank gets it."""
        gi, i = self._locate(param)
        st = self.state_dict()["state"][gi]
        g = self._global_arrays[gi]
        start, a = sum(x.size for x in g[:i]), g[i]
        out = {"step": st["step"]}
        for name, buf in st["buffers"].items():
            out[name] = buf[start:start + a.size].reshape(a.shape)
        return out

    def _sync_master_values(self, values):
        """sync_master(values): the whole model's weights written on every
        rank (the params outside this rank's shard too, which are its copies
        of the others'), this shard's master copies exactly."""
        arrays = [a for g in self._global_arrays for a in g]
        named = [n for names in self._names for n in (names or [])]
        if is_tree(values):
            if len(named) != len(arrays):
                raise TypeError("values must be a list of arrays in param order: it is a "
                                "dict, but the params were not given by name")
            tree, leaves = KeyTree.of(values, "values")
            flat = dict(zip(tree.names, leaves))
            missing = [n for n in named if n not in flat]
            if missing:
                raise ValueError(f"values is missing {missing[0]!r}")
            vals = [flat[n] for n in named]
        else:
            vals = V.as_array_list("values", list(values) if not isinstance(
                values, (np.ndarray, list, tuple)) else values)
        labels = ([f"params[{n!r}]" for n in named] if len(named) == len(arrays)
                  else [f"params[{k}]" for k in range(len(arrays))])
        check_weight_values(vals, arrays, labels)
        dtype = self._buffer.dtype
        full = np.empty(self._n, np.float32 if is_low_precision(dtype) else dtype)
        given = iter(vals)
        for g, offs in zip(self._global_arrays, self._group_offsets):
            for a, o in zip(g, offs):
                full[o:o + a.size] = np.asarray(next(given), full.dtype).ravel()
        rounded = full.astype(dtype)
        lo, hi = self._lo, self._hi
        shard = [full[s:e] for ps in self._pieces for s, e, _, _ in ps]

        def write():        # (idempotent)
            self._inner.sync_master(shard)          # this shard's params and masters
            self._buffer[:lo] = rounded[:lo]
            self._buffer[hi:] = rounded[hi:]
        finished(write)

    def _grad_buffer(self, grads):
        if grads is self._cached:
            return grads.data
        if not isinstance(grads, FlatArrays):
            raise TypeError("grads must be a FlatArrays with the params' layout (e.g. "
                            f"params.zeros_like()), got {type(grads).__name__}")
        if grads.shapes != self._buffer_shapes or grads.dtype != self._buffer.dtype:
            raise ValueError(f"grads {_brief(_layout(grads))} do not match the parameter "
                             f"buffer's layout {_brief(_layout(sorted_views(self)))}")
        if np.shares_memory(grads.data, self._buffer):
            raise ValueError("grads and params share memory")
        self._cached = grads
        return grads.data

    # The global groups show a scheduled lr as the number the next step
    # uses, and keep the schedule apart, as an unsharded optimizer does (the
    # same methods): the shard's groups get the schedule itself.
    _with_schedule = Optimizer._with_schedule
    _take_schedule = Optimizer._take_schedule
    _show_lr = Optimizer._show_lr
    lr_schedule = Optimizer.lr_schedule
    _refuse_unbound = Optimizer._refuse_unbound      # (lr_schedule's)

    @property
    def last_lr(self):
        """The lr each param group's last step used: every group, also one
        with no piece on this rank (the shard's optimizer knows only those)."""
        return self._last_lr

    def _lr_now(self, gi):
        """Group ``gi``'s lr for the coming step (its schedule's value)."""
        lr = self._with_schedule(gi, self.param_groups[gi])["lr"]
        if not callable(lr):
            return lr
        return schedule_value(lr, self._inner.iterations, f"param_groups[{gi}]['lr']")

    def _sync_hypers(self):
        """Copy the (editable) global group hyperparameters into the shard's groups."""
        for li, gi in enumerate(self._gmap):
            inner = self._inner.param_groups[li]
            group = self._with_schedule(gi, self.param_groups[gi])
            for k in [k for k in inner if k != "params" and k not in group]:
                del inner[k]              # removed by the user: gone from the shard's too
            values = {k: v for k, v in group.items() if k != "params"}
            if callable(values.get("lr")) and self._inner._schedules.get(li) is values["lr"]:
                # the shard's group shows this schedule's next number already:
                # written again, the schedule kept its steps off the planned path
                del values["lr"]
            inner.update(values)
        for li, g in enumerate(self._inner.param_groups):
            self._inner._resolve(g, where=f"param_groups[{self._gmap[li]}]")

    def step(self, grads=V.NOT_GIVEN, weight=None, *, error=None):
        """Reduce-scatter ``grads``, step this rank's shard, all-gather the
        params. ``weight`` and ``error`` as in :meth:`DataParallel.step`.
        Returns the pre-clip global norm (when computed), equal on every rank."""
        if grads is V.NOT_GIVEN:
            V.refuse_no_grads(type(self).__name__, "step")
        w, settings = None, None
        if error is None:
            try:
                data = self._grad_buffer(grads)
                w = _check_weight(weight)
                self._sync_hypers()
                lrs = [self._lr_now(gi) for gi in range(len(self.param_groups))]
                settings = self._settings()
            except Exception as exc:   # noqa: BLE001 - shared with every rank
                error = exc
        agree(self.comm, error, settings=self._weighted(settings, w),
              position=self._inner.iterations)
        MPI = mpi()
        send = _reduce_buffer(data, self._send32)
        if w is not None:
            _scale(send, w)
        self.comm.Reduce_scatter([send, self._mpi_type], [self._gshard32, self._mpi_type],
                                 recvcounts=self._counts, op=MPI.SUM)
        if w is None:
            _scale(self._gshard32, 1.0 / self.world_size)
        if self._gshard32 is not self._gshard:
            np.copyto(self._gshard, self._gshard32, casting="unsafe")
        norm = self._inner.step(self._local_grads)
        self._last_lr = lrs
        self._show_lr()
        wire, kind = self._wire
        self.comm.Allgatherv(MPI.IN_PLACE, [wire, self._counts, self.bounds[:-1], kind])
        nbytes = self._buffer.nbytes
        self.bytes_per_step = int(2 * (self.world_size - 1) * nbytes // self.world_size)
        return norm

    # -- checkpoints ----------------------------------------------------------
    def state_dict(self) -> dict:
        """The unsharded optimizer's state_dict, assembled from every shard
        (a collective: every rank calls it, and every rank gets it)."""
        agree(self.comm, None, what="state_dict")     # (a rank elsewhere raises, no hang)
        local = self._inner.state_dict()
        info = {gi: {"hyp": {k: v for k, v in local["param_groups"][li].items()
                             if k != "params"},
                     "step": local["state"][li]["step"],
                     "names": sorted(local["state"][li]["buffers"])}
                for li, gi in enumerate(self._gmap)}
        merged = {}
        for d in self.comm.allgather(info):
            for gi, v in d.items():
                merged.setdefault(gi, v)
        names = sorted({n for v in merged.values() for n in v["names"]})
        dtype = np.dtype(self._inner._group_dtype(0))
        lo = self._lo
        full = {}
        for name in names:
            part = np.zeros(self._hi - lo, dtype)
            for li in range(len(self._gmap)):
                buf = local["state"][li]["buffers"].get(name)
                if buf is not None:
                    for s, e, lp, _ in self._pieces[li]:
                        part[s - lo:e - lo] = buf[lp:lp + e - s]
            out = np.empty(self._n, dtype)
            self.comm.Allgatherv([part, mpi_dtype(dtype)],
                                 [out, self._counts, self.bounds[:-1], mpi_dtype(dtype)])
            full[name] = out
        groups, state = [], []
        for gi, (g, offs) in enumerate(zip(self._global_arrays, self._group_offsets)):
            groups.append({**merged[gi]["hyp"], "params": self._layout_of(gi)})
            bufs = {name: np.concatenate([full[name][o:o + a.size] for o, a in zip(offs, g)])
                    for name in merged[gi]["names"]}
            state.append({"step": merged[gi]["step"], "buffers": bufs})
        return {**{k: local[k] for k in ("type", "iterations", "skipped_steps", "options")},
                "param_groups": groups, "state": state}

    def _layout_of(self, gi) -> list:
        """Group ``gi``'s params as a checkpoint records them (names too,
        when they were given by name)."""
        layout = _layout(self._global_arrays[gi])
        if self._names[gi] is not None:
            layout = [{**d, "name": n} for d, n in zip(layout, self._names[gi])]
        return layout

    def _prepare_load(self, sd):
        """Check an unsharded state_dict against the whole model, keep this
        rank's slice; no communication (every rank reads the same file)."""
        if not isinstance(sd, dict) or not isinstance(sd.get("param_groups"), list) \
                or not isinstance(sd.get("state"), list):
            raise ValueError("checkpoint: not an optimizer state_dict")
        G = len(self._global_arrays)
        if len(sd["param_groups"]) != G or len(sd["state"]) != G:
            raise ValueError("checkpoint has "
                             f"{V.count(len(sd['param_groups']), 'param group')}, this "
                             f"optimizer has {G}")
        in_order = []      # each group's saved buffers in this optimizer's param order
        for gi, (hyp, g) in enumerate(zip(sd["param_groups"], self._global_arrays)):
            saved = hyp.get("params") if isinstance(hyp, dict) else None
            order = order_in_checkpoint(f"checkpoint param_groups[{gi}]", saved,
                                        self._layout_of(gi))
            st = sd["state"][gi]
            bufs = st.get("buffers") if isinstance(st, dict) else None
            if not isinstance(bufs, dict):
                raise ValueError(f"checkpoint: state[{gi}] has no 'buffers' dict")
            total = sum(a.size for a in g)
            for name, a in bufs.items():
                if not isinstance(a, np.ndarray) or a.shape != (total,):
                    raise ValueError(f"checkpoint state[{gi}]['{name}'] is not a "
                                     f"[{total}] array")
            if order is not None:
                starts = np.cumsum([0] + [int(np.prod(d["shape"])) for d in saved])
                bufs = {name: np.concatenate([a[starts[j]:starts[j + 1]] for j in order])
                        for name, a in bufs.items()}
            in_order.append(bufs)
        local_groups, local_state = [], []
        for li, gi in enumerate(self._gmap):
            ps = self._pieces[li]
            local_groups.append({**sd["param_groups"][gi],
                                 "params": _layout(self._inner.param_groups[li]["params"])})
            local_state.append({**sd["state"][gi], "buffers": {
                name: np.concatenate([a[gp:gp + e - s] for s, e, _, gp in ps])
                for name, a in in_order[gi].items()}})
        apply_inner = self._inner._prepare_load(
            {**sd, "param_groups": local_groups, "state": local_state})
        hypers = []
        for gi, hyp in enumerate(sd["param_groups"]):
            hyp = {k: v for k, v in hyp.items() if k != "params"}
            if isinstance(hyp.get("lr"), dict):
                hyp["lr"] = from_dict(hyp["lr"]["schedule"])
            hypers.append(self._inner._validated(hyp, where=f"checkpoint param_groups[{gi}]",
                                                 position=sd["iterations"]))

        def apply():
            apply_inner()
            self._schedules, self._lr_shown = {}, {}
            for group, hyp in zip(self.param_groups, hypers):
                group.update(hyp)
            self._show_lr()
        return apply


def sorted_views(opt):
    """The parameter views of a ShardedOptimizer in buffer order."""
    views = [(o, a) for offs, g in zip(opt._group_offsets, opt._global_arrays)
             for o, a in zip(offs, g)]
    return [a for _, a in sorted(views, key=lambda t: t[0])]
