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
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

from .. import _validate as V
from ..backends.lowp import is_low_precision
from ..optim.base import Optimizer, _all_finite, _brief
from ..params import FlatArrays, _address, _root, memory_runs
from ..schedules import from_dict
from ._comm import DistributedError, agree, mpi, mpi_dtype, world

__all__ = ["DataParallel", "ShardedOptimizer"]


def _layout(arrays):
    return [{"shape": list(a.shape), "dtype": str(a.dtype)} for a in arrays]


def _check_weight(weight):
    if weight is None:
        return None
    return V.check_real("weight", weight, low=0.0)


def _scale(a, factor):
    if factor != 1.0:
        np.multiply(a, a.dtype.type(factor), out=a)


def _wire(a):
    """``[array, MPI type]`` that moves ``a`` bit for bit (16-bit floats as uint16)."""
    if is_low_precision(a.dtype):
        return [a.view(np.uint16), mpi().UINT16_T]
    return [a, mpi_dtype(a.dtype)]


def _reduce_buffer(a, scratch):
    """The buffer to reduce in place of ``a``: ``a`` itself, or for 16-bit
    floats (MPI has no 16-bit float sum) a float32 copy in ``scratch``."""
    if not is_low_precision(a.dtype):
        return a
    np.copyto(scratch, a, casting="unsafe")
    return scratch


class _Distributed:
    """What both wrappers share: the communicator, agreement on errors,
    checkpoints written by rank 0, and the optimizer's public attributes."""

    def _init_comm(self, comm):
        self.comm = world() if comm is None else comm
        self.rank = self.comm.Get_rank()
        self.world_size = self.comm.Get_size()
        self.bytes_per_step = 0     # gradient + parameter bytes this rank sends per step

    def _setup_agree(self, signature, error, what):
        """One allgather at setup: every rank's layout signature or error."""
        items = self.comm.allgather(
            ("error", f"{type(error).__name__}: {error}") if error is not None
            else ("ok", signature))
        failed = [(r, m) for r, (kind, m) in enumerate(items) if kind == "error"]
        if failed:
            text = "; ".join(f"rank {r}: {m}" for r, m in failed)
            raise DistributedError(f"{what} failed on {len(failed)} of {self.world_size} "
                                   f"ranks ({text})") from error
        ref = items[0][1]
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
        """Bytes of optimizer state (moments, momentum) held on this rank."""
        return sum(a.nbytes for st in self._inner.state for run in st["runs"]
                   for a in run.values())

    def load_state_dict(self, state_dict) -> None:
        self._prepare_load(state_dict)()

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
    runs the wrapped optimizer's fused step, identical on every rank. At
    construction the parameter layouts of all ranks are compared (a
    mismatch raises :class:`DistributedError` on every rank) and rank 0's
    parameters are broadcast (``broadcast=False`` skips it).
    """

    def __init__(self, optimizer, *, comm=None, bucket_elems=None, broadcast=True):
        self._init_comm(comm)
        error = None
        try:
            if not isinstance(optimizer, Optimizer) or optimizer._device:
                raise TypeError("DataParallel wraps a fastopt optimizer over host arrays, got "
                                f"{type(optimizer).__name__}")
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
        self._inner = optimizer
        self.bucket_elems = bucket_elems
        self._cached = None
        self._scratch = None    # float32 reduction buffer for 16-bit grads
        if broadcast:
            self._broadcast(optimizer._params)

    @property
    def optimizer(self):
        return self._inner

    @property
    def param_groups(self):
        return self._inner.param_groups

    def _grad_buffer(self, grads):
        if grads is self._cached:
            return grads.data
        if not isinstance(grads, FlatArrays):
            raise TypeError("grads must be a FlatArrays (e.g. params.zeros_like()): the "
                            f"average is one Allreduce over its buffer, got {type(grads).__name__}")
        self._inner._segments(grads)     # the optimizer's own checks, cached by identity
        self._cached = grads
        return grads.data

    def step(self, grads, weight=None, *, error=None):
        """Average ``grads`` over ranks in place, then step.

        ``weight``: this rank's share of the global batch (its samples / all
        samples); the ranks' gradients, each the mean over its own samples,
        are then summed with these weights. Default: 1/world_size each.
        ``error``: an exception this rank hit while computing its gradients;
        every rank then raises :class:`DistributedError` instead of stepping.
        """
        w = None
        if error is None:
            try:
                data = self._grad_buffer(grads)
                w = _check_weight(weight)
                for gi, g in enumerate(self._inner.param_groups):
                    self._inner._resolve(g, where=f"param_groups[{gi}]")
            except Exception as exc:   # noqa: BLE001 - shared with every rank
                error = exc
        agree(self.comm, error)
        MPI = mpi()
        if is_low_precision(data.dtype) and (self._scratch is None
                                             or self._scratch.size != data.size):
            self._scratch = np.empty(data.size, np.float32)
        buf = _reduce_buffer(data, self._scratch)
        if w is not None:
            _scale(buf, w)
        n = buf.size
        step = self.bucket_elems or max(n, 1)
        for lo in range(0, n, step):
            self.comm.Allreduce(MPI.IN_PLACE, buf[lo:lo + step], op=MPI.SUM)
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
    """

    def __init__(self, optimizer_cls, params, *, comm=None, broadcast=True, **options):
        self._init_comm(comm)
        error, sig = None, None
        try:
            self._build(optimizer_cls, params, options)
            sig = self._signature(optimizer_cls.__name__, self._global_arrays)
        except Exception as exc:   # noqa: BLE001 - shared with every rank
            error = exc
        self._setup_agree(sig, error, "ShardedOptimizer setup")
        if broadcast:
            self.comm.Bcast(_wire(self._buffer), root=0)

    # -- setup ----------------------------------------------------------------
    def _build(self, cls, params, options):
        if not (isinstance(cls, type) and issubclass(cls, Optimizer)):
            raise TypeError(f"optimizer_cls must be a fastopt optimizer class, got {cls!r}")
        specs = Optimizer._group_specs(params)
        arrays = [V.as_array_list(f"param_groups[{gi}]['params']", s["params"])
                  for gi, s in enumerate(specs)]
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
        inner._grad_stats = self._grad_stats    # norms and finite flags over all shards
        self._inner, self._cls = inner, cls
        self.param_groups = []
        for gi, (spec, g) in enumerate(zip(specs, arrays)):
            hyp = {**inner.defaults, **{k: v for k, v in spec.items() if k != "params"}}
            self.param_groups.append({**inner._validated(hyp, where=f"param_groups[{gi}]"),
                                      "params": g})
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

    def _grad_stats(self, backend, flats, check):
        """Global norm and finite flag of the reduced gradient: per-rank
        float64 partial sums of squares and non-finite flags, one Allreduce."""
        local = float(sum(backend.sumsq(f) for f in flats))
        bad = 1.0 if check and not _all_finite(math.sqrt(local), flats) else 0.0
        buf = np.array([local, bad])
        MPI = mpi()
        self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        return math.sqrt(buf[0]), buf[1] == 0.0

    # -- the step -------------------------------------------------------------
    @property
    def shard(self):
        """``(lo, hi)``: the slice of the parameter buffer this rank updates."""
        return self._lo, self._hi

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

    def _sync_hypers(self):
        """Copy the (editable) global group hyperparameters into the shard's groups."""
        for li, gi in enumerate(self._gmap):
            self._inner.param_groups[li].update(
                {k: v for k, v in self.param_groups[gi].items() if k != "params"})
        for li, g in enumerate(self._inner.param_groups):
            self._inner._resolve(g, where=f"param_groups[{self._gmap[li]}]")

    def step(self, grads, weight=None, *, error=None):
        """Reduce-scatter ``grads``, step this rank's shard, all-gather the
        params. ``weight`` and ``error`` as in :meth:`DataParallel.step`.
        Returns the pre-clip global norm (when computed), equal on every rank."""
        w = None
        if error is None:
            try:
                data = self._grad_buffer(grads)
                w = _check_weight(weight)
                self._sync_hypers()
            except Exception as exc:   # noqa: BLE001 - shared with every rank
                error = exc
        agree(self.comm, error)
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
        wire, kind = _wire(self._buffer)
        self.comm.Allgatherv(MPI.IN_PLACE, [wire, self._counts, self.bounds[:-1], kind])
        nbytes = self._buffer.nbytes
        self.bytes_per_step = int(2 * (self.world_size - 1) * nbytes // self.world_size)
        return norm

    # -- checkpoints ----------------------------------------------------------
    def state_dict(self) -> dict:
        """The unsharded optimizer's state_dict, assembled from every shard
        (a collective: every rank calls it, and every rank gets it)."""
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
            groups.append({**merged[gi]["hyp"], "params": _layout(g)})
            bufs = {name: np.concatenate([full[name][o:o + a.size] for o, a in zip(offs, g)])
                    for name in merged[gi]["names"]}
            state.append({"step": merged[gi]["step"], "buffers": bufs})
        return {**{k: local[k] for k in ("type", "iterations", "skipped_steps", "options")},
                "param_groups": groups, "state": state}

    def _prepare_load(self, sd):
        """Check an unsharded state_dict against the whole model, keep this
        rank's slice; no communication (every rank reads the same file)."""
        if not isinstance(sd, dict) or not isinstance(sd.get("param_groups"), list) \
                or not isinstance(sd.get("state"), list):
            raise ValueError("checkpoint: not an optimizer state_dict")
        G = len(self._global_arrays)
        if len(sd["param_groups"]) != G or len(sd["state"]) != G:
            raise ValueError(f"checkpoint has {len(sd['param_groups'])} param groups, this "
                             f"optimizer has {G}")
        for gi, (hyp, g) in enumerate(zip(sd["param_groups"], self._global_arrays)):
            if not isinstance(hyp, dict) or hyp.get("params") != _layout(g):
                got = hyp.get("params") if isinstance(hyp, dict) else None
                raise ValueError(f"checkpoint param_groups[{gi}]: params "
                                 f"{_brief(got or [])} do not match this optimizer's "
                                 f"{_brief(_layout(g))}")
            st = sd["state"][gi]
            bufs = st.get("buffers") if isinstance(st, dict) else None
            if not isinstance(bufs, dict):
                raise ValueError(f"checkpoint: state[{gi}] has no 'buffers' dict")
            total = sum(a.size for a in g)
            for name, a in bufs.items():
                if not isinstance(a, np.ndarray) or a.shape != (total,):
                    raise ValueError(f"checkpoint state[{gi}]['{name}'] is not a "
                                     f"[{total}] array")
        local_groups, local_state = [], []
        for li, gi in enumerate(self._gmap):
            ps = self._pieces[li]
            local_groups.append({**sd["param_groups"][gi],
                                 "params": _layout(self._inner.param_groups[li]["params"])})
            st = sd["state"][gi]
            local_state.append({**st, "buffers": {
                name: np.concatenate([a[gp:gp + e - s] for s, e, _, gp in ps])
                for name, a in st["buffers"].items()}})
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
            for group, hyp in zip(self.param_groups, hypers):
                group.update(hyp)
        return apply


def sorted_views(opt):
    """The parameter views of a ShardedOptimizer in buffer order."""
    views = [(o, a) for offs, g in zip(opt._group_offsets, opt._global_arrays)
             for o, a in zip(offs, g)]
    return [a for _, a in sorted(views, key=lambda t: t[0])]
