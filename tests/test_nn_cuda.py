"""The MLP and batched ensembles on CUDA (``backend="cuda"``, fastopt/nn/_cuda*.py).

Three kinds of test in this file:

* device tests (``needs_device``): run where a GPU, or the CUDA simulator,
  is usable. In a plain run on a machine without a GPU,
  ``test_device_tests_under_the_simulator`` runs this file again in a
  subprocess with ``NUMBA_ENABLE_CUDASIM=1`` (it must be set before numba
  is imported). The simulator runs every CUDA thread in Python: the sizes
  are tiny (7-13-5 nets, batch 9, ensembles of 3) and not multiples of the
  kernels' tiles; one 16 x 16 tile of threads is what makes it slow.
* PTX tests: every new kernel compiled for sm_80 and sm_90 (no GPU needed).
* host tests: the refusal without a GPU, the cuBLAS argument mapping, the
  ``fastopt info`` line, benchmarks/gpu_check_nn.py without a GPU.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import fastopt
from fastopt.nn import MLP, Ensemble
from fastopt.nn import _cuda_blas as blas
from fastopt.nn import _ref
from test_cuda_ptx import K, f64_ops, instructions  # noqa: F401  (K: a fixture used below)

ROOT = Path(__file__).resolve().parent.parent
HAVE_NUMBA_CUDA = importlib.util.find_spec("numba_cuda") is not None
SIM = bool(os.environ.get("NUMBA_ENABLE_CUDASIM"))
DEVICE = HAVE_NUMBA_CUDA and "cuda" in fastopt.available_backends()

NO_DEVICE = ("no GPU here: test_device_tests_under_the_simulator runs these under the "
             "simulator")
needs_device = pytest.mark.skipif(not DEVICE, reason=NO_DEVICE)
not_simulated = pytest.mark.skipif(SIM, reason="runs in the parent (non-simulated) process")
SIZES = (7, 13, 5)
B = 9


def rel_err(a, b):
    """max |a - b| over the largest magnitude of b (each array's own scale)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def host(a):
    return a.copy_to_host() if hasattr(a, "copy_to_host") else np.asarray(a)


def data(k=None, seed=0, n_out=SIZES[-1], n_in=SIZES[0]):
    rng = np.random.default_rng(seed)
    shape = (B,) if k is None else (k, B)
    return (rng.standard_normal(shape + (n_in,)).astype(np.float32),
            rng.integers(0, n_out, shape))


# -- the cuBLAS argument mapping, checked by doing what cuBLAS would ------------------------

def colmajor_gemm(transa, transb, m, n, k, alpha, A, lda, Bm, ldb, beta, C, ldc):
    """cuBLAS's GEMM on 1-D NumPy buffers: column-major matrices with leading
    dimensions, ``C = alpha op(A) op(B) + beta C`` (C not read when beta is 0)."""
    def mat(buf, ld, rows, cols):
        assert ld >= rows and buf.size >= ld * (cols - 1) + rows, (ld, rows, cols, buf.size)
        return np.lib.stride_tricks.as_strided(buf, (rows, cols),
                                               (buf.itemsize, ld * buf.itemsize))
    opA = mat(A, lda, m, k) if transa == blas.OP_N else mat(A, lda, k, m).T
    opB = mat(Bm, ldb, k, n) if transb == blas.OP_N else mat(Bm, ldb, n, k).T
    out = mat(C, ldc, m, n)
    prod = alpha * (opA.astype(np.float64) @ opB)
    out[...] = prod if beta == 0 else prod + beta * out


@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (False, True), (True, True)])
def test_gemm_args_give_the_row_major_product(ta, tb):
    rng = np.random.default_rng(0)
    M, N, Kd = 5, 7, 3
    opA, opB = rng.standard_normal((M, Kd)), rng.standard_normal((Kd, N))
    A = np.ascontiguousarray(opA.T if ta else opA).ravel()   # as stored, row-major
    Bs = np.ascontiguousarray(opB.T if tb else opB).ravel()
    g = blas.gemm_args(M, N, Kd, ta, tb)
    C = np.full(M * N, np.nan)
    colmajor_gemm(g["transa"], g["transb"], g["m"], g["n"], g["k"], 1.0, Bs, g["lda"], A,
                  g["ldb"], 0.0, C, g["ldc"])
    np.testing.assert_allclose(C.reshape(M, N), opA @ opB, rtol=1e-13)


class FakeCuBLAS:
    """A stand-in for a binding's ``sgemmStridedBatched``/``dgemmStridedBatched``:
    records every call, and computes it as cuBLAS would on the memory at the
    given addresses (under the simulator, device arrays are host memory)."""

    def __init__(self):
        self.calls = []

    def gemm(self, dtype):
        dt = np.dtype(dtype)

        def at(ptr, count):
            return np.frombuffer((ctypes.c_char * (count * dt.itemsize)).from_address(ptr), dt)

        def call(handle, transa, transb, m, n, k, alpha, A, lda, sA, Bp, ldb, sB, beta, C,
                 ldc, sC, batch):
            self.calls.append({"dtype": dt.name, "transa": transa, "transb": transb, "m": m,
                               "n": n, "k": k, "lda": lda, "ldb": ldb, "ldc": ldc,
                               "strides": (sA, sB, sC), "batch": batch})
            a_cols = k if transa == blas.OP_N else m
            b_cols = n if transb == blas.OP_N else k
            for i in range(batch):
                colmajor_gemm(transa, transb, m, n, k, at(alpha, 1)[0],
                              at(A + i * sA * dt.itemsize, lda * a_cols), lda,
                              at(Bp + i * sB * dt.itemsize, ldb * b_cols), ldb, at(beta, 1)[0],
                              at(C + i * sC * dt.itemsize, ldc * n), ldc)
        return call


# -- device tests -----------------------------------------------------------------------------

@pytest.fixture
def cuda_nn():
    """fastopt.nn._cuda with the numba kernels running the products (restored after)."""
    from fastopt.nn import _cuda
    _cuda.select("numba")
    yield _cuda
    _cuda.select("numba")


def dev(a):
    from numba import cuda
    return cuda.to_device(np.ascontiguousarray(a))


@needs_device
def test_same_seed_same_initial_weights_and_layout():
    for k, seed in ((1, 3), (3, 5)):
        ref = Ensemble(k, SIZES, "tanh", seed=seed, backend="numpy")
        net = Ensemble(k, SIZES, "tanh", seed=seed, backend="cuda")
        assert net.backend == "cuda" and net.weights is None
        np.testing.assert_array_equal(host(net.params.data), ref.params.data)
        assert net.params.shapes == ref.params.shapes and net.grads.shapes == ref.params.shapes
    mlp = MLP(SIZES, seed=2, backend="cuda")
    np.testing.assert_array_equal(host(mlp.W[1]), MLP(SIZES, seed=2, backend="numpy").W[1])


@needs_device
def test_mlp_forward_backward_and_three_adamw_steps_match_numpy(cuda_nn):
    assert cuda_nn.matmul_engine() == "numba kernels"
    X, y = data()
    ref = MLP(SIZES, "relu", seed=0, backend="numpy")
    net = MLP(SIZES, "relu", seed=0, backend="cuda")
    assert rel_err(net.forward(X), ref.forward(X)) < 1e-5
    l_ref, l_dev = ref.loss_and_grad(X, y), net.loss_and_grad(dev(X), dev(y))
    assert isinstance(l_dev, float) and abs(l_dev - l_ref) < 1e-5 * abs(l_ref)
    assert rel_err(host(net.grads.data), ref.grads.data) < 1e-5
    o_ref = fastopt.AdamW(ref.param_groups(), lr=1e-2)
    o_dev = fastopt.AdamW(net.param_groups(), lr=1e-2)
    assert o_dev.param_groups[0]["params"][0].shape == (7, 13)
    start = host(net.params.data)
    for _ in range(3):
        l_ref, l_dev = ref.train_step(o_ref, X, y), net.train_step(o_dev, X, y)  # host batch
        assert abs(l_dev - l_ref) < 1e-5 * abs(l_ref)
        assert rel_err(host(net.params.data), ref.params.data) < 1e-5
    assert rel_err(host(net.params.data), start) > 1e-3      # the steps did move the weights


@needs_device
def test_ensemble_per_model_lrs_and_batches_match_numpy(cuda_nn):
    K = 3
    X, y = data(K, seed=1)
    lrs = [3e-2, 1e-2, 3e-3]
    ref = Ensemble(K, SIZES, "tanh", seed=4, backend="numpy")
    net = Ensemble(K, SIZES, "tanh", seed=4, backend="cuda")
    o_ref = fastopt.Adam(ref.param_groups(lr=lrs))
    groups = net.param_groups(lr=lrs)
    # one packed group per model: each a contiguous run of the flat buffer
    assert len(groups) == K and all(len(g["params"]) == 2 * 2 for g in groups)
    o_dev = fastopt.Adam(groups)
    for _ in range(3):
        l_ref = ref.train_step(o_ref, X, y)
        l_dev = net.train_step(o_dev, dev(X), y)
        assert l_dev.shape == (K,) and rel_err(l_dev, l_ref) < 1e-5
    assert rel_err(host(net.params.data), ref.params.data) < 1e-5
    assert rel_err(host(net.grads.data), ref.grads.data) < 1e-5
    np.testing.assert_array_equal(host(net.model(2).params.data),
                                  host(net.params.data)[2 * net.n_per_model:])


@needs_device
def test_ensemble_clipped_per_model_matches_numpy(cuda_nn):
    """train_step(max_grad_norm=): each model clipped by its own norm, on
    the device one clip per model."""
    K = 2
    X, y = data(K, seed=2)
    ref = Ensemble(K, SIZES, "tanh", seed=4, backend="numpy")
    net = Ensemble(K, SIZES, "tanh", seed=4, backend="cuda")
    o_ref = fastopt.SGD(ref.param_groups(lr=[3.0, 1e-2]))
    o_dev = fastopt.SGD(net.param_groups(lr=[3.0, 1e-2]))
    for _ in range(2):
        ref.train_step(o_ref, X, y, max_grad_norm=0.1)
        net.train_step(o_dev, dev(X), y, max_grad_norm=0.1)
    assert rel_err(host(net.params.data), ref.params.data) < 1e-5
    norms = net.clip_grads(1e-3)
    assert norms.shape == (K,) and rel_err(norms, ref.clip_grads(1e-3)) < 1e-5


@needs_device
def test_shared_device_batch_mse_in_float64(cuda_nn):
    """A batch all models share is read with a stride of 0 between models;
    float64 kernels against the float64 reference, to rounding."""
    rng = np.random.default_rng(2)
    X = rng.standard_normal((B, 7))
    T = rng.standard_normal((B, 5))
    ref = Ensemble(2, SIZES, "sigmoid", "mse", seed=1, dtype=np.float64, backend="numpy")
    net = Ensemble(2, SIZES, "sigmoid", "mse", seed=1, dtype=np.float64, backend="cuda")
    losses = net.loss_and_grad(dev(X), dev(T))
    assert losses.dtype == np.float64
    np.testing.assert_allclose(losses, ref.loss_and_grad(X, T), rtol=1e-12)
    np.testing.assert_allclose(host(net.grads.data), ref.grads.data, rtol=1e-10, atol=1e-14)


@needs_device
@pytest.mark.parametrize("dtype,rtol", [(np.float32, 2e-6), (np.float64, 1e-12)])
def test_fused_passes_match_the_reference_for_every_activation(cuda_nn, dtype, rtol):
    """bias + activation forward, derivative x upstream gradient with the
    bias gradient reduced: n = 19 columns (not a multiple of the column block)."""
    from fastopt.nn.activations import ACTIVATIONS
    rng = np.random.default_rng(3)
    K, n, P, off = 2, 19, 23, 2       # b and gb: model k's at off + k * P in a flat buffer
    for name, act in ACTIVATIONS.items():
        Z = rng.standard_normal((K, B, n)).astype(dtype) * 2
        D = rng.standard_normal((K, B, n)).astype(dtype)
        flat_b = rng.standard_normal(K * P).astype(dtype)
        b = np.stack([flat_b[off + k * P:off + k * P + n] for k in range(K)])
        Zd, Ad, Dd, gbd = dev(Z.ravel()), dev(np.zeros(Z.size, dtype)), dev(D.ravel()), \
            dev(np.zeros(K * P, dtype))
        cuda_nn.bias_act(Zd, Ad, cuda_nn.Mat(dev(flat_b), off, P), B, n, act, 0.1)
        zb = Z + b[:, None, :]
        a = _ref.act_forward(zb.astype(np.float64), act, 0.1)
        assert rel_err(host(Zd), zb.ravel()) < rtol, name
        assert rel_err(host(Ad), a.ravel()) < rtol, name
        cuda_nn.act_grad(Dd, Zd, Ad, cuda_nn.Mat(gbd, off, P), B, n, act, 0.1, K)
        d = D * _ref.act_derivative(zb.astype(np.float64), a, act, 0.1)
        assert rel_err(host(Dd), d.ravel()) < rtol, name
        gb = host(gbd)
        for k in range(K):
            assert rel_err(gb[off + k * P:off + k * P + n], d[k].sum(axis=0)) < rtol * 4, name
        assert not gb[:off].any() and not gb[off + n:P].any()     # nothing else written


@needs_device
def test_batched_matmul_transposes_shared_operands_and_partial_tiles(cuda_nn):
    """``C[k] = op(A[k]) @ op(B[k])`` with sizes past one 16-wide tile and not
    multiples of it, offsets, a stride between models and a shared (stride 0)
    operand, in each transpose combination the backward pass uses."""
    rng = np.random.default_rng(4)
    M, N, Kd, K = 17, 3, 18, 2
    for ta, tb, shared_a in ((False, False, True), (True, False, False), (False, True, False)):
        opA = rng.standard_normal((1 if shared_a else K, M, Kd)).astype(np.float32)
        opB = rng.standard_normal((K, Kd, N)).astype(np.float32)
        A = np.swapaxes(opA, 1, 2) if ta else opA
        Bs = np.swapaxes(opB, 1, 2) if tb else opB
        a_flat = np.concatenate([np.zeros(3, np.float32), A.ravel()])   # offset 3
        b_flat = np.concatenate([np.zeros(5, np.float32), Bs.ravel()])
        c = dev(np.full(1 + K * M * N, np.nan, np.float32))
        cuda_nn.matmul(cuda_nn.Mat(c, 1, M * N), cuda_nn.Mat(dev(a_flat), 3, 0 if shared_a
                                                              else M * Kd),
                       cuda_nn.Mat(dev(b_flat), 5, Kd * N), M, N, Kd, ta, tb, K)
        got = host(c)
        assert np.isnan(got[0])                                # before the offset: untouched
        want = np.matmul(opA.astype(np.float64), opB)
        assert rel_err(got[1:].reshape(K, M, N), want) < 1e-5, (ta, tb)


@needs_device
def test_cross_entropy_kernel_keeps_precision_and_flags_bad_labels(cuda_nn):
    """A confident row (p_label ~ 1 - 1e-6): its gradient p - 1 keeps float32
    precision; an out-of-range device label gives NaN, never a silent wrong
    number (device labels are not checked on the host)."""
    Z = np.array([[0.0, 14.0, -3.0], [1.0, 2.0, 3.0]], np.float32)
    y = np.array([1, 0])
    Zd, Dd, Ld = dev(Z.ravel()), dev(np.zeros(6, np.float32)), dev(np.zeros(1, np.float32))
    cuda_nn.softmax_xent(Zd, cuda_nn.Mat(dev(y), 0, 0), Dd, Ld, 2, 3, 1)
    Dr, gbr, lr = np.zeros((1, 2, 3)), np.zeros((1, 3)), np.zeros(1)
    _ref.softmax_xent(Z[None].astype(np.float64), y[None], Dr, gbr, lr)
    np.testing.assert_allclose(host(Dd).reshape(2, 3), Dr[0], rtol=2e-6, atol=1e-12)
    assert abs(host(Ld)[0] - lr[0]) < 1e-6 * lr[0]
    cuda_nn.softmax_xent(Zd, cuda_nn.Mat(dev(np.array([1, 3])), 0, 0), Dd, Ld, 2, 3, 1)
    assert np.isnan(host(Ld)[0]) and np.isnan(host(Dd)[3:]).all()


@needs_device
def test_bad_device_input_is_refused_before_anything_runs(cuda_nn):
    net = Ensemble(2, SIZES, seed=0, backend="cuda")
    opt = fastopt.AdamW(net.param_groups(), lr=1e-2)
    X, y = data()
    net.loss_and_grad(X, y)
    before = host(net.grads.data), host(net.params.data)
    cases = [
        (TypeError, "X on the device must be float32", lambda: net.train_step(
            opt, dev(X.astype(np.float64)), y)),
        (ValueError, "X has 6 features", lambda: net.train_step(opt, dev(X[:, :6]), y)),
        (ValueError, "C-contiguous", lambda: net.train_step(opt, dev(np.zeros((B, 14),
                                                                      np.float32))[:, ::2], y)),
        (ValueError, "labels y must have shape", lambda: net.train_step(opt, dev(X),
                                                                       dev(y[:4]))),
        (TypeError, "labels y must be integers", lambda: net.train_step(
            opt, dev(X), dev(y.astype(np.float32)))),
        (ValueError, "NaN", lambda: net.train_step(opt, np.full_like(X, np.nan), y)),
        (ValueError, "labels y must be in", lambda: net.train_step(opt, dev(X), y + 5)),
        (ValueError, "not built on this model's params", lambda: net.train_step(
            fastopt.AdamW(Ensemble(2, SIZES, backend="cuda").param_groups()), X, y)),
        (NotImplementedError, "on_grads_ready", lambda: net.loss_and_grad(
            X, y, on_grads_ready=lambda lo, hi: None)),
    ]
    for exc, msg, call in cases:
        with pytest.raises(exc, match=msg):
            call()
        np.testing.assert_array_equal(host(net.grads.data), before[0])
        np.testing.assert_array_equal(host(net.params.data), before[1])
    assert opt.iterations == 0


@needs_device
def test_predict_evaluate_and_the_unsynchronised_step(cuda_nn):
    X, y = data(seed=5)
    ref = Ensemble(2, SIZES, "gelu", seed=3, backend="numpy")
    net = Ensemble(2, SIZES, "gelu", seed=3, backend="cuda")
    np.testing.assert_array_equal(net.predict(dev(X), batch_size=5), ref.predict(X))
    (l_dev, a_dev), (l_ref, a_ref) = net.evaluate(X, dev(y)), ref.evaluate(X, y)
    assert rel_err(l_dev, l_ref) < 1e-5
    np.testing.assert_array_equal(a_dev, a_ref)
    losses = net.train_step(fastopt.SGD(net.param_groups(), lr=0.1), dev(X), dev(y),
                            sync=False)
    from fastopt.cuda import is_device_array
    assert is_device_array(losses)       # nothing waited for the GPU
    assert rel_err(host(losses), ref.loss_and_grad(X, y)) < 1e-5


@needs_device
def test_cublas_path_with_a_fake_binding_records_the_mapping_and_matches(cuda_nn):
    """The cuBLAS route end to end, with a fake binding that computes what
    cuBLAS would from the addresses it is given: one strided-batched call per
    product, row-major mapped to column-major, the shared batch at stride 0."""
    fake = FakeCuBLAS()
    cuda_nn.select(blas.Cublas("fake", "0", lambda: 0, fake.gemm(np.float32),
                               fake.gemm(np.float64), cuda_nn.C._pointer))
    assert cuda_nn.matmul_engine() == "cuBLAS via fake 0"
    X, y = data(seed=6)
    K = 3
    ref = Ensemble(K, SIZES, seed=1, backend="numpy")
    net = Ensemble(K, SIZES, seed=1, backend="cuda")
    o_ref = fastopt.AdamW(ref.param_groups(), lr=1e-2)
    o_dev = fastopt.AdamW(net.param_groups(), lr=1e-2)
    for _ in range(2):
        assert rel_err(net.train_step(o_dev, X, y), ref.train_step(o_ref, X, y)) < 1e-5
    assert rel_err(host(net.params.data), ref.params.data) < 1e-5
    P = net.n_per_model
    # per step: forward 2 products, backward 2 weight gradients + 1 upstream gradient
    assert len(fake.calls) == 2 * 5
    fwd0, fwd1, gw1, dx1, gw0 = fake.calls[:5]
    # Z0[B, 13] = X[B, 7] @ W0[7, 13]: cuBLAS computes Z0^T = W0^T X^T (X shared: stride 0)
    assert fwd0 == {"dtype": "float32", "transa": blas.OP_N, "transb": blas.OP_N, "m": 13,
                    "n": B, "k": 7, "lda": 13, "ldb": 7, "ldc": 13,
                    "strides": (P, 0, B * 13), "batch": K}
    # gW1[13, 5] = A0^T D1
    assert (gw1["transb"], gw1["transa"], gw1["m"], gw1["n"], gw1["k"], gw1["ldb"]) == (
        blas.OP_T, blas.OP_N, 5, 13, B, 13)
    # D0[B, 13] = D1 W1^T
    assert (dx1["transa"], dx1["transb"], dx1["m"], dx1["n"], dx1["k"], dx1["lda"]) == (
        blas.OP_T, blas.OP_N, 13, B, 5, 5)
    assert gw0["strides"] == (B * 13, 0, P)   # D0 per model, X shared, into the grads


@needs_device
def test_gpu_check_nn_runs_its_whole_path(tmp_path):
    """benchmarks/gpu_check_nn.py under the simulator with tiny sizes (the
    torch baselines on the CPU): every check runs and the report is whole.
    On a GPU this is the real check, which the GPU session runs directly."""
    if not SIM:
        pytest.skip("a GPU is usable: run benchmarks/gpu_check_nn.py itself")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check_nn
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    out = tmp_path / "nn.json"
    assert gpu_check_nn.main(["--simulate", "--out", str(out)]) == 0
    import json
    report = json.loads(out.read_text())
    assert report["simulated"] and report["all_equal"] and report["engines"] == ["numba"]
    assert {"mlp_numba", "ensemble_numba"} == set(report["equality"])
    for key, r in report["results"].items():
        assert "error" not in r, (key, r)
    assert report["results"]["fastopt_wide_step_numba"]["tflops"] > 0
    assert set(report["reported"]) == {"mlp_vs_torch_eager", "mlp_vs_torch_compiled",
                                       "ensemble_vs_torch_bmm_eager",
                                       "wide_step_fraction_of_sgemm_tflops"}


# -- the simulator run, from a plain run --------------------------------------------------------

@not_simulated
@pytest.mark.skipif(not HAVE_NUMBA_CUDA, reason="numba-cuda not installed")
@pytest.mark.skipif(DEVICE, reason="a GPU is usable: the device tests above ran on it")
def test_device_tests_under_the_simulator():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider",
         "-p", "no:randomly", "-k", "not under_the_simulator"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    device_tests = [n for n, f in globals().items() if n.startswith("test_") and any(
        m.kwargs.get("reason") == NO_DEVICE for m in getattr(f, "pytestmark", []))]
    assert len(device_tests) >= 10
    passed = re.search(r"(\d+) passed", out.strip().splitlines()[-1])
    assert passed and int(passed.group(1)) >= len(device_tests), out[-2000:]


# -- no GPU, no simulator: one clear line ---------------------------------------------------------

@not_simulated
@pytest.mark.skipif(DEVICE, reason="a GPU is usable here")
def test_cuda_backend_without_a_gpu_refuses_in_one_line():
    with pytest.raises(ValueError) as info:
        MLP(SIZES, backend="cuda")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("nn backend 'cuda' is not available here: ")
    if HAVE_NUMBA_CUDA:
        assert "NUMBA_ENABLE_CUDASIM=1" in msg and "GPU" in msg
    with pytest.raises(ValueError, match="nn backend 'cuda' is not available"):
        Ensemble(2, SIZES, backend="cuda")
    assert "cuda" not in fastopt.nn.available_backends()    # "auto" never picks it


@not_simulated
def test_info_names_what_runs_the_products(monkeypatch, capsys):
    from fastopt.cli import info
    info.run(types.SimpleNamespace(json=False))
    lines = [ln for ln in capsys.readouterr().out.splitlines()
             if ln.startswith("nn matmul on CUDA: ")]
    assert len(lines) == 1
    have = [b for b in blas.BINDINGS if importlib.util.find_spec(b)]
    assert lines[0].split(": ", 1)[1].startswith("cuBLAS via" if have else "numba kernels")
    monkeypatch.setenv("FASTOPT_NN_MATMUL", "numba")
    assert blas.describe() == "numba kernels (FASTOPT_NN_MATMUL=numba)"
    monkeypatch.setenv("FASTOPT_NN_MATMUL", "tpu")
    assert "FASTOPT_NN_MATMUL must be one of" in blas.describe()


# -- PTX ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def kernels(request):
    """The nn kernels, compiled as tests/test_cuda_ptx.py compiles the
    optimizer's (its ``K`` fixture lets device functions compile without a GPU)."""
    if not HAVE_NUMBA_CUDA or SIM:
        pytest.skip("needs numba-cuda without the simulator (which does not compile to PTX)")
    request.getfixturevalue("K")
    from fastopt.nn import _cuda_kernels
    return _cuda_kernels


@pytest.mark.parametrize("cc,dtype,labels", [
    ((9, 0), "float32", "int64"), ((8, 0), "float32", "int64"), ((9, 0), "float64", "int64"),
    ((9, 0), "float32", "int32")], ids=["sm_90-f32", "sm_80-f32", "sm_90-f64", "int32-labels"])
def test_every_kernel_compiles_and_float32_has_no_double_precision(kernels, cc, dtype, labels):
    from numba import cuda
    sigs = kernels.ptx_signatures(dtype, labels)
    for name, kernel in kernels.KERNELS.items():
        if labels == "int32" and name != "xent":     # only the loss reads labels
            continue
        ptx, _ = cuda.compile_ptx(kernel.py_func, sigs[name], cc=cc)
        ops = [s.split()[0] for s in instructions(ptx)]
        assert f".target sm_{cc[0]}{cc[1]}" in ptx
        f64 = f64_ops(ptx)     # its positive control: tests/test_cuda_ptx.py
        if dtype == "float32":
            assert not f64, f"{name} uses float64: {f64}"
        else:
            assert f64, name
        if name != "bias_act":      # the tiles and the reductions: shared memory, barriers
            assert ".shared" in ptx and "bar.sync" in ops, name
        # deterministic reductions that run under the simulator: no atomics, no warp intrinsics
        assert not any(o.startswith(("shfl", "vote", "atom", "red.")) for o in ops), name


# -- benchmarks/gpu_check_nn.py without a GPU -----------------------------------------------------

@not_simulated
@pytest.mark.skipif(DEVICE, reason="a GPU is usable here")
def test_gpu_check_nn_without_a_gpu_says_so_and_writes_nothing(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    out = tmp_path / "nn.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check_nn.py"),
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "gpu_check_nn: no GPU run possible:" in proc.stderr
    assert not out.exists()
