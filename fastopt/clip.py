"""Global-norm gradient clipping (torch's ``clip_grad_norm_`` semantics)."""

from __future__ import annotations

import math
import numbers

import numpy as np

from . import _validate as V
from .backends import backend_for, get_backend
from .backends.scalars import clip_coefficient
from .params import FlatArrays


def _flat_grads(grads, *, writable, labels=None):
    """1-D arrays to reduce over: one for a FlatArrays, one per array
    otherwise. Read only (``not writable``): 16-bit gradients too, as float32
    copies (as an optimizer's step reads them); scaled in place: float32 and
    float64 only."""
    if isinstance(grads, FlatArrays):
        _check("grads", grads.data, writable)
        return [_float(grads.data)]
    if not writable:        # read: a strided view or a NumPy scalar as the step reads it
        grads = V.readable(grads)
    elif isinstance(grads, (list, tuple)):
        for i, g in enumerate(grads):
            if isinstance(g, (np.generic, numbers.Number)):    # (global_norm reads them)
                name = _names(grads, labels)[i]
                what = ("a NumPy scalar" if isinstance(g, np.generic)
                        else "a Python number")
                raise TypeError(f"{name} is {what} ({type(g).__name__}), which "
                                "cannot be scaled in place: make the gradient a 0-d array "
                                "(np.asarray(g)) and keep that array")
    # (by name where given by name: grads['l1']['W'])
    arrays = (V.as_array_list("grads", grads) if labels is None
              else V.as_array_list("", grads, labels))
    names = _names(arrays, labels)
    for name, g in zip(names, arrays):
        _check(name, g, writable)
    if writable:  # an array listed twice (or overlapping views) would be scaled twice
        if all(g.flags.c_contiguous for g in arrays):
            V.check_disjoint(list(zip(names, arrays)), writer="clip_by_global_norm")
        else:
            _check_views_disjoint(arrays)
    # (a strided view is read through a C-ordered copy, and scaled where it is)
    return [_float(V.readable(g).reshape(-1)) for g in arrays]


def _check_views_disjoint(arrays):
    """No two of ``arrays`` share memory, some of them strided views. Two
    views' byte extents can overlap without a shared element (two columns
    of one matrix), so an overlap of extents is confirmed with
    ``np.shares_memory``."""
    spans = sorted((*V.byte_bounds(a), i) for i, a in enumerate(arrays) if a.size)
    active = []
    for lo, hi, i in spans:
        active = [s for s in active if s[1] > lo]
        for _, _, j in active:
            if np.shares_memory(arrays[i], arrays[j]):
                first, second = sorted((i, j))
                raise ValueError(f"grads[{second}] overlaps grads[{first}] in memory; arrays "
                                 "clip_by_global_norm scales must not alias each other")
        active.append((lo, hi, i))


def _check(name, a, writable):
    """Read (``not writable``): dtype, 16-bit allowed. To scale in place:
    float32 or float64, and writable. A strided view is read through a
    C-ordered copy and scaled where it is, so its layout is not checked."""
    if V.plain_float(a, writable):
        return      # the usual gradient: nothing to refuse
    if writable and a.dtype.name in V.LOW_PRECISION_NAMES:
        raise TypeError(f"{name} is {a.dtype}: clip_by_global_norm scales float32 and float64 "
                        "gradients in place; clip 16-bit ones inside the step with the "
                        "optimizer's max_grad_norm=")
    V.check_float_array(name, a if a.flags.c_contiguous else np.empty(0, a.dtype),
                        writable=False, allow_low_precision=not writable)
    if writable and not a.flags.writeable:
        raise ValueError(f"{name} is read-only; clip_by_global_norm scales it in place")


def _float(a):
    return a if a.dtype in V.FLOAT_DTYPES else a.astype(np.float32)


def _names(arrays, labels):
    """How errors name each gradient: by its keys when given by name."""
    return labels if labels is not None else [f"grads[{i}]" for i in range(len(arrays))]


def _device_flats(be, grads, dtypes=None, labels=None):
    arrays = [grads] if not isinstance(grads, (list, tuple)) else list(grads)
    dtypes = dtypes or be.STORAGE_DTYPES
    names = _names(arrays, labels)
    flats = [be.flat(be.check_array(name, g, dtypes=dtypes)) for name, g in zip(names, arrays)]
    named = list(zip(names, flats))
    be.check_devices(named)
    return flats, named


def _by_name(grads):
    """``(grads, labels)``: grads given by name (a dict, nested dicts too) as
    their arrays in key order, as an optimizer reads them, or as lists of
    lists (one per optimizer), and how errors name them (``grads['W']``,
    ``grads[1][0]``); anything else as given, labels None. A None (a frozen
    layer's gradient, as an optimizer's step takes it) is left out, as
    torch's ``clip_grad_norm_`` leaves out params without a grad."""
    grads, labels = _arrays_by_name(grads)
    if isinstance(grads, (list, tuple)) and any(g is None for g in grads):
        labels = labels or [f"grads[{i}]" for i in range(len(grads))]
        kept = [(g, lab) for g, lab in zip(grads, labels) if g is not None]
        return [g for g, _ in kept], [lab for _, lab in kept]
    return grads, labels


def _arrays_by_name(grads):
    """:func:`_by_name`, Nones kept."""
    if isinstance(grads, dict):
        return _dict_arrays(grads, "grads") if grads else ([], None)   # {}: norm 0
    if type(grads) in (list, tuple) and any(isinstance(g, (list, tuple, dict)) for g in grads):
        # one optimizer per layer: each one's grads (a list, a dict by name, a
        # FlatArrays' views), clipped together
        arrays, labels = [], []
        _nested(grads, "grads", arrays, labels)
        return arrays, labels
    return grads, None


def _dict_arrays(grads, label):
    """A dict by name's arrays in key order, labelled ``label['W']``."""
    from .optim.named import KeyTree      # (fastopt.optim imports this module)
    tree, arrays = KeyTree.of(grads, label)
    return arrays, [f"{label}{lab}" for lab in tree.labels]


def _nested(grads, label, arrays, labels):
    for i, g in enumerate(grads):
        if isinstance(g, dict):
            if g:
                sub, names = _dict_arrays(g, f"{label}[{i}]")
                arrays += sub
                labels += names
        elif isinstance(g, (list, tuple)):          # a FlatArrays too: its views
            _nested(g, f"{label}[{i}]", arrays, labels)
        else:
            arrays.append(g)
            labels.append(f"{label}[{i}]")


def norm_of(backend, flats) -> float:
    """Global L2 norm of 1-D arrays with an already chosen backend module."""
    flats = list(flats)
    return settled_norm(math.sqrt(ordered_sum(backend.sumsq(g) for g in flats)), flats)


def ordered_sum(values) -> float:
    """The floats ``values`` added one after the other, as the native steps
    add their tables' and chunks' sums: Python 3.12's ``sum()`` compensates
    float sums (Neumaier), so a norm summed by it differed in the last bits
    from the same norm taken inside a step, and from Python 3.11's."""
    total = 0.0
    for v in values:
        total += v
    return total


def settled_norm(norm, flats) -> float:
    """``norm``, the float64 sum of squares' root over ``flats``, or where it
    came out inf while every value is finite (float64 values past ~1e154
    square to inf), the norm recomputed with each value first divided by
    the largest magnitude, as LAPACK's ``dnrm2`` avoids the overflow: inf
    then only where the norm itself is past float64's range. NumPy's and
    torch's norms are inf there, and a clip by them zeroes the gradients.
    A rare path, in NumPy (pairwise sums: the same result at any thread
    count)."""
    if norm != math.inf:
        return norm
    flats = [f for f in flats if f.size]
    if all(f.dtype != np.float64 for f in flats):
        return norm         # narrower values cannot overflow a float64 sum: not finite
    if not all(bool(np.isfinite(f).all()) for f in flats):
        return norm
    top = max(float(np.max(np.abs(f))) for f in flats)
    return top * math.sqrt(scaled_sumsq(flats, top))


def scaled_sumsq(flats, top) -> float:
    """The sum of squares of ``flats`` divided by ``top`` (their largest
    magnitude, or all ranks' together): no square overflows."""
    return math.fsum(float(np.sum(np.square(f.astype(np.float64) / top))) for f in flats)


def global_norm(grads, *, backend="auto") -> float:
    r""":math:`\sqrt{\sum_i \lVert g_i \rVert_2^2}` over all arrays, in float64.

    The sum runs over fixed chunks in a fixed order, so the result does not
    depend on the thread count. A NaN or inf anywhere gives NaN or inf.
    ``grads``: an array, a list of them, a dict of them by name (nested
    dicts too), a list of such lists (one per optimizer: their global norm
    together) or a FlatArrays; float32, float64, or float16/bfloat16 (read
    as float32).
    """
    grads, labels = _by_name(grads)
    be = get_backend(backend_for(backend, grads))
    if getattr(be, "device", False):   # device arrays: the two-stage GPU reduction
        return be.norm_control(_device_flats(be, grads, labels=labels)[0]).norm()
    return norm_of(be, _flat_grads(grads, writable=False, labels=labels))


def clip_by_global_norm(grads, max_norm, *, backend="auto") -> float:
    """Scale ``grads`` in place so their global norm is at most ``max_norm``.

    Multiplies by torch's ``min(1, max_norm / (norm + 1e-6))`` and returns
    the norm before clipping (on device arrays: a ``DeviceNorm``, read
    with ``float()``). Optimizers take ``max_grad_norm=`` to do this
    inside the step without modifying the gradients (16-bit gradients
    too; this function scales float32 and float64 ones). ``grads`` as for
    :func:`global_norm`.
    """
    max_norm = V.check_real("max_norm", max_norm, low=0.0, low_open=True)
    grads, labels = _by_name(grads)
    be = get_backend(backend_for(backend, grads))
    if getattr(be, "device", False):
        # coefficient decided and applied on the device; the norm comes back
        # as a DeviceNorm (float(norm) fetches it), so nothing waits here
        flats, named = _device_flats(be, grads, be.FLOAT_DTYPES, labels)   # scaled in place
        be.check_disjoint(named)
        ctrl = be.norm_control(flats, max_norm=max_norm)
        for g in flats:
            be.scale(g, 1.0, ctrl=ctrl)
        return be.DeviceNorm(ctrl)
    flats = _flat_grads(grads, writable=True, labels=labels)
    norm = norm_of(be, flats)
    coef = clip_coefficient(norm, max_norm)
    if coef != 1.0:
        views = [] if isinstance(grads, FlatArrays) else V.as_array_list("grads", grads)
        for k, g in enumerate(flats):
            if views and not views[k].flags.c_contiguous:
                v = views[k]            # a strided view: in place, as the kernel scales
                v *= v.dtype.type(coef)
            else:
                be.scale(g, coef)
    return norm
