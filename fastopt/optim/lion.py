"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms")."""

from __future__ import annotations

from ..backends.scalars import lion_scalars
from .base import BETAS, FLAG, NONNEG, Optimizer


class Lion(Optimizer):
    r"""Lion, Algorithm 2 of Chen et al. (2023), with decoupled weight decay.

    .. math::
        c_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t \\
        \theta_t &= \theta_{t-1} (1 - \eta\lambda) - \eta\, \mathrm{sign}(c_t) \\
        m_t &= \beta_2 m_{t-1} + (1-\beta_2) g_t

    with ``sign(0) = 0``; a NaN gradient gives NaN weights (never a silent
    zero step). ``maximize`` negates the gradient. State: ``exp_avg``.
    Lion's steps all have size ``lr``: use a learning rate 3-10x smaller
    than AdamW's and a weight decay 3-10x larger (the paper's advice).
    """

    _state_names = ("exp_avg",)
    _nonnegative_state = ()

    def __init__(self, params=None, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0,
                 maximize=False, *, backend="auto", max_grad_norm=None, **options):
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize)
        super().__init__(params, defaults, backend=backend, max_grad_norm=max_grad_norm,
                         **options)

    _hypers = dict(lr=NONNEG, betas=BETAS, weight_decay=NONNEG, maximize=FLAG)

    def _required_state(self, hypers, step):
        return {"exp_avg"} if step else set()

    def _element_step(self, h, state):
        s = lion_scalars(lr=h["lr"], beta1=h["betas"][0], beta2=h["betas"][1],
                         weight_decay=h["weight_decay"], maximize=h["maximize"])
        return s, ("exp_avg",)

    # the scalars follow from the hyperparameters alone: the step
    # plan may reuse them (Optimizer._plan_element)
    _step_free_element_step = _element_step
