"""Each rank's share of its node's cores, for BLAS and fastopt's kernels.

``mpiexec -n N`` on one machine starts N processes that each size NumPy's
BLAS pool and fastopt's kernel threads for the whole machine: N times as
many busy threads as cores. OpenBLAS's threads spin after each call, so the
ranks' matmuls then wait for threads that are descheduled: measured on a
2-core VM, one 2-epoch ``fit`` of an MLP 784-256-256-10 over 2 ranks took
4.8-16.6 s with the default pools and 0.68-0.70 s with one thread each (BLAS
alone to one thread: 0.74-0.91 s; the kernels alone: 7.4-16.9 s). torchrun
answers the same problem by setting ``OMP_NUM_THREADS=1``; here the wrappers
give each rank its share when they are made (:func:`share_cores`).
"""

from __future__ import annotations

import numbers
import os


def _cpus():
    """The CPUs this process may run on (its affinity where the OS says)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):       # macOS, Windows: no affinity call
        return list(range(os.cpu_count() or 1))


def fair_share(mine, node_cpu_sets) -> int:
    """Threads for a rank allowed on CPUs ``mine`` when the node's ranks are
    allowed on ``node_cpu_sets`` (this rank's among them): each CPU split
    evenly among the ranks that may use it, at least 1. Ranks bound to
    cores of their own (``mpiexec -bind-to core``) keep all of theirs;
    unbound ranks share every core."""
    users = {}
    for cpus in node_cpu_sets:
        for c in cpus:
            users[c] = users.get(c, 0) + 1
    return max(1, int(sum(1.0 / users.get(c, 1) for c in mine) + 1e-9))


def _blas_threads():
    """The largest BLAS pool's threads (threadpoolctl), or None without it."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    counts = [p["num_threads"] for p in threadpool_info() if p.get("user_api") == "blas"]
    return max(counts, default=None)


def check_threads(threads):
    """``"auto"``, None or an int >= 1, else ValueError."""
    if threads is None or (isinstance(threads, str) and threads == "auto"):
        return threads
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 1:
        raise ValueError(f"threads must be 'auto', None or an int >= 1, got {threads!r}")
    return int(threads)


def share_cores(comm, threads="auto"):
    """Size this rank's BLAS pool and fastopt's kernel threads for ``comm``
    (a collective: every rank calls it, with the same ``threads``). Returns
    the rank's count (its share, or ``threads``); None with ``threads=None``
    and for one rank alone under "auto".

    ``threads="auto"``: the rank's fair share of the cores it may run on,
    split with the other ranks on its node (``MPI_Comm_split_type``), set
    only for a pool that has more (a limit the user set lower stays).
    An int: both pools to that many. None: leave both as they are. The
    change is the process's, as ``threadpool_limits(n)`` called without
    ``with`` and :func:`fastopt.set_num_threads` make it (another OpenMP
    pool, torch's, is left as it is).
    """
    threads = check_threads(threads)
    if threads is None:
        return None
    if threads != "auto":
        return _apply(threads, only_above=False)
    if comm.Get_size() == 1:
        return None
    return _apply(node_share(comm), only_above=True)


def node_share(comm) -> int:
    """This rank's fair share of the CPUs it may run on, split with the
    ranks of ``comm`` on its machine (a collective)."""
    from ._comm import mpi
    node = comm.Split_type(mpi().COMM_TYPE_SHARED)
    try:
        mine = _cpus()
        return fair_share(mine, node.allgather(mine))
    finally:
        node.Free()


def _apply(n, *, only_above):
    """Both pools to ``n`` (``only_above``: each only where it has more).
    An environment variable that sized a pool (``OMP_NUM_THREADS=2``, as
    clusters export it) does not stop this: measured, 2 ranks on 2 cores
    with it set to 2 trained 13x slower."""
    import fastopt

    # the kernels first: a count beyond Numba's pool raises, with nothing changed
    if not only_above or fastopt.get_num_threads() > n:
        fastopt.set_num_threads(n)
    blas = _blas_threads()
    if blas is not None and (not only_above or blas > n):
        from threadpoolctl import threadpool_limits
        threadpool_limits(n, user_api="blas")
    return n
