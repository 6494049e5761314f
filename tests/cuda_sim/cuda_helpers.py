"""Helpers of the CUDA backend tests: run under the CUDA simulator or on a real GPU.

``tests/test_cuda_sim.py`` runs this folder in a subprocess with
``NUMBA_ENABLE_CUDASIM=1`` (it must be set before numba is imported). In a
plain ``pytest`` run the same tests run for real where a GPU is usable and
skip otherwise (importing this module skips the importing test module).
Sizes are small: the simulator runs every thread in Python. A helper module,
not a conftest.py: a second ``conftest`` would shadow tests/conftest.py,
which the other test modules import by that name.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastopt

if "cuda" not in fastopt.available_backends():
    pytest.skip("no usable GPU (run with NUMBA_ENABLE_CUDASIM=1 for the simulator)",
                allow_module_level=True)

from numba import cuda  # noqa: E402

from fastopt.backends import numba_cuda as C  # noqa: E402

#: tolerance of a device step against the reference: the simulator computes
#: like NumPy; a GPU contracts to FMA, so leave float32 rounding room
RTOL = {np.dtype(np.float32): 2e-6, np.dtype(np.float64): 1e-12}
ATOL = {np.dtype(np.float32): 1e-6, np.dtype(np.float64): 1e-13}
#: a size that is not a multiple of the block size or of four; one pass of
#: the grid-stride loops (a grid covers it: 1.5 grids of elements under the
#: simulator, but the vector loop's groups of four fit one grid)
N = 3 * C.THREADS * C.max_blocks() // 2 + 7 if C.SIMULATOR else 100_003
#: nine full grids of elements and a tail, for any grid up to max_blocks():
#: the update kernels' vector loop makes two or three passes and the norm's
#: four-way unrolled loop runs twice, each then its one-at-a-time tail
LONG = 9 * C.THREADS * C.max_blocks() + 5


def dev(a):
    return cuda.to_device(np.ascontiguousarray(a))


def host(d):
    return d.copy_to_host()


def close(actual, expected, what=""):
    expected = np.asarray(expected)
    dt = expected.dtype if expected.dtype in RTOL else np.dtype(np.float32)
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected.astype(np.float64),
                               rtol=RTOL[dt], atol=ATOL[dt], err_msg=what)
