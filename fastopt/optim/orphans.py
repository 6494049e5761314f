"""An optimizer unpickled or deep-copied without the arrays it updates.

A copy of an optimizer (``pickle``, ``copy.deepcopy``) carries copies of
its params, which is right when the params travel in the same pickle
(``pickle.dump((params, opt))``): the copies are the user's new arrays.
Pickled on its own beside weights saved elsewhere (``np.savez``), the
optimizer's copies are held by nothing but the optimizer: its steps ran
without a word and the user's arrays never moved (torch's optimizers do
the same). So the first step of a copy counts the references to its
params (and to the object they were given in) and warns when the
optimizer's own objects account for all of them.

What counts as the optimizer: everything reachable from its attributes
through lists, tuples, dicts, views and fastopt's own objects, except the
params object it was given (the user's dict or list, when they hold it)
and what lies in it. A reference count beyond what those hold is the
user's: a variable (local variables are no objects the garbage collector
could list, hence counts), a container or a view. Once per copy, at its
first step (a few ms); any failure of the check itself skips the warning.
"""

from __future__ import annotations

import gc
import sys
import types

import numpy as np

from .._warn import warn_user
from ..params import FlatArrays

#: containers followed from the optimizer's attributes to find what it holds
_CONTAINERS = (list, tuple, dict, set, frozenset)


def _fastopt_object(obj) -> bool:
    """An instance of one of fastopt's classes (not a module, class or function)."""
    kind = type(obj)
    return (kind.__module__ or "").startswith("fastopt") and not isinstance(
        obj, (type, types.ModuleType, types.FunctionType, types.MethodType))


def _user_side(given, params) -> dict:
    """``id -> object`` of what a user holding the params may refer to: the
    arrays, the buffers they are views of, and the object they were given
    in with the lists, dicts and FlatArrays in it that lead to arrays (not
    a group's betas tuple, which may be a constant shared with anything)."""
    side = {}
    for obj in (given, *params):
        _visit(obj, side, 0)
    return side


def _visit(obj, side, depth) -> bool:
    """Whether ``obj`` leads to an array, kept in ``side`` if so. (Not a
    closure: a recursive one stays alive in a reference cycle, with the
    dict it fills, and that dict's references would count as the user's.)"""
    if id(obj) in side:
        return True
    if isinstance(obj, np.ndarray):
        side[id(obj)] = obj
        if obj.base is not None:
            _visit(obj.base, side, depth)
        return True
    if depth > 64:          # (a cycle, or no user's nesting)
        return False
    if isinstance(obj, dict):
        items = list(obj.values())
    elif isinstance(obj, FlatArrays):
        items = [*obj, obj.data, getattr(obj, "__dict__", {})]     # (.data lies there)
    elif isinstance(obj, (list, tuple)):
        items = list(obj)
    else:
        return False
    leads = False
    for item in items:
        leads = _visit(item, side, depth + 1) or leads
    if leads:
        side[id(obj)] = obj
    return leads


def _optimizer_side(opt, user, owner=None) -> dict:
    """``id -> object`` of what the optimizer's attributes hold (and those
    of the wrapper ``owner`` holding it: SAM), not entering ``user``."""
    seen, todo = {id(opt): opt, id(opt.__dict__): opt.__dict__}, list(opt.__dict__.values())
    if owner is not None:
        seen.update({id(owner): owner, id(owner.__dict__): owner.__dict__})
        todo += list(owner.__dict__.values())
    while todo:
        obj = todo.pop()
        if id(obj) in seen or id(obj) in user:
            continue
        seen[id(obj)] = obj
        if isinstance(obj, _CONTAINERS) or _fastopt_object(obj):
            todo.extend(gc.get_referents(obj))
        elif isinstance(obj, np.ndarray) and obj.base is not None:
            todo.append(obj.base)      # a view of a state buffer, or of a param
    return seen


def _referents(obj) -> list:
    """What ``obj`` refers to, as far as the counts here follow it."""
    if isinstance(obj, np.ndarray):         # (not tracked by the collector: its base)
        return [] if obj.base is None else [obj.base]
    if isinstance(obj, _CONTAINERS) or _fastopt_object(obj):
        return gc.get_referents(obj)
    return []


def held_outside(opt, owner=None) -> bool:
    """Whether anything but ``opt`` itself refers to its params, to what
    they were given in, or to its own lists of them (``opt.param_groups``):
    each such object's reference count against the references the
    optimizer's own objects (and the params' own containers) account for.
    A count beyond them is a user's variable, container or view (local
    variables are not objects the collector can list, so they are found
    this way only)."""
    user = _user_side(opt._given, opt._params)
    holders = {**_optimizer_side(opt, user, owner), **user}
    # ids only from here: a dict or list of the objects themselves would add
    # to the counts being compared
    user = set(user)
    refs = {key: [id(r) for r in _referents(obj)] for key, obj in holders.items()}
    # the optimizer's own objects that lead to the params count too: a user
    # holding opt.param_groups[0]["params"] holds the arrays
    leads, grown = set(user), True
    while grown:
        grown = False
        for key, out in refs.items():
            if key not in leads and any(r in leads for r in out):
                leads.add(key)
                grown = True
    itself = {id(opt), id(opt.__dict__)} | (
        set() if owner is None else {id(owner), id(owner.__dict__)})
    for key in leads - itself:
        if key not in user and not isinstance(holders[key], _CONTAINERS):
            continue        # (fastopt's own objects: no user holds them, its frames may)
        known = sum(out.count(key) for out in refs.values())
        # references made here: holders' value and getrefcount's argument
        if sys.getrefcount(holders[key]) - 2 > known:
            return True
    return False


def warn_if_orphaned(opt, owner=None) -> None:
    """The first step of a copy: warn when nothing outside it (and the
    wrapper ``owner`` holding it) holds its params."""
    try:
        if opt._given is None or opt._placement is None or opt._placement.device:
            return
        alone = not held_outside(opt, owner)
    except Exception:       # noqa: BLE001 - a heuristic: never a step's failure
        return
    if alone:
        name = type(opt if owner is None else owner).__name__
        warn_user(
            f"this {name} was unpickled or copied without the arrays it updates: its "
            "params are copies that nothing outside it holds, so its steps change none "
            "of your arrays (only what its param_groups show). Pickle the params with it "
            "(pickle.dump((params, opt))), "
            f"or make a new {name} over your arrays and load_state_dict(old.state_dict()); "
            "fastopt.save/fastopt.load keep both")
