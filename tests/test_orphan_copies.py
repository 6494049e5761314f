"""An optimizer pickled or deep-copied without its params (fastopt/optim/orphans.py).

Pickled on its own beside weights saved with ``np.savez``, the optimizer's
steps went to its own copies of the params, and the user's arrays never
moved, without a word. Its first step now warns when nothing outside it
holds its params, and never when the user holds them (a variable, a
container, an attribute, a view), whatever the layout.
"""

from __future__ import annotations

import copy
import pickle
import warnings

import numpy as np
import pytest

import fastopt

LAYOUTS = ["array", "list", "dict of layers", "param groups", "FlatArrays"]
WARNING = "unpickled or copied without the arrays it updates"


def _make(layout, n=3):
    """(params as given, grads for them), arrays of about ``n`` elements"""
    if layout == "array":
        return np.ones(n), np.ones(n)
    if layout == "list":
        return [np.ones(n), np.zeros(2)], [np.ones(n), np.ones(2)]
    if layout == "dict of layers":
        return ({"l1": {"W": np.ones((2, n)), "b": np.zeros(n)}},
                {"l1": {"W": np.ones((2, n)), "b": np.ones(n)}})
    if layout == "param groups":
        # (a betas tuple shared with the caller's code: not a sign of the params held)
        return ([{"params": [np.ones(n)], "betas": (0.8, 0.9)}, {"params": [np.zeros(2)]}],
                [np.ones(n), np.ones(2)])
    flat = fastopt.pack([np.ones(n), np.zeros(2)])
    grads = flat.zeros_like()
    grads.data[:] = 1.0
    return flat, grads


#: small arrays, and arrays NumPy unpickles over a bytes object (past about
#: 100 elements): memory another object owns, which the check had left alone
SIZES = [3, 4096]


def _copy(obj, how):
    return copy.deepcopy(obj) if how == "deepcopy" else pickle.loads(pickle.dumps(obj))


def _first_step_warns(opt, grads) -> bool:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step(grads)
    return any(WARNING in str(w.message) for w in caught)


def _array_of(params):
    """One of the arrays the params hold."""
    while not isinstance(params, np.ndarray):
        params = (params["params"] if isinstance(params, dict) and "params" in params
                  else next(iter(params.values())) if isinstance(params, dict) else params[0])
    return params


class _Model:
    pass


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_copy_alone_warns_at_its_first_step_only(layout, how, n):
    params, grads = _make(layout, n)
    opt = fastopt.Adam(params, lr=0.1)
    opt.step(grads)
    assert not _first_step_warns(opt, grads)        # (not a copy: never checked)
    twin = _copy(opt, how)
    before = np.array(_array_of(twin._given), copy=True)
    assert _first_step_warns(twin, grads)
    assert not np.array_equal(_array_of(twin._given), before)   # it stepped as usual
    assert not _first_step_warns(twin, grads)


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("held", ["variable", "attribute", "view of one array"])
@pytest.mark.parametrize("n", SIZES)
def test_a_copy_whose_params_the_user_holds_does_not_warn(layout, how, held, n):
    params, grads = _make(layout, n)
    opt = fastopt.Adam(params, lr=0.1)
    opt.step(grads)
    mine, twin = _copy((params, opt), how)
    keep = None
    if held == "attribute":
        keep = _Model()
        keep.params, mine = mine, None
    elif held == "view of one array":
        keep, mine = _array_of(mine)[:1], None
    assert not _first_step_warns(twin, grads)
    assert keep is not None or mine is not None


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_a_copy_whose_param_list_the_user_reads_does_not_warn(how):
    """Holding the copy's own list of arrays (its param_groups) is holding them."""
    params, grads = _make("list")
    opt = fastopt.Adam(params, lr=0.1)
    opt.step(grads)
    twin = _copy(opt, how)
    arrays = twin.param_groups[0]["params"]
    assert not _first_step_warns(twin, grads)
    assert arrays[0] is twin.param_groups[0]["params"][0]


def test_the_warning_names_the_ways_out_and_the_refusals_say_them_too():
    p = {"W": np.ones(3)}
    opt = fastopt.Adam(p, lr=0.1)
    opt.step({"W": np.ones(3)})
    saved = pickle.dumps(opt)
    twin = pickle.loads(saved)
    with pytest.warns(UserWarning, match=r"Pickle the params with it .*load_state_dict"):
        twin.step({"W": np.ones(3)})
    mine = {"W": np.ones(3)}
    with pytest.raises(ValueError, match=r"not the arrays this Adam updates.*was unpickled "
                                         r"or copied.*make a new Adam over them and "
                                         r"load_state_dict"):
        twin.step({"W": np.ones(3)}, params=mine)
    with pytest.raises(RuntimeError, match=r"already has its params.*was unpickled or copied"):
        twin.bind(mine)
    # the way out it names: a new optimizer over the user's arrays
    fresh = fastopt.Adam(mine, lr=0.1)
    fresh.load_state_dict(twin.state_dict())
    fresh.step({"W": np.ones(3)})
    assert fresh.state_dict()["state"][0]["step"] == twin.state_dict()["state"][0]["step"] + 1
    assert not np.array_equal(mine["W"], np.ones(3))
    # an optimizer never copied says nothing of copies
    with pytest.raises(RuntimeError) as info:
        opt.bind(mine)
    assert "copied" not in str(info.value)


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_sam_and_lbfgs_copies_are_checked_too(how):
    p = [np.ones(3)]
    sam = fastopt.SAM(fastopt.SGD(p, lr=0.1), rho=0.05)
    sam.perturb([np.ones(3)])
    sam.step([np.ones(3)])
    with pytest.warns(UserWarning, match=r"this SAM was " + WARNING):
        _copy(sam, how).perturb([np.ones(3)])
    mine, twin = _copy((p, sam), how)
    assert not _first_warns(lambda: twin.perturb([np.ones(3)]))
    lbfgs = fastopt.LBFGS([np.ones(3)])
    copied = _copy(lbfgs, how)

    def closure():
        x = copied.param_groups[0]["params"][0]
        return float((x ** 2).sum()), [2 * x]
    with pytest.warns(UserWarning, match=r"this LBFGS was " + WARNING):
        copied.step(closure)
    assert mine[0] is twin.base_optimizer.param_groups[0]["params"][0]


def _first_warns(call) -> bool:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return any(WARNING in str(w.message) for w in caught)


def _layers(rng):
    return [{"W": rng.standard_normal((6, 4)), "b": np.zeros(4)},
            {"W": rng.standard_normal((4, 2)), "b": np.zeros(2)}]


def _layer_grads(layers):
    return [{k: np.full_like(v, 1e-2) for k, v in d.items()} for d in layers]


def _no_decay_on_vectors(name, a):
    return {"weight_decay": 0.0} if a.ndim == 1 else None


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_of_group_params_optimizer_with_its_params_does_not_warn(how):
    # the groups' dicts are new: the user's list they were made from is
    # what holds the arrays, and it was not counted (every copy warned)
    params = _layers(np.random.default_rng(0))
    opt = fastopt.AdamW(fastopt.group_params(params, _no_decay_on_vectors), lr=1e-2)
    for _ in range(20):
        opt.step(_layer_grads(params))
    p2, opt2 = (copy.deepcopy((params, opt)) if how == "deepcopy"
                else pickle.loads(pickle.dumps((params, opt))))
    before = p2[0]["W"].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(40):
            opt2.step(_layer_grads(p2))
    assert not np.array_equal(p2[0]["W"], before)


def test_groups_held_only_while_the_optimizer_was_made_do_not_warn_later():
    # an estimator's fit(): the groups in a local variable through the first
    # steps, the model on self; a second fit warned "replaced"
    class Est:
        def fit(self):
            if not hasattr(self, "layers_"):
                self.layers_ = _layers(np.random.default_rng(1))
                groups = fastopt.group_params(self.layers_, _no_decay_on_vectors)
                self.opt_ = fastopt.AdamW(groups, lr=1e-2)
            for _ in range(40):
                self.opt_.step(_layer_grads(self.layers_))
    est = Est()
    est.fit()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        est.fit()
    # the model itself rebound (not the arrays in it): said, as without groups
    est.layers_ = _layers(np.random.default_rng(2))
    with pytest.warns(UserWarning, match="held by nothing outside it"):
        for _ in range(70):
            est.opt_.step(_layer_grads(est.layers_))
