"""One step of any implementation of a case, as a zero-argument callable.

Every implementation builds its own arrays from the same seeds (params from
seed 1, gradients from seed 2), so they step the same numbers and none
shares memory with another. Each callable carries ``params``: the NumPy
arrays its step updates in place, so a caller can see that it really
stepped.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np

import fastopt
from fastopt._memory import state_copy, state_zeros

from . import baselines, cases, machine, roofline

_FRESH = 3     # gradient lists a list-layout step cycles through


def rand(shape_or_n, dtype, seed):
    """Standard normal values of ``dtype``, drawn in that dtype: 16M float64
    normals cast down would take longer than the steps they feed."""
    return np.random.default_rng(seed).standard_normal(shape_or_n, dtype=np.dtype(dtype))


def _observable(fn, params):
    """``fn`` carrying ``params`` (the arrays it updates). A function takes
    the attribute itself (no wrapper, whose call would be timed with the
    step); a bound method (torch's ``opt.step``) cannot, so it goes into a
    partial, which calls straight through."""
    try:
        fn.params = list(params)
    except AttributeError:
        fn = functools.partial(fn)
        fn.params = list(params)
    return fn


def _fastopt_step(kind, shapes, dt, clip, backend, layout, state):
    cls = getattr(fastopt, cases.KIND[kind].optimizer)
    hyper = dict(backend=backend, max_grad_norm=1.0 if clip else None, **cases.HYPERS[kind])
    if state != "float32":
        hyper["state_dtype"] = state
    if layout == "list":
        ps = [rand(s, dt, 1) for s in shapes]
        opt = cls(ps, **hyper)
        fresh = itertools.cycle([[rand(s, dt, 2 + i) for s in shapes]
                                 for i in range(_FRESH)]).__next__
        return _observable(lambda: opt.step(fresh()), ps)
    params = fastopt.pack([rand(s, dt, 1) for s in shapes])
    grads = params.zeros_like()
    grads.data[:] = rand(params.data.size, dt, 2)
    opt = cls(params, **hyper)
    return _observable(lambda: opt.step(grads), [params.data])


def _roofline_step(kind, n, dt, clip, state="float32"):
    """The step's memory passes (:attr:`cases.Kind.passes`) as streaming
    kernels over arrays of its size, p first; compact ``state`` as arrays of
    its codes' width (an 8-bit buffer's absmax, 1/64 of its bytes, aside).
    The state arrays sit in memory as an optimizer's do (fastopt._memory):
    made back to back with np.zeros, two 64M bfloat16 buffers took this
    kernel 31-33 ms against the optimizer's 17-24 ms."""
    passes = cases.KIND[kind].passes
    arrays = [rand(n, dt, s) for s in range(max(r for r, _ in passes))]   # p, g, state
    if state != "float32":
        from ..backends.compact import code_dtype
        arrays[2:] = [state_zeros(n, code_dtype(state, signed=True)) for _ in arrays[2:]]
    else:
        arrays[2:] = [state_copy(a) for a in arrays[2:]]
    return _observable(roofline.streaming_step(passes, arrays, clip), arrays[:1])


def make_step(impl, kind, shapes, dtype="float32", clip=False, layout="packed",
              state="float32"):
    """A zero-argument callable doing one step of ``impl``, and a note.

    ``impl`` is a fastopt backend name, ``"roofline"``, ``"numpy"``,
    ``"torch-fused"``, ``"torch-foreach"`` or ``"torch-forloop"``; ``kind``
    one of :data:`cases.KINDS` (the optimizer and its hyperparameters, see
    :data:`cases.KIND`); ``shapes`` the tensors; ``layout`` how fastopt
    holds them (see :data:`cases.LAYOUTS`; the baselines always take
    separate arrays); ``state`` fastopt's ``state_dtype`` (the baselines
    keep float32 state; the roofline streams the step's own bytes). The
    callable's ``params`` are the arrays it updates.
    The callable is None when the implementation cannot run here (no torch,
    a torch path or optimizer torch lacks, no GPU), and the note says why.
    """
    if kind not in cases.KIND:
        raise ValueError(f"kind must be one of {cases.KINDS}, got {kind!r}")
    if layout not in cases.LAYOUTS:
        raise ValueError(f"layout must be one of {cases.LAYOUTS}, got {layout!r}")
    dt = np.dtype(dtype)
    spec = cases.KIND[kind]
    if impl == "roofline":
        n = sum(int(np.prod(s)) for s in shapes)
        return _roofline_step(kind, n, dt, clip, state), "streaming kernel, same bytes"
    if impl == "numpy" or impl in cases.TORCH_PATHS:
        ps = [rand(s, dt, 1) for s in shapes]
        gs = [rand(s, dt, 2) for s in shapes]
        if impl == "numpy":
            fn, note = baselines.numpy_optimizer_step(spec.numpy_step, spec.hypers, ps, gs,
                                                      clip), "straightforward NumPy"
        else:
            fn, note = baselines.torch_optimizer_step(spec, ps, gs, clip,
                                                      impl.split("-", 1)[1])
        return (fn if fn is None else _observable(fn, ps)), note
    if impl in cases.GPU_IMPLS:
        gpu = machine.gpu_name()
        if gpu is None:
            return None, "no GPU"
        return None, f"{gpu}: GPU steps are timed by benchmarks/gpu_check.py, not here"
    if impl in fastopt.available_backends():
        return _fastopt_step(kind, shapes, dt, clip, impl, layout, state), ""
    return None, f"backend {impl!r} not available"
