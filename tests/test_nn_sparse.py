"""The sparse-input first layer (fastopt.nn._sparse) against dense matmuls."""

from __future__ import annotations

import numpy as np
import pytest

import fastopt
from fastopt.nn import MLP, Ensemble, available_backends
from fastopt.nn import _sparse

COMPILED = [b for b in available_backends() if b != "numpy"]
RTOL = {np.float32: 2e-5, np.float64: 1e-12}


def _sparse_batch(rng, shape, density=0.2, dtype=np.float32):
    """Mostly zeros, plus the edge cases: an all-zero sample, an all-zero
    feature, a fully dense sample, and negative values."""
    X = rng.standard_normal(shape) * (rng.random(shape) < density)
    X[..., 2, :] = rng.standard_normal(shape[-1]) + 5.0
    X[..., 1, :] = 0.0
    X[..., :, 3] = 0.0
    return X.astype(dtype)


def _index(X3):
    ws = _sparse.workspace(*X3.shape, X3.dtype)
    nnz = _sparse.index_rows(X3, ws["val"], ws["idx"], ws["cnt"])
    _sparse.index_cols(ws["val"], ws["idx"], ws["cnt"], ws["cval"], ws["crow"], ws["cptr"])
    return nnz, ws


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "own"])
@pytest.mark.parametrize("n_out", [1, 7, 64])   # 7: the eight-wide loop's tail
def test_kernels_match_dense_matmuls(dtype, shared, n_out):
    rng = np.random.default_rng(n_out)
    K, B, n = 3, 21, 30
    X = _sparse_batch(rng, (1 if shared else K, B, n), dtype=dtype)
    W = rng.standard_normal((K, n, n_out)).astype(dtype)
    D = rng.standard_normal((K, B, n_out)).astype(dtype)
    nnz, ws = _index(X)
    assert nnz == np.count_nonzero(X)
    Z = np.full((K, B, n_out), np.nan, dtype)
    gW = np.full((K, n, n_out), np.nan, dtype)
    _sparse.linear(ws["val"], ws["idx"], ws["cnt"], W, Z)
    _sparse.linear_grad_w(ws["cval"], ws["crow"], ws["cptr"], D, gW)
    X3 = np.broadcast_to(X, (K, B, n)).astype(np.float64)
    np.testing.assert_allclose(Z, X3 @ W, rtol=RTOL[dtype], atol=RTOL[dtype] * 10)
    np.testing.assert_allclose(gW, np.swapaxes(X3, 1, 2) @ D, rtol=RTOL[dtype],
                               atol=RTOL[dtype] * 10)
    assert not gW[:, 3].any()          # a feature that is zero in the whole batch
    assert not Z[:, 1].any()           # a sample that is all zeros


def test_column_index_is_sorted_and_complete():
    rng = np.random.default_rng(0)
    X = _sparse_batch(rng, (2, 9, 12))
    _, ws = _index(X)
    for k in range(2):
        p = ws["cptr"][k]
        assert p[0] == 0 and p[-1] == np.count_nonzero(X[k])
        for j in range(12):
            rows = ws["crow"][k, p[j]:p[j + 1]]
            assert list(rows) == sorted(np.flatnonzero(X[k, :, j]))
            np.testing.assert_array_equal(ws["cval"][k, p[j]:p[j + 1]], X[k, rows, j])


def test_all_zero_batch():
    X = np.zeros((1, 4, 5), np.float32)
    nnz, ws = _index(X)
    assert nnz == 0
    Z = np.ones((2, 4, 3), np.float32)
    gW = np.ones((2, 5, 3), np.float32)
    _sparse.linear(ws["val"], ws["idx"], ws["cnt"], np.ones((2, 5, 3), np.float32), Z)
    _sparse.linear_grad_w(ws["cval"], ws["crow"], ws["cptr"], np.ones((2, 4, 3), np.float32), gW)
    assert not Z.any() and not gW.any()


def test_cost_model_decisions():
    """The cases measured on the test machine (see _sparse's comment)."""
    assert _sparse.worth_it(0.19, 256, 1)        # MNIST into 256 units
    assert _sparse.worth_it(0.19, 64, 16)        # 16 models sharing an MNIST batch
    assert not _sparse.worth_it(0.19, 64, 1)     # an MNIST batch per 64-unit model
    assert not _sparse.worth_it(0.6, 256, 1)     # dense-ish data
    assert not _sparse.worth_it(1.0, 4096, 64)
    assert not _sparse.worth_it(0.19, 256, 1, blas_threads=2)   # about even: dense
    assert _sparse.worth_it(0.05, 256, 1, blas_threads=2)


def _train(model, opt, batches):
    for X, y in batches:
        model.train_step(opt, X, y)
    return model.params.data.copy()


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "own"])
def test_sparse_and_dense_training_agree(backend, shared):
    rng = np.random.default_rng(1)
    K, B = 3, 16
    shape = (B, 40) if shared else (K, B, 40)
    batches = [(_sparse_batch(rng, shape), rng.integers(0, 5, shape[:-1])) for _ in range(4)]
    out = {}
    for mode in (False, True):
        ens = Ensemble(K, (40, 24, 5), "tanh", seed=2, backend=backend)
        ens.sparse_input = mode
        opt = fastopt.AdamW(ens.param_groups(lr=[1e-2, 1e-3, 3e-3]))
        out[mode, "fwd0"] = ens.forward(batches[0][0])   # inference first: rows only
        out[mode] = _train(ens, opt, batches)
        out[mode, "fwd"] = ens.forward(batches[0][0])
    np.testing.assert_allclose(out[True, "fwd0"], out[False, "fwd0"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out[True], out[False], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out[True, "fwd"], out[False, "fwd"], rtol=1e-4, atol=1e-5)


def _count_sparse_calls(monkeypatch):
    calls = []
    real = _sparse.linear

    def counting(*args):
        calls.append(1)
        return real(*args)
    monkeypatch.setattr(_sparse, "linear", counting)
    return calls


@pytest.mark.parametrize("backend", COMPILED)
def test_auto_takes_the_sparse_layer_only_where_it_pays(backend, monkeypatch):
    from fastopt.nn import _blas
    rng = np.random.default_rng(2)
    calls = _count_sparse_calls(monkeypatch)
    monkeypatch.setattr(_blas, "blas_threads", lambda: 1)
    net = MLP((784, 256, 10), seed=0, backend=backend)
    opt = fastopt.AdamW(net.param_groups())
    y = rng.integers(0, 10, 32)
    net.train_step(opt, _sparse_batch(rng, (32, 784), density=0.15), y)
    assert len(calls) == 1
    net.train_step(opt, rng.standard_normal((32, 784)).astype(np.float32), y)
    assert len(calls) == 1                       # dense data: BLAS
    net.sparse_input = False
    net.train_step(opt, _sparse_batch(rng, (32, 784), density=0.15), y)
    assert len(calls) == 1
    net.sparse_input = True                      # forced, even on dense data
    net.train_step(opt, rng.standard_normal((32, 784)).astype(np.float32), y)
    assert len(calls) == 2
    net.sparse_input = "auto"                    # dense matmuls on 8 BLAS threads win
    monkeypatch.setattr(_blas, "blas_threads", lambda: 8)
    net.train_step(opt, _sparse_batch(rng, (32, 784), density=0.15), y)
    assert len(calls) == 2


def test_reference_backend_stays_dense(monkeypatch):
    calls = _count_sparse_calls(monkeypatch)
    net = MLP((30, 8, 3), backend="numpy")
    net.sparse_input = True
    X = _sparse_batch(np.random.default_rng(3), (16, 30))
    net.loss_and_grad(X, np.zeros(16, np.int64))
    assert not calls


@pytest.mark.parametrize("bad", ["yes", 1, None, np.True_])
def test_bad_sparse_input_setting_changes_nothing(bad):
    net = MLP((30, 8, 3), backend=(COMPILED + ["numpy"])[0])
    before = net.params.data.copy()
    net.sparse_input = bad
    X = _sparse_batch(np.random.default_rng(4), (16, 30))
    with pytest.raises(ValueError, match="sparse_input"):
        net.loss_and_grad(X, np.zeros(16, np.int64))
    np.testing.assert_array_equal(net.params.data, before)
    assert not net.grads.data.any()


@pytest.mark.parametrize("backend", COMPILED)
def test_float64_sparse_gradients_match_the_reference(backend):
    rng = np.random.default_rng(5)
    X = _sparse_batch(rng, (12, 20), dtype=np.float64)
    y = rng.integers(0, 4, 12)
    ref = MLP((20, 9, 4), "gelu", dtype=np.float64, backend="numpy", seed=3)
    fast = MLP((20, 9, 4), "gelu", dtype=np.float64, backend=backend, seed=3)
    fast.sparse_input = True
    assert fast.loss_and_grad(X, y) == pytest.approx(ref.loss_and_grad(X, y), rel=1e-13)
    np.testing.assert_allclose(fast.grads.data, ref.grads.data, rtol=1e-11, atol=1e-14)
