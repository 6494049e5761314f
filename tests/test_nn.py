"""fastopt.nn: gradient checks, backend equivalence, layout, init, torch parity."""

from __future__ import annotations

import numpy as np
import pytest

import fastopt
from fastopt.nn import ACTIVATIONS, MLP, Ensemble, available_backends, parse_layers
from fastopt.nn import _ref

NN_BACKENDS = available_backends()
ACTS = list(ACTIVATIONS)
SMOOTH = ["identity", "tanh", "sigmoid", "gelu"]


def _batch(rng, loss, B, n_in, n_out, k=None):
    lead = () if k is None else (k,)
    X = rng.standard_normal(lead + (B, n_in))
    if loss == "cross_entropy":
        y = rng.integers(0, n_out, lead + (B,))
    else:
        y = rng.standard_normal(lead + (B, n_out))
    return X, y


def _finite_difference(net, X, y, eps=1e-6):
    p = net.params.data
    fd = np.empty_like(p)
    for i in range(p.size):
        old = p[i]
        p[i] = old + eps
        lp = net.loss_and_grad(X, y)
        p[i] = old - eps
        lm = net.loss_and_grad(X, y)
        p[i] = old
        fd[i] = (lp - lm) / (2 * eps)
    return fd


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("act", ACTS)
def test_gradient_matches_centred_differences(act, loss):
    """float64 backprop vs centred differences, relative error in the 2-norm.

    Smooth activations: < 1e-7. relu/leaky_relu are piecewise linear, so the
    difference quotient is exact unless a pre-activation lies within eps of
    the kink; this batch keeps every |z| > 1e-3 (asserted), where the same
    bound holds. A batch with a pre-activation inside (-eps, eps) can differ
    by O(1) in that sample's terms: that is the kink, not a bug.
    """
    rng = np.random.default_rng(3)
    net = MLP((5, 6, 4, 3), act, loss, backend="numpy", dtype=np.float64, seed=1)
    net.params.data[:] = rng.standard_normal(net.params.data.size) * 0.7  # biases too
    X, y = _batch(rng, loss, 7, 5, 3)
    net.loss_and_grad(X, y)
    if act in ("relu", "leaky_relu"):
        ws = next(iter(net._ws.values()))
        assert min(np.abs(z).min() for z in ws["Z"][:-1]) > 1e-3
    g = net.grads.data.copy()
    fd = _finite_difference(net, X, y)
    rel = np.linalg.norm(g - fd) / np.linalg.norm(fd)
    assert rel < 1e-7, rel


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("act", ACTS)
def test_compiled_backends_gradcheck_float64(act, loss):
    """The same check through each compiled backend (BLAS and fused passes)."""
    rng = np.random.default_rng(4)
    X, y = _batch(rng, loss, 6, 4, 3)
    for backend in NN_BACKENDS:
        net = MLP((4, 5, 3), act, loss, backend=backend, dtype=np.float64, seed=2)
        net.loss_and_grad(X, y)
        g = net.grads.data.copy()
        fd = _finite_difference(net, X, y)
        assert np.linalg.norm(g - fd) / np.linalg.norm(fd) < 1e-7, backend


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, True), (3, True), (3, False)], ids=["mlp", "shared", "own"])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_backends_match_reference(loss, shape, dtype):
    k, shared = shape
    rtol = 1e-12 if dtype == np.float64 else 2e-5
    rng = np.random.default_rng(5)
    X, y = _batch(rng, loss, 9, 6, 4, None if shared else k)
    for act in ACTS:
        ref = Ensemble(k, (6, 7, 5, 4), act, loss, backend="numpy", dtype=dtype, seed=7)
        lref = ref.loss_and_grad(X, y).copy()
        scale = np.abs(ref.grads.data).max()
        for backend in NN_BACKENDS:
            net = Ensemble(k, (6, 7, 5, 4), act, loss, backend=backend, dtype=dtype, seed=7)
            losses = net.loss_and_grad(X, y)
            np.testing.assert_allclose(losses, lref, rtol=rtol * 10, err_msg=backend)
            err = np.abs(net.grads.data - ref.grads.data).max() / scale
            assert err < rtol * 10, (backend, act, err)
            np.testing.assert_allclose(net.forward(X), ref.forward(X), rtol=rtol * 10,
                                       atol=rtol * 10, err_msg=backend)


def test_softmax_cross_entropy_is_stable_for_huge_logits():
    Z = np.array([[[1000.0, 0.0, -1000.0], [-1e4, 1e4, 0.0]]])
    y = np.array([[0, 0]])
    for backend in NN_BACKENDS:
        mod = fastopt.nn.backends.get_backend(backend)
        D = np.empty_like(Z)
        gb = np.empty((1, 5))[:, :3]   # strided like the model's bias-gradient views
        losses = np.empty(1)
        mod.softmax_xent(Z, y, D, gb, losses)
        assert np.isfinite(losses).all() and np.isfinite(D).all(), backend
        np.testing.assert_allclose(losses, [(0.0 + 2e4) / 2], rtol=1e-12)
        np.testing.assert_allclose(D[0, 1], [-0.5, 0.5, 0.0], atol=1e-12)


def test_activations_match_definitions():
    z = np.linspace(-6, 6, 101)
    from math import erf
    expected = {
        "identity": z, "relu": np.maximum(z, 0), "leaky_relu": np.where(z > 0, z, 0.01 * z),
        "tanh": np.tanh(z), "sigmoid": 1 / (1 + np.exp(-z)),
        "gelu": np.array([0.5 * v * (1 + erf(v / np.sqrt(2))) for v in z]),
    }
    for name, want in expected.items():
        np.testing.assert_allclose(_ref.act_forward(z, ACTIVATIONS[name], 0.01), want,
                                   rtol=1e-12, atol=1e-15, err_msg=name)


def test_flat_layout_and_views():
    ens = Ensemble(3, (4, 5, 2), "relu", seed=0)
    P = 4 * 5 + 5 + 5 * 2 + 2
    assert ens.params.data.size == 3 * P and ens.n_per_model == P
    assert len(ens.params) == 3 * 4
    for l in range(2):
        assert np.shares_memory(ens.weights[l], ens.params.data)
        assert np.shares_memory(ens._gweights[l], ens.grads.data)
    # model k's W0 is the k-th run of P elements
    for k in range(3):
        np.testing.assert_array_equal(ens.weights[0][k].reshape(-1),
                                      ens.params.data[k * P:k * P + 20])
        np.testing.assert_array_equal(ens.params[4 * k + 2], ens.weights[1][k])
    net = MLP((4, 5, 2), seed=0)
    assert np.shares_memory(net.W[0], net.params.data) and net.b[1].shape == (2,)


def test_init_he_xavier_and_seed():
    a = MLP((400, 300, 10), "relu", seed=1)
    b = MLP((400, 300, 10), "relu", seed=1)
    c = MLP((400, 300, 10), "relu", seed=2)
    assert np.array_equal(a.params.data, b.params.data)
    assert not np.array_equal(a.params.data, c.params.data)
    assert abs(a.W[0].std() - np.sqrt(2 / 400)) < 0.05 * np.sqrt(2 / 400)
    assert not a.b[0].any()
    x = MLP((400, 300, 10), "tanh", seed=1)
    lim = np.sqrt(6 / 700)
    assert np.abs(x.W[0]).max() <= lim and abs(x.W[0].std() - lim / np.sqrt(3)) < 0.05 * lim
    assert MLP((4, 3), "tanh", init="he").init == "he"
    e = Ensemble(3, (6, 4, 2), "relu", seed=10)
    for k in range(3):
        np.testing.assert_array_equal(e.model(k).params.data,
                                      MLP((6, 4, 2), "relu", seed=10 + k).params.data)


def test_parse_layers():
    assert parse_layers("256,256") == (256, 256)
    assert parse_layers(" 64 ") == (64,)
    assert parse_layers("") == ()
    assert parse_layers([3, np.int64(4)]) == (3, 4)
    for bad in ["256,,128", "256,x", "0", "-3", "1.5", "256;256"]:
        with pytest.raises(ValueError, match="layer spec"):
            parse_layers(bad)
    with pytest.raises(TypeError, match="layer spec"):
        parse_layers(3)
    with pytest.raises(TypeError, match="layer spec item 0"):
        parse_layers([2.0])


def test_training_reduces_loss_and_optimizer_is_one_call():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((64, 8)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64) + 2 * (X[:, 1] > 0)
    net = MLP((8, 16, 4), "gelu", seed=0)
    opt = fastopt.AdamW(net.param_groups(), lr=1e-2)
    # one param group, one run: the whole model is one kernel call
    assert len(opt.param_groups) == 1 and len(opt._run_info[0]["runs"]) == 1
    first = net.train_step(opt, X, y)
    for _ in range(150):
        last = net.train_step(opt, X, y)
    assert last < 0.3 * first
    assert net.accuracy(X, y) > 0.9


@pytest.mark.parametrize("act", ["relu", "tanh", "gelu", "sigmoid", "leaky_relu"])
def test_matches_torch_training(act):
    """Five AdamW steps against torch.nn with the same weights and batches."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    net = MLP((6, 8, 3), act, dtype=np.float64, seed=3, backend=NN_BACKENDS[0])
    opt = fastopt.AdamW(net.param_groups(), lr=1e-2, weight_decay=0.1)
    acts = {"relu": torch.nn.ReLU(), "tanh": torch.nn.Tanh(), "gelu": torch.nn.GELU(),
            "sigmoid": torch.nn.Sigmoid(), "leaky_relu": torch.nn.LeakyReLU(0.01)}
    tm = torch.nn.Sequential(torch.nn.Linear(6, 8), acts[act], torch.nn.Linear(8, 3)).double()
    with torch.no_grad():
        for i, lin in enumerate([tm[0], tm[2]]):
            lin.weight.copy_(torch.from_numpy(net.W[i].T.copy()))
            lin.bias.copy_(torch.from_numpy(net.b[i].copy()))
    topt = torch.optim.AdamW(tm.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        X, y = _batch(rng, "cross_entropy", 10, 6, 3)
        loss = net.train_step(opt, X, y)
        topt.zero_grad()
        tl = torch.nn.functional.cross_entropy(tm(torch.from_numpy(X)), torch.from_numpy(y))
        tl.backward()
        topt.step()
        assert abs(loss - tl.item()) < 1e-12
    for i, lin in enumerate([tm[0], tm[2]]):
        np.testing.assert_allclose(net.W[i], lin.weight.detach().numpy().T, rtol=1e-10,
                                   atol=1e-12)
        np.testing.assert_allclose(net.b[i], lin.bias.detach().numpy(), rtol=1e-10,
                                   atol=1e-12)


def test_workspaces_are_reused():
    rng = np.random.default_rng(0)
    net = MLP((5, 4, 3), seed=0)
    X = rng.standard_normal((8, 5)).astype(np.float32)
    y = rng.integers(0, 3, 8)
    net.loss_and_grad(X, y)
    ws = next(iter(net._ws.values()))
    ids = [id(a) for a in ws["Z"] + ws["A"] + ws["D"]]
    net.loss_and_grad(X, y)
    assert len(net._ws) == 1
    ws2 = next(iter(net._ws.values()))
    assert [id(a) for a in ws2["Z"] + ws2["A"] + ws2["D"]] == ids


def test_import_fastopt_stays_light():
    import subprocess
    import sys
    code = ("import sys, fastopt; assert 'numba' not in sys.modules; "
            "assert 'matplotlib' not in sys.modules; assert 'fastopt.nn' not in sys.modules; "
            "m = fastopt.nn.MLP((3, 2), backend='numpy'); assert 'numba' not in sys.modules; "
            "assert fastopt.data.read_idx")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_clipping_and_schedules_plug_in():
    """max_grad_norm sees the model's flat gradient; a schedule sets each step's lr."""
    rng = np.random.default_rng(2)
    X = rng.standard_normal((16, 5))
    y = rng.integers(0, 3, 16)
    net = MLP((5, 6, 3), dtype=np.float64, seed=0)
    sched = fastopt.schedules.warmup_cosine(1e-2, 2, 10)
    opt = fastopt.AdamW(net.param_groups(lr=sched), max_grad_norm=0.05)
    ref = MLP((5, 6, 3), dtype=np.float64, seed=0, backend="numpy")
    ref_opt = fastopt.AdamW(ref.param_groups(), lr=0.0)
    for step in range(4):
        net.loss_and_grad(X, y)
        norm = fastopt.global_norm(net.grads)
        assert opt.step(net.grads) == pytest.approx(norm, rel=1e-12)
        # the same step by hand: clip the gradients, set the scheduled lr
        ref.loss_and_grad(X, y)
        fastopt.clip_by_global_norm(ref.grads, 0.05)
        ref_opt.param_groups[0]["lr"] = sched(step)
        ref_opt.step(ref.grads)
        np.testing.assert_allclose(net.params.data, ref.params.data, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("k, order", [(1, "auto"), (3, "model"), (3, "layer")])
def test_on_grads_ready_reports_each_final_layer_once(k, order):
    """Each callback range already holds its final gradient (checked against a
    plain backward), ranges tile the buffer exactly once, last layer first."""
    rng = np.random.default_rng(5)
    sizes = (6, 5, 4, 3)
    net = Ensemble(k, sizes, seed=1, dtype=np.float64, backend="numpy")
    net.order = order
    X, y = _batch(rng, "cross_entropy", 7, 6, 3, k)
    net.loss_and_grad(X, y)
    want = net.grads.data.copy()
    net.grads.data[:] = np.nan
    seen, order_seen = np.zeros(want.size, int), []

    def ready(lo, hi):
        np.testing.assert_array_equal(net.grads.data[lo:hi], want[lo:hi])
        seen[lo:hi] += 1
        order_seen.append(((lo % net.n_per_model), lo // net.n_per_model))

    net.loss_and_grad(X, y, on_grads_ready=ready)
    assert (seen == 1).all()
    for model in range(k):
        offs = [o for o, m in order_seen if m == model]
        assert offs == sorted(offs, reverse=True) and len(offs) == len(sizes) - 1
    np.testing.assert_array_equal(net.grads.data, want)
