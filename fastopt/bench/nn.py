"""Benchmarks for fastopt.nn: same-run ratios against PyTorch (CPU) and NumPy.

Each function returns a dict (JSON-safe) of times and ratios measured in one
process run with the implementations interleaved round by round; a time is
the minimum over rounds of the mean step time in that round, so the ratios
compare like with like on a shared, noisy machine. The asv suite can call
these; ``python -m fastopt.bench.nn`` prints all three.

* :func:`bench_train_step`: one training step (forward, backward, AdamW) of
  784-256-256-10, batch 256, float32, against torch (``fused=True`` AdamW)
  and a hand-written NumPy version; plus the fraction of the same-run sgemm
  throughput the step reaches.
* :func:`bench_ensemble`: K=16 models 784-64-10, batch 128 each (its own
  mini-batch per model), one step; against the 16 trained one after the
  other in torch and in fastopt, and torch written the fast way (stacked
  weights, ``torch.baddbmm``, fused AdamW).
* :func:`bench_mnist`: time to 94% held-out accuracy on the 8k/2k MNIST
  split, fastopt vs the same recipe (same initial weights, batches and lr
  schedule) in torch.

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
  neighbours (docs/performance.md). :func:`bench_mnist` alternates epochs in
  one process and is only meaningful at ``threads=1``.
"""

from __future__ import annotations

import math
import time

import numpy as np

import fastopt

from ..nn.backends import available_backends
from ..nn.ensemble import Ensemble
from ..nn.mlp import MLP
from . import time_all, torch_or_none


def _blas_info():
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    return [{k: i.get(k) for k in ("internal_api", "prefix", "version", "architecture",
                                   "num_threads")} for i in threadpool_info()]


class _Threads:
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
        torch = torch_or_none()
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
        torch = torch_or_none()
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


def _numpy_step(sizes, batch, rng, lr=1e-3, wd=1e-2):
    """A straightforward NumPy MLP step (relu, softmax CE, AdamW), as one
    would write it by hand: temporaries everywhere, AdamW per tensor."""
    Ws = [(rng.standard_normal((a, b)) * math.sqrt(2 / a)).astype(np.float32)
          for a, b in zip(sizes, sizes[1:])]
    bs = [np.zeros(b, np.float32) for b in sizes[1:]]
    params = [p for pair in zip(Ws, bs) for p in pair]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    X = rng.standard_normal((batch, sizes[0])).astype(np.float32)
    y = rng.integers(0, sizes[-1], batch)
    t = [0]

    def step():
        acts, pre = [X], []
        for l, (W, b) in enumerate(zip(Ws, bs)):
            z = acts[-1] @ W + b
            pre.append(z)
            acts.append(np.maximum(z, 0) if l < len(Ws) - 1 else z)
        z = acts[-1]
        e = np.exp(z - z.max(axis=1, keepdims=True))
        p = e / e.sum(axis=1, keepdims=True)
        d = p
        d[np.arange(batch), y] -= 1
        d /= batch
        grads = [None] * len(params)
        for l in range(len(Ws) - 1, -1, -1):
            grads[2 * l] = acts[l].T @ d
            grads[2 * l + 1] = d.sum(axis=0)
            if l:
                d = (d @ Ws[l].T) * (pre[l - 1] > 0)
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


def _torch_mlp(torch, sizes):
    layers = []
    for l, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(torch.nn.Linear(a, b))
        if l < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def make_step_impl(impl, sizes=(784, 256, 256, 10), batch=256):
    """The callable that runs one training step of ``impl`` (a name from
    :func:`step_impls`); every process builds the same data from seed 0."""
    sizes = tuple(sizes)
    rng, X, y = _step_data(sizes, batch)
    if impl.startswith("fastopt-"):
        net = MLP(sizes, seed=0, backend=impl.split("-", 1)[1])
        opt = fastopt.AdamW(net.param_groups(), lr=1e-3)
        return lambda: net.train_step(opt, X, y)
    if impl == "numpy":
        return _numpy_step(sizes, batch, rng)
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
        torch = torch_or_none()
        torch.manual_seed(0)
        tm = _torch_mlp(torch, sizes)
        topt = torch.optim.AdamW(tm.parameters(), lr=1e-3, fused=True)
        tX, ty = torch.from_numpy(X), torch.from_numpy(y)

        def torch_step():
            topt.zero_grad(set_to_none=False)
            torch.nn.functional.cross_entropy(tm(tX), ty).backward()
            topt.step()
        return torch_step
    raise ValueError(f"unknown train-step implementation {impl!r}")


def step_impls(backends=None):
    names = [f"fastopt-{b}" for b in backends or _compiled_backends()]
    names += ["numpy", "sgemm (the step's matmuls)", "sgemm 1024^3"]
    return names + (["torch"] if torch_or_none() is not None else [])


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
        return times, _blas_info()
    with _Threads(threads):
        fns = {n: factory(n, **kwargs) for n in names}
        return time_all(fns, rounds, min_block=0.05), _blas_info()


def bench_train_step(sizes=(784, 256, 256, 10), batch=256, rounds=7, backends=None,
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


def make_ensemble_impl(impl, k=16, sizes=(784, 64, 10), batch=128):
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
    torch = torch_or_none()
    torch.manual_seed(0)
    tX, ty = torch.from_numpy(X), torch.from_numpy(y)
    if impl == "torch one by one":
        models = [_torch_mlp(torch, sizes) for _ in range(k)]
        topts = [torch.optim.AdamW(m.parameters(), lr=lrs[i], fused=True)
                 for i, m in enumerate(models)]

        def torch_one_by_one():
            for i in range(k):
                topts[i].zero_grad(set_to_none=False)
                torch.nn.functional.cross_entropy(models[i](tX[i]), ty[i]).backward()
                topts[i].step()
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
    if torch_or_none() is not None:
        names += ["torch one by one", "torch bmm fused (shared lr)"]
    return names


def bench_ensemble(k=16, sizes=(784, 64, 10), batch=128, rounds=7, backends=None,
                   threads=1):
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


def _warm_up(impls, sizes, batch, backend, Xtr, ytr, Xte, yte, torch, steps=5):
    """A few steps of throwaway models of the same shapes, so that one-time
    costs (importing Numba and loading its cached kernels, BLAS and torch
    thread pools, first-touch of workspaces) are not counted as training
    time. Returns the seconds the first fastopt and torch steps took (the
    cold-start cost a user sees once per process)."""
    first = {}
    for impl in impls:
        if not impl.startswith("fastopt"):
            continue
        net = _fastopt_mlp(impl, sizes, seed=123, backend=backend)
        opt = fastopt.AdamW(net.param_groups(), lr=1e-3)
        for i in range(steps):
            t0 = time.perf_counter()
            net.train_step(opt, Xtr[:batch], ytr[:batch])
            if i == 0:
                first[impl] = time.perf_counter() - t0
        net.accuracy(Xte, yte)
        if impl == "fastopt":     # the sparse-input kernels too, whichever path it took
            net.sparse_input = True
            net.train_step(opt, Xtr[:batch], ytr[:batch])
    if "torch" in impls:
        tm = _torch_mlp(torch, sizes)
        topt = torch.optim.AdamW(tm.parameters(), lr=1e-3, fused=True)
        tX, ty = torch.from_numpy(Xtr[:batch]), torch.from_numpy(ytr[:batch])
        for i in range(steps):
            t0 = time.perf_counter()
            topt.zero_grad(set_to_none=False)
            torch.nn.functional.cross_entropy(tm(tX), ty).backward()
            topt.step()
            if i == 0:
                first["torch"] = time.perf_counter() - t0
        with torch.no_grad():
            tm(torch.from_numpy(Xte))
    return first


def _fastopt_mlp(impl, sizes, seed, backend):
    """``fastopt`` as a user gets it, or ``fastopt_dense``: the first layer
    forced to dense BLAS matmuls (``sparse_input=False``), to show what the
    sparse-input layer is worth on MNIST."""
    net = MLP(sizes, seed=seed, backend=backend)
    if impl == "fastopt_dense":
        net.sparse_input = False
    return net


class _MnistTrainer:
    """One implementation of the MNIST recipe: ``epoch(order)`` trains one
    epoch over the permutation ``order`` and returns its seconds;
    ``accuracy()`` is the held-out accuracy (not timed)."""

    def __init__(self, impl, data, sizes, steps, batch, lr, seed, backend):
        from ..nn.training import _BatchGatherer, make_optimizer
        Xtr, ytr, Xte, yte = data
        self.impl, self.batch, self.Xte, self.yte = impl, batch, Xte, yte
        net = _fastopt_mlp(impl, sizes, seed, backend)
        opt = make_optimizer(net, "adamw", lr, schedule="warmup-cosine", total_steps=steps)
        self.backend = net.backend
        if impl.startswith("fastopt"):
            self.net, self.opt = net, opt
            self.gather = _BatchGatherer(Xtr, ytr, np.float32)    # as fit does
            return
        torch = self.torch = torch_or_none()
        sched = opt.lr_schedule(0)
        torch.manual_seed(seed)
        tm = _torch_mlp(torch, sizes)
        with torch.no_grad():      # the same initial weights as fastopt's
            for l, lin in enumerate(m for m in tm if isinstance(m, torch.nn.Linear)):
                lin.weight.copy_(torch.from_numpy(net.W[l].T.copy()))
                lin.bias.zero_()
        self.tm = tm
        self.topt = torch.optim.AdamW(tm.parameters(), lr=lr, fused=True)
        self.tsched = torch.optim.lr_scheduler.LambdaLR(self.topt, lambda s: sched(s) / lr)
        self.tX, self.ty = torch.from_numpy(Xtr), torch.from_numpy(ytr)
        self.tXe = torch.from_numpy(Xte)

    def epoch(self, order):
        batch = self.batch
        if self.impl.startswith("fastopt"):
            t0 = time.perf_counter()
            for s in range(0, order.size, batch):
                self.net.train_step(self.opt, *self.gather(order[s:s + batch]))
            return time.perf_counter() - t0
        torch = self.torch
        oi = torch.from_numpy(order)
        t0 = time.perf_counter()
        for s in range(0, order.size, batch):
            idx = oi[s:s + batch]
            self.topt.zero_grad(set_to_none=False)
            torch.nn.functional.cross_entropy(self.tm(self.tX[idx]), self.ty[idx]).backward()
            self.topt.step()
            self.tsched.step()
        return time.perf_counter() - t0

    def accuracy(self):
        if self.impl.startswith("fastopt"):
            return self.net.accuracy(self.Xte, self.yte)
        with self.torch.no_grad():
            return float((self.tm(self.tXe).argmax(1).numpy() == self.yte).mean())


def _mnist_setup(hidden, epochs, batch, seed, data_dir):
    from ..data import mnist_split
    data = mnist_split(data_dir)
    sizes = (data[0].shape[1], *hidden, 10)
    steps = epochs * -(-data[0].shape[0] // batch)
    rng = np.random.default_rng(seed)
    orders = [rng.permutation(data[0].shape[0]) for _ in range(epochs)]
    return data, sizes, steps, orders


def _mnist_train(impls, hidden, epochs, batch, lr, target, seed, backend, data_dir):
    """Train every implementation in ``impls`` in this process, alternating
    epochs so machine noise hits them alike; training time only."""
    data, sizes, steps, orders = _mnist_setup(hidden, epochs, batch, seed, data_dir)
    torch = torch_or_none() if "torch" in impls else None
    first = _warm_up(impls, sizes, batch, backend, *data, torch)
    trainers = {i: _MnistTrainer(i, data, sizes, steps, batch, lr, seed, backend)
                for i in impls}
    hist = {i: [] for i in impls}
    reach = dict.fromkeys(impls)
    spent = dict.fromkeys(impls, 0.0)
    for e in range(epochs):
        for i, tr in trainers.items():
            spent[i] += tr.epoch(orders[e])
            acc = tr.accuracy()
            hist[i].append({"epoch": e + 1, "seconds": spent[i], "val_acc": acc})
            if acc >= target and reach[i] is None:
                reach[i] = spent[i]
    return {"history": hist, "time_to_target_s": reach, "train_seconds": spent,
            "first_step_s": {i: first[i] for i in impls if i in first},
            "backend": trainers["fastopt"].backend if "fastopt" in trainers else backend,
            "sizes": sizes}


def _mnist_in_own_process(impl, kwargs):
    """:func:`_mnist_train` of one implementation in a fresh process whose
    environment is the one that library's users have (see fastopt.bench.isolated)."""
    import json
    import subprocess
    import sys

    pre = "import torch; " if impl == "torch" else ""
    code = (pre + "import json, sys; from fastopt.bench.nn import _mnist_train; "
            "kw = json.loads(sys.argv[1]); "
            "print('@@' + json.dumps(_mnist_train([sys.argv[2]], **kw), default=float))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs), impl],
                         capture_output=True, text=True)
    lines = [l for l in out.stdout.splitlines() if l.startswith("@@")]
    if out.returncode or not lines:
        raise RuntimeError(f"MNIST benchmark of {impl!r} failed:\n{out.stderr[-2000:]}")
    return json.loads(lines[-1][2:])


def bench_mnist(hidden=(256, 256), epochs=15, batch=128, lr=1e-3, target=0.94, seed=0,
                backend="auto", data_dir=None, torch_too=True, threads=1, repeats=2,
                dense_too=True):
    """Time to ``target`` held-out accuracy on the 8k/2k MNIST split: fastopt
    (the loop of :func:`fastopt.nn.training.fit`, unrolled here) vs the same
    recipe in torch (same initial weights, same batches, AdamW with the same
    warmup-cosine lr per step). Training time only (the per-epoch evaluation
    is not counted; one-time warm-up is done on throwaway models first and
    reported as ``first_step_s``).

    ``threads=n``: both in this process, libraries on n threads, epochs
    alternating. ``threads=None``: each library at its defaults in its own
    process, fastopt and torch runs alternating ``repeats`` times; the
    fastest run of each counts (training is deterministic, so every run
    reaches the target at the same epoch).

    ``dense_too``: also ``fastopt_dense``, fastopt with its first layer
    forced to dense matmuls, so the gain of the sparse-input layer (MNIST
    is 81% zeros) is reported apart from the rest."""
    impls = (["fastopt"] + (["fastopt_dense"] if dense_too else [])
             + (["torch"] if torch_too and torch_or_none() is not None else []))
    kwargs = {"hidden": list(hidden), "epochs": epochs, "batch": batch, "lr": lr,
              "target": target, "seed": seed, "backend": backend, "data_dir": data_dir}
    if threads is not None:
        with _Threads(threads):
            run = _mnist_train(impls, **kwargs)
    else:
        run = None
        for _ in range(repeats):
            for i in impls:
                r = _mnist_in_own_process(i, kwargs)
                if run is None:
                    run = {k: {} if isinstance(v, dict) else v for k, v in r.items()}
                for key in ("history", "time_to_target_s", "train_seconds", "first_step_s"):
                    old = run[key].get(i)
                    new = r[key].get(i)
                    faster = (key == "history" and (old is None or new[-1]["seconds"]
                                                   < old[-1]["seconds"]))
                    if key == "history":
                        if faster:
                            run[key][i] = new
                    elif new is not None and (old is None or new < old):
                        run[key][i] = new
    sizes = run["sizes"]
    hist, reach, spent = run["history"], run["time_to_target_s"], run["train_seconds"]
    res = {"case": f"MNIST 8k/2k {'-'.join(map(str, sizes))} AdamW lr {lr} "
                   f"warmup-cosine batch {batch}, {epochs} epochs",
           "backend": run["backend"], "target": target, "threads": threads or "default",
           "isolated_processes": threads is None, "first_step_s": run["first_step_s"],
           "history": hist, "time_to_target_s": reach,
           "final_val_acc": {k: v[-1]["val_acc"] for k, v in hist.items() if v},
           "train_seconds": spent}
    for i in impls if "torch" in spent else ():
        if i == "torch":
            continue
        if reach.get(i) and reach.get("torch"):   # None or absent: never reached
            res[f"time_to_target_ratio_{i}_over_torch"] = reach[i] / reach["torch"]
        res[f"epoch_time_ratio_{i}_over_torch"] = spent[i] / spent["torch"]
    return res


def _print(res):
    import json
    print(json.dumps(res, indent=1, default=float))


def _summary(res):
    """The ratios only (drop BLAS details and histories) for printing."""
    return {k: v for k, v in res.items() if k not in ("blas", "history")}


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("which", nargs="*", default=["step", "ensemble", "mnist"])
    ap.add_argument("--threads", type=int, default=1,
                    help="BLAS and torch threads, all implementations in this process "
                         "(default 1); 0: each library's own default thread count, each "
                         "implementation in its own process (fastopt.bench.isolated)")
    a = ap.parse_args()
    a.threads = a.threads or None
    if "step" in a.which:
        _print(_summary(bench_train_step(threads=a.threads)))
    if "ensemble" in a.which:
        _print(_summary(bench_ensemble(threads=a.threads)))
    if "mnist" in a.which:
        _print(_summary(bench_mnist(threads=a.threads)))
