"""How an optimizer keeps its state: float values, or compact codes.

``state_dtype`` (an option of every optimizer with an elementwise update):

* ``"float32"`` (default): one buffer per state name and param group, in
  the params' compute dtype (float32, or float64 for float64 params);
* ``"bfloat16"``: the same buffers as uint16 bfloat16 bits, rounded
  stochastically (2 bytes per value instead of 4);
* ``"int8"``: 8-bit codes on a logarithmic grid with a float32 absmax per
  block of 256 (about 1 byte per value); signed codes (int8) for the
  buffers that take both signs, unsigned (uint8, never 0 for a positive
  value) for those an optimizer declares non-negative
  (``Optimizer._nonnegative_state``: second moments, accumulators).

The codecs and the layout are :mod:`fastopt.backends.compact`'s; this module
is the optimizer's side: the choice and its checks, the buffers, the
per-step rounding keys, and the buffers' checkpoint form. An 8-bit buffer's
absmax array is kept beside it in the group's state as ``name + ABSMAX``.

The rounding key of a bfloat16 buffer at a step mixes ``state_seed``, the
step number (the group's applied steps + 1: a skipped step draws the same
bits again) and the buffer (its group and name): a run resumed from a
checkpoint rounds exactly as the uninterrupted one, whatever the threads.
"""

from __future__ import annotations

import numpy as np

from .. import _validate as V
from .._memory import state_zeros
from ..backends import compact as C

#: the state_dtype of float state
FLOAT = "float32"
#: suffix of an 8-bit state buffer's absmax array (in the group's state and checkpoints)
ABSMAX = ".absmax"


def moved_parts(buf, parts, order):
    """``buf``'s parts (``(start, length)`` along its last axis) in the
    order ``order``: part ``order[i]`` first at ``i``."""
    return np.concatenate([buf[..., parts[j][0]:parts[j][0] + parts[j][1]] for j in order],
                          axis=-1)


def element_parts(sizes) -> list:
    """``(start, length)`` of arrays of ``sizes`` laid end to end."""
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    return [(int(s), int(k)) for s, k in zip(starts, sizes)]


def state_dtype_name(state_dtype):
    """``state_dtype`` as its name: a NumPy dtype-like's (``np.float32`` ->
    ``"float32"``), a string as it is; anything else as it was (refused by
    :meth:`StateFormat.of`, showing it)."""
    if isinstance(state_dtype, str) or state_dtype is None:
        return state_dtype
    try:
        return np.dtype(state_dtype).name
    except TypeError:
        return state_dtype


class StateFormat:
    """An optimizer's ``state_dtype`` and ``state_seed``, checked (see the module doc)."""

    __slots__ = ("name", "seed", "ids", "nonnegative")

    def __init__(self, name, seed, names, nonnegative):
        self.name, self.seed = name, seed
        self.ids = {n: i for i, n in enumerate(names)}      # a buffer's part of its key
        self.nonnegative = frozenset(nonnegative)

    @classmethod
    def of(cls, opt_cls, state_dtype, state_seed, backend="auto") -> "StateFormat":
        """The format ``opt_cls`` keeps its state in, or a clear refusal."""
        state_dtype = state_dtype_name(state_dtype)    # np.float32, np.int8, ml_dtypes' bfloat16
        if not isinstance(state_dtype, str) or state_dtype not in C.STATE_DTYPES:
            raise ValueError(f"state_dtype must be one of {', '.join(map(repr, C.STATE_DTYPES))}, "
                             f"got {state_dtype!r}")
        seed = V.check_int("state_seed", state_seed, low=0)
        if seed >= 1 << 64:
            raise ValueError(f"state_seed must be below 2**64, got {seed}")
        nonnegative = opt_cls._nonnegative_state
        if state_dtype != FLOAT and nonnegative is None:
            raise ValueError(
                f"{opt_cls.__name__} has no compact state (state_dtype={state_dtype!r}): "
                f"{opt_cls._no_compact_state} Use state_dtype='float32'.")
        fmt = cls(state_dtype, seed, opt_cls._state_names, nonnegative or ())
        fmt.check_params(backend == "cuda", ())
        return fmt

    @property
    def compact(self) -> bool:
        return self.name != FLOAT

    def check_params(self, device: bool, named) -> None:
        """Refuse what compact state cannot step, before anything is kept:
        float64 params, on the host or (``device``) on the GPU, where the
        codes live on the device too (``DevicePlacement``)."""
        if not self.compact:
            return
        for label, a in named:
            if np.dtype(a.dtype) == np.float64:
                raise TypeError(f"{label} is float64: compact state (state_dtype={self.name!r}) "
                                "holds float32 values at best, so it is for float32 and 16-bit "
                                "params; the default state_dtype='float32' keeps float64 "
                                "params' state in float64")

    # -- layout ---------------------------------------------------------------------
    def offsets(self, sizes) -> np.ndarray:
        """Each array's element offset in its group's state buffers (8-bit:
        padded to a multiple of the block, see compact.block_offsets)."""
        if self.name == "int8":
            return C.block_offsets(sizes)
        return np.asarray([start for start, _ in element_parts(sizes)], np.int64)

    def pieces(self, name, sizes) -> list:
        """``(start, length)`` of each array's part of a group's buffer
        ``name`` (a float buffer or the master copy: its elements; 8-bit
        codes: its whole blocks; an absmax array: one entry per block)."""
        if self.name == "int8" and name != "master":
            unit = 1 if name.endswith(ABSMAX) else C.BLOCK
            return element_parts([C.nblocks(n) * unit for n in sizes])
        return element_parts(sizes)

    def reordered(self, name, buf, saved_order):
        """Buffer ``name`` of a group saved with its arrays in another order
        (``saved_order``: ``(order, sizes there)``, see
        ``Optimizer._saved_order``), its parts moved to this order."""
        order, sizes = saved_order
        return moved_parts(buf, self.pieces(name, sizes), order)

    def new_buffers(self, name, sizes) -> dict:
        """Compact state buffer ``name`` for a group of arrays of ``sizes``,
        zero (each code 0 is the value 0): ``{name: codes}``, with
        ``name + ABSMAX`` for 8-bit state."""
        signed = name not in self.nonnegative
        dtype = C.code_dtype(self.name, signed)
        if self.name != "int8":
            return {name: state_zeros(sum(sizes), dtype)}
        blocks = sum(C.nblocks(n) for n in sizes)
        return {name: state_zeros(blocks * C.BLOCK, dtype),
                name + ABSMAX: np.zeros(blocks, np.float32)}

    def buffer_spec(self, name, sizes, dtype):
        """``(dtype, length)`` a checkpoint's buffer ``name`` must have
        (``dtype``: the float state's)."""
        n = sum(sizes)
        if not self.compact:
            return np.dtype(dtype), n
        if name.endswith(ABSMAX):
            return np.dtype(np.float32), sum(C.nblocks(k) for k in sizes)
        codes = C.code_dtype(self.name, name not in self.nonnegative)
        return codes, (sum(C.nblocks(k) for k in sizes) * C.BLOCK if self.name == "int8" else n)

    def decoded(self, flat, sizes) -> dict:
        """Each compact buffer of a group's state ``flat`` (host codes and
        absmax arrays, e.g. a checkpoint's) as float32 values laid end to
        end like params of ``sizes``: ``{name: values}``, to read or compare
        compact state."""
        offs = self.offsets(sizes)
        return {n: np.concatenate([C.decode_span(b, flat.get(n + ABSMAX), int(o), k)
                                   for o, k in zip(offs, sizes)])
                for n, b in flat.items() if not n.endswith(ABSMAX)}

    def buffer_names(self, names) -> set:
        """The checkpoint names of state buffers ``names`` (with absmax arrays)."""
        names = set(names)
        return names | {n + ABSMAX for n in names} if self.name == "int8" else names

    # -- the step -------------------------------------------------------------------
    def step_args(self, gi, names, state):
        """The backends' ``compact`` argument for group ``gi``'s next step
        (state buffers ``names`` in kernel order), None for float state."""
        if not self.compact or not names:
            return None
        flat, step, seed, ids = state["flat"], state["step"] + 1, self.seed, self.ids
        return C.CompactStep(tuple([C.sr_key(seed, step, (gi << 8) | ids[n]) for n in names]),
                             tuple([flat.get(n + ABSMAX) for n in names]))
