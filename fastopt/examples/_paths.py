"""Iterates of a fastopt optimizer on a small test function, as a user writes the loop.

The parameters are one NumPy array ``p`` (a point in the plane, say), held
in a plain list by the optimizer; each step computes the gradient at ``p``
and hands it over. :func:`trajectory` records ``p`` after every step and
stops early when asked.
"""

from __future__ import annotations

import numpy as np


def gradient_step(opt, p, grad, noise=None):
    """One first-order step: ``opt.step([grad(p) (+ noise())])``, as a closure."""
    g = np.empty_like(p)

    def advance():
        g[:] = grad(p)
        if noise is not None:
            np.add(g, noise(), out=g)
        opt.step([g])
    return advance


def sam_step(sam, p, grad):
    """One SAM step as a closure: the gradient at ``p``, ``sam.perturb`` (``p``
    moves to the worst nearby point), the gradient there, ``sam.step`` (``p``
    moves back, then the base optimizer steps with that second gradient)."""
    g = np.empty_like(p)

    def advance():
        g[:] = grad(p)
        sam.perturb([g])
        g[:] = grad(p)
        sam.step([g])
    return advance


def closure_step(opt, p, loss, grad):
    """One step of an optimizer that evaluates the function itself (L-BFGS):
    ``opt.step(closure)``, the closure returning ``(loss, [gradient])`` at ``p``."""
    def advance():
        opt.step(lambda: (loss(*p), [grad(p)]))
    return advance


def step_for(opt, p, loss, grad):
    """The step closure ``opt`` takes: :func:`sam_step` for a ``fastopt.SAM``,
    :func:`closure_step` for one stepped with a closure (L-BFGS),
    :func:`gradient_step` for the rest."""
    from ..optim.sam import SAM

    if isinstance(opt, SAM):
        return sam_step(opt, p, grad)
    if getattr(opt, "steps_with_closure", False):
        return closure_step(opt, p, loss, grad)
    return gradient_step(opt, p, grad)


def trajectory(p, advance, steps, stop=None):
    """Call ``advance()`` (which updates ``p`` in place) up to ``steps`` times.

    Returns ``(path [n + 1, dim], stopped)``: ``p`` before and after every
    step, and the first step after which ``stop(p)`` was true (``None``:
    it never was; the run then has all ``steps`` steps).
    """
    path = [p.copy()]
    for step in range(1, steps + 1):
        advance()
        path.append(p.copy())
        if stop is not None and stop(p):
            return np.array(path), step
    return np.array(path), None


def first_below(values, level):
    """First index whose value is below ``level``, or None."""
    hit = np.nonzero(np.asarray(values) < level)[0]
    return int(hit[0]) if hit.size else None
