"""Batched ensembles: identical (to rounding) to training the K models one by one."""

from __future__ import annotations

import numpy as np
import pytest

import fastopt
from fastopt.nn import MLP, Ensemble, available_backends

from conftest import count_native_steps

K = 3
SIZES = (6, 8, 5, 3)
LRS = [3e-2, 1e-2, 1e-3]
WDS = [0.0, 0.05, 0.2]


def _batches(rng, steps, own, loss="cross_entropy"):
    lead = (K,) if own else ()
    out = []
    for _ in range(steps):
        X = rng.standard_normal(lead + (10, SIZES[0]))
        y = (rng.integers(0, SIZES[-1], lead + (10,)) if loss == "cross_entropy" else
             rng.standard_normal(lead + (10, SIZES[-1])))
        out.append((X, y))
    return out


@pytest.mark.parametrize("own", [True, False], ids=["own-batches", "same-batch"])
@pytest.mark.parametrize("backend", available_backends())
def test_ensemble_matches_models_trained_one_by_one(backend, own):
    rng = np.random.default_rng(0)
    batches = _batches(rng, 6, own)
    ens = Ensemble(K, SIZES, "tanh", dtype=np.float64, seed=5, backend=backend)
    opt = fastopt.AdamW(ens.param_groups(lr=LRS, weight_decay=WDS))
    ens_losses = np.array([ens.train_step(opt, X, y).copy() for X, y in batches])
    for k in range(K):
        net = MLP(SIZES, "tanh", dtype=np.float64, seed=5 + k, backend=backend)
        o = fastopt.AdamW(net.param_groups(), lr=LRS[k], weight_decay=WDS[k])
        losses = [net.train_step(o, X[k] if own else X, y[k] if own else y)
                  for X, y in batches]
        np.testing.assert_allclose(ens_losses[:, k], losses, rtol=1e-12)
        np.testing.assert_allclose(ens.model(k).params.data, net.params.data, rtol=1e-10,
                                   atol=1e-14)


def test_ensemble_mse_and_sgd_match_one_by_one():
    rng = np.random.default_rng(1)
    batches = _batches(rng, 4, True, "mse")
    ens = Ensemble(K, SIZES, "gelu", "mse", dtype=np.float64, seed=2)
    opt = fastopt.SGD(ens.param_groups(lr=LRS), lr=0.1, momentum=0.9)
    for X, y in batches:
        ens.train_step(opt, X, y)
    for k in range(K):
        net = MLP(SIZES, "gelu", "mse", dtype=np.float64, seed=2 + k)
        o = fastopt.SGD(net.param_groups(), lr=LRS[k], momentum=0.9)
        for X, y in batches:
            net.train_step(o, X[k], y[k])
        np.testing.assert_allclose(ens.model(k).params.data, net.params.data, rtol=1e-10,
                                   atol=1e-14)


def test_float32_ensemble_close_to_one_by_one():
    rng = np.random.default_rng(2)
    batches = [(X.astype(np.float32), y) for X, y in _batches(rng, 3, True)]
    ens = Ensemble(K, SIZES, "relu", seed=0)
    opt = fastopt.AdamW(ens.param_groups(lr=LRS))
    for X, y in batches:
        ens.train_step(opt, X, y)
    for k in range(K):
        net = MLP(SIZES, "relu", seed=k)
        o = fastopt.AdamW(net.param_groups(), lr=LRS[k])
        for X, y in batches:
            net.train_step(o, X[k], y[k])
        np.testing.assert_allclose(ens.model(k).params.data, net.params.data, rtol=1e-5,
                                   atol=1e-6)


def _count_calls(monkeypatch, backend):
    """Sizes of the optimizer's native calls (one per param group)."""
    return count_native_steps(monkeypatch, fastopt.backends.get_backend(backend))


@pytest.mark.parametrize("backend", ["numba", "cython"])
def test_kernel_calls_per_step(monkeypatch, backend):
    """One kernel call for shared hyperparameters, one per model for a sweep."""
    calls = _count_calls(monkeypatch, backend)
    ens = Ensemble(4, (5, 7, 3), seed=0)
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((8, 5)), rng.integers(0, 3, 8)
    opt = fastopt.AdamW(ens.param_groups(lr=1e-3), backend=backend)
    ens.train_step(opt, X, y)
    assert calls == [ens.params.data.size]
    calls.clear()
    opt = fastopt.AdamW(ens.param_groups(lr=[1e-1, 1e-2, 1e-3, 1e-4]), backend=backend)
    ens.train_step(opt, X, y)
    assert calls == [ens.n_per_model] * 4


def test_param_groups_validation():
    ens = Ensemble(3, (4, 2), seed=0)
    with pytest.raises(ValueError, match="lr has 2 values but the ensemble has 3"):
        ens.param_groups(lr=[1e-3, 1e-2])
    with pytest.raises(ValueError, match=r"weight_decay\[1\]"):
        ens.param_groups(lr=1e-3, weight_decay=[0.1, -1.0, 0.0])
    with pytest.raises(TypeError, match=r"lr\[0\]"):
        ens.param_groups(lr=["a", 1, 2])
    groups = ens.param_groups(lr=[1, 2, 3], weight_decay=0.5)
    assert [g["lr"] for g in groups] == [1.0, 2.0, 3.0]
    assert [g["weight_decay"] for g in groups] == [0.5] * 3


def test_shared_labels_broadcast_to_own_batches():
    """[K, B, n_in] inputs with one [B] label vector: every model sees those labels."""
    rng = np.random.default_rng(3)
    X = rng.standard_normal((K, 10, SIZES[0]))
    y = rng.integers(0, 3, 10)
    a = Ensemble(K, SIZES, dtype=np.float64, seed=0, backend="numpy")
    b = Ensemble(K, SIZES, dtype=np.float64, seed=0, backend="numpy")
    np.testing.assert_array_equal(a.loss_and_grad(X, y),
                                  b.loss_and_grad(X, np.broadcast_to(y, (K, 10))))
    np.testing.assert_array_equal(a.grads.data, b.grads.data)


def test_model_major_and_layer_major_orders_agree():
    rng = np.random.default_rng(4)
    X, y = rng.standard_normal((K, 10, SIZES[0])), rng.integers(0, 3, (K, 10))
    nets = []
    for order in ("model", "layer"):
        ens = Ensemble(K, SIZES, "tanh", dtype=np.float64, seed=1)
        ens.order = order
        nets.append((ens.loss_and_grad(X, y).copy(), ens.grads.data.copy()))
    np.testing.assert_array_equal(nets[0][0], nets[1][0])
    np.testing.assert_array_equal(nets[0][1], nets[1][1])


def _blas_threads():
    from threadpoolctl import threadpool_info
    return [(i["filepath"], i["num_threads"]) for i in threadpool_info()
            if i["user_api"] == "blas"]


@pytest.mark.parametrize("backend", [b for b in available_backends() if b != "numpy"])
def test_models_split_over_threads_match_serial(backend, monkeypatch):
    import threading
    """threads=3 runs the models' forward/backward on 3 threads (BLAS on one
    thread each), with the same result as one model after another."""
    rng = np.random.default_rng(6)
    k = 7
    X, y = rng.standard_normal((k, 10, SIZES[0])), rng.integers(0, 3, (k, 10))
    out = {}
    blas_before = _blas_threads()
    for threads in (1, 3):
        ens = Ensemble(k, SIZES, "gelu", dtype=np.float64, seed=1, backend=backend)
        ens.threads = threads
        seen = {}
        models = ens._models

        def record(X3, ws, run, on_grads_ready=None, sp=None, models=models, seen=seen):
            seen[tuple(run)] = threading.get_ident()
            return models(X3, ws, run, on_grads_ready, sp)
        monkeypatch.setattr(ens, "_models", record)
        out[threads] = (ens.loss_and_grad(X, y).copy(), ens.grads.data.copy())
        if threads == 1:
            assert list(seen) == [tuple(range(k))]
        else:
            assert sorted(seen) == [(0, 1), (2, 3), (4, 5, 6)]
            # the caller takes the first run; the pool's two workers the others
            # (one worker may take both when it is quick)
            assert seen[(0, 1)] == threading.get_ident()
            assert len(set(seen.values())) >= 2
    np.testing.assert_allclose(out[3][0], out[1][0], rtol=1e-13)
    np.testing.assert_allclose(out[3][1], out[1][1], rtol=1e-12, atol=1e-15)
    assert _blas_threads() == blas_before        # BLAS threads restored


def test_worker_error_propagates_and_restores_blas(monkeypatch):
    ens = Ensemble(4, SIZES, dtype=np.float64, seed=1, backend="numba")
    ens.threads = 2
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((4, 10, SIZES[0])), rng.integers(0, 3, (4, 10))
    blas_before = _blas_threads()

    def boom(*a, **kw):
        raise RuntimeError("kernel failed")
    monkeypatch.setattr(ens._kern, "softmax_xent", boom)
    with pytest.raises(RuntimeError, match="kernel failed"):
        ens.loss_and_grad(X, y)
    assert _blas_threads() == blas_before


def test_grad_hook_keeps_models_on_the_calling_thread():
    """on_grads_ready callbacks (MPI calls) come from the caller's thread."""
    import threading
    ens = Ensemble(4, SIZES, dtype=np.float64, seed=1, backend="numba")
    ens.threads = 2
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((4, 10, SIZES[0])), rng.integers(0, 3, (4, 10))
    threads = set()
    ens.loss_and_grad(X, y, on_grads_ready=lambda lo, hi: threads.add(threading.get_ident()))
    assert threads == {threading.get_ident()}


def test_optimizer_threads_during_train_step(monkeypatch, restore_threads):
    """After BLAS-threaded matmuls the optimizer runs on one thread (BLAS's
    spinning workers hold the other cores); after a model-parallel ensemble,
    whose BLAS ran single-threaded, on fastopt's threads. Restored after."""
    fastopt.set_num_threads(2)
    rng = np.random.default_rng(0)
    for k, threads, want in ((1, None, 1), (4, 1, 1), (4, 2, 2)):
        ens = Ensemble(k, SIZES, dtype=np.float64, seed=1, backend="numba")
        ens.threads = threads
        opt = fastopt.AdamW(ens.param_groups(), lr=1e-2)
        seen = []
        step = opt.step
        monkeypatch.setattr(opt, "step", lambda g, step=step: (
            seen.append(fastopt.get_num_threads()), step(g))[1])
        X, y = rng.standard_normal((k, 10, SIZES[0])), rng.integers(0, 3, (k, 10))
        ens.train_step(opt, X, y)
        assert seen == [want], (k, threads)
        assert fastopt.get_num_threads() == 2


@pytest.mark.parametrize("backend", available_backends())
def test_clipping_per_model_trains_each_as_alone(backend):
    """A teacher's trial: with the optimizer's max_grad_norm (one norm over
    every model's gradients) a diverging lr in a sweep shrank the other
    models' steps. train_step(max_grad_norm=) clips each model by its own
    norm: each model trains as the same MLP alone with max_grad_norm."""
    rng = np.random.default_rng(3)
    batches = _batches(rng, 6, own=False)
    ens = Ensemble(K, SIZES, "tanh", dtype=np.float64, seed=5, backend=backend)
    lrs = [30.0, 1e-1, 1e-2]            # the first far too large
    opt = fastopt.SGD(ens.param_groups(lr=lrs), momentum=0.9)
    for X, y in batches:
        ens.train_step(opt, X, y, max_grad_norm=0.5)
    for k in range(1, K):
        net = MLP(SIZES, "tanh", dtype=np.float64, seed=5 + k, backend=backend)
        o = fastopt.SGD(net.param_groups(), lr=lrs[k], momentum=0.9, max_grad_norm=0.5)
        for X, y in batches:
            net.train_step(o, X, y)
        np.testing.assert_allclose(ens.model(k).params.data, net.params.data, rtol=1e-9,
                                   atol=1e-12)


def test_clip_grads_returns_each_models_norm_and_scales_as_clip_by_global_norm():
    ens = Ensemble(2, SIZES, dtype=np.float32, seed=1)
    rng = np.random.default_rng(0)
    ens.grads.data[:] = rng.standard_normal(ens.grads.data.size).astype(np.float32)
    n = ens.grads.data.size // 2
    ens.grads.data[n:] *= 1e-3                          # the second model: under the norm
    want = [g.copy() for g in ens.grads]
    norms = [fastopt.clip_by_global_norm(want[i * 6:(i + 1) * 6], 1.0) for i in range(2)]
    got = ens.clip_grads(1.0)
    np.testing.assert_allclose(got, norms, rtol=1e-6)
    for a, b in zip(ens.grads, want):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    with pytest.raises(ValueError, match="max_norm"):
        ens.clip_grads(0.0)
