"""CUDA backend: ``@cuda.jit`` kernels from the ``numba-cuda`` package.

One update function for every optimizer of the family, ``update(el, w, g,
states, out, ctrl)`` (SGD, Adam/AdamW, RMSprop, Adagrad, Adamax, NAdam,
RAdam, Lion, and LAMB's two-phase step: ``el`` says which), plus
``adam_update``/``sgd_update`` (the functional API's), ``sumsq``, ``scale``, ``widen``/``narrow`` and the
device norm pass (``norm_control``), over 1-D C-contiguous **device**
arrays, updated in place where they live. Anything exposing
``__cuda_array_interface__`` is accepted (numba device arrays, CuPy, torch
CUDA tensors); a host NumPy array is an error, never a silent copy.

Kernel conventions (DESIGN.md):

* One generic update kernel (and its four-wide twin) for every optimizer:
  it loads an element, its gradient and up to three state values, calls
  the element function picked at compile time by the type of the step's
  scalars (``_cuda_kernels._step``, as the CPU Numba driver's ``_element``
  does) and stores. The variants (amsgrad, momentum, Nesterov, centered,
  L2 vs decoupled decay, maximize, mixed precision) are runtime flags that
  are uniform across the grid, so no thread diverges; the optimizer and
  the array dtypes specialise the compiled code.
* Grid-stride loops; the grid is one wave of resident blocks, sized from
  the device and the compiled kernel by the occupancy API (fewer blocks for
  small arrays).
* The per-element math is :mod:`fastopt.backends.elements`, the functions
  the CPU Numba backend calls too.
* Scalars are computed once per step in float64 on the host
  (:mod:`fastopt.backends.scalars`, then its ``*_element`` functions)
  and cast to the compute dtype before the launch, passed as the element
  function's NamedTuple: the float32 kernels contain no double-precision
  arithmetic (checked on the PTX by ``tests/test_cuda_ptx.py``).
* No fastmath: IEEE division and sqrt, and NaN/inf stay visible.
* A two-phase step (LAMB: ``ElementStep.phases == 2``) is three generic
  kernels over the run's arrays cut in pieces (:func:`pieces`): per-piece
  float64 sums (a block per piece, the shared-memory tree), per-array
  factors, then the weights; no float atomics, so the result does not
  depend on the grid.
* ``off`` (SAM's perturbation): a buffer subtracted from the weights as
  the kernels read them; without one it is ``()`` and compiled away.
* The global norm is a two-stage reduction: each block sums its grid-stride
  share of squares in float64, reduces them in shared memory in a fixed tree
  order and writes one partial (plus a non-finite flag); a one-block final
  pass adds the partials the same way. The result is deterministic for a
  given launch configuration. No warp intrinsics, so it runs under the CUDA
  simulator (``NUMBA_ENABLE_CUDASIM=1``).
* Clipping and the non-finite skip are decided **on the device**: the final
  pass writes a small control block (``StepControl``): the norm, the gradient
  factor ``clip_coef / loss_scale`` and a skip flag. The update kernels read
  the factor and the flag from device memory (a set flag makes every thread
  return before writing), so nothing crosses back to the host inside a step;
  ``StepControl.norm()`` / ``skipped()`` synchronise when called.

Compact optimizer state (``state_dtype="bfloat16"``/``"int8"``):
:func:`update_compact`, one fused kernel per run (``_cuda_compact``):
decode, the same element function, encode with the CPU's stochastic
rounding and 8-bit map, a thread block per absmax block; the codes and
absmax arrays stay on the device.

Mixed precision: ``float16`` device arrays are IEEE half (native ``cvt``
instructions, round to nearest even); **bfloat16 is passed as a ``uint16``
device array of its bits** (``__cuda_array_interface__`` has no bfloat16
type string), converted with the same formulas as :mod:`fastopt.backends.lowp`.

Importing this module raises ImportError when numba-cuda is missing or no GPU
(and no simulator) is usable, so the registry lists ``"cuda"`` only where it
can run.
"""

from __future__ import annotations

import threading
import weakref

import numpy as np

try:
    import numba_cuda  # noqa: F401  (the maintained CUDA target that numba.cuda resolves to)
    from numba import config as _config
    from numba import cuda
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(f"numba-cuda is not importable ({exc}); "
                      "pip install 'fastopt[cuda]'") from None

from .. import _validate as V
from ..params import PackedViews
from ._cuda_kernels import (PIECE, THREADS, _convert_kernel, _factors_kernel, _finalize_kernel,
                            _finish_kernel, _scale_kernel, _sums_kernel, _sumsq_partial_kernel,
                            _update_kernel, _update_vec_kernel,
                            _weighted_sumsq_partial_kernel)
from ._cuda_compact import _compact_kernel
from .compact import BLOCK as C_BLOCK
from .scalars import AdamScalars, ElementStep, SGDScalars, adam_element, sgd_element

SIMULATOR = bool(getattr(_config, "ENABLE_CUDASIM", False))

if not cuda.is_available():
    raise ImportError("no usable CUDA GPU (numba.cuda.is_available() is False); "
                      "install numba-cuda[cu13] and an NVIDIA driver, or set "
                      "NUMBA_ENABLE_CUDASIM=1 for the simulator")

name = "cuda"
threaded = True
#: marks a backend whose arrays live on a device (the optimizers take the device placement)
device = True

BLOCKS_PER_SM = 8        # grid cap when the occupancy API cannot answer (2048 threads/SM)
_SIM_MAX_BLOCKS = 2      # the simulator runs every thread in Python: keep grids small

_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)
_F16 = np.dtype(np.float16)
_BF16_BITS = np.dtype(np.uint16)
#: storage dtypes a device param may have (uint16 = bfloat16 bits)
STORAGE_DTYPES = (_F32, _F64, _F16, _BF16_BITS)


# -- launch configuration --------------------------------------------------------------
# Grid-stride kernels launched with at most one wave of resident blocks: as
# many blocks of THREADS as the device holds at once *for that compiled
# kernel* (its registers decide; the occupancy API says how many), so no
# partial second wave runs at low occupancy. Asked once per kernel, dtype
# combination and device, then cached.

_resident_cache: dict = {}


def max_blocks() -> int:
    """Upper bound of blocks for the current device (BLOCKS_PER_SM per SM)."""
    if SIMULATOR:
        return _SIM_MAX_BLOCKS
    dev = cuda.get_current_device()
    return int(dev.MULTIPROCESSOR_COUNT) * BLOCKS_PER_SM


def resident_blocks(kernel, key, args) -> int:
    """Blocks of THREADS of ``kernel``, specialised for ``args`` (whose
    dtypes ``key`` names), that are resident on the current device at once."""
    if SIMULATOR:
        return _SIM_MAX_BLOCKS
    dkey = (kernel, cuda.get_current_device().id, key)
    got = _resident_cache.get(dkey)
    if got is None:
        try:
            compiled = kernel.compile(tuple(kernel.typeof_pyval(a) for a in args))
            got = int(compiled.max_cooperative_grid_blocks(THREADS))
        except Exception:   # pragma: no cover - occupancy API unavailable: SM count x 8
            got = 0
        if got <= 0:
            got = max_blocks()
        _resident_cache[dkey] = got
    return got


def vector_ok(*arrays) -> bool:
    """Whether every array (None: absent) starts at a multiple of four
    elements' size, so the update kernels may move four elements per load
    and store (``ld.global.v4.f32`` for float32). Fresh device allocations
    always are; views into a packed buffer are when their offset is a
    multiple of four elements."""
    return all(a is None or _pointer(a) % (4 * a.dtype.itemsize) == 0 for a in arrays)


def grid_blocks(kernel, key, n, args) -> int:
    """Blocks for ``n`` work items: one per THREADS items, at most one wave."""
    return max(1, min((n + THREADS - 1) // THREADS, resident_blocks(kernel, key, args)))


def _launch(kernel, key, n, args) -> int:
    """Launch ``kernel(*args)`` over ``n`` work items (elements, or groups
    of four on the vector path); returns the block count."""
    blocks = grid_blocks(kernel, key, n, args)
    kernel[blocks, THREADS](*args)
    return blocks


# -- device arrays -----------------------------------------------------------------------

def is_device_array(a) -> bool:
    """Whether ``a`` is a device array this backend takes (not a host ndarray)."""
    if isinstance(a, np.ndarray):
        return False
    # on the instance: torch CPU tensors have the property, and it raises
    if hasattr(a, "__cuda_array_interface__"):
        return True
    if SIMULATOR:
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
        return isinstance(a, FakeCUDAArray)
    return False


def as_device(name, a):
    """``a`` as a numba device array (zero copy), or a clear TypeError."""
    if isinstance(a, np.ndarray):
        raise TypeError(f"{name} is a host NumPy array; backend='cuda' steps device arrays "
                        "where they live (numba.cuda.to_device(a), a CuPy array or a torch "
                        "CUDA tensor), it never copies host data implicitly")
    if not is_device_array(a):
        raise TypeError(f"{name} must be a device array (anything exposing "
                        f"__cuda_array_interface__), got {type(a).__name__}")
    if SIMULATOR:
        return a
    from numba.cuda.cudadrv.devicearray import DeviceNDArray
    if isinstance(a, DeviceNDArray):
        return a
    desc = a.__cuda_array_interface__
    # The kernels run on the legacy default stream, which is ordered with the
    # legacy (1) and per-thread (2) default streams: importing an array from
    # those needs no host-side stream synchronisation (numba's default would
    # wait for the producer's stream on every import, every step). An array
    # from another stream is synchronised, to be correct.
    return cuda.from_cuda_array_interface(desc, owner=a,
                                          sync=desc.get("stream") not in (None, 1, 2))


def _pointer(a) -> int:
    if SIMULATOR:
        return a._ary.__array_interface__["data"][0]
    return a.__cuda_array_interface__["data"][0]


def device_of(a) -> int:
    """The ordinal of the GPU holding ``a`` (0 under the simulator)."""
    if SIMULATOR:
        return 0
    try:
        from cuda.bindings import driver as drv
        err, ordinal = drv.cuPointerGetAttribute(
            drv.CUpointer_attribute.CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, _pointer(a))
        if int(err) == 0:
            return int(ordinal)
    except Exception:   # pragma: no cover - bindings missing: trust the current device
        pass
    return current_device_id()


def _contiguous(a) -> bool:
    if SIMULATOR:
        return bool(a._ary.flags.c_contiguous)
    return bool(a.is_c_contiguous())


def check_array(name, a, *, dtypes=STORAGE_DTYPES):
    """Convert and check one device array; returns the numba device array."""
    d = as_device(name, a)
    if np.dtype(d.dtype) not in dtypes:
        raise TypeError(f"{name} must be one of {[str(t) for t in dtypes]} on the device "
                        f"(uint16 holds bfloat16 bits), got {d.dtype}")
    if not _contiguous(d):
        raise ValueError(f"{name} must be C-contiguous")
    return d


#: the simulator has one device and no pointer attributes (tests switch it on)
_CHECK_DEVICES = not SIMULATOR


def current_device_id() -> int:
    return cuda.get_current_device().id


def check_devices(named) -> None:
    """Every array on the current device; raises ValueError naming the odd one."""
    if not _CHECK_DEVICES or not named:
        return
    here = current_device_id()
    for label, a in named:
        dev = device_of(a)
        if dev != here:
            raise ValueError(f"{label} is on GPU {dev} but the step runs on GPU {here} "
                             "(mixed devices); move it or select that device first")


def _device_bounds(a):
    nbytes = a.size * np.dtype(a.dtype).itemsize
    lo = _pointer(a) if nbytes else 0      # empty arrays hold no memory to alias
    return lo, lo + nbytes


def check_disjoint(written, read=()) -> None:
    """No written device array overlaps any other argument (by pointer span)."""
    V.check_disjoint(written, read, bounds=_device_bounds, memory="device memory")


def flat(a):
    """1-D view of a C-contiguous device array."""
    return a if a.ndim == 1 else a.reshape(a.size)


def zeros(n, dtype):
    """A zeroed 1-D device array (state buffers, allocated once): a driver
    memset on a GPU, no host buffer of the array's size."""
    if SIMULATOR or n == 0:
        return cuda.to_device(np.zeros(n, dtype))
    from numba.cuda.cudadrv import driver
    d = cuda.device_array(n, dtype)
    driver.device_memset(d, 0, n * np.dtype(dtype).itemsize)
    return d


def compute_dtype(dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    return _F32 if dtype in (_F16, _BF16_BITS) else dtype


def is_low_precision(dtype) -> bool:
    return np.dtype(dtype) in (_F16, _BF16_BITS)


def to_master(a):
    """float32 device copy of 16-bit device params (the master weights)."""
    m = cuda.device_array(a.size, np.float32)
    widen(a, m)
    return m


# -- per-step control block ----------------------------------------------------------------

_unit: dict = {}


def _unit_control(dtype):
    """A constant control block: factor 1, no skip (steps without norm)."""
    key = (np.dtype(dtype).str, None if SIMULATOR else cuda.get_current_device().id)
    if key not in _unit:
        _unit[key] = cuda.to_device(np.array([1.0, 0.0], dtype))
    return _unit[key]


def _stream_key():
    """Key of the queue this thread's launches go to. Every launch goes to
    the default stream: the legacy one (numba's default) is one queue per
    device, so buffers reused from step to step are ordered for every host
    thread; with ``NUMBA_CUDA_PER_THREAD_DEFAULT_STREAM=1`` each host thread
    has its own, so reused buffers are kept per thread."""
    dev = None if SIMULATOR else current_device_id()
    if getattr(_config, "CUDA_PER_THREAD_DEFAULT_STREAM", 0):
        return dev, threading.get_ident()
    return dev


#: control blocks no StepControl holds, per device (and stream), for later steps
_free_controls: dict = {}
_FREE_CONTROLS_MAX = 8


def _give_back_control(free, pair):
    if len(free) < _FREE_CONTROLS_MAX:
        free.append(pair)


class StepControl:
    """Device-resident result of the global-norm pass of one step.

    ``ctrl64 = [sumsq, norm, factor, skip]`` and its float32 twin
    ``[factor, skip]`` stay on the device; the update kernels read them.
    ``norm()`` and ``skipped()`` copy those 32 bytes back once, which waits
    for the step: call them only when the value is needed.

    The two small device arrays come from a free list (:meth:`take`) and go
    back to it when the StepControl is collected: allocating them cost
    ~0.1 ms of host time per step on an H200 machine. A later step may then
    overwrite them; that is safe because every launch goes to the default
    stream (one queue per device, or per host thread under the per-thread
    default stream: ``_stream_key``), so it runs after every kernel that read
    them, and a StepControl (or DeviceNorm) still referenced keeps its own pair.

    The pair goes back through ``weakref.finalize``, which holds it, never
    through ``__del__``: when the cyclic GC collects a StepControl (an
    optimizer in a reference cycle holds its last norm), arrays that it alone
    referenced are collected with it and numba frees their device memory
    first, so a ``__del__`` putting them back in the list handed out freed
    memory, and the next norm pass wrote into whatever was allocated there
    (seen on the H200: a new optimizer's moments).
    """

    def __init__(self, ctrl64, ctrl32):
        self.ctrl64, self.ctrl32 = ctrl64, ctrl32
        self._host = None

    @classmethod
    def take(cls) -> "StepControl":
        free = _free_controls.setdefault(_stream_key(), [])
        pair = free.pop() if free else (cuda.device_array(4, np.float64),
                                        cuda.device_array(2, np.float32))
        ctrl = cls(*pair)
        weakref.finalize(ctrl, _give_back_control, free, pair).atexit = False
        return ctrl

    def for_dtype(self, dtype):
        return self.ctrl32 if np.dtype(dtype) == _F32 else self.ctrl64[2:4]

    def _read(self):
        if self._host is None:
            self._host = self.ctrl64.copy_to_host()
        return self._host

    def norm(self) -> float:
        return float(self._read()[1])

    def skipped(self) -> bool:
        return bool(self._read()[3] != 0.0)


class DeviceNorm:
    """A global norm that is still on the device: ``float(x)`` fetches it
    (and waits for the step that computed it); nothing syncs before."""

    __slots__ = ("_ctrl",)

    def __init__(self, ctrl: StepControl):
        self._ctrl = ctrl

    def __float__(self):
        return self._ctrl.norm()

    def __repr__(self):
        return f"DeviceNorm({float(self)!r})"

    def __format__(self, spec):
        return format(float(self), spec)

    def _cmp(self, other, op):
        return op(float(self), float(other))

    def __eq__(self, other):
        return self._cmp(other, float.__eq__)

    def __lt__(self, other):
        return self._cmp(other, float.__lt__)

    def __gt__(self, other):
        return self._cmp(other, float.__gt__)

    def __hash__(self):
        return hash(float(self))


def norm_control(flats, *, max_norm=0.0, inv_scale=1.0, check=False,
                 weights=None) -> StepControl:
    """Launch the two-stage global-norm reduction over 1-D device arrays and
    decide clip coefficient and skip on the device. Does not synchronise.
    ``weights``: arrays like ``flats`` (or None): the norm of their
    elementwise products (adaptive SAM's ``|p| g``)."""
    partial, bad = _scratch(1)          # any size: only their types set the grid
    if weights is None:
        kernel, args = _sumsq_partial_kernel, [(x,) for x in flats]
    else:
        kernel, args = _weighted_sumsq_partial_kernel, list(zip(flats, weights))
    nblocks = [grid_blocks(kernel, (kernel, x[0].dtype), x[0].size, (*x, partial, bad, 0))
               for x in args]
    partial, bad = _scratch(max(1, sum(nblocks)))
    off = 0
    for x, nb in zip(args, nblocks):
        kernel[nb, THREADS](*x, partial, bad, off)
        off += nb
    ctrl = StepControl.take()
    _finalize_kernel[1, THREADS](partial, bad, off, ctrl.ctrl64, ctrl.ctrl32,
                                 float(max_norm), float(inv_scale), bool(check))
    return ctrl


_scratch_cache: dict = {}


def _scratch(n):
    """Stage-1 partials and flags, reused from step to step (grown to a power
    of two when needed). Every launch goes to the default stream, so a later
    step's stage 1 cannot overtake an earlier step's stage 2 (per host
    thread under the per-thread default stream: see ``_stream_key``)."""
    key = _stream_key()
    have = _scratch_cache.get(key)
    if have is None or have[0].size < n:
        size = 1 << max(6, (n - 1).bit_length())
        have = (cuda.device_array(size, np.float64), cuda.device_array(size, np.int32))
        _scratch_cache[key] = have
    return have


# -- the backend interface --------------------------------------------------------------

def _fc(p, ctrl):
    return _unit_control(p.dtype) if ctrl is None else ctrl.for_dtype(p.dtype)


def update_args(el: ElementStep, w, g, states=(), out=None, ctrl=None, off=None) -> tuple:
    """The arguments of ``_update_kernel``/``_update_vec_kernel`` for one
    step of ``el``'s optimizer: ``states`` its buffers in the order its
    element function reads them (at most three; absent slots and ``out``
    are replaced by ``w``, which the kernel then never touches there), the
    offset (``()`` for none: no code for it is compiled), the control
    block, the element scalars as their NamedTuple in the compute dtype (a
    float64 value in a float32 kernel would promote its math), the
    maximize sign, the option flags, how many slots are real and whether
    ``out`` is written."""
    t = np.dtype(w.dtype).type
    s0, s1, s2 = (tuple(states) + (w, w, w))[:3]
    return (w, g, s0, s1, s2, () if off is None else off, w if out is None else out,
            _fc(w, ctrl), el.kind(*[t(x) for x in el.values]), t(el.grad_scale), el.flags,
            len(states), out is not None)


def update(el: ElementStep, w, g, states=(), out=None, ctrl=None, off=None,
           pieces=None) -> None:
    """One step of any optimizer of the family on 1-D device arrays: ``el``
    its element step (``scalars.*_element``), ``w`` the weights (the params,
    or their float32 master), ``g`` the gradients, ``states`` its state
    buffers in kernel order, ``out`` the 16-bit params to write (mixed
    precision), ``ctrl`` the step's :class:`StepControl` (clip factor and
    skip flag on the device; None: factor 1, never skip), ``off`` an offset
    laid out like the state and subtracted from ``w`` as the step reads it
    (SAM's restore, fused: the step updates ``w - off``, and a skipped step
    still writes ``w - off``), ``pieces`` the :func:`pieces` of ``w``'s
    arrays (required by a two-phase step, ``el.phases == 2``: its per-array
    sums). A one-phase step takes the four-wide kernel when every array
    allows it (:func:`vector_ok`)."""
    if w.size == 0:
        return
    if el.phases == 2:
        _two_phase(el, w, g, states, out, ctrl, off, pieces)
        return
    vec = vector_ok(w, g, out, off, *states)
    _launch(_update_vec_kernel if vec else _update_kernel,
            (el.kind, w.dtype, g.dtype, None if out is None else out.dtype, off is None),
            (w.size + 3) // 4 if vec else w.size, update_args(el, w, g, states, out, ctrl, off))


class Pieces:
    """The layout of one run of arrays for a two-phase step, on the device:
    each array cut in pieces of at most ``PIECE`` elements (``plo``/``phi``
    their element ranges, ``pk`` their array, ``pfirst`` each array's first
    piece), with the step's per-piece sums (``psx``, ``psy``) and per-array
    factors. Built once per layout (see :func:`pieces`)."""

    def __init__(self, bounds):
        bounds = np.asarray(bounds, np.int64)
        sizes = np.diff(bounds)
        counts = -(-sizes // PIECE)                    # pieces per array (0 if empty)
        pk = np.repeat(np.arange(sizes.size, dtype=np.int64), counts)
        pfirst = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        plo = bounds[pk] + (np.arange(pk.size, dtype=np.int64) - pfirst[pk]) * PIECE
        phi = np.minimum(plo + PIECE, bounds[pk + 1])
        self.narrays, self.npieces = int(sizes.size), int(pk.size)
        self.plo, self.phi, self.pk, self.pfirst = (cuda.to_device(a) for a in
                                                    (plo, phi, pk, pfirst))
        self.psx, self.psy = (cuda.device_array(max(1, self.npieces), np.float64)
                              for _ in range(2))
        self._factors = {}

    def factor(self, dtype):
        """The per-array factors, in the compute dtype the finish reads."""
        key = np.dtype(dtype).str
        if key not in self._factors:
            self._factors[key] = cuda.device_array(max(1, self.narrays), dtype)
        return self._factors[key]


def pieces(bounds) -> Pieces:
    """:class:`Pieces` of the arrays ``bounds[k]:bounds[k + 1]`` of a run."""
    return Pieces(bounds)


def _two_phase(el, w, g, states, out, ctrl, off, pc) -> None:
    """Phase one (state, per-piece sums), the per-array factors, phase two
    (the weights): three launches, ordered on the stream; every grid is
    at most one wave of blocks striding over whole pieces (or arrays)."""
    if not isinstance(pc, Pieces):
        raise TypeError("a two-phase step needs the pieces of its arrays (numba_cuda.pieces)")
    args = update_args(el, w, g, states, out, ctrl, off)
    w_, g_, s0, s1, s2, off_, out_, fc, c, gs, flags, nstate, mixed = args
    factor = pc.factor(w.dtype)
    key = (el.kind, w.dtype, g.dtype, None if out is None else out.dtype, off is None)
    sums = (w_, g_, s0, s1, s2, off_, fc, c, gs, flags, nstate, pc.plo, pc.phi, pc.psx,
            pc.psy)
    finish = (w_, s0, s1, s2, off_, out_, fc, c, flags, nstate, mixed, pc.plo, pc.phi, pc.pk,
              factor)
    if pc.npieces:
        _sums_kernel[grid_blocks(_sums_kernel, key, pc.npieces * THREADS, sums), THREADS](*sums)
    factors = (pc.psx, pc.psy, pc.pfirst, factor, fc, c)
    _factors_kernel[grid_blocks(_factors_kernel, key, pc.narrays * THREADS, factors),
                    THREADS](*factors)
    if pc.npieces:
        _finish_kernel[grid_blocks(_finish_kernel, key, pc.npieces * THREADS, finish),
                       THREADS](*finish)


# -- compact optimizer state (state_dtype "bfloat16" / "int8": compact.py) ----------------

class CompactBlocks:
    """The absmax blocks of one run of arrays, on the device: block ``j``
    steps ``bn[j]`` elements from ``bp[j]`` in the run's weights and
    gradients and ``bs[j]`` in the group's code buffers (see
    ``_cuda_compact``). Built once per layout (:func:`compact_blocks`)."""

    def __init__(self, spans):
        bp, bs, bn = [], [], []
        for plo, slo, n in spans:
            starts = np.arange(0, int(n), C_BLOCK, dtype=np.int64)
            bp.append(plo + starts)
            bs.append(slo + starts)
            bn.append(np.minimum(int(n) - starts, C_BLOCK))
        bp, bs, bn = (np.concatenate(x) if x else np.zeros(0, np.int64) for x in (bp, bs, bn))
        self.count = int(bp.size)
        self.bp, self.bs, self.bn = (cuda.to_device(np.ascontiguousarray(x, np.int64))
                                     for x in (bp, bs, bn))


def compact_blocks(spans) -> CompactBlocks:
    """:class:`CompactBlocks` of a run's arrays, ``spans`` one
    ``(offset in the run's weights, offset in the group's code buffers,
    size)`` per array."""
    return CompactBlocks(spans)


def update_compact(el: ElementStep, w, g, codes, compact, blocks: CompactBlocks, out=None,
                   ctrl=None, off=None) -> None:
    """:func:`update` with compact state: ``codes`` the group's code buffers
    in kernel order (uint16 bfloat16 bits, int8 or uint8), ``compact`` the
    step's :class:`~fastopt.backends.compact.CompactStep` (rounding keys and
    8-bit absmax arrays, all on the device), ``blocks`` the run's
    :class:`CompactBlocks`. Float32 weights and one-phase updates only (the
    optimizers refuse the rest first)."""
    if np.dtype(w.dtype) != _F32 or el.phases != 1 or not 0 < len(codes) <= 3:
        raise ValueError("compact state steps float32 weights with one-phase updates, "
                         "one to three state buffers")
    if blocks.count == 0:
        return
    c0, c1, c2 = (tuple(codes) + (codes[0], codes[0]))[:3]
    key = (el.kind, c0.dtype, c1.dtype, g.dtype, None if out is None else out.dtype, off is None)
    w, g, _, _, _, off, out, fc, c, gs, flags, _, mixed = update_args(el, w, g, (), out, ctrl,
                                                                      off)
    m0, m1, m2 = ((w if a is None else a) for a in (tuple(compact.absmax) + (None, None))[:3])
    keys = tuple(np.uint32(k) for k in (tuple(compact.keys) + (0, 0))[:3])
    args = (w, g, c0, c1, c2, m0, m1, m2, keys, blocks.bp, blocks.bs, blocks.bn, off, out, fc,
            c, gs, flags, len(codes), mixed)
    _compact_kernel[grid_blocks(_compact_kernel, key, blocks.count * THREADS, args),
                    THREADS](*args)


# Adam and SGD by their arrays, as the functional API (fastopt.functional)
# and the probes call them: ``update``'s first four arguments.

def _adam(p, g, m, v, vmax, s: AdamScalars):
    return adam_element(s, vmax is not None), p, g, (m, v) if vmax is None else (m, v, vmax)


def _sgd(p, g, buf, s: SGDScalars):
    return sgd_element(s, buf is not None), p, g, () if buf is None else (buf,)


def adam_args(p, g, m, v, vmax, s: AdamScalars, out=None, ctrl=None) -> tuple:
    """:func:`update_args` of an Adam/AdamW step (vmax None: no amsgrad)."""
    return update_args(*_adam(p, g, m, v, vmax, s), out, ctrl)


def sgd_args(p, g, buf, s: SGDScalars, out=None, ctrl=None) -> tuple:
    """:func:`update_args` of an SGD step (buf None: no momentum)."""
    return update_args(*_sgd(p, g, buf, s), out, ctrl)


def adam_update(p, g, m, v, vmax, s: AdamScalars, out=None, ctrl=None) -> None:
    """One Adam/AdamW step on device arrays (see reference.adam_update)."""
    update(*_adam(p, g, m, v, vmax, s), out, ctrl)


def sgd_update(p, g, buf, s: SGDScalars, out=None, ctrl=None) -> None:
    """One SGD step on device arrays (see reference.sgd_update)."""
    update(*_sgd(p, g, buf, s), out, ctrl)


def sumsq(x) -> float:
    """Sum of squares in float64 (waits for the result)."""
    ctrl = norm_control([x])     # held while read: its block goes back to the free list
    return float(ctrl.ctrl64.copy_to_host()[0])


def scale(x, c: float, ctrl=None) -> None:
    """``x *= c`` (times the control block's factor, unless it says skip)."""
    if x.size:
        _launch(_scale_kernel, x.dtype, x.size, (x, _fc(x, ctrl), np.dtype(x.dtype).type(c)))


def _convert(src, dst) -> None:
    if dst.size:
        _launch(_convert_kernel, (src.dtype, dst.dtype), dst.size, (src, dst))


def widen(src, dst) -> None:
    """16-bit device ``src`` -> float32 device ``dst``."""
    _convert(src, dst)


def narrow(src, dst) -> None:
    """float32 device ``src`` -> 16-bit device ``dst`` (round to nearest even)."""
    _convert(src, dst)


def synchronize() -> None:
    cuda.synchronize()


def set_num_threads(n: int) -> None:   # the CPU thread count does not apply
    pass


def get_num_threads() -> int:
    return 1


def to_device(a):
    """Host array -> new device array (checkpoint loading)."""
    return cuda.to_device(np.ascontiguousarray(a))


#: dtypes the functional API takes on the device (no master copy there)
FLOAT_DTYPES = (_F32, _F64)


# -- flat multi-tensor buffers on the device -------------------------------------------------

class DeviceFlatArrays(PackedViews):
    """Device views laid end to end in one 1-D device buffer, ``data``: the
    device twin of :class:`fastopt.FlatArrays`. An optimizer given one as
    params steps all its views with one launch per step; give it grads as a
    ``DeviceFlatArrays`` of the same layout (``params.zeros_like()``) too.
    """

    @classmethod
    def _check_buffer(cls, data):
        data = check_array("data", data)
        if data.ndim != 1:
            raise TypeError("DeviceFlatArrays needs a 1-D device buffer")
        return data

    def zeros_like(self) -> "DeviceFlatArrays":
        """A zeroed buffer with the same layout (for the gradients)."""
        return DeviceFlatArrays(zeros(self._data.size, self._data.dtype), self._shapes)

    def copy_to_host(self) -> list:
        host = self._data.copy_to_host()
        return [host[a:b].reshape(s) for a, b, s in zip(self._offsets, self._offsets[1:],
                                                        self._shapes)]


def pack(arrays, dtype=None) -> DeviceFlatArrays:
    """Copy host arrays (or device arrays, via the host) into one new device
    buffer; use the returned views from then on."""
    host = [np.asarray(a.copy_to_host() if hasattr(a, "copy_to_host") else a)
            for a in arrays]
    if not host:
        raise ValueError("pack needs at least one array")
    dt = np.dtype(dtype) if dtype is not None else host[0].dtype
    buf = np.concatenate([h.astype(dt, copy=False).reshape(-1) for h in host])
    return DeviceFlatArrays(cuda.to_device(buf), [h.shape for h in host])


def flat_zeros(shapes, dtype=np.float32) -> DeviceFlatArrays:
    """A zeroed device buffer laid out as ``shapes``."""
    n = sum(int(np.prod(s, dtype=np.int64)) for s in shapes)
    return DeviceFlatArrays(zeros(n, dtype), shapes)
