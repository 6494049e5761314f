"""Data-parallel training in :mod:`fastopt.nn`'s loop.

:func:`fastopt.nn.training.fit` and :func:`~fastopt.nn.training.make_optimizer`
know nothing of MPI; they take a ``parallel`` plug-in, and this is the one
for ranks of an MPI communicator::

    from fastopt.distributed.training import DataParallelTraining
    from fastopt.nn.training import fit, make_optimizer

    par = DataParallelTraining(comm, shard_state=False, overlap=False)
    opt = make_optimizer(net, "adamw", 1e-3, parallel=par)
    history = fit(net, opt, X, y, epochs=15, batch_size=128, parallel=par)

Every rank draws the same shuffled batches and computes the gradient of its
contiguous slice of each one; the step weights the ranks by their slice
sizes, so the update is the single process's on the whole batch (to float
rounding). Losses and held-out metrics are combined over ranks (each
evaluates a slice of the held-out set); times are this rank's.
``overlap=True`` (replicated optimizer state only: :class:`DataParallel`)
averages the layers' gradients with non-blocking allreduces while the
backward pass goes on (:meth:`DataParallel.backward_hook`) instead of the
whole buffer after it: same result, off by default because it measured
2-3% slower on a 2-core machine, where MPICH moves a non-blocking
collective only inside MPI calls (docs/performance.md).
"""

from __future__ import annotations

import numpy as np

from .cores import check_threads
from .optim import DataParallel, ShardedOptimizer


def _slice(n, rank, size):
    """This rank's contiguous part of ``range(n)`` (sizes differ by at most 1)."""
    return n * rank // size, n * (rank + 1) // size


class DataParallelTraining:
    """The ``parallel`` plug-in of :mod:`fastopt.nn.training` for the ranks of
    ``comm``: replicated optimizer state (``DataParallel``) or, with
    ``shard_state``, state sharded across ranks (``ShardedOptimizer``).
    ``threads``: each rank's BLAS and kernel threads, set when the optimizer
    is made (as the wrappers' ``threads``: by default each rank's share of
    its machine's cores)."""

    def __init__(self, comm, *, shard_state=False, overlap=False, threads="auto"):
        # overlap with sharded state: the sharded optimizer has no backward
        # hook, so its step reduces after the backward pass as without overlap
        self.comm, self.shard_state, self.overlap = comm, shard_state, overlap
        self.threads = check_threads(threads)   # the wrappers' (each rank's share of the cores)
        self.rank, self.world_size = comm.Get_rank(), comm.Get_size()

    def optimizer(self, cls, groups, options):
        """The optimizer ``cls(groups, **options)``, made data-parallel."""
        if self.shard_state:
            return ShardedOptimizer(cls, groups, comm=self.comm, threads=self.threads,
                                    **options)
        return DataParallel(cls(groups, **options), comm=self.comm, threads=self.threads)

    def step_function(self, model, opt):
        """``step(gather, idx) -> (losses, samples)``: this rank's slice of
        the batch, then the collective step."""
        hooked = self.overlap and hasattr(opt, "backward_hook")   # DataParallel, not sharded
        rank, size = self.rank, self.world_size

        def step(gather, idx):
            lo, hi = _slice(idx.size, rank, size)
            b = hi - lo
            error, losses = None, np.zeros(model.k)
            weight = b / idx.size
            # every rank starts the overlapped reduction, samples or not: the
            # step posts whatever buckets the backward pass did not
            hook = opt.backward_hook(model.grads, weight=weight) if hooked else None
            try:
                if b:
                    losses = model.loss_and_grad(*gather(idx[lo:hi]), on_grads_ready=hook)
                else:   # fewer samples than ranks: this rank adds nothing
                    model.grads.data[...] = 0
            except Exception as exc:   # noqa: BLE001 - every rank raises it in the step
                error = exc
            opt.step(model.grads, weight=weight, error=error)
            return losses, b
        return step

    def end_epoch(self, totals):
        """Sum the epoch's per-model loss totals over the ranks, in place."""
        from mpi4py import MPI
        self.comm.Allreduce(MPI.IN_PLACE, totals, op=MPI.SUM)

    def validate(self, model, X_val, y_val):
        """Held-out (loss, accuracy) per model: each rank evaluates its slice."""
        from mpi4py import MPI

        from ..nn import Ensemble
        vlo, vhi = _slice(X_val.shape[0], self.rank, self.world_size)
        sums = np.zeros(2 * model.k)
        if vhi > vlo:
            vl, va = Ensemble.evaluate(model, X_val[vlo:vhi], y_val[vlo:vhi])
            sums[:model.k] = np.asarray(vl) * (vhi - vlo)
            sums[model.k:] = np.asarray(va) * (vhi - vlo)
        self.comm.Allreduce(MPI.IN_PLACE, sums, op=MPI.SUM)
        return sums[:model.k] / X_val.shape[0], sums[model.k:] / X_val.shape[0]
