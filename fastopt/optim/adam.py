"""Adam and AdamW (one kernel; AdamW is Adam with decoupled weight decay)."""

from __future__ import annotations

from ..backends.scalars import adam_scalars, adam_stepper
from .base import BETAS, FLAG, NONNEG, Optimizer, POSITIVE


class Adam(Optimizer):
    r"""Adam (Kingma & Ba, 2015) with torch.optim.Adam's exact update.

    .. math::
        g_t &\leftarrow \pm g_t + \lambda \theta_{t-1} \\
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
        \hat v_t &= \max(\hat v_{t-1}, v_t) \text{ if amsgrad else } v_t \\
        \theta_t &= \theta_{t-1} - \frac{\eta}{1-\beta_1^t}
            \frac{m_t}{\sqrt{\hat v_t}/\sqrt{1-\beta_2^t} + \epsilon}

    ``weight_decay`` here is L2 added to the gradient; see :class:`AdamW`
    for decoupled decay. ``max_grad_norm`` clips the global gradient norm
    inside the step (torch's ``clip_grad_norm_`` coefficient).
    """

    _decoupled = False
    #: Keras's Adam adds its epsilon elsewhere: said where its name is given
    _KERAS_EPSILON = ("Keras's name for eps; mind that Keras's Adam adds it to the square root "
                      "of the uncorrected v (default 1e-7), torch and fastopt to that of the "
                      "bias-corrected v (default 1e-8): the steps differ where v is small")
    _option_hints = {"decoupled_weight_decay": "fastopt.AdamW is Adam with decoupled weight "
                                               "decay (torch's Adam(decoupled_weight_decay=True))",
                     "epsilon": _KERAS_EPSILON}
    _state_names = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    _nonnegative_state = ("exp_avg_sq", "max_exp_avg_sq")

    def _required_state(self, hypers, step):
        return {"exp_avg", "exp_avg_sq"} if step else set()

    def __init__(self, params=None, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0.0, amsgrad=False, maximize=False, *,
                 backend="auto", max_grad_norm=None, **options):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, maximize=maximize)
        super().__init__(params, defaults, backend=backend, max_grad_norm=max_grad_norm,
                         **options)

    _hypers = dict(lr=NONNEG, betas=BETAS, eps=POSITIVE, weight_decay=NONNEG, amsgrad=FLAG,
                   maximize=FLAG)

    def _element_step(self, h, state):
        s = adam_scalars(lr=h["lr"], beta1=h["betas"][0], beta2=h["betas"][1], eps=h["eps"],
                         weight_decay=h["weight_decay"], decoupled=self._decoupled,
                         step=state["step"] + 1, maximize=h["maximize"])
        return s, ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if h["amsgrad"] else ())

    def _plan_element(self, h, state, names, make):
        if type(self)._element_step is not Adam._element_step:     # a subclass's own math
            return super()._plan_element(h, state, names, make)
        # the buffers follow from amsgrad alone; only the bias terms change
        el = make(self._element_step(h, state)[0], len(names))
        return el, adam_stepper(float(h["lr"]), float(h["betas"][0]), float(h["betas"][1]),
                                state, el.values[2:])

    def _plan_lr(self, fixed, h, state):
        if type(self)._element_step is not Adam._element_step:
            return None
        # lr sits in the bias terms and AdamW's decay only (adam_scalars' own
        # expressions, so the values are those a full rebuild would make)
        lr, rest = float(h["lr"]), fixed.values[2:]
        if self._decoupled:
            rest = rest[:-1] + (1.0 - lr * float(h["weight_decay"]),)
        return adam_stepper(lr, float(h["betas"][0]), float(h["betas"][1]), state, rest)


class AdamW(Adam):
    r"""AdamW (Loshchilov & Hutter, 2019): Adam with decoupled weight decay,
    ``theta <- theta * (1 - lr * weight_decay)`` before the Adam update,
    exactly as torch.optim.AdamW."""

    _decoupled = True
    _option_hints = {"decoupled_weight_decay": "AdamW's weight decay is always decoupled "
                                               "(fastopt.Adam's is L2, added to the gradient)",
                     "epsilon": Adam._KERAS_EPSILON}

    def __init__(self, params=None, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=1e-2, amsgrad=False, maximize=False, *,
                 backend="auto", max_grad_norm=None, **options):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, maximize=maximize, backend=backend,
                         max_grad_norm=max_grad_norm, **options)
