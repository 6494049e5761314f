"""Where an optimizer's arrays live: a placement, chosen when params are bound.

An optimizer class declares its math (``_element_step``: the step's scalars
and the state buffers its element function reads, in order) and the base
class owns what does not depend on where the arrays are: param groups,
hyperparameters, schedules, counters, checkpoints. A placement owns what
does, behind one small interface:

* taking and checking a group's arrays (``group_arrays``, ``check_params``)
  and splitting them into runs, the arrays stepped as one (``runs``);
* the dtype the step computes in, float32 master copies of 16-bit params,
  state buffers (one per name over a group, with each run's view of it),
  copies to the host for checkpoints;
* the step (``step(opt, grads)``).

:class:`HostPlacement` holds NumPy arrays and runs the compiled host step
(one native call per group: ``Optimizer._host_step``).
:class:`DevicePlacement` holds device arrays (``__cuda_array_interface__``)
and launches the device norm pass and one generic update kernel per run
(:func:`fastopt.backends.numba_cuda.update`), for any optimizer whose
element function the CUDA backend dispatches to; under compact state
(``state_dtype``) one compact kernel per run instead
(:func:`fastopt.backends.numba_cuda.update_compact`), the codes on the device.
"""

from __future__ import annotations

import numpy as np

from .. import _validate as V
from .._memory import state_copy, state_zeros
from ..backends.lowp import compute_dtype, is_low_precision
from ..backends.tables import element_of
from ..params import FlatArrays, in_memory_order, memory_runs


def span(a, lo, hi):
    """``a[lo:hi]`` of a 1-D buffer, or ``a`` itself when that is all of it:
    a device array's slice is a new Python object that costs microseconds
    per step (a packed group steps its whole buffers)."""
    return a if lo == 0 and hi == a.shape[0] else a[lo:hi]


def _bounds(sizes):
    """``(lo, hi)`` of consecutive pieces of ``sizes`` elements."""
    lo, out = 0, []
    for n in sizes:
        out.append((lo, lo + n))
        lo += n
    return out


def _views(buf, room, sizes):
    """Views of ``sizes`` elements at the starts of pieces of ``room``."""
    return [span(buf, lo, lo + n) for (lo, _), n in zip(_bounds(room), sizes)]


def _device_room(sizes):
    """Each run's room in a device state buffer: whole groups of four elements."""
    return [-(-n // 4) * 4 for n in sizes]


def placement_for(backend):
    """The placement of a backend's arrays: the device for ``backend.device``."""
    return DevicePlacement(backend) if getattr(backend, "device", False) else HostPlacement()


class HostPlacement:
    """Host NumPy arrays, stepped by the compiled CPU backends."""

    device = False

    @staticmethod
    def group_arrays(where, given, labels=None):
        """``(checked arrays, packed buffer or None)`` of one group's params
        (runs of views are found by address on the host: :meth:`runs`);
        ``labels``: how errors name each array after ``where`` (by index)."""
        arrays = V.as_array_list(where, given, labels)
        for i, a in enumerate(arrays):
            V.check_float_array(f"{where}{labels[i] if labels else f'[{i}]'}", a,
                                writable=True, allow_low_precision=True)
        return arrays, None

    @staticmethod
    def check_params(named):
        V.check_disjoint(named)

    @staticmethod
    def runs(params, packed):
        """``(start, stop, flat)`` per run: arrays lying end to end in memory."""
        return memory_runs(params)

    memory_ordered = staticmethod(in_memory_order)
    compute_dtype = staticmethod(compute_dtype)
    is_low = staticmethod(is_low_precision)

    @staticmethod
    def master_copy(flat):
        return state_copy(flat, np.float32)     # stepped with the state: placed like it

    @staticmethod
    def state_buffer(sizes, dtype, data=None):
        """One buffer over a group's runs of ``sizes`` elements, laid end to
        end (the compiled step addresses it by element offset), and each
        run's view: zeros, or a copy of ``data`` (a checkpoint's host array)."""
        buf = state_zeros(sum(sizes), dtype) if data is None else state_copy(data)
        return buf, HostPlacement.run_views(buf, sizes)

    @staticmethod
    def run_views(buf, sizes):
        """Each run's view of a state buffer made by :meth:`state_buffer`."""
        return _views(buf, sizes, sizes)

    @staticmethod
    def to_host(a):
        return a

    @staticmethod
    def step(opt, grads):
        return opt._host_step(grads)

    @staticmethod
    def gather(opt, grads):
        """``grads`` checked, as one new 1-D array in param order."""
        grads = opt._checked_grads(grads)     # shapes, dtypes, no overlap with the params
        if isinstance(grads, FlatArrays):
            return grads.data.copy()
        return np.concatenate([g.reshape(-1) for g in grads])


class DevicePlacement:
    """Device arrays (backend ``"cuda"``): params, grads and state on the GPU.

    A group given as one ``DeviceFlatArrays`` is one run (one launch per
    step); any other device array is a run of its own. Every launch goes
    to the default stream; nothing waits for the GPU inside a step except
    the 8-byte skip flag when a step may be skipped (see :meth:`step`).
    """

    device = True

    def __init__(self, backend):
        self.backend = backend

    def group_arrays(self, where, given, labels=None):
        be = self.backend
        if isinstance(given, be.DeviceFlatArrays):
            return list(given), given.data
        if be.is_device_array(given) or isinstance(given, np.ndarray):
            given = [given]
        if not isinstance(given, (list, tuple)):
            raise TypeError(f"{where} must be a device array or a list of them, got "
                            f"{type(given).__name__}")
        return [be.check_array(f"{where}{labels[i] if labels else f'[{i}]'}", a)
                for i, a in enumerate(given)], None

    def check_params(self, named):
        self.backend.check_devices(named)
        self.backend.check_disjoint(named)

    def runs(self, params, packed):
        if packed is not None:
            return [(0, len(params), packed)]
        return [(k, k + 1, self.backend.flat(a)) for k, a in enumerate(params)]

    @staticmethod
    def memory_ordered(params):
        return True      # device grads come as a list or a DeviceFlatArrays, never a FlatArrays

    def compute_dtype(self, dtype):
        return self.backend.compute_dtype(dtype)

    def is_low(self, dtype):
        return self.backend.is_low_precision(dtype)

    def master_copy(self, flat):
        return self.backend.to_master(flat)

    def state_buffer(self, sizes, dtype, data=None):
        """As :meth:`HostPlacement.state_buffer`, with each run's view
        starting at a multiple of four elements: aligned for the four-wide
        update kernel, as a fresh allocation is (one run's view is the
        whole buffer). ``data`` is copied to the device once."""
        room = _device_room(sizes)
        if data is None:
            buf = self.backend.zeros(sum(room), dtype)
        else:
            host = np.zeros(sum(room), dtype)
            for (lo, hi), (a, b) in zip(_bounds(room), _bounds(sizes)):
                host[lo:lo + b - a] = data[a:b]
            buf = self.backend.to_device(host)
        return buf, self.run_views(buf, sizes)

    @staticmethod
    def run_views(buf, sizes):
        """Each run's view of a state buffer made by :meth:`state_buffer`."""
        return _views(buf, _device_room(sizes), sizes)

    @staticmethod
    def to_host(a):
        return a.copy_to_host()

    # -- the step -------------------------------------------------------------------
    def step(self, opt, grads, offsets=None):
        """:meth:`Optimizer.step` on the device.

        The global-norm pass (when clipping, ``skip_nonfinite`` or a loss
        scaler asks for it) leaves the clip coefficient and the skip flag in
        device memory, and the update kernels read them there: with clipping
        alone nothing waits for the GPU, and the returned norm is a
        :class:`~fastopt.backends.numba_cuda.DeviceNorm` (``float(norm)``
        fetches it). When a step can be skipped (``skip_nonfinite`` or a
        loss scaler) the host reads the 8-byte flag once after launching the
        step, to keep step counts and the loss scale exact (as torch's
        GradScaler reads ``found_inf``); the kernels never wait for it.

        ``offsets`` (an :class:`Offsets`): subtracted from the params as the
        kernels read them (SAM's restore fused into the step, see there).
        """
        segments, flats = self.checked_segments(opt, grads)
        return self.launch(opt, segments, flats, offsets)

    def checked_segments(self, opt, grads):
        """``(segments, flats)`` of ``grads``, checked against the params
        (nothing is written): per group ``(run, p, g, lo, hi)`` as in
        :meth:`Optimizer._per_array_segments`, and the 1-D grads."""
        be = self.backend
        if isinstance(grads, be.DeviceFlatArrays):
            # immutable like FlatArrays: checked once, then cached by identity
            if grads is not opt._cached[0]:
                opt._cached = (grads, self._flat_grad_segments(opt, grads))
            segments = opt._cached[1]
            return segments, [seg[2] for segs in segments for seg in segs]
        if isinstance(grads, dict) or opt._seq_root:     # by name, or a list of layers
            grads = opt._grads_as_list(grads)
        flats = self._grad_list(opt, grads)
        segments = opt._per_array_segments(
            lambda k, run: (run["flat"] if run["stop"] - run["start"] == 1
                            else be.flat(opt._params[k])), flats)
        return segments, flats

    def gather(self, opt, grads):
        """``grads`` checked, as one new 1-D device vector in param order."""
        segments, flats = self.checked_segments(opt, grads)
        out = self.backend.zeros(opt._elem_offsets[-1], opt._group_dtype(0))
        lo = 0
        for g in flats:
            if g.size:
                out[lo:lo + g.size].copy_to_device(g)
            lo += g.size
        return out

    def _grad_list(self, opt, grads):
        """Grads given array by array, checked against the params: 1-D views."""
        be, params = self.backend, opt._params
        if be.is_device_array(grads) or isinstance(grads, np.ndarray):
            grads = [grads]
        if not isinstance(grads, (list, tuple)):
            raise TypeError("grads must be a device array or a list of them, got "
                            f"{type(grads).__name__}")
        if len(grads) != len(params):
            raise ValueError(f"grads has {V.count(len(grads), 'array')} but params has "
                             f"{len(params)}")
        flats = []
        for i, (g, p) in enumerate(zip(grads, params)):
            g = be.check_array(f"grads[{i}]", g)
            V.check_same_layout(f"grads[{i}]", g, f"params[{i}]", p)
            flats.append(be.flat(g))
        named = [(f"grads[{i}]", g) for i, g in enumerate(flats)]
        be.check_devices(named)
        be.check_disjoint([(f"params[{i}]", a) for i, a in enumerate(params)], named)
        return flats

    def _flat_grad_segments(self, opt, grads):
        """Segments for grads given as a DeviceFlatArrays: one per run."""
        be, params = self.backend, opt._params
        if grads.shapes != tuple(tuple(p.shape) for p in params):
            raise ValueError(f"grads holds {len(grads.shapes)} arrays of shapes "
                             f"{list(grads.shapes)[:4]}... that do not match the params' "
                             f"{[tuple(p.shape) for p in params][:4]}...")
        if grads.dtype != params[0].dtype or any(p.dtype != grads.dtype for p in params):
            raise TypeError(f"grads has dtype {grads.dtype} but the params have "
                            f"{sorted({str(p.dtype) for p in params})}")
        data = grads.data
        be.check_devices([("grads", data)])
        be.check_disjoint([(f"params[{i}]", a) for i, a in enumerate(params)],
                          [("grads", data)])
        return opt._run_segments(data)

    def _pieces(self, opt, gi, ri, lo, hi):
        """The device :func:`~fastopt.backends.numba_cuda.pieces` of a
        segment's arrays (a two-phase step sums per array): the run's arrays
        when the segment is the whole run, else its one array. Built once per
        segment and kept while the optimizer's runs are the same."""
        cache = getattr(self, "_piece_cache", None)
        if cache is None or cache[0] is not opt._run_info:
            cache = self._piece_cache = (opt._run_info, {})
        key = (gi, ri, lo, hi)
        if key not in cache[1]:
            local = opt._run_info[gi]["runs"][ri]["local"]
            bounds = local if (lo, hi) == (0, local[-1]) else [0, hi - lo]
            cache[1][key] = self.backend.pieces(bounds)
        return cache[1][key]

    def _compact_blocks(self, opt, gi, ri, lo, hi):
        """The device :func:`~fastopt.backends.numba_cuda.compact_blocks` of
        a segment's arrays under compact state: each array's offset in the
        segment and in its group's code buffers (``StateFormat.offsets``).
        Built once per segment and kept while the optimizer's runs are the
        same, as :meth:`_pieces`."""
        cache = getattr(self, "_block_cache", None)
        if cache is None or cache[0] is not opt._run_info:
            cache = self._block_cache = (opt._run_info, {})
        key = (gi, ri, lo, hi)
        if key not in cache[1]:
            runs = opt._run_info[gi]["runs"]
            run, first = runs[ri], runs[0]["start"]
            state_at = opt._state_format.offsets(
                [a.size for a in opt.param_groups[gi]["params"]])
            local = run["local"]
            cache[1][key] = self.backend.compact_blocks(
                [(local[j] - lo, int(state_at[k - first]), local[j + 1] - local[j])
                 for j, k in enumerate(range(run["start"], run["stop"]))
                 if lo <= local[j] and local[j + 1] <= hi])
        return cache[1][key]

    def _codes_to_device(self, opt):
        """Compact state buffers that are host arrays (new codes, zeros,
        or a checkpoint's, loaded) copied to the device, unchanged: the
        state stays compact where the params live."""
        if not opt._state_format.compact:
            return
        for st in opt.state:
            flat = st["flat"]
            for name, buf in flat.items():
                if isinstance(buf, np.ndarray):
                    flat[name] = self.backend.to_device(buf)

    def launch(self, opt, segments, flats, offsets=None):
        """The step once grads are checked: ``segments`` per group as in
        :meth:`Optimizer._per_array_segments`, ``flats`` the 1-D grads whose
        norm the step may need, ``offsets`` an :class:`Offsets` or None."""
        be = self.backend
        hypers, max_norm, check, inv_scale = opt._step_options()
        # every state buffer is allocated before anything is launched
        created = []
        try:
            plans = [opt._group_state(gi, h, created) for gi, h in enumerate(hypers)]
            self._codes_to_device(opt)
        except BaseException:
            opt._forget(created)
            raise
        if offsets is not None:
            offsets.used = True          # from here on, the kernels restore the params
        ctrl = None
        if max_norm is not None or check:
            ctrl = be.norm_control(flats, max_norm=max_norm or 0.0, inv_scale=inv_scale,
                                   check=check)
        fmt = opt._state_format
        for gi, ((s, names), segs, st) in enumerate(zip(plans, segments, opt.state)):
            el = element_of(s, len(names))
            compact = fmt.step_args(gi, names, st)
            for ri, p, g, lo, hi in segs:
                bufs = st["runs"][ri]
                master = bufs.get("master")
                w, out = (p, None) if master is None else (span(master, lo, hi), p)
                off = None if offsets is None else span(offsets.runs[gi][ri], lo, hi)
                if compact is not None:
                    be.update_compact(el, w, g, [st["flat"][n] for n in names], compact,
                                      self._compact_blocks(opt, gi, ri, lo, hi), out, ctrl, off)
                    continue
                pieces = self._pieces(opt, gi, ri, lo, hi) if el.phases == 2 else None
                be.update(el, w, g, [span(bufs[n], lo, hi) for n in names], out, ctrl, off,
                          pieces)
        skip = bool(check and ctrl.skipped())
        if skip:
            # the kernels wrote nothing: forget buffers this step created, so
            # e.g. SGD's first momentum step is still its first next time
            opt._forget(created)
        return opt._finish_step(skip, None if ctrl is None else be.DeviceNorm(ctrl), hypers)


class Offsets:
    """Per group, per run: a device buffer's views laid out like the state
    buffers (:meth:`DevicePlacement.state_buffer`), subtracted from the
    params as a step reads them: SAM's perturbation ``e``, so that
    restoring ``p - e`` and the base step are one pass. ``used`` turns true
    once the step's checks have passed and its kernels are about to be
    launched: from then on they restore the params (a skipped step too)."""

    def __init__(self, runs):
        self.runs = runs
        self.used = False
