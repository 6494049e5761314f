"""An optimizer stepping arrays nothing else holds: unpickled or
deep-copied without them, or left with the old array after the user's code
replaced one (``layer.W = rng.normal(...)``).

A copy of an optimizer (``pickle``, ``copy.deepcopy``) carries copies of
its params, which is right when the params travel in the same pickle
(``pickle.dump((params, opt))``): the copies are the user's new arrays.
Pickled on its own beside weights saved elsewhere (``np.savez``), the
optimizer's copies are held by nothing but the optimizer: its steps ran
without a word and the user's arrays never moved (torch's optimizers do
the same). So the first step of a copy counts the references to its
params (and to the object they were given in) and warns when the
optimizer's own objects account for all of them.

The same happens when a user's code replaces an array it built the
optimizer over (a notebook re-running ``layer.W = ...``): where the params
were given in a list made for the call (``Adam([L.W, L.b])``) nothing can
watch the user's own attributes, and the optimizer went on stepping the
old array, the new one never trained. So the step checks, at step counts
``FIRST_CHECK``, 32, 64, ... and every ``CHECK_EVERY`` steps after that,
whether anything outside it still holds each param, and
warns (once) naming the first that something held at the last check and
nothing holds now (at the first check: one nothing holds while something
holds others, replaced before it). Such a check first counts each param's references
(about 50 ns a param) and goes on only where a count fell since the last
check: a replaced param's always does, its holder having let go.

What counts as the optimizer: everything reachable from its attributes
through lists, tuples, dicts, views and fastopt's own objects, except the
params object it was given (the user's dict or list, when they hold it)
and what lies in it. A reference count beyond what those hold is the
user's: a variable (local variables are no objects the garbage collector
could list, hence counts), a container or a view. About 1 ms for a small
optimizer, 2 ms for 24 arrays, 6 ms for 100, at the first check and where
a count fell; any failure of the check itself skips the warning.
"""

from __future__ import annotations

import gc
import sys
import types
import weakref
from collections import Counter

import numpy as np

from .._warn import warn_user
from ..params import FlatArrays
from .grouping import Groups

#: the step count of the first check (a copy's: its first step). Before
#: it, code that made the optimizer may still hold the params in local
#: variables it is about to drop (a benchmark's setup, warm-up steps
#: included): what holds them from the 16th step on is what holds them.
#: (Checking from the first step, with the baseline taken again when the
#: function that made the optimizer returned, was tried and dropped: a
#: helper that makes the optimizer returns before any step, and a
#: replacement right after that function's return went unseen)
FIRST_CHECK = 16
#: steps between two checks once the doubling reaches it (a check counts
#: the params' references, about 50 ns each, and checks in full only where
#: a count fell). 256 left a head re-initialised at step 130 of a 200-step
#: fine-tune untrained without a word
CHECK_EVERY = 64

#: containers followed from the optimizer's attributes to find what it holds
_CONTAINERS = (list, tuple, dict, set, frozenset)
#: what holds no reference a check counts (a third of a small optimizer's
#: objects: skipped, the whole check is that much shorter)
_ATOMS = frozenset({int, float, bool, str, complex, type(None), type})

#: buffer id -> {optimizer id: weak reference} of the optimizers whose
#: params are views of that buffer, registered at their checks. One per
#: layer over views of a vector the user packed: each one's views refer to
#: the vector, so each would take the others' references for the user's and
#: never see the vector replaced; such optimizers are judged together
#: (:func:`_peers`). Weak references by id: an optimizer subclass may be
#: unhashable (its own ``__eq__``)
_BY_BUFFER: dict = {}
#: peers judged with an optimizer at most (each is walked as the optimizer
#: is, about 0.3 ms): past it, none are (the vector's replacement unseen,
#: as before peers were judged), so that a check stays a few milliseconds
MAX_PEERS = 16


def checked(opt) -> None:
    """``opt`` has checked who holds its params: a peer of later checks of
    optimizers over views of the same buffers."""
    ref = weakref.ref(opt)
    for b in _buffer_ids(opt):
        _BY_BUFFER.setdefault(b, {})[id(opt)] = ref


def _buffer_ids(opt) -> set:
    """The ids of the buffers ``opt``'s params are views of."""
    return {id(b) for a in opt._params for b in _owners(a)[1:]}


def _peers(opt) -> list:
    """The other checked optimizers, on the host, with params that are views
    of a buffer some of ``opt``'s params are views of (none past
    :data:`MAX_PEERS`)."""
    mine = _buffer_ids(opt)
    found = {}
    for b in mine:
        entry = _BY_BUFFER.get(b)
        if not entry:
            continue
        for key, ref in list(entry.items()):
            o = ref()
            if o is None:
                del entry[key]          # (gone: its entry with it)
            elif o is not opt and key not in found:
                found[key] = o
    peers = [o for o in found.values()
             if getattr(o, "_params", None) and o._given is not None
             and o._placement is not None and not o._placement.device
             and not mine.isdisjoint(_buffer_ids(o))]    # (an id reused since: not a peer)
    return peers if len(peers) <= MAX_PEERS else []


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
    # (group_params' groups: the user's dict or list they were made from
    # too, which the user holds where the groups' own dicts are new: once
    # the groups' local variable was gone, the params were "held by nothing
    # outside", and a copy of such an optimizer "copied without its arrays")
    source = given.source if isinstance(given, Groups) else None
    for obj in (given, source, *params):
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
        if isinstance(obj, Groups):     # its source, through its __dict__: the
            items.append(obj.__dict__)  # reference the groups hold is counted
    else:
        return False
    leads = False
    for item in items:
        leads = _visit(item, side, depth + 1) or leads
    if leads:
        side[id(obj)] = obj
    return leads


#: the public attributes fastopt's optimizers set (the private ones start
#: with "_"); any other is the user's own (``opt.model = model``), whose
#: references to the params are the user's
_OWN_PUBLIC = frozenset({"param_groups", "state", "defaults", "loss_scaler", "last_lr",
                         "grad_stats", "grad_norm", "base_optimizer"})


def _own_values(obj) -> list:
    return [v for k, v in obj.__dict__.items() if k.startswith("_") or k in _OWN_PUBLIC]


def _optimizer_side(opt, user, owner=None) -> dict:
    """``id -> object`` of what the optimizer's own attributes hold (and
    those of the wrapper ``owner`` holding it: SAM), not entering ``user``."""
    seen, todo = {id(opt): opt, id(opt.__dict__): opt.__dict__}, _own_values(opt)
    if owner is not None:
        seen.update({id(owner): owner, id(owner.__dict__): owner.__dict__})
        todo += _own_values(owner)
    while todo:
        obj = todo.pop()
        if type(obj) in _ATOMS or id(obj) in seen or id(obj) in user:
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


def reference_counts(opt) -> list:
    """The reference counts of ``opt``'s params, then of what they were
    given in and of the buffers they are views of (a whole dict, vector or
    FlatArrays replaced lets go of those, not of the params), as this call
    sees them: compared only with the counts of another call of it."""
    params = opt._params
    given = opt._given
    held = [*params, given]
    if isinstance(given, Groups):     # (and the dict or list they were made from)
        held.append(given.source)
    for a in params:
        held += _owners(a)[1:]
    return list(map(sys.getrefcount, held))


def _owners(a) -> list:
    """``a``, then the object its memory is a view of, and so on up to the
    owner (an array, or a bytearray, mmap, ... under ``np.frombuffer``)."""
    chain = [a]
    while isinstance(a, np.ndarray) and a.base is not None:
        a = a.base
        chain.append(a)
    return chain


def _shown_ids(opt) -> set:
    """The ids of ``opt.param_groups``, its groups and their params lists
    (a function of its own: a local variable holding them would count)."""
    groups = getattr(opt, "param_groups", None) or []
    return {id(groups)} | {id(g) for g in groups} | {
        id(g.get("params")) for g in groups if isinstance(g, dict)}


def unheld(opt, owner=None) -> list:
    """The indices of ``opt``'s params that nothing outside it (and the
    wrapper ``owner`` holding it: SAM) refers to, directly or through what
    leads to them (what they were given in, ``opt.param_groups``, the
    buffer they are views of). Each object's reference count is compared
    with the references the optimizer's own objects and the params' own
    containers account for: a count beyond them is a user's variable,
    container or view (local variables are not objects the collector can
    list, so they are found this way only)."""
    params = opt._params
    # with the peers over the same buffers: what their own objects hold is
    # no user's either, and what the user holds of theirs holds the buffer
    judged = [opt, *_peers(opt)]
    user = {}
    for o in judged:
        user.update(_user_side(o._given, o._params))
    holders = {}
    for o in judged:
        holders.update(_optimizer_side(o, user, owner if o is opt else None))
    holders.update(user)
    # ids only from here: a dict or list of the objects themselves would add
    # to the counts being compared
    user = set(user)
    refs = {key: [id(r) for r in _referents(obj)] for key, obj in holders.items()}
    known = Counter(r for out in refs.values() for r in out)
    itself = {i for o in judged for i in (id(o), id(o.__dict__))} | (
        set() if owner is None else {id(owner), id(owner.__dict__)})
    shown = set().union(*map(_shown_ids, judged))
    del judged, o
    # held from outside: the user's side, or what the optimizer shows of
    # them (opt.param_groups, its groups and their params lists). Its other
    # objects are no user's, and may be held where the walk does not look
    # (a bound method, a compiled object), so they are not counted. The
    # references made here are holders' value and getrefcount's argument
    todo = [key for key in holders
            if key not in itself and (key in user or key in shown)
            and sys.getrefcount(holders[key]) - 2 > known[key]]
    reached = set()
    while todo:
        key = todo.pop()
        if key not in reached:
            reached.add(key)
            todo.extend(r for r in refs.get(key, ()) if r in holders)
    out = []
    for i, a in enumerate(params):
        # the array, or a buffer it is a view of, held; memory owned by
        # something else than an array (a bytearray, an mmap, shared memory,
        # a torch tensor): a new view of it may be what the user holds,
        # which no count here sees, so not judged. Except bytes: a writable
        # array over bytes is one NumPy unpickled (pickle gives arrays past
        # about 100 elements that base), and no other view of it can be made
        if not any(id(b) in reached or not isinstance(b, (np.ndarray, bytes))
                   for b in _owners(a)):
            out.append(i)
    return out


def replaced_hint(opt) -> str:
    """For a refused step's message: the params something outside held at
    the last check and nothing holds now (a gradient made for the array
    that replaced one), or ""."""
    try:
        alone = [i for i in unheld(opt) if i in (opt._held or ())]
    except Exception:       # noqa: BLE001 - a hint only
        return ""
    if not alone:
        return ""
    return (f". Note: nothing outside this {type(opt).__name__} holds "
            f"{opt._param_label(alone[0])} any more: if your code replaced it with a new array "
            "(layer.W = ...), make the optimizer again over the new arrays")


def warn_if_unheld(opt, owner=None) -> bool:
    """Warn when nothing outside ``opt`` (and the wrapper ``owner``
    holding it) holds some of its params any more (a copy: from its first
    step); whether it warned. ``opt._held`` keeps which params something
    outside held at the last check: an optimizer made over arrays no one
    kept (``Adam([np.ones(3)])``, read back through its param_groups) is
    left alone."""
    try:
        if opt._given is None or opt._placement is None or opt._placement.device:
            return False
        checked(opt)        # a peer of the checks of optimizers over the same buffers
        alone = unheld(opt, owner)
    except Exception:       # noqa: BLE001 - a heuristic: never a step's failure
        return False
    before, count = opt._held, len(opt._params)
    opt._held = set(range(count)).difference(alone)
    copy_alone = opt._copied and before is None and len(alone) == count
    if before is None and not copy_alone and 0 < len(alone) < count:
        # the first check, some params held outside and some not: the
        # others were replaced before it (``self.coef_ = np.zeros(...)`` a
        # few steps in, beside ``self.intercept_`` kept). An optimizer over
        # arrays no one keeps has none held; one over some of them (read
        # back through param_groups each step, never kept) is rare enough
        # to be told
        before = set(alone)
    alone = [i for i in alone if i in (before or ())]
    if not (alone or copy_alone):
        return False
    name = type(opt if owner is None else owner).__name__
    if copy_alone:
        warn_user(
            f"this {name} was unpickled or copied without the arrays it updates: its "
            "params are copies that nothing outside it holds, so its steps change none "
            "of your arrays (only what its param_groups show). Pickle the params with it "
            "(pickle.dump((params, opt))), "
            f"or make a new {name} over your arrays and load_state_dict(old.state_dict()); "
            "fastopt.save/fastopt.load keep both")
    else:
        a = opt._params[alone[0]]
        more = f" (and {len(alone) - 1} more)" if len(alone) > 1 else ""
        warn_user(
            f"{opt._param_label(alone[0])}{more} of this {name}, a {a.dtype}{list(a.shape)} "
            "array, is held by nothing outside it: your code replaced it, or the dict, "
            "list or vector holding it, with a new one (layer.W = ..., params = "
            "load(...)?), so this optimizer steps an array that nothing reads and the "
            "new one is not trained. Make the optimizer again over the "
            f"new arrays (its state: new = {name}(...); new.load_state_dict(old.state_dict())), "
            "or write new values into the old array (layer.W[...] = ...)")
    return True
