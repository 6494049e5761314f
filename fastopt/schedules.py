r"""Learning-rate schedules: closed-form, stateless, serialisable.

A schedule is a callable ``lr = schedule(step)`` of the 0-based step index
(the number of optimizer steps taken before this one). It holds no state, so
resuming at step ``k`` gives exactly the lr of step ``k``, and it is small:
each one is a few lines of float64 arithmetic on the host, evaluated once per
step (never inside a kernel).

Optimizers take a schedule wherever they take ``lr`` (also per param
group)::

    sched = fastopt.schedules.warmup_cosine(peak_value=1e-3, warmup_steps=500,
                                            total_steps=10_000, alpha=0.1)
    opt = fastopt.AdamW(params, lr=sched)

Pieces compose (the style of optax's ``join_schedules``): :func:`join`
runs schedule ``i`` from ``boundaries[i-1]`` on, counting its own steps from
zero there, and :func:`warmup_cosine` is itself a join of :func:`linear`
and :func:`cosine_decay`.

Each schedule serialises to a plain dict (``to_dict()``, JSON-safe) and back
(:func:`from_dict`), which is how checkpoints store them.

**Differences from torch.optim.lr_scheduler** (tested in
``tests/test_schedules.py``):

* torch's schedulers mostly update the lr *recursively* (``lr *= factor``
  each step; CosineAnnealingLR's recursion); here every value is the closed
  form, so values agree with torch to float64 rounding (~1e-12 relative),
  not bit for bit, and never drift over long runs.
* Past its last step, :func:`cosine_decay` holds its floor, whereas torch's
  CosineAnnealingLR keeps following the cosine back up (period ``2 T_max``);
  :func:`one_cycle` holds its final value, whereas torch's OneCycleLR raises.
* :func:`one_cycle` does not cycle momentum (torch's ``cycle_momentum``).
* Values are absolute learning rates, not factors of a base lr.
"""

from __future__ import annotations

import ast
import bisect
import inspect
import json
import math
import numbers

import numpy as np

from ._validate import check_bool as _bool
from ._validate import check_int as _int
from ._validate import check_real as _real

__all__ = ["Schedule", "constant", "linear", "warmup", "cosine_decay", "warmup_cosine",
           "step_decay", "exponential", "one_cycle", "join", "from_step", "from_dict",
           "parse_schedule", "settles_at"]

#: the names a schedule string may call (``parse_schedule``)
CONSTRUCTORS = ("constant", "linear", "warmup", "cosine_decay", "warmup_cosine", "step_decay",
                "exponential", "one_cycle", "join", "from_step")

_KINDS: dict = {}


def _step(step) -> int:
    return _int("step", step, low=0)


class Schedule:
    """Base class: a callable of the step with a dict spec.

    Subclasses set ``kind``, store their constructor arguments in
    ``self._args`` (JSON-safe values) and implement ``value(step)``.
    """

    kind = ""

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.kind:
            _KINDS[cls.kind] = cls

    def __call__(self, step):
        """The lr at ``step`` (an int >= 0), or at each step of an integer
        array or a range (``sched(np.arange(1000))``, to plot it): a
        float64 array of the same shape."""
        if type(step) is not int or step < 0:      # (an optimizer's own count is)
            if isinstance(step, range) or (isinstance(step, np.ndarray) and step.ndim):
                return self._at_each(step)     # (a 0-d array: one step, as np.load gives it)
            step = _step(step)
        try:
            return float(self.value(step))
        except OverflowError:      # a growing schedule (gamma > 1) past float's range
            what = ("the step is past the largest float" if step > _FLOAT_MAX
                    else "the lr grows past the largest float")
            raise ValueError(f"{self!r} at step {step}: {what}") from None

    def value(self, step: int) -> float:
        raise NotImplementedError

    def _at_each(self, steps) -> np.ndarray:
        steps = np.asarray(steps)
        if steps.dtype.kind not in "iu":
            raise TypeError(f"steps must be integers, got an array of {steps.dtype}")
        flat = [self(int(k)) for k in steps.ravel()]
        return np.array(flat, dtype=np.float64).reshape(steps.shape)

    def to_dict(self) -> dict:
        """``{"kind": ..., **arguments}``: JSON-safe; :func:`from_dict` inverts it."""
        return {"kind": self.kind, **{k: _spec(v) for k, v in self._args.items()}}

    def __eq__(self, other):
        return isinstance(other, Schedule) and self.to_dict() == other.to_dict()

    def __hash__(self):
        # equal schedules hash alike: -0.0 == 0.0 (their reprs differ)
        return hash(_frozen(self.to_dict()))

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self._args.items())
        return f"{self.kind}({args})"


def _spec(v):
    if isinstance(v, Schedule):
        return v.to_dict()
    if isinstance(v, (list, tuple)):
        return [_spec(x) for x in v]
    return v


def from_dict(spec) -> Schedule:
    """The schedule described by ``spec`` (the output of ``to_dict()``)."""
    if isinstance(spec, Schedule):
        return spec
    if not isinstance(spec, dict) or "kind" not in spec:
        raise ValueError(f"a schedule spec is a dict with a 'kind' key, got {spec!r}")
    cls = _KINDS.get(spec["kind"]) if isinstance(spec["kind"], str) else None
    if cls is None:
        raise ValueError(f"unknown schedule kind {spec['kind']!r}; known: {sorted(_KINDS)}")
    args = {k: v for k, v in spec.items() if k != "kind"}
    try:
        return cls(**args)
    except TypeError as exc:
        raise ValueError(f"bad arguments for schedule {spec['kind']!r}: {exc}") from None


# -- the pieces ----------------------------------------------------------------

class constant(Schedule):
    r"""``lr(t) = value``."""

    kind = "constant"

    def __init__(self, value):
        self._args = {"value": _real("value", value, low=0.0)}

    def value(self, step):
        return self._args["value"]


class linear(Schedule):
    r"""Linear ramp from ``init_value`` to ``end_value``, then constant.

    .. math::
        lr(t) = a + (b - a)\,\frac{\min(\max(t - t_0, 0), T)}{T}

    with ``a = init_value``, ``b = end_value``, ``T = transition_steps``,
    ``t_0 = transition_begin``. torch's ``LinearLR(start_factor,
    end_factor, total_iters)`` on base lr ``L`` is ``linear(start_factor * L,
    end_factor * L, total_iters)``.
    """

    kind = "linear"

    def __init__(self, init_value, end_value, transition_steps, transition_begin=0):
        self._args = {"init_value": _real("init_value", init_value, low=0.0),
                      "end_value": _real("end_value", end_value, low=0.0),
                      "transition_steps": _int("transition_steps", transition_steps, low=1),
                      "transition_begin": _int("transition_begin", transition_begin, low=0)}

    def value(self, step):
        a, b, n, t0 = self._args.values()
        k = min(max(step - t0, 0), n)
        return a + (b - a) * k / n


def warmup(peak_value, warmup_steps, init_value=0.0) -> linear:
    """Linear warmup from ``init_value`` (default 0) to ``peak_value`` over
    ``warmup_steps`` steps, then constant: ``linear(init_value, peak_value,
    warmup_steps)``."""
    return linear(init_value, peak_value, warmup_steps)


def _floor(init_value, final_value, alpha):
    if final_value is not None:
        return _real("final_value", final_value, low=0.0)
    return _real("alpha", alpha, low=0.0) * init_value


class cosine_decay(Schedule):
    r"""Cosine decay from ``init_value`` to a floor over ``decay_steps``, then the floor.

    .. math::
        lr(t) = f + (a - f)\,\frac{1 + \cos(\pi \min(t, T) / T)}{2}

    The floor ``f`` is ``final_value`` when given, else ``alpha * init_value``
    (a fraction of the peak). torch's ``CosineAnnealingLR(T_max, eta_min)``
    on base lr ``a`` is ``cosine_decay(a, T_max, final_value=eta_min)`` for
    ``t <= T_max`` (torch computes it recursively and, past ``T_max``, rises
    again; this holds the floor).
    """

    kind = "cosine_decay"

    def __init__(self, init_value, decay_steps, final_value=None, alpha=0.0):
        init_value = _real("init_value", init_value, low=0.0)
        self._args = {"init_value": init_value,
                      "decay_steps": _int("decay_steps", decay_steps, low=1),
                      "final_value": _floor(init_value, final_value, alpha)}

    def value(self, step):
        a, n, f = self._args.values()
        return f + (a - f) * (1.0 + math.cos(math.pi * min(step, n) / n)) / 2.0


class join(Schedule):
    r"""Run ``schedules[i]`` on ``[boundaries[i-1], boundaries[i])``.

    .. math::
        lr(t) = s_i(t - b_{i-1}),\quad b_{i-1} \le t < b_i,\quad b_{-1} = 0

    Each schedule counts its own steps from zero at its boundary (optax's
    ``join_schedules``; torch's ``SequentialLR`` with ``milestones``).
    ``len(boundaries) == len(schedules) - 1``, strictly increasing.
    """

    kind = "join"

    def __init__(self, schedules, boundaries):
        if not isinstance(schedules, (list, tuple)) or not schedules:
            raise ValueError("schedules must be a non-empty list of schedules")
        for i, sched in enumerate(schedules):
            if isinstance(sched, numbers.Real) and not isinstance(sched, bool):
                # join([0.1, 0.01], [10]): "a schedule spec is a dict ..." said
                # nothing of where, nor of constant()
                raise TypeError(f"schedules[{i}] is the number {sched!r}, not a schedule: "
                                f"constant({sched!r}) holds one value")
        scheds = [from_dict(s) for s in schedules]
        if not isinstance(boundaries, (list, tuple)) or len(boundaries) != len(scheds) - 1:
            raise ValueError(f"boundaries must be a list of len(schedules) - 1 = "
                             f"{len(scheds) - 1} steps, got {boundaries!r}")
        bounds = [_int(f"boundaries[{i}]", b, low=1) for i, b in enumerate(boundaries)]
        if any(b1 <= b0 for b0, b1 in zip(bounds, bounds[1:])):
            raise ValueError(f"boundaries must be strictly increasing, got {bounds}")
        self._args = {"schedules": scheds, "boundaries": bounds}

    def value(self, step):
        scheds, bounds = self._args["schedules"], self._args["boundaries"]
        i = bisect.bisect_right(bounds, step)
        return scheds[i].value(step - (bounds[i - 1] if i else 0))


def from_step(schedule, start) -> Schedule:
    """``schedule`` counting its own steps from zero at step ``start``, its
    first value before that.

    An optimizer reads every schedule at its own step count
    (``opt.iterations``), one assigned mid-run too: ``cosine_decay(1e-3,
    50)`` assigned at step 100 would be past its end, at its floor. Assign
    ``from_step(schedule, opt.iterations)`` to start it from its beginning
    there (torch's schedulers count from their creation). A :func:`join`, so
    it serialises as one."""
    if not isinstance(schedule, (Schedule, dict)):
        raise TypeError(f"from_step takes a fastopt schedule (or its to_dict()), got "
                        f"{type(schedule).__name__}; shift a function yourself: "
                        "lambda step: f(max(step - start, 0))")
    schedule = from_dict(schedule)
    start = _int("start", start, low=0)
    return schedule if start == 0 else join([constant(schedule(0)), schedule], [start])


class warmup_cosine(Schedule):
    r"""Linear warmup to ``peak_value``, then cosine decay to a floor.

    ``join([linear(init_value, peak_value, W), cosine_decay(peak_value,
    total_steps - W, final_value, alpha)], [W])`` with ``W = warmup_steps``.
    The common recipe: ``alpha=0.1`` decays to 10% of the peak at
    ``total_steps`` (counted from step 0, warmup included), then holds.
    ``warmup_steps=0``: the cosine decay alone. optax's
    ``warmup_cosine_decay_schedule(init_value, peak_value, warmup_steps,
    decay_steps, end_value)`` is ``warmup_cosine(peak_value, warmup_steps,
    decay_steps, init_value=init_value, final_value=end_value)``.
    """

    kind = "warmup_cosine"

    def __init__(self, peak_value, warmup_steps, total_steps, init_value=0.0,
                 final_value=None, alpha=0.1):
        peak = _real("peak_value", peak_value, low=0.0)
        init = _real("init_value", init_value, low=0.0)
        # optax's order (init_value first) put its 0.0 init in peak_value
        optax = ("the arguments are peak_value, warmup_steps, total_steps; optax's "
                 "warmup_cosine_decay_schedule takes init_value first")
        try:
            w = _int("warmup_steps", warmup_steps, low=0)
        except TypeError as exc:
            if peak == 0.0:
                exc.args = (f"{exc.args[0]} ({optax})",)
            raise
        if peak == 0.0 and init > 0.0:
            raise ValueError(f"peak_value is 0 below init_value {init:g}: the warmup would "
                             f"fall to an lr of 0 and stay there ({optax})")
        if w == 0 and init != 0.0:
            raise ValueError(f"init_value {init:g} with warmup_steps=0: there is no warmup "
                             "for it to start (the first step's lr is the peak)")
        total = _int("total_steps", total_steps, low=w + 1)
        self._args = {"peak_value": peak, "warmup_steps": w, "total_steps": total,
                      "init_value": init, "final_value": _floor(peak, final_value, alpha)}
        decay = cosine_decay(peak, total - w, final_value=self._args["final_value"])
        self._joined = decay if w == 0 else join([linear(init, peak, w), decay], [w])

    def value(self, step):
        return self._joined.value(step)


def _frozen(spec):
    """A to_dict() spec as nested tuples, hashable."""
    if isinstance(spec, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in spec.items()))
    if isinstance(spec, list):
        return tuple(map(_frozen, spec))
    return spec


_FLOAT_MAX = 1.7976931348623157e308
_LOG_FLOAT_MAX = math.log(_FLOAT_MAX)


def _times_power(a, gamma, k):
    """``a * gamma**k``, as torch's closed forms compute it; where
    ``gamma**k`` alone overflows but the product need not (a = 0, a tiny a),
    through logarithms. OverflowError where the lr itself passes the
    largest float (the product was inf, or the logarithm's exp rounded back
    under it)."""
    try:
        value = a * gamma ** k
    except OverflowError:
        if a == 0.0:
            return 0.0
        log = math.log(a) + k * math.log(gamma)
        if log >= _LOG_FLOAT_MAX:
            raise OverflowError("the lr passes the largest float") from None
        return math.exp(log)
    if value == math.inf:
        raise OverflowError("the lr passes the largest float")
    return value


class step_decay(Schedule):
    r"""Multiply by ``gamma`` at each milestone.

    .. math::
        lr(t) = a\,\gamma^{k(t)},\quad
        k(t) = \lfloor t / s \rfloor \text{ (step\_size } s)
        \text{ or } |\{m \in \text{milestones} : m \le t\}|

    torch's ``StepLR(step_size, gamma)`` and ``MultiStepLR(milestones,
    gamma)``. Give exactly one of ``step_size`` and ``milestones``.
    """

    kind = "step_decay"

    def __init__(self, init_value, gamma, step_size=None, milestones=None):
        if (step_size is None) == (milestones is None):
            raise ValueError("give exactly one of step_size and milestones")
        args = {"init_value": _real("init_value", init_value, low=0.0),
                "gamma": _real("gamma", gamma, low=0.0)}
        if step_size is not None:
            args["step_size"] = _int("step_size", step_size, low=1)
        else:
            if not isinstance(milestones, (list, tuple)):
                raise TypeError(f"milestones must be a list of steps, got {milestones!r}")
            ms = sorted(_int(f"milestones[{i}]", m, low=1) for i, m in enumerate(milestones))
            args["milestones"] = ms
        self._args = args

    def value(self, step):
        a = self._args
        if "step_size" in a:
            k = step // a["step_size"]
        else:
            k = bisect.bisect_right(a["milestones"], step)
        return _times_power(a["init_value"], a["gamma"], k)


class exponential(Schedule):
    r"""``lr(t) = a * gamma**t`` (torch's ``ExponentialLR``, in closed form)."""

    kind = "exponential"

    def __init__(self, init_value, gamma):
        self._args = {"init_value": _real("init_value", init_value, low=0.0),
                      "gamma": _real("gamma", gamma, low=0.0)}

    def value(self, step):
        return _times_power(self._args["init_value"], self._args["gamma"], step)


def _anneal(start, end, pct, how):
    if how == "cos":
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1.0)
    return (end - start) * pct + start


class one_cycle(Schedule):
    r"""The 1cycle policy (Smith & Topin, 2018), torch's ``OneCycleLR`` formula.

    From ``a0 = max_value / div_factor`` up to ``max_value`` over the first
    ``pct_start * total_steps - 1`` steps, then down to
    ``a0 / final_div_factor`` at step ``total_steps - 1``; each phase
    anneals with ``anneal="cos"``, :math:`e + (s - e)(1 + \cos \pi p)/2`, or
    ``"linear"``, :math:`s + (e - s) p`, where ``p`` is the fraction of the
    phase done. ``three_phase=True`` goes back down to ``a0`` over a phase
    as long as the first before the final decay. Past the last step it holds
    the final value (torch raises there). Momentum is not cycled.
    """

    kind = "one_cycle"

    def __init__(self, max_value, total_steps, pct_start=0.3, anneal="cos",
                 div_factor=25.0, final_div_factor=1e4, three_phase=False):
        if anneal not in ("cos", "linear"):
            raise ValueError(f"anneal must be 'cos' or 'linear', got {anneal!r}")
        three_phase = _bool("three_phase", three_phase)     # np.bool_ too
        self._args = {"max_value": _real("max_value", max_value, low=0.0),
                      "total_steps": _int("total_steps", total_steps, low=2),
                      "pct_start": _real("pct_start", pct_start, low=0.0, low_open=True,
                                         high=1.0, high_open=True),
                      "anneal": anneal,
                      "div_factor": _real("div_factor", div_factor, low=0.0, low_open=True),
                      "final_div_factor": _real("final_div_factor", final_div_factor,
                                                low=0.0, low_open=True),
                      "three_phase": three_phase}
        a = self._args
        initial = a["max_value"] / a["div_factor"]
        final = initial / a["final_div_factor"]
        up_end = float(a["pct_start"] * a["total_steps"]) - 1
        last = float(a["total_steps"] - 1)
        if three_phase:
            self._phases = [(up_end, initial, a["max_value"]),
                            (2 * up_end, a["max_value"], initial),   # 2 * pct * n - 2
                            (last, initial, final)]
        else:
            self._phases = [(up_end, initial, a["max_value"]), (last, a["max_value"], final)]
        ends = [p[0] for p in self._phases]
        if any(e1 <= e0 for e0, e1 in zip([0.0] + ends, ends)):
            raise ValueError("one_cycle: pct_start * total_steps leaves an empty phase; "
                             "use more total_steps or another pct_start")

    def value(self, step):
        t = min(step, self._args["total_steps"] - 1)
        begin = 0.0
        for i, (end, start_lr, end_lr) in enumerate(self._phases):
            if t <= end or i == len(self._phases) - 1:
                return _anneal(start_lr, end_lr, (t - begin) / (end - begin),
                               self._args["anneal"])
            begin = end
        raise AssertionError("unreachable")


# -- schedules written as text (fastopt plot-schedule, parse_schedule) -------------------

def _literal(node):
    if isinstance(node, ast.Call):
        return _parse_call(node)
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e) for e in node.elts]
    try:
        return ast.literal_eval(node)
    except ValueError:          # "malformed node or string": arithmetic, a name
        raise ValueError(f"{ast.unparse(node)!r} is not a literal: arguments are numbers, "
                         "strings, lists or schedule calls, not expressions or names "
                         "(write 1000, not 10**3)") from None


def _parse_call(node):
    if not isinstance(node.func, ast.Name) or node.func.id not in CONSTRUCTORS:
        raise ValueError(f"unknown schedule {ast.unparse(node.func)!r}; one of "
                         f"{list(CONSTRUCTORS)}")
    args = [_literal(a) for a in node.args]
    kwargs = {k.arg: _literal(k.value) for k in node.keywords}
    make = globals()[node.func.id]
    try:        # (Python's own message named warmup_cosine.__init__())
        inspect.signature(make).bind(*args, **kwargs)
    except TypeError as exc:
        raise TypeError(f"{node.func.id}{inspect.signature(make)}: {exc}") from None
    return make(*args, **kwargs)


def parse_schedule(text: str) -> Schedule:
    """A schedule from its text: a call of a constructor with literal
    arguments (``"warmup_cosine(1e-3, 100, 1000)"``, nested calls allowed in
    :func:`join`) or the JSON of its ``to_dict()``. The text is parsed with
    :mod:`ast` (constructor names and literal values only), never evaluated.
    """
    text = text.strip()
    if text.startswith("{"):
        try:
            return from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise ValueError(f"cannot parse schedule {text!r}: {exc}") from None
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError as exc:
        raise ValueError(f"cannot parse schedule {text!r}: {exc.msg}") from None
    if not isinstance(tree, ast.Call):
        raise ValueError(f"a schedule is written as name(args...), got {text!r}")
    try:
        return _parse_call(tree)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{text!r}: {exc}") from None


def settles_at(schedule: Schedule) -> int:
    """The step after which ``schedule`` changes no more (its decay or
    transition ends), or 0 when it has no such step (constant, exponential
    without an end); step decay counts one more interval past its last
    milestone. What a plot of it should cover."""
    a = getattr(schedule, "_args", {})
    for key in ("total_steps", "decay_steps", "transition_steps"):
        if key in a:
            return a[key] + a.get("transition_begin", 0)
    if "boundaries" in a:
        return a["boundaries"][-1] + (settles_at(a["schedules"][-1]) or a["boundaries"][-1])
    if a.get("milestones"):      # (none: a constant)
        return a["milestones"][-1] * 2
    return 0
