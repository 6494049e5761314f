"""Optimizer base class: param groups, per-run state, validation, dispatch.

The math lives in the backends; this class owns everything around it:

* param groups with their own hyperparameters (torch-style dicts in
  ``param_groups``, editable between steps, re-validated at every step);
* **runs**: within a group, arrays that lie end to end in one buffer (the
  views of :func:`fastopt.pack`) are stepped as one flat array, so a packed
  model costs one kernel call per group whatever its tensor count;
* optimizer state, one flat buffer per run and state name;
* gradient resolution: a :class:`~fastopt.params.FlatArrays` of gradients
  with the params' layout maps straight onto the runs (checked once, then
  cached by identity); any other list is checked and stepped array by array;
* optional global-norm clipping folded into the update kernel
  (``max_grad_norm``): one read pass for the norm, the coefficient applied
  inside the update, the caller's gradients left untouched;
* ``skip_nonfinite``: the same read pass (one extra pass over the grads when
  clipping is off) tells whether any gradient is NaN/inf, and such a step
  is skipped without writing anything;
* learning-rate schedules (:mod:`fastopt.schedules`): a group's ``lr`` may
  be a schedule, evaluated at ``iterations`` once per step on the host;
* where the arrays live is a placement (:mod:`fastopt.optim.placement`)
  chosen when the params are bound: host NumPy arrays, or device arrays
  (``backend="cuda"``, or "auto" given device params) with grads and state
  on the GPU. The step delegates to it; an optimizer class declares only
  its math (``_element_step``) and runs on both.
"""

from __future__ import annotations

import inspect
import math
import numbers
import operator
import os
import threading
import traceback
import weakref
from collections import Counter

import numpy as np

from .. import _validate as V
from .._warn import warn_user
from .._memory import state_copy
from ..backends import backend_for, get_backend
from ..backends.scalars import clip_coefficient
from ..backends.tables import element_of, group_tables, refuse_each_other, step_per_array
from ..backends.threads import SERIAL_MAX
from ..clip import norm_of, ordered_sum, settled_norm
from ..params import FlatArrays
from ..schedules import Schedule, from_dict
from .loss_scale import LossScaler, claim as claim_scaler
from .interrupt import INTERRUPTS, Mark, finished, held
from .named import Fields, KeyTree, ListPart, Seq, is_record, is_tree
from .orphans import (CHECK_EVERY, FIRST_CHECK, reference_counts, replaced_hint,
                      warn_if_unheld)
from .param_list import ParamList
from .param_state import GroupStates, param_state
from .placement import placement_for
from .state_format import ABSMAX, StateFormat
from . import forks
from .given import GivenParams
from .step_plan import STALE, StepPlan


def _all_finite(norm, flats) -> bool:
    """Whether every gradient is finite, given their global norm.

    The norm is a float64 sum of squares: any NaN gives NaN and any inf gives
    inf (squares are >= 0, so no inf - inf), and for finite float32/16
    inputs the sum cannot overflow (n * 3.4e38**2 << 1.8e308). Only float64
    gradients above ~1e154 can overflow it to inf while finite; that rare
    case is settled by an exact check.
    """
    if math.isfinite(norm):
        return True
    if norm != math.inf:
        return False
    return all(bool(np.isfinite(f).all()) for f in flats)


_MISSING = object()
_NOT_GIVEN = V.NOT_GIVEN        # (a global: read on every step)
_lr_of = operator.itemgetter("lr")

# kinds of hyperparameter (Optimizer._hypers)
NONNEG, POSITIVE, REAL, BETAS, FLAG = "nonneg", "positive", "real", "betas", "flag"


def _unchanged(group, snapshot) -> bool:
    """Whether ``group`` holds the hyperparameters of ``snapshot`` (besides
    params and lr): by identity first, the step's hot path."""
    if len(group) != len(snapshot) + 2:
        return False
    for k, v in snapshot.items():
        w = group.get(k, _MISSING)
        if w is not v:
            try:
                # by type too: 0 == False, and a flag given as 0 was taken as
                # checked, then saved, and the checkpoint refused by load
                if type(w) is not type(v) or w != v:
                    return False
            except (TypeError, ValueError):   # e.g. an array put in a group
                return False
    return True


def _is_device_array(a) -> bool:
    """A GPU array (``__cuda_array_interface__``, or the CUDA simulator's)."""
    return not isinstance(a, (np.ndarray, list, tuple, dict)) and (
        hasattr(a, "__cuda_array_interface__") or type(a).__name__ == "FakeCUDAArray")


def prepared_load(optimizer, state_dict):
    """``optimizer._prepare_load(state_dict)``, a mismatch raised as
    :class:`fastopt.CheckpointError`, the error :func:`fastopt.load` gives."""
    from ..checkpoint import CheckpointError, as_checkpoint_error
    try:
        return optimizer._prepare_load(state_dict)
    except CheckpointError:
        raise
    except (TypeError, ValueError) as exc:
        raise as_checkpoint_error(exc) from exc


def _brief(layout):
    text = ", ".join(f"{d.get('name', '') and d['name'] + ': '}{d.get('dtype')}{d.get('shape')}"
                     for d in layout[:4])
    return f"[{text}{', ...' if len(layout) > 4 else ''}] ({V.count(len(layout), 'array')})"


#: plain callables given as lr and warned about (once each: one given to
#: three groups, or to ShardedOptimizer and its inner optimizer, warned 2-3x)
_WARNED_CALLABLES = weakref.WeakSet()


def _stand_in(a):
    """``a`` for the checks of an array written in place wherever it lies:
    a non-contiguous plain ndarray as an empty C-ordered one of its shape,
    dtype and writability."""
    if type(a) is not np.ndarray or a.flags.c_contiguous:
        return a
    out = np.empty(a.shape, a.dtype)
    out.flags.writeable = a.flags.writeable
    return out


def _first_warning_for(fn) -> bool:
    try:
        if fn in _WARNED_CALLABLES:
            return False
        _WARNED_CALLABLES.add(fn)
    except TypeError:           # not weakly referable: warned each time it is given
        pass
    return True


class ScheduleFailed(ValueError):
    """A schedule raised, or gave no lr a step can take, at a step."""


def schedule_value(schedule, k, name) -> float:
    """``schedule(k)``, checked: a non-negative real lr, or a
    :class:`ScheduleFailed` naming ``name`` and the step."""
    try:
        value = schedule(k)
    except Exception as exc:    # noqa: BLE001 - a user's callable: gamma > 1 overflowing,
        # a list of lrs run out (IndexError): raised before anything is written
        raise ScheduleFailed(f"{name}: the schedule failed at step {k}: "
                             f"{type(exc).__name__}: {exc}") from exc     # its traceback
    try:
        return V.check_real(f"{name} (schedule value at step {k})", value, low=0.0)
    except (TypeError, ValueError) as exc:
        raise ScheduleFailed(str(exc)) from None


def _flat_of(gi, spec) -> dict:
    """``{gi: FlatArrays}`` when group ``gi``'s params were given as a host
    FlatArrays (its views are made anew by a copy: _relink_views)."""
    given = spec.get("params")
    return {gi: given} if isinstance(given, FlatArrays) else {}


def _spec_arrays(specs) -> list:
    """The arrays of param-group specs, in order (a dict's by its keys)."""
    arrays = []
    for spec in specs:
        given = spec["params"]
        if is_tree(given):
            given = KeyTree.of(given, "params")[1]
        arrays += [given] if isinstance(given, np.ndarray) else list(given)
    return arrays


def _names_differ(saved, layout) -> str:
    """Where two records of a group name their params differently, the first
    name on one side only (a renamed model), said in brackets; else ''."""
    ours, theirs = [d.get("name") for d in layout], [d.get("name") for d in saved]
    if None in ours:
        return _first_difference(saved, layout)
    for name in theirs:
        if name not in ours:
            return f" (names differ: {name!r} is in the checkpoint's group, not in this one)"
    for name in ours:
        if name not in theirs:
            return f" (names differ: {name!r} is in this group, not in the checkpoint's)"
    return _first_difference(saved, layout)


def _first_difference(saved, layout) -> str:
    """The first param recorded otherwise on the two sides (the lists
    above it are cut at four: two networks whose last layers differ showed
    the same four), by name where both name it, else by place; or ''."""
    theirs = {d.get("name"): d for d in saved}
    for i, d in enumerate(layout):
        name = d.get("name")
        other = (theirs.get(name) if name is not None and len(theirs) == len(saved)
                 else saved[i] if i < len(saved) else None)
        if other is not None and other != d:
            label = repr(name) if name is not None else f"the param at {i}"
            return (f" (first difference: {label} is {d.get('dtype')}{d.get('shape')} here, "
                    f"{other.get('dtype')}{other.get('shape')} in the checkpoint)")
    return ""


def _order_by_name(saved, layout):
    """Where each param of ``layout`` stands in ``saved`` (two groups'
    checkpoint records, ``[{"name", "shape", "dtype"}]``), when both name
    every param, once each, and hold the same names with the same shapes
    and dtypes; else None."""
    names = [d.get("name") for d in saved]
    if (len(saved) != len(layout) or not all(isinstance(n, str) for n in names)
            or len(set(names)) != len(names)):
        return None
    at = {n: i for i, n in enumerate(names)}
    order = [at.get(d.get("name")) for d in layout]
    if None in order or any(saved[j] != d for j, d in zip(order, layout)):
        return None
    return order


def order_in_checkpoint(where, saved, layout):
    """Where each param of ``layout`` (a group's params as a checkpoint
    records them) stands in ``saved`` (a checkpoint's record of the group):
    None in the same order; by name where both sides name them, else by
    position. ValueError, naming ``where``, when they differ."""
    if not isinstance(saved, list) or not all(isinstance(d, dict) for d in saved):
        raise ValueError(f"{where}['params'] must be a list of dicts")
    mine, theirs = layout, saved
    if not (any("name" in d for d in saved) and any("name" in d for d in layout)):
        mine, theirs = ([{k: v for k, v in d.items() if k != "name"} for d in side]
                        for side in (layout, saved))
    if mine == theirs:
        return None
    order = _order_by_name(theirs, mine)
    if order is None:
        raise ValueError(f"{where}: params {_brief(saved)} do not match this "
                         f"optimizer's {_brief(layout)}{_names_differ(theirs, mine)}")
    return order


#: torch.optim's implementation switches, which choose how torch runs the
#: same update: here it is always one fused native call per group
_TORCH_SWITCHES = dict.fromkeys(
    ("fused", "foreach", "capturable", "differentiable"),
    "torch's switch between its implementations of the same update; fastopt's step is "
    "always one fused native call per group: drop it")
# Keras's names (tf.keras.optimizers): (what fastopt calls it, the hint),
# said where the optimizer takes that
_KERAS_NAMES = {
    "learning_rate": ("lr", "Keras's name for lr: lr=... (a number, or a schedule from "
                            "fastopt.schedules)"),
    "global_clipnorm": ("max_grad_norm", "Keras's name for max_grad_norm (fastopt scales by "
                                         "torch's max_norm / (norm + 1e-6))"),
    "clipnorm": ("max_grad_norm", "Keras clips each array by its own norm; fastopt by the "
                                  "global norm of all the gradients (max_grad_norm=), or one "
                                  "array's: fastopt.clip_by_global_norm(g, c) on each gradient "
                                  "before the step"),
    "clipvalue": ("max_grad_norm", "fastopt clips by the global L2 norm only "
                                   "(max_grad_norm=); clip values yourself before the step: "
                                   "np.clip(g, -c, c, out=g)"),
    "beta_1": ("betas", "Keras's name: betas=(beta_1, beta_2)"),
    "beta_2": ("betas", "Keras's name: betas=(beta_1, beta_2)"),
    "epsilon": ("eps", "Keras's name for eps (where Keras adds it differs by optimizer: "
                       "check the formula, and the default, in the class's docstring)"),
}


def _name_pairs(params, none=False) -> bool:
    """``params`` is a list of (name, array) pairs, as torch's
    ``named_parameters()`` gives (``none``: gradients, where an array may
    be None, a frozen param's, or a Python number, a 0-d param's)."""
    return isinstance(params, (list, tuple)) and bool(params) and all(
        type(p) is tuple and len(p) == 2 and isinstance(p[0], str)
        and (isinstance(p[1], np.ndarray) or _is_device_array(p[1])
             or (none and (p[1] is None or _is_number(p[1])))) for p in params)


class InParamOrder(list):
    """Gradients of a list of layers already read into param order (a frozen
    step's, stand-ins in place of its Nones): not read as layers again."""


def _holds_none(grads) -> bool:
    """Whether a list, tuple or dict (of layers) of gradients has a None
    in it (a frozen param's, as torch leaves its grad; in (name, array)
    pairs too)."""
    if isinstance(grads, (list, tuple)):
        return any(g is None or (type(g) is tuple and len(g) == 2 and g[1] is None)
                   or ((isinstance(g, (dict, list)) or is_record(g)) and _holds_none(g))
                   for g in grads)
    if isinstance(grads, dict):
        return any(g is None or (isinstance(g, (dict, list, tuple)) and _holds_none(g))
                   for g in grads.values())
    return False


def check_weight_values(vals, params, labels) -> None:
    """``sync_master(values)``'s arrays against the params (``labels[k]``:
    how messages name param ``k``, ``params[...]``): one each, floats, the
    param's shape."""
    from ..backends.lowp import is_low_precision
    if len(vals) != len(params):
        raise ValueError(f"values has {V.count(len(vals), 'array')} but params has "
                         f"{len(params)}")
    for v, p, label in zip(vals, params, labels):
        what = f"values{label[len('params'):]}"
        if not isinstance(v, np.ndarray):
            raise TypeError(f"{what} must be an ndarray, got {type(v).__name__}")
        if v.dtype.kind != "f" and not is_low_precision(v.dtype):
            raise TypeError(f"{what} must hold floats, got {v.dtype}")
        if v.shape != p.shape:
            raise ValueError(f"{what} has shape {v.shape} but {label} has shape {p.shape}")


def _replaced_numbers(groups, loaded, schedules) -> str:
    """What a checkpoint's group hyperparameters change of the groups'
    own plain numbers (``"param_groups[0] lr=0.001 replaces 0.0001, ..."``),
    or ""; a scheduled lr on either side is compared as a schedule (a
    resume with a new lr lost it without a word wherever a schedule was
    on either side)."""
    said = []
    for gi, (group, hyp) in enumerate(zip(groups, loaded)):
        for k, v in hyp.items():
            now = group.get(k)
            if k == "lr" and (gi in schedules or callable(v) or callable(now)):
                now = schedules.get(gi, now)
                if not (callable(v) and callable(now) and v == now):
                    said.append(f"param_groups[{gi}] lr {_lr_said(v)} replaces {_lr_said(now)}")
                continue
            if isinstance(now, (list, tuple)):
                now = tuple(now)
            if isinstance(v, (list, tuple)):
                v = tuple(v)
            if now != v:
                said.append(f"param_groups[{gi}] {k}={v!r} replaces {now!r}")
    if len(said) > 4:
        said = said[:4] + [f"and {len(said) - 4} more"]
    return "; ".join(said)


def _lr_said(lr) -> str:
    return (f"schedule {lr!r}" if isinstance(lr, Schedule) else "schedule" if callable(lr)
            else f"{lr!r}")


def _is_number(value) -> bool:
    """A Python or NumPy number, or a 0-d array (a loss, say)."""
    return isinstance(value, (numbers.Number, np.generic)) or (
        isinstance(value, np.ndarray) and value.ndim == 0)


def refuse_options(cls, unknown):
    """A TypeError naming ``cls`` (not the base's ``__init__``) and the first
    keyword argument of ``unknown``, with the class's hint for it or the
    closest name it takes."""
    import difflib
    import inspect

    name = next(iter(unknown))
    # L-BFGS takes its own keywords only, the others the base's options too
    owners = (cls,) if getattr(cls, "steps_with_closure", False) else (cls, Optimizer)
    taken = list(dict.fromkeys(
        p.name for c in owners for p in inspect.signature(c.__init__).parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.name not in ("self", "params", "defaults")))
    hint = cls._option_hints.get(name) or _TORCH_SWITCHES.get(name)
    if hint is None and name in _KERAS_NAMES and _KERAS_NAMES[name][0] in taken:
        hint = _KERAS_NAMES[name][1]
    if hint is None:
        close = difflib.get_close_matches(name, taken, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"it takes {', '.join(taken)}"
    raise TypeError(f"{cls.__name__}() got an unexpected keyword argument {name!r}: {hint}")



def _store_numbers(group, checked):
    """Put the checked numbers back into ``group`` where the user set 0-d
    arrays (``g["lr"] = np.load(cfg)["lr"]``) or NumPy scalars (a Keras-style
    scheduler's ``np.float32``), as the constructor stores them: an array
    there would keep every later step off the fast path, and a float32 lr
    came back from a checkpoint as a Python float, the resumed run's lr
    arithmetic no longer the uninterrupted one's."""
    def numpy_value(x):
        return type(x) is np.ndarray or isinstance(x, np.generic)
    for k, v in group.items():
        if k != "params" and (numpy_value(v) or (
                type(v) in (tuple, list) and any(map(numpy_value, v)))):
            group[k] = checked[k]


class _InGroups:
    """A hyperparameter's name on the optimizer itself (``opt.lr = 0.5``, as
    hand-written NumPy optimizers and Keras keep it) set an attribute no
    step read: the lr never changed. Reading or setting it says where the
    value lives. Installed on each optimizer class for its own
    hyperparameters at its creation (:func:`_guard_group_keys`);
    ``learning_rate`` too."""

    __slots__ = ("name", "key")

    def __init__(self, name, key):
        self.name, self.key = name, key

    def _refuse(self, obj, setting=True):
        k = self.key
        where = f"{type(obj).__name__} keeps {k!r} in its param groups, not as an attribute"
        if not setting:
            return AttributeError(f"{where}: opt.param_groups[i][{k!r}] is the value the "
                                  "next step uses")
        later = (f"; opt.defaults[{k!r}] is for groups added later"
                 if "defaults" in vars(obj) else "")         # (not the wrappers')
        return AttributeError(
            f"{where} (opt.{self.name} would be ignored by every step): set "
            f"opt.param_groups[i][{k!r}] = value, or for g in opt.param_groups: "
            f"g[{k!r}] = value{later}")

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        raise self._refuse(obj, setting=False)

    def __set__(self, obj, value):
        raise self._refuse(obj)

    def __delete__(self, obj):
        raise self._refuse(obj)


#: after "max_grad_norm must be > 0.0, got 0.0": a 0 meant as "off"
_NO_CLIP = "None turns clipping off"
#: a constructor's parameters that are not group hyperparameters
_NOT_HYPERS = frozenset({"self", "params", "backend", "max_grad_norm"})


def _guard_group_keys(cls):
    """:class:`_InGroups` for each hyperparameter of ``cls`` (its
    constructor's keyword parameters, as its defaults are built from them)
    and ``learning_rate`` for lr, where ``cls`` has no attribute of that
    name: at class creation, so that it holds from the first instance on
    (installed at the first instance, a subclass keeping ``self.lr`` worked
    or failed by which instance came first)."""
    params = inspect.signature(cls.__init__).parameters.values()
    keys = [p.name for p in params if p.name not in _NOT_HYPERS
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    names = [(k, k) for k in keys] + ([("learning_rate", "lr")] if "lr" in keys else [])
    for name, key in names:
        if not hasattr(cls, name):
            setattr(cls, name, _InGroups(name, key))


#: the keyword options of every optimizer stepped with gradients, appended
#: to each fastopt optimizer's docstring (its signature shows ``**options``)
OPTIONS_DOC = """
    Keyword options (every optimizer stepped with gradients): ``backend``
    (``"auto"``, ``"cython"``, ``"numba"``, ``"numpy"``, ``"cuda"``),
    ``max_grad_norm`` (global-norm clipping inside the step),
    ``skip_nonfinite`` (skip a step whose gradients hold NaN/inf; counted in
    ``skipped_steps``), ``loss_scaler`` (a :class:`fastopt.LossScaler` for
    float16 params), ``state_dtype`` (``"float32"``: state in the params'
    dtype; compact state ``"bfloat16"`` or ``"int8"``, 2x / about 4x smaller,
    for float32 and 16-bit params, not LAMB's or centered RMSprop's: see
    :mod:`fastopt.optim.state_format`) and ``state_seed`` (the seed of
    compact state's stochastic rounding).
"""


class Optimizer:
    """Base class. Subclasses declare their hyperparameters (``_hypers``) and
    their math (``_element_step``); where the arrays live is the placement's
    (host or device, chosen at bind), so every optimizer runs on both.

    Keyword options every optimizer stepped with gradients takes (L-BFGS,
    stepped with a closure, takes ``backend`` only): see :data:`OPTIONS_DOC`,
    which each optimizer's own docstring ends with (``help(fastopt.AdamW)``).

    After each step: ``grad_norm`` (pre-clip global norm, when computed),
    ``last_lr`` (per group), ``iterations`` (step calls, applied or skipped).
    """

    #: a hint for a keyword argument this optimizer does not take (name -> text)
    _option_hints: dict = {}

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.__module__.startswith("fastopt."):     # its own optimizers' hyperparameters
            _guard_group_keys(cls)
            if cls.__doc__ and "options" in inspect.signature(cls.__init__).parameters:
                cls.__doc__ = cls.__doc__.rstrip() + "\n" + OPTIONS_DOC

    def __init__(self, params, defaults: dict, *, backend="auto", max_grad_norm=None,
                 skip_nonfinite=False, loss_scaler=None, state_dtype="float32", state_seed=0,
                 **unknown):
        if unknown:
            refuse_options(type(self), unknown)
        if loss_scaler is not None:
            claim_scaler(loss_scaler, self)     # a LossScaler, and this optimizer's alone
        params = V.listed(params)        # a generator: one list for every look below
        self._state_format = StateFormat.of(type(self), state_dtype, state_seed, backend)
        self._backend_name = backend
        self._backend = None if params is None else get_backend(backend_for(backend, params))
        self._placement = None   # host or device, chosen by bind()
        self.loss_scaler = loss_scaler
        self.iterations = 0     # step() calls so far: the schedules' position
        self.skipped_steps = 0  # steps skipped for a non-finite gradient
        self.skip_nonfinite = V.check_bool("skip_nonfinite", skip_nonfinite)
        self.defaults = self._validated(dict(defaults))
        self.max_grad_norm = (None if max_grad_norm is None else
                              V.check_real("max_grad_norm", max_grad_norm, low=0.0,
                                           low_open=True, why=_NO_CLIP))
        self.param_groups = []
        self.state = GroupStates()
        self.grad_norm = None   # pre-clip global norm of the last step's grads
        self.last_lr = None     # per group, the lr the last step used
        self._names = None      # a KeyTree when the params were given by name
        self._seq_root = False  # ... as a list of layers (gradients as such a list too)
        self._given = None      # the params object bind() took (step(params=) checks it)
        self._group_lists, self._group_sizes = [], []
        self._flat_given = {}   # group -> the host FlatArrays its params were given as
        self._schedules, self._lr_shown = {}, {}    # group -> lr schedule, shown value
        self._lr_shown_at = None    # the step the shown values are for (_show_lr)
        self._lock = threading.RLock()
        forks.register(self)    # a fork waits for a step in progress (forks.py)
        #: Extension point: ``grad_stats(backend, grads, check) -> (norm, all
        #: finite?)`` over the step's 1-D gradient arrays, replacing the
        #: optimizer's own norm pass (then not fused into the update). A
        #: sharded optimizer (fastopt.distributed) combines its ranks' partial
        #: sums of squares and finite flags here with one allreduce.
        self.grad_stats = None
        if params is not None:
            self.bind(params)

    def bind(self, params) -> None:
        """Attach the params this optimizer updates, once: for clients that
        build their layers after the optimizer (``fastopt.AdamW(lr=1e-3)``,
        then ``opt.bind(params)`` or ``opt.step(grads, params=params)``).

        ``params``: an array; a list of arrays; a list of param-group dicts
        (``{"params": ..., "lr": ...}``); or a dict of name -> array, nested
        dicts of layers too (``{"layer1": {"W": w, "b": b}}``), whose
        gradients then come as a dict with the same keys; or a list of
        layer dicts (``[{"W": w, "b": b}, ...]``), whose gradients come as
        such a list. Everything is checked before anything is kept.
        """
        if self.param_groups:
            if self._rebinds_same(params):
                return          # a notebook cell run again: nothing to do
            raise RuntimeError(f"this {type(self).__name__} already has its params; "
                               "make another optimizer for other params"
                               + self._copy_hint())
        if params is None:
            raise TypeError("params is None: pass the arrays to optimize")
        params = V.listed(params)
        backend = get_backend(backend_for(self._backend_name, params))
        self._backend = backend
        # host or device arrays: their checks, runs, buffers and step
        self._placement = placement_for(backend)
        groups, names, packed, flats = [], None, {}, {}
        specs = self._group_specs(params)
        whole = len(specs) == 1 and not (isinstance(params, (list, tuple))
                                         and params and params[0] is specs[0])
        for gi, spec in enumerate(specs):
            group, names, packed[gi] = self._checked_group(gi, spec, names, whole)
            groups.append(group)
            flats.update(_flat_of(gi, spec))
        for gi, flat in flats.items():     # its views say writable: the buffer is what counts
            if not flat.data.flags.writeable:
                raise ValueError(f"param_groups[{gi}]['params'] is a FlatArrays whose buffer "
                                 "(.data) is read-only, and its params are written in place")
        all_params = self._checked_params(groups, names)
        # the lrs given, put back if a Ctrl-C runs keep() again (its _show_lr
        # has written the schedules' values over them)
        shown = ({}, {}, [g["lr"] for g in groups])

        def keep():     # -- everything checked: keep it (whole through a Ctrl-C) --
            self._lr_restore(shown, groups)
            self._flat_given = flats
            self._keep_bound(params, groups, names, packed, all_params)
        finished(keep)

    def _keep_bound(self, params, groups, names, packed, all_params):
        """:meth:`bind`'s checked params and groups kept."""
        self.param_groups = groups
        self._packed = packed      # group -> the one buffer its params were given as (device)
        self._params = all_params
        self._names = names
        self._seq_root = names is not None and names.seq_root
        self._given = params
        self._watch = GivenParams.of(params, all_params, names)
        self._layout = tuple((a.shape, a.dtype) for a in self._params)
        # A FlatArrays of grads is matched to params in param order. If the
        # groups list a packed buffer's views out of memory order, the grads'
        # own layout (e.g. params.zeros_like()) would follow memory order
        # instead and gradients could silently land on the wrong params.
        self._memory_ordered = self._placement.memory_ordered(self._params)
        self._build_runs()
        self.state = GroupStates(self._fresh_state(gi) for gi in range(len(groups)))
        self._cached = (None, None)
        self._tables = None     # host: per group, the compiled step's tables
        self._plan = None       # the last step's plan (step_plan.py): the fast path
        self._bound = None      # host: the FlatArrays of grads the tables point at
        self._group_lists = [g["params"] for g in self.param_groups]
        self._group_sizes = [len(g["params"]) for g in self.param_groups]
        self._show_lr()

    @property
    def _device(self) -> bool:
        """Whether the params are device arrays (the device placement)."""
        return self._placement is not None and self._placement.device

    def _fresh_state(self, gi) -> dict:
        """Group ``gi``'s state before its first step: no buffers yet (state
        name -> one buffer over the group in ``flat``, with each run's view
        of it in ``runs``), and for each 16-bit run its float32 master copy,
        the weights the step really updates (its 16-bit params are the
        rounded master, written in the same pass)."""
        pl = self._placement
        return {"step": 0, "flat": {}, "runs": [
            {"master": pl.master_copy(run["flat"])} if pl.is_low(run["flat"].dtype) else {}
            for run in self._run_info[gi]["runs"]]}

    # -- construction helpers ---------------------------------------------
    @staticmethod
    def _group_specs(params):
        params = V.listed(params)
        if isinstance(params, np.ndarray) or _is_device_array(params):
            return [{"params": [params]}]
        if is_tree(params):        # arrays by name (one group): a dict, a list of layers
            return [{"params": params}]
        if _name_pairs(params):                # torch's named_parameters(): by name
            named = dict(params)
            if len(named) != len(params):
                dup = next(n for n, k in Counter(n for n, _ in params).items() if k > 1)
                raise ValueError(f"params holds (name, array) pairs, and the name {dup!r} "
                                 "comes more than once: each array needs its own name")
            return [{"params": named}]
        if type(params).__name__ == "DeviceFlatArrays":   # its views, one group
            return [{"params": params}]
        if isinstance(params, (list, tuple)) and params and all(
                isinstance(p, dict) for p in params):
            for gi, spec in enumerate(params):
                if "params" not in spec:
                    raise ValueError(f"param group {gi} has no 'params' key")
            return list(params)
        if isinstance(params, (list, tuple)):
            if not params:
                raise ValueError("params is empty: nothing to optimize")
            groups = [i for i, p in enumerate(params) if isinstance(p, dict) and "params" in p]
            if groups:      # read as arrays, the first dict was named as a bad array
                k = next(i for i, p in enumerate(params) if not isinstance(p, dict))
                raise TypeError(f"params[{groups[0]}] is a param-group dict but params[{k}] is "
                                f"not one ({type(params[k]).__name__}): in a list of groups "
                                "every item is a group, e.g. {'params': [w]} for one array")
            return [{"params": params}]
        raise TypeError("params must be an ndarray, a list (or any iterable) of ndarrays, a "
                        "dict of name -> ndarray or a list of param-group dicts, got "
                        f"{type(params).__name__}{V.object_hint(params)}")

    def _check_one_dtype(self, gi, arrays):
        """A group keeps its state in one buffer per name, so its params
        share one compute dtype (float32 and its 16-bit forms, or float64)."""
        dtypes = {str(np.dtype(self._placement.compute_dtype(a.dtype))) for a in arrays}
        if len(dtypes) > 1:
            given = sorted({str(a.dtype) for a in arrays})    # float16, not its float32
            computed = ("" if set(given) == dtypes
                        else f" (computed in {' and '.join(sorted(dtypes))})")
            # which arrays: those of the dtype fewer of them have (a float64
            # weight among float32 ones, made without .astype)
            kinds = [str(np.dtype(self._placement.compute_dtype(a.dtype))) for a in arrays]
            odd = min(dtypes, key=lambda d: (kinds.count(d), d != "float64"))
            where = [k for k, d in enumerate(kinds) if d == odd]
            more = f" (and {len(where) - 1} more)" if len(where) > 1 else ""
            raise ValueError(f"param group {gi} mixes {', '.join(given[:-1])} and {given[-1]} "
                             f"params{computed}: its params[{where[0]}]{more} is "
                             f"{arrays[where[0]].dtype}; "
                             "a group's state is one buffer per name, so make them one dtype "
                             + ("(.astype): " + self._one_group if self._one_group else
                                "(.astype), or put arrays of each dtype in a param group of "
                                "their own"))

    def _build_runs(self):
        """Split each group into runs and precompute per-tensor views."""
        self._run_info = []
        first = 0   # index of the group's first tensor among all params
        for gi, group in enumerate(self.param_groups):
            runs = []
            found = self._placement.runs(group["params"], self._packed.get(gi))
            for start, stop, flat in found:
                sizes = [a.size for a in group["params"][start:stop]]
                local = np.concatenate([[0], np.cumsum(sizes)]).tolist()
                runs.append({"start": first + start, "stop": first + stop, "flat": flat,
                             "local": local})
            self._run_info.append({"runs": runs})
            first += len(group["params"])
        sizes = [a.size for a in self._params]
        self._elem_offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int).tolist()
        self._wheres = [f"param_groups[{gi}]" for gi in range(len(self.param_groups))]

    # -- gradients ------------------------------------------------------------
    def check_grads(self, grads) -> None:
        """Check ``grads`` against the params as :meth:`step` does, writing
        nothing: for wrappers (fastopt.distributed) that reduce gradients
        before stepping. A FlatArrays is checked once, then cached by identity."""
        self._checked_grads(grads)

    def _checked_grads(self, grads):
        """:meth:`check_grads`, returning what it checked: a FlatArrays as
        given, anything else as the list of arrays read (a Python number
        for a 0-d param as an array of its dtype, a strided one copied)."""
        if isinstance(grads, FlatArrays):
            if grads is not self._cached[0]:
                self._cached = (grads, self._flat_segments(grads))
            return grads
        listed = self._readable_grads(self._grads_as_list(grads))
        self._check_grad_list(listed, by_position=self._by_position(grads))
        return listed

    def _readable_grads(self, grads):
        """``V.readable(grads)``, each gradient it copied checked as itself
        against what the step writes: a strided view of a param given as a
        gradient (``W.T``) is refused as ``W`` is, though its copy would
        be safe to read (the same mistake)."""
        readable = V.readable(grads, like=self._params)
        if readable is grads:
            return grads
        copied = V.copied(grads, readable)
        if copied:
            labels = (self._names.labels if self._names is not None
                      else [f"[{i}]" for i in range(len(self._params))])
            V.check_views_disjoint(self._written_arrays(labels),
                                   [(f"grads{labels[i]}", grads[i]) for i in copied
                                    if i < len(labels)])
        return readable

    def _written_arrays(self, labels) -> list:
        """``(label, array)`` of everything a step writes: the params and
        every state buffer."""
        written = [(f"params{lab}", a) for lab, a in zip(labels, self._params)]
        return written + [(f"optimizer state {n!r} of group {gi}", b)
                          for gi, st in enumerate(self.state)
                          for n, b in st.get("flat", {}).items()]

    def _check_grad_list(self, grads, by_position=False) -> list:
        """The full checks of a list of gradients (each array's dtype, shape,
        contiguity, and no overlap with anything the step writes), naming
        the array by index or key (``by_position``: the user gave a list,
        so a gradient is named by its index beside its param's key); the
        checked list."""
        labels = self._names.labels if self._names is not None else None
        if not isinstance(grads, (list, tuple)):
            grads = V.as_array_list("grads", grads, by_name=labels is not None)
        self._check_arrays_as_given(writes=True)   # (a compiled reader refused, or none)
        at = [f"[{i}]" for i in range(len(grads))]
        given = at if by_position or labels is None else labels
        try:
            V.check_like("grads", list(grads), "params", self._params, writable=False,
                         allow_low_precision=True, labels=given, ref_labels=labels)
        except ValueError as exc:
            if by_position and labels is not None and " has shape " in str(exc):
                # (jax.tree_util.tree_leaves sorts a dict's keys: another order)
                names = self._names.names
                shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
                exc.args = (f"{exc.args[0]}; a list of gradients is read in the params' "
                            f"own order ({shown}): give a dict by name instead",)
            raise
        V.check_disjoint(self._written_arrays(labels or at),
                         [(f"grads{lab}", g) for lab, g in zip(given, grads)])
        return grads

    def _per_array_segments(self, param_flat, grad_flats):
        """Per group, ``(run_index, p, g, lo, hi)`` for grads given array by
        array: ``param_flat(k, run)`` is param k as a 1-D array, ``lo:hi`` its
        slice of the run's state buffers."""
        segments = []
        for info in self._run_info:
            segs = []
            for ri, run in enumerate(info["runs"]):
                local = run["local"]
                for k in range(run["start"], run["stop"]):
                    j = k - run["start"]
                    segs.append((ri, param_flat(k, run), grad_flats[k], local[j],
                                 local[j + 1]))
            segments.append(segs)
        return segments

    def _flat_segments(self, grads: FlatArrays):
        if not self._memory_ordered:
            raise ValueError(
                "grads is a FlatArrays, but the param groups list views of one buffer "
                "out of memory order, so its layout is ambiguous; pass grads as a list "
                "in param-group order, or pack each group separately")
        layout = tuple((s, grads.dtype) for s in grads.shapes)
        if layout != self._layout:
            if len(grads) != len(self._params):
                raise ValueError(f"grads has {V.count(len(grads), 'array')} but params has "
                                 f"{len(self._params)}")
            V.check_like("grads", list(grads), "params", self._params, writable=False,
                         allow_low_precision=True)
        data = grads.data
        V.check_disjoint([(f"params[{i}]", a) for i, a in enumerate(self._params)],
                         [("grads", data)])
        return self._run_segments(data)

    def _run_segments(self, data):
        """Segments for grads given as one flat buffer laid out like the
        params (host or device): one per run, its slice of ``data``."""
        off = self._elem_offsets
        return [[(ri, run["flat"], data[off[run["start"]]:off[run["stop"]]], 0,
                  run["flat"].size) for ri, run in enumerate(info["runs"])]
                for info in self._run_info]

    # -- the step ---------------------------------------------------------------
    def step(self, grads=V.NOT_GIVEN, params=None):
        """Update every parameter in place from ``grads``.

        ``grads`` is a list of arrays matching the params one to one (new
        arrays every step are fine: one compiled call per group reads them),
        a dict with the params' keys when they were given by name, or a
        :class:`~fastopt.params.FlatArrays` with the params' layout. ``params``
        binds an optimizer made without params (see :meth:`bind`); after
        that it must be the same params. Returns the pre-clip global
        gradient norm when it was computed (``max_grad_norm`` set,
        ``skip_nonfinite`` or a ``loss_scaler``; unscaled), else None; it is
        also ``self.grad_norm``, and the lr each group used is
        ``self.last_lr``.

        A param group whose every gradient is None (a frozen layer: ``None``
        for each of its arrays, or for a whole layer in a dict of layers) is
        left as it is this step, its state and step count included, as
        torch skips a param whose grad is None.

        With ``skip_nonfinite`` or a ``loss_scaler``, a NaN or inf anywhere
        in ``grads`` skips the step: params and state are left untouched (the
        step counts used for bias correction do not advance),
        ``self.skipped_steps`` counts it, the loss scale backs off, and
        schedules still advance (``self.iterations``), as in a torch loop
        that calls ``scheduler.step()`` every iteration.
        """
        if grads is _NOT_GIVEN:
            V.refuse_no_grads(type(self).__name__, "step")
        # One optimizer stepped from two threads: the steps run one after the
        # other (each sees the other's whole update), as if called in turn.
        with self._lock:
            if self.iterations >= self._held_check_at:
                self._check_held()
            # _check_given(), inline: every step's fixed cost (params given
            # anew are compared by identity below, and watched from then on)
            watch = self._watch
            if watch is not None and (params is None or params is self._given) and \
                    not watch.holds(self._params, self._names):
                watch.refuse(self._params, self._names)
            plan = self._plan       # the last step's plan: the fast path (step_plan.py)
            if plan is not None and (params is None or params is self._given):
                kind, given = type(grads), None
                if kind is list and not self._seq_root:
                    out = plan.run(self, given := grads)
                elif kind is tuple and not self._seq_root:   # `return dW, db`: as a list
                    out = plan.run(self, given := list(grads))
                elif kind is np.ndarray:     # one array's gradient: as a list of one
                    out = plan.run(self, given := [grads])
                elif (kind is dict and self._names is not None
                      or self._seq_root and (kind is list or isinstance(grads, tuple))):
                    try:
                        given = self._names.read(grads)
                    except (TypeError, ValueError):
                        out = STALE         # (the full path names what is wrong)
                    else:
                        out = plan.run(self, given)
                elif grads is self._bound and grads is not None:   # the FlatArrays bound last step
                    out = plan.run(self, grads, bound=True)
                elif isinstance(grads, V.GRADS_ONE_PASS):   # a generator, g.values(): read once
                    grads = self._one_pass(grads)
                    given = self._names.read(grads) if type(grads) is dict else grads
                    out = plan.run(self, given)
                else:
                    out = STALE
                if out is STALE and given is not None:
                    # a strided or Fortran-ordered gradient, which the compiled
                    # reader refuses: its C-ordered copy takes the fast path
                    # (the full path would make the plan again every step)
                    readable = self._readable_grads(given)
                    if readable is not given:
                        out = plan.run(self, readable, again=True)
                if out is not STALE:
                    return out
            grads = self._one_pass(grads)
            if params is not None and params is not self._given:
                self._bind_or_check(params, grads)
            self._refuse_unbound("pass step(grads, params=...) or call bind(params) first")
            # (the params as given: checked with the grads, _bind_grads)
            self._check_groups_unchanged(arrays=False)
            try:
                return self._placement.step(self, grads)
            except (TypeError, ValueError) as exc:
                del plan        # (the plan the full step dropped: it holds the groups)
                self._name_replaced(exc)
                raise

    def _one_pass(self, arrays):
        """A generator or ``d.values()`` of arrays, as a step reads it: a
        list, in the order given; ``d.values()`` of params given by name:
        its dict, read by name (the dict's own order may not be theirs).
        Anything else as given."""
        if not isinstance(arrays, V.GRADS_ONE_PASS):
            return arrays
        mapping = getattr(arrays, "mapping", None)      # (a read-only view of the dict)
        if self._names is not None and mapping is not None:
            return dict(mapping)
        return list(arrays)

    def _name_replaced(self, exc) -> None:
        """A refused step's message, for a gradient made for the array the
        user's code put in a param's place (a new dtype or shape: "grads[0]
        has shape ... but params[0] ..."): which param nothing outside
        holds any more (orphans.py). The failed calls' frames let go of
        what they held first (their references would count as someone's),
        so their locals are gone from the traceback of that refusal only."""
        if not self._held or len(exc.args) != 1 or not isinstance(exc.args[0], str) \
                or " but params" not in exc.args[0]:
            return
        traceback.clear_frames(exc.__traceback__.tb_next)
        hint = replaced_hint(self)
        if hint:
            exc.args = (exc.args[0] + hint,)

    def __getstate__(self):
        # Tables hold raw addresses of this optimizer's arrays: a copy (deepcopy,
        # pickle) rebuilds its own from its own arrays at its first step.
        state = self.__dict__.copy()
        state.pop("_lock", None)
        state.pop("_all_tables", None)     # made again with _tables
        state.update(_tables=None, _bound=None, _bound_list=None, _placement=None, _plan=None,
                     _written_bufs=None, _cached=(None, None),    # (grads' views, not a copy's)
                     _stand_ins=None)
        # A scheduled group's lr is the very float the schedule last wrote
        # (_with_schedule tells the user's own number by identity); pickle
        # makes two floats of one, so which groups still show it goes along
        state["_lr_linked"] = [gi for gi, v in self._lr_shown.items()
                               if gi < len(self.param_groups)
                               and self.param_groups[gi]["lr"] is v]
        if state.get("_backend") is not None:      # a module: kept by name
            state["_backend"] = state["_backend"].name
        state["_view_links"] = self._views_of_given_flat()
        return state

    def __setstate__(self, state):
        linked = state.pop("_lr_linked", ())
        self.__dict__.update(state)
        self._copied = True
        self._held_check_at = self.iterations     # its first step checks
        self._held = self._held_counts = None
        for gi, group in enumerate(self.param_groups):    # pickled before ParamList
            if type(group["params"]) is list and self._group_lists[gi] is group["params"]:
                group["params"] = self._group_lists[gi] = ParamList(group["params"])
        for gi in linked:
            self._lr_shown[gi] = self.param_groups[gi]["lr"]
        self._relink_views(state.get("_view_links", ()))
        self.__dict__.pop("_view_links", None)
        if isinstance(self._backend, str):
            self._backend = get_backend(self._backend)
        if self.param_groups:
            self._placement = placement_for(self._backend)
            if not self._placement.device:
                self._runs_over_own_params()
            self._rebuild_run_views()
        self._lock = threading.RLock()
        forks.register(self)

    def _views_of_given_flat(self):
        """``(param index, FlatArrays, view index)`` for each param that is a
        view of a host FlatArrays it was given as (the whole params, or a
        group's). A copy (pickle, deepcopy) of a FlatArrays makes its views
        anew from its copied buffer, and copies the optimizer's references
        to the old views as arrays of their own: the copy's optimizer must
        step the copied FlatArrays' views (:meth:`_relink_views`), or the
        copied params would never change."""
        where = {id(a): pi for pi, a in enumerate(self.__dict__.get("_params", ()))}
        return [(where[id(view)], flat, vi) for flat in self._flat_given.values()
                for vi, view in enumerate(flat) if id(view) in where]

    def _relink_views(self, links):
        """A copy's params made the copied FlatArrays' views again, in every
        list that holds them (see :meth:`_views_of_given_flat`)."""
        if not links:
            return
        group_of = [(gi, j) for gi, g in enumerate(self.param_groups)
                    for j in range(len(g["params"]))]
        for pi, flat, vi in links:
            gi, j = group_of[pi]
            self._params[pi] = flat[vi]
            list.__setitem__(self.param_groups[gi]["params"], j, flat[vi])   # not an edit

    def _runs_over_own_params(self):
        """A copy's runs made again over its own params: each run's flat
        view had become an array of its own (so sync_master read stale
        values), and views of one buffer may no longer lie end to end. The
        16-bit params' master copies are cut again to the new runs (a run
        is one buffer, of one dtype; a group may mix float32 and 16-bit
        runs). New state entries, the copy's own."""
        old_info = self._run_info
        self._build_runs()
        self.state = GroupStates(dict(st) for st in self.state)
        for gi, st in enumerate(self.state):
            old = st["runs"]
            masters = {}            # param index -> its part of its old run's master
            for run, bufs in zip(old_info[gi]["runs"], old):
                if "master" in bufs:
                    cuts = run["local"]
                    for j, k in enumerate(range(run["start"], run["stop"])):
                        masters[k] = bufs["master"][cuts[j]:cuts[j + 1]]
            # the state buffers' views of each run: made by _rebuild_run_views
            names = set().union(*old) - {"master"} if old else set()
            runs = []
            for run in self._run_info[gi]["runs"]:
                bufs = dict.fromkeys(names)
                if run["start"] in masters:
                    bufs["master"] = np.concatenate(
                        [masters[k] for k in range(run["start"], run["stop"])])
                runs.append(bufs)
            st["runs"] = runs

    def _rebuild_run_views(self):
        """A copy (deepcopy, pickle) holds each state buffer and its runs'
        views of it as separate arrays: the step writes the buffer and
        ``state_dict`` reads the views, so the views are made views of the
        copied buffer again. (A one-run group's view is the buffer itself,
        and compact codes have no views.)"""
        for info, st in zip(self._run_info, self.state):
            runs = st["runs"]
            sizes = [r["flat"].size for r in info["runs"]]
            for name, buf in st["flat"].items():
                if runs and all(name in r for r in runs):
                    for r, view in zip(runs, self._placement.run_views(buf, sizes)):
                        r[name] = view

    def _check_given(self):
        """The list or dict the params came in still holds them (given.py):
        else ValueError naming the entry, before anything is written."""
        watch = self._watch
        if watch is not None and not watch.holds(self._params, self._names):
            watch.refuse(self._params, self._names)

    def _check_groups_unchanged(self, arrays=True, writes=True):
        """Params added to, removed from or replaced in a group's list after
        construction would be silently ignored by the step (it went on
        updating the old arrays) and break its checkpoint: refused, naming
        what changed and add_param_group. ``arrays``: and each param still
        as given (:meth:`_check_arrays_as_given`; a step's gradient reading
        checks that itself), and writable where the caller ``writes`` them."""
        groups, lists = self.param_groups, self._group_lists
        if len(groups) != len(lists):
            self._refuse_group_count(groups, lists)
        first = 0
        for gi, (group, lst, n) in enumerate(zip(self.param_groups, self._group_lists,
                                                 self._group_sizes)):
            params = group["params"]
            what, counts = None, f" ({V.count(n, 'array')} then, {len(params)} now)"
            if params is not lst:
                what = " was replaced by another list"
            elif len(params) != n:
                what = " changed"
            elif params.edited:
                given = self._params[first:first + n]
                k = next((k for k, (a, b) in enumerate(zip(params, given)) if a is not b),
                         None)
                if k is not None:
                    what, counts = f"[{k}] was replaced", ""
                else:
                    params.edited = False      # the same arrays again
            if what is not None:
                raise ValueError(
                    f"param_groups[{gi}]['params']{what} after the optimizer was made"
                    f"{counts}; an optimizer steps the arrays it was given and holds their "
                    "state: copy new values into them in place (p[...] = new), add new "
                    "arrays with add_param_group(), or make a new optimizer")
            first += n
        if arrays:
            self._check_arrays_as_given(writes)

    def _check_arrays_as_given(self, writes):
        """A param's dtype or size changed in place (``a.dtype = ...``,
        ``a.resize(..., refcheck=False)``) or its strides (``a.strides = ...``):
        the steps address its memory as it was given, and the state is
        sized for it. Refused, naming it; so is a param made read-only
        since (``a.flags.writeable = False``, to freeze it) where the caller
        ``writes`` the params. Part of every full step's
        gradient reading (the compiled readers check it per param as they
        read a list, FlatArrays grads here) and of state_dict's, L-BFGS's
        and SAM's checks: each table's params checked in compiled code
        where the backend can (a call per table: 4.6 us for 1000 params),
        else each host array's attributes read here, about 0.2 us each."""
        if self._placement.device:
            return
        check = getattr(self._backend, "params_as_given", None)
        if check is not None and self._tables is not None and all(
                check(t) for t in self._all_tables):     # (writable too)
            return
        self._check_arrays_as_constructed(writes)

    def _check_arrays_as_constructed(self, writes):
        """:meth:`_check_arrays_as_given`'s attribute reads, against the
        layout recorded when the params were given: also before the tables
        exist (they record the params as they are when built, so a change
        before the first step went unseen: a step counted with nothing
        updated, or an internal error). ``writes``: refuse read-only params
        too (False for state_dict, which only reads them)."""
        label = self._param_label
        for k, (a, (shape, dtype)) in enumerate(zip(self._params, self._layout)):
            if not isinstance(a, np.ndarray):
                continue
            if a.dtype != dtype or a.size != math.prod(shape) or not a.flags.c_contiguous:
                now = ("a strided view" if not a.flags.c_contiguous
                       else f"{a.dtype}{list(a.shape)}")
                raise ValueError(
                    f"{label(k)} was given as {np.dtype(dtype)}{list(shape)} and is now "
                    f"{now}: its dtype, size or strides were changed in place, while the "
                    "optimizer steps its memory as it was given; make a new optimizer for "
                    "the array as it is now")
            if writes and not a.flags.writeable:
                # the compiled steps wrote it all the same: a param "frozen"
                # this way went on being trained
                raise ValueError(
                    f"{label(k)} is read-only now (frozen with a.flags.writeable = False, "
                    "or a joblib worker's read-only memory map of it), and the step writes "
                    "it; to freeze a param, give it a group of its own with lr 0 "
                    "(opt.param_groups[i]['lr'] = 0.0), or make the optimizer without it")

    def _refuse_group_count(self, groups, lists):
        """A group appended to or removed from ``param_groups`` itself: the
        step would go on over the groups it holds state for. Refused,
        naming the group."""
        now = [g.get("params") if isinstance(g, dict) else None for g in groups]
        k = next((k for k, lst in enumerate(lists) if k >= len(now) or now[k] is not lst),
                 len(lists))
        counts = f"({V.count(len(lists), 'group')} then, {len(groups)} now)"
        if len(groups) > len(lists):
            raise ValueError(
                f"param_groups[{k}] was put in param_groups after the optimizer was made "
                f"{counts}; the optimizer has no state for it: remove it and pass it to "
                "add_param_group(), which checks it and adds it")
        raise ValueError(
            f"param_groups[{k}] was removed from param_groups after the optimizer was made "
            f"{counts}; the optimizer still holds its state and steps it: put it back, and "
            "set its 'lr' to 0 to stop training it, or make a new optimizer over the "
            "params you keep")

    def zero_grad(self, grads=V.NOT_GIVEN) -> None:
        """Zero ``grads`` in place, for loops that accumulate into one set of
        gradient arrays: a FlatArrays (one fill of its buffer), a list or a
        dict of arrays shaped like the params."""
        if grads is _NOT_GIVEN:
            V.refuse_no_grads(type(self).__name__, "zero_grad")
        self._refuse_unbound("zero_grad checks the grads against them; bind(params) first")
        if isinstance(grads, FlatArrays):
            # count and size: O(1), and zeroing does not depend on the layout
            # (a check of every shape cost more than the fill on 1000 arrays)
            if len(grads.shapes) != len(self._params) or \
                    grads.data.size != self._elem_offsets[-1]:
                raise ValueError(f"grads is a FlatArrays of {len(grads.shapes)} arrays, "
                                 f"{grads.data.size} elements: not like the params "
                                 f"({len(self._params)} arrays, {self._elem_offsets[-1]})")
            grads.data.fill(0)
            return
        arrays = self._grads_as_list(grads, "zero_grad()")
        labels = self._names.labels if self._names is not None else None
        for i, g in enumerate(arrays if type(arrays) in (list, tuple) else ()):
            if isinstance(g, np.generic):
                raise TypeError(f"grads{labels[i] if labels else f'[{i}]'} is a NumPy scalar "
                                f"({type(g).__name__}), which cannot be zeroed in place: "
                                "accumulate into a 0-d array (np.zeros(()))")
        # a strided or Fortran-ordered buffer is zeroed where it is, as the
        # step reads it: checked as a C-ordered stand-in of its shape, dtype
        # and writability
        V.check_like("grads", [_stand_in(g) for g in arrays] if type(arrays) in (list, tuple)
                     else arrays, "params", self._params, writable=True,
                     allow_low_precision=True, labels=labels)
        self._refuse_zeroing_params(arrays, labels)
        for g in arrays:
            g.fill(0)

    def _refuse_zeroing_params(self, arrays, labels):
        """zero_grad given the params themselves (torch's ``zero_grad()``
        ported as ``opt.zero_grad(params)``) zeroed the model's weights."""
        def named(side, items):
            return [(f"{side}{labels[i] if labels else f'[{i}]'}", a)
                    for i, a in enumerate(items)]
        grads, params = named("grads", arrays), named("params", self._params)
        if V._distinct_owners(grads, params):
            return
        try:
            # the params as the written side: gradients overlapping each
            # other (columns of one accumulation matrix, one array twice)
            # are zeroed as they are
            V.check_disjoint(params, grads, bounds=V.byte_bounds, writer="zero_grad")
        except ValueError:
            pair = next(((g, p) for g, a in grads for p, b in params
                         if np.shares_memory(a, b)), None)
            if pair is None:        # (extents that meet, no element shared)
                return
            raise ValueError(
                f"{pair[0]} is {pair[1]} (or shares its memory): zero_grad zeroes gradient "
                "arrays you accumulate into, and given the params it would zero the "
                "model's weights. torch's opt.zero_grad() zeroes each param's .grad: here, "
                "give those gradient arrays, or nothing where each step makes new ones"
            ) from None

    def _checked_group(self, gi, spec, names, whole=False):
        """Group ``gi`` from its spec, checked: ``(group, names, packed)``,
        ``names`` the KeyTree of every group so far when they are given by
        name, ``packed`` the one buffer the params came as (device) or None.
        ``whole``: the params were given whole, not as groups (an array is
        then named ``params[0]``, as a step names it)."""
        group = {**self.defaults, **{k: v for k, v in spec.items() if k != "params"}}
        unknown = set(group) - set(self.defaults)
        if unknown:
            whole = sorted(unknown & {"state_dtype", "state_seed", "max_grad_norm",
                                      "skip_nonfinite", "loss_scaler", "backend"})
            raise ValueError(f"param group {gi} has unknown keys {sorted(unknown)}"
                             + (f" ({', '.join(whole)}: set once for the whole optimizer, "
                                "as its keyword arguments)" if whole else
                                f"; this {type(self).__name__} has {sorted(self.defaults)} "
                                "(torch keeps other keys, such as a group's name; fastopt "
                                "refuses them, so that a misspelt hyperparameter is not "
                                "kept unused: keep labels beside the optimizer)"))
        group = self._validated(group, where=f"param_groups[{gi}]")
        where = f"param_groups[{gi}]['params']"
        given, labels = spec["params"], None
        if (names is not None and type(names.tree) is Seq and names.tree.part
                and type(given) in (list, tuple) and not is_tree(given)):
            # a plain list of arrays after group_params' parts of a list
            # (add_param_group, or a group written beside them): its arrays
            # follow the list's items, their gradients after theirs in
            # step's list (as a plain list's added group's follow)
            start = names.tree.size or max(names.tree) + 1
            given = ListPart(zip(range(start, start + len(given)), given))
            given.size = start + len(given)
        if is_tree(given):
            tree, given = KeyTree.of(given, "params" if whole else where)
            labels = tree.labels        # errors name an array by its keys
            if gi and names is None:
                raise ValueError(f"{where} is a dict but the groups before it are "
                                 "not: give every group's params by name, or none")
            names = tree if names is None else names.merge(tree, where)
        elif names is not None:
            raise ValueError(f"{where} is not a dict but the groups before it are: "
                             "give every group's params by name, or none")
        # (named as the steps name them: params['fc']['W'], or params[0]
        # for a list given whole; a list in a group by its group)
        shown = "params" if whole or labels is not None else where
        arrays, packed = self._placement.group_arrays(shown, given, labels)
        if not arrays:
            raise ValueError(f"param group {gi} has no parameters")
        group["params"] = ParamList(arrays)
        return group, names, packed

    def _checked_params(self, groups, names) -> list:
        """Every group's arrays, checked together (no two overlap; one dtype
        per group); the flat list of them."""
        all_params = [a for g in groups for a in g["params"]]
        if names is not None:
            labels = [f"params{lab}" for lab in names.labels]
        elif len(groups) == 1:
            labels = [f"params[{i}]" for i in range(len(all_params))]
        else:       # a flat index across groups named no group the user wrote
            labels = [f"param_groups[{gi}]['params'][{i}]"
                      for gi, g in enumerate(groups) for i in range(len(g["params"]))]
        self._placement.check_params(list(zip(labels, all_params)))
        self._state_format.check_params(self._placement.device, zip(labels, all_params))
        for gi, group in enumerate(groups):
            self._check_one_dtype(gi, group["params"])
        return all_params

    def add_param_group(self, param_group: dict) -> None:
        """Add a group of params to step from now on (torch's name and
        semantics): ``{"params": ..., <hyperparameters>}``, the missing ones
        from the defaults. Checked in full first; the groups already there
        keep their state."""
        with self._lock:
            if not isinstance(param_group, dict) or "params" not in param_group:
                raise TypeError("param_group must be a dict with a 'params' key")
            param_group = {**param_group, "params": V.listed(param_group["params"])}
            if not self.param_groups:           # made without params: the first group
                self.bind([param_group])
                return
            # (the groups' arrays are read again below: one replaced since
            # would pass for one given, and be stepped with another's state)
            self._check_groups_unchanged(writes=False)
            gi = len(self.param_groups)
            group, names, packed = self._checked_group(gi, param_group, self._names)
            all_params = self._checked_params(self.param_groups + [group], names)
            groups = self.param_groups[:] + [group]
            # each run of keep() starts from the lrs as they were (_show_lr
            # writes a schedule's value over it, which would read as the
            # user's own number the second time)
            shown = self._lr_snapshot(groups)

            def keep():     # -- checked: keep it (whole through a Ctrl-C: run again) --
                self._lr_restore(shown, groups)
                self._params = all_params
                if len(self.param_groups) == gi:
                    self.param_groups.append(group)
                self._packed[gi] = packed
                self._flat_given = {**self._flat_given, **_flat_of(gi, param_group)}
                self._names = names
                self._seq_root = names is not None and names.seq_root
                self._layout = tuple((a.shape, a.dtype) for a in self._params)
                self._memory_ordered = self._placement.memory_ordered(self._params)
                self._build_runs()          # the earlier groups' runs come out as before
                if len(self.state) == gi:
                    self.state.append(self._fresh_state(gi))
                if len(self._group_lists) == gi:
                    self._group_lists.append(group["params"])
                if len(self._group_sizes) == gi:
                    self._group_sizes.append(len(group["params"]))
                self._tables, self._bound, self._cached = None, None, (None, None)
                self._given = None      # (the watch goes on over the arrays it was given)
                self._show_lr()
            finished(keep)

    def _lr_snapshot(self, groups):
        """The schedules, the values shown and ``groups``' lrs, for :meth:`_lr_restore`."""
        return dict(self._schedules), dict(self._lr_shown), [g["lr"] for g in groups]

    def _lr_restore(self, snapshot, groups):
        """The schedules, shown values and ``groups``' lrs put back as
        :meth:`_lr_snapshot` took them (work run again after a Ctrl-C)."""
        schedules, shown, lrs = snapshot
        self._schedules.clear()
        self._schedules.update(schedules)
        self._lr_shown.clear()
        self._lr_shown.update(shown)
        for group, lr in zip(groups, lrs):
            group["lr"] = lr

    def _by_name(self, params):
        """``params``, a dict of the names the optimizer was made with, read
        in its param order (a dict built again in another key order is the
        same params; the list group_params split, read by place); else None."""
        if self._names is None or not (is_tree(params) or self._names.seq_root and type(
                params) in (list, tuple)):
            return None
        try:
            return self._names.read(params, "params")
        except (KeyError, TypeError, ValueError):
            return None

    def _bind_or_check(self, params, grads):
        """``step(params=...)``: bind the first time, then insist on the same arrays."""
        if callable(params):            # opt.step(grads, closure): torch's habit
            raise TypeError(f"{type(self).__name__}.step's second argument is params (for an "
                            "optimizer made without them), not a closure: compute the "
                            "gradients, then step(grads); fastopt.LBFGS.step takes a closure")
        if not self.param_groups:
            self.bind(params)
            return
        if self._same_params(_spec_arrays(self._group_specs(params))):
            self._given = params
            # later steps with this object skip the comparison above: watch it
            self._watch = GivenParams.of(params, self._params, self._names)
            return
        if self._same_params(self._by_name(params)):
            # a dict of the same arrays built again in another key order:
            # grads by name are read by name (checked so at each step: not
            # kept as the params given); a list would follow the new order
            if isinstance(grads, dict) or self._names.seq_root:
                return
            raise ValueError(
                f"params hold this {type(self).__name__}'s arrays by name, in another key "
                "order than it was given, and grads is a list (in which order?): pass the "
                "grads by name too (a dict), or the params in their first order")
        raise ValueError(f"params are not the arrays this {type(self).__name__} "
                         f"updates{self._first_other(params)}: it steps its params in place, "
                         "so pass the same arrays every step (or make a new optimizer)"
                         + self._copy_hint())

    def _param_label(self, k) -> str:
        """How messages name param ``k``: ``params[3]``, or ``params['l1']['W']``
        for params given by name."""
        return f"params{self._names.labels[k] if self._names is not None else f'[{k}]'}"

    def _first_other(self, params) -> str:
        """Which of ``params`` is another array than this optimizer's (for
        the refusal), or "" where that cannot be told."""
        try:
            arrays = _spec_arrays(self._group_specs(params))
        except (TypeError, ValueError):
            return ""
        if arrays is None or len(arrays) != len(self._params):
            n = 0 if arrays is None else len(arrays)
            return f" ({V.count(n, 'array')} given, {len(self._params)} updated)" if n else ""
        for k, (a, b) in enumerate(zip(arrays, self._params)):
            if a is not b:
                how = "the same memory, a new view" if np.may_share_memory(a, b) else "replaced"
                return f" ({self._param_label(k)} is a new array: {how})"
        return ""

    #: set on a copy (pickle, deepcopy): its params are copies too
    _copied = False
    #: the step count at which the next step checks who holds its params
    #: (orphans.py: FIRST_CHECK or a copy's first step, then doubling, then
    #: every CHECK_EVERY)
    _held_check_at = FIRST_CHECK
    #: the indices of the params something outside held at the last check
    #: (None: not checked yet, or a copy)
    _held = None
    #: the params' reference counts at the last check (None: the next one
    #: checks in full)
    _held_counts = None

    def _check_held(self, owner=None):
        """Warn (once) if some params are no one's (orphans.py; ``owner``:
        the wrapper stepping this optimizer, SAM)."""
        it = self.iterations
        params = getattr(self, "_params", None)
        if it < self._held_check_at or params is None:    # (not bound yet: after it)
            return
        self._held_check_at = it + max(1, min(it, CHECK_EVERY))
        # the whole check (about 1 ms, 6 for 100 arrays) only where a
        # reference count (a param's, its buffer's, or that of what it was
        # given in) fell since the last one: a replacement always lets go
        # of one, and counting costs about 50 ns each
        counts = reference_counts(self)
        # (no plan yet: the step that makes it adds references of its own,
        # which would hide a replacement's fall from the next count)
        before, self._held_counts = self._held_counts, (
            counts if self._plan is not None else None)
        same = before is not None and len(before) == len(counts)
        if same and all(map(operator.ge, counts, before)):
            return
        if warn_if_unheld(self, owner):
            self._held_check_at = math.inf

    def _copy_hint(self) -> str:
        """For a copy, how to train other arrays with its state."""
        if not self._copied:
            return ""
        name = type(self).__name__
        return (f". This {name} was unpickled or copied, and updates the copies of the "
                "params made with it: to go on with other arrays, make a new "
                f"{name} over them and load_state_dict(this one's state_dict())")

    def _rebinds_same(self, params) -> bool:
        """``params`` are the arrays this optimizer has, in its order (or by
        its names), with no group settings that could differ from its own."""
        try:
            specs = list(self._group_specs(params))
        except (TypeError, ValueError):
            return False
        if len(specs) != len(self.param_groups) or any(set(spec) - {"params"}
                                                       for spec in specs):
            return False
        return (self._same_params(_spec_arrays(specs))
                or self._same_params(self._by_name(params)))

    def _same_params(self, arrays) -> bool:
        return arrays is not None and len(arrays) == len(self._params) and all(
            a is b for a, b in zip(arrays, self._params))

    # -- the host step: one compiled call per group (and gradient dtype) --------
    def _host_step(self, grads):
        # This path is the fixed cost of every step (a 1-element model's
        # whole step): this full path leaves a plan that runs the next step
        # in its place while nothing has changed (step() tries it first).
        self._plan = None
        fresh = self._tables is None
        tables = self._tables or self._host_tables()
        try:
            # (a dict with a frozen layer becomes a list here: its refusals
            # still name its arrays by key)
            by_position = self._by_position(grads)
            grads, frozen = self._frozen_groups(grads)
            self._bind_grads(tables, grads, by_position)   # checks every gradient first
        except BaseException:
            if fresh:      # made over params this step refused (one retyped in place)
                self._tables = None
            raise
        if frozen:
            self._frozen_now = frozen     # (read by _finish_step; this step only)
            try:
                return self._host_step_bound(tables, frozen)
            finally:
                del self._frozen_now
        return self._host_step_bound(tables, frozen)

    def _host_step_bound(self, tables, frozen):
        """The host step over the gradients bound to ``tables``, the groups
        ``frozen`` left as they are."""
        hypers, max_norm, check, inv_scale = self._step_options()
        be = self._backend
        # Everything the step needs is allocated before the first write, so
        # an error (MemoryError included) leaves params and state as they were.
        created = []
        norm_mode = 2 if check else (1 if max_norm is not None else 0)
        compiled = self._compiled
        # One table and the optimizer's own statistics: the norm pass, the
        # skip decision and the update are one native call.
        fused = self._single and self.grad_stats is None and not frozen
        norm, coef, skip = None, 1.0, False
        group_steps = []     # per group (type of its step scalars, buffer names): the plan
        mark = None          # taken just before the first kernel (compiled backends)
        try:
            try:
                plans = []
                fmt = self._state_format
                for gi, h in enumerate(hypers):
                    if gi in frozen:          # no state made, no step scalars
                        plans.append(None)
                        continue
                    s, names = self._group_state(gi, h, created)
                    st = self.state[gi]
                    plans.append((s, [st["flat"][n] for n in names],
                                  fmt.step_args(gi, names, st)))
                    group_steps.append((type(s), names))
                if compiled and len(self._all_tables) > 1:
                    self._refuse_all_written()    # for the steps after this one (its grads
                                                  # were read): buffers it made count too
                if not compiled:
                    # the reference backend writes array by array with NumPy, which
                    # refuses a param made read-only after construction where it
                    # comes: refused here first, so that nothing is written
                    # (the tables go too: their views of it were made read-only
                    # with it, and are made again once it is writable)
                    if not all(p.flags.writeable for p in self._params):
                        self._tables = None
                        self._check_arrays_as_constructed(writes=True)
                if norm_mode and not fused:
                    norm, finite = self._table_stats(
                        be, [t for gi, ts in enumerate(tables) if gi not in frozen for t in ts]
                        if frozen else self._all_tables, compiled, check)
                    skip = check and not finite
                    norm *= inv_scale          # the norm of the unscaled gradients
                    if max_norm is not None:
                        coef = clip_coefficient(norm, max_norm)
                # each table's write, in order: (table, its kernels' element step
                # (the step scalars for the reference backend), buffers, grad
                # scale, compact args); none where a non-finite norm skips the step
                work = [] if skip else [
                    (t, element_of(s, len(bufs)) if compiled else s, bufs, coef * inv_scale, cs)
                    for plan, ts in zip(plans, tables) if plan is not None
                    for s, bufs, cs in (plan,) for t in ts]
                if compiled:
                    mark = Mark(self, [w[0] for w in work])
                if fused:
                    t, el, bufs, _, cs = work[0]
                    norm, skip = self._fused_call(be, t, el, bufs, max_norm, inv_scale,
                                                  norm_mode, cs)
                else:
                    for t, el, bufs, scale, cs in work:
                        if compiled:
                            self._table_update(be, t, el, bufs, scale, cs)
                        else:
                            step_per_array(be, t, el, bufs, scale, cs)
            except BaseException as e:
                if isinstance(e, INTERRUPTS) and self._committed(mark, skip):
                    raise           # a kernel ran: the step is completed below
                # before any kernel ran (they raise nothing): buffers this
                # step made go, and with them any trace of it
                self._forget(created)
                raise
            if skip:
                self._forget(created)     # e.g. SGD's first momentum step stays its first
            out = self._finish_step(skip, norm, hypers)
        except INTERRUPTS:
            if not self._committed(mark, skip):
                raise
            held(self._complete_step, mark, be, work, fused, created, hypers, norm, skip,
                 (max_norm, inv_scale, norm_mode))
            raise
        if compiled and not skip:
            self._plan = StepPlan.make(self, hypers, max_norm, check, group_steps, frozen)
        return out

    @staticmethod
    def _committed(mark, skip) -> bool:
        """Whether an interrupted step is past its point of no return: a
        kernel ran, or the norm pass skipped it (counted, nothing to write)."""
        return mark is not None and (skip or mark.any_called())

    def _complete_step(self, mark, be, work, fused, created, hypers, norm, skip, norm_args):
        """An interrupted step made whole (fastopt.optim.interrupt): the
        tables not yet written written, as the step would have, then the
        counters counted once from the mark (idempotent: :func:`held` runs
        it again after a further Ctrl-C)."""
        if fused:       # one table, its norm pass in its kernel: that call ran
            t, el, bufs, _, cs = work[0]
            if t.outcome[0] - mark.calls[0] > 1:
                # _settle_skip's step ran too: not skipped, by the norm that
                # set its clip (read again: the outcome is that step's)
                norm, skip = self._table_stats(be, [t], True, False)[0] * norm_args[1], False
            elif not norm_args[2]:
                norm, skip = None, False
            else:
                norm, skip = t.outcome[1], bool(t.outcome[2])
                if skip and t.compute == 64:
                    norm, skip = self._settle_skip(be, t, el, bufs, norm, *norm_args, cs)
        else:
            for k, (t, el, bufs, scale, cs) in enumerate(work):
                if not mark.called(k):
                    self._table_update(be, t, el, bufs, scale, cs)
        mark.clear_applied_shifts()
        if skip:
            self._forget(created)
        mark.recount(self, skip, norm, hypers)

    def _refuse_all_written(self):
        """Make every table's grads miss all that any table writes: the
        params (given as the tables are built) and, once they exist, every
        group's state buffers (a grad aliasing another group's exp_avg was
        taken by the compiled readers). Redone only when the buffers change."""
        bufs = [b for st in self.state for b in st["flat"].values()]
        known = self._written_bufs
        if known is not None and len(known) == len(bufs) and all(
                a is b for a, b in zip(known, bufs)):
            return
        self._written_bufs = refuse_each_other(self._all_tables, bufs)

    @staticmethod
    def _table_update(be, t, el, bufs, scale, compact=None, max_norm=0.0, inv_scale=1.0,
                      norm_mode=0):
        """One compiled table's step (gradients times ``scale``; with
        ``norm_mode`` its norm pass and skip decision too), serial or threaded
        as the table's own timings say: the backend's ``(norm, skipped)``."""
        timed = t.nelem > SERIAL_MAX           # smaller tables always run serially
        parallel = timed and t.threads.pick(t.nelem, be.get_num_threads())
        # positional: part of every step's fixed cost
        out = be.step(t, el, bufs, el.grad_scale * scale, max_norm, inv_scale, norm_mode,
                      parallel, compact)
        if timed:
            t.threads.record()
        return out

    def _step_options(self):
        """:meth:`_next_step_options`, the groups' values then written back
        as the numbers the step uses."""
        options = self._next_step_options()
        for g, h in zip(self.param_groups, options[0]):
            _store_numbers(g, h)
        return options

    def _next_step_options(self):
        """``(hypers per group, max_norm, check, inv_scale)`` of the next
        step, every one checked, nothing written: the groups' hyperparameters
        (a schedule's lr evaluated), the clipping norm, whether a non-finite
        gradient skips the step, and one over the loss scale. A wrapper that
        writes before it calls :meth:`step` (SAM's separate restore) calls
        this first: what the step would refuse is refused before that write."""
        wheres = self._wheres
        hypers = [self._resolve(self._with_schedule(gi, g), wheres[gi])
                  for gi, g in enumerate(self.param_groups)]
        max_norm = self.max_grad_norm   # public attributes: re-checked like the groups
        if max_norm is not None:
            max_norm = V.check_real("max_grad_norm", max_norm, low=0.0, low_open=True,
                                    why=_NO_CLIP)
        scaler = self.loss_scaler
        if scaler is not None:          # (a public attribute: checked, as the groups)
            claim_scaler(scaler, self)
        check = V.check_bool("skip_nonfinite", self.skip_nonfinite) or scaler is not None
        inv_scale = 1.0 if scaler is None else 1.0 / scaler.scale
        return hypers, max_norm, check, inv_scale

    @classmethod
    def _plain_finish(cls) -> bool:
        """Whether this optimizer's counting after a step is the base one:
        step counts, iterations and the rest, nothing of its own."""
        return cls._finish_step is Optimizer._finish_step

    def _finish_step(self, skip, norm, hypers):
        """The counters after a step (host or device) ran or was skipped."""
        if skip:
            self.skipped_steps += 1
        elif self._frozen_now:          # groups whose gradients were all None
            for gi, st in enumerate(self.state):
                if gi not in self._frozen_now:
                    st["step"] += 1
        else:
            for st in self.state:
                st["step"] += 1
        if self.loss_scaler is not None and not (
                self._frozen_now and len(self._frozen_now) == len(self.state)):
            # (every group frozen: no gradient was checked, no good step to count)
            self.loss_scaler.update(found_inf=skip)
        self.iterations += 1
        self.grad_norm = norm
        if isinstance(norm, float) and not norm < math.inf and not skip and \
                not self._warned_nonfinite:
            # once: torch's step writes them as silently, and every param
            # was NaN from then on without a word (an RL trial's bad batch)
            self._warned_nonfinite = True
            warn_user(f"the gradients' global norm was {norm}: they held NaN or inf, and "
                      "this step wrote them into the params (as torch's does); "
                      "skip_nonfinite=True skips such steps, leaving params and state as "
                      "they were (said once per optimizer)", RuntimeWarning)
        self.last_lr = list(map(_lr_of, hypers))
        if self._schedules:
            if not skip and not self._warned_ended:
                self._note_ended_schedules()
            self._show_lr()
        return norm

    def _note_ended_schedules(self):
        """Say once when a step ran at a scheduled lr of 0 after the schedule
        had been above it: a schedule past its end (cosine_decay's floor of
        0), which a warm start or partial_fit after a finished run kept
        stepping, the weights never moving, without a word."""
        positive = self.__dict__.setdefault("_scheduled_positive", set())
        groups, shown = self.param_groups, self._lr_shown
        for gi, lr in enumerate(self.last_lr):
            # (a number the user wrote over the schedule, dropping it: its own)
            if gi not in self._schedules or groups[gi].get("lr") is not shown.get(gi):
                continue
            if lr > 0.0:
                positive.add(gi)
            elif lr == 0.0 and gi in positive:
                self._warned_ended = True
                warn_user(f"param_groups[{gi}]'s lr schedule {self._schedules[gi]!r} is at 0 "
                          f"(step {self.iterations - 1}, past its end?): steps at lr 0 leave "
                          "the params as they are; give the group a new schedule (or lr) to "
                          "train on (said once per optimizer)", RuntimeWarning)
                return

    # -- schedules: kept apart, group["lr"] shows the number --------------------
    def lr_schedule(self, group: int = 0):
        """The lr schedule driving param group ``group``, or None when its
        lr is a plain number (``param_groups[group]["lr"]`` shows the value
        the next step uses either way)."""
        self._refuse_unbound("there are no param groups yet; the lr they will take is "
                             "opt.defaults['lr']")
        if not -len(self.param_groups) <= group < len(self.param_groups):
            raise IndexError(f"param group {group} of {len(self.param_groups)}")
        group %= len(self.param_groups)         # -1: the last, as param_groups[-1]
        self._with_schedule(group, self.param_groups[group])   # one assigned since
        return self._schedules.get(group)

    def _with_schedule(self, gi, group):
        """Group ``gi`` with its lr schedule in place of the number it shows.

        A schedule given for lr (or assigned to ``group["lr"]`` later) is kept
        here, and ``group["lr"]`` reads as the value the next step will use,
        as after a torch scheduler's step. A number the user writes over that
        value replaces the schedule."""
        sched = self._take_schedule(gi, group)
        return group if sched is None else dict(group, lr=sched)

    def _take_schedule(self, gi, group):
        """Group ``gi``'s schedule (None when its lr is a number), taking up
        one assigned to ``group["lr"]`` and dropping one a number replaced."""
        lr = group.get("lr", _MISSING)
        if lr is _MISSING:
            return None                   # deleted: _resolve names it
        if callable(lr):
            if self._schedules.get(gi) is not lr and not isinstance(lr, Schedule) and \
                    _first_warning_for(lr):
                warn_user(f"param_groups[{gi}]['lr'] is a plain callable: each step's lr is "
                          "what it returns (absolute, not a factor of a base lr as with "
                          "torch's LambdaLR), and state_dict/fastopt.save cannot save it; a "
                          "fastopt.schedules schedule can be saved")
            self._schedules[gi] = lr
            return lr
        sched = self._schedules.get(gi)
        if sched is not None and lr is not self._lr_shown.get(gi):   # the user wrote a number
            del self._schedules[gi]
            return None
        return sched

    def _show_lr(self):
        """Write each scheduled group's next lr into ``group["lr"]``, and the
        step it is for into ``_lr_shown_at`` (the step plan steps with the
        values shown for that step; None when a schedule failed, so the
        full step evaluates it again and names the failure)."""
        at = self.iterations
        for gi, group in enumerate(self.param_groups):
            sched = self._take_schedule(gi, group)     # a newly assigned one too
            if sched is not None:
                try:
                    value = float(sched(self.iterations))
                except Exception:   # noqa: BLE001 - the next step's, shown ahead: that
                    # step raises it (an IndexError raised here came out of a step
                    # that had been taken, and a retry took it twice)
                    value = group["lr"] if not callable(group["lr"]) else float("nan")
                    at = None
                group["lr"] = value
                self._lr_shown[gi] = value
        self._lr_shown_at = at

    def _fused_call(self, be, t, el, bufs, max_norm, inv_scale, norm_mode, compact):
        """Norm, skip decision and update of the only table in one call (``el``
        the kernels' element step); returns ``(unscaled norm, skipped)``.

        A float64 table's clipped step is called as a skipping one: a norm
        that overflowed with every gradient finite (values past ~1e154)
        would clip them to zero, so the kernel writes nothing then and
        :meth:`_settle_skip` steps by the norm computed again with scaling."""
        mode = 2 if norm_mode == 1 and t.compute == 64 else norm_mode
        norm, skip = self._table_update(be, t, el, bufs, 1.0, compact, max_norm or 0.0,
                                        inv_scale, mode)
        if not norm_mode:
            return None, False
        if skip and t.compute == 64:
            return self._settle_skip(be, t, el, bufs, norm, max_norm, inv_scale, norm_mode,
                                     compact)
        return norm, skip

    def _settle_skip(self, be, t, el, bufs, norm, max_norm, inv_scale, norm_mode, compact):
        """``(norm, skipped)`` of a float64 table whose kernel skipped a
        non-finite norm, nothing written: every gradient finite (squares
        past float64's range), or a clipped step that does not skip
        (``norm_mode`` 1: clipped by the NaN or inf, as the kernel would
        have), is stepped here; else the step is skipped."""
        if norm == math.inf:          # (the kernel's norm is unscaled: times inv_scale)
            norm = settled_norm(norm, self._grad_views(t)) * inv_scale
        if norm_mode == 1 or _all_finite(norm, self._grad_views(t)):
            coef = inv_scale * (1.0 if max_norm is None else clip_coefficient(norm, max_norm))
            be.step(t, el, bufs, el.grad_scale * coef, compact=compact)
            return norm, False
        return norm, True

    def _host_tables(self):
        """Build the groups' tables (again after a load: new master copies)."""
        self._check_arrays_as_constructed(writes=False)     # (the step's reading checks that)
        tables = [self._group_tables(gi) for gi in range(len(self.param_groups))]
        all_tables = [t for ts in tables for t in ts]
        if len(all_tables) > 1:     # a grad must miss every table's params
            refuse_each_other(all_tables)
        compiled = getattr(self._backend, "compiled_tables", False)
        single = compiled and len(all_tables) == 1
        # stored together, with no call in between: a Ctrl-C (raised at a
        # call) cannot leave some of them from another build
        # (_written_bufs None: the state buffers' ranges are given at the next
        # full step; _bound None: new tables hold no grads' addresses, so the
        # FlatArrays the old ones were bound to is bound again, whatever
        # dropped them: a load, sync_master, a refused read-only param)
        (self._tables, self._all_tables, self._compiled, self._single, self._written_bufs,
         self._bound) = (tables, all_tables, compiled, single, None, None)
        return tables

    def _group_tables(self, gi):
        """The compiled step's tables for group ``gi``: weights are the params
        (or the slices of their run's float32 master copy), state offsets the
        params' element offsets in the group."""
        params = self.param_groups[gi]["params"]
        first = self._run_info[gi]["runs"][0]["start"]
        weights, outs = [], []
        for run, bufs in zip(self._run_info[gi]["runs"], self.state[gi]["runs"]):
            master = bufs.get("master")
            for j, k in enumerate(range(run["start"], run["stop"])):
                p = params[k - first].reshape(-1)
                if master is None:
                    weights.append(p)
                    outs.append(None)
                else:
                    weights.append(master[run["local"][j]:run["local"][j + 1]])
                    outs.append(p)
        offsets = self._state_format.offsets([a.size for a in params])
        tables = group_tables(params, weights, outs, offsets)
        for t in tables:
            t.index_global = [first + k for k in t.index]
        return tables

    def _grad_views(self, table):
        """The table's gradients as 1-D arrays (for the NumPy reference and
        for norms computed outside the compiled step)."""
        if table.grads is None:
            table.grads = [self._bound_list[i].reshape(-1) for i in table.index_global]
        return table.grads

    def _bind_grads(self, tables, grads, by_position=None):
        """Point every table at this step's gradients, checked in full before
        anything is written: a FlatArrays with the params' layout (checked
        once, then cached by identity), a dict keyed like the params, or a
        list of arrays (new every step: read at C speed where the backend can)."""
        if isinstance(grads, FlatArrays):
            self._check_arrays_as_given(writes=True)   # no gradient reader looks at the params
            if grads is not self._bound:
                self._flat_segments(grads)     # layout, dtype and aliasing checks
                off = self._elem_offsets
                for ts in tables:
                    for t in ts:
                        t.grads_from_flat(grads.data, [off[i] for i in t.index_global])
                self._bound = grads
            return
        self._bound = None
        if self._single and type(grads) is list and not self._seq_root:   # the common case
            t = self._all_tables[0]
            t.grads = None
            self._bound_list = grads
            if self._backend.gather(t, grads):
                return
        if by_position is None:        # (whether the user gave a list: refusals say)
            by_position = self._by_position(grads)
        grads = self._grads_as_list(grads)
        gather = getattr(self._backend, "gather", None)
        self._bound_list = grads
        if gather is not None and self._gather_every(tables, grads, gather):
            return      # (before readable's pass over the list: many arrays' full step)
        # (a strided or Fortran-ordered gradient: read through a C-ordered
        # copy, which the compiled reader then takes; a NumPy scalar or a
        # Python number for a 0-d param: its 0-d array)
        readable = self._readable_grads(grads)
        self._bound_list = readable
        if gather is not None and readable is not grads and \
                self._gather_every(tables, readable, gather):
            return
        # the full checks: they raise with the message, or pass for inputs
        # the compiled reader does not take (subclasses, say)
        grads = self._check_grad_list(readable, by_position=by_position)
        for ts in tables:
            for t in ts:
                t.grads_from_arrays([grads[i].reshape(-1) for i in t.index_global])

    def _gather_every(self, tables, grads, gather) -> bool:
        """Every table pointed at its share of the list ``grads`` by the
        backend's compiled reader, which checks them (dtype, shape,
        contiguity, no overlap with what the step writes); False where it
        refuses one (the full checks then say why, or take it)."""
        if type(grads) not in (list, tuple) or len(grads) != len(self._params):
            return False
        for ts in tables:
            for t in ts:
                t.grads = None
        single = len(tables) == 1 and len(tables[0]) == 1
        return all(gather(t, grads if single else [grads[i] for i in t.index_global])
                   for ts in tables for t in ts)

    def _frozen_groups(self, grads):
        """``(grads, frozen)``: ``frozen`` the indices of the groups whose
        every gradient is None (frozen layers: left as they are, state and
        step count included, as torch skips a param whose grad is None),
        their Nones replaced in the list returned by stand-ins that the
        tables point at and nothing reads; ``grads`` itself and an empty
        set when no gradient is None. A group with some gradients None and
        some not is refused, naming the first None."""
        if not _holds_none(grads):
            return grads, frozenset()
        listed = self._grads_as_list(grads)
        if len(listed) != len(self._params):
            return grads, frozenset()     # the checks name the count
        frozen, k = set(), 0
        for gi, group in enumerate(self.param_groups):
            nones = [g is None for g in listed[k:k + len(group["params"])]]
            if all(nones):
                frozen.add(gi)
            elif any(nones):
                label = self._param_label(k + nones.index(True))
                raise TypeError(
                    f"grads{label[len('params'):]} is None but other params of its group "
                    f"(param_groups[{gi}]) have gradients: a group whose gradients are all "
                    "None is left as it is (a frozen layer, as torch skips a param whose "
                    f"grad is None), so give frozen params a group of their own ({label} "
                    "and the rest of its layer)" + (
                        "; a list of layers given whole is one group: split it with "
                        "fastopt.group_params(params, rule), the frozen layer's rule "
                        "giving it options of its own"
                        if self._seq_root and type(self._names.tree) is Seq
                        and not self._names.tree.part else ""))
            k += len(group["params"])
        frozen = frozenset(frozen)
        made = self.__dict__.get("_stand_ins")
        if made is None or made[0] != frozen or made[1] is not self._tables:
            # stand-ins: views of one scratch buffer per dtype, as large as
            # the largest frozen param (never written or read: those tables
            # do not run), kept while the frozen groups and the tables last
            scratch = {}
            for i, a in enumerate(self._params):
                if listed[i] is None:
                    scratch[a.dtype] = max(scratch.get(a.dtype, 0), a.size)
            scratch = {dt: np.empty(n, dt) for dt, n in scratch.items()}
            made = self._stand_ins = (frozen, self._tables, [
                scratch[a.dtype][:a.size].reshape(a.shape) if g is None else None
                for g, a in zip(listed, self._params)])
        out = [s if g is None else g for g, s in zip(listed, made[2])]
        return (InParamOrder(out) if self._seq_root else out), frozen

    def _by_position(self, grads) -> bool:
        """Whether ``grads`` are a list read by position (refusals then name
        a gradient by its index), not a list of layers read by name."""
        return type(grads) in (list, tuple) and not self._seq_root

    def _grads_as_list(self, grads, call="step()", name="grads"):
        """``grads`` as a list in param order (a dict by the params' keys);
        ``name`` what messages call them."""
        if grads is None:
            tree = self._names.tree if self._names is not None else None
            held = ("a list" if tree is None or self._seq_root and type(tree) is not Fields
                    else "a namedtuple like the params" if type(tree) is Fields
                    else "a dict by the params' keys")
            raise TypeError(f"{name} is None: {call} needs the gradients, one array per "
                            f"param ({held}, or a FlatArrays from params.zeros_like()); to "
                            "leave all the params as they are this step, give None for "
                            "each gradient")
        if isinstance(grads, np.ndarray):
            return [grads]
        if isinstance(grads, dict):
            if self._names is None:
                raise TypeError(f"{name} must be a list of arrays in param order: it is a "
                                "dict, but the params were not given by name")
            return self._names.read(grads, name)
        pair = (isinstance(grads, (list, tuple)) and len(grads) == 2 and isinstance(
                grads[1], (dict, list, tuple)) and _is_number(grads[0]))
        if self._seq_root and (type(grads) is list or isinstance(grads, tuple)):
            try:
                return self._names.read(grads, name)     # a list of layers, as the params
            except (TypeError, ValueError):
                if not pair:        # (a model whose first item is a 0-d array: read as such)
                    raise
        if pair:
            raise TypeError(
                f"{name} is a pair of a number and a {type(grads[1]).__name__}: a (loss, "
                f"grads) pair? {call} takes the gradients alone (loss, g = "
                "loss_and_grads(...); opt.step(g))")
        if _name_pairs(grads, none=True):           # as named_parameters() gives them
            if self._names is None:
                raise TypeError(f"{name} must be a list of arrays in param order: it is a "
                                "list of (name, array) pairs, but the params were not given "
                                "by name (a dict, or such pairs)")
            return self._names.read(dict(grads), name)
        return grads

    def _element_step(self, hypers, state):
        """``(step scalars, state buffer names in kernel order)`` for one
        group's next step (subclasses)."""
        raise NotImplementedError

    def _plan_element(self, hypers, state, names, make):
        """``(fixed, at)``: how the step plan makes the kernels' element step
        (``make(scalars, nstate)``) for the next step of the group whose state
        entry is ``state``, while ``hypers`` hold. This default runs
        ``_element_step`` each time: ``fixed`` None and ``at()`` the element
        step, or None when it needs state buffers other than ``names``. An
        optimizer whose scalars change from step to step only in a few terms
        (Adam's bias corrections) overrides it: ``fixed`` an element step
        whose fields but ``values`` hold for every step, ``at()`` the step's
        values, recomputing just those terms. A class whose ``_element_step``
        depends on nothing that changes from step to step once its buffers
        exist names it ``_step_free_element_step`` (SGD, RMSprop, Lion): the
        plan then reuses one element step."""
        nstate = len(names)
        if type(self)._element_step is getattr(type(self), "_step_free_element_step", None):
            # the class vouches that this _element_step depends on the
            # hyperparameters and the buffers there are only, not on the step
            s, now = self._element_step(hypers, state)
            if now == names:
                el = make(s, nstate)
                values = el.values
                return el, lambda: values

        # the plan is ours: through a weak reference, no cycle (a WeakMethod
        # cost 0.5 us a step, made anew each step with a schedule: 2 us)
        me, element_step = weakref.ref(self), type(self)._element_step

        def at():
            s, now = element_step(me(), hypers, state)
            return make(s, nstate) if now == names else None
        return None, at

    def _plan_lr(self, fixed, hypers, state):
        """``at()`` of :meth:`_plan_element` for ``hypers`` that differ from
        the plan's only in lr, keeping its ``fixed`` element step; None
        (this default) to make both again. A scheduled lr is new every step."""
        return None

    def _group_state(self, gi, hypers, created):
        """``(step scalars, state buffer names in kernel order)`` of group
        ``gi``'s next step (its ``_element_step``), every buffer it names
        allocated (zeroed) if new; ``created`` collects those."""
        st = self.state[gi]
        s, names = self._element_step(hypers, st)
        flat = st["flat"]
        for n in names:
            if n not in flat:
                self._group_buffer(gi, n, created)
        return s, names

    def _group_buffer(self, gi, name, created):
        """Group ``gi``'s flat state buffer ``name``, zero-allocated on first
        use (with its runs' views; compact codes have none, and an 8-bit
        buffer comes with its absmax array); ``created`` collects new ones."""
        st = self.state[gi]
        flat = st["flat"]
        if name not in flat and self._state_format.compact:     # codes over the group
            for n, buf in self._state_format.new_buffers(
                    name, [a.size for a in self.param_groups[gi]["params"]]).items():
                created.append((gi, n))
                flat[n] = buf
        if name not in flat:
            buf, views = self._placement.state_buffer(
                [r["flat"].size for r in self._run_info[gi]["runs"]], self._group_dtype(gi))
            created.append((gi, name))     # before the first write: _forget undoes it
            flat[name] = buf
            for bufs, view in zip(st["runs"], views):
                bufs[name] = view
        return flat[name]

    def _forget(self, created):
        for gi, name in created:
            self.state[gi]["flat"].pop(name, None)
            for bufs in self.state[gi]["runs"]:
                bufs.pop(name, None)

    def _table_stats(self, be, tables, compiled, check):
        """``(global norm, all finite?)`` of the gradients of ``tables``: one
        compiled reduction per table, or the :attr:`grad_stats` hook."""
        if self.grad_stats is not None:
            return self.grad_stats(be, [g for t in tables for g in self._grad_views(t)],
                                   check)
        if compiled:
            norm = settled_norm(math.sqrt(ordered_sum(be.sumsq_table(t) for t in tables)),
                                (g for t in tables for g in self._grad_views(t)))
        else:
            norm = norm_of(be, (g for t in tables for g in self._grad_views(t)))
        return norm, (not check) or _all_finite(   # views only if the norm is inf
            norm, (g for t in tables for g in self._grad_views(t)))

    # -- checkpoints ------------------------------------------------------------
    #: state buffer names this optimizer may hold (subclasses extend)
    _state_names: tuple = ()
    #: the state buffers that are never negative (second moments,
    #: accumulators: unsigned codes under ``state_dtype="int8"``); None: the
    #: optimizer has no compact state, for the reason in ``_no_compact_state``
    _nonnegative_state = None
    _no_compact_state = "its step is not an elementwise update of its state buffers."

    def _required_state(self, hypers, step) -> set:
        """Buffers a group must have after ``step`` applied steps."""
        return set()

    def _group_dtype(self, gi):
        """The one dtype of group ``gi``'s state buffers (a checkpoint stores
        each buffer as one flat array per group, whatever the packing)."""
        dtypes = {np.dtype(self._placement.compute_dtype(run["flat"].dtype))
                  for run in self._run_info[gi]["runs"]}
        if len(dtypes) != 1:
            raise ValueError(f"param group {gi} mixes dtypes {sorted(map(str, dtypes))}; "
                             "checkpoints need one dtype per group (split the group)")
        return dtypes.pop()

    def state_dict(self) -> dict:
        """Everything needed to resume exactly, as plain data and arrays (copies).

        ``{"type", "iterations", "skipped_steps", "options", "param_groups",
        "state"}``: hyperparameters per group (a schedule as its
        ``to_dict()`` spec under ``{"schedule": ...}``) with the params'
        shapes and dtypes; per group the applied step count and each state
        buffer as one flat array over the group's elements in param order,
        so a checkpoint does not depend on how the params were packed. The
        params themselves are not included (see :func:`fastopt.save`).

        Taken under the optimizer's lock: a checkpoint made in another
        thread while a training loop steps holds one step, not parts of two.
        """
        with self._lock:
            self._refuse_unbound("state_dict needs them; call bind(params) "
                                 "(or step(grads, params=...)) first")
            # what a step would refuse, refused here too: a checkpoint of it
            # could not be loaded (the layout and the state would disagree)
            V.check_int("iterations", self.iterations, low=0)   # (assignable: load checks it)
            self._check_groups_unchanged(writes=False)      # (frozen params save as any)
            for gi, group in enumerate(self.param_groups):
                self._check_group_keys(group, f"param_groups[{gi}]")
                self._check_group_values(gi, group)
            return self._state_dict()

    def _check_group_values(self, gi, group):
        """A value a step would refuse (an lr read from a config file as a
        string, a beta of 2), refused, named: its checkpoint could not be
        loaded. A schedule is saved as its spec, not its value."""
        group = self._with_schedule(gi, group)
        if callable(group.get("lr")):
            group = dict(group, lr=0.0)
        self._checked_hypers(group, f"param_groups[{gi}]")

    def _state_dict(self) -> dict:
        """:meth:`state_dict`'s contents (a subclass adds its own entries
        here, under the lock)."""
        groups, state = [], []
        for gi, group in enumerate(self.param_groups):
            hyp = {}
            for k, v in self._with_schedule(gi, group).items():
                if k == "params":
                    continue
                if callable(v):
                    if not isinstance(v, Schedule):
                        raise TypeError(
                            f"param_groups[{gi}]['{k}'] is a plain callable; only "
                            "fastopt.schedules schedules can be saved in a state_dict")
                    v = {"schedule": v.to_dict()}
                elif isinstance(v, tuple):
                    v = list(v)
                hyp[k] = v
            hyp["params"] = self._layout_of(gi)
            groups.append(hyp)
            self._group_dtype(gi)
            state.append({"step": self.state[gi]["step"], "buffers": self._group_buffers(gi)})
        return {"type": type(self).__name__, "iterations": self.iterations,
                "skipped_steps": self.skipped_steps,
                "options": self._options_dict(),
                "param_groups": groups, "state": state}

    def _group_buffers(self, gi) -> dict:
        """Group ``gi``'s state buffers as a checkpoint holds them: each one
        array over the group's elements in param order (compact state: its
        codes and absmax arrays as they are), host copies."""
        runs = self.state[gi]["runs"]
        bufs = {}
        for n in sorted({n for r in runs for n in r}):
            parts = []
            for info, r in zip(self._run_info[gi]["runs"], runs):
                if n in r:
                    parts.append(self._placement.to_host(r[n]))
                elif n == "master":
                    # a float32 run beside 16-bit ones is its own master
                    # copy: its values stand in the group's buffer (load
                    # takes views of the 16-bit runs' parts only)
                    parts.append(self._placement.to_host(info["flat"]))
                else:
                    raise RuntimeError(f"state buffer {n!r} exists for only some runs")
            bufs[n] = np.concatenate(parts) if len(parts) > 1 else parts[0].copy()
        if self._state_format.compact:      # the codes as they are, on the host
            for n, b in self.state[gi]["flat"].items():
                h = self._placement.to_host(b)      # a device array has no copy()
                bufs[n] = h.copy() if h is b else h
        return bufs

    def reset_state(self, groups=None) -> None:
        """Start the moments and step counts afresh, as torch's
        ``opt.state.clear()`` does (a new task, a restart): of every param
        group, or of the groups indexed in ``groups``. The hyperparameters,
        schedules and ``iterations`` (the schedules' count) are kept; a
        16-bit model's float32 master weights too. All or nothing, through a
        Ctrl-C too."""
        with self._lock:
            self._refuse_unbound("no state to reset")
            chosen = set(self._group_indexes(groups))
            # each chosen group's entry as before its first step, its runs'
            # master weights kept (no buffers: the next step makes them);
            # the new list in one assignment, so a Ctrl-C finds all or none
            new = GroupStates(
                {"step": 0, "flat": {}, "runs": [{"master": r["master"]} if "master" in r
                                                 else {} for r in st["runs"]]}
                if gi in chosen else st for gi, st in enumerate(self.state))

            def reset():
                self.state = new
                self._drop_tables()       # (the plan holds the old buffers)
            finished(reset)

    def _group_indexes(self, groups) -> list:
        """``groups`` (a list of param group indexes, or None: all) checked."""
        n = len(self.param_groups)
        if groups is None:
            return list(range(n))
        if isinstance(groups, (int, np.integer)):
            raise TypeError(f"groups must be a list of group indexes (or None: all), got an "
                            f"int: reset_state([{groups}])")
        try:
            chosen = [V.check_int("groups[...] (a param group index)", gi, low=0)
                      for gi in groups]
        except TypeError as exc:
            if not hasattr(groups, "__iter__"):
                raise TypeError(f"groups must be a list of group indexes (or None: all), "
                                f"got {type(groups).__name__}") from None
            raise exc
        past = [gi for gi in chosen if gi >= n]
        if past:
            raise ValueError(f"groups[...] = {past[0]}: this {type(self).__name__} has "
                             f"{V.count(n, 'param group')} (0 to {n - 1})")
        return chosen

    def param_state(self, param) -> dict:
        """One param's state as torch's ``opt.state[p]`` holds it: ``{"step":
        n, "exp_avg": array shaped like param, ...}`` (its group's step count
        and its part of each state buffer, float copies; compact state
        decoded to float32). ``param``: one of the arrays this optimizer
        updates, or its name where the params were given by name. Only
        ``"step"`` before the first step. Set state with :meth:`load_state_dict`."""
        with self._lock:
            self._refuse_unbound("param_state needs them; call bind(params) first")
            return param_state(self, param)

    def sync_master(self, values=None) -> None:
        """Take the float32 master copies of 16-bit params from the params
        as they are now. The master copy is what a step updates (the 16-bit
        params are its rounding, written by each step), so new values
        written into 16-bit params in place (``p[...] = new``) are
        overwritten by the next step unless this is called first. No-op for
        float32 and float64 params, which are their own weights.

        ``values``: the weights themselves at full precision (pretrained
        float32 weights), one array per param given as the grads are (a
        list, a dict by name): each master copy takes its values exactly
        and each 16-bit param their rounding; float32 and float64 params
        take them as they are. Their shapes and dtypes are checked before
        anything is written (their values are taken as given, NaN too)."""
        with self._lock:
            if not self.param_groups:
                if values is not None:
                    self._refuse_unbound("sync_master(values) needs them; call bind(params) first")
                return          # no params yet, no master copies
            if values is not None:
                return self._set_weights(self._weight_values(values))
            pl = self._placement
            for info, st in zip(self._run_info, self.state):
                for run, bufs in zip(info["runs"], st["runs"]):
                    if "master" in bufs:
                        bufs["master"] = pl.master_copy(run["flat"])
            self._drop_tables()       # they address the master copies: new arrays

    def _weight_values(self, values) -> list:
        """``sync_master``'s ``values`` as a list in param order, each
        checked against its param (real floats, the param's shape)."""
        if self._device:
            raise TypeError("sync_master(values) takes host params' values: for device "
                            "params write the values into the params and call sync_master()")
        vals = V.as_array_list("values", self._grads_as_list(self._one_pass(values),
                                                             "sync_master()", "values"),
                               by_name=self._names is not None)
        check_weight_values(vals, self._params, list(map(self._param_label,
                                                         range(len(self._params)))))
        return vals

    def _set_weights(self, vals) -> None:
        """Params and master copies from checked full-precision ``vals``:
        everything new made first (copies: ``vals`` may be views of the
        params themselves), then written."""
        masters = []
        for info, st in zip(self._run_info, self.state):
            for run, bufs in zip(info["runs"], st["runs"]):
                if "master" in bufs:
                    part = [np.asarray(vals[k], np.float32).ravel()
                            for k in range(run["start"], run["stop"])]
                    masters.append((bufs, state_copy(np.concatenate(part), np.float32)))
        low = self._placement.is_low
        new = [np.asarray(v, np.float32).astype(p.dtype) if low(p.dtype)
               else np.array(v, dtype=p.dtype) for p, v in zip(self._params, vals)]

        def write():     # (idempotent: a Ctrl-C during it runs it again to its end)
            for p, v in zip(self._params, new):
                p[...] = v
            for bufs, m in masters:
                bufs["master"] = m
            self._drop_tables()
        finished(write)

    @property
    def state_dtype(self) -> str:
        """The optimizer state's format, ``"float32"``, ``"bfloat16"`` or
        ``"int8"``: chosen when the optimizer is made. ``"float32"`` is full
        state, each value in its param's own float dtype (float64 params
        keep float64 state; 16-bit params float32)."""
        return self._state_format.name

    @state_dtype.setter
    def state_dtype(self, value):
        # (it did nothing: an attribute no step read)
        raise AttributeError(
            f"state_dtype is chosen when the optimizer is made (this one keeps its state "
            f"as {self._state_format.name!r}); make a new one with state_dtype={value!r}. "
            "A checkpoint's state is not converted between formats")

    def _drop_tables(self):
        """Tables and plan made again at the next step: what they hold (the
        master copies, the state buffers) was replaced, and must not be
        kept alive until then (a load would hold twice the state)."""
        self._tables = self._plan = self._bound = self._written_bufs = None
        self._all_tables = ()

    def state_nbytes(self) -> int:
        """Bytes of optimizer state allocated so far: every state buffer
        (moments, momentum; under compact state its codes and absmax
        arrays), not the float32 master copies of 16-bit params (weights).
        A buffer appears at the first step that uses it."""
        return sum(int(b.nbytes) for st in self.state for b in st["flat"].values())

    def _options_dict(self) -> dict:
        return {"max_grad_norm": self.max_grad_norm, "skip_nonfinite": self.skip_nonfinite,
                "loss_scaler": (None if self.loss_scaler is None
                                else self.loss_scaler.state_dict()),
                "state_dtype": self._state_format.name, "state_seed": self._state_format.seed}

    def load_state_dict(self, state_dict) -> None:
        """Restore :meth:`state_dict` output. Everything is checked first: a
        checkpoint that does not match (another optimizer type, other shapes
        or dtypes, missing or unknown keys) raises
        :class:`fastopt.CheckpointError` (a ValueError; for a value of the wrong
        type, one that is a TypeError too), as :func:`fastopt.load` does, and
        leaves this optimizer exactly as it was."""
        with self._lock:
            finished(prepared_load(self, state_dict))   # a Ctrl-C: all of it, then raised

    def _refuse_unbound(self, remedy, error=RuntimeError):
        """Before a bind there is nothing to step, check or hold (a state_dict
        raised an AttributeError from inside, or counted 0 param groups):
        ``error`` saying so, with ``remedy``."""
        if not self.param_groups:
            raise error(f"this {type(self).__name__} has no params yet: {remedy}")

    def __copy__(self):
        # a shallow copy shared the params and state buffers but kept its own
        # step counts: both then stepped the moments, each bias-correcting
        # for its own count (silently wrong updates, torn checkpoints)
        raise TypeError(f"copy.copy(opt) of this {type(self).__name__} would share its params "
                        "and state but not its step count; use copy.deepcopy(opt) for an "
                        "independent optimizer over copies of its params")

    def _prepare_load(self, sd):
        """Check ``sd`` against this optimizer; return a function that applies it
        (and cannot fail), so callers can check several things before writing."""
        from ..checkpoint import CheckpointError    # as any load that cannot match
        self._refuse_unbound("no state to load into; call bind(params) (or make it with "
                             "its params) first", CheckpointError)
        def need(d, keys, where):
            if not isinstance(d, dict):
                raise TypeError(f"checkpoint: {where} must be a dict, got {type(d).__name__}")
            missing = [k for k in keys if k not in d]
            if missing:
                raise ValueError(f"checkpoint: {where} is missing keys {missing}")

        if isinstance(sd, (str, bytes, os.PathLike)):
            raise TypeError(f"checkpoint: the state_dict must be a dict, got a path ({sd!r}): "
                            "fastopt.load(path, params=params, optimizer=opt) reads a "
                            "checkpoint file")
        if isinstance(sd, dict) and sd.keys() == {"state", "param_groups"}:
            raise ValueError("checkpoint: this is torch.optim's state_dict layout ('state' "
                             "by param and 'param_groups' only); fastopt reads its own "
                             "(opt.state_dict() of a fastopt optimizer, or fastopt.save)")
        need(sd, ("type", "iterations", "skipped_steps", "options", "param_groups", "state"),
             "the state_dict")
        if sd["type"] != type(self).__name__:
            raise ValueError(f"checkpoint is for an optimizer of type {sd['type']}, not "
                             f"{type(self).__name__}")
        iterations = V.check_int("checkpoint iterations", sd["iterations"], low=0)
        skipped = V.check_int("checkpoint skipped_steps", sd["skipped_steps"], low=0)
        apply_options = self._prepare_options(sd["options"])
        if not isinstance(sd["param_groups"], list):
            raise TypeError("checkpoint: 'param_groups' must be a list, got "
                            f"{type(sd['param_groups']).__name__}")
        if len(sd["param_groups"]) != len(self.param_groups):
            raise ValueError("checkpoint has "
                             f"{V.count(len(sd['param_groups']), 'param group')}, this "
                             f"optimizer has {len(self.param_groups)} (to start from a run "
                             "with other groups, a pretrained model, load its params alone: "
                             "fastopt.load(path, params=params), and keep this optimizer's "
                             "fresh state)")
        if not isinstance(sd["state"], list) or len(sd["state"]) != len(self.param_groups):
            raise ValueError("checkpoint: 'state' must list one entry per param group")
        # (the checkpoint's groups in another order: messages name its index)
        order = self._group_order(sd)
        at = order or range(len(self.param_groups))
        sd = self._reordered(sd, order)
        new_hypers, new_state = [], []
        for gi, (hyp, st) in enumerate(zip(sd["param_groups"], sd["state"])):
            where = f"checkpoint param_groups[{at[gi]}]"
            need(hyp, list(self.defaults) + ["params"], f"param_groups[{at[gi]}]")
            unknown = set(hyp) - set(self.defaults) - {"params"}
            if unknown:
                raise ValueError(f"{where} has unknown keys {sorted(unknown)}")
            order = self._saved_order(gi, hyp["params"])
            group = {k: v for k, v in hyp.items() if k != "params"}
            if isinstance(group["lr"], dict):
                need(group["lr"], ("schedule",), f"{where}['lr']")
                group["lr"] = from_dict(group["lr"]["schedule"])
            try:
                group = self._validated(group, where=where, position=iterations)
            except ScheduleFailed:
                if not iterations:
                    raise
                # a schedule that ends (as torch's OneCycleLR), an lr range test
                # that overflowed: the run's next step fails, and so will this
                # one's, naming it; the checkpoint matches (checked at the last step
                # taken) and loads, so that its schedule can be replaced
                group = self._validated(group, where=where, position=iterations - 1)
            except ValueError as exc:
                if group.get("eps") != 0 or "['eps']" not in str(exc):
                    raise
                # fastopt before 2026-12-07 took eps=0 where the step divides
                # by it: such a run's checkpoint says how to go on
                raise type(exc)(
                    f"{exc}. A checkpoint of an earlier fastopt, which took eps=0? Set "
                    f"its ['param_groups'][{at[gi]}]['eps'] to a positive value (1e-8) and "
                    "load it (a fastopt.save file's state dict is "
                    "fastopt.load(path)['optimizer']): the steps differ by it only where "
                    "the state is about 0"
                ) from None
            need(st, ("step", "buffers"), f"state[{at[gi]}]")
            step = V.check_int(f"checkpoint state[{at[gi]}]['step']", st["step"], low=0)
            runs = self._run_info[gi]["runs"]
            dtype = self._group_dtype(gi)
            n = sum(r["flat"].size for r in runs)
            bufs = st["buffers"]
            required = self._required_state(group, step)
            if any(self._placement.is_low(r["flat"].dtype) for r in runs):
                required = required | {"master"}
            fmt = self._state_format
            sizes = [a.size for a in self.param_groups[gi]["params"]]
            required = fmt.buffer_names(required - {"master"}) | (required & {"master"})
            need(bufs, sorted(required), f"state[{at[gi]}]")
            unknown = set(bufs) - fmt.buffer_names(self._state_names) - (required & {"master"})
            if unknown:
                raise ValueError(f"checkpoint state[{at[gi]}] has unknown buffers "
                                 f"{sorted(unknown)}"
                                 f" for {type(self).__name__} (expected some of "
                                 f"{sorted(fmt.buffer_names(self._state_names))})")
            for name, a in bufs.items():
                want, size = ((dtype, n) if name == "master" else
                              fmt.buffer_spec(name, sizes, dtype))
                if not isinstance(a, np.ndarray) or a.shape != (size,) or a.dtype != want:
                    got = (f"{a.dtype}{list(a.shape)}" if isinstance(a, np.ndarray)
                           else type(a).__name__)
                    raise ValueError(f"checkpoint state[{at[gi]}]['{name}'] is {got}, expected "
                                     f"{want}[{size}]")
                # a block's scale is its largest |value|: a negative one (a
                # corrupt or hand-edited file) decodes the block with the
                # wrong sign, and v < 0 turns the params NaN
                negative = np.flatnonzero(a < 0) if name.endswith(ABSMAX) else ()
                if len(negative):
                    raise ValueError(f"checkpoint state[{at[gi]}]['{name}'] has negative values "
                                     f"(blocks {negative[:3].tolist()}...): a block's absmax "
                                     "is never negative; the file is corrupt")
            if order is not None:
                bufs = {name: fmt.reordered(name, a, order) for name, a in bufs.items()}
            # one buffer per name over the group (a copy, where the params
            # live), its runs' views of it; compact codes: a copy, no views
            compact = {name: state_copy(a) for name, a in bufs.items()
                       if fmt.compact and name != "master"}
            made = {name: self._placement.state_buffer([r["flat"].size for r in runs], dtype, a)
                    for name, a in bufs.items() if name not in compact}
            # a master copy for the 16-bit runs only: a float32 run's weights
            # are its params (the checkpoint's part for it is their values)
            low = [self._placement.is_low(r["flat"].dtype) for r in runs]
            new_runs = [{name: views[ri] for name, (_, views) in made.items()
                         if name != "master" or low[ri]}
                        for ri in range(len(runs))]
            entry = {"step": step, "runs": new_runs,
                     "flat": {**{n: buf for n, (buf, _) in made.items() if n != "master"},
                              **compact}}
            new_hypers.append(group)
            new_state.append(entry)

        replaced = _replaced_numbers(self.param_groups, new_hypers, self._schedules)

        def apply():
            for group, hyp in zip(self.param_groups, new_hypers):
                group.update(hyp)
            self.state = GroupStates(new_state)
            self._schedules, self._lr_shown = {}, {}
            self._drop_tables()       # the master copies (weights) are new arrays
            self.iterations = iterations
            self.skipped_steps = skipped
            apply_options()
            self._show_lr()
            if replaced:
                # as the options above: a fine-tune made with a new lr and
                # given a pretraining run's state took the old lr unsaid
                warn_user(f"load_state_dict: the checkpoint's {replaced} (as torch's "
                          "load_state_dict does; set opt.param_groups[i][...] after "
                          "loading to keep yours)")
        return apply

    def _saved_order(self, gi, saved):
        """Where group ``gi``'s params stand in a checkpoint's record of the
        group (``saved``: its ``param_groups[gi]['params']``): None when in
        the same order, else ``(order, sizes there)``, ``order[i]`` the
        position there of the param now at ``i``. By name where both sides
        name them (the same names in another order: a model's dict built
        anew); else by position (as fastopt.load reads params saved by name
        into a list: in the saved order). ValueError when they differ."""
        order = order_in_checkpoint(f"checkpoint param_groups[{gi}]", saved,
                                    self._layout_of(gi))
        return None if order is None else (order, [int(np.prod(d["shape"])) for d in saved])

    def _in_param_order(self, gi, saved, a):
        """``a``, a checkpoint's array over group ``gi``'s elements (along
        its last axis; ``saved``: the checkpoint's record of the group's
        params), in this optimizer's param order. For the vectors a
        subclass keeps beside the state buffers (L-BFGS's history, SAM's
        perturbation); checked by the base's load first."""
        saved_order = self._saved_order(gi, saved)
        if saved_order is None or a is None:
            return a
        return self._state_format.reordered("master", a, saved_order)   # by element

    def _prepare_options(self, options):
        if not isinstance(options, dict):
            raise TypeError("checkpoint: 'options' must be a dict")
        missing = [k for k in ("max_grad_norm", "skip_nonfinite", "loss_scaler")
                   if k not in options]
        if missing:
            raise ValueError(f"checkpoint: options is missing keys {missing}")
        mgn = options["max_grad_norm"]
        mgn = None if mgn is None else V.check_real("checkpoint max_grad_norm", mgn,
                                                    low=0.0, low_open=True)
        skip = V.check_bool("checkpoint skip_nonfinite", options["skip_nonfinite"])
        scaler = (None if options["loss_scaler"] is None
                  else LossScaler.from_state_dict(options["loss_scaler"]))
        # compact state: the checkpoint's codes are in its own format (a
        # checkpoint from before compact state has float state, seed 0)
        fmt = self._state_format
        saved_dtype = options.get("state_dtype", "float32")
        if saved_dtype != fmt.name:
            raise ValueError(
                f"checkpoint keeps its optimizer state as {saved_dtype!r}, this optimizer as "
                f"{fmt.name!r}; state is not converted between formats: make the optimizer "
                f"with state_dtype={saved_dtype!r} to resume from this checkpoint")
        seed = V.check_int("checkpoint state_seed", options.get("state_seed", 0), low=0)

        def apply():
            # The checkpoint's settings win (a resume must step as the saved
            # run did); a constructor setting it replaces is said, not hidden.
            for name, saved, now in (("max_grad_norm", mgn, self.max_grad_norm),
                                     ("skip_nonfinite", skip, self.skip_nonfinite),
                                     ("state_seed", seed, fmt.seed)):
                if now != saved:
                    warn_user(f"load_state_dict: the checkpoint's {name}={saved!r} "
                              f"replaces this optimizer's {now!r}")
            self.max_grad_norm, self.skip_nonfinite, fmt.seed = mgn, skip, seed
            now = self.loss_scaler
            if scaler is None:
                if now is not None:
                    warn_user("load_state_dict: the checkpoint has no loss_scaler, and this "
                              "optimizer's is dropped: the steps no longer unscale, so stop "
                              "scaling the loss")
                self.loss_scaler = None
            elif now is None:
                warn_user(f"load_state_dict: the checkpoint's {scaler!r} is installed as "
                          "opt.loss_scaler: the steps unscale by its scale, so multiply the "
                          "loss by opt.loss_scaler.scale")
                self.loss_scaler = scaler
            else:   # keep the user's object: they read .scale from it
                settings = ("growth_factor", "backoff_factor", "growth_interval", "min_scale")
                changed = [f"{k}={getattr(scaler, k)!r} (was {getattr(now, k)!r})"
                           for k in settings if getattr(scaler, k) != getattr(now, k)]
                if changed:
                    warn_user("load_state_dict: the checkpoint's loss scaler settings "
                              f"replace this optimizer's: {', '.join(changed)}")
                now.__dict__.update(scaler.__dict__)
        return apply

    # -- hyperparameters --------------------------------------------------------
    def _resolve(self, group, where="", position=None):
        """The group's hypers checked, with a schedule's lr evaluated at
        ``position`` (default ``self.iterations``; host float64, once per
        step: nothing recompiles)."""
        lr = group.get("lr", _MISSING)
        if lr is _MISSING:
            self._refuse_missing(group, where)
        if callable(lr):
            k = self.iterations if position is None else position
            group = dict(group, lr=schedule_value(lr, k, V.key(where, "lr")))
        return self._checked_hypers(group, where)

    def _checked_hypers(self, group, where):
        """``_check_hypers(group)``, re-run only when a hyperparameter other
        than lr changed since the last step (groups are editable between
        steps, and every value must be checked before it is used; a full
        check is most of a small model's step time). lr is checked every
        time: a schedule gives a new value each step."""
        cache = self.__dict__.setdefault("_hypers_cache", {})
        hit = cache.get(where)
        if hit is not None and _unchanged(group, hit[0]):
            lr = group["lr"]
            checked = hit[1].copy()
            # a plain non-negative float is the common case: checked inline
            checked["lr"] = lr if (type(lr) is float and 0.0 <= lr < math.inf) else \
                V.check_real(V.key(where, "lr"), lr, low=0.0)
            return checked
        # A key the optimizer does not have (a misspelt hyperparameter, written
        # into a group after construction) would be ignored: refused, as when
        # it is made. (A key added or removed always misses the cache.)
        if self.__dict__.get("defaults") is not None:     # (None while they are checked)
            self._check_group_keys(group, where)
        snapshot = {k: (v[:] if type(v) is list else v)    # a copy sees in-place edits
                    for k, v in group.items() if k != "params" and k != "lr"}
        checked = self._check_hypers(group, where)
        cache[where] = (snapshot, dict(checked))
        return checked

    def _check_group_keys(self, group, where):
        """A group's keys are the optimizer's hyperparameters: one added
        after construction (a misspelt name) or deleted is refused, named."""
        unknown = group.keys() - self.defaults.keys() - {"params"}
        if unknown:
            first = sorted(unknown)[0]
            raise ValueError(f"{where or 'param group'} has unknown keys {sorted(unknown)}; "
                             f"this {type(self).__name__} has {sorted(self.defaults)}: delete "
                             f"it (del opt.{where or 'param_groups[i]'}[{first!r}]; a group "
                             "holds params "
                             "and hyperparameters only, so keep labels such as a name beside "
                             "the optimizer)")
        if self.defaults.keys() - group.keys():
            self._refuse_missing(group, where)

    def _refuse_missing(self, group, where):
        """A hyperparameter deleted from a group after construction: named
        (it raised a bare KeyError from the checks)."""
        missing = sorted(self.defaults.keys() - group.keys())
        raise ValueError(f"{where or 'param group'} is missing keys {missing} (deleted after "
                         f"the {type(self).__name__} was made?); set them again, e.g. "
                         f"{missing[0]}={self.defaults[missing[0]]!r}")

    def _validated(self, group, where="", position=None):
        """Checked and normalised hypers to store; a schedule stays a schedule."""
        checked = self._resolve(group, where, position)
        if callable(group["lr"]):
            checked["lr"] = group["lr"]
        return checked

    _plan = None      # the last step's plan (step_plan.py); none before the first step
    #: why the optimizer takes one param group only (L-BFGS), said where a
    #: message would suggest another group; empty where it takes several
    _one_group = ""
    _frozen_now = frozenset()   # the groups the running step leaves (all grads None)
    _watch = None     # the user's list or dict of params, checked each step (given.py)
    _warned_nonfinite = False     # a step wrote non-finite gradients (said once)
    _warned_ended = False         # a step ran at a schedule's lr of 0 (said once)

    # -- subclass hooks ---------------------------------------------------------
    #: hyperparameter name -> kind (NONNEG, POSITIVE, REAL, BETAS, FLAG), in the
    #: order they are checked: each optimizer declares its own
    _hypers: dict = {}

    def _check_hypers(self, group, where=""):
        """The group's hyperparameters checked by :attr:`_hypers` and
        normalised (floats, bools, a beta pair), naming the key on error."""
        checked = dict(group)
        for name, kind in self._hypers.items():
            key, value = V.key(where, name), group[name]
            if callable(value) and name != "lr":     # it said "must be a real number, got linear"
                raise TypeError(f"{key} is a {type(value).__name__}: only lr takes a "
                                "schedule; set other hyperparameters between steps "
                                f"(opt.param_groups[i][{name!r}] = value)")
            if kind == BETAS:
                checked[name] = V.check_betas(value, key)
            elif kind == FLAG:
                checked[name] = V.check_bool(key, value)
            elif kind == REAL:
                checked[name] = V.check_real(key, value)
            else:
                positive = kind == POSITIVE      # eps alone: a divisor's guard
                checked[name] = V.check_real(key, value, low=0.0, low_open=positive,
                                             why=V.EPS_WHY if positive else "")
        return checked

    @property
    def backend(self) -> str:
        return self._backend.name if self._backend is not None else self._backend_name

    def _group_order(self, sd):
        """Where each of this optimizer's param groups stands in ``sd``'s,
        when the groups are the same but in another order, else None.
        ``group_params`` orders the groups by where each one's first array
        comes: a model's dict built anew in another order (each layer's
        ``b`` before its ``W``) gave the same groups in another order, and
        its checkpoint did not load. Matched by the set of names each group
        holds, where every param on both sides is named."""
        groups = sd.get("param_groups") if isinstance(sd, dict) else None
        if (self._names is None or not isinstance(groups, list)
                or len(groups) != len(self.param_groups)):
            return None
        mine = [frozenset(d["name"] for d in self._layout_of(gi))
                for gi in range(len(self.param_groups))]
        try:
            theirs = [frozenset(d["name"] for d in g["params"]) for g in groups]
        except (TypeError, KeyError):
            return None         # (the load's checks name what is wrong)
        if theirs == mine or len(set(theirs)) != len(theirs):
            return None
        at = {names: j for j, names in enumerate(theirs)}
        order = [at.get(names) for names in mine]
        return None if None in order else order

    def _in_group_order(self, sd):
        """``sd`` with its param groups (and their state) in this
        optimizer's order (:meth:`_group_order`); ``sd`` itself when they
        are in it already or do not match."""
        return self._reordered(sd, self._group_order(sd))

    @staticmethod
    def _reordered(sd, order):
        """``sd`` with its groups and their state taken in ``order`` (None:
        ``sd`` itself)."""
        if order is None:
            return sd
        return {**sd, "param_groups": [sd["param_groups"][j] for j in order],
                "state": [sd["state"][j] for j in order]}

    def _layout_of(self, gi) -> list:
        """Group ``gi``'s params as a checkpoint records them: shape, dtype,
        and the name when the params were given by name."""
        first = sum(len(g["params"]) for g in self.param_groups[:gi])
        out = []
        for i, a in enumerate(self.param_groups[gi]["params"]):
            d = {"shape": list(a.shape), "dtype": str(a.dtype)}
            if self._names is not None:
                d["name"] = self._names.names[first + i]
            out.append(d)
        return out

    def __repr__(self):
        if not self.param_groups:
            return f"{type(self).__name__}(no params yet, backend={self.backend!r})"
        n = sum(a.size for a in self._params)
        # the lr each group shows (a schedule's value at this step) and the
        # step count: what a notebook's printout is read for
        lrs = [g.get("lr") for g in self.param_groups]
        shown = [f"{v:g}" if isinstance(v, numbers.Real) else type(v).__name__ for v in lrs]
        lr = shown[0] if len(set(shown)) == 1 else f"[{', '.join(shown)}]"
        return (f"{type(self).__name__}({V.count(len(self._params), 'array')}, "
                f"{V.count(n, 'element')}, {V.count(len(self.param_groups), 'group')}, "
                f"lr={lr}, iterations={self.iterations}, backend={self.backend!r})")
