"""Mixed precision: 16-bit params and grads with a float32 master copy, one
fused AdamW pass, against torch's fused AdamW on bf16 params (no master
copy). :func:`adamw_step` builds one implementation (the asv suite times
it alone); :func:`mixed_precision_case` times them all in one run."""

from __future__ import annotations

import numpy as np

import fastopt

from . import machine, timing
from .cases import MIXED_PRECISION_ELEMENTS

#: AdamW's hyperparameters here: torch's defaults with weight decay 1e-2
HYPERS = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)


def dtype(name):
    """The NumPy dtype called ``name`` ("bfloat16" from ml_dtypes);
    NotImplementedError without ml_dtypes."""
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            raise NotImplementedError("ml_dtypes not installed") from None
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def data(n):
    """Float32 params and gradients (scaled 1e-2) of ``n`` elements."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal(n, dtype=np.float32)
    g = rng.standard_normal(n, dtype=np.float32) * np.float32(1e-2)
    return w, g


def adamw_step(impl, dtype_name, w, g):
    """A callable doing one AdamW step (:data:`HYPERS`) of ``impl`` (a
    fastopt backend, packed params with a float32 master copy below float32,
    or ``"torch-fused"``) on ``w`` and ``g`` cast to ``dtype_name``; already
    stepped once. NotImplementedError where it cannot run here (the asv
    suite's n/a)."""
    if impl == "torch-fused":
        torch = machine.torch_or_none()
        if torch is None:
            raise NotImplementedError("torch not installed")
        tdt = getattr(torch, dtype_name)
        p = torch.from_numpy(w.copy()).to(tdt)
        p.grad = torch.from_numpy(g.copy()).to(tdt)
        try:
            step = torch.optim.AdamW([p], fused=True, **HYPERS).step
            step()
        except (RuntimeError, TypeError, ValueError) as exc:   # a dtype torch cannot fuse
            raise NotImplementedError(f"not supported: {exc}") from None
        return step
    if impl not in fastopt.available_backends():
        raise NotImplementedError(f"backend {impl!r} not available")
    dt = dtype(dtype_name)
    params = fastopt.pack([w.astype(dt)])
    grads = params.zeros_like()
    grads.data[:] = g.astype(dt)
    opt = fastopt.AdamW(params, backend=impl, **HYPERS)

    def step():
        opt.step(grads)
    timing.warm_up(step)
    return step


def mixed_precision_case(n=MIXED_PRECISION_ELEMENTS, rounds=5, block=0.2, backends=None):
    """bf16 params + float32 master AdamW step vs torch's fused AdamW on bf16.

    Implementations, all AdamW with the same hyperparameters, ``n`` elements
    in one tensor:

    * ``fastopt-<backend> bf16+master``: bf16 params and grads, float32
      master weights and moments. One pass reads g (2 B), master, m, v
      (4 B each) and writes master, m, v (4 B each) and the rounded params
      (2 B): **28 bytes per element**, as many as a float32 step.
    * ``fastopt-<backend> float32``: the plain float32 step (28 B/element).
    * ``torch-fused bf16``: ``torch.optim.AdamW(fused=True)`` on bf16 params.
      torch keeps no master copy: params, m and v are all bf16 and updated in
      place, reading p, g, m, v (2 B each) and writing p, m, v (2 B each):
      **14 bytes per element**, with the update rounded to bf16 every step.
    * ``torch-fused float32``: the float32 fused step (28 B/element).

    Rounds are interleaved (every implementation once per round) and each
    time is the minimum over rounds of the mean over a block of calls, so a
    slow spell of a shared machine hits all alike; compare the ratios.
    Returns ``{"elements", "results": {impl: {"seconds", "bytes_per_element",
    "gbps", "vs_torch_fused_bf16"}}, "notes"}``.
    """
    dtype("bfloat16")
    w, g = data(n)
    fns, nbytes, notes = {}, {}, {}
    for be in backends or [b for b in ("numba", "cython") if b in fastopt.available_backends()]:
        for name, label in (("bfloat16", "bf16+master"), ("float32", "float32")):
            fns[f"fastopt-{be} {label}"] = adamw_step(be, name, w, g)
            nbytes[f"fastopt-{be} {label}"] = 28
    torch = machine.torch_or_none()
    if torch is None:
        notes["torch"] = "torch not installed"
    else:
        for name, label, nb in (("bfloat16", "bf16", 14), ("float32", "float32", 28)):
            try:
                fns[f"torch-fused {label}"] = adamw_step("torch-fused", name, w, g)
            except NotImplementedError as exc:
                notes[f"torch-fused {label}"] = str(exc)
                continue
            nbytes[f"torch-fused {label}"] = nb
        notes["torch_threads"] = torch.get_num_threads()
    notes["fastopt_threads"] = fastopt.get_num_threads()

    best = timing.time_all(fns, rounds, min_block=block)
    ref = best.get("torch-fused bf16")
    results = {name: {"seconds": s, "bytes_per_element": nbytes[name],
                      "gbps": nbytes[name] * n / s / 1e9,
                      "vs_torch_fused_bf16": ref / s if ref else None}
               for name, s in best.items()}
    return {"elements": n, "results": results, "notes": notes}
