"""MPI plumbing: lazy mpi4py import, launcher detection, agreement on errors.

Nothing here imports mpi4py until a communicator is asked for, so
``import fastopt.distributed`` is free on a machine without MPI.
"""

from __future__ import annotations

import hashlib
import sys
import time

import numpy as np

from .._launcher import launched_rank, launched_size  # noqa: F401 (here since before)


class DistributedError(RuntimeError):
    """Raised on every rank when any rank failed a step (or a setup check):
    the message names the failing ranks and their errors. No rank was left
    waiting in a collective, and no rank applied the step."""


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


def agree(comm, error=None, what="the step", settings=None, position=None):
    """Every rank calls this at the same point; if any rank passes an
    ``error`` (an exception it hit locally), every rank raises
    :class:`DistributedError` naming the failing ranks and their messages.

    ``settings`` (a dict of what must be equal on every rank: the step's
    hyperparameters and options), when given, is compared too: a rank that
    edited one alone would otherwise step with it, or (an option that adds
    a collective, such as clipping's norm) wait forever for ranks that do
    not. Every rank then raises, naming the first setting that differs.
    So are ``what`` (a rank in another collective call, e.g. saving while
    the others step, raises with them instead of hanging or pairing
    with their call: so ``what`` names the call, the same on every rank,
    never a per-rank label) and ``position`` (the step count: a checkpoint
    loaded on some ranks only).

    One 56-byte Allreduce (a flag, and the max and -min of the hashes of
    ``settings`` and ``what`` and of ``position``) when all is well; two
    allgathers (small strings and dicts) only when not. Call it before any
    collective that a failing rank would otherwise never reach.
    """
    MPI = mpi()
    h, c = _hash(settings), _code(what)
    k = -1 if position is None else int(position)
    buf = np.array([0 if error is None else 1, h, -h, c, -c, k, -k], dtype=np.int64)
    comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.MAX)     # the flag, max and -min of the rest
    if not buf[0] and buf[1] == -buf[2] and buf[3] == -buf[4] and buf[5] == -buf[6]:
        return
    messages = comm.allgather(None if error is None else _describe(error))
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if not failed:
        raise DistributedError(_difference(comm.allgather((what, position, settings))))
    text = "; ".join(f"rank {r}: {m}" for r, m in failed)
    raise DistributedError(f"{what} failed on {len(failed)} of {comm.Get_size()} ranks "
                           f"({text}); every rank raises this") from error


def _difference(everyone) -> str:
    """What differs between the ranks' ``(what, position, settings)``."""
    what, position, _ = everyone[0]
    for r, (w, k, _) in enumerate(everyone):
        if w != what:
            return (f"rank 0 is in {what} but rank {r} in {w}: every rank must make the same "
                    "calls in the same order (fastopt.save, a sharded state_dict, the step: "
                    "each is a collective), and every rank raises this")
    for r, (_, k, _) in enumerate(everyone):
        if k != position:
            return (f"{what}: rank {r} is at step {k} but rank 0 at step {position} (a "
                    "checkpoint loaded on some ranks only? load it on every rank), and every "
                    "rank raises this")
    return (f"{what}: {_first_difference([s or {} for _, _, s in everyone])}; every rank must "
            "have the same settings, made and edited alike (e.g. after a broadcast of the "
            "value), and every rank raises this")


_codes = {}


def _code(what) -> int:
    """A 62-bit hash of ``what``, the same in every process."""
    code = _codes.get(what)
    if code is None:
        digest = hashlib.blake2b(str(what).encode(), digest_size=8).digest()
        code = _codes[what] = int.from_bytes(digest, "little") >> 2
    return code


# (settings dict, its hash), the latest first: a wrapper's settings rarely
# change, and it keeps the same dict while they do; a few, so that two
# wrappers stepping in turn (two models) do not rehash every step. The dicts
# are held, so an id is never another dict's.
_recent_hashes = []
_RECENT = 4


def _hash(settings) -> int:
    """A 62-bit hash of ``settings``' repr, the same in every process (0: none)."""
    if settings is None:
        return 0
    for i, (known, h) in enumerate(_recent_hashes):
        if known is settings:
            if i:
                _recent_hashes.insert(0, _recent_hashes.pop(i))
            return h
    digest = hashlib.blake2b(repr(settings).encode(), digest_size=8).digest()
    h = int.from_bytes(digest, "little") >> 2
    _recent_hashes.insert(0, (settings, h))
    del _recent_hashes[_RECENT:]
    return h


def _first_difference(everyone) -> str:
    """Which setting differs between rank 0 and the first rank that differs."""
    ref = everyone[0]
    for r, other in enumerate(everyone[1:], 1):
        for key in sorted(set(ref) | set(other), key=str):
            if repr(ref.get(key)) != repr(other.get(key)):
                return (f"{key} is {other.get(key)!r} on rank {r} but {ref.get(key)!r} "
                        "on rank 0")
    return "the settings differ across ranks"
