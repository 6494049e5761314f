"""Scaling of the distributed step and of an MLP epoch, 1 vs N ranks.

::

    python -m fastopt.bench.distributed step            # 1 process: the baseline
    mpiexec -n 2 python -m fastopt.bench.distributed step
    mpiexec -n 2 python -m fastopt.bench.distributed mlp
    mpiexec -n 3 python -m fastopt.bench.distributed mlp --bucket-elems 1

``step``: AdamW over ``--size`` float32 elements (default 4M,
:data:`fastopt.bench.cases.DISTRIBUTED_STEP_ELEMENTS`): median time
of the plain optimizer (1 process), of :class:`DataParallel` and
:class:`ShardedOptimizer` steps, and of their parts timed alone (the
collectives on the same buffers, the fused step on this rank's share);
bytes each rank sends per step (ring-algorithm count) and optimizer-state
bytes per rank. ``mlp``: one epoch of ``fit`` on MNIST with the recipe's
network, batch and lr (:data:`fastopt.bench.cases.MNIST`: 784-256-256-10,
batch 128, AdamW 1e-3): one process (the plain optimizer), or under mpiexec
replicated with the allreduce after the backward pass, replicated with it
overlapped (``DataParallel.backward_hook``; ``--bucket-elems``: smallest
bucket), and sharded. The cases take turns, one epoch each, ``--epochs``
rounds; each reports its median epoch (slowest rank) and the overlapped
case also the median of its per-round ratio to the blocking one. Rank 0
prints one JSON line per case. Kernel threads: ``--threads`` per rank
(default: cores / ranks).
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from .._arguments import Parser, positive_int
from .cases import DISTRIBUTED_STEP_ELEMENTS, MNIST


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
    # (threads=None: --threads per rank, set by main)
    dp = dist.DataParallel(fastopt.AdamW(params, lr=1e-4, max_grad_norm=1.0), comm=comm,
                           threads=None)
    t = _median_time(lambda: dp.step(grads), comm, repeat)
    t_ar = _median_time(lambda: comm.Allreduce(MPI.IN_PLACE, grads.data, op=MPI.SUM), comm,
                        repeat)
    rows.append({"case": "DataParallel step (Allreduce + scale + AdamW)", "ranks": N,
                 "elements": size, "s": t, "allreduce_s": t_ar,
                 "bytes_sent_per_rank": dp.bytes_per_step,
                 "state_bytes_per_rank": dp.state_nbytes()})
    zero = dist.ShardedOptimizer(fastopt.AdamW, params, lr=1e-4, max_grad_norm=1.0,
                                 comm=comm, threads=None)
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


def bench_mlp(comm, epochs, bucket_elems=None):
    """One epoch per case, the cases interleaved ``epochs`` times (so a
    change in the machine's load hits them alike); per case the median
    epoch, and for the overlapped case the median of its per-round ratio to
    the blocking one."""
    from fastopt.data import mnist_split
    from fastopt.nn import MLP
    from fastopt.nn.training import fit, make_optimizer

    from ..distributed.training import DataParallelTraining

    N = comm.Get_size()
    X, y, Xv, yv = mnist_split()
    cases = [("1 process" if N == 1 else "replicated state, allreduce after backward",
              False, False)]
    if N > 1:
        cases += [("replicated state, allreduce overlapped with backward", False, True),
                  ("sharded state", True, False)]
    runs = []
    for name, shard, overlap in cases:
        net = MLP((X.shape[1], *MNIST.hidden, 10), seed=0)
        # 1 process: the plain optimizer and loop
        # (threads: --threads per rank, set by main)
        par = (DataParallelTraining(comm, shard_state=shard, overlap=overlap, threads=None)
               if N > 1
               else None)
        opt = make_optimizer(net, "adamw", MNIST.lr, parallel=par)
        if overlap:
            opt.bucket_elems = bucket_elems
        fit(net, opt, X[:1024], y[:1024], epochs=1, batch_size=MNIST.batch,
            parallel=par)  # warm up
        runs.append({"name": name, "net": net, "opt": opt, "parallel": par, "overlap": overlap,
                     "times": []})
    for rnd in range(epochs):
        for r in runs:
            comm.Barrier()
            t0 = time.perf_counter()
            hist = fit(r["net"], r["opt"], X, y, epochs=1, batch_size=MNIST.batch, seed=rnd,
                       parallel=r["parallel"])
            r["times"].append(comm.allreduce(time.perf_counter() - t0, op=_max()))
            r["loss"] = hist["epochs"][-1]["train_loss"][0]
    base = runs[0]["times"]
    rows = []
    for r in runs:
        times, opt = r["times"], r["opt"]
        t = float(np.median(times))
        row = {"case": f"MLP epoch ({X.shape[0]} samples, batch {MNIST.batch}), {r['name']}",
               "ranks": N,
               "params": int(r["net"].params.data.size), "s_per_epoch": t,
               "min_max_s": [min(times), max(times)], "samples_per_s": X.shape[0] / t,
               "train_loss_last_epoch": r["loss"],
               "bytes_sent_per_rank_per_step": getattr(opt, "bytes_per_step", 0),
               "state_bytes_per_rank": (opt.state_nbytes() if N > 1 else
                                        sum(a.nbytes for a in opt.state[0]["runs"][0].values()))}
        if r["overlap"]:
            row["ratio_to_blocking_median"] = float(np.median(np.divide(times, base)))
            row["buckets"] = len(opt._buckets())
        rows.append(row)
    return rows


def main(argv=None):
    parser = Parser(prog="python -m fastopt.bench.distributed")
    parser.add_argument("what", choices=["step", "mlp"])
    parser.add_argument("--size", type=positive_int, default=DISTRIBUTED_STEP_ELEMENTS)
    parser.add_argument("--repeat", type=positive_int, default=15)
    parser.add_argument("--epochs", type=positive_int, default=5,
                        help="mlp: rounds, one epoch of every case per round")
    parser.add_argument("--threads", type=positive_int, default=None)
    parser.add_argument("--bucket-elems", type=positive_int, default=None,
                        help="mlp: smallest overlapped bucket (default: the library's)")
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
            bench_mlp(comm, args.epochs, args.bucket_elems)
    if comm.Get_rank() == 0:
        for r in rows:
            print(json.dumps({**r, "threads_per_rank": threads}))


if __name__ == "__main__":
    main()
