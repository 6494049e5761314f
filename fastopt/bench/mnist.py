"""The MNIST race: time to a held-out accuracy target on the 8k/2k split,
fastopt against the same recipe (:data:`fastopt.bench.cases.MNIST`: same
initial weights, batches and lr schedule) in torch.
``python -m fastopt.bench.nn mnist`` runs it."""

from __future__ import annotations

import time

import numpy as np

import fastopt

from ..nn.mlp import MLP
from . import machine
from .baselines import torch_mlp, torch_train_step
from .cases import MNIST
from .nn import Threads


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
        tm = torch_mlp(torch, sizes)
        topt = torch.optim.AdamW(tm.parameters(), lr=1e-3, fused=True)
        tX, ty = torch.from_numpy(Xtr[:batch]), torch.from_numpy(ytr[:batch])
        for i in range(steps):
            t0 = time.perf_counter()
            torch_train_step(torch, tm, topt, tX, ty)
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
        torch = self.torch = machine.torch_or_none()
        sched = opt.lr_schedule(0)
        torch.manual_seed(seed)
        tm = torch_mlp(torch, sizes)
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
            torch_train_step(torch, self.tm, self.topt, self.tX[idx], self.ty[idx])
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
    torch = machine.torch_or_none() if "torch" in impls else None
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
    from .isolated import run_once
    try:
        return run_once("fastopt.bench.mnist:_mnist_train", dict(kwargs, impls=[impl]),
                        preload=("torch",) if impl == "torch" else ())
    except RuntimeError as e:
        raise RuntimeError(f"MNIST benchmark of {impl!r} failed: {e}") from None


def bench_mnist(hidden=MNIST.hidden, epochs=MNIST.epochs, batch=MNIST.batch, lr=MNIST.lr,
                target=MNIST.target, seed=0, backend="auto", data_dir=None, torch_too=True,
                threads=1, repeats=2, dense_too=True):
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
             + (["torch"] if torch_too and machine.torch_or_none() is not None else []))
    kwargs = {"hidden": list(hidden), "epochs": epochs, "batch": batch, "lr": lr,
              "target": target, "seed": seed, "backend": backend, "data_dir": data_dir}
    if threads is not None:
        with Threads(threads):
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
