"""Functional layer: one optimizer step over arrays and state you own.

For NumPy code that keeps its own state instead of an optimizer object::

    m, v = np.zeros_like(w), np.zeros_like(w)
    for t in range(1, steps + 1):
        fastopt.functional.adamw(w, grad(w), m, v, step=t, lr=1e-3)

Every argument may be one ndarray or a list of them (matched one to one);
device arrays (``backend="cuda"``, or "auto" given device params) work the
same way, float32/float64 on the device;
when all of them are :class:`~fastopt.params.FlatArrays`, each is stepped as
its one flat buffer in a single kernel call. Everything is checked before
anything is written.
"""

from __future__ import annotations

import numpy as np

from . import _validate as V
from .backends import backend_for, get_backend
from .backends.scalars import adam_scalars, sgd_scalars
from .params import FlatArrays


def _flatten(named, optional=()):
    """Check the named arrays and return one 1-D view list per argument."""
    present = {k: a for k, a in named.items() if not (k in optional and a is None)}
    if all(isinstance(a, FlatArrays) for a in present.values()):
        first = next(iter(present))
        for k, a in present.items():
            _check_flat(k, a, first, present[first])
        lists = {k: [a.data] for k, a in present.items()}
    else:
        # grads are only read: strided ones through C-ordered copies
        lists = {k: V.as_array_list(k, V.readable(a) if k == "grads" else a)
                 for k, a in present.items()}
        first = next(iter(lists))
        for k, arrays in lists.items():
            V.check_like(k, arrays, first, lists[first], writable=k != "grads")
        given = present["grads"]
        given = given if isinstance(given, (list, tuple)) else [given]
        copied = [(f"grads[{i}]", given[i]) for i in V.copied(given, lists["grads"])]
        if copied:          # each as itself: W.T given as W's own gradient is refused
            V.check_views_disjoint([(f"{k}[{i}]", x) for k, xs in lists.items()
                                    if k != "grads" for i, x in enumerate(xs)], copied)
        lists = {k: [x.reshape(-1) for x in arrays] for k, arrays in lists.items()}
    V.check_disjoint([(f"{k}[{i}]", x) for k, xs in lists.items() if k != "grads"
                      for i, x in enumerate(xs)],
                     [(f"grads[{i}]", x) for i, x in enumerate(lists["grads"])])
    n = len(lists[first])
    return [lists.get(k, [None] * n) for k in named]


def _check_flat(name, a, ref_name, ref):
    """A FlatArrays argument, checked as the one buffer the kernel steps:
    its ``data`` (writable where written: its views say writable when only
    the buffer was made read-only), and its shapes against ``ref``'s,
    tensor by tensor. Checking each view took ~5 us per tensor: 250x the
    class step over 2000 small tensors."""
    V.check_float_array(f"{name}.data", a.data, writable=name != "grads")
    if a.shapes != ref.shapes:
        if len(a) != len(ref):
            raise ValueError(f"{name} has {V.count(len(a), 'array')} but {ref_name} has {len(ref)}")
        i = next(i for i, (s, r) in enumerate(zip(a.shapes, ref.shapes)) if s != r)
        raise ValueError(f"{name}[{i}] has shape {a.shapes[i]} but {ref_name}[{i}] has "
                         f"shape {ref.shapes[i]}")
    if a.dtype != ref.dtype:
        raise TypeError(f"{name} is {a.dtype} but {ref_name} is {ref.dtype}")


def _flatten_device(be, named, optional=()):
    """:func:`_flatten` for device arrays (backend "cuda"): one 1-D device
    view list per argument, all checked before anything is launched."""
    present = {k: a for k, a in named.items() if not (k in optional and a is None)}
    lists = {}
    for k, a in present.items():
        arrays = [a] if not isinstance(a, (list, tuple)) else list(a)
        lists[k] = [be.check_array(f"{k}[{i}]", x, dtypes=be.FLOAT_DTYPES)
                    for i, x in enumerate(arrays)]
    first = next(iter(lists))
    ref = lists[first]
    for k, arrays in lists.items():
        if len(arrays) != len(ref):
            raise ValueError(f"{k} has {V.count(len(arrays), 'array')} but {first} has {len(ref)}")
        for i, (x, r) in enumerate(zip(arrays, ref)):
            V.check_same_layout(f"{k}[{i}]", x, f"{first}[{i}]", r)
    written = [(f"{k}[{i}]", x) for k, xs in lists.items() if k != "grads"
               for i, x in enumerate(xs)]
    read = [(f"grads[{i}]", x) for i, x in enumerate(lists["grads"])]
    be.check_devices(written + read)
    be.check_disjoint(written, read)
    n = len(ref)
    return [[be.flat(x) for x in lists[k]] if k in lists else [None] * n for k in named]


def _refuse_numbers(**state):
    """A number where state arrays go: ``adam(p, g, m, v, 1e-3, step=1)``
    took the lr for max_exp_avg_sqs, ``sgd(p, g, 0.9, lr=0.1)`` the momentum
    for buffers, then ignored (momentum 0)."""
    for k, a in state.items():
        if isinstance(a, (int, float, np.number)):      # (the Number ABC: ~2 us a call)
            raise TypeError(f"{k} must be arrays like params, got {type(a).__name__} {a!r}: "
                            "the hyperparameters (lr, momentum, betas, ...) and step are "
                            "keyword-only, e.g. lr=1e-3")


def _columns(be, named, optional):
    if getattr(be, "device", False):
        return _flatten_device(be, named, optional)
    return _flatten(named, optional)


def _check_step(step):
    step = V.check_int("step (the 1-based step count)", step, low=1)
    if step >= 2 ** 63:     # (the bias corrections take it as a float64)
        raise ValueError(f"step (the 1-based step count) must be below 2**63, got {step}")
    return step


def adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs=None, *, step,
         lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled=False,
         maximize=False, grad_scale=1.0, backend="auto"):
    """Adam step ``step`` (1-based) in place; see :class:`fastopt.Adam`.

    ``max_exp_avg_sqs`` turns amsgrad on; ``decoupled=True`` gives AdamW;
    ``grad_scale`` multiplies the gradient (e.g. a clip coefficient).
    """
    _refuse_numbers(exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
                    max_exp_avg_sqs=max_exp_avg_sqs)
    beta1, beta2 = V.check_betas(betas)
    s = adam_scalars(
        lr=V.check_real("lr", lr, low=0.0), beta1=beta1, beta2=beta2,
        eps=V.check_real("eps", eps, low=0.0, low_open=True, why=V.EPS_WHY),
        weight_decay=V.check_real("weight_decay", weight_decay, low=0.0),
        decoupled=V.check_bool("decoupled", decoupled), step=_check_step(step),
        grad_scale=V.check_real("grad_scale", grad_scale),
        maximize=V.check_bool("maximize", maximize))
    be = get_backend(backend_for(backend, params))
    columns = _columns(be, dict(params=params, grads=grads, exp_avgs=exp_avgs,
                                exp_avg_sqs=exp_avg_sqs, max_exp_avg_sqs=max_exp_avg_sqs),
                       optional=("max_exp_avg_sqs",))
    for p, g, m, v, vmax in zip(*columns):
        be.adam_update(p, g, m, v, vmax, s)


def adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs=None, *, step,
          lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, maximize=False,
          grad_scale=1.0, backend="auto"):
    """AdamW step: :func:`adam` with decoupled weight decay."""
    adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, step=step, lr=lr,
         betas=betas, eps=eps, weight_decay=weight_decay, decoupled=True,
         maximize=maximize, grad_scale=grad_scale, backend=backend)


def sgd(params, grads, momentum_buffers=None, *, lr, momentum=0.0, dampening=0.0,
        nesterov=False, weight_decay=0.0, maximize=False, first_step=False,
        grad_scale=1.0, backend="auto"):
    """SGD step in place; see :class:`fastopt.SGD`.

    With momentum, pass ``momentum_buffers`` and ``first_step=True`` on the
    first call (torch's ``buf = g``: whatever the buffers held, an
    ``np.empty_like`` one's NaN included, is zeroed first).
    """
    _refuse_numbers(momentum_buffers=momentum_buffers)
    momentum = V.check_real("momentum", momentum, low=0.0)
    dampening = V.check_real("dampening", dampening)
    nesterov = V.check_bool("nesterov", nesterov)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("nesterov needs momentum > 0 and dampening == 0")
    if momentum != 0 and momentum_buffers is None:
        raise ValueError("momentum != 0 needs momentum_buffers")
    s = sgd_scalars(lr=V.check_real("lr", lr, low=0.0), momentum=momentum,
                    dampening=dampening, nesterov=nesterov,
                    weight_decay=V.check_real("weight_decay", weight_decay, low=0.0),
                    first_step=V.check_bool("first_step", first_step),
                    grad_scale=V.check_real("grad_scale", grad_scale),
                    maximize=V.check_bool("maximize", maximize))
    be = get_backend(backend_for(backend, params))
    columns = _columns(be, dict(params=params, grads=grads,
                                momentum_buffers=momentum_buffers if momentum else None),
                       optional=("momentum_buffers",))
    for p, g, buf in zip(*columns):
        if first_step and buf is not None:
            # the kernel's first step is buf = 0 * buf + g: NaN left in the
            # buffer stayed NaN (checked above: nothing refused after this)
            buf[:] = 0          # (a 1-D view: host or device)
        be.sgd_update(p, g, buf, s)
