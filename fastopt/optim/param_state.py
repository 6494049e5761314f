"""One param's optimizer state, as torch's ``opt.state[p]`` shows it.

fastopt keeps its state per param group (``opt.state[group index]``: each
buffer one array over the group's elements, cut into runs), so the state
of one param is a slice of every buffer of its group. torch code reads it
as ``opt.state[p]["exp_avg"]``; here that lookup is refused with
directions (:class:`GroupStates`) and :func:`param_state` gives the same
dict, as copies.
"""

from __future__ import annotations

import numpy as np


class GroupStates(list):
    """``opt.state``: one dict per param group. Indexing it with an array
    or a name (torch's per-param lookup) says where a param's state is
    instead of NumPy's "only integer scalar arrays can be converted to a
    scalar index" or list's "indices must be integers"."""

    __slots__ = ()

    def __getitem__(self, key):
        try:
            return list.__getitem__(self, key)
        except TypeError:
            pass        # an array, or a param's name: torch's per-param lookup
        raise TypeError(
            "opt.state is fastopt's state by param group (opt.state[group index]), not "
            "torch's dict by param: a param's state is opt.param_state(p) (its step and "
            "each buffer shaped like p, as copies); set state with load_state_dict") from None

    def _refuse(self, *args, **kwargs):
        # (torch's reset, opt.state.clear(), emptied it: every later step,
        # param_state and state_dict failed with an IndexError)
        raise TypeError(
            "opt.state is the optimizer's own, one dict per param group, and is not "
            "changed from outside: opt.reset_state() starts the moments and step counts "
            "afresh as torch's opt.state.clear() does (reset_state([i]) for group i; the "
            "lr, schedules and opt.iterations kept), and load_state_dict sets a saved state")

    clear = pop = remove = insert = sort = reverse = _refuse
    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse


def as_name(param):
    """A key path ``("l1", "W")`` as the name ``"l1.W"``; anything else as it is."""
    if isinstance(param, tuple) and param and all(isinstance(k, str) for k in param):
        return ".".join(param)
    return param


def locate(opt, param) -> tuple:
    """``(group index, index in the group)`` of ``param`` (by identity, or
    by name where the params were given by name: ``"l1.W"``, or the key
    path ``("l1", "W")``)."""
    names = opt._names.names if opt._names is not None else None
    want = _named(opt._names, param) if names is not None else None
    param = as_name(param)
    name = param if isinstance(param, str) else None
    k = 0
    for gi, group in enumerate(opt.param_groups):
        for i, a in enumerate(group["params"]):
            if a is param or k == want:
                return gi, i
            k += 1
    if name is not None:
        known = "" if names is None else (
            f" (its names: {', '.join(map(str, names[:8]))}{', ...' * (len(names) > 8)})")
        raise ValueError(f"no param named {name!r} in this {type(opt).__name__}{known}")
    if isinstance(param, (int, np.integer)) and not isinstance(param, bool):
        raise TypeError(f"param_state takes one of the arrays (or its name), not an index: "
                        f"opt.param_state(opt.param_groups[g]['params'][{param}]) for the "
                        "array at that place in group g")
    if not hasattr(param, "shape"):
        raise TypeError(f"param_state takes one of the arrays, or its name where the params "
                        f"were given by name, not a {type(param).__name__}")
    shape = param.shape
    raise ValueError(
        f"this {type(opt).__name__} does not update that array (shape {shape}): pass one "
        "of the arrays it was made over (or in its param_groups), the same object, "
        "not a copy or a new view")


def _named(tree, param):
    """The index of the param ``param`` names in ``tree`` (a KeyTree): by
    its key path (a tuple, exactly), or by its dotted name, which must be
    one param's only (``{"a.b": x, "a": {"b": y}}`` names two); None for
    anything else, or a name no param has."""
    if isinstance(param, tuple):
        path = [k for k, p in enumerate(tree.paths) if tuple(p) == param]
        if path:
            return path[0]
        param = as_name(param)
    if not isinstance(param, str):
        return None
    found = [k for k, n in enumerate(tree.names) if n == param]
    if len(found) > 1:
        raise ValueError(f"{param!r} names {len(found)} params ("
                         f"{', '.join('params' + tree.labels[k] for k in found)}): give "
                         "the key path as a tuple instead")
    return found[0] if found else None


def param_state(opt, param) -> dict:
    """``{"step": n, name: array shaped like param, ...}`` for one of
    ``opt``'s params: its group's step count and its part of each state
    buffer, as float copies (compact state decoded to float32). Only
    ``"step"`` before the group's first step."""
    gi, i = locate(opt, param)
    group = opt.param_groups[gi]["params"]
    sizes = [a.size for a in group]
    bufs = opt._group_buffers(gi)
    fmt = opt._state_format
    if fmt.compact:      # the codes (and absmax arrays) are the group's flat buffers
        codes = {n: bufs.pop(n) for n in opt.state[gi]["flat"]}
        bufs.update(fmt.decoded(codes, sizes))
    if not opt._placement.is_low(group[i].dtype):
        bufs.pop("master", None)    # (a float32 param beside 16-bit ones: its own values)
    lo = sum(sizes[:i])
    shape = group[i].shape
    out = {"step": opt.state[gi]["step"]}
    for n in sorted(bufs):
        out[n] = np.array(bufs[n][lo:lo + sizes[i]]).reshape(shape)
    return out
