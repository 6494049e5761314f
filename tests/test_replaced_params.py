"""A param the user's code replaced after the optimizer was made over it
(``layer.W = rng.normal(...)`` in a notebook cell run again): the optimizer
went on stepping the old array, which nothing reads, and the new one never
trained, without a word (fastopt/optim/orphans.py). The step now checks,
at step counts 16, 32, 64, ..., and warns naming the param; a refused
step (a gradient of the new array's dtype or shape) says which param was
replaced. Arrays the user never kept, or holds through something else
(the vector they are views of, a dict, a list), are no one's replacement:
no warning."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import fastopt
from fastopt.optim.orphans import CHECK_EVERY

from conftest import BACKENDS

WARNING = "is held by nothing outside it"


class Layer:
    def __init__(self, rng, n):
        self.W = rng.standard_normal((n, n)).astype(np.float32)
        self.b = np.zeros(n, np.float32)


def _steps(opt, layer, n):
    """``n`` steps; the warnings they gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(n):
            opt.step([layer.W * 0.1, layer.b + 0.1])
    return [str(w.message) for w in caught if WARNING in str(w.message)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_replaced_attribute_is_named_within_the_steps_it_has_run(backend):
    rng = np.random.default_rng(0)
    layers = [Layer(rng, 8) for _ in range(3)]
    opts = [fastopt.Adam([L.W, L.b], lr=1e-2, backend=backend) for L in layers]
    for L, opt in zip(layers, opts):
        assert _steps(opt, L, 20) == []
    layers[1].W = rng.standard_normal((8, 8)).astype(np.float32)   # "start afresh"
    new = layers[1].W.copy()
    # checked as step count 32 starts: the 13th step after the replacement
    assert _steps(opts[1], layers[1], 12) == []
    caught = _steps(opts[1], layers[1], 1)
    assert len(caught) == 1
    assert caught[0].startswith("params[0] of this Adam, a float32[8, 8] array")
    assert "layer.W[...] = " in caught[0] and "Make the optimizer again" in caught[0]
    np.testing.assert_array_equal(layers[1].W, new)    # (what it warns about)
    assert _steps(opts[1], layers[1], 64) == []        # once
    for L, opt in zip([layers[0], layers[2]], [opts[0], opts[2]]):
        assert _steps(opt, L, 20) == []


@pytest.mark.parametrize("replaced_at", [1, 12])
def test_an_attribute_replaced_before_the_first_check_is_named_there(replaced_at):
    """An estimator's ``partial_fit`` re-initialising ``self.coef_`` a few
    steps in, ``self.intercept_`` kept: the first check (step 16) finds one
    param no one holds beside one held, and names it."""
    L = Layer(np.random.default_rng(3), 4)
    opt = fastopt.Adam([L.W, L.b], lr=1e-2)
    assert _steps(opt, L, replaced_at) == []
    L.W = np.zeros((4, 4), np.float32)
    assert _steps(opt, L, 16 - replaced_at) == []       # step counts up to 15
    caught = _steps(opt, L, 1)                          # as step count 16 starts
    assert len(caught) == 1 and caught[0].startswith("params[0] of this Adam, a float32[4, 4]")
    assert _steps(opt, L, 40) == []                     # once


def test_params_all_replaced_before_the_first_check_are_not_told_from_never_kept():
    """Every param no one's at the first check: an optimizer over arrays no
    one keeps looks the same, and is left alone."""
    L = Layer(np.random.default_rng(4), 4)
    opt = fastopt.Adam([L.W, L.b], lr=1e-2)
    _steps(opt, L, 3)
    L.W, L.b = np.zeros((4, 4), np.float32), np.zeros(4, np.float32)
    assert _steps(opt, L, 40) == []


def test_one_optimizer_over_every_layer_names_the_one_replaced():
    rng = np.random.default_rng(1)
    layers = [Layer(rng, 4) for _ in range(3)]
    opt = fastopt.Adam([a for L in layers for a in (L.W, L.b)])

    def step(n):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(n):
                opt.step([g for L in layers for g in (L.W * 0.1, L.b + 0.1)])
        return [str(w.message) for w in caught if WARNING in str(w.message)]

    assert step(20) == []
    layers[2].b = np.ones(4, np.float32)
    assert step(12) == []
    caught = step(1)            # checked as step count 32 starts
    assert len(caught) == 1 and caught[0].startswith("params[5] of this Adam")


def test_arrays_held_otherwise_or_never_kept_give_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        theta = np.zeros(10)                    # views of a vector the user holds
        opt = fastopt.SGD([theta[:5], theta[5:]], lr=0.1)
        for _ in range(40):
            opt.step([np.ones(5), np.ones(5)])
        np.testing.assert_allclose(theta, -4.0)
        model = {"W": np.ones((2, 2)), "b": np.zeros(2)}     # a dict, held
        opt = fastopt.Adam(model)
        for _ in range(40):
            opt.step({"W": np.ones((2, 2)), "b": np.ones(2)})
        buf = bytearray(128)        # memory another object owns, viewed anew each step
        W = np.frombuffer(buf, np.float64).reshape(4, 4)
        opt = fastopt.SGD([W], lr=0.1)
        for _ in range(20):
            opt.step([np.ones((4, 4))])
            W = np.frombuffer(buf, np.float64).reshape(4, 4)
        np.testing.assert_allclose(W, -2.0)
        toy = fastopt.SGD([np.ones(3)], lr=0.1)     # never kept: read back from the groups
        for _ in range(40):
            toy.step([np.ones(3)])
        np.testing.assert_allclose(toy.param_groups[0]["params"][0], -3.0)


def test_the_checks_thin_out_to_one_in_check_every(monkeypatch):
    from fastopt.optim import base
    seen = []
    count = base.reference_counts
    opt = fastopt.SGD([np.ones(3)], lr=0.1)
    monkeypatch.setattr(base, "reference_counts",
                        lambda o: seen.append(o.iterations) or count(o))
    for _ in range(40):
        opt.step([np.ones(3)])
    assert seen == [16, 32]
    del seen[:]
    opt.iterations = 3 * CHECK_EVERY - 1
    for _ in range(CHECK_EVERY + 2):
        opt.step([np.ones(3)])
    assert seen == [3 * CHECK_EVERY - 1, 4 * CHECK_EVERY - 1]


def test_only_a_fallen_reference_count_runs_the_whole_check(monkeypatch):
    from fastopt.optim import orphans
    whole = []
    unheld = orphans.unheld
    monkeypatch.setattr(orphans, "unheld", lambda opt, owner=None: whole.append(
        opt.iterations) or unheld(opt, owner))
    L = Layer(np.random.default_rng(4), 4)
    opt = fastopt.Adam([L.W, L.b])
    assert _steps(opt, L, 40) == []
    assert whole == [16]                # the first check's, then counts only
    L.W = np.zeros((4, 4), np.float32)
    assert len(_steps(opt, L, 40)) == 1
    assert whole == [16, 64]


def test_a_refused_step_says_which_param_was_replaced():
    rng = np.random.default_rng(2)
    L = Layer(rng, 6)
    opt = fastopt.Adam([L.W, L.b])
    _steps(opt, L, 17)                  # checked at step count 16
    L.W = rng.standard_normal((6, 6))           # float64: .astype forgotten
    with pytest.raises(TypeError, match=r"has dtype float64.*nothing outside this Adam holds "
                                        r"params\[0\] any more"):
        opt.step([L.W * 0.1, L.b + 0.1])
    L.W = rng.standard_normal((7, 6)).astype(np.float32)
    with pytest.raises(ValueError, match=r"has shape \(7, 6\).*holds params\[0\] any more"):
        opt.step([L.W * 0.1, L.b + 0.1])
    # a plain refusal of an optimizer whose params are held says nothing more
    M = Layer(rng, 6)
    held = fastopt.Adam([M.W, M.b])
    _steps(held, M, 17)
    with pytest.raises(ValueError) as refused:
        held.step([np.ones((7, 6), np.float32), M.b])
    assert "any more" not in str(refused.value)


def test_a_mixed_dtype_group_names_the_odd_array():
    with pytest.raises(ValueError, match=r"its params\[1\] is float64.*\.astype"):
        fastopt.Adam([np.ones(3, np.float32), np.ones(2), np.ones(4, np.float32)])


def test_an_interrupt_during_the_check_leaves_the_optimizer_as_it_was(monkeypatch):
    from fastopt.optim import orphans
    L = Layer(np.random.default_rng(3), 4)
    opt = fastopt.Adam([L.W, L.b])
    _steps(opt, L, 16)                  # step count 16: the next one checks
    before = [L.W.copy(), L.b.copy()], opt.state_dict()

    def interrupted(opt, owner=None):
        raise KeyboardInterrupt
    monkeypatch.setattr(orphans, "unheld", interrupted)
    opt._held_counts = None             # (as if a count had fallen: the whole check)
    with pytest.raises(KeyboardInterrupt):
        opt.step([L.W * 0.1, L.b + 0.1])
    monkeypatch.undo()
    np.testing.assert_array_equal(L.W, before[0][0])
    np.testing.assert_array_equal(L.b, before[0][1])
    after = opt.state_dict()
    assert after["iterations"] == before[1]["iterations"] == 16
    for a, b in zip(after["state"], before[1]["state"]):
        for k in a["buffers"]:
            np.testing.assert_array_equal(a["buffers"][k], b["buffers"][k])
    _steps(opt, L, 1)                   # and it goes on
    assert opt.iterations == 17


def test_an_optimizer_bound_at_its_first_step_is_checked_from_then_on():
    L = Layer(np.random.default_rng(5), 4)
    opt = fastopt.Adam(lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(20):
            opt.step([L.W * 0.1, L.b + 0.1], params=[L.W, L.b])
    L.b = np.zeros(4, np.float32)
    assert _steps(opt, L, 12) == []             # step counts 20-31: no check
    caught = _steps(opt, L, 1)                  # 32: checked
    assert [m[:30] for m in caught] == ["params[1] of this Adam, a floa"]


@pytest.mark.parametrize("warm_up", [1, 5, 15])
def test_params_a_setup_function_let_go_of_after_warm_up_steps_are_no_ones(warm_up):
    """A benchmark's setup makes the params, the optimizer and a few warm-up
    steps, and keeps only the step: nothing was replaced."""
    def setup():
        params = [np.ones(8) for _ in range(3)]
        grads = [np.ones(8) for _ in range(3)]
        opt = fastopt.AdamW(params, lr=1e-3)
        for _ in range(warm_up):
            opt.step(grads)
        return lambda: opt.step(grads)

    def setup_over_a_layer():
        L = Layer(np.random.default_rng(9), 4)     # held through its attributes
        opt = fastopt.Adam([L.W, L.b])
        for _ in range(warm_up):
            opt.step([L.W * 0.1, L.b + 0.1])
        return lambda: opt.step([np.ones((4, 4), np.float32), np.ones(4, np.float32)])
    steps = [setup(), setup_over_a_layer()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(600):
            for step in steps:
                step()


def test_one_optimizer_per_layer_over_views_of_one_vector_sees_it_replaced():
    """Each per-layer optimizer's views refer to the vector the user packed:
    each took the others' references for the user's, and never saw the
    vector replaced. The optimizers over the same buffers are judged together."""
    rng = np.random.default_rng(11)
    theta = rng.standard_normal(20)
    views = [theta[:10], theta[10:]]
    opts = [fastopt.Adam([v], lr=1e-2) for v in views]

    def steps(n):
        for _ in range(n):
            for opt in opts:
                opt.step([np.ones(10)])
    assert _warned_in(lambda: steps(40)) == []
    del views                   # the vector alone held: no one's replacement
    assert _warned_in(lambda: steps(40)) == []
    theta = np.zeros(20)        # re-initialised: the optimizers step the old one
    caught = _warned_in(lambda: steps(60))      # (step counts 80-139: checked at 128)
    assert [m[:32] for m in caught] == ["params[0] of this Adam, a float6"] * 2
    # held through views alone (not the vector): still held
    theta = rng.standard_normal(20)
    views = [theta[:10], theta[10:]]
    opts = [fastopt.Adam([v], lr=1e-2) for v in views]
    del theta
    assert _warned_in(lambda: steps(40)) == []


def _warned_in(steps) -> list:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        steps()
    return [str(w.message) for w in caught if WARNING in str(w.message)]


def test_a_whole_dict_vector_or_packed_buffer_replaced_is_named():
    rng = np.random.default_rng(6)
    p = {"W": rng.standard_normal((5, 3)), "b": np.zeros(3)}
    by_name = fastopt.Adam(p)
    theta = rng.standard_normal(18)
    views = fastopt.Adam([theta[:15].reshape(5, 3), theta[15:]])
    packed = fastopt.pack([rng.standard_normal((5, 3)), np.zeros(3)])
    flat = fastopt.Adam(packed)

    def steps(n):
        for _ in range(n):
            by_name.step({k: np.ones(v.shape) for k, v in p.items()})
            views.step([np.ones((5, 3)), np.ones(3)])
            flat.step([np.ones(a.shape) for a in packed])
    assert _warned_in(lambda: steps(20)) == []
    p = {k: v.copy() for k, v in p.items()}          # p = dict(np.load(...)), say
    theta = theta.copy()
    packed = fastopt.pack([a.copy() for a in packed])
    caught = _warned_in(lambda: steps(20))
    assert [m[:32] for m in caught] == ["params['W'] (and 1 more) of this",
                                        "params[0] (and 1 more) of this A",
                                        "params[0] (and 1 more) of this A"]


def test_the_users_own_attributes_on_the_optimizer_hold_the_params():
    """An attribute the user hangs on the optimizer (or a subclass's
    ``self.model``) is the user's reference, not the optimizer's."""
    rng = np.random.default_rng(8)

    class MyAdam(fastopt.Adam):
        def __init__(self, model, **kw):
            super().__init__([model["W"], model["b"]], **kw)
            self.model = model
    model = {"W": rng.standard_normal((5, 3)), "b": np.zeros(3)}
    opt = MyAdam(model)
    keep = model["W"]
    listed = [rng.standard_normal(3)]
    other = fastopt.SGD(list(listed), lr=0.1)
    other.callbacks = [("log", listed)]
    kept = listed[0]

    def steps(n):
        for _ in range(n):
            opt.step([np.ones((5, 3)), np.ones(3)])
            other.step([np.ones(3)])
    assert _warned_in(lambda: steps(5)) == []
    del keep, kept          # a reference let go: the whole check runs
    assert _warned_in(lambda: steps(60)) == []


def test_step_with_other_params_names_the_one_replaced():
    W, b = np.ones((3, 3)), np.zeros(3)
    opt = fastopt.Adam(lr=0.1)
    opt.step([W * 0, b * 0], params=[W, b])
    with pytest.raises(ValueError, match=r"params\[0\] is a new array: replaced"):
        opt.step([W * 0, b * 0], params=[np.ones((3, 3)), b])
    with pytest.raises(ValueError, match=r"params\[0\] is a new array: the same memory"):
        opt.step([W * 0, b * 0], params=[W[:], b])
    with pytest.raises(ValueError, match=r"\(1 array given, 2 updated\)"):
        opt.step([W * 0, b * 0], params=[W])


def test_an_optimizer_a_helper_made_in_a_setup_is_no_ones_replacement():
    """A review's cases of the first-step check that was tried: a helper
    making the optimizer inside a benchmark's setup (warned of a
    replacement), and a replacement right after the function that made and
    stepped the optimizer returned (missed)."""
    def make(params):
        return fastopt.Adam(params, lr=1e-2)

    def setup():
        params = [np.ones(8), np.zeros(8)]
        opt = make(params)
        for _ in range(5):
            opt.step([np.ones(8), np.ones(8)])
        return lambda: opt.step([np.ones(8), np.ones(8)])
    step = setup()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(300):
            step()

    class Model:
        W = None
    m = Model()
    m.W = np.ones(50)

    def train(model, n):
        opt = fastopt.Adam([model.W], lr=1e-2)
        for _ in range(n):
            opt.step([np.ones(50)])
        return opt
    opt = train(m, 40)
    m.W = np.zeros(50)
    caught = _warned_in(lambda: [opt.step([np.ones(50)]) for _ in range(40)])
    assert [w[:30] for w in caught] == ["params[0] of this Adam, a floa"]


def test_an_unhashable_optimizer_subclass_steps_and_is_checked():
    """A subclass with its own __eq__ (so no __hash__) failed every step once
    the check registered it in a set."""
    class MyAdam(fastopt.Adam):
        def __eq__(self, other):
            return self is other
    L = Layer(np.random.default_rng(12), 4)
    opt = MyAdam([L.W, L.b])
    assert _steps(opt, L, 20) == []
    L.W = np.zeros((4, 4), np.float32)
    assert len(_steps(opt, L, 20)) == 1
