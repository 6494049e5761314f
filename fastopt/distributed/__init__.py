"""Data-parallel training and sharded optimizer state over MPI (mpi4py).

Install with ``pip install 'fastopt[mpi]'`` (mpi4py and the ``mpich`` wheel)
and launch with ``mpiexec -n N python train.py`` (or ``mpiexec -n N fastopt
train ...``)::

    import fastopt
    from fastopt import distributed as dist

    params = fastopt.pack([w1, b1, w2, b2])       # same model on every rank
    grads = params.zeros_like()
    opt = dist.ShardedOptimizer(fastopt.AdamW, params, lr=1e-3, max_grad_norm=1.0)
    # or: opt = dist.DataParallel(fastopt.AdamW(params, lr=1e-3, max_grad_norm=1.0))
    for xb, yb in my_slice_of_each_batch:
        try:
            backward(params, grads, xb, yb)       # this rank's gradient (mean over xb)
        except Exception as exc:                  # let every rank know: nobody hangs
            opt.step(grads, error=exc)
        opt.step(grads)

* :class:`DataParallel`: replicated optimizer; the gradient buffer is
  averaged with one in-place ``Allreduce`` (optionally in buckets), or with
  :meth:`DataParallel.backward_hook`, bucket by bucket with non-blocking
  ``Iallreduce`` calls posted while the MLP's backward pass goes on.
* :class:`ShardedOptimizer`: ZeRO stage 1/2; each rank keeps optimizer
  state for a contiguous 1/N of the buffer: ``Reduce_scatter`` of the
  gradients, the fused step on the shard, ``Allgatherv`` of the params.

Buffers travel through mpi4py's buffer interface (no pickling); only setup
checks and error messages are pickled. Every step starts with a 56-byte
Allreduce of an error flag and hashes of its settings, call and step count
(:func:`fastopt.distributed._comm.agree`), so a rank that fails (bad input, an exception in
its backward pass) makes every rank raise :class:`DistributedError` instead
of leaving the others blocked in a collective. Host arrays: float32 and
float64, and float16/bfloat16 (mixed precision: gradients reduced in float32,
then rounded; the float32 master copy is sharded with the rest of the
state). Device arrays (CUDA-aware MPI) are not supported yet.
"""

from ._comm import DistributedError, agree, launched_size, world
from .optim import DataParallel, ShardedOptimizer

__all__ = ["DataParallel", "ShardedOptimizer", "DistributedError", "agree",
           "launched_size", "world"]
