"""The optimizer step inside a NumPy training loop, next to the same step hot.

Every other figure times the step hot: back to back, caches warm, nothing
else running. In a NumPy training loop the step runs right after the
forward/backward matmuls, which go through NumPy's BLAS (OpenBLAS: its
threads spin a while after each call), and then the optimizer's own threads
(OpenMP, or torch's) wake up and compete with them for the cores.
:func:`in_loop_case` times the step there, in a small MLP trained the way a
NumPy user writes it (:data:`fastopt.bench.cases.IN_LOOP`), next to the
same step hot.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time

import numpy as np

import fastopt
from fastopt.backends.threads import SERIAL_MAX

from . import isolated, machine, roofline, timing
from .baselines import NumpyAdam, mlp_forward_backward, mlp_init
from .cases import IN_LOOP, mlp_shapes

#: Adam's bytes streamed on one thread over the same arrays, in the same loop
#: (:func:`fastopt.bench.roofline.loop_streaming_step`): its loop/hot is what
#: the data's place alone costs the step in the loop
ROOFLINE = "roofline"
IN_LOOP_IMPLS = ("cython", "numba", "numpy", "torch-fused", "torch-fused-alone", ROOFLINE)
#: torch as its users run it: in a process of its own, imported before
#: anything else, so its bundled libgomp loads with its own defaults (the
#: row "torch-fused" shares this process's libgomp, loaded with fastopt's
#: short spin: see fastopt._openmp)
TORCH_ALONE = "torch-fused-alone"
IN_LOOP_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
               "GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


def mlp_data(sizes, batch, batches=4, seed=1):
    """``batches`` random mini-batches ``(X, y)``, generated once."""
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((batch, sizes[0]), dtype=np.float32),
             rng.integers(0, sizes[-1], batch)) for _ in range(batches)]


def _loop_optimizer(impl, ws, lr):
    """``(weights the model uses, step(grads))`` for ``impl`` on ``ws``, or
    ``(None, note)`` when it cannot run here. The step callable includes
    what a user must do to hand a fresh gradient list over: copy it into the
    FlatArrays (packed), set each tensor's ``.grad`` (torch)."""
    if impl == "numpy":
        return ws, NumpyAdam(ws, lr=lr).step
    if impl == ROOFLINE:
        return ws, roofline.loop_streaming_step(ws)
    if impl == "torch-fused":
        torch = machine.torch_or_none()
        if torch is None:
            return None, "torch not installed"
        tps = [torch.from_numpy(w) for w in ws]        # shares the NumPy arrays
        try:
            topt = torch.optim.Adam(tps, lr=lr, fused=True)
        except (RuntimeError, TypeError, ValueError) as e:
            return None, f"torch {torch.__version__}: {e}"
        from_numpy = torch.from_numpy

        def torch_step(grads):
            for t, g in zip(tps, grads):
                t.grad = from_numpy(g)
            topt.step()
        return ws, torch_step
    backend, packed = impl, False
    if impl.endswith("-packed"):
        backend, packed = impl[:-len("-packed")], True
    if backend not in fastopt.available_backends():
        return None, f"backend {backend!r} not available"
    if not packed:
        return ws, fastopt.Adam(ws, lr=lr, backend=backend).step
    flat = fastopt.pack(ws)
    gflat = flat.zeros_like()
    opt = fastopt.Adam(flat, lr=lr, backend=backend)

    def packed_step(grads):
        for dst, g in zip(gflat, grads):
            dst[...] = g
        opt.step(gflat)
    packed_step.optimizer = opt
    return list(flat), packed_step


class InLoopImpl:
    """One implementation in the training loop of :func:`in_loop_case`: a
    model trained with it (``train``) and a second copy whose optimizer
    steps back to back on one fixed gradient list (``hot``)."""

    def __init__(self, impl, sizes, batch, data=None, lr=1e-3, seed=0):
        self.impl = impl
        self.data = data if data is not None else mlp_data(sizes, batch)
        self.ws, self.step = _loop_optimizer(impl, mlp_init(sizes, seed), lr)
        if self.ws is None:
            raise NotImplementedError(self.step)
        hot_ws, self.hot_step = _loop_optimizer(impl, mlp_init(sizes, seed), lr)
        self.hot_grads = mlp_forward_backward(hot_ws, *self.data[0])[1]
        self.iterations = 0
        self.loss_first = self.loss_last = None

    def thread_choice(self):
        """What the training optimizer's step tables chose, serial or
        threaded, and why (fastopt only; "" for the others)."""
        opt = getattr(self.step, "__self__", None) or getattr(self.step, "optimizer", None)
        tables = getattr(opt, "_all_tables", None) or []
        return "; ".join(t.threads.describe() for t in tables if t.nelem > SERIAL_MAX)

    def forward_backward(self):
        X, y = self.data[self.iterations % len(self.data)]
        self.iterations += 1
        loss, grads = mlp_forward_backward(self.ws, X, y)
        if self.loss_first is None:
            self.loss_first = loss
        self.loss_last = loss
        return grads

    def train(self, n):
        """``n`` training iterations; mean seconds of the optimizer step alone
        (only the ``step(grads)`` call) and of the whole iteration."""
        clock = time.perf_counter
        step_s = total_s = 0.0
        for _ in range(n):
            t0 = clock()
            grads = self.forward_backward()
            t1 = clock()
            self.step(grads)
            t2 = clock()
            step_s += t2 - t1
            total_s += t2 - t0
        return step_s / n, total_s / n

    def hot(self, n):
        """Mean seconds of ``n`` steps back to back on the same gradients."""
        step, grads = self.hot_step, self.hot_grads
        t0 = time.perf_counter()
        for _ in range(n):
            step(grads)
        return (time.perf_counter() - t0) / n


def make_in_loop_impl(impl, sizes=IN_LOOP.sizes, batch=IN_LOOP.batch, data=None, lr=1e-3,
                      seed=0):
    """An :class:`InLoopImpl`, and a note: ``(None, note)`` when ``impl``
    cannot run here. ``impl``: a fastopt backend (plain list of arrays),
    ``"<backend>-packed"`` (:func:`fastopt.pack`, grads copied in),
    ``"numpy"`` (:class:`NumpyAdam`), ``"torch-fused"`` or ``"roofline"``
    (see :func:`in_loop_case`)."""
    try:
        return InLoopImpl(impl, tuple(sizes), batch, data, lr, seed), ""
    except NotImplementedError as e:
        return None, str(e)


def _fastest_backend(candidates, sizes, batch, data, lr):
    """The fastopt backend of ``candidates`` with the fastest hot list step."""
    if len(candidates) == 1:
        return candidates[0]
    hots = {c: make_in_loop_impl(c, sizes, batch, data, lr)[0] for c in candidates}
    fns = {c: (lambda h: lambda: h.hot_step(h.hot_grads))(h) for c, h in hots.items()}
    best = timing.time_all(fns, rounds=3, min_block=0.01)
    return min(best, key=best.get)


def _torch_alone(sizes, batch, steps, rounds, lr, seed, warmup, settle, timeout=900):
    """``in_loop_case``'s torch-fused row, measured in a new process that
    imports torch first; ``(row, None)`` or ``(None, note)``."""
    if machine.torch_or_none() is None:
        return None, "torch not installed"
    args = dict(impls=["torch-fused"], sizes=list(sizes), batch=batch, steps=steps,
                rounds=rounds, packed=None, lr=lr, seed=seed, warmup=warmup, settle=settle)
    try:          # torch first: its own libgomp, at its defaults
        report = isolated.run_once("fastopt.bench.in_loop:_case_and_libgomp", args,
                                   preload=("torch",), timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"the process of its own took over {timeout} s"
    except RuntimeError as e:
        return None, str(e)
    row = report["results"]["torch-fused"]
    if row["step_in_loop_s"] is None:
        return None, row["note"]
    row["libgomp"] = report["libgomp"]
    torchs = [p for p in report["libgomp"] if "/torch/" in p]
    row["note"] = ("own process, torch imported first (its libgomp at its defaults"
                   + (f": {torchs[0]}" if torchs else "") + ")")
    return row, None


def _case_and_libgomp(**case):
    """:func:`in_loop_case`'s report, with the libgomp copies this process mapped."""
    from fastopt import _openmp
    return {**in_loop_case(**case), "libgomp": _openmp._loaded_libgomps()}


def in_loop_case(impls=IN_LOOP_IMPLS, sizes=IN_LOOP.sizes, batch=IN_LOOP.batch, steps=50,
                 rounds=9, packed="fastest", lr=1e-3, seed=0, warmup=5, settle=0.2):
    """The Adam step inside a NumPy training loop, next to the same step hot.

    A ReLU MLP (``sizes``, float32, softmax cross-entropy, weights in a plain
    list) is trained with :func:`mlp_forward_backward` on a few random
    mini-batches generated once: ``@`` matmuls through NumPy's BLAS and new
    gradient arrays every step. Implementations (``impls``, each with its own
    copy of the same initial weights, all Adam with ``lr``): fastopt backends
    given the plain list (``fastopt.Adam(params, backend=...)``,
    ``opt.step(grads)``); ``"<backend>-packed"``, the params in one
    :func:`fastopt.pack` buffer and each step's gradients copied into a
    FlatArrays (``packed="fastest"`` adds it for the fastest fastopt backend
    in ``impls``, a backend name for that one, None for none); ``"numpy"``,
    :class:`NumpyAdam`; ``"torch-fused"``, ``torch.optim.Adam(fused=True)``
    over ``torch.from_numpy`` views of the weights, each ``.grad`` set to
    ``torch.from_numpy(g)`` every step (skipped with a note without torch);
    ``"roofline"``, no optimizer: Adam's bytes (p and the fresh g read, m
    and v read and written, p written) streamed on one thread with no math
    (:func:`fastopt.bench.roofline.loop_streaming_step`), so that its
    ``in_loop_vs_hot`` is what the data's place alone costs a step in this
    loop (which caches the forward/backward pass leaves the bytes in), with
    no thread to wake; its ``vs_*`` ratios are None;
    ``"torch-fused-alone"``, the same in a new process that imports torch
    before anything else, as a torch user runs it. The difference is
    libgomp's: in this process torch shares the libgomp fastopt's kernels
    loaded with a short spin; imported first, torch loads its own copy with
    its default spin, whose idle workers busy-wait through the BLAS
    forward/backward pass and then wait for a time slice (measured here:
    2.8-7.8 ms a step in the loop against 0.3-0.4 ms sharing fastopt's).
    That row's times are measured alone, not interleaved with the others.

    Three times per implementation, all in this process:

    * ``step_in_loop_s``: the optimizer step alone (the ``step(grads)``
      call, the grads hand-over included) with the forward/backward pass
      before it every iteration;
    * ``train_step_s``: the whole iteration, forward, backward and step;
    * ``step_hot_s``: the step back to back on one fixed gradient list (a
      second copy of the model), no BLAS in between.

    Each round first waits ``settle`` seconds (OpenBLAS's idle workers
    busy-wait ~0.1 s after a call before they sleep), runs ``steps`` hot
    steps of every implementation, then ``steps`` training iterations of
    every implementation, one after the other (the order rotates each round,
    so a slow spell hits all alike); each time is the median over ``rounds``
    of the round's mean. Ratios (same run): ``in_loop_vs_hot`` =
    step_in_loop_s / step_hot_s; ``vs_numpy`` and ``vs_torch_fused`` = that
    implementation's time / this one's, for each of the three times;
    ``vs_torch_alone`` the same against ``"torch-fused-alone"``.
    ``roofline_in_loop_vs_hot``: the roofline row's ``in_loop_vs_hot``
    (None without it), and ``in_loop_vs_hot_over_roofline`` each other row's
    over it (this process's rows).
    ``loss_first``/``loss_last``: the training loss at the first and the
    last iteration (the same for every implementation up to rounding: they
    train the same model). ``environment``: load averages, whether another
    process used the CPUs during the run, the BLAS/OpenMP libraries as
    threadpoolctl sees them, fastopt's and torch's thread counts and the
    thread-related environment variables that are set.
    """
    t_start = time.perf_counter()
    since = timing.load_snapshot()
    sizes = tuple(sizes)
    data = mlp_data(sizes, batch)
    impls = list(dict.fromkeys(impls))
    notes = {}
    if packed:
        listed = [i for i in impls if i in fastopt.available_backends() and i != "numpy"]
        if packed != "fastest":
            be = packed
        elif listed:
            be = _fastest_backend(listed, sizes, batch, data, lr)
        else:
            be = None
            notes["packed"] = "no fastopt backend among impls to pack for"
        if be and f"{be}-packed" not in impls:
            at = max((impls.index(i) + 1 for i in listed), default=0)
            impls.insert(at, f"{be}-packed")
    alone = None
    if TORCH_ALONE in impls:
        alone, note = _torch_alone(sizes, batch, steps, rounds, lr, seed, warmup, settle)
        if alone is None:
            notes[TORCH_ALONE] = note
    loops = {}
    for impl in impls:
        if impl == TORCH_ALONE:
            continue
        loop, note = make_in_loop_impl(impl, sizes, batch, data, lr, seed)
        if loop is None:
            notes[impl] = note
        else:
            loops[impl] = loop
    for loop in loops.values():              # compile, fault pages in, start pools
        loop.train(warmup)
        loop.hot(warmup)
    samples = {impl: {"step_in_loop": [], "train_step": [], "step_hot": []}
               for impl in loops}
    order = list(loops)
    for r in range(rounds):
        rotated = order[r % len(order):] + order[:r % len(order)]
        time.sleep(settle)                   # BLAS workers stop spinning, then sleep
        for impl in rotated:
            samples[impl]["step_hot"].append(loops[impl].hot(steps))
        for impl in rotated:
            step_s, total_s = loops[impl].train(steps)
            samples[impl]["step_in_loop"].append(step_s)
            samples[impl]["train_step"].append(total_s)
    med = {impl: {k: float(np.median(v)) for k, v in s.items()} for impl, s in samples.items()}
    if alone is not None:
        med[TORCH_ALONE] = {k: alone[f"{k}_s"] for k in ("step_in_loop", "train_step",
                                                          "step_hot")}
    results = {}
    for impl in impls:
        if impl not in med:
            results[impl] = {"step_in_loop_s": None, "train_step_s": None,
                             "step_hot_s": None, "in_loop_vs_hot": None,
                             "vs_numpy": None, "vs_torch_fused": None, "vs_torch_alone": None,
                             "note": notes[impl]}
            continue
        m = med[impl]
        row = {"step_in_loop_s": m["step_in_loop"], "train_step_s": m["train_step"],
               "step_hot_s": m["step_hot"],
               "in_loop_vs_hot": m["step_in_loop"] / m["step_hot"]}
        for key, ref in (("vs_numpy", "numpy"), ("vs_torch_fused", "torch-fused"),
                         ("vs_torch_alone", TORCH_ALONE)):
            row[key] = ({k: med[ref][k] / m[k] for k in m}
                        if ref in med and impl != ROOFLINE else None)
        if impl == TORCH_ALONE:
            results[impl] = {**alone, **row, "note": alone["note"]}
            continue
        loop = loops[impl]
        row.update(loss_first=loop.loss_first, loss_last=loop.loss_last,
                   iterations=loop.iterations, rounds_s=samples[impl], note="",
                   thread_choice=loop.thread_choice())
        if impl.endswith("-packed"):
            row["note"] = "fastopt.pack; grads copied into a FlatArrays each step"
        elif impl == "torch-fused":
            row["note"] = "torch.from_numpy views; .grad set each step"
        elif impl == "numpy":
            row["note"] = "naive NumPy Adam, per array"
        elif impl == ROOFLINE:
            row["note"] = ("Adam's bytes streamed on one thread, no math "
                           "(loop/hot: what the data's place costs)")
        else:
            row["note"] = "plain list of arrays"
        results[impl] = row
    wall = time.perf_counter() - t_start
    torch = sys.modules.get("torch")
    env = {
        **timing.load_since(since),
        "thread_pools": machine.thread_pools(),
        "fastopt_threads": fastopt.get_num_threads(),
        "torch_threads": torch.get_num_threads() if torch is not None and hasattr(
            torch, "get_num_threads") else None,
        "threads_env": {k: os.environ[k] for k in IN_LOOP_ENV if k in os.environ},
        "cpus": os.cpu_count(),
    }
    if env["thread_pools"] is None:
        notes["thread_pools"] = "threadpoolctl not installed: BLAS details unknown"
    n_params = sum(math.prod(s) for s in mlp_shapes(sizes))
    # each row's loop/hot over the roofline's: what it loses in the loop
    # beyond what its bytes do (rows of this process only)
    roof = results.get(ROOFLINE, {}).get("in_loop_vs_hot")
    over_roofline = ({impl: r["in_loop_vs_hot"] / roof for impl, r in results.items()
                      if impl not in (ROOFLINE, TORCH_ALONE) and r["in_loop_vs_hot"]}
                     if roof else None)
    return {"case": (f"NumPy MLP {'-'.join(map(str, sizes))}, batch {batch}, float32, "
                     f"Adam lr={lr:g}"),
            "sizes": list(sizes), "batch": batch, "params": int(n_params),
            "steps": steps, "rounds": rounds, "impls": impls,
            "results": results, "roofline_in_loop_vs_hot": roof,
            "in_loop_vs_hot_over_roofline": over_roofline,
            "notes": notes, "environment": env, "wall_s": wall}
