"""Flat multi-tensor buffers and the one-kernel-call-per-group step."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

import fastopt
from conftest import BACKENDS, assert_bit_identical, count_list_steps, rng_array
from fastopt.backends import get_backend
from fastopt.params import FlatArrays, memory_runs

SHAPES = [(3, 4), (4,), (2, 3, 2), (), (0,), (5,)]


def sizes(shapes):
    return [int(np.prod(s)) for s in shapes]


# -- FlatArrays, pack, flat_zeros ------------------------------------------------

def test_pack_layout_and_views():
    rng = np.random.default_rng(0)
    arrays = [rng_array(rng, s, np.float32) for s in SHAPES]
    originals = [a.copy() for a in arrays]
    flat = fastopt.pack(arrays)
    assert isinstance(flat, FlatArrays) and isinstance(flat, tuple)
    assert len(flat) == len(SHAPES)
    assert flat.dtype == np.float32 and flat.data.dtype == np.float32
    assert flat.data.ndim == 1 and flat.data.flags.c_contiguous
    assert flat.data.size == sum(sizes(SHAPES))
    assert flat.shapes == tuple(tuple(s) for s in SHAPES)
    assert flat.offsets == tuple(np.concatenate([[0], np.cumsum(sizes(SHAPES))]).tolist())
    for i, (view, a) in enumerate(zip(flat, arrays)):
        assert view.shape == a.shape and view.dtype == a.dtype
        np.testing.assert_array_equal(view, a)
        # Each view lives at its offset in the one buffer.
        lo, hi = flat.offsets[i], flat.offsets[i + 1]
        np.testing.assert_array_equal(flat.data[lo:hi], a.reshape(-1))
        if view.size:   # NumPy points empty views at the buffer's start
            assert np.shares_memory(view, flat.data)
            assert (view.__array_interface__["data"][0]
                    == flat.data.__array_interface__["data"][0] + lo * 4)
    # Writing through a view writes the buffer, and the originals are copies.
    flat[0][1, 2] = 123.0
    assert flat.data[flat.offsets[0] + 6] == 123.0
    for a, o in zip(arrays, originals):
        assert_bit_identical(a, o)
    assert not np.shares_memory(flat.data, arrays[0])


def test_pack_dtype_promotion_and_override():
    a, b = np.ones(3, np.float32), np.arange(4, dtype=np.float64)
    assert fastopt.pack([a, b]).dtype == np.float64
    f32 = fastopt.pack([a, b], dtype=np.float32)
    assert f32.dtype == np.float32
    np.testing.assert_array_equal(f32[1], [0, 1, 2, 3])
    assert fastopt.pack([[1.0, 2.0], 3.0]).shapes == ((2,), ())
    with pytest.raises(ValueError, match="at least one array"):
        fastopt.pack([])
    # an int array (np.arange(3)) made an int64 pack, refused only by the
    # optimizer made from it; a float dtype asked for converts it
    with pytest.raises(TypeError, match=r"arrays\[0\] is int64; convert it, or pass dtype="):
        fastopt.pack([np.arange(3), np.arange(2)])
    assert fastopt.pack([np.arange(3)], dtype=np.float32).dtype == np.float32
    ml_dtypes = pytest.importorskip("ml_dtypes")       # 16-bit params pack as they are
    assert fastopt.pack([np.ones(3, ml_dtypes.bfloat16)]).dtype.name == "bfloat16"
    assert fastopt.pack([np.ones(3, np.float16)]).dtype == np.float16


def test_flat_zeros_refuses_one_shape_given_as_the_list_of_shapes():
    """flat_zeros((3, 2)) made two 1-D arrays, of 3 and 2 elements, for a
    user who meant one (3, 2) array; a list of ints stays a list of sizes."""
    with pytest.raises(TypeError, match=r"pass \[\(3, 2\)\] for one array of that shape, "
                                        r"or \[\(3,\), \(2,\)\] for 2 1-D arrays"):
        fastopt.flat_zeros((3, 2))
    assert fastopt.flat_zeros([(3, 2)]).shapes == ((3, 2),)
    assert fastopt.flat_zeros((3,)).shapes == ((3,),)      # either reading: one (3,) array
    assert fastopt.flat_zeros([3, 2]).shapes == ((3,), (2,))
    assert repr(fastopt.flat_zeros([(3, 2)])).startswith("FlatArrays(1 array, 6 elements")


def test_flat_zeros_and_zeros_like():
    z = fastopt.flat_zeros([(2, 2), 3, (1,)], np.float64)
    assert z.shapes == ((2, 2), (3,), (1,)) and z.dtype == np.float64
    assert z.data.size == 8 and not z.data.any()
    params = fastopt.pack([np.ones((3, 2), np.float32), np.ones(5, np.float32)])
    like = params.zeros_like()
    assert isinstance(like, FlatArrays)
    assert like.shapes == params.shapes and like.offsets == params.offsets
    assert like.dtype == params.dtype and not like.data.any()
    assert not np.shares_memory(like.data, params.data)
    assert fastopt.flat_zeros([(4,)]).dtype == np.float32   # the default


def test_flatarrays_checks_its_buffer():
    with pytest.raises(TypeError, match="contiguous 1-D ndarray"):
        FlatArrays(np.zeros((2, 3)), [(6,)])
    with pytest.raises(TypeError, match="contiguous 1-D ndarray"):
        FlatArrays(np.zeros(12)[::2], [(6,)])
    with pytest.raises(ValueError, match="shapes hold 5 elements but the buffer has 6"):
        FlatArrays(np.zeros(6), [(2, 2), (1,)])


def test_flatarrays_pickle_roundtrip_keeps_one_buffer():
    flat = fastopt.pack([np.arange(6.0).reshape(2, 3), np.arange(2.0)])
    back = pickle.loads(pickle.dumps(flat))
    assert isinstance(back, FlatArrays) and back.shapes == flat.shapes
    np.testing.assert_array_equal(back.data, flat.data)
    back[1][0] = -1
    assert back.data[6] == -1
    assert "2 arrays, 8 elements" in repr(flat)


# -- memory_runs -------------------------------------------------------------------

def test_memory_runs_consecutive_views_are_one_run():
    flat = fastopt.pack([np.ones((2, 3)), np.ones(4), np.ones((1, 2))])
    runs = memory_runs(list(flat))
    assert [(a, b) for a, b, _ in runs] == [(0, 3)]
    run = runs[0][2]
    assert run.ndim == 1 and run.size == flat.data.size and run.dtype == flat.dtype
    assert run.__array_interface__["data"][0] == flat.data.__array_interface__["data"][0]
    run[:] = 5.0   # a view, not a copy
    assert (flat.data == 5.0).all()


def test_memory_runs_separate_arrays_are_separate_runs():
    arrays = [np.ones((2, 3)), np.ones(4), np.ones(2)]
    runs = memory_runs(arrays)
    assert [(a, b) for a, b, _ in runs] == [(0, 1), (1, 2), (2, 3)]
    for (_, _, f), a in zip(runs, arrays):
        assert f.shape == (a.size,) and np.shares_memory(f, a)


def test_memory_runs_gaps_order_and_dtype_break_runs():
    flat = fastopt.pack([np.ones(3), np.ones(4), np.ones(5), np.ones(2)])
    # Out of order, or skipping a view, breaks the run.
    assert [(a, b) for a, b, _ in memory_runs([flat[1], flat[0], flat[2]])] == \
        [(0, 1), (1, 2), (2, 3)]
    assert [(a, b) for a, b, _ in memory_runs([flat[0], flat[2], flat[3]])] == \
        [(0, 1), (1, 3)]
    # A partial run followed by a separate array.
    other = np.ones(3)
    runs = memory_runs([flat[0], flat[1], other, flat[2], flat[3]])
    assert [(a, b) for a, b, _ in runs] == [(0, 2), (2, 3), (3, 5)]
    assert runs[0][2].size == 7 and runs[2][2].size == 7
    # Views of two different buffers that happen to be adjacent never merge.
    a, b = fastopt.pack([np.ones(2)]), fastopt.pack([np.ones(2)])
    assert len(memory_runs([a[0], b[0]])) == 2


def test_memory_runs_views_of_a_foreign_dtype_buffer():
    """Float views carved out of a byte arena: the run is viewed in the
    arrays' dtype, not the buffer's."""
    arena = np.zeros(80, np.uint8)
    a = arena[:40].view(np.float32)
    b = arena[40:].view(np.float32)
    runs = memory_runs([a, b])
    assert [(s, e) for s, e, _ in runs] == [(0, 2)]
    run = runs[0][2]
    assert run.dtype == np.float32 and run.size == 20
    run[:] = 2.0
    assert (a == 2.0).all() and (b == 2.0).all()
    # ... and an optimizer on such views steps them correctly.
    a[:], b[:] = 1.0, 2.0
    opt = fastopt.Adam([a, b], lr=0.1)
    opt.step([np.ones(10, np.float32), -np.ones(10, np.float32)])
    np.testing.assert_allclose(a, 0.9, rtol=1e-6)
    np.testing.assert_allclose(b, 2.1, rtol=1e-6)
    assert all(v.dtype == np.float32 for r in opt.state[0]["runs"] for v in r.values())


def test_memory_runs_empty_views_do_not_split_a_run():
    flat = fastopt.pack([np.ones(3), np.ones(0), np.ones((2, 0)), np.ones(2), np.ones(0)])
    runs = memory_runs(list(flat))
    assert [(s, e) for s, e, _ in runs] == [(0, 5)]
    assert runs[0][2].size == 5
    lead = fastopt.pack([np.ones(0), np.ones(2), np.ones(1)])
    assert [(s, e) for s, e, _ in memory_runs(list(lead))] == [(0, 3)]


def test_memory_runs_rows_of_a_2d_array():
    m = np.arange(12.0).reshape(3, 4)
    runs = memory_runs([m[0], m[1], m[2]])
    assert [(s, e) for s, e, _ in runs] == [(0, 3)]
    np.testing.assert_array_equal(runs[0][2], np.arange(12.0))


# -- one backend call per group ---------------------------------------------------

class CallCounter:
    """Wraps a backend function, recording the size of each call."""

    def __init__(self, fn):
        self.fn, self.sizes = fn, []

    def __call__(self, p, *args, **kwargs):
        # a table (one call over many arrays) or one array
        self.sizes.append(p.nelem if hasattr(p, "nelem") else p.size)
        return self.fn(p, *args, **kwargs)


def count_calls(monkeypatch, backend, *names):
    module = get_backend(backend)
    counters = {}
    for fn in names:
        counters[fn] = CallCounter(getattr(module, fn))
        monkeypatch.setattr(module, fn, counters[fn])
    if "step" in counters:        # the step plan's one-call steps of small tables
        count_list_steps(monkeypatch, module, counters["step"].sizes)
    return counters


MODEL = [(6, 5), (5,), (5, 4), (4,), (4, 3), (3,)]


def grad_sequence(dtype, steps=4, seed=0):
    rng = np.random.default_rng(seed)
    return [[rng_array(rng, s, dtype) for s in MODEL] for _ in range(steps)]


def native_calls(backend, kernel):
    """``(step function, norm function)`` a backend runs once per group:
    the table step of a compiled backend, else the per-array kernel (the
    NumPy reference walks the arrays)."""
    if getattr(get_backend(backend), "compiled_tables", False):
        return "step", "sumsq_table"
    return kernel, "sumsq"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,kernel,kwargs", [
    ("Adam", "adam_update", dict(lr=1e-2, amsgrad=True)),
    ("AdamW", "adam_update", dict(lr=1e-2)),
    ("SGD", "sgd_update", dict(lr=0.1, momentum=0.9)),
    ("SGD", "sgd_update", dict(lr=0.1)),
])
@pytest.mark.parametrize("max_grad_norm", [None, 1.0])
def test_one_native_call_per_group_whatever_the_layout(monkeypatch, backend, name, kernel,
                                                       kwargs, max_grad_norm):
    """Packed params with FlatArrays grads, separate arrays with new list
    grads, packed params with list grads: a compiled backend steps each
    group in one call (and, clipping two groups, takes one norm call per
    group, or none where the list step computes the norm in its call: list
    grads after the first step, Cython); the reference walks the arrays.
    Results are bit-identical."""
    dtype = np.float64
    init = [rng_array(np.random.default_rng(1), s, dtype) for s in MODEL]
    n = sum(sizes(MODEL))
    grads = grad_sequence(dtype)
    step_fn, norm_fn = native_calls(backend, kernel)
    compiled = step_fn == "step"
    group_sizes = [sum(sizes(MODEL[:4])), sum(sizes(MODEL[4:]))]
    per_step = group_sizes if compiled else sizes(MODEL)

    def run(params, as_flat):
        groups = [{"params": list(params[:4])}, {"params": list(params[4:]), "lr": 0.05}]
        opt = getattr(fastopt, name)(groups, backend=backend,
                                     max_grad_norm=max_grad_norm, **kwargs)
        counters = count_calls(monkeypatch, backend, step_fn, norm_fn)
        gbuf = fastopt.pack([np.zeros(s, dtype) for s in MODEL])
        for t, g in enumerate(grads):
            if as_flat:
                for view, x in zip(gbuf, g):
                    view[...] = x
                opt.step(gbuf)
            else:
                opt.step([x.copy() for x in g])      # new gradient arrays every step
            assert counters[step_fn].sizes == per_step * (t + 1)
            listed = not as_flat and hasattr(get_backend(backend), "list_step")
            assert counters[norm_fn].sizes == (
                [] if not max_grad_norm else per_step if listed else per_step * (t + 1))
        monkeypatch.undo()
        return opt

    packed = fastopt.pack(init)
    opt_flat = run(packed, as_flat=True)
    arrays = [a.copy() for a in init]
    opt_list = run(arrays, as_flat=False)
    packed2 = fastopt.pack(init)
    opt_mixed = run(packed2, as_flat=False)

    for p_flat, p_list, p_mixed in zip(packed, arrays, packed2):
        assert_bit_identical(p_flat, p_list)
        assert_bit_identical(p_mixed, p_list)
    assert opt_mixed.grad_norm == opt_list.grad_norm == opt_flat.grad_norm
    for gi in range(2):
        flat_state = opt_flat.state[gi]["flat"]
        assert set(flat_state) == set(opt_list.state[gi]["flat"])
        for key in flat_state:
            assert flat_state[key].size == group_sizes[gi]
            assert_bit_identical(flat_state[key], opt_list.state[gi]["flat"][key], key)
    assert sum(x.size for s in opt_list.state for x in s["flat"].values()) == \
        n * {"Adam": 3, "AdamW": 2, "SGD": 1 if kwargs.get("momentum") else 0}[name]


@pytest.mark.parametrize("backend", BACKENDS)
def test_flat_grads_layout_checked_once_then_cached(monkeypatch, backend):
    """The same FlatArrays object is not re-validated every step."""
    from fastopt import _validate

    params = fastopt.pack([np.ones((3, 3)), np.ones(3)])
    grads = params.zeros_like()
    opt = fastopt.SGD(params, lr=0.1, backend=backend)
    calls = []
    real = _validate.check_disjoint
    monkeypatch.setattr(_validate, "check_disjoint",
                        lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    for _ in range(3):
        opt.step(grads)
    assert len(calls) == 1
    # A new gradient object with the same layout is checked again.
    opt.step(grads.zeros_like())
    assert len(calls) == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_flat_grads_on_separate_params(backend):
    """FlatArrays gradients also drive an optimizer over separate arrays."""
    rng = np.random.default_rng(3)
    init = [rng_array(rng, s, np.float32) for s in MODEL]
    a = [x.copy() for x in init]
    b = [x.copy() for x in init]
    opt_a = fastopt.AdamW(a, lr=0.01, backend=backend)
    opt_b = fastopt.AdamW(b, lr=0.01, backend=backend)
    for g in grad_sequence(np.float32):
        opt_a.step(fastopt.pack(g))
        opt_b.step(g)
    for x, y in zip(a, b):
        assert_bit_identical(x, y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_tensor_keeps_one_call_per_step(monkeypatch, backend):
    """A zero-size tensor inside a packed model does not split the run."""
    params = fastopt.pack([np.ones((3, 2)), np.ones(0), np.ones(4), np.ones((0, 3))])
    grads = params.zeros_like()
    grads.data[:] = 1.0
    opt = fastopt.Adam(params, lr=0.1, backend=backend)
    step_fn, _ = native_calls(backend, "adam_update")
    counters = count_calls(monkeypatch, backend, step_fn)
    opt.step(grads)
    opt.step(grads)
    per_step = [10] if step_fn == "step" else [6, 0, 4, 0]
    assert counters[step_fn].sizes == per_step * 2
    np.testing.assert_allclose(params.data, 0.8, rtol=1e-7)   # two steps of lr * 1/(1 + eps)


def test_groups_out_of_memory_order_reject_flat_grads_but_accept_lists(backend):
    """Groups listing a packed buffer's views out of memory order make a
    FlatArrays of grads ambiguous (param order vs memory order): rejected,
    with nothing written; a list in param order still works."""
    P = fastopt.pack([np.full(3, 1.0), np.full(3, 2.0), np.full(3, 3.0)])
    opt = fastopt.SGD([{"params": [P[0], P[2]]}, {"params": [P[1]]}], lr=0.5,
                      backend=backend)
    G = P.zeros_like()
    G.data[:] = np.repeat([10.0, 20.0, 30.0], 3)
    before = P.data.copy()
    with pytest.raises(ValueError, match="out of memory order"):
        opt.step(G)
    np.testing.assert_array_equal(P.data, before)
    opt.step([G[0], G[2], G[1]])        # param order: P[0], P[2], P[1]
    np.testing.assert_allclose(P.data, before - 0.5 * G.data)


def test_pack_refuses_a_dict_it_would_have_packed_the_keys_of():
    import types
    for mapping in ({"W": np.ones(3), "b": np.ones(2)},
                    types.MappingProxyType({"W": np.ones(3)})):
        with pytest.raises(TypeError, match=r"pack\(\) takes a list of arrays, not a dict"):
            fastopt.pack(mapping)
