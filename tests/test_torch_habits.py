"""Habits a torch user brings (a user trial's findings): named_parameters()
pairs, gradients as dict.values() or a generator, torch's implementation
switches."""

import numpy as np
import pytest

import fastopt


def _params():
    return {"W": np.linspace(-1, 1, 6).reshape(2, 3), "b": np.zeros(3)}


def _grads(seed):
    rng = np.random.default_rng(seed)
    return {"W": rng.normal(size=(2, 3)), "b": rng.normal(size=3)}


def _run(make_opt, feed, steps=3):
    params = _params()
    opt = make_opt(params)
    for s in range(steps):
        opt.step(feed(_grads(s)))
    return params, opt


def test_gradients_as_values_or_a_generator_step_as_a_list():
    want, _ = _run(lambda p: fastopt.Adam(list(p.values()), lr=0.1), lambda g: list(g.values()))
    for feed in (lambda g: g.values(), lambda g: (x for x in g.values()), lambda g: iter(
            list(g.values()))):
        got, opt = _run(lambda p: fastopt.Adam(p.values(), lr=0.1), feed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
        assert opt.iterations == 3


def test_named_parameters_pairs_are_params_by_name():
    want, ref = _run(lambda p: fastopt.Adam(p, lr=0.1), lambda g: g)
    got, opt = _run(lambda p: fastopt.Adam(iter(list(p.items())), lr=0.1), lambda g: g)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    assert opt.state_dict()["param_groups"][0]["params"] == \
        ref.state_dict()["param_groups"][0]["params"]          # names recorded
    np.testing.assert_array_equal(opt.param_state("b")["exp_avg"], ref.param_state("b")["exp_avg"])


def test_gradients_as_name_pairs_are_read_by_name():
    """``[(n, p.grad) for n, p in named_parameters()]``: as a dict, in any order
    (it said "grads['W'] must be an ndarray, got tuple")."""
    want, _ = _run(lambda p: fastopt.Adam(p, lr=0.1), lambda g: g)
    for make in (lambda p: fastopt.Adam(p, lr=0.1),
                 lambda p: fastopt.Adam(list(p.items()), lr=0.1)):
        got, _ = _run(make, lambda g: list(reversed(list(g.items()))))
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    with pytest.raises(TypeError, match=r"must be a list of arrays in param order"):
        fastopt.Adam(list(_params().values())).step(list(_grads(0).items()))


@pytest.mark.parametrize("loss", [0.5, np.float64(0.5), np.array(0.5)])
def test_a_loss_and_grads_pair_is_named(loss):
    """``opt.step(loss_and_grads(...))``: the pair was read as the grads by
    position ("grads['W'] has shape () but params['W'] has shape (2, 3)")."""
    params = _params()
    opt = fastopt.Adam(params, lr=0.1)
    for grads in (_grads(0), list(_grads(0).values())):
        with pytest.raises(TypeError, match=r"a \(loss, grads\) pair\? step\(\) takes the "
                                            r"gradients alone"):
            opt.step((loss, grads))
    np.testing.assert_array_equal(params["b"], 0.0)


def test_named_pairs_with_a_repeated_name_refused():
    p = _params()
    with pytest.raises(ValueError, match=r"the name 'W' comes more than once"):
        fastopt.Adam([("W", p["W"]), ("W", p["b"])])


@pytest.mark.parametrize("switch", ["fused", "foreach", "capturable", "differentiable"])
def test_torch_implementation_switches_say_to_drop_them(switch):
    with pytest.raises(TypeError, match=rf"'{switch}': torch's switch .* drop it"):
        fastopt.AdamW([np.ones(3)], **{switch: True})


def test_values_of_a_dict_in_another_order_are_read_by_name():
    """Params given by name, gradients as g.values() of a dict built in
    another order: read by name (by position they went to the wrong params,
    without a word, where shapes agreed), in the planned step too."""
    one = np.ones(3)
    params = {"W1": np.zeros(3), "W2": np.zeros(3)}
    opt = fastopt.SGD(params, lr=1.0)
    for k in range(1, 4):
        opt.step({"W2": 2 * one, "W1": one}.values())
        np.testing.assert_array_equal(params["W1"], -k * one)
        np.testing.assert_array_equal(params["W2"], -2 * k * one)
    # a generator is read in its order, as a list is
    opt.step(g for g in (one, 2 * one))
    np.testing.assert_array_equal(params["W1"], -4 * one)


def test_sync_master_values_by_name_from_values():
    bf16 = pytest.importorskip("ml_dtypes").bfloat16
    params = {"a": np.zeros(4, bf16), "b": np.zeros(5, bf16)}
    opt = fastopt.SGD(params, lr=0.1)
    opt.sync_master({"b": np.full(5, 2.0, np.float32), "a": np.full(4, 1.0, np.float32)}.values())
    assert (opt.param_state("a")["master"] == 1).all() and (params["b"] == 2).all()
