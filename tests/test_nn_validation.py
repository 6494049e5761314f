"""Bad input to fastopt.nn: a clear error naming the problem, nothing written."""

from __future__ import annotations

import numpy as np
import pytest

import fastopt
from fastopt.nn import MLP, Ensemble, available_backends

from conftest import assert_same_tree, optimizer_snapshot


def _setup(backend, k=None, loss="cross_entropy"):
    rng = np.random.default_rng(0)
    net = (MLP((6, 5, 3), "relu", loss, seed=0, backend=backend) if k is None else
           Ensemble(k, (6, 5, 3), "relu", loss, seed=0, backend=backend))
    opt = fastopt.AdamW(net.param_groups(), lr=1e-2)
    X = rng.standard_normal((4, 6)).astype(np.float32)
    y = rng.integers(0, 3, 4) if loss == "cross_entropy" else rng.standard_normal((4, 3))
    net.train_step(opt, X, y)   # state exists, grads non-zero
    return net, opt, X, y


def _bad_mlp_inputs(X, y):
    Xnan = X.copy()
    Xnan[2, 3] = np.nan
    Xinf = X.copy()
    Xinf[0, 0] = np.inf
    return [
        ("wrong feature dim", X[:, :5], y, ValueError, "has 5 features but the model expects 6"),
        ("1-D X", X[0], y, ValueError, r"X must be \[batch, 6\]"),
        ("labels out of range", X, np.array([0, 1, 2, 3]), ValueError,
         r"labels y must be in \[0, 2\], got values in \[0, 3\]"),
        ("negative labels", X, np.array([0, -1, 2, 1]), ValueError, r"labels y must be in"),
        ("float labels", X, y.astype(np.float64), TypeError, "labels y must be integers"),
        ("label count", X, y[:3], ValueError, r"labels y must have shape \(4,\)"),
        ("NaN input", Xnan, y, ValueError, "X contains 1 NaN or infinite"),
        ("inf input", Xinf, y, ValueError, "X contains 1 NaN or infinite"),
        ("empty batch", X[:0], y[:0], ValueError, "empty batch"),
        ("complex X", X.astype(np.complex64), y, TypeError, "X must hold real numbers"),
    ]


@pytest.mark.parametrize("backend", available_backends())
def test_bad_batches_leave_model_and_optimizer_untouched(backend):
    net, opt, X, y = _setup(backend)
    for what, Xb, yb, exc, msg in _bad_mlp_inputs(X, y):
        before = optimizer_snapshot(opt, list(net.params))
        grads = net.grads.data.copy()
        with pytest.raises(exc, match=msg):
            net.train_step(opt, Xb, yb)
        assert_same_tree(optimizer_snapshot(opt, list(net.params)), before, what)
        assert grads.tobytes() == net.grads.data.tobytes(), what
    # and it still trains afterwards
    net.train_step(opt, X, y)


def test_bad_mse_targets():
    net, opt, X, y = _setup("numpy", loss="mse")
    before = net.params.data.copy()
    with pytest.raises(ValueError, match=r"targets y must have shape \(4, 3\)"):
        net.train_step(opt, X, y[:, :2])
    bad = y.copy()
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="targets y contain NaN"):
        net.train_step(opt, X, bad)
    assert before.tobytes() == net.params.data.tobytes()


def test_bad_ensemble_batches():
    ens, opt, X, y = _setup("numpy", k=3)
    before = optimizer_snapshot(opt, list(ens.params))
    with pytest.raises(ValueError, match="X has 2 per-model batches but the ensemble has 3"):
        ens.train_step(opt, np.stack([X, X]), y)
    with pytest.raises(ValueError, match=r"labels y must have shape \(3, 4\)"):
        ens.train_step(opt, np.stack([X] * 3), np.stack([y, y]))
    with pytest.raises(ValueError, match=r"must be \[batch, 6\] or \[k, batch, 6\]"):
        ens.train_step(opt, X[None, None], y)
    assert_same_tree(optimizer_snapshot(opt, list(ens.params)), before)


def test_optimizer_must_be_built_on_the_model():
    net, _, X, y = _setup("numpy")
    other = MLP((6, 5, 3), seed=1)
    opt = fastopt.AdamW(other.param_groups())
    before = net.params.data.copy()
    with pytest.raises(ValueError, match="optimizer was not built on this model"):
        net.train_step(opt, X, y)
    assert before.tobytes() == net.params.data.tobytes()


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="layer spec"):
        MLP("784,,10")
    with pytest.raises(ValueError, match="at least input and output"):
        MLP((784,))
    with pytest.raises(ValueError, match="activation must be one of"):
        MLP((4, 2), "swish")
    with pytest.raises(ValueError, match="loss must be one of"):
        MLP((4, 2), loss="hinge")
    with pytest.raises(ValueError, match="init must be"):
        MLP((4, 2), init="orthogonal")
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        MLP((4, 2), dtype=np.float16)
    with pytest.raises(ValueError, match="backend must be one of"):
        MLP((4, 2), backend="opencl")
    with pytest.raises(ValueError, match="k .number of models. must be an int >= 1"):
        Ensemble(0, (4, 2))
    with pytest.raises(ValueError, match="seed has 2 entries"):
        Ensemble(3, (4, 2), seed=[1, 2])


def test_integer_and_float64_inputs_are_converted():
    net, opt, X, y = _setup("numpy")
    a = net.loss_and_grad(X.astype(np.float64), y)
    b = net.loss_and_grad(X, y.astype(np.int32))
    assert a == b
    Xi = (np.arange(24).reshape(4, 6) % 3).astype(np.uint8)
    assert np.isfinite(net.loss_and_grad(Xi, y))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("contiguous", [True, False])
def test_huge_finite_inputs_are_not_mistaken_for_nan(dtype, contiguous):
    """The fast finite check overflows on huge finite values; it must then
    look exactly, not reject the batch (and still find a real NaN)."""
    net = MLP((6, 5, 3), seed=0, backend="numpy", dtype=np.float64)
    big = np.finfo(dtype).max / 4
    X = np.full((4, 12), big, dtype)[:, ::2] if not contiguous else np.full((4, 6), big, dtype)
    net.loss_and_grad(X, np.array([0, 1, 2, 0]))        # no error
    X = X.copy()
    X[1, 2] = np.nan
    with pytest.raises(ValueError, match="X contains 1 NaN or infinite"):
        net.loss_and_grad(X, np.array([0, 1, 2, 0]))


def test_model_index_seed_alpha_and_accuracy_are_checked():
    """``ens.model(3)`` of 3 models failed on a broadcast, ``model(-1)`` too;
    ``MLP(seed=None)`` / ``seed=-1`` failed inside int() or NumPy; a NaN
    leaky_relu slope trained to NaN; accuracy of an MSE model crashed (MLP)
    or returned a [K, B] array (Ensemble)."""
    ens = Ensemble(3, (6, 4, 3), seed=[1, 2, 3])
    np.testing.assert_array_equal(ens.model(-1).params.data, MLP((6, 4, 3), seed=3).params.data)
    with pytest.raises(IndexError, match=r"model 3 of an ensemble of 3 models \(0..2\)"):
        ens.model(3)
    with pytest.raises(TypeError, match="model index must be an int"):
        ens.model(1.5)
    # None: fresh entropy, as numpy's default_rng(None) (it was seed 0)
    assert not np.array_equal(MLP((6, 4, 3), seed=None).params.data,
                              MLP((6, 4, 3), seed=None).params.data)
    with pytest.raises(ValueError, match="seed must be >= 0, got -1"):
        MLP((6, 4, 3), seed=-1)
    with pytest.raises(TypeError, match="seed must be an int >= 0 or a sequence"):
        MLP((6, 4, 3), seed=1.5)
    with pytest.raises(ValueError, match="alpha must be finite, got nan"):
        MLP((6, 5, 3), "leaky_relu", alpha=float("nan"))
    X = np.ones((3, 6), np.float32)
    for model in (MLP((6, 4, 2), "tanh", "mse"), Ensemble(2, (6, 4, 2), "tanh", "mse")):
        with pytest.raises(ValueError, match="accuracy counts correct labels.*use evaluate"):
            model.accuracy(X, np.zeros((3, 2), np.float32))
    with pytest.raises(ValueError, match=r"labels y must have shape \(3,\)"):
        MLP((6, 4, 3)).accuracy(X, np.array([0, 1]))


@pytest.mark.parametrize("batch_size", [0, -1, 1.5])
def test_evaluation_batch_size_is_checked(batch_size):
    """``evaluate(batch_size=-1)`` looped over nothing and returned a loss and
    accuracy of 0; 0 raised from range(), -1 from np.concatenate."""
    net = MLP((6, 4, 3), seed=0)
    X, y = np.ones((5, 6), np.float32), np.array([0, 1, 2, 0, 1])
    err = TypeError if isinstance(batch_size, float) else ValueError
    for call in (lambda: net.evaluate(X, y, batch_size=batch_size),
                 lambda: net.predict(X, batch_size=batch_size),
                 lambda: net.accuracy(X, y, batch_size=batch_size)):
        with pytest.raises(err, match="batch_size"):
            call()
    loss, acc = net.evaluate(X, y, batch_size=2)
    assert loss > 0 and np.isclose(acc, net.accuracy(X, y))
    assert type(loss) is float and type(acc) is float     # (one-element arrays before)
