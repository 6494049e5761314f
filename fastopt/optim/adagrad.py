"""Adagrad (torch.optim.Adagrad's update)."""

from __future__ import annotations

import numpy as np

from .. import _validate as V
from ..backends.scalars import adagrad_scalars
from .base import FLAG, NONNEG, Optimizer


_TINY = float(np.finfo(np.float32).tiny)


class Adagrad(Optimizer):
    r"""Adagrad with torch.optim.Adagrad's exact update.

    .. math::
        g_t &\leftarrow \pm g_t + \lambda \theta_{t-1} \\
        S_t &= S_{t-1} + g_t^2 \quad (S_0 = \text{initial\_accumulator\_value}) \\
        \theta_t &= \theta_{t-1} - \frac{\eta}{1 + (t-1)\,\eta_{decay}}
            \frac{g_t}{\sqrt{S_t} + \epsilon}

    State (torch's name): ``sum``. Like every state buffer here it is
    allocated zeroed, before anything is written, at the group's first
    step; that step's kernels start the sum from
    ``initial_accumulator_value`` instead of reading the buffer (flag
    ``F_INITIAL``), so the value torch fills it with is there after the
    first step and nothing is written before the step's checks are done.
    A step skipped for a non-finite gradient drops the new buffer, so the
    next step is the first again.
    """

    _state_names = ("sum",)
    _nonnegative_state = ("sum",)

    def __init__(self, params=None, lr=1e-2, lr_decay=0, weight_decay=0,
                 initial_accumulator_value=0, eps=1e-10, maximize=False, *,
                 backend="auto", max_grad_norm=None, **options):
        defaults = dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                        initial_accumulator_value=initial_accumulator_value, eps=eps,
                        maximize=maximize)
        super().__init__(params, defaults, backend=backend, max_grad_norm=max_grad_norm,
                         **options)

    # torch's checks: every real >= 0; and eps > 0 where the sum starts at 0
    # (see _check_hypers)
    _hypers = dict(lr=NONNEG, lr_decay=NONNEG, weight_decay=NONNEG,
                   initial_accumulator_value=NONNEG, eps=NONNEG, maximize=FLAG)

    def _check_hypers(self, group, where=""):
        h = super()._check_hypers(group, where)
        # (float32's smallest normal: a smaller start rounds to 0 in float32 state)
        if h["eps"] == 0 and h["initial_accumulator_value"] < _TINY:
            raise ValueError(f"{V.key(where, 'eps')} must be > 0 when "
                             "initial_accumulator_value is 0 (or below 1.2e-38), got 0.0: "
                             f"{V.EPS_WHY}")
        return h

    def _required_state(self, hypers, step):
        return {"sum"} if step else set()

    def _element_step(self, h, state):
        # no "sum" yet: the base class allocates it zeroed for this step,
        # whose kernels start from initial_accumulator_value instead
        first = "sum" not in state["flat"]
        s = adagrad_scalars(lr=h["lr"], lr_decay=h["lr_decay"], eps=h["eps"],
                            weight_decay=h["weight_decay"],
                            initial_accumulator_value=h["initial_accumulator_value"],
                            step=state["step"] + 1, first_step=first,
                            maximize=h["maximize"])
        return s, ("sum",)
