"""What an MPI launcher (``mpiexec -n N``) tells each process in its
environment, read without initialising MPI (the command line asks before
it knows whether it will use MPI at all)."""

from __future__ import annotations

import os

# Set by the launchers: MPICH/Intel MPI (hydra: PMI_SIZE), Open MPI, PMIx.
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")
_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")


def _first_count(names, default):
    for var in names:
        value = os.environ.get(var)
        if value and value.isdigit():
            return int(value)
    return default


def launched_size() -> int:
    """World size announced by an MPI launcher; 1 when not launched by one."""
    return _first_count(_SIZE_VARS, 1)


def launched_rank() -> int:
    """This process's rank as announced by an MPI launcher; 0 when not
    launched by one."""
    return _first_count(_RANK_VARS, 0)
