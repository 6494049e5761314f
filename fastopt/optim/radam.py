"""RAdam (torch.optim.RAdam's update)."""

from __future__ import annotations

from ..backends.scalars import radam_scalars
from .base import BETAS, FLAG, NONNEG, Optimizer, POSITIVE


class RAdam(Optimizer):
    r"""RAdam (Liu et al. 2020) with torch.optim.RAdam's exact update.

    .. math::
        g_t &\leftarrow \pm g_t + \lambda \theta_{t-1} \text{ (L2)},\quad
            \theta_{t-1} \leftarrow \theta_{t-1}(1 - \eta\lambda) \text{ (decoupled)} \\
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
        \rho_\infty &= \frac{2}{1-\beta_2} - 1,\quad
        \rho_t = \rho_\infty - \frac{2 t \beta_2^t}{1-\beta_2^t} \\
        \theta_t &= \theta_{t-1} - \frac{\eta}{1-\beta_1^t}\, r_t \sqrt{1-\beta_2^t}\,
            \frac{m_t}{\sqrt{v_t} + \epsilon} \text{ if } \rho_t > 5,\quad
            r_t = \sqrt{\frac{(\rho_t-4)(\rho_t-2)\rho_\infty}
                             {(\rho_\infty-4)(\rho_\infty-2)\rho_t}} \\
        \theta_t &= \theta_{t-1} - \frac{\eta}{1-\beta_1^t} m_t \text{ otherwise}

    rho_t, r_t and the switch depend only on the step: they are host
    scalars and a flag. State (torch's names): ``exp_avg``, ``exp_avg_sq``.
    """

    _state_names = ("exp_avg", "exp_avg_sq")
    _nonnegative_state = ("exp_avg_sq",)

    def __init__(self, params=None, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 decoupled_weight_decay=False, maximize=False, *, backend="auto",
                 max_grad_norm=None, **options):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        decoupled_weight_decay=decoupled_weight_decay, maximize=maximize)
        super().__init__(params, defaults, backend=backend, max_grad_norm=max_grad_norm,
                         **options)

    # torch's checks: lr, eps, weight_decay >= 0, 0 <= beta < 1
    _hypers = dict(lr=NONNEG, betas=BETAS, eps=POSITIVE, weight_decay=NONNEG,
                   decoupled_weight_decay=FLAG, maximize=FLAG)

    def _required_state(self, hypers, step):
        return {"exp_avg", "exp_avg_sq"} if step else set()

    def _element_step(self, h, state):
        s = radam_scalars(lr=h["lr"], beta1=h["betas"][0], beta2=h["betas"][1], eps=h["eps"],
                          weight_decay=h["weight_decay"],
                          decoupled=h["decoupled_weight_decay"], step=state["step"] + 1,
                          maximize=h["maximize"])
        return s, ("exp_avg", "exp_avg_sq")
