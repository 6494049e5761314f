"""fastopt.bench.nn and fastopt.bench.mnist: the ratios are what they
claim, and the MNIST race is between the same recipe in fastopt and torch."""

from __future__ import annotations

import pytest

from fastopt.bench import machine, mnist
from fastopt.bench import nn as bench
from fastopt.bench.machine import torch_or_none
from fastopt.data import find_mnist


def test_train_step_ratios_are_same_run_time_ratios():
    r = bench.bench_train_step(sizes=(8, 4, 3), batch=4, rounds=1, backends=["numpy"])
    t = r["times_s"]
    assert r["fastopt-numpy"]["vs_numpy"] == pytest.approx(t["numpy"] / t["fastopt-numpy"])
    if "torch" in t:
        assert r["fastopt-numpy"]["vs_torch"] == pytest.approx(t["torch"] / t["fastopt-numpy"])
    assert r["isolated_processes"] is False and r["threads"] == 1


def test_ensemble_ratios_compare_against_one_by_one():
    r = bench.bench_ensemble(k=3, sizes=(8, 4, 3), batch=4, rounds=1, backends=["numba"])
    t = r["times_s"]
    e = r["fastopt-numba ensemble"]
    assert e["vs_fastopt_one_by_one"] == pytest.approx(
        t["fastopt-numba one by one"] / t["fastopt-numba ensemble"])


@pytest.mark.skipif(torch_or_none() is None, reason="needs torch")
@pytest.mark.parametrize("threads", [1, None])
def test_mnist_race_runs_the_same_recipe(threads):
    try:
        find_mnist()
    except FileNotFoundError:
        pytest.skip("MNIST not found")
    r = mnist.bench_mnist(hidden=(32,), epochs=2, batch=128, target=0.5, threads=threads,
                          repeats=1)
    assert r["isolated_processes"] is (threads is None)
    acc = r["final_val_acc"]
    # same initial weights, batches and lr schedule: the same model to rounding
    assert acc["fastopt"] == pytest.approx(acc["torch"], abs=2 / 2000)
    assert acc["fastopt"] > 0.5
    assert r["time_to_target_ratio_fastopt_over_torch"] == pytest.approx(
        r["time_to_target_s"]["fastopt"] / r["time_to_target_s"]["torch"])


def test_mnist_race_where_an_implementation_never_reaches_the_target(monkeypatch):
    """Isolated runs only report the implementations that reached the target:
    the ratios of the others are left out, not a KeyError."""
    def fake(impl, kwargs):
        reached = impl == "fastopt"
        return {"history": {impl: [{"epoch": 1, "seconds": 1.0, "val_acc": 0.5}]},
                "time_to_target_s": {impl: 1.0} if reached else {},
                "train_seconds": {impl: 2.0 if reached else 3.0},
                "first_step_s": {impl: 0.1}, "backend": "numba", "sizes": [784, 32, 10]}
    monkeypatch.setattr(mnist, "_mnist_in_own_process", fake)
    monkeypatch.setattr(machine, "torch_or_none", lambda: object())
    r = mnist.bench_mnist(threads=None, repeats=1)
    assert not any(k.startswith("time_to_target_ratio") for k in r)
    assert r["epoch_time_ratio_fastopt_over_torch"] == pytest.approx(2 / 3)
    assert r["epoch_time_ratio_fastopt_dense_over_torch"] == pytest.approx(1.0)
