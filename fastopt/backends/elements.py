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
(``_cython/kernels_impl.pxi``).
"""

from __future__ import annotations

from numba.core import types
from numba.extending import intrinsic, register_jitable

from .scalars import F_AMSGRAD, F_L2, F_MOMENTUM, F_NESTEROV


@intrinsic
def sqrt(typingctx, x):
    """sqrt as the ``llvm.sqrt`` intrinsic, in the argument's own precision.

    Numba lowers ``math.sqrt``/``np.sqrt`` on scalars to a libm call
    (``sqrtf``), which LLVM will not vectorise; the intrinsic vectorises to
    ``vsqrtps`` and still returns NaN for negative input.
    """
    if not isinstance(x, types.Float):
        return None

    def codegen(context, builder, signature, args):
        fn = builder.module.declare_intrinsic("llvm.sqrt", [args[0].type])
        return builder.call(fn, args)

    return x(x), codegen


@register_jitable
def adam(p, g, m, v, vmax, c, flags):
    """Adam/AdamW (torch.optim.Adam's update; ``c`` an AdamElement)."""
    if flags & F_L2:
        g = g + c.l2 * p
    m = c.beta1 * m + c.one_minus_beta1 * g
    v = c.beta2 * v + c.one_minus_beta2 * g * g
    second = v
    if flags & F_AMSGRAD:
        # np.maximum semantics: a NaN on either side propagates (the builtin
        # max would keep vmax when v is NaN and hide a NaN gradient)
        if vmax > v or vmax != vmax:
            second = vmax
        vmax = second
    p = p * c.decay - c.step_size * m / (sqrt(second) * c.inv_bc2 + c.eps)
    return p, m, v, vmax


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
