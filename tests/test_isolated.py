"""fastopt._isolated: one process per implementation, interleaved rounds."""

from __future__ import annotations

import os

import pytest

import fastopt
from fastopt import _isolated
from fastopt._isolated import Impl, time_isolated


def test_times_each_implementation_in_its_own_process():
    kw = {"sizes": [8, 4, 3], "batch": 4}
    factory = "fastopt.nn.bench:make_step_impl"
    times = time_isolated({"fast": Impl(factory, dict(kw, impl="fastopt-numpy")),
                           "plain": Impl(factory, dict(kw, impl="numpy"))},
                          rounds=2, block_s=0.01, pause_s=0.0)
    assert set(times) == {"fast", "plain"}
    assert all(0 < t < 0.1 for t in times.values())


def test_worker_failure_names_the_worker():
    with pytest.raises(RuntimeError, match="worker 'broken' exited with code 1"):
        time_isolated({"broken": Impl("fastopt.nn.bench:make_step_impl",
                                      {"impl": "no such implementation"})}, rounds=1,
                      block_s=0.01, pause_s=0.0)


def test_workers_do_not_inherit_fastopt_openmp_setting(monkeypatch):
    """A torch worker must see the environment torch users have, not the
    spin count that `import fastopt` set in this process."""
    if fastopt._OPENMP_SET_BY == "fastopt":
        assert os.environ["GOMP_SPINCOUNT"] == "1000"
        assert "GOMP_SPINCOUNT" not in _isolated.worker_env()
    monkeypatch.setattr(fastopt, "_OPENMP_SET_BY", "user")
    monkeypatch.setenv("GOMP_SPINCOUNT", "42")
    assert _isolated.worker_env()["GOMP_SPINCOUNT"] == "42"
