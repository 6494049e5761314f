"""A rank that dies while the others wait in a collective: the job must end.

``mpiexec -n 2 python tests/mpi/crash.py exit|raise|raise-comm``: rank 1
leaves (``os._exit(3)``, or an uncaught exception: fastopt.distributed's
excepthook calls MPI_Abort, installed by ``world()`` or, ``raise-comm``, by
the optimizer given ``comm=MPI.COMM_WORLD`` itself) while rank 0 enters a
step. Run by tests/test_distributed.py
with a timeout; rank 0 never prints "unreachable".
"""

import os
import sys

import numpy as np

import fastopt
from fastopt import distributed as dist

if sys.argv[1] == "raise-comm":
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    opt_comm = comm
else:
    comm, opt_comm = dist.world(), None
params = fastopt.pack([np.ones(100, np.float32)])
opt = dist.DataParallel(fastopt.AdamW(params), comm=opt_comm)
if comm.Get_rank() == 1:
    if sys.argv[1] == "exit":
        os._exit(3)
    raise RuntimeError("uncaught on rank 1")
opt.step(params.zeros_like())
print("unreachable")
