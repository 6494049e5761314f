"""Per-step scalars, computed once on the host in float64.

Whether amsgrad or momentum is on is told by the state array itself
(``vmax`` / ``buf`` is None when off), not by a flag here.

Every backend receives the same tuples and casts each value to the array
dtype before its element loop, so the per-element math runs in the array's
own precision (a float64 scalar inside a float32 loop would silently promote
the whole loop and halve its speed).
"""

from __future__ import annotations

import math
from typing import NamedTuple


# A NamedTuple built through tuple.__new__ skips its Python-level __new__
# (0.2-0.3 us per tuple): Adam's and SGD's tuples are built this way, being
# part of every step's fixed cost. The fields are given positionally, all of them.
_build = tuple.__new__


class AdamScalars(NamedTuple):
    step_size: float        # lr / (1 - beta1**t)
    bc2_sqrt: float         # sqrt(1 - beta2**t)
    beta1: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    eps: float
    l2: float               # Adam's L2 term added to the gradient
    decay: float            # AdamW's decoupled decay factor 1 - lr*wd
    grad_scale: float       # clip coefficient, negated for maximize
    use_l2: bool


class SGDScalars(NamedTuple):
    lr: float
    l2: float
    grad_scale: float
    buf_decay: float        # momentum, or 0 on the first step (buf = g)
    grad_coef: float        # 1 - dampening, or 1 on the first step
    momentum: float         # nesterov look-ahead weight
    use_l2: bool
    nesterov: bool


def adam_scalars(*, lr, beta1, beta2, eps, weight_decay, decoupled, step,
                 grad_scale=1.0, maximize=False) -> AdamScalars:
    """Scalars for Adam (``decoupled=False``) or AdamW at 1-based ``step``."""
    lr, beta1, beta2 = float(lr), float(beta1), float(beta2)
    weight_decay, grad_scale = float(weight_decay), float(grad_scale)
    l2 = 0.0 if decoupled else weight_decay
    return _build(AdamScalars, adam_bias(lr, beta1, beta2, step) + (
        beta1, 1.0 - beta1, beta2, 1.0 - beta2,
        float(eps),
        l2,
        1.0 - lr * weight_decay if decoupled else 1.0,     # decay
        -grad_scale if maximize else grad_scale,
        l2 != 0.0,                                         # use_l2
    ))


def adam_bias(lr, beta1, beta2, step) -> tuple:
    """``(step_size, bc2_sqrt)``: the only Adam scalars that change from one
    step to the next (floats in, 1-based ``step``)."""
    return lr / (1.0 - beta1 ** step), math.sqrt(1.0 - beta2 ** step)


def sgd_scalars(*, lr, momentum, dampening, nesterov, weight_decay, first_step,
                grad_scale=1.0, maximize=False) -> SGDScalars:
    """Scalars for SGD with torch's momentum buffer semantics.

    On the first step torch sets ``buf = g``; the kernels express that as
    ``buf = 0 * buf + 1 * g`` on a zero-initialised buffer, which is exact,
    so one kernel serves both cases.
    """
    lr, momentum, dampening, weight_decay, grad_scale = map(
        float, (lr, momentum, dampening, weight_decay, grad_scale))
    return _build(SGDScalars, (
        lr,
        weight_decay,                                      # l2
        -grad_scale if maximize else grad_scale,           # grad_scale
        0.0 if first_step else momentum,                   # buf_decay
        1.0 if first_step else 1.0 - dampening,            # grad_coef
        momentum,
        weight_decay != 0.0,                               # use_l2
        bool(nesterov),
    ))


def clip_coefficient(norm: float, max_norm: float) -> float:
    """torch's ``clip_grad_norm_`` factor ``min(1, max_norm / (norm + 1e-6))``.

    A NaN norm gives a NaN factor (as torch's clamp does), so a non-finite
    gradient poisons the update visibly instead of being silently skipped;
    Python's ``min(1.0, nan)`` would return 1.0 and hide it.
    """
    coef = max_norm / (norm + 1e-6)
    return coef if (coef < 1.0 or coef != coef) else 1.0


# -- the table kernels' view of the same scalars ----------------------------------
# The compiled step over many arrays (``step`` in the Cython and Numba CPU
# backends) takes one optimizer id, the scalars its element function reads,
# in the order it reads them, and bit flags for the options that change the
# formula. The flag values are shared by the element functions of both
# languages (kernels_impl.pxi, elements.py).

OP_ADAM, OP_SGD = 0, 1
F_L2 = 1          # weight decay added to the gradient (Adam's L2, SGD's)
F_AMSGRAD = 2     # Adam: the running max of the second moment
F_MOMENTUM = 2    # SGD: a momentum buffer
F_NESTEROV = 4    # SGD: Nesterov look-ahead


class AdamElement(NamedTuple):
    """The Adam element function's scalars (the compute dtype's values in
    the kernels; the division by the bias correction becomes a multiply)."""
    step_size: float        # lr / (1 - beta1**t)
    inv_bc2: float          # 1 / sqrt(1 - beta2**t)
    beta1: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    eps: float
    l2: float
    decay: float


class SGDElement(NamedTuple):
    """The SGD element function's scalars."""
    lr: float
    l2: float
    buf_decay: float        # 0 on the first step (buf = g)
    grad_coef: float        # 1 - dampening; 1 on the first step
    momentum: float


class ElementStep(NamedTuple):
    op: int               # OP_ADAM / OP_SGD
    values: tuple         # float64 scalars in the element function's order
    flags: int
    grad_scale: float     # maximize sign (the clip coefficient is applied inside)
    kind: type            # the NamedTuple of ``values`` (AdamElement, SGDElement)
    # 1: one pass (the element function writes the weight); 2: a first pass
    # updates the state and sums two squared quantities per array, a per-array
    # factor is made of the sums, and a second pass writes the weight (LAMB)
    phases: int = 1


def adam_element(s: AdamScalars, amsgrad: bool) -> ElementStep:
    # AdamScalars' fields in AdamElement's order, bc2_sqrt inverted
    values = (s[0], 1.0 / s[1]) + s[2:9]
    flags = (F_L2 if s[10] else 0) | (F_AMSGRAD if amsgrad else 0)
    return _build(ElementStep, (OP_ADAM, values, flags, s[9], AdamElement, 1))


def adam_stepper(lr, beta1, beta2, state, rest):
    """``values()``: Adam's element values (see :func:`adam_element`) for the
    step after the ``state["step"]`` steps taken, only the bias terms
    recomputed, ``rest`` (the values from the third on) kept: a step plan's
    per-step scalars while ``lr``, ``beta1``, ``beta2`` (floats) and the
    rest of the hyperparameters hold."""
    def values():
        step_size, bc2_sqrt = adam_bias(lr, beta1, beta2, state["step"] + 1)
        return (step_size, 1.0 / bc2_sqrt) + rest
    return values


def sgd_element(s: SGDScalars, momentum: bool) -> ElementStep:
    values = (s[0], s[1], s[3], s[4], s[5])     # lr, l2, buf_decay, grad_coef, momentum
    flags = ((F_L2 if s[6] else 0) | (F_MOMENTUM if momentum else 0)
             | (F_NESTEROV if momentum and s[7] else 0))
    return _build(ElementStep, (OP_SGD, values, flags, s[2], SGDElement, 1))


# -- RMSprop, Adagrad, Lion ---------------------------------------------------------
# The same three pieces as Adam's and SGD's: the step's scalars (host,
# float64), the element function's view of them, and its flag bits (each
# optimizer reads its own flags; the values may repeat across optimizers).

OP_RMSPROP, OP_ADAGRAD, OP_LION = 2, 3, 4
F_CENTERED = 4    # RMSprop: subtract the squared running mean of the gradient
F_INITIAL = 2     # Adagrad: the accumulator starts from initial_accumulator_value
#                   (its first step; F_L2 and F_MOMENTUM (RMSprop) as above)


class RMSpropScalars(NamedTuple):
    lr: float
    alpha: float
    one_minus_alpha: float
    eps: float
    l2: float               # weight decay added to the gradient
    momentum: float         # 0: no momentum buffer
    grad_scale: float       # clip coefficient, negated for maximize
    centered: bool


class AdagradScalars(NamedTuple):
    clr: float              # lr / (1 + (t - 1) * lr_decay)
    eps: float
    l2: float
    initial: float          # initial_accumulator_value
    grad_scale: float
    first_step: bool        # the accumulator buffer is new: start it at ``initial``


class LionScalars(NamedTuple):
    lr: float
    beta1: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    decay: float            # decoupled decay factor 1 - lr*wd
    grad_scale: float


def rmsprop_scalars(*, lr, alpha, eps, weight_decay, momentum, centered,
                    grad_scale=1.0, maximize=False) -> RMSpropScalars:
    """Scalars for torch.optim.RMSprop's update."""
    lr, alpha, eps, weight_decay, momentum, grad_scale = map(
        float, (lr, alpha, eps, weight_decay, momentum, grad_scale))
    return RMSpropScalars(lr, alpha, 1.0 - alpha, eps, weight_decay, momentum,
                          -grad_scale if maximize else grad_scale, bool(centered))


def adagrad_scalars(*, lr, lr_decay, eps, weight_decay, initial_accumulator_value, step,
                    first_step, grad_scale=1.0, maximize=False) -> AdagradScalars:
    """Scalars for torch.optim.Adagrad at 1-based ``step``.

    torch fills the accumulator with ``initial_accumulator_value`` when it
    makes it; here the buffer is zero-allocated with the rest of the state,
    and on its first step (``first_step``) the element function starts from
    ``initial`` instead of reading it (flag ``F_INITIAL``): the same value,
    with nothing written before the step's checks are done.
    """
    lr, lr_decay, grad_scale = float(lr), float(lr_decay), float(grad_scale)
    return AdagradScalars(lr / (1.0 + (step - 1) * lr_decay), float(eps), float(weight_decay),
                          float(initial_accumulator_value),
                          -grad_scale if maximize else grad_scale, bool(first_step))


def lion_scalars(*, lr, beta1, beta2, weight_decay, grad_scale=1.0,
                 maximize=False) -> LionScalars:
    """Scalars for Lion (Chen et al. 2023, Algorithm 2)."""
    lr, beta1, beta2, weight_decay, grad_scale = map(
        float, (lr, beta1, beta2, weight_decay, grad_scale))
    return LionScalars(lr, beta1, 1.0 - beta1, beta2, 1.0 - beta2, 1.0 - lr * weight_decay,
                       -grad_scale if maximize else grad_scale)


class RMSpropElement(NamedTuple):
    """The RMSprop element function's scalars."""
    lr: float
    alpha: float
    one_minus_alpha: float
    eps: float
    l2: float
    momentum: float


class AdagradElement(NamedTuple):
    """The Adagrad element function's scalars."""
    clr: float
    eps: float
    l2: float
    initial: float


class LionElement(NamedTuple):
    """The Lion element function's scalars."""
    lr: float
    beta1: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    decay: float


def rmsprop_element(s: RMSpropScalars) -> ElementStep:
    """State in kernel order: square_avg, then grad_avg (centered), then
    momentum_buffer (momentum > 0)."""
    flags = ((F_L2 if s.l2 != 0.0 else 0) | (F_CENTERED if s.centered else 0)
             | (F_MOMENTUM if s.momentum > 0.0 else 0))
    return ElementStep(OP_RMSPROP, tuple(s[:6]), flags, s.grad_scale, RMSpropElement)


def adagrad_element(s: AdagradScalars) -> ElementStep:
    flags = (F_L2 if s.l2 != 0.0 else 0) | (F_INITIAL if s.first_step else 0)
    return ElementStep(OP_ADAGRAD, (s.clr, s.eps, s.l2, s.initial), flags, s.grad_scale,
                       AdagradElement)


def lion_element(s: LionScalars) -> ElementStep:
    return ElementStep(OP_LION, tuple(s[:6]), 0, s.grad_scale, LionElement)


# -- Adamax, NAdam, RAdam -------------------------------------------------------------
# torch.optim's updates. What depends only on the step (bias corrections,
# NAdam's momentum schedule and its running product, RAdam's rectification
# and its switch to the un-adapted update) is computed here, on the host, in
# float64; the element functions see constants and a flag.

OP_ADAMAX, OP_NADAM, OP_RADAM = 5, 6, 7
F_RECTIFIED = 2   # RAdam: rho_t > 5, the rectified adaptive update (F_L2 as above)


class AdamaxScalars(NamedTuple):
    clr: float              # lr / (1 - beta1**t)
    beta1: float
    one_minus_beta1: float
    beta2: float
    eps: float
    l2: float               # weight decay added to the gradient
    grad_scale: float       # clip coefficient, negated for maximize


class NAdamScalars(NamedTuple):
    beta1: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    inv_bc2: float          # 1 / (1 - beta2**t)
    eps: float
    l2: float               # weight decay added to the gradient (not decoupled)
    decay: float            # decoupled decay factor 1 - lr*wd (else 1)
    grad_coef: float        # lr (1 - mu_t) / (1 - prod_{i<=t} mu_i)
    avg_coef: float         # lr mu_{t+1} / (1 - prod_{i<=t+1} mu_i)
    grad_scale: float
    mu_product: float       # prod_{i<=t} mu_i: the group's running product after this step


class RAdamScalars(NamedTuple):
    adaptive_lr: float      # lr / (1 - beta1**t) * r_t * sqrt(1 - beta2**t)
    sgd_lr: float           # lr / (1 - beta1**t)
    beta1: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    eps: float
    l2: float
    decay: float            # decoupled decay factor 1 - lr*wd (else 1)
    grad_scale: float
    rectified: bool         # rho_t > 5: the adaptive update, else the SGD-like one


def adamax_scalars(*, lr, beta1, beta2, eps, weight_decay, step, grad_scale=1.0,
                   maximize=False) -> AdamaxScalars:
    """Scalars for torch.optim.Adamax at 1-based ``step``."""
    lr, beta1, beta2, grad_scale = float(lr), float(beta1), float(beta2), float(grad_scale)
    return AdamaxScalars(lr / (1.0 - beta1 ** step), beta1, 1.0 - beta1, beta2, float(eps),
                         float(weight_decay), -grad_scale if maximize else grad_scale)


def nadam_mu(beta1, momentum_decay, step) -> float:
    """NAdam's momentum coefficient mu_t (torch's formula, float64)."""
    return beta1 * (1.0 - 0.5 * (0.96 ** (step * momentum_decay)))


def nadam_scalars(*, lr, beta1, beta2, eps, weight_decay, momentum_decay, decoupled, step,
                  mu_product, grad_scale=1.0, maximize=False) -> NAdamScalars:
    """Scalars for torch.optim.NAdam at 1-based ``step``; ``mu_product`` is
    the running product of the mu's of the steps before (1.0 at the first).
    The returned ``mu_product`` includes this step's mu: the optimizer keeps
    it once the step has run."""
    lr, beta1, beta2 = float(lr), float(beta1), float(beta2)
    weight_decay, momentum_decay = float(weight_decay), float(momentum_decay)
    grad_scale = float(grad_scale)
    mu = nadam_mu(beta1, momentum_decay, step)
    mu_next = nadam_mu(beta1, momentum_decay, step + 1)
    prod = float(mu_product) * mu
    prod_next = prod * mu_next
    return NAdamScalars(
        beta1, 1.0 - beta1, beta2, 1.0 - beta2,
        1.0 / (1.0 - beta2 ** step),
        float(eps),
        0.0 if decoupled else weight_decay,
        1.0 - lr * weight_decay if decoupled else 1.0,
        lr * (1.0 - mu) / (1.0 - prod),
        lr * mu_next / (1.0 - prod_next),
        -grad_scale if maximize else grad_scale,
        prod,
    )


def radam_scalars(*, lr, beta1, beta2, eps, weight_decay, decoupled, step, grad_scale=1.0,
                  maximize=False) -> RAdamScalars:
    """Scalars for torch.optim.RAdam at 1-based ``step``: the length of the
    approximated SMA rho_t, and from it the rectification r_t and the switch
    (rho_t > 5) between the adaptive and the SGD-like update."""
    lr, beta1, beta2 = float(lr), float(beta1), float(beta2)
    weight_decay, grad_scale = float(weight_decay), float(grad_scale)
    bc1 = 1.0 - beta1 ** step
    bc2 = 1.0 - beta2 ** step
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    rho_t = rho_inf - 2.0 * step * (beta2 ** step) / bc2
    rectified = rho_t > 5.0
    rect = (((rho_t - 4.0) * (rho_t - 2.0) * rho_inf
             / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t)) ** 0.5 if rectified else 0.0)
    return RAdamScalars(
        lr / bc1 * rect * bc2 ** 0.5, lr / bc1,
        beta1, 1.0 - beta1, beta2, 1.0 - beta2, float(eps),
        0.0 if decoupled else weight_decay,
        1.0 - lr * weight_decay if decoupled else 1.0,
        -grad_scale if maximize else grad_scale,
        bool(rectified),
    )


class AdamaxElement(NamedTuple):
    """The Adamax element function's scalars."""
    clr: float
    beta1: float
    one_minus_beta1: float
    beta2: float
    eps: float
    l2: float


class NAdamElement(NamedTuple):
    """The NAdam element function's scalars."""
    beta1: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    inv_bc2: float
    eps: float
    l2: float
    decay: float
    grad_coef: float
    avg_coef: float


class RAdamElement(NamedTuple):
    """The RAdam element function's scalars."""
    adaptive_lr: float
    sgd_lr: float
    beta1: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    eps: float
    l2: float
    decay: float


def adamax_element(s: AdamaxScalars) -> ElementStep:
    """State in kernel order: exp_avg, exp_inf."""
    return ElementStep(OP_ADAMAX, tuple(s[:6]), F_L2 if s.l2 != 0.0 else 0, s.grad_scale,
                       AdamaxElement)


def nadam_element(s: NAdamScalars) -> ElementStep:
    """State in kernel order: exp_avg, exp_avg_sq."""
    return ElementStep(OP_NADAM, tuple(s[:10]), F_L2 if s.l2 != 0.0 else 0, s.grad_scale,
                       NAdamElement)


def radam_element(s: RAdamScalars) -> ElementStep:
    """State in kernel order: exp_avg, exp_avg_sq."""
    flags = (F_L2 if s.l2 != 0.0 else 0) | (F_RECTIFIED if s.rectified else 0)
    return ElementStep(OP_RADAM, tuple(s[:9]), flags, s.grad_scale, RAdamElement)


# -- LAMB ---------------------------------------------------------------------------
# You et al. 2020, Algorithm 2: Adam's direction plus decoupled decay, scaled
# per tensor by the trust ratio ||p|| / ||r||. The first of its two phases
# (ElementStep.phases = 2) updates the moments and sums p^2 and r^2 per
# array; the second writes p - lr * trust * r.

OP_LAMB = 8
F_DECAY = 1       # LAMB: the weight decay term wd * p in the update direction


class LAMBScalars(NamedTuple):
    lr: float
    beta1: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    bc1: float              # 1 - beta1**t (1 without bias correction)
    bc2: float              # 1 - beta2**t (1 without bias correction)
    eps: float
    weight_decay: float
    grad_scale: float       # clip coefficient, negated for maximize


class LAMBElement(NamedTuple):
    """The LAMB element functions' scalars (the bias corrections as
    multipliers: ``sqrt(v / bc2) = sqrt(v) * inv_sqrt_bc2``)."""
    lr: float
    beta1: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    inv_bc1: float
    inv_sqrt_bc2: float
    eps: float
    weight_decay: float


def lamb_scalars(*, lr, beta1, beta2, eps, weight_decay, bias_correction, step,
                 grad_scale=1.0, maximize=False) -> LAMBScalars:
    """Scalars for LAMB at 1-based ``step``."""
    lr, beta1, beta2, grad_scale = float(lr), float(beta1), float(beta2), float(grad_scale)
    bc1 = 1.0 - beta1 ** step if bias_correction else 1.0
    bc2 = 1.0 - beta2 ** step if bias_correction else 1.0
    return LAMBScalars(lr, beta1, 1.0 - beta1, beta2, 1.0 - beta2, bc1, bc2, float(eps),
                       float(weight_decay), -grad_scale if maximize else grad_scale)


def lamb_element(s: LAMBScalars) -> ElementStep:
    """State in kernel order: exp_avg, exp_avg_sq. Two phases."""
    values = s[:5] + (1.0 / s.bc1, 1.0 / math.sqrt(s.bc2), s.eps, s.weight_decay)
    return ElementStep(OP_LAMB, values, F_DECAY if s.weight_decay != 0.0 else 0,
                       s.grad_scale, LAMBElement, 2)
