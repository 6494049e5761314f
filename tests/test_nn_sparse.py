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


def _count_sparse_calls(monkeypatch):
    """Calls of the sparse forward and weight-gradient kernels, by name."""
    calls = []
    for name in ("linear", "linear_grad_w"):
        real = getattr(_sparse, name)

        def counting(*args, real=real, name=name):
            calls.append(name)
            return real(*args)
        monkeypatch.setattr(_sparse, name, counting)
    return calls


# float64 data into a float32 model, integers, a non-contiguous view: all are
# converted into the workspace before indexing
INPUTS = {"float32": lambda X: X, "float64": lambda X: X.astype(np.float64),
          "int": lambda X: (X * 4).astype(np.int64),
          "strided": lambda X: np.repeat(X, 2, axis=-1)[..., ::2]}


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "own"])
@pytest.mark.parametrize("order, threads", [("model", 1), ("layer", 1), ("model", 2)])
@pytest.mark.parametrize("inputs", list(INPUTS))
def test_sparse_and_dense_training_agree(backend, shared, order, threads, inputs,
                                         monkeypatch):
    rng = np.random.default_rng(1)
    K, B = 3, 16
    shape = (B, 40) if shared else (K, B, 40)
    batches = [(INPUTS[inputs](_sparse_batch(rng, shape)), rng.integers(0, 5, shape[:-1]))
               for _ in range(4)]
    calls = _count_sparse_calls(monkeypatch)
    out = {}
    for mode in (False, True):
        ens = Ensemble(K, (40, 24, 5), "tanh", seed=2, backend=backend)
        ens.sparse_input = mode
        ens.order, ens.threads = order, threads
        opt = fastopt.AdamW(ens.param_groups(lr=[1e-2, 1e-3, 3e-3]))
        out[mode, "fwd0"] = ens.forward(batches[0][0])   # inference first: rows only
        out[mode] = _train(ens, opt, batches)
        out[mode, "fwd"] = ens.forward(batches[0][0])
        out[mode, "eval"] = ens.evaluate(batches[1][0], batches[1][1], batch_size=5)
        if not mode:
            assert not calls
    # the sparse run really ran sparse: in training once per model (model
    # order) or once for all (layer order); inference is stacked: forward x2
    # and evaluate's 4 chunks of 5
    per_step = K if order == "model" else 1
    assert calls.count("linear_grad_w") == 4 * per_step
    assert calls.count("linear") == 4 * per_step + 2 + 4
    np.testing.assert_allclose(out[True, "eval"][0], out[False, "eval"][0], rtol=1e-5)
    np.testing.assert_allclose(out[True, "fwd0"], out[False, "fwd0"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out[True], out[False], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out[True, "fwd"], out[False, "fwd"], rtol=1e-4, atol=1e-5)


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
    assert calls.count("linear") == 1
    net.train_step(opt, rng.standard_normal((32, 784)).astype(np.float32), y)
    assert calls.count("linear") == 1                       # dense data: BLAS
    net.sparse_input = False
    net.train_step(opt, _sparse_batch(rng, (32, 784), density=0.15), y)
    assert calls.count("linear") == 1
    net.sparse_input = True                      # forced, even on dense data
    net.train_step(opt, rng.standard_normal((32, 784)).astype(np.float32), y)
    assert calls.count("linear") == 2
    net.sparse_input = "auto"                    # dense matmuls on 8 BLAS threads win
    monkeypatch.setattr(_blas, "blas_threads", lambda: 8)
    net.train_step(opt, _sparse_batch(rng, (32, 784), density=0.15), y)
    assert calls.count("linear") == 2


@pytest.mark.parametrize("backend", COMPILED)
def test_auto_checks_the_whole_batch_after_the_sample(backend, monkeypatch):
    """The first 32 rows look sparse, the rest is dense: the exact density
    decides (dense), after the index pass."""
    from fastopt.nn import _blas
    rng = np.random.default_rng(7)
    calls = _count_sparse_calls(monkeypatch)
    monkeypatch.setattr(_blas, "blas_threads", lambda: 1)
    X = rng.standard_normal((96, 784)).astype(np.float32)
    X[:32] = _sparse_batch(rng, (32, 784), density=0.05)
    net = MLP((784, 256, 10), seed=0, backend=backend)
    net.loss_and_grad(X, rng.integers(0, 10, 96))
    assert not calls
    net.loss_and_grad(X[:32], rng.integers(0, 10, 32))
    assert calls


@pytest.mark.parametrize("backend", COMPILED)
def test_cost_model_sees_one_blas_thread_when_models_are_split(backend, monkeypatch):
    from fastopt.nn import _blas
    seen = []
    real = _sparse.worth_it
    monkeypatch.setattr(_sparse, "worth_it", lambda *a: seen.append(a[3]) or real(*a))
    monkeypatch.setattr(_blas, "blas_threads", lambda: 2)
    rng = np.random.default_rng(8)
    X = _sparse_batch(rng, (16, 40))
    ens = Ensemble(4, (40, 16, 3), seed=0, backend=backend)
    ens.loss_and_grad(X, rng.integers(0, 3, 16))
    ens.threads = 2          # two threads of models, BLAS on one thread each
    ens.loss_and_grad(X, rng.integers(0, 3, 16))
    assert seen[0] == 2 and seen[-1] == 1


def test_reference_backend_stays_dense(monkeypatch):
    calls = _count_sparse_calls(monkeypatch)
    net = MLP((30, 8, 3), backend="numpy")
    net.sparse_input = True
    X = _sparse_batch(np.random.default_rng(3), (16, 30))
    net.loss_and_grad(X, np.zeros(16, np.int64))
    assert not calls


@pytest.mark.parametrize("bad", ["yes", "Auto", 1, 0, None, 0.5])
def test_bad_sparse_input_setting_is_refused(bad):
    net = MLP((30, 8, 3), backend=(COMPILED + ["numpy"])[0])
    net.sparse_input = False
    with pytest.raises(ValueError, match="sparse_input"):
        net.sparse_input = bad
    assert net.sparse_input is False          # the old setting stays


def test_numpy_bools_are_accepted():
    net = MLP((30, 8, 3), backend="numpy")
    net.sparse_input = np.True_
    assert net.sparse_input is True


@pytest.mark.parametrize("backend", COMPILED)
def test_a_nan_weight_on_an_all_zero_feature_is_skipped_as_documented(backend):
    """The one documented difference from the dense product: a zero input
    skips its weight row, so a NaN there does not reach this batch's loss;
    a NaN weight on a feature with a non-zero input does, as in dense."""
    rng = np.random.default_rng(9)
    X = _sparse_batch(rng, (16, 30))          # feature 3 is zero in every sample
    y = rng.integers(0, 3, 16)
    losses = {}
    for mode in (True, False):
        net = MLP((30, 8, 3), "tanh", seed=0, backend=backend)
        net.sparse_input = mode
        net.W[0][3, 2] = np.nan
        losses[mode, "zero"] = net.loss_and_grad(X, y)
        net.W[0][3, 2] = 0.0
        net.W[0][5, 2] = np.nan               # feature 5 has non-zeros
        losses[mode, "used"] = net.loss_and_grad(X, y)
    assert np.isfinite(losses[True, "zero"]) and np.isnan(losses[False, "zero"])
    assert np.isnan(losses[True, "used"]) and np.isnan(losses[False, "used"])


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
