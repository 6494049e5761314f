"""Benchmarks for fastopt.nn: same-run ratios against PyTorch (CPU) and NumPy.

Each function returns a dict (JSON-safe) of times and ratios measured in one
process run with the implementations interleaved round by round; a time is
the minimum over rounds of the mean step time in that round, so the ratios
compare like with like on a shared, noisy machine. The asv suite calls
these; ``python -m fastopt.bench.nn [step] [ensemble] [mnist] [--threads N]``
prints them.

* :func:`bench_train_step`: one training step (forward, backward, AdamW) of
  :data:`cases.TRAIN_STEP` (784-256-256-10, batch 256, float32), against
  torch (``fused=True`` AdamW) and a hand-written NumPy version; plus the
  fraction of the same-run sgemm throughput the step reaches.
* :func:`bench_ensemble`: :data:`cases.ENSEMBLE` (K=16 models 784-64-10,
  batch 128 each, its own mini-batch per model), one step; against the 16
  trained one after the other in torch and in fastopt, and torch written
  the fast way (stacked weights, ``torch.baddbmm``, fused AdamW).
* :func:`fastopt.bench.mnist.bench_mnist`: time to 94% held-out accuracy on
  the 8k/2k MNIST split, fastopt vs the same recipe in torch.

Threads (``threads=``):

* ``threads=1`` (the default): every implementation in this process, BLAS
  (through threadpoolctl), torch and fastopt's kernels on one thread. The
  stable comparison on a shared machine, and the one that isolates the code
  from the thread pools.
* ``threads=None``: each library at its own default thread count, as a user
  runs it. The step and ensemble benchmarks then time each implementation
  in its own process (:mod:`fastopt.bench.isolated`): in one process, a pool
  still spinning after one implementation's call (NumPy's OpenBLAS,
  SciPy's, torch's OpenMP) slows the next, and the ratios measured the
  neighbours (docs/performance.md). The MNIST race alternates epochs in one
  process at ``threads=n``; at ``threads=None`` each library trains in its
  own process.
"""

from __future__ import annotations

import math

import numpy as np

import fastopt

from ..nn.backends import available_backends
from ..nn.ensemble import Ensemble
from ..nn.mlp import MLP
from . import machine, timing
from .baselines import mlp_forward_backward, mlp_init, torch_mlp, torch_train_step
from .cases import ENSEMBLE, TRAIN_STEP


class Threads:
    """``threads=None``: every library at its default (BLAS and torch use all
    cores). ``threads=n``: BLAS (threadpoolctl) and torch limited to n
    threads for the whole measurement. fastopt's optimizer kernels run on
    one thread in both (they run between BLAS calls)."""

    def __init__(self, threads):
        self.threads = threads

    def __enter__(self):
        # Load every BLAS first (the cython backend's is scipy's OpenBLAS,
        # loaded on import): threadpoolctl only limits libraries already loaded.
        available_backends()
        self.saved = fastopt.get_num_threads()
        fastopt.set_num_threads(1)
        self.limits = None
        torch = machine.torch_or_none()
        self.torch_threads = torch.get_num_threads() if torch is not None else None
        if self.threads is not None:
            from threadpoolctl import threadpool_limits
            self.limits = threadpool_limits(self.threads)
            if torch is not None:
                torch.set_num_threads(self.threads)
        return self

    def __exit__(self, *exc):
        if self.limits is not None:
            self.limits.restore_original_limits()
        torch = machine.torch_or_none()
        if torch is not None and self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        fastopt.set_num_threads(self.saved)


def _mlp_flops(sizes, batch):
    """Matmul flops of one training step: forward, weight grads, input grads
    (none for the first layer)."""
    f = 0
    for l, (a, b) in enumerate(zip(sizes, sizes[1:])):
        f += 2 * batch * a * b * (3 if l else 2)
    return f


def _numpy_step(sizes, X, y, lr=1e-3, wd=1e-2):
    """A straightforward NumPy MLP step: :func:`baselines.mlp_forward_backward`
    (relu, softmax cross-entropy, new gradient arrays), then AdamW per
    tensor, in place, as one would write it by hand."""
    params = mlp_init(sizes)
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    t = [0]

    def step():
        grads = mlp_forward_backward(params, X, y)[1]
        t[0] += 1
        bc1, bc2 = 1 - 0.9 ** t[0], 1 - 0.999 ** t[0]
        for p_, g, m_, v_ in zip(params, grads, m, v):
            p_ *= 1 - lr * wd
            m_ *= 0.9
            m_ += 0.1 * g
            v_ *= 0.999
            v_ += 0.001 * g * g
            p_ -= (lr / bc1) * m_ / (np.sqrt(v_) / math.sqrt(bc2) + 1e-8)
    return step


def _step_data(sizes, batch):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((batch, sizes[0])).astype(np.float32)
    y = rng.integers(0, sizes[-1], batch)
    return rng, X, y


def make_step_impl(impl, sizes=TRAIN_STEP.sizes, batch=TRAIN_STEP.batch):
    """The callable that runs one training step of ``impl`` (a name from
    :func:`step_impls`); every process builds the same data from seed 0."""
    sizes = tuple(sizes)
    rng, X, y = _step_data(sizes, batch)
    if impl.startswith("fastopt-"):
        net = MLP(sizes, seed=0, backend=impl.split("-", 1)[1])
        opt = fastopt.AdamW(net.param_groups(), lr=1e-3)
        return lambda: net.train_step(opt, X, y)
    if impl == "numpy":
        return _numpy_step(sizes, X, y)
    if impl == "sgemm (the step's matmuls)":
        shapes = []
        for l, (a, b) in enumerate(zip(sizes, sizes[1:])):
            shapes.append(((batch, a), (a, b)))           # forward
            shapes.append(((a, batch), (batch, b)))       # weight grad
            if l:
                shapes.append(((batch, b), (b, a)))       # input grad
        mats = [(rng.standard_normal(s1).astype(np.float32),
                 rng.standard_normal(s2).astype(np.float32),
                 np.empty((s1[0], s2[1]), np.float32)) for s1, s2 in shapes]

        def gemms():
            for a, b, c in mats:
                np.dot(a, b, out=c)
        return gemms
    if impl == "sgemm 1024^3":
        big = rng.standard_normal((1024, 1024)).astype(np.float32)
        big_out = np.empty_like(big)
        return lambda: np.dot(big, big, out=big_out)
    if impl == "torch":
        torch = machine.torch_or_none()
        torch.manual_seed(0)
        tm = torch_mlp(torch, sizes)
        topt = torch.optim.AdamW(tm.parameters(), lr=1e-3, fused=True)
        tX, ty = torch.from_numpy(X), torch.from_numpy(y)

        return lambda: torch_train_step(torch, tm, topt, tX, ty)
    raise ValueError(f"unknown train-step implementation {impl!r}")


def step_impls(backends=None):
    names = [f"fastopt-{b}" for b in backends or _compiled_backends()]
    names += ["numpy", "sgemm (the step's matmuls)", "sgemm 1024^3"]
    return names + (["torch"] if machine.torch_or_none() is not None else [])


def _compiled_backends():
    return [b for b in available_backends() if b != "numpy"]


def _time_impls(factory, names, kwargs, rounds, threads):
    """``threads=n``: all in this process, libraries limited to n threads.
    ``threads=None``: each library at its defaults, each implementation in
    its own process (:mod:`fastopt.bench.isolated`); the BLAS details then come
    from this process, which loads the same libraries."""
    if threads is None:
        from .isolated import Impl, time_isolated
        impls = {n: Impl(f"fastopt.bench.nn:{factory.__name__}", dict(kwargs, impl=n),
                         ("torch",) if n.startswith("torch") else ())
                 for n in names}
        times = time_isolated(impls, rounds=rounds)
        available_backends()
        return times, machine.thread_pools()
    with Threads(threads):
        fns = {n: factory(n, **kwargs) for n in names}
        return timing.time_all(fns, rounds, min_block=0.05), machine.thread_pools()


def bench_train_step(sizes=TRAIN_STEP.sizes, batch=TRAIN_STEP.batch, rounds=7, backends=None,
                     threads=1):
    """One float32 training step (forward, backward, AdamW); same-run ratios."""
    sizes = tuple(sizes)
    times, blas = _time_impls(make_step_impl, step_impls(backends),
                              {"sizes": list(sizes), "batch": batch}, rounds, threads)
    flops = _mlp_flops(sizes, batch)
    out = {"case": f"train step {'-'.join(map(str, sizes))} batch {batch} float32 AdamW",
           "threads": threads or "default", "isolated_processes": threads is None,
           "times_s": times, "step_gflops": {}, "blas": blas}
    sgemm_step = flops / times["sgemm (the step's matmuls)"]
    sgemm_big = 2 * 1024 ** 3 / times["sgemm 1024^3"]
    out["sgemm_gflops"] = {"step shapes": sgemm_step / 1e9, "1024^3": sgemm_big / 1e9}
    for name, t in times.items():
        if name.startswith("fastopt"):
            r = {"vs_numpy": times["numpy"] / t,
                 "fraction_of_sgemm_step_shapes": (flops / t) / sgemm_step,
                 "fraction_of_sgemm_1024": (flops / t) / sgemm_big}
            if "torch" in times:
                r["vs_torch"] = times["torch"] / t
            out[name] = r
        if not name.startswith("sgemm"):
            out["step_gflops"][name] = flops / t / 1e9
    return out


def _ensemble_lrs(k):
    return [10.0 ** -(1 + 4 * i / max(k - 1, 1)) for i in range(k)]


def make_ensemble_impl(impl, k=ENSEMBLE.models, sizes=ENSEMBLE.sizes, batch=ENSEMBLE.batch):
    """One training step of K models, each on its own mini-batch, for
    ``impl`` (a name from :func:`ensemble_impls`); per-model lrs (a sweep)
    except where the name says "shared lr"."""
    sizes = tuple(sizes)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((k, batch, sizes[0])).astype(np.float32)
    y = rng.integers(0, sizes[-1], (k, batch))
    lrs = _ensemble_lrs(k)
    if impl.startswith("fastopt-"):
        be, how = impl[len("fastopt-"):].split(" ", 1)
        if how == "one by one":
            nets = [MLP(sizes, seed=i, backend=be) for i in range(k)]
            opts = [fastopt.AdamW(n.param_groups(), lr=lrs[i]) for i, n in enumerate(nets)]

            def one_by_one():
                for i in range(k):
                    nets[i].train_step(opts[i], X[i], y[i])
            return one_by_one
        ens = Ensemble(k, sizes, seed=0, backend=be)
        # per-model lrs: one param group (one kernel call) per model
        opt = fastopt.AdamW(ens.param_groups(lr=1e-3 if "shared lr" in how else lrs))
        return lambda: ens.train_step(opt, X, y)
    torch = machine.torch_or_none()
    torch.manual_seed(0)
    tX, ty = torch.from_numpy(X), torch.from_numpy(y)
    if impl == "torch one by one":
        models = [torch_mlp(torch, sizes) for _ in range(k)]
        topts = [torch.optim.AdamW(m.parameters(), lr=lrs[i], fused=True)
                 for i, m in enumerate(models)]

        def torch_one_by_one():
            for i in range(k):
                torch_train_step(torch, models[i], topts[i], tX[i], ty[i])
        return torch_one_by_one
    if impl == "torch bmm fused (shared lr)":
        W1 = torch.nn.Parameter(torch.randn(k, sizes[0], sizes[1]) * 0.05)
        b1 = torch.nn.Parameter(torch.zeros(k, 1, sizes[1]))
        W2 = torch.nn.Parameter(torch.randn(k, sizes[1], sizes[2]) * 0.05)
        b2 = torch.nn.Parameter(torch.zeros(k, 1, sizes[2]))
        bopt = torch.optim.AdamW([W1, b1, W2, b2], lr=1e-3, fused=True)

        def torch_bmm():
            bopt.zero_grad(set_to_none=False)
            h = torch.relu(torch.baddbmm(b1, tX, W1))
            o = torch.baddbmm(b2, h, W2)
            # sum of the K per-model mean losses: each model's own gradient
            loss = torch.nn.functional.cross_entropy(
                o.reshape(-1, sizes[2]), ty.reshape(-1), reduction="sum") / batch
            loss.backward()
            bopt.step()
        return torch_bmm
    raise ValueError(f"unknown ensemble implementation {impl!r}")


def ensemble_impls(backends=None):
    names = []
    for be in backends or _compiled_backends():
        names += [f"fastopt-{be} ensemble", f"fastopt-{be} ensemble, shared lr",
                  f"fastopt-{be} one by one"]
    if machine.torch_or_none() is not None:
        names += ["torch one by one", "torch bmm fused (shared lr)"]
    return names


def bench_ensemble(k=ENSEMBLE.models, sizes=ENSEMBLE.sizes, batch=ENSEMBLE.batch, rounds=7,
                   backends=None, threads=1):
    """K models, each its own mini-batch, one training step; same-run ratios."""
    sizes = tuple(sizes)
    times, blas = _time_impls(make_ensemble_impl, ensemble_impls(backends),
                              {"k": k, "sizes": list(sizes), "batch": batch}, rounds, threads)
    out = {"case": f"ensemble K={k} {'-'.join(map(str, sizes))} batch {batch} float32 AdamW",
           "threads": threads or "default", "isolated_processes": threads is None,
           "times_s": times, "blas": blas}
    for name, t in times.items():
        if name.startswith("fastopt") and "one by one" not in name:
            be = name.split()[0]
            r = {"vs_fastopt_one_by_one": times[f"{be} one by one"] / t}
            if "torch one by one" in times:
                r["vs_torch_one_by_one"] = times["torch one by one"] / t
                r["vs_torch_bmm_fused"] = times["torch bmm fused (shared lr)"] / t
            out[name] = r
    return out


def _print(res):
    import json
    print(json.dumps(res, indent=1, default=float))


def _summary(res):
    """The ratios only (drop BLAS details and histories) for printing."""
    return {k: v for k, v in res.items() if k not in ("blas", "history")}


def main(argv=None):
    """``python -m fastopt.bench.nn [step] [ensemble] [mnist] [--threads N]``:
    each named benchmark's ratios as JSON."""
    import argparse

    from .mnist import bench_mnist
    runs = {"step": bench_train_step, "ensemble": bench_ensemble, "mnist": bench_mnist}
    ap = argparse.ArgumentParser(prog="python -m fastopt.bench.nn",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("which", nargs="*", default=list(runs),
                    help=f"which benchmarks: {', '.join(runs)} (default: all three)")
    ap.add_argument("--threads", type=int, default=1,
                    help="BLAS and torch threads, all implementations in this process "
                         "(default 1); 0: each library's own default thread count, each "
                         "implementation in its own process (fastopt.bench.isolated)")
    a = ap.parse_args(argv)
    unknown = sorted(set(a.which) - set(runs))
    if unknown:
        ap.error(f"unknown benchmark {', '.join(unknown)}: use {', '.join(runs)}")
    for name in runs:
        if name in a.which:
            _print(_summary(runs[name](threads=a.threads or None)))


if __name__ == "__main__":
    main()
