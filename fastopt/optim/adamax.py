"""Adamax (torch.optim.Adamax's update)."""

from __future__ import annotations

from ..backends.scalars import adamax_scalars
from .base import BETAS, FLAG, NONNEG, Optimizer, POSITIVE


class Adamax(Optimizer):
    r"""Adamax (Kingma & Ba 2015, section 7.1) with torch.optim.Adamax's exact update.

    .. math::
        g_t &\leftarrow \pm g_t + \lambda \theta_{t-1} \\
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t \\
        u_t &= \max(\beta_2 u_{t-1}, |g_t| + \epsilon) \\
        \theta_t &= \theta_{t-1} - \frac{\eta}{1-\beta_1^t} \frac{m_t}{u_t}

    (``eps`` inside the max, as torch computes it; a NaN gradient propagates
    through the max, as torch.maximum's does). State (torch's names):
    ``exp_avg``, ``exp_inf``.
    """

    _state_names = ("exp_avg", "exp_inf")
    _nonnegative_state = ("exp_inf",)

    def __init__(self, params=None, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 maximize=False, *, backend="auto", max_grad_norm=None, **options):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        maximize=maximize)
        super().__init__(params, defaults, backend=backend, max_grad_norm=max_grad_norm,
                         **options)

    # torch's checks: lr, eps, weight_decay >= 0, 0 <= beta < 1
    _hypers = dict(lr=NONNEG, betas=BETAS, eps=POSITIVE, weight_decay=NONNEG, maximize=FLAG)

    def _required_state(self, hypers, step):
        return {"exp_avg", "exp_inf"} if step else set()

    def _element_step(self, h, state):
        s = adamax_scalars(lr=h["lr"], beta1=h["betas"][0], beta2=h["betas"][1], eps=h["eps"],
                           weight_decay=h["weight_decay"], step=state["step"] + 1,
                           maximize=h["maximize"])
        return s, ("exp_avg", "exp_inf")
