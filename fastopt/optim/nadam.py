"""NAdam (torch.optim.NAdam's update)."""

from __future__ import annotations

from .. import _validate as V
from ..backends.scalars import nadam_scalars
from .base import BETAS, FLAG, NONNEG, Optimizer, POSITIVE


class NAdam(Optimizer):
    r"""NAdam (Dozat 2016) with torch.optim.NAdam's exact update.

    .. math::
        g_t &\leftarrow \pm g_t + \lambda \theta_{t-1} \text{ (L2)},\quad
            \theta_{t-1} \leftarrow \theta_{t-1}(1 - \eta\lambda) \text{ (decoupled)} \\
        \mu_t &= \beta_1 \left(1 - \tfrac12\, 0.96^{t\,\psi}\right)
            \quad (\psi = \text{momentum\_decay}) \\
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,\quad
        d_t = \sqrt{v_t / (1-\beta_2^t)} + \epsilon \\
        \theta_t &= \theta_{t-1}
            - \frac{\eta (1-\mu_t)}{1 - \prod_{i\le t}\mu_i} \frac{g_t}{d_t}
            - \frac{\eta\, \mu_{t+1}}{1 - \prod_{i\le t+1}\mu_i} \frac{m_t}{d_t}

    State (torch's names): ``exp_avg``, ``exp_avg_sq`` (flat buffers over the
    group) and ``mu_product``, the running product of the mu's. torch keeps
    one per param; it is the same for every element of a group, so here it
    is one float64 per group, ``state[i]["mu_product"]``, multiplied on the
    host as torch does (so a change of ``betas`` or ``momentum_decay``
    mid-run is followed as there). It is updated only once a step has run
    (a skipped or refused step leaves it), and checkpoints carry it:
    ``state_dict()["state"][i]["mu_product"]``.
    """

    _state_names = ("exp_avg", "exp_avg_sq")
    _nonnegative_state = ("exp_avg_sq",)

    def __init__(self, params=None, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 momentum_decay=4e-3, decoupled_weight_decay=False, maximize=False, *,
                 backend="auto", max_grad_norm=None, **options):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        momentum_decay=momentum_decay,
                        decoupled_weight_decay=decoupled_weight_decay, maximize=maximize)
        super().__init__(params, defaults, backend=backend, max_grad_norm=max_grad_norm,
                         **options)

    # torch's checks: lr, eps, weight_decay, momentum_decay >= 0, 0 <= beta < 1
    _hypers = dict(lr=NONNEG, eps=POSITIVE, weight_decay=NONNEG, momentum_decay=NONNEG, betas=BETAS,
                   decoupled_weight_decay=FLAG, maximize=FLAG)

    def _required_state(self, hypers, step):
        return {"exp_avg", "exp_avg_sq"} if step else set()

    def _element_step(self, h, state):
        s = nadam_scalars(lr=h["lr"], beta1=h["betas"][0], beta2=h["betas"][1], eps=h["eps"],
                          weight_decay=h["weight_decay"], momentum_decay=h["momentum_decay"],
                          decoupled=h["decoupled_weight_decay"], step=state["step"] + 1,
                          mu_product=state.get("mu_product", 1.0), maximize=h["maximize"])
        # kept by _finish_step once the step has run (every group's
        # _element_step runs before it, so a pending value is this step's)
        state["mu_product_pending"] = s.mu_product
        return s, ("exp_avg", "exp_avg_sq")

    def _finish_step(self, skip, norm, hypers):
        for gi, st in enumerate(self.state):
            # (a frozen group's pending value is an earlier try's: a step's
            # plan makes every group's element step before it can read the
            # gradients, and gives the step to the full path if it cannot)
            new = st.pop("mu_product_pending", None)
            if new is not None and not skip and gi not in self._frozen_now:
                st["mu_product"] = new
        return super()._finish_step(skip, norm, hypers)

    # -- checkpoints: the per-group product next to the step count ------------------

    def _state_dict(self) -> dict:
        sd = super()._state_dict()
        for st, entry in zip(self.state, sd["state"]):
            entry["mu_product"] = float(st.get("mu_product", 1.0))
        return sd

    def _prepare_load(self, sd):
        apply = super()._prepare_load(sd)      # everything else checked first
        sd = self._in_group_order(sd)          # (as the base read it)
        products = []
        for gi, st in enumerate(sd["state"]):
            if "mu_product" in st:
                products.append(V.check_real(f"checkpoint state[{gi}]['mu_product']",
                                             st["mu_product"], low=0.0, high=1.0))
            elif st["step"] == 0:
                products.append(1.0)
            else:
                raise ValueError(f"checkpoint: state[{gi}] is missing keys ['mu_product'] "
                                 "(NAdam's running product of the momentum schedule)")

        def apply_all():
            apply()
            for st, prod in zip(self.state, products):
                st["mu_product"] = prod
        return apply_all
