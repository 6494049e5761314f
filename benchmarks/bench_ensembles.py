"""Batched ensembles: K MLPs with stacked weights trained in one pass, against
the same K one after the other (fastopt and torch) and torch written the
fast way (stacked weights, baddbmm, fused AdamW)."""

import numpy as np

import fastopt
from fastopt.bench import cases

from . import common

ARCH, BATCH = cases.ENSEMBLE.sizes, cases.ENSEMBLE.batch


class EnsembleTrainStep:
    params = ([4, 16], ["numba", "cython"])
    param_names = ["models", "backend"]

    def setup(self, k, backend):
        from fastopt import nn
        if backend not in nn.available_backends():
            raise NotImplementedError(f"nn backend {backend!r} not available")
        rng = np.random.default_rng(0)
        self.X = rng.standard_normal((k, BATCH, ARCH[0]), dtype=np.float32)
        self.y = rng.integers(0, ARCH[-1], (k, BATCH))
        self.ens = nn.Ensemble(k, ARCH, seed=0, backend=backend)
        lrs = list(np.logspace(-1, -5, k))         # a learning-rate sweep
        self.opt = fastopt.AdamW(self.ens.param_groups(lr=lrs))
        self.ens.train_step(self.opt, self.X, self.y)

    def time_train_step(self, k, backend):
        self.ens.train_step(self.opt, self.X, self.y)


class EnsembleRatios:
    """``cases.ENSEMBLE`` (K=16 of 784-64-10, batch 128 each), per-model lrs:
    same-run speedups. ``threads`` as in :class:`bench_mlp.MLPTrainStepRatios`."""

    params = [common.THREADS, ["numba", "cython"]]
    param_names = ["threads", "backend"]

    def setup_cache(self):
        from fastopt.bench import nn
        return common.by_threads(nn.bench_ensemble)

    setup_cache.timeout = common.CACHE_TIMEOUT

    def _get(self, cache, threads, backend, metric):
        return common.lookup(cache, threads, f"fastopt-{backend} ensemble", metric)

    def track_speedup_vs_torch_one_by_one(self, cache, threads, backend):
        return self._get(cache, threads, backend, "vs_torch_one_by_one")

    track_speedup_vs_torch_one_by_one.unit = "x torch, 16 models in turn"

    def track_speedup_vs_torch_bmm_fused(self, cache, threads, backend):
        return self._get(cache, threads, backend, "vs_torch_bmm_fused")

    track_speedup_vs_torch_bmm_fused.unit = "x torch bmm + fused AdamW"

    def track_speedup_vs_fastopt_one_by_one(self, cache, threads, backend):
        return self._get(cache, threads, backend, "vs_fastopt_one_by_one")

    track_speedup_vs_fastopt_one_by_one.unit = "x fastopt, 16 models in turn"
