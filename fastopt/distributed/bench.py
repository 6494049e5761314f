"""Scaling of the distributed step and of an MLP epoch, 1 vs N ranks.

::

    python -m fastopt.distributed.bench step            # 1 process: the baseline
    mpiexec -n 2 python -m fastopt.distributed.bench step
    mpiexec -n 2 python -m fastopt.distributed.bench mlp

``step``: AdamW over ``--size`` float32 elements (default 4M): median time
of the plain optimizer (1 process), of :class:`DataParallel` and
:class:`ShardedOptimizer` steps, and of their parts timed alone (the
collectives on the same buffers, the fused step on this rank's share);
bytes each rank sends per step (ring-algorithm count) and optimizer-state
bytes per rank. ``mlp``: one epoch of ``fit`` (MNIST 784-256-256-10,
batch 128, AdamW) replicated and sharded. Rank 0 prints one JSON line per
case. Kernel threads: ``--threads`` per rank (default: cores / ranks).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def _median_time(fn, comm, repeat):
    times = []
    for _ in range(repeat):
        comm.Barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    # the slowest rank's time is the step's time
    return float(comm.allreduce(float(np.median(times)), op=_max()))


def _max():
    from mpi4py import MPI
    return MPI.MAX


def bench_step(comm, size, repeat):
    import fastopt
    from fastopt import distributed as dist
    from mpi4py import MPI

    N = comm.Get_size()
    rng = np.random.default_rng(0)
    rows = []
    params = fastopt.pack([rng.standard_normal(size).astype(np.float32)])
    grads = params.zeros_like()
    grads.data[:] = rng.standard_normal(size).astype(np.float32)
    plain = fastopt.AdamW(params, lr=1e-4, max_grad_norm=1.0)
    t = _median_time(lambda: plain.step(grads), comm, repeat)
    rows.append({"case": "AdamW step, whole buffer on each rank (no communication)",
                 "ranks": N, "elements": size, "s": t,
                 "state_bytes_per_rank": sum(a.nbytes for a in plain.state[0]["runs"][0].values())})
    dp = dist.DataParallel(fastopt.AdamW(params, lr=1e-4, max_grad_norm=1.0), comm=comm)
    t = _median_time(lambda: dp.step(grads), comm, repeat)
    t_ar = _median_time(lambda: comm.Allreduce(MPI.IN_PLACE, grads.data, op=MPI.SUM), comm,
                        repeat)
    rows.append({"case": "DataParallel step (Allreduce + scale + AdamW)", "ranks": N,
                 "elements": size, "s": t, "allreduce_s": t_ar,
                 "bytes_sent_per_rank": dp.bytes_per_step,
                 "state_bytes_per_rank": dp.state_nbytes()})
    zero = dist.ShardedOptimizer(fastopt.AdamW, params, lr=1e-4, max_grad_norm=1.0,
                                 comm=comm)
    t = _median_time(lambda: zero.step(grads), comm, repeat)
    shard = np.empty(zero._hi - zero._lo, np.float32)
    counts, displs = zero._counts, zero.bounds[:-1]
    t_rs = _median_time(lambda: comm.Reduce_scatter(grads.data, shard, recvcounts=counts,
                                                    op=MPI.SUM), comm, repeat)
    t_ag = _median_time(lambda: comm.Allgatherv(MPI.IN_PLACE, [params.data, counts, displs,
                                                               MPI.FLOAT]), comm, repeat)
    inner = zero._inner
    t_local = _median_time(lambda: inner.step(zero._local_grads), comm, repeat)
    rows.append({"case": "ShardedOptimizer step (Reduce_scatter + AdamW on 1/N + Allgatherv)",
                 "ranks": N, "elements": size, "s": t, "reduce_scatter_s": t_rs,
                 "allgatherv_s": t_ag, "shard_step_s": t_local,
                 "bytes_sent_per_rank": zero.bytes_per_step,
                 "state_bytes_per_rank": zero.state_nbytes()})
    return rows


def bench_mlp(comm, epochs):
    import fastopt
    from fastopt.data import mnist_split
    from fastopt.nn import MLP
    from fastopt.nn.training import fit, make_optimizer

    N = comm.Get_size()
    X, y, Xv, yv = mnist_split()
    rows = []
    for shard in ((False,) if N == 1 else (False, True)):
        net = MLP((784, 256, 256, 10), seed=0)
        opt = make_optimizer(net, "adamw", 1e-3, comm=comm, shard_state=shard)
        fit(net, opt, X[:1024], y[:1024], epochs=1, batch_size=128, comm=comm)   # warm up
        comm.Barrier()
        t0 = time.perf_counter()
        hist = fit(net, opt, X, y, epochs=epochs, batch_size=128, seed=1, comm=comm)
        t = comm.allreduce(time.perf_counter() - t0, op=_max()) / epochs
        rows.append({"case": f"MLP epoch (8000 samples, batch 128), "
                             f"{'sharded' if shard else 'replicated'} state",
                     "ranks": N, "params": int(net.params.data.size), "s_per_epoch": t,
                     "samples_per_s": X.shape[0] / t,
                     "train_loss": hist["epochs"][-1]["train_loss"][0],
                     "bytes_sent_per_rank_per_step": opt.bytes_per_step,
                     "state_bytes_per_rank": opt.state_nbytes()})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastopt.distributed.bench")
    parser.add_argument("what", choices=["step", "mlp"])
    parser.add_argument("--size", type=int, default=1 << 22)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)

    import fastopt
    from fastopt import distributed as dist

    comm = dist.world()
    N = comm.Get_size()
    threads = args.threads or max(1, (os.cpu_count() or 1) // N)
    fastopt.set_num_threads(threads)
    from threadpoolctl import threadpool_limits
    with threadpool_limits(threads, user_api="blas"):
        rows = bench_step(comm, args.size, args.repeat) if args.what == "step" else \
            bench_mlp(comm, args.epochs)
    if comm.Get_rank() == 0:
        for r in rows:
            print(json.dumps({**r, "threads_per_rank": threads}))


if __name__ == "__main__":
    main()
