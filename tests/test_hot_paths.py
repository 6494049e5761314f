"""pytest-benchmark timings of the hot paths, grouped so each group compares
fastopt's backends with NumPy and torch on the same case.

In the normal test run (``--benchmark-disable`` in pyproject's addopts)
each benchmark body runs once as a plain test and its assertions check the
step really happened. To measure:

    python -m pytest tests/test_hot_paths.py --benchmark-enable \
        --benchmark-group-by=group --benchmark-columns=min,median,rounds

Compare the rows within a group (same run), not numbers across runs.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastopt
from fastopt import bench

pytest.importorskip("pytest_benchmark")

IMPLS = [*(b for b in ("numba", "cython") if b in fastopt.available_backends()),
         "numpy", "torch-fused", "torch-foreach"]
CASES = {   # group -> (kind, shapes, clip)
    "adamw 1 x 1M": ("adamw", [(1 << 20,)], False),
    "adamw 1000 x 1k": ("adamw", [(1000,)] * 1000, False),
    "clip+adamw 200 x 5k": ("adamw", [(5000,)] * 200, True),
    "sgd nesterov 1 x 1M": ("sgd", [(1 << 20,)], False),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("group", list(CASES))
def test_step(benchmark, group, impl):
    kind, shapes, clip = CASES[group]
    step, note = bench.make_step(impl, kind, shapes, clip=clip)
    if step is None:
        pytest.skip(note)
    benchmark.group = group
    benchmark.extra_info["bytes_per_step"] = bench.step_bytes(
        kind, sum(int(np.prod(s)) for s in shapes), "float32", clip)
    step()                                   # compile outside the timing
    benchmark(step)


@pytest.mark.parametrize("impl", [b for b in ("numba", "cython", "numpy")
                                  if b in fastopt.available_backends()])
def test_global_norm(benchmark, impl):
    g = np.random.default_rng(0).standard_normal(1 << 20).astype(np.float32)
    flat = fastopt.pack([g])
    benchmark.group = "global norm 1M"
    norm = benchmark(fastopt.global_norm, flat, backend=impl)
    assert norm == pytest.approx(np.linalg.norm(g.astype(np.float64)), rel=1e-10)


@pytest.mark.parametrize("impl", [b for b in ("numba", "cython")
                                  if b in fastopt.available_backends()])
def test_packed_adamw_step_changes_every_param(benchmark, impl):
    """The timed call is the real step: after it every parameter moved."""
    params = fastopt.pack([np.ones((100, 10), np.float32)] * 3)
    grads = params.zeros_like()
    grads.data[:] = 1.0
    opt = fastopt.AdamW(params, lr=1e-2, backend=impl)
    benchmark.group = "adamw 3 x 1k (correctness)"
    benchmark(opt.step, grads)
    assert (params.data < 1.0).all()
