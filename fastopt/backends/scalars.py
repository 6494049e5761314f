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
    # positional construction: part of every step's fixed cost
    lr, beta1, beta2 = float(lr), float(beta1), float(beta2)
    weight_decay, grad_scale = float(weight_decay), float(grad_scale)
    l2 = 0.0 if decoupled else weight_decay
    return AdamScalars(
        lr / (1.0 - beta1 ** step),                        # step_size
        math.sqrt(1.0 - beta2 ** step),                    # bc2_sqrt
        beta1, 1.0 - beta1, beta2, 1.0 - beta2,
        float(eps),
        l2,
        1.0 - lr * weight_decay if decoupled else 1.0,     # decay
        -grad_scale if maximize else grad_scale,
        l2 != 0.0,                                         # use_l2
    )


def sgd_scalars(*, lr, momentum, dampening, nesterov, weight_decay, first_step,
                grad_scale=1.0, maximize=False) -> SGDScalars:
    """Scalars for SGD with torch's momentum buffer semantics.

    On the first step torch sets ``buf = g``; the kernels express that as
    ``buf = 0 * buf + 1 * g`` on a zero-initialised buffer, which is exact,
    so one kernel serves both cases.
    """
    lr, momentum, dampening, weight_decay, grad_scale = map(
        float, (lr, momentum, dampening, weight_decay, grad_scale))
    return SGDScalars(
        lr=lr,
        l2=weight_decay,
        grad_scale=-grad_scale if maximize else grad_scale,
        buf_decay=0.0 if first_step else momentum,
        grad_coef=1.0 if first_step else 1.0 - dampening,
        momentum=momentum,
        use_l2=weight_decay != 0.0,
        nesterov=bool(nesterov),
    )


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


def adam_element(s: AdamScalars, amsgrad: bool) -> ElementStep:
    # AdamScalars' fields in AdamElement's order, bc2_sqrt inverted (by
    # position: this is part of every step's fixed cost)
    values = (s[0], 1.0 / s[1]) + s[2:9]
    flags = (F_L2 if s[10] else 0) | (F_AMSGRAD if amsgrad else 0)
    return ElementStep(OP_ADAM, values, flags, s[9], AdamElement)


def sgd_element(s: SGDScalars, momentum: bool) -> ElementStep:
    values = (s.lr, s.l2, s.buf_decay, s.grad_coef, s.momentum)
    flags = ((F_L2 if s.use_l2 else 0) | (F_MOMENTUM if momentum else 0)
             | (F_NESTEROV if momentum and s.nesterov else 0))
    return ElementStep(OP_SGD, values, flags, s.grad_scale, SGDElement)


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
