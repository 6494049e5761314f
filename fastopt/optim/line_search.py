r"""The strong Wolfe line search of L-BFGS (Nocedal & Wright, *Numerical
Optimization*, 2nd ed., Algorithms 3.5 and 3.6), with safeguarded cubic
interpolation (eq. 3.59) for the trial steps.

Along a direction :math:`d` from :math:`x`, with :math:`\phi(t) = f(x + t d)`,
a step :math:`t` is accepted when

.. math::
    \phi(t) \le \phi(0) + c_1 t \phi'(0) \quad\text{and}\quad
    |\phi'(t)| \le -c_2 \phi'(0).

Bracketing (Alg. 3.5) grows the step by interpolation, within
``[t + 0.01 (t - t_prev), 10 t]``, until an interval is known to hold an
acceptable step; zoom (Alg. 3.6) shrinks it, keeping each trial at least a
tenth of the interval from its ends when the previous trial was already
that close (torch.optim.LBFGS's safeguards and constants, so the two
take the same steps). Pure Python on scalars: the vectors are the caller's.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np


class Trial(NamedTuple):
    """One evaluated step: ``t``, :math:`\\phi(t)`, the gradient there, :math:`\\phi'(t)`."""
    t: float
    f: float
    g: object
    gtd: float


def cubic_minimizer(a: Trial, b: Trial, low=None, high=None) -> float:
    """The minimizer of the cubic through ``(t, f, gtd)`` of ``a`` and ``b``
    (N&W eq. 3.59), clamped to ``[low, high]`` (default: between the two);
    the middle of that interval when the cubic has no minimizer."""
    if low is None:
        low, high = (a.t, b.t) if a.t <= b.t else (b.t, a.t)
    with np.errstate(divide="ignore", invalid="ignore"):     # a.t == b.t: inf/NaN as IEEE says
        secant = float(np.float64(3 * (a.f - b.f)) / np.float64(a.t - b.t))
    d1 = a.gtd + b.gtd - secant
    disc = d1 * d1 - a.gtd * b.gtd
    if not disc >= 0:          # NaN too
        return (low + high) / 2.0
    d2 = math.sqrt(disc)
    near, far = (a, b) if a.t <= b.t else (b, a)    # the formula from the right-hand point
    # divided as torch divides tensors: an exactly linear stretch (a zero
    # denominator) gives an infinite step, which the bounds then clamp
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = float(np.float64(far.gtd + d2 - d1) / np.float64(far.gtd - near.gtd + 2 * d2))
    t = far.t - (far.t - near.t) * ratio
    if math.isnan(t):      # an infinite loss or slope at an end (torch: a NaN step)
        return (low + high) / 2.0
    return min(max(t, low), high)


def _lower_end(bracket) -> int:
    """Which end of the bracket has the lower loss (a NaN loss is the
    higher: torch's comparison made it the lower, and the search ended
    there or raised an IndexError)."""
    a, b = bracket[0].f, bracket[-1].f
    return 0 if a <= b or math.isnan(b) else 1


def strong_wolfe(evaluate, t, start: Trial, d_max, *, c1=1e-4, c2=0.9,
                 tolerance_change=1e-9, max_ls=25):
    """A step along the direction satisfying the strong Wolfe conditions.

    ``evaluate(t) -> Trial`` at ``x + t d``; ``start`` the trial at 0;
    ``d_max`` the direction's largest magnitude (the interval is too small
    once ``|t1 - t0| * d_max < tolerance_change``); at most ``max_ls``
    evaluations after the first. Returns ``(trial, evaluations)``, the
    trial at the accepted (or best found) step.
    """
    f0, gtd0 = start.f, start.gtd

    def sufficient_decrease(trial):
        # (a NaN loss is no decrease: the step shrinks, as for an infinite one)
        return trial.f <= f0 + c1 * trial.t * gtd0

    def curvature(trial):
        return abs(trial.gtd) <= -c2 * gtd0

    new = evaluate(t)
    evals, it = 1, 0
    prev = start._replace(t=0)
    bracket, done = None, False
    # -- bracketing (Alg. 3.5) ---------------------------------------------------------
    while it < max_ls:
        if not sufficient_decrease(new) or (it > 1 and new.f >= prev.f):
            bracket = [prev, new]
            break
        if curvature(new):
            bracket, done = [new], True
            break
        if new.gtd >= 0:
            bracket = [prev, new]
            break
        t = cubic_minimizer(prev, new, new.t + 0.01 * (new.t - prev.t), new.t * 10)
        prev, new = new, evaluate(t)
        evals += 1
        it += 1
    if bracket is None:        # out of evaluations: the best of the start and the last
        bracket = [start._replace(t=0), new]
    # -- zoom (Alg. 3.6) -------------------------------------------------------------------
    low = _lower_end(bracket)
    insufficient = False
    while not done and it < max_ls:
        a, b = bracket
        if abs(b.t - a.t) * d_max < tolerance_change:
            break
        t = cubic_minimizer(a, b)
        lo, hi = min(a.t, b.t), max(a.t, b.t)
        eps = 0.1 * (hi - lo)
        if min(hi - t, t - lo) < eps:         # next to an end of the interval
            if insufficient or t >= hi or t <= lo:
                t = hi - eps if abs(t - hi) < abs(t - lo) else lo + eps
                insufficient = False
            else:
                insufficient = True
        else:
            insufficient = False
        new = evaluate(t)
        evals += 1
        it += 1
        high = 1 - low
        if not sufficient_decrease(new) or new.f >= bracket[low].f:
            bracket[high] = new
            low = _lower_end(bracket)
        else:
            if curvature(new):
                done = True
            elif new.gtd * (bracket[high].t - bracket[low].t) >= 0:
                bracket[high] = bracket[low]     # the old low end becomes the high end
            bracket[low] = new
    return bracket[low], evals
