"""Pure NumPy reference backend: the readable specification.

Every fast backend is tested against these functions. They follow
torch.optim's update equations term by term, compute in the array's dtype
(float64 arrays are exact float64), and favour clarity over speed:
temporaries are fine here.

All functions take 1-D contiguous arrays and update them in place. The
optional state arrays (``vmax`` for amsgrad, ``buf`` for momentum) are None
when that feature is off.

Mixed precision: ``p`` and the state are float32 (the master copy), ``g``
is float16/bfloat16, and ``out`` (None otherwise) is the 16-bit params,
set to the rounded ``p`` after the update. The conversions are NumPy's and
ml_dtypes' own casts (round to nearest even): the compiled backends
reproduce them bit for bit.
"""

from __future__ import annotations

import functools

import numpy as np

from .scalars import AdamScalars, SGDScalars

name = "numpy"
threaded = False


def _ieee(f):
    """``f`` with NaN and inf as IEEE arithmetic makes them and no NumPy
    warning, as the compiled kernels do: a warning made an error (``-W
    error``, pytest's ``filterwarnings``) would stop a step half written."""
    @functools.wraps(f)
    def quiet(*args, **kwargs):
        with np.errstate(all="ignore"):
            return f(*args, **kwargs)
    return quiet


def _wide(g, t):
    return g if g.dtype == t else g.astype(t)


def _write_back(p, out):
    if out is not None:
        out[...] = p.astype(out.dtype)


@_ieee
def adam_update(p, g, m, v, vmax, s: AdamScalars, out=None) -> None:
    r"""One Adam/AdamW step.

    .. math::
        g &\leftarrow c\,g + \lambda_{L2}\,p \\
        m &\leftarrow \beta_1 m + (1-\beta_1) g \\
        v &\leftarrow \beta_2 v + (1-\beta_2) g^2 \\
        \hat v &= \max(\hat v, v) \text{ (amsgrad) else } v \\
        p &\leftarrow \delta\,p - \frac{\eta}{1-\beta_1^t}
              \frac{m}{\sqrt{\hat v}/\sqrt{1-\beta_2^t} + \epsilon}

    with ``c`` the clip/maximize factor and ``delta = 1 - lr * wd`` (AdamW).
    """
    t = p.dtype.type
    grad = _wide(g, p.dtype) * t(s.grad_scale)
    if s.use_l2:
        grad = grad + t(s.l2) * p
    m[...] = t(s.beta1) * m + t(s.one_minus_beta1) * grad
    v[...] = t(s.beta2) * v + t(s.one_minus_beta2) * grad * grad
    if vmax is not None:  # amsgrad
        np.maximum(vmax, v, out=vmax)
        second = vmax
    else:
        second = v
    denom = np.sqrt(second) / t(s.bc2_sqrt) + t(s.eps)
    p[...] = p * t(s.decay) - t(s.step_size) * m / denom
    _write_back(p, out)


@_ieee
def sgd_update(p, g, buf, s: SGDScalars, out=None) -> None:
    r"""One SGD step with torch's momentum buffer.

    .. math::
        g &\leftarrow c\,g + \lambda\,p \\
        b &\leftarrow \mu_t b + (1-\tau_t) g \\
        d &= g + \mu b \text{ (nesterov) else } b \\
        p &\leftarrow p - \eta\, d

    ``mu_t, 1 - tau_t`` are ``0, 1`` on the first step (``b = g``).
    """
    t = p.dtype.type
    grad = _wide(g, p.dtype) * t(s.grad_scale)
    if s.use_l2:
        grad = grad + t(s.l2) * p
    if buf is not None:  # momentum
        buf[...] = t(s.buf_decay) * buf + t(s.grad_coef) * grad
        direction = grad + t(s.momentum) * buf if s.nesterov else buf
    else:
        direction = grad
    p[...] = p - t(s.lr) * direction
    _write_back(p, out)


@_ieee
def widen(src, dst) -> None:
    """16-bit ``src`` -> float32 ``dst`` (NumPy's / ml_dtypes' cast)."""
    dst[...] = src.astype(np.float32)


@_ieee
def narrow(src, dst) -> None:
    """float32 ``src`` -> 16-bit ``dst``, round to nearest even."""
    dst[...] = src.astype(dst.dtype)


@_ieee
def sumsq(x) -> float:
    """Sum of squares, accumulated in float64."""
    x64 = x.astype(np.float64, copy=False)
    return float(np.dot(x64, x64))


@_ieee
def scale(x, c: float) -> None:
    """``x *= c`` in the array's dtype."""
    x *= x.dtype.type(c)


@_ieee
def rmsprop_update(p, g, square_avg, grad_avg, buf, s, out=None) -> None:
    r"""One torch.optim.RMSprop step (``s`` an RMSpropScalars); ``grad_avg``
    is None unless centered, ``buf`` None unless momentum > 0.

    .. math::
        g &\leftarrow c\,g + \lambda\,p \\
        v &\leftarrow \alpha v + (1-\alpha) g^2 \\
        \bar g &\leftarrow \alpha \bar g + (1-\alpha) g,\quad
            \tilde v = v - \bar g^2 \text{ (centered) else } v \\
        b &\leftarrow \mu b + g / (\sqrt{\tilde v} + \epsilon),\quad p \leftarrow p - \eta b
            \text{ (momentum)} \\
        p &\leftarrow p - \eta\, g / (\sqrt{\tilde v} + \epsilon) \text{ (otherwise)}
    """
    t = p.dtype.type
    grad = _wide(g, p.dtype) * t(s.grad_scale)
    if s.l2 != 0.0:
        grad = grad + t(s.l2) * p
    square_avg[...] = t(s.alpha) * square_avg + t(s.one_minus_alpha) * grad * grad
    if grad_avg is not None:  # centered
        grad_avg[...] = t(s.alpha) * grad_avg + t(s.one_minus_alpha) * grad
        avg = np.sqrt(square_avg - grad_avg * grad_avg) + t(s.eps)
    else:
        avg = np.sqrt(square_avg) + t(s.eps)
    if buf is not None:  # momentum
        buf[...] = t(s.momentum) * buf + grad / avg
        p[...] = p - t(s.lr) * buf
    else:
        p[...] = p - t(s.lr) * grad / avg
    _write_back(p, out)


@_ieee
def adagrad_update(p, g, acc, s, out=None) -> None:
    r"""One torch.optim.Adagrad step (``s`` an AdagradScalars).

    .. math::
        g &\leftarrow c\,g + \lambda\,p \\
        S &\leftarrow S + g^2 \quad (S_0 = \text{initial\_accumulator\_value}) \\
        p &\leftarrow p - \frac{\eta}{1 + (t-1)\,\eta_{decay}}\, \frac{g}{\sqrt{S} + \epsilon}

    On the first step (``s.first_step``) the zero-allocated ``acc`` is taken
    to hold ``s.initial``, as torch's ``full_like`` would have filled it.
    """
    t = p.dtype.type
    grad = _wide(g, p.dtype) * t(s.grad_scale)
    if s.l2 != 0.0:
        grad = grad + t(s.l2) * p
    start = np.full_like(acc, s.initial) if s.first_step else acc
    acc[...] = start + grad * grad
    p[...] = p - t(s.clr) * grad / (np.sqrt(acc) + t(s.eps))
    _write_back(p, out)


@_ieee
def lion_update(p, g, m, s, out=None) -> None:
    r"""One Lion step (Chen et al. 2023, Algorithm 2; ``s`` a LionScalars).

    .. math::
        u &= \beta_1 m + (1-\beta_1)\, c\,g \\
        p &\leftarrow p\,(1 - \eta\lambda) - \eta\, \mathrm{sign}(u) \\
        m &\leftarrow \beta_2 m + (1-\beta_2)\, c\,g

    ``sign(0) = 0``; a NaN gradient gives NaN (``np.sign(nan)`` is NaN).
    """
    t = p.dtype.type
    grad = _wide(g, p.dtype) * t(s.grad_scale)
    u = t(s.beta1) * m + t(s.one_minus_beta1) * grad
    p[...] = p * t(s.decay) - t(s.lr) * np.sign(u)
    m[...] = t(s.beta2) * m + t(s.one_minus_beta2) * grad
    _write_back(p, out)


@_ieee
def adamax_update(p, g, exp_avg, exp_inf, s, out=None) -> None:
    r"""One torch.optim.Adamax step (``s`` an AdamaxScalars).

    .. math::
        g &\leftarrow c\,g + \lambda\,p \\
        m &\leftarrow \beta_1 m + (1-\beta_1) g \\
        u &\leftarrow \max(\beta_2 u, |g| + \epsilon) \\
        p &\leftarrow p - \frac{\eta}{1-\beta_1^t}\, \frac{m}{u}

    ``np.maximum`` propagates a NaN, as torch.maximum does.
    """
    t = p.dtype.type
    grad = _wide(g, p.dtype) * t(s.grad_scale)
    if s.l2 != 0.0:
        grad = grad + t(s.l2) * p
    exp_avg[...] = t(s.beta1) * exp_avg + t(s.one_minus_beta1) * grad
    exp_inf[...] = np.maximum(t(s.beta2) * exp_inf, np.abs(grad) + t(s.eps))
    p[...] = p - t(s.clr) * exp_avg / exp_inf
    _write_back(p, out)


def _adam_moments(p, g, exp_avg, exp_avg_sq, s, l2=0.0):
    """The gradient (scaled by ``s.grad_scale``, plus ``l2 * p``) and Adam's
    two moments updated in place with it (NAdam, RAdam, LAMB); returns the
    gradient."""
    t = p.dtype.type
    grad = _wide(g, p.dtype) * t(s.grad_scale)
    if l2 != 0.0:
        grad = grad + t(l2) * p
    exp_avg[...] = t(s.beta1) * exp_avg + t(s.one_minus_beta1) * grad
    exp_avg_sq[...] = t(s.beta2) * exp_avg_sq + t(s.one_minus_beta2) * grad * grad
    return grad


@_ieee
def nadam_update(p, g, exp_avg, exp_avg_sq, s, out=None) -> None:
    r"""One torch.optim.NAdam step (``s`` a NAdamScalars).

    .. math::
        g &\leftarrow c\,g + \lambda\,p \text{ (L2)},\quad
            p \leftarrow p\,(1 - \eta\lambda) \text{ (decoupled)} \\
        m &\leftarrow \beta_1 m + (1-\beta_1) g,\quad
        v \leftarrow \beta_2 v + (1-\beta_2) g^2 \\
        p &\leftarrow p - \frac{\eta (1-\mu_t)}{1 - \prod_{i\le t}\mu_i}
            \frac{g}{\sqrt{v/(1-\beta_2^t)} + \epsilon}
          - \frac{\eta\,\mu_{t+1}}{1 - \prod_{i\le t+1}\mu_i}
            \frac{m}{\sqrt{v/(1-\beta_2^t)} + \epsilon}
    """
    t = p.dtype.type
    grad = _adam_moments(p, g, exp_avg, exp_avg_sq, s, s.l2)
    denom = np.sqrt(exp_avg_sq * t(s.inv_bc2)) + t(s.eps)
    p[...] = p * t(s.decay) - (t(s.grad_coef) * grad + t(s.avg_coef) * exp_avg) / denom
    _write_back(p, out)


@_ieee
def radam_update(p, g, exp_avg, exp_avg_sq, s, out=None) -> None:
    r"""One torch.optim.RAdam step (``s`` a RAdamScalars).

    .. math::
        m &\leftarrow \beta_1 m + (1-\beta_1) g,\quad
        v \leftarrow \beta_2 v + (1-\beta_2) g^2 \\
        p &\leftarrow p - \frac{\eta}{1-\beta_1^t}\, r_t \sqrt{1-\beta_2^t}\,
            \frac{m}{\sqrt v + \epsilon} \text{ if } \rho_t > 5
            \text{ else } p - \frac{\eta}{1-\beta_1^t} m

    (after the L2 term or the decoupled decay, as NAdam's).
    """
    t = p.dtype.type
    _adam_moments(p, g, exp_avg, exp_avg_sq, s, s.l2)
    if s.rectified:
        p[...] = p * t(s.decay) - t(s.adaptive_lr) * exp_avg / (np.sqrt(exp_avg_sq) + t(s.eps))
    else:
        p[...] = p * t(s.decay) - t(s.sgd_lr) * exp_avg
    _write_back(p, out)


@_ieee
def lamb_update(p, g, exp_avg, exp_avg_sq, s, out=None) -> None:
    r"""One LAMB step of one tensor (You et al. 2020, Algorithm 2; ``s`` a
    LAMBScalars).

    .. math::
        m &\leftarrow \beta_1 m + (1-\beta_1)\, c\,g,\quad
        v \leftarrow \beta_2 v + (1-\beta_2)\, c^2 g^2 \\
        r &= \frac{m / (1-\beta_1^t)}{\sqrt{v / (1-\beta_2^t)} + \epsilon} + \lambda p \\
        p &\leftarrow p - \eta\, \frac{\lVert p \rVert}{\lVert r \rVert}\, r

    (no bias correction: the two divisors are 1). The trust ratio
    ``||p|| / ||r||`` is 1 when either norm is 0; the norms are float64.
    """
    t = p.dtype.type
    _adam_moments(p, g, exp_avg, exp_avg_sq, s)
    r = (exp_avg / t(s.bc1)) / (np.sqrt(exp_avg_sq / t(s.bc2)) + t(s.eps))
    if s.weight_decay != 0.0:
        r = r + t(s.weight_decay) * p
    p_norm = np.sqrt(sumsq(p))
    r_norm = np.sqrt(sumsq(r))
    trust = 1.0 if p_norm == 0.0 or r_norm == 0.0 else p_norm / r_norm
    p[...] = p - t(s.lr * trust) * r
    _write_back(p, out)
