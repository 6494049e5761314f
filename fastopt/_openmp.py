"""How long idle OpenMP worker threads busy-wait, set before libgomp loads.

fastopt's threaded kernels (Numba's ``omp`` threading layer and the Cython
extension) run on GNU OpenMP. After a parallel region, libgomp's workers
spin for ``GOMP_SPINCOUNT`` iterations (300,000 by default, several ms here)
before they sleep. In a training loop the optimizer step alternates with
BLAS matmuls, whose own worker threads then find every core taken by
spinning OpenMP threads: on this 2-core machine a 784-256-256-10 MLP step
(2 ms of matmuls, 0.07 ms of AdamW) took 8 ms instead of 2.2 ms. A short
spin (1,000 iterations, a few microseconds) keeps back-to-back steps as fast
as before (measured at 64k-16M elements) and lets BLAS have the cores.

libgomp reads the variable once, when it is loaded, so this runs when
``fastopt`` is imported. A value the user set (``GOMP_SPINCOUNT`` or
``OMP_WAIT_POLICY``) wins. It has no effect on a libgomp that another
library loaded before fastopt was imported; :func:`fastopt.backend_info`
reports the setting in force.
"""

from __future__ import annotations

import os

SPINCOUNT = "1000"
_USER_VARS = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


def configure() -> str:
    """Set ``GOMP_SPINCOUNT`` unless the user chose a wait policy; returns
    who decided ("fastopt" or "user")."""
    if any(v in os.environ for v in _USER_VARS):
        return "user"
    os.environ["GOMP_SPINCOUNT"] = SPINCOUNT
    return "fastopt"


def wait_policy() -> dict:
    """The OpenMP wait settings in this process's environment."""
    return {v: os.environ.get(v) for v in _USER_VARS}
