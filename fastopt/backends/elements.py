"""The per-element math of every optimizer, once, for Numba.

Each function updates one element: it takes the weight, the (already
scaled) gradient, the state values and the step's scalars ``c`` (the
optimizer's NamedTuple from :mod:`fastopt.backends.scalars`,
``AdamElement``/``SGDElement``, holding values of the compute dtype) and
returns the new weight and state values. ``flags`` are the bits of
:mod:`fastopt.backends.scalars` (``F_L2``, ...) for the options that change
the formula. A state value whose option is off is passed in and handed back
unchanged.

They are ``register_jitable``: plain Python functions that Numba compiles
into whichever jitted code calls them, so the CPU drivers in
:mod:`fastopt.backends.numba_cpu` inline them into their loops and know
nothing of the optimizer. The NumPy reference
(:mod:`fastopt.backends.reference`) writes the same formulas as array
expressions, and the Cython kernels have one twin per function
(``_cython/kernels_impl.pxi``). The CUDA kernels
(:mod:`fastopt.backends._cuda_kernels`) call these same functions: numba-cuda
compiles them into its device code, and the CUDA simulator, which runs
kernels as Python, calls them as the plain functions they also are.
"""

from __future__ import annotations

import numpy as np
from numba.core import types
from numba.extending import intrinsic, overload, register_jitable

from .scalars import F_AMSGRAD, F_L2, F_MOMENTUM, F_NESTEROV


def sqrt(x):
    """Square root in the argument's own precision, NaN for negative input.

    Called as Python (the CUDA simulator runs kernels as Python) it is
    NumPy's; compiled code (the CPU and CUDA targets: the overload below is
    generic) gets the ``llvm.sqrt`` intrinsic.
    """
    return np.sqrt(x)


@intrinsic
def _llvm_sqrt(typingctx, x):
    """sqrt as the ``llvm.sqrt`` intrinsic, in the argument's own precision.

    On the CPU, Numba lowers ``math.sqrt``/``np.sqrt`` on scalars to a libm
    call (``sqrtf``), which LLVM will not vectorise; the intrinsic vectorises
    to ``vsqrtps`` and still returns NaN for negative input. NVVM compiles it
    to the IEEE ``sqrt.rn`` instruction (the same as ``math.sqrt`` there, no
    fastmath).
    """
    if not isinstance(x, types.Float):
        return None

    def codegen(context, builder, signature, args):
        fn = builder.module.declare_intrinsic("llvm.sqrt", [args[0].type])
        return builder.call(fn, args)

    return x(x), codegen


@overload(sqrt)
def _sqrt_impl(x):
    if isinstance(x, types.Float):
        return lambda x: _llvm_sqrt(x)
    return None


@register_jitable
def adam(p, g, m, v, vmax, c, flags):
    """Adam/AdamW (torch.optim.Adam's update; ``c`` an AdamElement)."""
    m, v = adam_moments(p, g, m, v, c, flags)
    second = v
    if flags & F_AMSGRAD:
        second = vmax = amsgrad_max(vmax, v)
    return adam_param(p, m, second, c), m, v, vmax


# ``adam`` in its three steps, for a caller that stores each result as soon
# as it is known (the CUDA scalar loop: fewer live registers)

@register_jitable
def adam_moments(p, g, m, v, c, flags):
    """Adam's new first and second moments."""
    if flags & F_L2:
        g = g + c.l2 * p
    return c.beta1 * m + c.one_minus_beta1 * g, c.beta2 * v + c.one_minus_beta2 * g * g


@register_jitable
def amsgrad_max(vmax, v):
    """The running max of the second moment, with np.maximum semantics: a
    NaN on either side propagates (the builtin max would keep vmax when v is
    NaN and hide a NaN gradient)."""
    if vmax > v or vmax != vmax:
        return vmax
    return v


@register_jitable
def adam_param(p, m, second, c):
    """The weight after the step, from the moments."""
    return p * c.decay - c.step_size * m / (sqrt(second) * c.inv_bc2 + c.eps)


@register_jitable
def sgd(p, g, buf, c, flags):
    """SGD with torch's momentum buffer (``c`` an SGDElement)."""
    if flags & F_L2:
        g = g + c.l2 * p
    if flags & F_MOMENTUM:
        buf = c.buf_decay * buf + c.grad_coef * g
        if flags & F_NESTEROV:
            g = g + c.momentum * buf
        else:
            g = buf
    p = p - c.lr * g
    return p, buf


# RMSprop, Adagrad and Lion. Their flags are imported here rather than at
# the top so the additions stay in one block.
from .scalars import F_CENTERED, F_INITIAL  # noqa: E402


@register_jitable
def rmsprop(p, g, sq, ga, buf, c, flags):
    """torch.optim.RMSprop's update (``c`` an RMSpropElement): ``sq`` the
    square average, ``ga`` the gradient average (F_CENTERED), ``buf`` the
    momentum buffer (F_MOMENTUM)."""
    if flags & F_L2:
        g = g + c.l2 * p
    sq = c.alpha * sq + c.one_minus_alpha * g * g
    if flags & F_CENTERED:
        ga = c.alpha * ga + c.one_minus_alpha * g
        avg = sqrt(sq - ga * ga) + c.eps
    else:
        avg = sqrt(sq) + c.eps
    if flags & F_MOMENTUM:
        buf = c.momentum * buf + g / avg
        p = p - c.lr * buf
    else:
        p = p - c.lr * g / avg
    return p, sq, ga, buf


@register_jitable
def adagrad(p, g, acc, c, flags):
    """torch.optim.Adagrad's update (``c`` an AdagradElement): ``acc`` the
    sum of squared gradients; on its first step (F_INITIAL) it starts from
    ``c.initial`` (torch's initial_accumulator_value) instead of the buffer."""
    if flags & F_L2:
        g = g + c.l2 * p
    if flags & F_INITIAL:
        acc = c.initial
    acc = acc + g * g
    p = p - c.clr * g / (sqrt(acc) + c.eps)
    return p, acc


@register_jitable
def lion(p, g, m, c, flags):
    """Lion (Chen et al. 2023, Algorithm 2; ``c`` a LionElement): the
    weight moves by ``lr * sign(beta1 m + (1 - beta1) g)``, sign(0) = 0,
    and a NaN stays NaN (the comparisons are false for it)."""
    u = c.beta1 * m + c.one_minus_beta1 * g
    if u > 0:
        d = c.lr
    elif u < 0:
        d = -c.lr
    else:
        d = u * c.lr            # lr * sign(u) for u = +-0 and NaN
    p = p * c.decay - d
    m = c.beta2 * m + c.one_minus_beta2 * g
    return p, m


# Adamax, NAdam and RAdam (torch.optim's updates). Their flags are imported
# here for the same reason.
from .scalars import F_RECTIFIED  # noqa: E402


@register_jitable
def adamax(p, g, m, u, c, flags):
    """torch.optim.Adamax's update (``c`` an AdamaxElement): ``m`` the first
    moment, ``u`` the exponentially weighted infinity norm
    ``max(beta2 u, |g| + eps)``, with torch.maximum's semantics (a NaN on
    either side propagates)."""
    if flags & F_L2:
        g = g + c.l2 * p
    m = c.beta1 * m + c.one_minus_beta1 * g
    a = abs(g) + c.eps
    u = c.beta2 * u
    if not (u > a or u != u):
        u = a
    p = p - c.clr * m / u
    return p, m, u


@register_jitable
def nadam(p, g, m, v, c, flags):
    """torch.optim.NAdam's update (``c`` a NAdamElement): the momentum
    schedule's two coefficients (this step's gradient and the next step's
    momentum, each over one minus the running product of the mu's) are
    host scalars."""
    if flags & F_L2:
        g = g + c.l2 * p
    m = c.beta1 * m + c.one_minus_beta1 * g
    v = c.beta2 * v + c.one_minus_beta2 * g * g
    denom = sqrt(v * c.inv_bc2) + c.eps
    p = p * c.decay - (c.grad_coef * g + c.avg_coef * m) / denom
    return p, m, v


@register_jitable
def radam(p, g, m, v, c, flags):
    """torch.optim.RAdam's update (``c`` a RAdamElement): the rectified
    adaptive step when F_RECTIFIED (rho_t > 5; the rectification is in
    ``c.adaptive_lr``), else the bias-corrected momentum alone."""
    if flags & F_L2:
        g = g + c.l2 * p
    m = c.beta1 * m + c.one_minus_beta1 * g
    v = c.beta2 * v + c.one_minus_beta2 * g * g
    if flags & F_RECTIFIED:
        p = p * c.decay - c.adaptive_lr * m / (sqrt(v) + c.eps)
    else:
        p = p * c.decay - c.sgd_lr * m
    return p, m, v


# LAMB (You et al. 2020, Algorithm 2): a two-phase update (see
# ElementStep.phases). Its flag is imported here for the same reason.
from .scalars import F_DECAY  # noqa: E402


@register_jitable
def lamb_direction(p, m, v, c, flags):
    """LAMB's update direction ``r = m_hat / (sqrt(v_hat) + eps) + wd p``
    from the new moments (``c`` a LAMBElement)."""
    r = c.inv_bc1 * m / (sqrt(v) * c.inv_sqrt_bc2 + c.eps)
    if flags & F_DECAY:
        r = r + c.weight_decay * p
    return r


@register_jitable
def lamb_moments(p, g, m, v, c, flags):
    """Phase one: the new moments, and the direction ``r`` whose norm (with
    the weight's) the tensor's trust ratio needs."""
    m = c.beta1 * m + c.one_minus_beta1 * g
    v = c.beta2 * v + c.one_minus_beta2 * g * g
    return m, v, lamb_direction(p, m, v, c, flags)


@register_jitable
def lamb_step_size(lr, p_sumsq, r_sumsq):
    """One tensor's step size ``lr * ||p|| / ||r||`` (float64, from its sums
    of squares); ``lr`` alone when either norm is 0. A NaN norm gives NaN:
    a non-finite gradient shows in the whole tensor, never hidden."""
    if p_sumsq == 0 or r_sumsq == 0:
        return lr
    return lr * (sqrt(p_sumsq) / sqrt(r_sumsq))


@register_jitable
def lamb_param(p, m, v, c, flags, size):
    """Phase two: the weight moved by the tensor's step size along ``r``
    (recomputed from the moments phase one wrote, bit for bit the same)."""
    return p - size * lamb_direction(p, m, v, c, flags)
