"""Argument checks shared by every public entry point.

Each check raises ValueError/TypeError naming the argument and what was
expected, and runs before anything is written, so a rejected call leaves
parameters and optimizer state exactly as they were.
"""

from __future__ import annotations

import collections.abc
import math
import numbers

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class _Required:
    def __repr__(self):         # as help() and inspect.signature show the default
        return "<required>"


#: the default of a ``grads`` argument: torch's bare ``opt.step()`` and
#: ``opt.zero_grad()`` get :func:`refuse_no_grads`' message, not Python's
NOT_GIVEN = _Required()

_NO_GRADS_HINTS = {
    "step": "compute them, then opt.step(grads) (fastopt.LBFGS.step takes a closure)",
    "zero_grad": "zero_grad(grads) zeroes the arrays you accumulate gradients into; with "
                 "new gradient arrays every step there is nothing to zero",
}


def refuse_no_grads(owner, method):
    """The TypeError of ``owner.method()`` called without the gradients."""
    raise TypeError(f"{owner}.{method}() needs the gradients: fastopt keeps no .grad on "
                    f"the params; {_NO_GRADS_HINTS[method]}")


def count(n, noun) -> str:
    """``"1 array"``, ``"2 arrays"``: a count in a message."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def key(where: str, name: str) -> str:
    """``lr`` for the constructor's arguments, ``param_groups[1]['lr']`` in a group."""
    return f"{where}['{name}']" if where else name


#: one-pass iterables of arrays taken as lists where arrays come in
ONE_PASS = (collections.abc.Iterator, collections.abc.ValuesView)
#: and where gradients come in, ``g.items()`` too (read by name through its
#: dict). Not params: a list made of a dict's items would be what the
#: optimizer watches, not the dict, and a replaced array went unseen
GRADS_ONE_PASS = (*ONE_PASS, collections.abc.ItemsView)


def listed(params):
    """A one-pass iterable of params (a generator such as torch's
    ``model.parameters()``, ``dict.values()``) as a list; anything else as
    given. Made once, where params enter, so that each later look (the
    backend's choice, the groups, the checks) sees the same arrays."""
    if isinstance(params, ONE_PASS):
        return list(params)
    return params


def _number_of(value, kinds):
    """A 0-d array of one of the dtype ``kinds`` as its Python number (what
    ``np.load`` gives for a scalar saved in a config); anything else as is."""
    if type(value) is np.ndarray and value.ndim == 0 and value.dtype.kind in kinds:
        return value.item()
    return value


def check_real(name, value, *, low=None, high=None, low_open=False,
               high_open=False, why="") -> float:
    """``value`` as a finite float inside the given bounds (a 0-d array of
    a real dtype counts as its number: what ``np.load`` gives for a scalar
    saved in a config); ``why`` follows the message refusing the open lower
    bound itself (eps=0: why not 0)."""
    value = _number_of(value, "fiu")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}"
                         + (f": {why}" if why and value == low else ""))
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value}")
    return value


#: why eps must be > 0 (torch takes 0), for every step that divides by it
EPS_WHY = "an element whose gradient and state are 0 would step to 0/0 = NaN (torch takes it)"


def check_bool(name, value) -> bool:
    value = _number_of(value, "b")          # np.load of a saved flag
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def check_betas(betas, name="betas") -> tuple:
    try:
        beta1, beta2 = betas
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a pair (beta1, beta2), got {betas!r}") from None
    return (check_real(f"{name}[0]", beta1, low=0.0, high=1.0, high_open=True),
            check_real(f"{name}[1]", beta2, low=0.0, high=1.0, high_open=True))


def check_int(name, value, *, low) -> int:
    """An integer (Python or NumPy, or a 0-d integer array; not bool) >= ``low``."""
    value = _number_of(value, "iu")         # np.load of a saved count
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def as_array_list(name, arrays, labels=None, *, by_name=False) -> list:
    """A list of ndarrays from one array or a sequence of them; ``labels[i]``
    names item ``i`` in errors (``[i]`` by default, ``['W']`` for params
    held by name), and ``by_name`` says a dict by the params' names would
    do too."""
    if isinstance(arrays, np.ndarray):
        return [arrays]
    if not isinstance(arrays, (list, tuple)):
        also = " (or a dict of them by the params' names)" if by_name else ""
        hint = ("; a dict's arrays in a list: list(d.values()), the other lists in the "
                "same order" if isinstance(arrays, dict) and not by_name
                else _not_arrays_hint(arrays))
        raise TypeError(f"{name} must be an ndarray or a list of ndarrays{also}, "
                        f"got {type(arrays).__name__}{hint}")
    for i, a in enumerate(arrays):
        if not isinstance(a, np.ndarray):
            lab = f"[{i}]" if labels is None else labels[i]
            raise TypeError(f"{name}{lab} must be an ndarray, got "
                            + (_number_param(a) if "params" in name and isinstance(
                                a, numbers.Number) else _what(a)))
    return list(arrays)


def _number_param(a) -> str:
    """Why a number cannot be a param (a temperature kept as ``0.5``)."""
    return (f"a {type(a).__name__}: a param is updated in place, which a number cannot be; "
            f"to train it, hold it as a 0-d array (np.array({a!r})) and read it from there; "
            "a setting that is not trained (vars(obj) holds those too) stays out of params: "
            "give the arrays to train alone")


def readable(arrays, like=None):
    """Gradients as the kernels read them, as torch's step takes them: a
    strided or Fortran-ordered array (``(dY.T @ X).T``) through a C-ordered
    copy, a NumPy scalar (``(x * s).sum()``, a 0-d param's gradient) or a
    Python float as its 0-d array; given the params ``like`` (in the same
    order), a Python float or int for a 0-d param is an array of its dtype,
    as torch makes ``torch.tensor(1.0)`` its default float type. ``arrays`` (one array, a list or a tuple) itself when
    nothing needed that; anything else is left to the checks, as are
    subclasses (a masked array's copy would drop its mask) and a bare
    NumPy scalar given alone (as the whole of a step's argument, it may be
    the loss: the checks say so)."""
    if type(arrays) is np.ndarray:
        return arrays if arrays.flags.c_contiguous else np.ascontiguousarray(arrays)
    if not isinstance(arrays, (list, tuple)):
        return arrays
    out = None
    for i, a in enumerate(arrays):
        if type(a) is np.ndarray:
            if a.flags.c_contiguous:
                continue
            a = np.ascontiguousarray(a)
        elif type(a) in (float, int) and like is not None and i < len(like) and \
                getattr(like[i], "ndim", None) == 0:
            a = np.asarray(a, like[i].dtype)      # a hand-written 0-d gradient
        elif isinstance(a, np.generic) or type(a) is float:
            a = np.asarray(a)       # (a Python float: float64, as NumPy makes it)
        else:
            continue
        if out is None:
            out = list(arrays)
        out[i] = a
    return arrays if out is None else out


def copied(given, readable) -> list:
    """Indices of the arrays in ``given`` that :func:`readable` replaced by
    copies (the originals still to be checked for aliasing as themselves)."""
    return [i for i, (g, r) in enumerate(zip(given, readable))
            if g is not r and isinstance(g, np.ndarray)]


def _not_arrays_hint(given) -> str:
    """Why a step's argument may be a callable or a number (torch habits)."""
    if callable(given):
        return ": a closure is for LBFGS.step; the other optimizers take the gradients"
    if isinstance(given, np.generic):
        return ("; np.asarray(g) if it is a 0-d param's gradient (the step takes the "
                "gradients, not the loss)")
    if isinstance(given, numbers.Number):
        return ": the step takes the gradients, one array per param (not the loss)"
    return object_hint(given)


def object_hint(given) -> str:
    """How to pass an object holding arrays as attributes (a dataclass, a
    model class)."""
    if isinstance(given, type) or not any(
            isinstance(v, np.ndarray) for v in getattr(given, "__dict__", {}).values()):
        return ""
    return ("; its arrays by name are vars(obj), the same arrays (stepped in place; "
            "dataclasses.asdict would copy them, and the copies would be trained), or "
            "{k: v for k, v in vars(obj).items() if isinstance(v, np.ndarray)} where it "
            "holds settings too")


def _what(a) -> str:
    """How an array that is not one is named in an error."""
    if isinstance(a, np.generic):       # (x * s).sum(): a 0-d param's gradient, unwrapped
        return (f"a NumPy scalar ({type(a).__name__}), not a 0-d array: np.asarray(g) "
                "makes one")
    return type(a).__name__


#: 16-bit storage accepted where the caller keeps a float32 master copy
LOW_PRECISION_NAMES = ("float16", "bfloat16")


def plain_float(a, writable) -> bool:
    """``a`` is the usual array, which no check of :func:`check_float_array`
    refuses: an ndarray (no subclass), native float32/float64, C-ordered,
    writable where written. Checked first, the rest skipped (a dtype's
    ``.name`` alone costs about 3 us)."""
    return (type(a) is np.ndarray and a.dtype in FLOAT_DTYPES and a.flags.c_contiguous
            and (a.flags.writeable or not writable))


def check_float_array(name, a, *, writable, allow_low_precision=False) -> None:
    if isinstance(a, np.ma.MaskedArray):
        # the NumPy backend's arithmetic would honour the mask, the compiled
        # kernels read the data under it: refused, so that no backend differs
        raise TypeError(f"{name} is a masked array: fastopt's kernels would read the data "
                        "under its mask; pass its data (np.ma.getdata(a)), or a gradient "
                        "with its masked entries filled (g.filled(0))")
    if isinstance(a, np.matrix):
        # its * is a matrix product: the NumPy backend's g * g raised halfway
        # through a step, the compiled ones' dispatch refused it
        raise TypeError(f"{name} is an np.matrix, whose * is a matrix product; pass "
                        "np.asarray(m), an ndarray view of the same memory"
                        + (" (and keep using that view: it is what gets updated "
                           "in place, as the matrix's memory)" if writable else ""))
    if a.dtype.kind == "f" and not a.dtype.isnative:
        raise TypeError(f"{name} is {a.dtype.name} in non-native byte order ({a.dtype.str}); "
                        "the kernels read native floats: convert it first "
                        f"(a.astype(np.{a.dtype.name}))")
    if a.dtype not in FLOAT_DTYPES and not (
            allow_low_precision and a.dtype.name in LOW_PRECISION_NAMES):
        also = (" (or float16/bfloat16)"
                if allow_low_precision else "")
        hint = ""
        if a.dtype.kind == "c":     # torch steps a complex tensor as its real view
            real = "float32" if a.dtype == np.complex64 else "float64"
            hint = (f"; for complex values, step their real view, as torch does: "
                    f"a.view(np.{real}) (each entry's real and imaginary parts; "
                    f"a.reshape(1).view(np.{real}) for a 0-d one), "
                    "the params and the gradients alike")
        elif a.dtype.name in LOW_PRECISION_NAMES and name.startswith("grads"):
            # a 16-bit gradient of a float param
            hint = (" here: 16-bit gradients go with 16-bit params only; cast it to its "
                    "param's dtype")
        raise TypeError(f"{name} must be float32 or float64{also}, got {a.dtype}{hint}")
    if not a.flags.c_contiguous:
        what = "Fortran-ordered" if a.flags.f_contiguous else "not contiguous"
        # written in place (a param): a contiguous copy must take its place
        fix = ("it is written in place, so make a C-ordered copy (np.ascontiguousarray) "
               "and use that array from then on" if writable else "use np.ascontiguousarray")
        raise ValueError(f"{name} must be C-contiguous (row-major), and is {what}: {fix}")
    if writable and not a.flags.writeable:
        mapped = ("; it is a read-only memory map, as joblib hands a worker each array over "
                  "1 MB: pass max_nbytes=None to joblib.Parallel, or train a copy (np.array(a))"
                  if isinstance(a, np.memmap) else "")
        raise ValueError(f"{name} is read-only, and is written in place{mapped}")


def check_like(name, arrays, ref_name, refs, *, writable, allow_low_precision=False,
               labels=None, ref_labels=None) -> None:
    """``arrays`` match ``refs`` one to one in length, shape and dtype;
    ``labels[i]`` names item ``i`` (``[i]`` by default, ``['W']`` for params
    held by name), ``ref_labels[i]`` its reference where that is named
    otherwise (a list of gradients for params held by name)."""
    if len(arrays) != len(refs):
        # (a layer's dict where the params were given as lists of arrays)
        nested = next((i for i, a in enumerate(arrays)
                       if isinstance(a, (dict, list, tuple))), None)
        hint = "" if nested is None else (
            f"; {name}[{nested}] is a {type(arrays[nested]).__name__}: {ref_name} given as "
            f"lists of arrays take {name} as one flat list in the param groups' order "
            "(groups made by fastopt.group_params over a model's layers take them "
            "shaped like the model)")
        raise ValueError(f"{name} has {count(len(arrays), 'array')} but {ref_name} has "
                         f"{len(refs)}{hint}")
    for i, (a, r) in enumerate(zip(arrays, refs)):
        if plain_float(a, writable) and a.dtype == r.dtype and a.shape == r.shape:
            continue        # the usual array: nothing below refuses it (~3 us an array)
        lab = f"[{i}]" if labels is None else labels[i]
        ref_lab = lab if ref_labels is None else ref_labels[i]
        if not isinstance(a, np.ndarray):
            # (one optimizer per layer handed the whole model's list of layers)
            shown = [f"{ref_name}{x}" for x in (ref_labels or labels or
                                               [f"[{k}]" for k in range(len(refs))])]
            whose = "" if not isinstance(a, (dict, list, tuple)) else (
                f" (a whole model's gradients, one item per layer? these {ref_name} are "
                f"{', '.join(shown[:3])}{', ...' if len(shown) > 3 else ''}: pass their "
                f"gradients alone, e.g. its layer's dict)")
            raise TypeError(f"{name}{lab} must be an ndarray, got {_what(a)}{whose}")
        # 16-bit arrays only beside 16-bit references (grads of 16-bit params)
        check_float_array(f"{name}{lab}", a, writable=writable,
                          allow_low_precision=(allow_low_precision
                                               and r.dtype.name in LOW_PRECISION_NAMES))
        check_same_layout(f"{name}{lab}", a, f"{ref_name}{ref_lab}", r)


def check_same_layout(name, a, ref_name, ref) -> None:
    """``a`` has ``ref``'s shape and dtype (host or device arrays)."""
    if tuple(a.shape) != tuple(ref.shape):
        raise ValueError(f"{name} has shape {tuple(a.shape)} but {ref_name} "
                         f"has shape {tuple(ref.shape)}")
    if a.dtype != ref.dtype:
        why = (" (float64 inputs give float64 gradients: cast the inputs, or each "
               "gradient)" if name.startswith("grads") and a.dtype == np.float64 else "")
        raise TypeError(f"{name} has dtype {a.dtype} but {ref_name} has dtype {ref.dtype}: "
                        f"arrays are read in place, never converted, so make it "
                        f"{ref.dtype}{why}")


def _bounds(a):
    start = a.__array_interface__["data"][0]
    return start, start + a.nbytes


def byte_bounds(a):
    """``(first, past-the-end)`` byte addresses of any host array, strided
    views (negative strides too) included."""
    bounds = getattr(getattr(np.lib, "array_utils", None), "byte_bounds", None) or \
        np.byte_bounds      # NumPy < 2
    return bounds(a)


def check_views_disjoint(written, read) -> None:
    """:func:`check_disjoint` for ``read`` arrays that may be strided views
    (a gradient read through a copy: ``W.T`` given as ``W``'s own gradient
    is refused as ``W`` would be): each pair by NumPy's extent test in C
    (about 0.7 us; a sweep over addresses costs ~4 us an array, read from
    ``__array_interface__``), and where extents meet, whether the two share
    an element (two columns of one matrix do not)."""
    for rlabel, r in read:
        for wlabel, w in written:
            if np.may_share_memory(r, w) and np.shares_memory(r, w):
                raise ValueError(f"{rlabel} overlaps {wlabel} in memory; arrays the "
                                 "step writes must not alias any other argument"
                                 + _alias_hint(rlabel, wlabel))


#: two written arrays over the same memory: one array given twice
_TIED = (" (one array given twice: a weight tied between two layers, or an array and "
         "its reshape? Give it once, and add its gradients together)")


def _alias_hint(a, b) -> str:
    """What to do where a gradient is its param (or a view of it): the
    gradient of 0.5 * ||w||**2 is w itself."""
    if {a.split("[")[0], b.split("[")[0]} == {"grads", "params"}:
        return (" (a gradient that is its param itself, as the gradient of "
                "0.5 * ||w||**2 is w: pass a copy, w.copy())")
    return ""


def _distinct_owners(*named_lists) -> bool:
    """Whether every array is one that owns its memory, or a view of one,
    no two of them of the same owner: memory two owning arrays hold never
    overlaps, so neither can their views'. (NumPy gives a view of a view
    the owner as its base.) False where any is otherwise (a view of a
    bytearray, an mmap or a foreign buffer; two views of one array)."""
    owners = set()
    n = 0
    for items in named_lists:
        for _, a in items:
            o = a.base
            if o is None:
                o = a
            if type(o) is not np.ndarray or o.base is not None or not o.flags.owndata:
                return False
            owners.add(id(o))
            n += 1
    return len(owners) == n


def check_disjoint(written, read=(), *, bounds=_bounds, memory="memory",
                   writer="the step") -> None:
    """No written array overlaps any other array, written or read.

    ``written`` and ``read`` are lists of ``(label, array)``; ``bounds(a)``
    gives an array's ``(first, past-the-end)`` byte addresses (host arrays
    by default; the CUDA backend passes device pointers and says "device
    memory"). A sweep over the sorted byte ranges: O(n log n) for n arrays.
    """
    if bounds is _bounds and _distinct_owners(written, read):
        return      # (reading each array's address costs ~1 us: most of a small step's checks)
    spans = []
    for is_written, items in ((True, written), (False, read)):
        for label, a in items:
            lo, hi = bounds(a)
            if hi > lo:
                spans.append((lo, hi, is_written, label))
    spans.sort(key=lambda s: s[0])
    # Track the earlier span reaching furthest: any later span starting
    # before its end overlaps it. Read-read overlaps are harmless, so keep
    # the furthest written span and the furthest span of any kind.
    far_any = far_written = None
    for span in spans:
        lo, hi, is_written, label = span
        for prev in (far_written, far_any if is_written else None):
            if prev is not None and lo < prev[1]:
                tied = (is_written and prev[2] and (lo, hi) == prev[:2]
                        and label.startswith(("params", "param_groups")))
                raise ValueError(f"{label} overlaps {prev[3]} in {memory}; arrays "
                                 f"{writer} writes must not alias any other argument"
                                 + (_alias_hint(label, prev[3]) or (_TIED if tied else "")))
        if far_any is None or hi > far_any[1]:
            far_any = span
        if is_written and (far_written is None or hi > far_written[1]):
            far_written = span
