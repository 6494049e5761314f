"""Mixed precision: 16-bit params and grads, float32 master weights, loss scaling.

The fused 16-bit kernels must (1) convert exactly like ml_dtypes (bfloat16)
and NumPy (float16), (2) be the float32 kernel plus those conversions, bit
for bit, and (3) never write anything on a non-finite step."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import BACKENDS, FAST_BACKENDS, LARGE, assert_same_tree, snapshot

import fastopt
from fastopt.backends import get_backend

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
LOW = [BF16, F16]
IDS = ["bf16", "f16"]


def _conversion_backends():
    mods = [get_backend(b) for b in FAST_BACKENDS]
    try:   # the portable Cython build too, where the v3 one is in use
        from fastopt.backends._cython import kernels as baseline
        from fastopt.backends.lowp import bits

        class Baseline:
            name = "cython-baseline"
            widen = staticmethod(lambda s, d: baseline.widen(bits(s), d))
            narrow = staticmethod(lambda s, d: baseline.narrow(s, bits(d)))
        mods.append(Baseline)
    except ImportError:
        pass
    return mods


CONVERTERS = _conversion_backends()


@pytest.mark.parametrize("be", CONVERTERS, ids=[m.name for m in CONVERTERS])
@pytest.mark.parametrize("dtype", LOW, ids=IDS)
def test_conversions_bit_exact(be, dtype):
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(dtype)
    wide = np.empty(every.size, np.float32)
    be.widen(every, wide)
    assert wide.tobytes() == every.astype(np.float32).tobytes()
    # float32 values at and around every rounding boundary, plus random bit patterns
    base = wide.view(np.uint32)
    deltas = np.array([0, 1, 0xFFF, 0x1000, 0x1001, 0x7FFF, 0x8000, 0x8001, -1, -0xFFF,
                       -0x1000, -0x1001, -0x8000], np.int64).astype(np.uint32)
    rand = np.random.default_rng(0).integers(0, 1 << 32, 300_000, dtype=np.uint64)
    x = np.concatenate([(base[:, None] + deltas[None, :]).ravel(),
                        rand.astype(np.uint32)]).view(np.float32)
    got = np.empty(x.size, dtype)
    be.narrow(x, got)
    with np.errstate(over="ignore", invalid="ignore"):
        want = x.astype(dtype)
    bad = np.flatnonzero(got.view(np.uint16) != want.view(np.uint16))
    assert bad.size == 0, [(hex(x.view(np.uint32)[i]), hex(got.view(np.uint16)[i]),
                            hex(want.view(np.uint16)[i])) for i in bad[:5]]


def _grads(p, t, scale=1.0):
    g = p.zeros_like()
    g.data[:] = (np.random.default_rng(50 + t).standard_normal(g.data.size) * scale
                 ).astype(p.dtype)
    return g


def _params(dtype, n=LARGE):
    rng = np.random.default_rng(7)
    return fastopt.pack([rng.standard_normal(n).astype(dtype),
                         rng.standard_normal((3, 5)).astype(dtype)])


OPTS = {
    "adamw": lambda p, **kw: fastopt.AdamW(p, lr=1e-2, amsgrad=True, **kw),
    "adam": lambda p, **kw: fastopt.Adam(p, lr=1e-2, weight_decay=0.1, maximize=True, **kw),
    "sgd": lambda p, **kw: fastopt.SGD(p, lr=1e-2, momentum=0.9, nesterov=True,
                                       weight_decay=1e-3, **kw),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW, ids=IDS)
@pytest.mark.parametrize("opt", sorted(OPTS))
def test_mixed_step_is_float32_step_plus_rounding(backend, dtype, opt):
    """Master weights follow the float32 optimizer fed the widened grads (bit
    for bit on the reference; within rounding on the compiled backends, whose
    float32 and 16-bit specialisations LLVM/gcc may contract into FMAs
    differently); the 16-bit params are exactly the rounded master."""
    p16 = _params(dtype)
    p32 = fastopt.pack([np.asarray(a, np.float32) for a in p16])
    o16 = OPTS[opt](p16, backend=backend, max_grad_norm=50.0)
    o32 = OPTS[opt](p32, backend=backend, max_grad_norm=50.0)
    for t in range(3):
        g16 = _grads(p16, t)
        g32 = p32.zeros_like()
        g32.data[:] = g16.data.astype(np.float32)
        assert o16.step(g16) == o32.step(g32)
        master = o16.state[0]["runs"][0]["master"]
        assert p16.data.tobytes() == master.astype(dtype).tobytes()
        for name, buf in [("master", p32.data), *o32.state[0]["runs"][0].items()]:
            got = o16.state[0]["runs"][0][name]
            if backend == "numpy":
                assert got.tobytes() == buf.tobytes(), name
            else:
                np.testing.assert_allclose(got, buf, rtol=1e-6, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", LOW, ids=IDS)
def test_fast_backends_match_reference(backend, dtype):
    ref_p, fast_p = _params(dtype), _params(dtype)
    ref = fastopt.AdamW(ref_p, lr=1e-2, backend="numpy")
    fast = fastopt.AdamW(fast_p, lr=1e-2, backend=backend)
    for t in range(3):
        ref.step(_grads(ref_p, t))
        fast.step(_grads(fast_p, t))
    mr, mf = ref.state[0]["runs"][0]["master"], fast.state[0]["runs"][0]["master"]
    np.testing.assert_allclose(mf, mr, rtol=1e-5, atol=1e-6)
    # params are the backend's own master, rounded
    assert fast_p.data.tobytes() == mf.astype(dtype).tobytes()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW, ids=IDS)
@pytest.mark.parametrize("how", ["loss_scaler", "skip_nonfinite"])
def test_nonfinite_skips_and_backs_off(backend, dtype, how):
    p = _params(dtype)
    scaler = fastopt.LossScaler(init_scale=256.0, growth_interval=2)
    kw = {"loss_scaler": scaler} if how == "loss_scaler" else {"skip_nonfinite": True}
    o = fastopt.AdamW(p, backend=backend, **kw)
    o.step(_grads(p, 0, scale=256.0))
    before = {"p": p.data.copy(), "state": snapshot(o.state)}
    g = _grads(p, 1, scale=256.0)
    g.data[LARGE + 3] = np.inf if dtype == F16 else np.nan
    assert not np.isfinite(o.step(g))
    assert_same_tree({"p": p.data, "state": o.state}, before)
    assert o.skipped_steps == 1
    if how == "loss_scaler":
        assert scaler.scale == 128.0 and scaler.growth_tracker == 0
        o.step(_grads(p, 2, scale=128.0))
        o.step(_grads(p, 3, scale=128.0))
        assert scaler.scale == 256.0 and scaler.growth_tracker == 0


def test_loss_scaler_matches_torch_gradscaler():
    """Scale sequence and trajectory against torch.amp.GradScaler (float32
    params, where torch's AdamW is the reference) with injected infs."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    w0 = rng.standard_normal(64).astype(np.float32)
    coefs = [rng.standard_normal(64).astype(np.float32) for _ in range(12)]
    for i in (2, 3, 7):
        coefs[i][5] = np.inf
    tp = torch.nn.Parameter(torch.tensor(w0))
    topt = torch.optim.AdamW([tp], lr=1e-2)
    tscaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=3)
    w = w0.copy()
    scaler = fastopt.LossScaler(init_scale=2.0 ** 10, growth_interval=3)
    opt = fastopt.AdamW(w, lr=1e-2, loss_scaler=scaler, backend="numpy")
    for c in coefs:
        assert scaler.scale == tscaler.get_scale()
        topt.zero_grad()
        tscaler.scale((tp * torch.tensor(c)).sum()).backward()
        tscaler.step(topt)
        tscaler.update()
        opt.step(c * np.float32(scaler.scale))     # d(scale * sum(c * w))/dw
    assert scaler.scale == tscaler.get_scale()
    np.testing.assert_allclose(w, tp.detach().numpy(), rtol=1e-6)
    assert opt.skipped_steps == 3 and opt.state[0]["step"] == 9


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_precision_resume_is_exact(tmp_path, backend):
    def make(p):
        return fastopt.AdamW(p, lr=fastopt.schedules.warmup_cosine(1e-2, 2, 8), backend=backend,
                             loss_scaler=fastopt.LossScaler(init_scale=64.0, growth_interval=2))

    def run(o, p, a, b):
        for t in range(a, b):
            g = _grads(p, t, scale=o.loss_scaler.scale)
            if t == 2:
                g.data[0] = np.inf
            o.step(g)

    ref_p = _params(BF16, n=1000)
    ref = make(ref_p)
    run(ref, ref_p, 0, 7)
    p = _params(BF16, n=1000)
    o = make(p)
    run(o, p, 0, 4)
    fastopt.save(tmp_path / "c.npz", params=p, optimizer=o)
    p2 = _params(BF16, n=1000)
    p2.data[:] = 0
    o2 = make(p2)
    fastopt.load(tmp_path / "c.npz", params=p2, optimizer=o2)
    assert p2.dtype == BF16
    run(o2, p2, 4, 7)
    assert p2.data.tobytes() == ref_p.data.tobytes()
    assert_same_tree(o2.state_dict(), ref.state_dict())
    # a bfloat16 checkpoint does not load into a float16 or float32 optimizer
    for dtype in (F16, np.float32):
        q = _params(dtype, n=1000)
        oq = fastopt.AdamW(q, backend=backend)
        with pytest.raises(fastopt.CheckpointError, match="bfloat16"):
            fastopt.load(tmp_path / "c.npz", params=q, optimizer=oq)


@pytest.mark.parametrize("state_dtype", ["float32", "int8"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_group_of_float32_and_16_bit_params_resumes_exactly(tmp_path, backend, state_dtype):
    """A group may hold float32 params beside bfloat16 ones (one compute
    dtype): only the 16-bit ones have a master copy. Its checkpoint was
    refused ("state buffer 'master' exists for only some runs"); it saves,
    loads and resumes bit for bit, the float32 params stepping themselves."""
    def make():
        return [np.linspace(-1, 1, 300).astype(np.float32),
                np.linspace(-2, 2, 5).astype(BF16), np.linspace(0, 1, 7).astype(np.float32)]
    rng = np.random.default_rng(0)
    grads = [[rng.standard_normal(a.shape).astype(a.dtype) for a in make()] for _ in range(6)]
    ref_p = make()
    ref = fastopt.AdamW(ref_p, lr=1e-2, backend=backend, state_dtype=state_dtype)
    for g in grads:
        ref.step(g)
    p = make()
    o = fastopt.AdamW(p, lr=1e-2, backend=backend, state_dtype=state_dtype)
    for g in grads[:3]:
        o.step(g)
    fastopt.save(tmp_path / "c.npz", params=p, optimizer=o)
    p2 = [np.zeros_like(a) for a in make()]
    o2 = fastopt.AdamW(p2, lr=1e-2, backend=backend, state_dtype=state_dtype)
    fastopt.load(tmp_path / "c.npz", params=p2, optimizer=o2)
    for g in grads[3:]:
        o2.step(g)
    for a, b in zip(p2, ref_p):
        assert a.tobytes() == b.tobytes()
    assert_same_tree(o2.state_dict(), ref.state_dict())


def test_validation():
    p = _params(BF16, n=10)
    o = fastopt.AdamW(p)
    with pytest.raises(TypeError, match="dtype float32 but params"):
        o.step([np.zeros(a.shape, np.float32) for a in p])
    with pytest.raises(TypeError, match="float32 or float64"):
        fastopt.functional.adamw(p[0], p[0].copy(), p[0].copy(), p[0].copy(), step=1)
    with pytest.raises(TypeError, match="loss_scaler"):
        fastopt.AdamW(p, loss_scaler=2.0 ** 16)
    with pytest.raises(ValueError, match="backoff_factor"):
        fastopt.LossScaler(backoff_factor=1.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_values_written_into_16_bit_params_take_effect_after_sync_master(backend):
    """The float32 master copy is what a step updates: a value written into
    a bfloat16 param in place is overwritten by the next step, unless
    ``sync_master`` takes the master copies from the params first (after
    several steps, so that the planned step's tables are replaced too)."""
    def make():
        return [np.ones(40, BF16), np.ones(3, np.float32)]

    def grads():
        return [np.ones(40, BF16), np.ones(3, np.float32)]
    for sync in (False, True):
        p = make()
        o = fastopt.SGD(p, lr=0.5, backend=backend)
        for _ in range(3):
            o.step(grads())
        p[0][...] = 5
        p[1][...] = 7
        if sync:
            o.sync_master()
        o.step(grads())
        assert np.array_equal(p[0].astype(np.float32), np.full(40, 4.5 if sync else -1.0))
        assert np.array_equal(p[1], np.full(3, 6.5, np.float32))   # its own weights either way
        o.step(grads())
        assert np.array_equal(p[0].astype(np.float32), np.full(40, 4.0 if sync else -1.5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sync_master_with_packed_params_and_the_same_grads_buffer(backend):
    """Packed 16-bit params stepped with one FlatArrays of grads, reused: the
    tables sync_master drops were bound to it, and the rebuilt ones were not
    (the compiled kernels read gradient address 0: a segfault)."""
    P = fastopt.pack([np.ones(10, BF16), np.ones(5, BF16)])
    G = P.zeros_like()
    G.data[:] = 1
    opt = fastopt.SGD(P, lr=0.5, backend=backend)
    opt.step(G)
    P.data[:] = 5
    opt.sync_master()
    opt.step(G)
    assert np.array_equal(P.data.astype(np.float32), np.full(15, 4.5, np.float32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sync_master_takes_full_precision_values(backend):
    """Pretrained float32 weights for bfloat16/float16 training: the master
    copies take them exactly (not their 16-bit rounding), the params their
    rounding, float32 params the values; the steps after go on from them,
    the planned step too."""
    rng = np.random.default_rng(3)
    w32 = {"W": rng.normal(size=(6, 5)).astype(np.float32),
           "h": rng.normal(size=7).astype(np.float32), "c": rng.normal(size=3)}
    params = {"W": np.zeros((6, 5), BF16), "h": np.zeros(7, np.float16),
              "c": np.zeros(3, np.float32)}
    opt = fastopt.SGD(params, lr=0.25, weight_decay=0.5, backend=backend)
    zero = {k: np.zeros_like(a) for k, a in params.items()}
    opt.step(zero)                          # a plan made over the old master copies
    opt.sync_master(w32)
    for k in ("W", "h"):
        np.testing.assert_array_equal(opt.param_state(k)["master"], w32[k])
        np.testing.assert_array_equal(params[k], w32[k].astype(params[k].dtype))
    np.testing.assert_array_equal(params["c"], w32["c"].astype(np.float32))
    for _ in range(2):
        opt.step(zero)                      # p <- p - lr * wd * p, from the exact values
    for k in ("W", "h"):
        want = w32[k] * np.float32(1 - 0.125) * np.float32(1 - 0.125)
        np.testing.assert_allclose(opt.param_state(k)["master"], want, rtol=2e-7)
        np.testing.assert_array_equal(params[k], opt.param_state(k)["master"].astype(
            params[k].dtype))


def test_sync_master_values_refused_whole():
    params = [np.ones(4, BF16), np.ones(2, np.float32)]
    opt = fastopt.AdamW(params)
    opt.step([np.ones(4, BF16), np.ones(2, np.float32)])
    before = snapshot((params, opt.state_dict()))
    for bad, exc, match in [([np.zeros(4)], ValueError, "values has 1 array but params has 2"),
                            ([np.zeros(4), np.zeros(3)], ValueError,
                             r"values\[1\] has shape \(3,\) but params\[1\]"),
                            ([np.zeros(4), np.zeros(2, int)], TypeError,
                             r"values\[1\] must hold floats"),
                            ({"W": np.zeros(4)}, TypeError, "not given by name")]:
        with pytest.raises(exc, match=match):
            opt.sync_master(bad)
        assert_same_tree(snapshot((params, opt.state_dict())), before)


def test_16_bit_gradient_of_a_float32_param_says_why():
    p = np.ones(3, np.float32)
    opt = fastopt.Adam([p])
    with pytest.raises(TypeError, match=r"got bfloat16 here: 16-bit gradients go with 16-bit "
                                        r"params only; cast it to its param's dtype"):
        opt.step([np.ones(3, BF16)])
    assert (p == 1).all()



@pytest.mark.parametrize("n", [1, 511, 513, LARGE])
@pytest.mark.parametrize("dtype", LOW, ids=IDS)
def test_cython_16_bit_master_is_the_float32_step_bit_for_bit(dtype, n):
    """The Cython step over 16-bit params runs a block's gradients widened,
    then the float32 element loop: its master copy is, bit for bit, the
    float32 params of the same step over the gradients' float32 values."""
    rng = np.random.default_rng(n)
    start = rng.normal(size=n).astype(dtype)
    low, full = start.copy(), start.astype(np.float32)
    a = fastopt.AdamW([low], lr=1e-2, backend="cython")
    b = fastopt.AdamW([full], lr=1e-2, backend="cython")
    for t in range(3):
        g = rng.normal(size=n).astype(dtype)
        a.step([g])
        b.step([g.astype(np.float32)])
    assert a.param_state(low)["master"].tobytes() == full.tobytes()
    assert low.tobytes() == full.astype(dtype).tobytes()


def test_sync_master_values_missing_a_layer_names_the_values():
    """It said "grads is missing grads['l2']" (fine-tuning trial)."""
    p = {"l1": {"W": np.ones(3, np.float32)}, "l2": {"W": np.ones(2, np.float32)}}
    opt = fastopt.AdamW(p)
    with pytest.raises(ValueError, match=r"values is missing values\['l2'\]"):
        opt.sync_master({"l1": {"W": np.zeros(3, np.float32)}})


def test_loading_float32_weights_into_16_bit_params_says_how():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    import fastopt as fo
    import tempfile, os
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "pre.npz")
        fo.save(path, params={"W": np.ones((2, 2), np.float32)})
        with pytest.raises(fo.CheckpointError, match=r"is bfloat16\[2, 2\] but the checkpoint "
                                                     r"has float32\[2, 2\]; .*sync_master"):
            fo.load(path, params={"W": np.zeros((2, 2), ml_dtypes.bfloat16)})
