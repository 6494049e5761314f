"""Batched ensembles: identical (to rounding) to training the K models one by one."""

from __future__ import annotations

import numpy as np
import pytest

import fastopt
from fastopt.backends import reference as ref_backend
from fastopt.nn import MLP, Ensemble, available_backends

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


def _count_calls(monkeypatch):
    calls = []
    orig = ref_backend.adam_update

    def counting(*args, **kw):
        calls.append(args[0].size)
        return orig(*args, **kw)

    monkeypatch.setattr(ref_backend, "adam_update", counting)
    return calls


def test_kernel_calls_per_step(monkeypatch):
    """One kernel call for shared hyperparameters, one per model for a sweep."""
    calls = _count_calls(monkeypatch)
    ens = Ensemble(4, (5, 7, 3), seed=0)
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((8, 5)), rng.integers(0, 3, 8)
    opt = fastopt.AdamW(ens.param_groups(lr=1e-3), backend="numpy")
    ens.train_step(opt, X, y)
    assert calls == [ens.params.data.size]
    calls.clear()
    opt = fastopt.AdamW(ens.param_groups(lr=[1e-1, 1e-2, 1e-3, 1e-4]), backend="numpy")
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
