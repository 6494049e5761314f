"""Stochastic gradient descent with momentum, dampening and Nesterov."""

from __future__ import annotations

from ..backends.scalars import sgd_scalars
from .base import FLAG, NONNEG, Optimizer, REAL


class SGD(Optimizer):
    r"""SGD with torch.optim.SGD's exact update.

    .. math::
        g_t &\leftarrow \pm g_t + \lambda \theta_{t-1} \\
        b_t &= \mu b_{t-1} + (1-\tau) g_t \quad (b_1 = g_1) \\
        d_t &= g_t + \mu b_t \text{ if nesterov else } b_t \\
        \theta_t &= \theta_{t-1} - \eta d_t

    With ``momentum=0`` no buffer is kept and ``d_t = g_t``.
    """

    def __init__(self, params=None, lr=1e-3, momentum=0.0, dampening=0.0, nesterov=False,
                 weight_decay=0.0, maximize=False, *, backend="auto",
                 max_grad_norm=None, **options):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening,
                        nesterov=nesterov, weight_decay=weight_decay, maximize=maximize)
        super().__init__(params, defaults, backend=backend, max_grad_norm=max_grad_norm,
                         **options)

    _state_names = ("momentum_buffer",)
    _nonnegative_state = ()

    _hypers = dict(lr=NONNEG, momentum=NONNEG, dampening=REAL, nesterov=FLAG, weight_decay=NONNEG,
                   maximize=FLAG)

    def _check_hypers(self, group, where=""):
        h = super()._check_hypers(group, where)
        if h["nesterov"] and (h["momentum"] <= 0 or h["dampening"] != 0):
            raise ValueError(f"{where or 'SGD'}: nesterov needs momentum > 0 and dampening == 0, "
                             f"got momentum={h['momentum']}, dampening={h['dampening']}")
        return h

    def _element_step(self, h, state):
        has_momentum = h["momentum"] != 0.0
        # torch starts each momentum buffer as a copy of the first gradient.
        first = has_momentum and "momentum_buffer" not in state["flat"]
        s = sgd_scalars(lr=h["lr"], momentum=h["momentum"], dampening=h["dampening"],
                        nesterov=h["nesterov"], weight_decay=h["weight_decay"],
                        first_step=first, maximize=h["maximize"])
        return s, ("momentum_buffer",) if has_momentum else ()

    # the scalars follow from the hyperparameters alone (and, on the first
    # step, from whether the buffer exists): the step plan may reuse them
    # (Optimizer._plan_element)
    _step_free_element_step = _element_step

    def _plan_lr(self, fixed, h, state):
        if type(self)._element_step is not SGD._element_step:
            return None
        values = (float(h["lr"]),) + fixed.values[1:]     # sgd_element's: lr first
        return lambda: values
