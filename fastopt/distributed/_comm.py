"""MPI plumbing: lazy mpi4py import, launcher detection, agreement on errors.

Nothing here imports mpi4py until a communicator is asked for, so
``import fastopt.distributed`` is free on a machine without MPI.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

# Set by the launchers: MPICH/Intel MPI (hydra: PMI_SIZE), Open MPI, PMIx.
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")
_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")


class DistributedError(RuntimeError):
    """Raised on every rank when any rank failed a step (or a setup check):
    the message names the failing ranks and their errors. No rank was left
    waiting in a collective, and no rank applied the step."""


def launched_size() -> int:
    """World size announced by an MPI launcher (``mpiexec -n N``) in the
    environment, without initialising MPI; 1 when not launched by one."""
    for var in _SIZE_VARS:
        value = os.environ.get(var)
        if value and value.isdigit():
            return int(value)
    return 1


def launched_rank() -> int:
    """This process's rank as announced by an MPI launcher, without
    initialising MPI; 0 when not launched by one."""
    for var in _RANK_VARS:
        value = os.environ.get(var)
        if value and value.isdigit():
            return int(value)
    return 0


def mpi():
    """The ``mpi4py.MPI`` module, or ImportError saying how to install it."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ImportError("fastopt.distributed needs mpi4py and an MPI library: "
                          "pip install 'fastopt[mpi]' (mpi4py + the mpich wheel)") from exc
    return MPI


def world():
    """``MPI.COMM_WORLD`` (initialises MPI on first use).

    With more than one rank it also installs a ``sys.excepthook`` that, after
    printing the traceback, aborts every rank (``MPI_Abort``): a rank that
    dies of an uncaught exception would otherwise leave the others blocked
    in their next collective forever (what ``python -m mpi4py`` does too).
    """
    comm = mpi().COMM_WORLD
    if comm.Get_size() > 1:
        install_abort_hook(comm)
    return comm


def install_abort_hook(comm):
    """The ``sys.excepthook`` of :func:`world` for ``comm`` (once per process)."""
    if getattr(sys.excepthook, "_fastopt_abort", False):
        return
    previous = sys.excepthook

    def hook(kind, value, tb):
        previous(kind, value, tb)
        sys.stderr.write(f"fastopt.distributed: uncaught {kind.__name__} on rank "
                         f"{comm.Get_rank()} of {comm.Get_size()}; aborting every rank\n")
        sys.stderr.flush()
        # mpiexec forwards each rank's stderr through a pipe and stops
        # forwarding once the abort kills the job: give it a moment, or the
        # traceback and this line can be lost (seen once, on a
        # busy 2-core machine, in a full test run). A mitigation, not a
        # guarantee: MPI offers no flush of the launcher's forwarding.
        time.sleep(0.25)
        comm.Abort(1)

    hook._fastopt_abort = True
    sys.excepthook = hook


def mpi_dtype(dtype):
    """The MPI datatype for a NumPy float dtype (float32/float64 only: MPI
    has no standard 16-bit float for reductions)."""
    dtype = np.dtype(dtype)
    MPI = mpi()
    table = {np.dtype(np.float32): MPI.FLOAT, np.dtype(np.float64): MPI.DOUBLE}
    if dtype not in table:
        raise TypeError(f"fastopt.distributed reduces float32 or float64 buffers, got {dtype}")
    return table[dtype]


def _describe(exc) -> str:
    return f"{type(exc).__name__}: {exc}"


def agree(comm, error=None, what="the step"):
    """Every rank calls this at the same point; if any rank passes an
    ``error`` (an exception it hit locally), every rank raises
    :class:`DistributedError` naming the failing ranks and their messages.

    One 4-byte Allreduce when nobody failed; an allgather of the messages
    (small strings) only when someone did. Call it before any collective
    that a failing rank would otherwise never reach.
    """
    MPI = mpi()
    flag = np.array([0 if error is None else 1], dtype=np.int32)
    comm.Allreduce(MPI.IN_PLACE, flag, op=MPI.MAX)
    if not flag[0]:
        return
    messages = comm.allgather(None if error is None else _describe(error))
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    text = "; ".join(f"rank {r}: {m}" for r, m in failed)
    raise DistributedError(f"{what} failed on {len(failed)} of {comm.Get_size()} ranks "
                           f"({text}); every rank raises this") from error
