"""``fastopt.bench.in_loop``: the Adam step inside a NumPy training loop.

The loop must be a real training loop (correct gradients, the loss falls,
every implementation trains the same model to the same loss), the report
must carry its fields and degrade to a note without torch. CI-sized: tiny
MLPs, a few steps, no settle pauses.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastopt
from fastopt import bench
from fastopt.bench import machine

from conftest import FAST_BACKENDS

TINY = (12, 16, 8, 3)
BATCH = 8
QUICK = dict(sizes=TINY, batch=BATCH, steps=3, rounds=2, warmup=1, settle=0.0)


def _float64(ws):
    return [w.astype(np.float64) for w in ws]


def test_backward_pass_matches_finite_differences():
    """The loop's backward pass is the gradient of its loss."""
    ws = _float64(bench.mlp_init(TINY, seed=3))
    for w in ws[1::2]:                    # non-zero biases: exercise their gradient
        w[...] = np.random.default_rng(4).standard_normal(w.shape) * 0.1
    X, y = bench.mlp_data(TINY, BATCH, batches=1, seed=5)[0]
    X = X.astype(np.float64)
    loss, grads = bench.mlp_forward_backward(ws, X, y)
    assert [g.shape for g in grads] == [w.shape for w in ws]
    rng = np.random.default_rng(6)
    h = 1e-6
    for w, g in zip(ws, grads):
        for _ in range(4):
            i = tuple(rng.integers(0, n) for n in w.shape)
            old = w[i]
            w[i] = old + h
            up = bench.mlp_forward_backward(ws, X, y)[0]
            w[i] = old - h
            down = bench.mlp_forward_backward(ws, X, y)[0]
            w[i] = old
            assert (up - down) / (2 * h) == pytest.approx(g[i], rel=1e-5, abs=1e-8)


def test_backward_returns_new_gradient_arrays():
    ws = bench.mlp_init(TINY)
    X, y = bench.mlp_data(TINY, BATCH, batches=1)[0]
    g1 = bench.mlp_forward_backward(ws, X, y)[1]
    g2 = bench.mlp_forward_backward(ws, X, y)[1]
    assert all(a is not b and not np.shares_memory(a, b) for a, b in zip(g1, g2))
    assert all(g.dtype == np.float32 and g.flags.c_contiguous for g in g1)


def test_naive_numpy_adam_is_adam():
    """The NumPy baseline computes the same update as fastopt's Adam."""
    rng = np.random.default_rng(0)
    shapes = [(5, 3), (7,)]
    ps = [rng.standard_normal(s) for s in shapes]
    mine = [p.copy() for p in ps]
    naive = bench.NumpyAdam(ps, lr=1e-2)
    opt = fastopt.Adam(mine, lr=1e-2, backend="numpy")
    for _ in range(4):
        gs = [rng.standard_normal(s) for s in shapes]
        naive.step(gs)
        opt.step(gs)
    for a, b in zip(ps, mine):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def _impls():
    out = ["numpy", *FAST_BACKENDS, *(f"{b}-packed" for b in FAST_BACKENDS)]
    if bench.torch_or_none() is not None:
        out.append("torch-fused")
    return out


def test_every_implementation_trains_the_same_model():
    """Same initial weights, same batches, Adam everywhere: after N steps
    every implementation reaches the same loss and weights (up to float32
    rounding), and the loss has fallen, so the loop really trains."""
    data = bench.mlp_data(TINY, BATCH, batches=3)
    finals, weights = {}, {}
    for impl in _impls():
        loop, note = bench.make_in_loop_impl(impl, TINY, BATCH, data=data, lr=1e-2)
        assert loop is not None, (impl, note)
        loop.train(40)
        assert loop.iterations == 40
        finals[impl] = (loop.loss_first, loop.loss_last)
        weights[impl] = [np.array(w) for w in loop.ws]
    first, last = finals["numpy"]
    assert last < 0.5 * first, finals
    for impl, (f, l) in finals.items():
        assert f == first, (impl, finals)          # same model, same first batch
        assert l == pytest.approx(last, rel=1e-5), (impl, finals)
        for a, b in zip(weights[impl], weights["numpy"]):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=impl)


def test_case_reports_every_field():
    impls = ("numpy", *FAST_BACKENDS)
    rep = bench.in_loop_case(impls=impls, **QUICK)
    res = rep["results"]
    if FAST_BACKENDS:       # the fastest backend's packed variant is added
        packed = [k for k in res if k.endswith("-packed")]
        assert len(packed) == 1 and packed[0][:-len("-packed")] in FAST_BACKENDS
    assert set(impls) <= set(res)
    for impl, r in res.items():
        for key in ("step_in_loop_s", "train_step_s", "step_hot_s"):
            assert r[key] > 0, (impl, key)
        assert r["train_step_s"] > r["step_in_loop_s"]
        assert r["in_loop_vs_hot"] == pytest.approx(r["step_in_loop_s"] / r["step_hot_s"])
        assert r["vs_numpy"]["step_in_loop"] == pytest.approx(
            res["numpy"]["step_in_loop_s"] / r["step_in_loop_s"])
        assert set(r["vs_numpy"]) == {"step_in_loop", "train_step", "step_hot"}
        assert len(r["rounds_s"]["step_in_loop"]) == QUICK["rounds"]
        assert r["loss_last"] < r["loss_first"]
    assert res["numpy"]["vs_numpy"]["train_step"] == 1.0
    env = rep["environment"]
    assert len(env["loadavg_before"]) == 3 and env["fastopt_threads"] >= 1
    assert "note" in env["other_processes"]
    pytest.importorskip("threadpoolctl")
    blas = [p for p in env["thread_pools"] if p.get("user_api") == "blas"]
    assert blas and all("num_threads" in p for p in blas)
    table = bench.format_in_loop(rep)
    assert all(impl in table for impl in res) and "OPENBLAS_NUM_THREADS" in table


def test_the_roofline_streams_adams_bytes_and_leaves_the_model_alone():
    """The roofline row's step reads p and the fresh g and writes p, m and v
    of every array (one thread, no math), keeping the weights where training
    left them; its row has loop/hot and no ratios against the others."""
    data = bench.mlp_data(TINY, BATCH, batches=2)
    loop, note = bench.make_in_loop_impl("roofline", TINY, BATCH, data=data)
    assert loop is not None, note
    grads = loop.forward_backward()
    for w in loop.ws:               # from zero: the increment alone, exactly
        w[...] = 0
    loop.step(grads)
    for w, g in zip(loop.ws, grads):
        np.testing.assert_array_equal(w, np.float32(1e-9) * g)
    loop.step(grads)
    for (m, v), g in zip(loop.step.state, grads):      # m and v read and written
        np.testing.assert_array_equal(m, 2 * g.reshape(-1))
        np.testing.assert_array_equal(v, 2 * g.reshape(-1))
    rep = bench.in_loop_case(impls=("numpy", "roofline"), packed=None, **QUICK)
    row = rep["results"]["roofline"]
    assert row["step_in_loop_s"] > 0 and row["step_hot_s"] > 0
    assert row["in_loop_vs_hot"] == pytest.approx(row["step_in_loop_s"] / row["step_hot_s"])
    assert row["vs_numpy"] is None and row["vs_torch_fused"] is None
    table = bench.format_in_loop(rep)
    assert rep["roofline_in_loop_vs_hot"] == row["in_loop_vs_hot"]
    over = rep["in_loop_vs_hot_over_roofline"]
    assert set(over) == {"numpy"}
    assert over["numpy"] == pytest.approx(rep["results"]["numpy"]["in_loop_vs_hot"]
                                          / row["in_loop_vs_hot"])
    assert "roofline: the same bytes on one thread took" in table
    assert f"numpy {over['numpy']:.2f}" in table


def test_the_roofline_leaves_the_step_matrix_kernels_alone(monkeypatch):
    """The in-loop roofline's kernel is cached apart from the step matrix's
    streaming kernels: either may be made first."""
    from fastopt.bench import roofline
    monkeypatch.setattr(roofline, "_STREAM", {})     # as in a new process
    monkeypatch.setattr(roofline, "_LOOP", {})
    roofline.loop_streaming_step([np.zeros(4, np.float32)])
    kernels = roofline.stream_kernels()
    assert {"rw4_3", "rw4_3_serial", "read1"} <= set(kernels)


def test_case_records_openblas_num_threads(monkeypatch):
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    rep = bench.in_loop_case(impls=("numpy",), packed=None, **QUICK)
    assert rep["environment"]["threads_env"]["OPENBLAS_NUM_THREADS"] == "1"
    assert list(rep["results"]) == ["numpy"]
    assert "OPENBLAS_NUM_THREADS=1" in bench.format_in_loop(rep)


def test_without_torch_the_torch_row_is_a_note(monkeypatch):
    monkeypatch.setattr(machine, "torch_or_none", lambda: None)
    rep = bench.in_loop_case(impls=("numpy", "torch-fused"), packed=None, **QUICK)
    row = rep["results"]["torch-fused"]
    assert row["step_in_loop_s"] is None and row["note"] == "torch not installed"
    assert rep["results"]["numpy"]["vs_torch_fused"] is None
    table = bench.format_in_loop(rep)
    assert "torch not installed" in table


def test_unavailable_backend_is_a_note():
    rep = bench.in_loop_case(impls=("numpy", "nosuch"), packed=None, **QUICK)
    assert "not available" in rep["results"]["nosuch"]["note"]
    loop, note = bench.make_in_loop_impl("nosuch-packed", TINY, BATCH)
    assert loop is None and "not available" in note


def test_torch_alone_runs_in_a_process_that_imports_torch_first():
    """The "torch-fused-alone" row: torch as its users run it, its own
    OpenMP runtime loaded at its defaults; the other rows get ratios to it."""
    pytest.importorskip("torch")
    rep = bench.in_loop_case(impls=("numpy", "torch-fused-alone"), packed=None, **QUICK)
    row = rep["results"]["torch-fused-alone"]
    assert row["step_in_loop_s"] > 0 and row["step_hot_s"] > 0
    assert row["note"].startswith("own process, torch imported first")
    assert any("/torch/" in p for p in row["libgomp"])            # torch's own copy
    assert row["loss_last"] < row["loss_first"]                  # it trained there
    numpy_row = rep["results"]["numpy"]
    assert numpy_row["vs_torch_alone"]["step_in_loop"] == pytest.approx(
        row["step_in_loop_s"] / numpy_row["step_in_loop_s"])
    assert "vs torch alone" in bench.format_in_loop(rep)


def test_the_main_process_shares_fastopts_libgomp_with_torch():
    """The "torch-fused" row's torch runs on the libgomp ``import fastopt``
    loaded (the row the alone one is compared with)."""
    pytest.importorskip("torch")
    from fastopt import _openmp
    if _openmp.wait_policy().get("set_by") != "fastopt":
        pytest.skip("this process loaded libgomp before fastopt (torch imported first?)")
    bench.in_loop_case(impls=("torch-fused",), packed=None, **QUICK)
    assert not any("/torch/" in p for p in _openmp._loaded_libgomps())


def test_without_torch_the_torch_alone_row_is_a_note(monkeypatch):
    monkeypatch.setattr(machine, "torch_or_none", lambda: None)
    rep = bench.in_loop_case(impls=("numpy", "torch-fused-alone"), packed=None, **QUICK)
    row = rep["results"]["torch-fused-alone"]
    assert row["step_in_loop_s"] is None and row["note"] == "torch not installed"
    assert rep["results"]["numpy"]["vs_torch_alone"] is None


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_rows_say_what_the_thread_choice_chose(backend):
    """A table above the always-serial size reports its serial/threaded
    choice (list and packed); small tables and the baselines report none."""
    sizes = (256, 160, 10)                   # a 40960-element first layer
    rep = bench.in_loop_case(impls=(backend, "numpy"), packed=backend,
                             **{**QUICK, "sizes": sizes})
    for impl in (backend, f"{backend}-packed"):
        choice = rep["results"][impl]["thread_choice"]
        if fastopt.get_num_threads() > 1:
            assert choice.split(";")[0] in ("serial", "threaded") and "typical" in choice
    assert rep["results"]["numpy"]["thread_choice"] == ""
    tiny = bench.in_loop_case(impls=(backend,), packed=None, **QUICK)
    assert tiny["results"][backend]["thread_choice"] == ""
