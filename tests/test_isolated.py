"""fastopt.bench.isolated: one process per implementation, interleaved rounds."""

from __future__ import annotations

import math
import time

import pytest

from fastopt.bench.isolated import Impl, time_isolated


def test_times_each_implementation_in_its_own_process():
    kw = {"sizes": [8, 4, 3], "batch": 4}
    factory = "fastopt.bench.nn:make_step_impl"
    start = time.perf_counter()
    times = time_isolated({"fast": Impl(factory, dict(kw, impl="fastopt-numpy")),
                           "plain": Impl(factory, dict(kw, impl="numpy"))},
                          rounds=2, block_s=0.01, pause_s=0.0)
    wall = time.perf_counter() - start
    assert set(times) == {"fast", "plain"}
    # seconds per call, not per round or per run: every round makes at least
    # one call of each, so a call takes less than the whole run over its rounds
    # (no absolute wall-clock bound: this is a correctness test)
    assert all(math.isfinite(t) and 0 < t < wall / 2 for t in times.values())


def test_worker_failure_names_the_worker():
    with pytest.raises(RuntimeError, match="worker 'broken' exited with code 1"):
        time_isolated({"broken": Impl("fastopt.bench.nn:make_step_impl",
                                      {"impl": "no such implementation"})}, rounds=1,
                      block_s=0.01, pause_s=0.0)




def test_run_once_returns_the_result_and_names_a_failure():
    from fastopt.bench.isolated import run_once
    assert run_once("fastopt.bench.cases:step_bytes",
                    {"kind": "adamw", "n": 10, "dtype": "float32"}) == 280
    with pytest.raises(RuntimeError, match="no_such_function in its own process failed"):
        run_once("fastopt.bench.cases:no_such_function")


def test_preloaded_modules_come_before_fastopt():
    """torch imported first loads its own libgomp, as in a torch user's
    script; without it the child has the one ``import fastopt`` loaded."""
    pytest.importorskip("torch")
    from fastopt.bench.isolated import run_once
    with_torch = run_once("fastopt._openmp:_loaded_libgomps", preload=("torch",))
    assert any("/torch/" in p for p in with_torch)
    without = run_once("fastopt._openmp:_loaded_libgomps")
    assert not any("/torch/" in p for p in without)
