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
from fastopt.bench import cases, steps

pytest.importorskip("pytest_benchmark")

IMPLS = [*(b for b in ("numba", "cython") if b in fastopt.available_backends()),
         "numpy", "torch-fused", "torch-foreach"]
# group -> case: two of fastopt bench's named cases and two 1M steps
CASES = {
    "adamw 1 x 1M": cases.one_tensor("adamw", 1 << 20),
    "adamw 1000 x 1k": cases.workloads()["adamw 1000 x 1k"],
    "clip+adamw 200 x 5k": cases.workloads()["clip+adamw 200 x 5k"],
    "sgd nesterov 1 x 1M": cases.one_tensor("sgd", 1 << 20),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("group", list(CASES))
def test_step(benchmark, group, impl):
    """The timed call is the case's step: the parameters it holds moved
    (all but the few whose update is below float32 rounding: SGD's step is
    lr * g, and some of a million normal g are tiny)."""
    row = CASES[group]
    step, note = steps.make_step(impl, row.kind, row.shapes, row.dtype, row.clip, row.layout)
    if step is None:
        pytest.skip(note)
    benchmark.group = group
    benchmark.extra_info["bytes_per_step"] = cases.step_bytes(row.kind, row.elements,
                                                              row.dtype, row.clip)
    step()                                   # compile outside the timing
    before = [p.copy() for p in step.params]
    assert sum(p.size for p in before) == row.elements
    benchmark(step)
    moved = sum(int(np.count_nonzero(new != old)) for old, new in zip(before, step.params))
    assert moved > 0.99 * row.elements
    assert all(np.isfinite(p).all() for p in step.params)


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
