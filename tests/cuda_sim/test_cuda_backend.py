"""The ``cuda`` backend against the reference backend, on device arrays.

Runs under the CUDA simulator in CI (via tests/test_cuda_sim.py) and for
real wherever a GPU is usable.
"""

from __future__ import annotations

import numpy as np
import pytest
from cuda_helpers import LONG, N, close, dev, host  # skips the module where CUDA is unusable

import fastopt
from fastopt.backends import numba_cuda as C
from fastopt.backends._cuda_kernels import _sumsq_partial_kernel
from fastopt.backends import reference as R
from fastopt.backends.scalars import adam_scalars, sgd_scalars

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
F32, F64 = np.dtype(np.float32), np.dtype(np.float64)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def _normal(rng, n, dtype, scale=1.0):
    return (rng.standard_normal(n) * scale).astype(dtype)


# -- kernels vs the reference ------------------------------------------------------------

ADAM_CASES = [  # dtype, amsgrad, maximize, decoupled, weight_decay
    (F32, False, False, True, 0.01),
    (F32, True, True, False, 0.1),
    (F32, False, False, False, 0.0),
    (F64, True, False, True, 0.01),
    (F64, False, True, False, 0.1),
]


def dev_at(a, offset):
    """A device copy of ``a`` that starts ``offset`` elements after a 64-byte
    boundary: offset 0 is aligned for four-element vectors, offset 1 is not
    (so the update kernels take their scalar loop over every element)."""
    pad = 64 // a.dtype.itemsize
    whole = dev(np.zeros(a.size + 2 * pad, a.dtype))
    start = (-C._pointer(whole) % 64) // a.dtype.itemsize + offset
    view = whole[start:start + a.size]
    view.copy_to_device(a)
    return view


def test_pointer_is_the_interface_pointer_also_for_views(rng):
    d = dev(_normal(rng, 64, F32))
    for a in (d, d[1:], d[5:9]):
        want = (a._ary.__array_interface__ if C.SIMULATOR
                else a.__cuda_array_interface__)["data"][0]
        assert C._pointer(a) == want
    assert C._pointer(d[1:]) - C._pointer(d) == 4


#: 0: aligned arrays, the vector loop (+ the scalar tail); 1: the scalar loop only
OFFSETS = pytest.mark.parametrize("offset", [0, 1], ids=["vector", "scalar"])


@OFFSETS
@pytest.mark.parametrize("dtype,amsgrad,maximize,decoupled,wd", ADAM_CASES)
def test_adam_kernel_matches_reference(rng, dtype, amsgrad, maximize, decoupled, wd,
                                       offset):
    p = _normal(rng, N, dtype)
    m, v = np.zeros(N, dtype), np.zeros(N, dtype)
    vmax = np.zeros(N, dtype) if amsgrad else None
    dp, dm, dv = dev_at(p, offset), dev_at(m, offset), dev_at(v, offset)
    dvmax = dev_at(vmax, offset) if amsgrad else None
    assert C.vector_ok(dp, dm, dv, dvmax) == (offset == 0)
    for step in (1, 2):
        g = _normal(rng, N, dtype)
        s = adam_scalars(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=wd,
                         decoupled=decoupled, step=step, grad_scale=0.5, maximize=maximize)
        C.adam_update(dp, dev_at(g, offset), dm, dv, dvmax, s)
        R.adam_update(p, g, m, v, vmax, s)
    close(host(dp), p, "p")
    close(host(dm), m, "m")
    close(host(dv), v, "v")
    if amsgrad:
        close(host(dvmax), vmax, "vmax")


@OFFSETS
def test_update_kernels_over_several_grid_strides(rng, offset):
    """LONG elements: every thread makes several passes of the vector loop
    (and of the scalar loop when misaligned), then the tail; Adam with
    amsgrad and SGD with Nesterov momentum against the reference."""
    p, m, v, w, b = (_normal(rng, LONG, F32) for _ in range(5))
    m, v, w, b = np.zeros_like(m), np.zeros_like(v), np.zeros_like(w), np.zeros_like(b)
    q = p.copy()
    dp, dm, dv, dw = (dev_at(a, offset) for a in (p, m, v, w))
    dq, db = dev_at(q, offset), dev_at(b, offset)
    assert C.vector_ok(dp, dm, dv, dw) == (offset == 0)
    for step in (1, 2):
        g = _normal(rng, LONG, F32)
        s = adam_scalars(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.01,
                         decoupled=True, step=step)
        C.adam_update(dp, dev_at(g, offset), dm, dv, dw, s)
        R.adam_update(p, g, m, v, w, s)
        t = sgd_scalars(lr=0.05, momentum=0.9, dampening=0.0, nesterov=True,
                        weight_decay=0.0, first_step=step == 1)
        C.sgd_update(dq, dev_at(g, offset), db, t)
        R.sgd_update(q, g, b, t)
    for got, want, what in ((dp, p, "p"), (dm, m, "m"), (dv, v, "v"), (dw, w, "vmax"),
                            (dq, q, "sgd p"), (db, b, "sgd buf")):
        close(host(got), want, what)


SGD_CASES = [  # dtype, momentum, dampening, nesterov, weight_decay, maximize
    (F32, 0.0, 0.0, False, 0.0, False),
    (F32, 0.9, 0.1, False, 0.01, True),
    (F32, 0.9, 0.0, True, 0.01, False),
    (F64, 0.9, 0.0, True, 0.0, True),
]


@OFFSETS
@pytest.mark.parametrize("dtype,momentum,dampening,nesterov,wd,maximize", SGD_CASES)
def test_sgd_kernel_matches_reference(rng, dtype, momentum, dampening, nesterov, wd,
                                      maximize, offset):
    p = _normal(rng, N, dtype)
    buf = np.zeros(N, dtype) if momentum else None
    dp = dev_at(p, offset)
    dbuf = dev_at(buf, offset) if momentum else None
    assert C.vector_ok(dp, dbuf) == (offset == 0)
    for step in (1, 2, 3):
        g = _normal(rng, N, dtype)
        s = sgd_scalars(lr=0.05, momentum=momentum, dampening=dampening, nesterov=nesterov,
                        weight_decay=wd, first_step=step == 1, maximize=maximize)
        C.sgd_update(dp, dev_at(g, offset), dbuf, s)
        R.sgd_update(p, g, buf, s)
    close(host(dp), p, "p")
    if momentum:
        close(host(dbuf), buf, "buf")


@OFFSETS
def test_update_kernels_run_the_shared_element_functions(rng, monkeypatch, offset):
    """The kernels have no per-element math of their own: every element goes
    through ``_cuda_kernels._step``, which calls the element function of
    fastopt.backends.elements (the ones the CPU Numba backend compiles too)
    picked by the type of the step's scalars. The simulator runs kernels as
    Python, so wrappers count the calls per optimizer."""
    from fastopt.backends import _cuda_kernels as K
    from fastopt.backends import elements
    from fastopt.backends import scalars as S
    if not C.SIMULATOR:
        pytest.skip("counts Python calls: simulator only")
    assert {kind: fn.element for kind, fn in K.OVER_SLOTS.items()} == {
        S.AdamElement: elements.adam, S.SGDElement: elements.sgd,
        S.RMSpropElement: elements.rmsprop, S.AdagradElement: elements.adagrad,
        S.LionElement: elements.lion, S.AdamaxElement: elements.adamax,
        S.NAdamElement: elements.nadam, S.RAdamElement: elements.radam}
    calls = {}
    for kind, fn in list(K.OVER_SLOTS.items()):
        calls[kind.__name__] = []

        def counted(*args, _real=fn, _seen=calls[kind.__name__]):
            _seen.append(1)             # list.append: safe across the simulator's threads
            return _real(*args)
        counted.states = fn.states
        monkeypatch.setitem(K.OVER_SLOTS, kind, counted)
    n = 8 * C.THREADS + 3               # groups of four, then a tail of three
    p = _normal(rng, n, F32)
    m, v, w, b = (np.zeros(n, F32) for _ in range(4))
    q = p.copy()
    dp, dm, dv, dw, dq, db = (dev_at(a, offset) for a in (p, m, v, w, q, b))
    g = _normal(rng, n, F32)
    s = adam_scalars(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1,
                     decoupled=False, step=1)
    C.adam_update(dp, dev_at(g, offset), dm, dv, dw, s)
    R.adam_update(p, g, m, v, w, s)
    t = sgd_scalars(lr=0.05, momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.0,
                    first_step=True)
    C.sgd_update(dq, dev_at(g, offset), db, t)
    R.sgd_update(q, g, b, t)
    counts = {k: len(c) for k, c in calls.items() if c}
    assert counts == {"AdamElement": n, "SGDElement": n}, counts
    close(host(dp), p, "p")
    close(host(dw), w, "vmax")
    close(host(dq), q, "sgd p")

# -- the global norm ---------------------------------------------------------------------------

def test_norm_two_stage_matches_reference_and_is_deterministic(rng):
    xs = [_normal(rng, n, F32, 3.0) for n in (N, 5, LONG, 1, C.THREADS + 1)]
    ds = [dev(x) for x in xs]
    expect = sum(R.sumsq(x) for x in xs)
    ctrl = C.norm_control(ds)
    got = ctrl.ctrl64.copy_to_host()[0]
    np.testing.assert_allclose(got, expect, rtol=1e-12)
    again = C.norm_control(ds).ctrl64.copy_to_host()[0]
    assert got == again                        # same launch, same bits
    assert fastopt.global_norm(ds) == pytest.approx(np.sqrt(expect), rel=1e-12)
    assert C.sumsq(ds[0]) == pytest.approx(R.sumsq(xs[0]), rel=1e-12)


def test_norm_final_pass_over_more_partials_than_threads(rng):
    """Stage 2 with more partials than its block has threads (each thread
    then adds a strided share before the tree)."""
    from fastopt.backends._cuda_kernels import _finalize_kernel
    count = 3 * C.THREADS + 5
    partial = rng.random(count) * 10.0
    for bad_at in (None, count - 1):
        bad = np.zeros(count, np.int32)
        if bad_at is not None:
            bad[bad_at] = 1
        ctrl = C.StepControl.take()
        _finalize_kernel[1, C.THREADS](dev(partial), dev(bad), count, ctrl.ctrl64,
                                       ctrl.ctrl32, 0.0, 1.0, True)
        assert ctrl.ctrl64.copy_to_host()[0] == pytest.approx(partial.sum(), rel=1e-12)
        assert ctrl.skipped() == (bad_at is not None)


#: positions in each of the unrolled loop's four lanes and in its tail
def _norm_stride():
    """The norm's stage-1 grid stride for a float32 array this long (the
    occupancy API's block count on a GPU)."""
    x = dev(np.zeros(LONG, F32))
    return C.THREADS * C.grid_blocks(_sumsq_partial_kernel, x.dtype, LONG,
                                     (x, *C._scratch(1), 0))


_STRIDE = _norm_stride()
BAD_AT = [N // 3, 1, _STRIDE + 2, 2 * _STRIDE + 3, 3 * _STRIDE + 4, LONG - 1]


@pytest.mark.parametrize("at", BAD_AT)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_norm_sees_nonfinite(rng, bad, at):
    x = _normal(rng, LONG, F32)
    x[at] = bad
    ctrl = C.norm_control([dev(x)], check=True)
    assert ctrl.skipped()
    assert np.isnan(ctrl.norm()) if bad != bad else ctrl.norm() == np.inf


def test_clip_by_global_norm_on_device(rng):
    gs = [_normal(rng, n, F32, 2.0) for n in (N, 17)]
    ds = [dev(g) for g in gs]
    norm = fastopt.clip_by_global_norm(ds, 1.0)
    expect = fastopt.clip_by_global_norm(gs, 1.0, backend="numpy")
    assert float(norm) == pytest.approx(expect, rel=1e-12)
    for d, g in zip(ds, gs):
        close(host(d), g)


def test_control_blocks_are_reused_and_held_norms_stay_valid(rng):
    """Control blocks return to a free list when their step is dropped (no
    allocation per step), while a norm still held keeps its own block."""
    gs = [_normal(rng, N, F32, 1.0 + k) for k in range(4)]
    ds = [dev(g) for g in gs]
    ctrl = C.norm_control([ds[0]])
    first = ctrl.ctrl64
    del ctrl
    again = C.norm_control([ds[1]])
    assert again.ctrl64 is first                   # taken back from the free list
    p = dev(_normal(rng, N, F32))
    opt = fastopt.AdamW(p, lr=1e-3, max_grad_norm=1.0)
    held = [opt.step(d) for d in ds]               # every step's DeviceNorm kept
    assert len({id(n._ctrl.ctrl64) for n in held}) == len(held)
    for norm, g in zip(held, gs):
        assert float(norm) == pytest.approx(np.sqrt(R.sumsq(g)), rel=1e-12)


def test_control_block_collected_in_a_cycle_stays_alive_for_reuse(rng):
    """A StepControl collected by the cyclic GC (an optimizer in a reference
    cycle holding its last norm) must not hand back arrays the GC collected
    with it: on a GPU their memory was already freed, and the next norm pass
    wrote into a new optimizer's moments."""
    import gc
    import weakref
    ctrl = C.norm_control([dev(_normal(rng, N, F32))])
    alive = weakref.ref(ctrl.ctrl64)
    cycle = {"ctrl": ctrl}
    cycle["self"] = cycle
    del ctrl, cycle
    gc.collect()
    assert alive() is not None, "the pooled control block was collected"
    assert C.norm_control([dev(_normal(rng, 5, F32))]).ctrl64 is alive()


# -- optimizers on device arrays --------------------------------------------------------------

def _pair(rng, cls, dtype=F32, sizes=(N, 33), **kw):
    hp = [_normal(rng, n, dtype) for n in sizes]
    dp = [dev(p) for p in hp]
    return hp, dp, cls(hp, backend="numpy", **kw), cls(dp, **kw)


@pytest.mark.parametrize("cls,kw", [
    (fastopt.AdamW, dict(lr=1e-2, weight_decay=0.1, max_grad_norm=1.0, amsgrad=True)),
    (fastopt.Adam, dict(lr=1e-2, weight_decay=0.01, maximize=True)),
    (fastopt.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, max_grad_norm=0.5)),
])
def test_optimizer_matches_reference(rng, cls, kw):
    hp, dp, ref, gpu = _pair(rng, cls, **kw)
    assert gpu.backend == "cuda"               # "auto" + device arrays
    for _ in range(3):
        g = [_normal(rng, p.size, p.dtype, 3.0) for p in hp]
        n_ref = ref.step(g)
        n_gpu = gpu.step([dev(x) for x in g])
        if n_ref is not None:
            assert float(n_gpu) == pytest.approx(n_ref, rel=1e-12)
    for a, b in zip(dp, hp):
        close(host(a), b)
    assert gpu.state[0]["step"] == 3


def count_update_launches(monkeypatch):
    """A list that records each launch of the update kernels (scalar or vector)."""
    launches = []

    class Counting:
        def __init__(self, real):
            self.real = real

        def __getitem__(self, cfg):
            launches.append(cfg)
            return self.real[cfg]
    for name in ("_update_kernel", "_update_vec_kernel"):
        monkeypatch.setattr(C, name, Counting(getattr(C, name)))
    return launches


def test_one_launch_for_a_flat_buffer(rng, monkeypatch):
    """Many tensors packed in one device buffer: one update launch a step."""
    launches = count_update_launches(monkeypatch)
    shapes = [(3, 4), (5,), (7, 2)] * 20
    flat = fastopt.pack([np.ones(s, np.float32) for s in shapes])
    opt = fastopt.AdamW(dev(flat.data), lr=1e-3)
    opt.step(dev(np.full(flat.data.size, 0.5, np.float32)))
    assert len(launches) == 1


def test_nonfinite_step_writes_nothing(rng):
    hp, dp, ref, gpu = _pair(rng, fastopt.SGD, lr=0.1, momentum=0.9, dampening=0.5,
                             skip_nonfinite=True, max_grad_norm=1.0)
    g = [_normal(rng, p.size, F32) for p in hp]
    g[1][3] = np.nan
    before = [host(d) for d in dp]
    norm = gpu.step([dev(x) for x in g])
    assert np.isnan(float(norm))
    assert gpu.skipped_steps == 1 and gpu.state[0]["step"] == 0
    for a, b in zip(dp, before):
        np.testing.assert_array_equal(host(a), b)
    # the first applied step is still torch's first momentum step (buf = g)
    g = [_normal(rng, p.size, F32) for p in hp]
    ref.step(g)
    gpu.step([dev(x) for x in g])
    for a, b in zip(dp, hp):
        close(host(a), b)


@pytest.mark.parametrize("low", ["bfloat16", "float16"])
def test_mixed_precision_with_loss_scaler(rng, low):
    """16-bit params and grads on the device (bfloat16 as uint16 bits), a
    float32 master, loss scaling folded into the step, overflow skipped."""
    lowdt = BF16 if low == "bfloat16" else np.dtype(np.float16)
    view = np.uint16 if low == "bfloat16" else np.float16
    p16 = _normal(rng, N, lowdt)
    dp16 = dev(p16.view(view))
    ref = fastopt.AdamW([p16], lr=1e-2, backend="numpy", max_grad_norm=1.0,
                        loss_scaler=fastopt.LossScaler(init_scale=1024.0))
    gpu = fastopt.AdamW([dp16], lr=1e-2, backend="cuda", max_grad_norm=1.0,
                        loss_scaler=fastopt.LossScaler(init_scale=1024.0))
    for k in range(3):
        g = (rng.standard_normal(N) * 1024.0).astype(lowdt)
        if k == 1:
            g[5] = np.inf
        ref.step([g])
        gpu.step([dev(g.view(view))])
    assert gpu.skipped_steps == ref.skipped_steps == 1
    assert gpu.loss_scaler.scale == ref.loss_scaler.scale
    master = host(gpu.state[0]["runs"][0]["master"])
    close(master, ref.state[0]["runs"][0]["master"], "master")
    # the 16-bit params are exactly the rounded device master
    np.testing.assert_array_equal(host(dp16), master.astype(lowdt).view(view))


def test_state_dict_roundtrip_on_device(rng):
    hp, dp, _, gpu = _pair(rng, fastopt.AdamW, lr=1e-2)
    g = [dev(_normal(rng, p.size, F32)) for p in hp]
    gpu.step(g)
    sd = gpu.state_dict()
    assert isinstance(sd["state"][0]["buffers"]["exp_avg"], np.ndarray)
    twin_p = [dev(host(d)) for d in dp]
    twin = fastopt.AdamW(twin_p, lr=1e-2)
    twin.load_state_dict(sd)
    gpu.step(g)
    twin.step(g)
    for a, b in zip(dp, twin_p):
        np.testing.assert_array_equal(host(a), host(b))


def test_functional_on_device(rng):
    p = _normal(rng, N, F32)
    g = _normal(rng, N, F32)
    m, v = np.zeros(N, F32), np.zeros(N, F32)
    dp, dm, dv = dev(p), dev(m), dev(v)
    fastopt.functional.adamw(dp, dev(g), dm, dv, step=1, lr=1e-2)
    fastopt.functional.adamw(p, g, m, v, step=1, lr=1e-2, backend="numpy")
    close(host(dp), p)
    buf = np.zeros(N, F32)
    dbuf = dev(buf)
    fastopt.functional.sgd(dp, dev(g), dbuf, lr=0.1, momentum=0.9, first_step=True)
    fastopt.functional.sgd(p, g, buf, lr=0.1, momentum=0.9, first_step=True,
                           backend="numpy")
    close(host(dp), p)


# -- bad input: a clear error, nothing written ----------------------------------------------

def test_host_array_is_refused():
    with pytest.raises(TypeError, match="host NumPy array"):
        fastopt.AdamW([np.ones(4, np.float32)], backend="cuda")
    opt = fastopt.AdamW([dev(np.ones(4, np.float32))])
    with pytest.raises(TypeError, match=r"grads\[0\] is a host NumPy array"):
        opt.step([np.ones(4, np.float32)])
    # and "auto" never takes cuda for host arrays
    assert fastopt.AdamW([np.ones(4, np.float32)]).backend != "cuda"


def test_bad_grads_write_nothing(rng):
    hp, dp, _, gpu = _pair(rng, fastopt.Adam, lr=1e-2, max_grad_norm=1.0)
    before = [host(d) for d in dp]
    good = [dev(_normal(rng, p.size, F32)) for p in hp]
    with pytest.raises(ValueError, match="has shape"):
        gpu.step([good[0], dev(np.ones(5, F32))])
    with pytest.raises(TypeError, match="dtype"):
        gpu.step([good[0], dev(np.ones(hp[1].size, F64))])
    with pytest.raises(ValueError, match="has 1 array but"):
        gpu.step([good[0]])
    with pytest.raises(ValueError, match="overlaps"):
        gpu.step([dp[0], good[1]])       # grads aliasing the params
    with pytest.raises(ValueError, match="overlaps"):
        fastopt.AdamW([dp[0], dp[0]])
    for a, b in zip(dp, before):
        np.testing.assert_array_equal(host(a), b)
    assert gpu.state[0]["step"] == 0 and gpu.state[0]["runs"][0] == {}


def test_mixed_devices_are_refused(monkeypatch, rng):
    """A second GPU cannot be simulated: pretend one array lives there."""
    monkeypatch.setattr(C, "_CHECK_DEVICES", True)
    monkeypatch.setattr(C, "device_of", lambda a: 1 if a.size == 7 else 0)
    monkeypatch.setattr(C, "current_device_id", lambda: 0)
    with pytest.raises(ValueError, match="mixed devices"):
        C.check_devices([("params[0]", dev(np.ones(3))), ("grads[0]", dev(np.ones(7)))])


def test_optimizer_refuses_grads_on_another_gpu(monkeypatch, rng):
    hp, dp, _, gpu = _pair(rng, fastopt.SGD, lr=0.1)
    before = [host(d) for d in dp]
    grads = [dev(_normal(rng, p.size, F32)) for p in hp]
    monkeypatch.setattr(C, "_CHECK_DEVICES", True)
    monkeypatch.setattr(C, "device_of", lambda a: 1 if a.size == 33 else 0)
    monkeypatch.setattr(C, "current_device_id", lambda: 0)
    with pytest.raises(ValueError, match=r"grads\[1\] is on GPU 1 .*mixed devices"):
        gpu.step(grads)
    monkeypatch.undo()
    for a, b in zip(dp, before):
        np.testing.assert_array_equal(host(a), b)


@pytest.mark.parametrize("grads_as", ["flat", "views"])
def test_device_pack_steps_many_tensors_in_one_launch(rng, monkeypatch, grads_as):
    """numba_cuda.pack: the device twin of fastopt.pack. Grads as a
    DeviceFlatArrays of the same layout give one launch per step; a list of
    views works too (a launch per view) and gives the same result."""
    shapes = [(3, 4), (5,), (7, 2), (1,)] * 3
    host = [_normal(rng, int(np.prod(s)), F32).reshape(s) for s in shapes]
    ref_p = fastopt.pack(host)
    params = C.pack(host)
    assert [tuple(v.shape) for v in params] == shapes
    ref = fastopt.AdamW(ref_p, lr=1e-2, max_grad_norm=1.0, backend="numpy")
    opt = fastopt.AdamW(params, lr=1e-2, max_grad_norm=1.0)
    launches = count_update_launches(monkeypatch)
    for _ in range(2):
        g = ref_p.zeros_like()
        g.data[...] = _normal(rng, g.data.size, F32, 2.0)
        ref.step(g)
        if grads_as == "flat":
            dg = params.zeros_like()
            dg.data.copy_to_device(g.data)
            opt.step(dg)
        else:
            opt.step([dev(x) for x in g])
    assert len(launches) == (2 if grads_as == "flat" else 2 * len(shapes))
    close(params.data.copy_to_host(), ref_p.data)
    for v, r in zip(params.copy_to_host(), ref_p):
        close(v, r)


def test_device_pack_bad_grads(rng):
    params = C.pack([np.ones((2, 3), F32), np.ones(4, F32)])
    opt = fastopt.SGD(params, lr=0.1)
    with pytest.raises(ValueError, match="do not match"):
        opt.step(C.flat_zeros([(6,), (4,)], F32))
    with pytest.raises(TypeError, match="dtype"):
        opt.step(C.flat_zeros([(2, 3), (4,)], F64))
    np.testing.assert_array_equal(params.data.copy_to_host(), np.ones(10, F32))


def test_clip_refuses_16bit_device_grads_but_norm_reads_them(rng):
    g = _normal(rng, 50, BF16)
    d = dev(g.view(np.uint16))
    with pytest.raises(TypeError, match="float32"):
        fastopt.clip_by_global_norm([d], 1.0)
    assert fastopt.global_norm([d]) == pytest.approx(
        np.sqrt(R.sumsq(g.astype(np.float32))), rel=1e-12)
    np.testing.assert_array_equal(host(d), g.view(np.uint16))


def _torch_cuda():
    if C.SIMULATOR:
        pytest.skip("torch CUDA tensors need a real GPU")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    return torch


def test_torch_cuda_tensors_in_place_match_torch_adamw():
    """Real GPU only: torch tensors through __cuda_array_interface__, updated
    where they live, match torch.optim.AdamW."""
    torch = _torch_cuda()
    gen = torch.Generator(device="cuda").manual_seed(0)
    ours = [torch.randn(n, device="cuda", generator=gen) for n in (N, 31)]
    theirs = [t.clone().requires_grad_(True) for t in ours]
    opt = fastopt.AdamW(ours, lr=1e-2, weight_decay=0.1, max_grad_norm=1.0)
    ref = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        gs = [torch.randn(t.shape, device="cuda", generator=gen) * 3 for t in ours]
        opt.step(gs)
        for t, g in zip(theirs, gs):
            t.grad = g.clone()
        torch.nn.utils.clip_grad_norm_(theirs, 1.0)
        ref.step()
    torch.cuda.synchronize()
    for a, b in zip(ours, theirs):
        close(a.cpu().numpy(), b.detach().cpu().numpy())


def test_torch_host_tensor_is_refused():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="device array"):
        fastopt.AdamW([torch.ones(3)], backend="cuda")


def test_param_groups_and_schedule_on_device(rng):
    hw, hb = _normal(rng, N, F32), _normal(rng, 9, F32)
    dw, db = dev(hw), dev(hb)
    sched = fastopt.schedules.warmup_cosine(peak_value=1e-2, warmup_steps=2, total_steps=10)

    def make(w, b):
        return [{"params": [w]}, {"params": [b], "weight_decay": 0.0, "lr": 1e-3}]
    ref = fastopt.AdamW(make(hw, hb), lr=sched, weight_decay=0.1, backend="numpy")
    gpu = fastopt.AdamW(make(dw, db), lr=sched, weight_decay=0.1)
    assert gpu.backend == "cuda"
    for _ in range(3):
        gw, gb = _normal(rng, N, F32), _normal(rng, 9, F32)
        ref.step([gw, gb])
        gpu.step([dev(gw), dev(gb)])
    assert gpu.last_lr == ref.last_lr
    close(host(dw), hw)
    close(host(db), hb)


def test_functional_refuses_host_arrays_on_cuda():
    z = np.zeros(4, F32)
    with pytest.raises(TypeError, match="host NumPy array"):
        fastopt.functional.adamw(z, z.copy(), z.copy(), z.copy(), step=1, backend="cuda")


@pytest.mark.parametrize("packed", [False, True])
def test_checkpoint_with_device_params_resumes_exactly(rng, tmp_path, packed):
    """fastopt.save/load with params and state on the device: 2 steps, save,
    load into fresh device arrays, 2 more steps == 4 steps, bit for bit."""
    shapes = [(7, 3), (5,), (40,)]
    init = [_normal(rng, int(np.prod(s)), F32).reshape(s) for s in shapes]
    grads = [[dev(_normal(rng, int(np.prod(s)), F32).reshape(s)) for s in shapes]
             for _ in range(4)]

    def params_from(host_arrays):
        if packed:
            flat = C.pack([dev(a) for a in host_arrays])
            return flat, list(flat)
        arrays = [dev(a) for a in host_arrays]
        return arrays, arrays

    straight, straight_views = params_from(init)
    opt = fastopt.AdamW(straight, lr=1e-2, backend="cuda")
    for g in grads:
        opt.step(g)

    first, first_views = params_from(init)
    opt1 = fastopt.AdamW(first, lr=1e-2, backend="cuda")
    for g in grads[:2]:
        opt1.step(g)
    fastopt.save(tmp_path / "ckpt.npz", params=first, optimizer=opt1, extra={"at": 2})
    zeros = [np.zeros(s, F32) for s in shapes]
    resumed, resumed_views = params_from(zeros)
    opt2 = fastopt.AdamW(resumed, lr=1e-2, backend="cuda")
    ckpt = fastopt.load(tmp_path / "ckpt.npz", params=resumed, optimizer=opt2)
    assert ckpt["extra"] == {"at": 2}
    for a, b in zip(resumed_views, first_views):       # copied in place, on the device
        np.testing.assert_array_equal(host(a), host(b))
    for g in grads[2:]:
        opt2.step(g)
    for a, b in zip(resumed_views, straight_views):
        np.testing.assert_array_equal(host(a), host(b))


def test_checkpoint_mismatch_on_device_writes_nothing(rng, tmp_path):
    p = [dev(_normal(rng, 10, F32))]
    fastopt.save(tmp_path / "c.npz", params=p)
    other = [dev(_normal(rng, 11, F32))]
    before = host(other[0]).copy()
    with pytest.raises(fastopt.CheckpointError, match=r"params\[0\] is float32\[11\]"):
        fastopt.load(tmp_path / "c.npz", params=other)
    np.testing.assert_array_equal(host(other[0]), before)


def test_fastopt_cuda_is_the_public_home_of_the_device_helpers(rng):
    """``fastopt.cuda.pack`` and friends are the backend's own objects, and a
    model packed with them steps in one launch like the reference."""
    from fastopt import cuda

    assert cuda.pack is C.pack and cuda.DeviceFlatArrays is C.DeviceFlatArrays
    init = [_normal(rng, 12, F32), _normal(rng, 5, F32)]
    params = cuda.pack(init)
    grads = params.zeros_like()
    g = _normal(rng, 17, F32)
    grads.data.copy_to_device(g)
    opt = fastopt.AdamW(params, lr=1e-2)
    ref = fastopt.AdamW([a.copy() for a in init], lr=1e-2, backend="numpy")
    opt.step(grads)
    ref.step([g[:12], g[12:]])
    close(host(params.data), np.concatenate(ref.param_groups[0]["params"]), "params")
