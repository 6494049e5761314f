"""Flat multi-tensor buffers: many arrays, one allocation.

A model is dozens to thousands of arrays. Stepping them one by one costs a
kernel launch (and a Python round trip) per array; packing them into one
contiguous buffer lets an optimizer step the whole model with one kernel call
(the problem PyTorch's foreach/fused paths and apex's ``multi_tensor_apply``
solve). :func:`pack` copies arrays into one buffer and hands back views that
replace the originals::

    params = fastopt.pack([w1, b1, w2, b2])   # FlatArrays: a tuple of views
    grads = params.zeros_like()               # same layout, for the gradients
    opt = fastopt.AdamW(params)
    ...                                        # backprop writes into grads[i]
    opt.step(grads)                            # one fused kernel call

:class:`FlatArrays` is a tuple, so its views cannot be swapped out behind the
buffer's back: an optimizer that has checked it once can trust it afterwards.
"""

from __future__ import annotations

import collections.abc
import math
import numbers

import numpy as np

__all__ = ["FlatArrays", "pack", "flat_zeros", "memory_runs", "in_memory_order"]


def _dim(d, i):
    """A shape's dimension: an int >= 0 (-1 made views that overlapped, and
    2.7 was cut to 2)."""
    if isinstance(d, (bool, np.bool_)) or not isinstance(d, (numbers.Integral, np.integer)):
        raise TypeError(f"shapes[{i}] must hold ints, got {d!r}")
    if d < 0:
        raise ValueError(f"shapes[{i}] has a negative dimension, {d}")
    return int(d)


class PackedViews(tuple):
    """Views laid end to end in one 1-D buffer, ``data``: what host
    :class:`FlatArrays` and the CUDA backend's ``DeviceFlatArrays`` share.
    ``views[i]`` occupies ``data[offsets[i]:offsets[i + 1]]``. Subclasses
    check their kind of buffer in ``_check_buffer``.
    """

    @classmethod
    def _check_buffer(cls, data):
        raise NotImplementedError

    def __new__(cls, data, shapes):
        data = cls._check_buffer(data)
        shapes = tuple(tuple(_dim(d, i) for d in s) for i, s in enumerate(shapes))
        offsets = [0]
        for s in shapes:
            offsets.append(offsets[-1] + math.prod(s))
        if offsets[-1] != data.size:
            raise ValueError(
                f"shapes hold {offsets[-1]} elements but the buffer has {data.size}")
        views = [data[a:b].reshape(s) for a, b, s in zip(offsets, offsets[1:], shapes)]
        self = super().__new__(cls, views)
        self._data, self._shapes, self._offsets = data, shapes, tuple(offsets)
        return self

    @property
    def data(self):
        """The one 1-D buffer every view lives in."""
        return self._data

    @property
    def shapes(self) -> tuple:
        return self._shapes

    @property
    def offsets(self) -> tuple:
        """Element offsets of each view in ``data`` (length ``len(self) + 1``)."""
        return self._offsets

    @property
    def dtype(self) -> np.dtype:
        return self._data.dtype


class FlatArrays(PackedViews):
    """A tuple of array views laid end to end in one 1-D buffer, ``data``.

    Build one with :func:`pack` or :func:`flat_zeros`; ``views[i]`` occupies
    ``data[offsets[i]:offsets[i + 1]]``.
    """

    @classmethod
    def _check_buffer(cls, data):
        if not isinstance(data, np.ndarray) or data.ndim != 1 or not data.flags.c_contiguous:
            raise TypeError("FlatArrays needs a contiguous 1-D ndarray as its buffer")
        return data

    def zeros_like(self) -> "FlatArrays":
        """A new zero-filled FlatArrays with the same shapes and dtype."""
        return flat_zeros(self.shapes, self.dtype)

    def __reduce__(self):
        return (FlatArrays, (self.data, self.shapes))

    def __repr__(self):
        return (f"FlatArrays({len(self)} array{'' if len(self) == 1 else 's'}, "
                f"{self.data.size} elements, "
                f"dtype={self.dtype})")


def flat_zeros(shapes, dtype=np.float32) -> FlatArrays:
    """Zero-filled arrays of the given shapes sharing one buffer: ``shapes``
    is a list with one shape per array (a bare int is a 1-D shape)."""
    if isinstance(shapes, tuple) and len(shapes) > 1 and not any(map(np.iterable, shapes)):
        # flat_zeros((3, 2)) made two arrays, of 3 and 2 elements
        raise TypeError(f"shapes is one shape per array: {shapes!r} reads as a single shape; "
                        f"pass [{shapes!r}] for one array of that shape, or "
                        f"{[(d,) for d in shapes]!r} for {len(shapes)} 1-D arrays")
    shapes = [tuple(s) if np.iterable(s) else (s,) for s in shapes]
    dtype = np.dtype(dtype)
    size = sum(math.prod(s) for s in shapes)
    return FlatArrays(np.zeros(size, dtype=dtype), shapes)


def pack(arrays, dtype=None) -> FlatArrays:
    """Copy ``arrays`` into one contiguous buffer and return views into it.

    Use the returned views in place of the originals (the originals are not
    touched: keep using the views). ``dtype`` defaults to the arrays' common
    dtype (float32 with float64: float64), which must be a float one.
    """
    if isinstance(arrays, collections.abc.Mapping):     # (its keys were packed, as strings)
        raise TypeError("pack() takes a list of arrays, not a dict: views = "
                        "fastopt.pack(list(d.values())), then d = dict(zip(d, views))")
    arrays = list(arrays)
    layer = next((i for i, a in enumerate(arrays) if isinstance(a, collections.abc.Mapping)
                  or type(a) in (list, tuple) and not all(
                      isinstance(x, numbers.Number) for x in a)), None)
    if layer is not None:       # (np.asarray made it an object array, refused as such)
        raise TypeError(
            f"pack() takes a list of arrays, and arrays[{layer}] is a "
            f"{type(arrays[layer]).__name__}: an optimizer takes a list of layer dicts as it "
            "is (one native call per step all the same); to pack them anyway, pack the "
            "arrays and put the views back in their places")
    arrays = [np.asarray(a) for a in arrays]
    if not arrays:
        raise ValueError("pack() needs at least one array")
    if dtype is None:
        dtype = np.result_type(*arrays)
        if dtype.kind != "f" and dtype.name != "bfloat16":     # (ml_dtypes': kind "V")
            # (an int array, an np.arange(3) param, was refused only by the
            # optimizer made from the pack, far from here)
            k = next(i for i, a in enumerate(arrays)
                     if a.dtype.kind != "f" and a.dtype.name != "bfloat16")
            raise TypeError(f"pack() makes params, gradients or state for fastopt's steps, which "
                            f"are floats: arrays[{k}] is {arrays[k].dtype}; convert it, or pass "
                            "dtype=np.float32 (or np.float64) to pack them as that")
    out = flat_zeros([a.shape for a in arrays], dtype)
    for view, a in zip(out, arrays):
        view[...] = a
    return out


def _root(a: np.ndarray) -> np.ndarray:
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def in_memory_order(arrays) -> bool:
    """Whether arrays sharing a buffer appear in the list in address order."""
    last = {}
    for a in arrays:
        if a.size == 0:   # NumPy may give an empty view any address
            continue
        root, addr = id(_root(a)), _address(a)
        if addr < last.get(root, addr):
            return False
        last[root] = addr
    return True


def memory_runs(arrays):
    """Split ``arrays`` into maximal runs laid end to end in one buffer.

    Returns a list of ``(start, stop, flat)``: ``arrays[start:stop]`` are
    C-contiguous, share a dtype and a root buffer, and follow each other in
    memory with no gap, so ``flat`` (a 1-D view over all of them) can be
    stepped with one kernel call. Arrays that fit no run come back alone,
    with ``flat = a.reshape(-1)``.
    """
    runs = []
    i = 0
    n = len(arrays)
    while i < n:
        a = arrays[i]
        root = _root(a)
        j = i + 1
        end = _address(a) + a.nbytes
        # An empty view joins any run: NumPy gives it its buffer's start
        # address, not its offset, so the address test would split the run.
        while (j < n and arrays[j].dtype == a.dtype and arrays[j].flags.c_contiguous
               and _root(arrays[j]) is root
               and (arrays[j].size == 0 or _address(arrays[j]) == end)):
            end += arrays[j].nbytes
            j += 1
        if j - i > 1 and root.flags.c_contiguous:
            # Slice the root's bytes, then view them in the arrays' dtype:
            # the root may hold another dtype (e.g. a uint8 arena of views).
            start = _address(a) - _address(root)
            stop = end - _address(root)
            flat = root.reshape(-1).view(np.uint8)[start:stop].view(a.dtype)
        else:
            j = i + 1
            flat = a.reshape(-1)
        runs.append((i, j, flat))
        i = j
    return runs
