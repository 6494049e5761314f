"""RMSprop (torch.optim.RMSprop's update)."""

from __future__ import annotations

from .. import _validate as V
from ..backends.scalars import rmsprop_scalars
from .base import FLAG, NONNEG, Optimizer, POSITIVE


class RMSprop(Optimizer):
    r"""RMSprop with torch.optim.RMSprop's exact update.

    .. math::
        g_t &\leftarrow \pm g_t + \lambda \theta_{t-1} \\
        v_t &= \alpha v_{t-1} + (1-\alpha) g_t^2 \\
        \bar g_t &= \alpha \bar g_{t-1} + (1-\alpha) g_t,\quad
            \tilde v_t = v_t - \bar g_t^2 \text{ if centered else } v_t \\
        b_t &= \mu b_{t-1} + g_t / (\sqrt{\tilde v_t} + \epsilon),\quad
            \theta_t = \theta_{t-1} - \eta b_t \text{ if } \mu > 0 \\
        \theta_t &= \theta_{t-1} - \eta\, g_t / (\sqrt{\tilde v_t} + \epsilon)
            \text{ otherwise}

    State (torch's names): ``square_avg``, ``grad_avg`` (centered),
    ``momentum_buffer`` (momentum > 0).
    """

    _state_names = ("square_avg", "grad_avg", "momentum_buffer")
    _nonnegative_state = ("square_avg",)

    def __init__(self, params=None, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0,
                 momentum=0, centered=False, maximize=False, *, backend="auto",
                 max_grad_norm=None, **options):
        defaults = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                        momentum=momentum, centered=centered, maximize=maximize)
        super().__init__(params, defaults, backend=backend, max_grad_norm=max_grad_norm,
                         **options)

    # torch's checks: every real >= 0, but eps > 0 (V.EPS_WHY; torch takes 0), and
    # alpha <= 1, which torch does not check (see _check_hypers)
    _hypers = dict(lr=NONNEG, alpha=NONNEG, eps=POSITIVE, weight_decay=NONNEG, momentum=NONNEG,
                   centered=FLAG, maximize=FLAG)

    def _check_hypers(self, group, where=""):
        h = super()._check_hypers(group, where)
        if h["alpha"] > 1:
            raise ValueError(
                f"{V.key(where, 'alpha')} must be <= 1, got {h['alpha']!r}: the squared "
                "average alpha * v + (1 - alpha) * g**2 goes negative and the step is NaN "
                "(torch accepts it)")
        if h["centered"] and self._state_format.compact:
            raise ValueError(
                f"{where or 'RMSprop'}: centered=True with state_dtype="
                f"{self._state_format.name!r} is refused: the step takes sqrt(square_avg - "
                "grad_avg**2), and rounding both can make the difference negative (a NaN "
                "step); use centered=False or state_dtype='float32'")
        return h

    @staticmethod
    def _buffers(h) -> tuple:
        """The state buffers the step reads, in kernel order."""
        return (("square_avg",) + (("grad_avg",) if h["centered"] else ())
                + (("momentum_buffer",) if h["momentum"] > 0 else ()))

    def _required_state(self, hypers, step):
        return set(self._buffers(hypers)) if step else set()

    def _element_step(self, h, state):
        s = rmsprop_scalars(lr=h["lr"], alpha=h["alpha"], eps=h["eps"],
                            weight_decay=h["weight_decay"], momentum=h["momentum"],
                            centered=h["centered"], maximize=h["maximize"])
        return s, self._buffers(h)

    # the scalars follow from the hyperparameters alone: the step
    # plan may reuse them (Optimizer._plan_element)
    _step_free_element_step = _element_step
