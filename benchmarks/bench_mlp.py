"""MLP training step (forward, backward, fused AdamW) against PyTorch on the
CPU and a hand-written NumPy version; fraction of same-run sgemm speed."""

import numpy as np

import fastopt
from fastopt.bench import cases

from . import common

ARCH = cases.TRAIN_STEP.sizes


def _nn():
    from fastopt import nn
    return nn


class MLPTrainStep:
    params = ([32, cases.TRAIN_STEP.batch], ["relu", "gelu"], ["numba", "cython", "numpy"])
    param_names = ["batch", "activation", "backend"]

    def setup(self, batch, activation, backend):
        nn = _nn()
        if backend not in nn.available_backends():
            raise NotImplementedError(f"nn backend {backend!r} not available")
        rng = np.random.default_rng(0)
        self.X = rng.standard_normal((batch, ARCH[0]), dtype=np.float32)
        self.y = rng.integers(0, ARCH[-1], batch)
        self.net = nn.MLP(ARCH, activation=activation, seed=0, backend=backend)
        self.opt = fastopt.AdamW(self.net.param_groups(), lr=1e-3)
        self.net.train_step(self.opt, self.X, self.y)

    def time_train_step(self, batch, activation, backend):
        self.net.train_step(self.opt, self.X, self.y)


class MLPTrainStepRatios:
    """``cases.TRAIN_STEP`` (784-256-256-10, batch 256, float32, AdamW):
    speedups over torch (CPU, fused AdamW) and hand-written NumPy, and the
    fraction of the speed of the step's own matmuls run alone through the
    same BLAS. ``threads``: "1"
    (every library on one thread, all in one process) or "default" (each
    library's own thread count, each implementation in its own process:
    thread pools of different libraries in one process distort each other)."""

    params = [common.THREADS, ["numba", "cython"]]
    param_names = ["threads", "backend"]

    def setup_cache(self):
        from fastopt.bench import nn
        return common.by_threads(nn.bench_train_step)

    setup_cache.timeout = common.CACHE_TIMEOUT

    def track_speedup_vs_torch(self, cache, threads, backend):
        return common.lookup(cache, threads, f"fastopt-{backend}", "vs_torch")

    track_speedup_vs_torch.unit = "x torch"

    def track_speedup_vs_numpy(self, cache, threads, backend):
        return common.lookup(cache, threads, f"fastopt-{backend}", "vs_numpy")

    track_speedup_vs_numpy.unit = "x NumPy"

    def track_fraction_of_sgemm(self, cache, threads, backend):
        return common.lookup(cache, threads, f"fastopt-{backend}",
                             "fraction_of_sgemm_step_shapes")

    track_fraction_of_sgemm.unit = "fraction of the step's sgemm"


class MNISTSparseInputStep:
    """One 784-256-256-10 AdamW step on a real MNIST batch (81% zeros), the
    first layer as ``sparse_input`` decides: "auto" (what users get),
    "sparse" (forced) and "dense" (BLAS matmuls). Needs the MNIST files:
    ``$FASTOPT_DATA``, or ``../shared/data/mnist`` beside the repository,
    which only ``--python=same`` runs find (asv's own virtualenvs install
    the package elsewhere: set ``FASTOPT_DATA`` for those), else n/a."""

    params = (["numba", "cython"], ["auto", "sparse", "dense"])
    param_names = ["backend", "first_layer"]

    def setup(self, backend, first_layer):
        nn = _nn()
        if backend not in nn.available_backends():
            raise NotImplementedError(f"nn backend {backend!r} not available")
        from fastopt.data import mnist_split
        try:
            X, y = mnist_split()[:2]
        except FileNotFoundError as exc:
            raise NotImplementedError(str(exc)) from None
        batch = cases.MNIST.batch
        self.X, self.y = np.ascontiguousarray(X[:batch]), y[:batch]
        self.net = nn.MLP(ARCH, seed=0, backend=backend)
        self.net.sparse_input = {"auto": "auto", "sparse": True, "dense": False}[first_layer]
        self.opt = fastopt.AdamW(self.net.param_groups(), lr=1e-3)
        self.net.train_step(self.opt, self.X, self.y)

    def time_train_step(self, backend, first_layer):
        self.net.train_step(self.opt, self.X, self.y)
