"""LAMB (You et al. 2020, "Large Batch Optimization for Deep Learning:
Training BERT in 76 minutes")."""

from __future__ import annotations

from ..backends.scalars import lamb_scalars
from .base import BETAS, FLAG, NONNEG, POSITIVE, Optimizer


class LAMB(Optimizer):
    r"""LAMB, Algorithm 2 of You et al. (2020): Adam's direction with
    decoupled weight decay, scaled per tensor by the trust ratio.

    .. math::
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
        r_t &= \frac{m_t / (1-\beta_1^t)}{\sqrt{v_t / (1-\beta_2^t)} + \epsilon}
            + \lambda \theta_{t-1} \\
        \theta_t &= \theta_{t-1} - \eta\,
            \frac{\lVert \theta_{t-1} \rVert}{\lVert r_t \rVert}\, r_t

    per tensor (each param array; each view of a packed buffer), with the
    trust ratio 1 where either norm is 0 (a zero-initialised bias moves as
    Adam would) and the paper's scaling function the identity.
    ``bias_correction=False`` drops the two divisors. ``maximize`` negates
    the gradient. A NaN gradient gives NaN norms and so NaN weights in its
    whole tensor: never a silently skipped step (use ``skip_nonfinite``).
    State: ``exp_avg``, ``exp_avg_sq``.

    Defaults: Algorithm 2 leaves beta1, beta2 and epsilon as inputs; betas
    (0.9, 0.999) and eps 1e-6 are those of the implementations that
    accompanied the paper's BERT runs and most since (NVIDIA's apex
    FusedLAMB, TensorFlow Addons' LAMB); lr 1e-3 and bias correction on as
    there; weight_decay 0 (off unless asked, as TensorFlow Addons'; apex
    defaults to 0.01).

    The step is one native call per param group: a first pass updates the
    moments and sums ``theta^2`` and ``r^2`` per tensor (float64, in a fixed
    order: serial and threaded steps are bit-identical), a second writes
    the weights. On device arrays (the ``cuda`` backend) the same two
    passes are kernels, with the per-tensor factors made between them by a
    third, small one: per-piece sums added in a fixed tree order, so the
    result does not depend on the launch's grid.
    """

    _state_names = ("exp_avg", "exp_avg_sq")
    # no compact state (state_dtype): phase one sums r of the moments before
    # rounding, phase two would recompute r from the rounded stored moments
    _no_compact_state = ("its two-phase step recomputes each update from the stored moments "
                         "after summing its norms, so rounded state would make the trust "
                         "ratio's norms disagree with the update.")

    def __init__(self, params=None, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0,
                 bias_correction=True, maximize=False, *, backend="auto", max_grad_norm=None,
                 **options):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, maximize=maximize)
        super().__init__(params, defaults, backend=backend, max_grad_norm=max_grad_norm,
                         **options)

    _hypers = dict(lr=NONNEG, betas=BETAS, eps=POSITIVE, weight_decay=NONNEG,
                   bias_correction=FLAG, maximize=FLAG)

    def _required_state(self, hypers, step):
        return {"exp_avg", "exp_avg_sq"} if step else set()

    def _element_step(self, h, state):
        s = lamb_scalars(lr=h["lr"], beta1=h["betas"][0], beta2=h["betas"][1], eps=h["eps"],
                         weight_decay=h["weight_decay"], bias_correction=h["bias_correction"],
                         step=state["step"] + 1, maximize=h["maximize"])
        return s, ("exp_avg", "exp_avg_sq")
