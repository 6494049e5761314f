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
