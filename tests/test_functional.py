"""The functional API against the class API: same backend, same trajectory."""

from __future__ import annotations

import numpy as np
import pytest

import fastopt
from conftest import BACKENDS, assert_bit_identical, rng_array
from fastopt import functional as F
from fastopt.backends import get_backend

SHAPES = [(5, 4), (4,), (3, 2, 2)]
STEPS = 25


def problem(dtype, seed=0):
    rng = np.random.default_rng(seed)
    init = [rng_array(rng, s, dtype) for s in SHAPES]
    grads = [[rng_array(rng, s, dtype) for s in SHAPES] for _ in range(STEPS)]
    return init, grads


ADAM_CASES = [
    ("adam", "Adam", dict(lr=1e-2)),
    ("adam", "Adam", dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1,
                          maximize=True)),
    ("adam", "Adam", dict(lr=1e-2, weight_decay=0.01, amsgrad=True)),
    ("adamw", "AdamW", dict(lr=1e-2)),
    ("adamw", "AdamW", dict(lr=1e-2, weight_decay=0.2, amsgrad=True, maximize=True)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("flat", [False, True], ids=["lists", "flatarrays"])
@pytest.mark.parametrize("fn,cls,kwargs", ADAM_CASES,
                         ids=[f"{c[0]}{i}" for i, c in enumerate(ADAM_CASES)])
def test_functional_adam_matches_class(fn, cls, kwargs, backend, dtype, flat):
    init, grads = problem(dtype)
    kwargs = dict(kwargs)
    amsgrad = kwargs.pop("amsgrad", False)
    if flat:
        p_fn = fastopt.pack(init)
        m, v = p_fn.zeros_like(), p_fn.zeros_like()
        vmax = p_fn.zeros_like() if amsgrad else None
    else:
        p_fn = [a.copy() for a in init]
        m, v = [np.zeros_like(a) for a in init], [np.zeros_like(a) for a in init]
        vmax = [np.zeros_like(a) for a in init] if amsgrad else None
    p_cls = fastopt.pack(init)
    opt = getattr(fastopt, cls)(p_cls, amsgrad=amsgrad, backend=backend, **kwargs)
    g_cls = p_cls.zeros_like()
    for t, g in enumerate(grads, start=1):
        g_fn = fastopt.pack(g) if flat else g
        assert getattr(F, fn)(p_fn, g_fn, m, v, vmax, step=t, backend=backend,
                              **kwargs) is None
        for view, x in zip(g_cls, g):
            view[...] = x
        opt.step(g_cls)
    for a, b in zip(p_fn, p_cls):
        assert_bit_identical(a, b)
    run = opt.state[0]["runs"][0]
    assert_bit_identical(np.concatenate([x.reshape(-1) for x in m]), run["exp_avg"])
    assert_bit_identical(np.concatenate([x.reshape(-1) for x in v]), run["exp_avg_sq"])
    if amsgrad:
        assert_bit_identical(np.concatenate([x.reshape(-1) for x in vmax]),
                             run["max_exp_avg_sq"])
    # The parameters actually moved.
    assert not np.array_equal(p_cls.data, fastopt.pack(init).data)


SGD_CASES = [
    dict(lr=0.1),
    dict(lr=0.1, weight_decay=0.05, maximize=True),
    dict(lr=0.05, momentum=0.9),
    dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01),
    dict(lr=0.05, momentum=0.8, nesterov=True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("flat", [False, True], ids=["lists", "flatarrays"])
@pytest.mark.parametrize("kwargs", SGD_CASES, ids=[str(i) for i in range(len(SGD_CASES))])
def test_functional_sgd_matches_class(kwargs, backend, dtype, flat):
    init, grads = problem(dtype, seed=1)
    momentum = kwargs.get("momentum", 0.0)
    if flat:
        p_fn = fastopt.pack(init)
        bufs = p_fn.zeros_like() if momentum else None
    else:
        p_fn = [a.copy() for a in init]
        bufs = [np.zeros_like(a) for a in init] if momentum else None
    p_cls = [a.copy() for a in init]
    opt = fastopt.SGD(p_cls, backend=backend, **kwargs)
    for t, g in enumerate(grads):
        F.sgd(p_fn, fastopt.pack(g) if flat else g, bufs, first_step=(t == 0),
              backend=backend, **kwargs)
        opt.step(g)
    for a, b in zip(p_fn, p_cls):
        assert_bit_identical(a, b)
    if momentum:
        for buf, run in zip(bufs, opt.state[0]["runs"]):
            assert_bit_identical(buf.reshape(-1), run["momentum_buffer"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_single_arrays(backend):
    """One ndarray per argument works like a one-element list."""
    rng = np.random.default_rng(2)
    w = rng_array(rng, (4, 3), np.float64)
    w2 = w.copy()
    m, v = np.zeros_like(w), np.zeros_like(w)
    opt = fastopt.AdamW(w2, lr=1e-2, backend=backend)
    for t in range(1, 6):
        g = rng_array(rng, (4, 3), np.float64)
        F.adamw(w, g, m, v, step=t, lr=1e-2, backend=backend)
        opt.step(g)
    assert_bit_identical(w, w2)
    b, b2 = w.copy(), w.copy()
    buf = np.zeros_like(b)
    sgd = fastopt.SGD([b2], lr=0.1, momentum=0.5, backend=backend)
    for t in range(3):
        g = rng_array(rng, (4, 3), np.float64)
        F.sgd(b, g, buf, lr=0.1, momentum=0.5, first_step=t == 0, backend=backend)
        sgd.step([g])
    assert_bit_identical(b, b2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_grad_scale_is_a_gradient_multiplier(backend):
    rng = np.random.default_rng(3)
    p = rng_array(rng, 30, np.float32)
    g = rng_array(rng, 30, np.float32)
    a, b = p.copy(), p.copy()
    ma, va, mb, vb = (np.zeros_like(p) for _ in range(4))
    F.adam(a, g, ma, va, step=1, grad_scale=0.25, lr=0.1, backend=backend)
    F.adam(b, g * np.float32(0.25), mb, vb, step=1, lr=0.1, backend=backend)
    assert_bit_identical(a, b)
    assert_bit_identical(ma, mb)


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_flatarrays_one_call(monkeypatch, backend):
    """All-FlatArrays arguments: one kernel call over the whole buffer."""
    init, grads = problem(np.float32)
    params = fastopt.pack(init)
    m, v = params.zeros_like(), params.zeros_like()
    module = get_backend(backend)
    calls = []
    real = module.adam_update
    monkeypatch.setattr(module, "adam_update",
                        lambda p, *a: (calls.append(p.size), real(p, *a))[1])
    F.adam(params, fastopt.pack(grads[0]), m, v, step=1, backend=backend)
    assert calls == [params.data.size]
    # Mixed FlatArrays and lists: per tensor.
    F.adam(params, grads[1], m, v, step=2, backend=backend)
    assert calls[1:] == [int(np.prod(s)) for s in SHAPES]


def test_functional_adam_first_step_is_lr_sized():
    """Sanity anchor: Adam's first step moves each weight by lr * sign(g)."""
    p = np.zeros(4)
    g = np.array([3.0, -0.5, 1e-3, -7.0])
    F.adam(p, g, np.zeros(4), np.zeros(4), step=1, lr=0.1, eps=1e-12)
    np.testing.assert_allclose(p, -0.1 * np.sign(g), rtol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_sgd_first_step_ignores_what_the_buffer_held(backend):
    # buf = 0 * buf + g: an np.empty_like buffer's NaN made the params NaN
    p, g = np.ones(3), np.ones(3)
    buf = np.full(3, np.nan)
    F.sgd(p, g, buf, lr=0.1, momentum=0.9, first_step=True, backend=backend)
    np.testing.assert_array_equal(buf, [1.0, 1.0, 1.0])
    np.testing.assert_allclose(p, [0.9, 0.9, 0.9])


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_flatarrays_checked_as_their_buffers(backend):
    """Each view of each argument was checked on every call (2000 tensors:
    250x the class step); a read-only buffer, whose views still say
    writable, was written (state first, then the params raised)."""
    shapes = [(2, 3), (4,), (1,)]
    P = fastopt.flat_zeros(shapes, np.float64)
    G, M, V = P.zeros_like(), P.zeros_like(), P.zeros_like()
    G.data[:] = 1.0
    P.data.flags.writeable = False
    with pytest.raises(ValueError, match=r"params.data is read-only"):
        F.adam(P, G, M, V, step=1, lr=0.1, backend=backend)
    assert not M.data.any() and not V.data.any()
    P.data.flags.writeable = True
    other = fastopt.flat_zeros([(2, 3), (3,), (2,)], np.float64)
    with pytest.raises(ValueError, match=r"exp_avgs\[1\] has shape \(3,\) but params\[1\] "
                                         r"has shape \(4,\)"):
        F.adam(P, G, other, V, step=1, lr=0.1, backend=backend)
    with pytest.raises(TypeError, match="exp_avg_sqs is float32 but params is float64"):
        F.adam(P, G, M, fastopt.flat_zeros(shapes, np.float32), step=1, lr=0.1,
               backend=backend)
    assert not P.data.any() and not M.data.any()
    F.adam(P, G, M, V, step=1, lr=0.1, backend=backend)
    np.testing.assert_allclose(P.data, -0.1)


def test_flat_arrays_refuse_negative_and_fractional_dimensions():
    # -1 made views that overlapped (a write to one showed in another)
    with pytest.raises(ValueError, match=r"shapes\[1\] has a negative dimension, -1"):
        fastopt.flat_zeros([(3,), (-1,), (2,)])
    with pytest.raises(TypeError, match=r"shapes\[0\] must hold ints, got 2.7"):
        fastopt.FlatArrays(np.zeros(2), [(2.7,)])
    assert fastopt.flat_zeros([3, (np.int64(2), 2)]).shapes == ((3,), (2, 2))


def test_a_class_optimizer_refuses_a_read_only_packed_buffer():
    P = fastopt.flat_zeros([(3,), (2,)])
    P.data.flags.writeable = False
    with pytest.raises(ValueError, match=r"FlatArrays whose buffer \(.data\) is read-only"):
        fastopt.AdamW(P)
