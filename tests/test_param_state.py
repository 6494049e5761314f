"""opt.param_state(p): one param's state as torch's opt.state[p] holds it,
and opt.state[p] refused with directions to it."""

import numpy as np
import pytest

import fastopt

from conftest import BACKENDS


def _model():
    rng = np.random.default_rng(0)
    return {"l1": {"W": rng.normal(size=(3, 4)), "b": np.zeros(4)},
            "l2": {"W": rng.normal(size=(4, 2)), "b": np.zeros(2)}}


def _grads(params, seed):
    rng = np.random.default_rng(seed)
    return {k: {n: rng.normal(size=a.shape) for n, a in layer.items()}
            for k, layer in params.items()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_torch_state_per_param(backend):
    torch = pytest.importorskip("torch")
    params = _model()
    groups = [{"params": {"l1": params["l1"]}}, {"params": {"l2": params["l2"]}, "lr": 0.01}]
    opt = fastopt.AdamW(groups, lr=0.1, weight_decay=0.1, backend=backend)
    flat = [a for layer in params.values() for a in layer.values()]
    tp = [torch.tensor(a.copy(), requires_grad=True) for a in flat]
    topt = torch.optim.AdamW([{"params": tp[:2]}, {"params": tp[2:], "lr": 0.01}], lr=0.1,
                             weight_decay=0.1)
    for s in range(3):
        g = _grads(params, s)
        opt.step(g)
        for t, x in zip(tp, [a for layer in g.values() for a in layer.values()]):
            t.grad = torch.from_numpy(x)
        topt.step()
    for a, t in zip(flat, tp):
        mine, theirs = opt.param_state(a), topt.state[t]
        assert mine["step"] == int(theirs["step"]) == 3
        assert set(mine) == {"step", "exp_avg", "exp_avg_sq"}
        for k in ("exp_avg", "exp_avg_sq"):
            assert mine[k].shape == a.shape
            np.testing.assert_allclose(mine[k], theirs[k].numpy(), rtol=1e-12)
    # by name too, and copies: writing one changes nothing
    by_name = opt.param_state("l2.W")
    np.testing.assert_array_equal(by_name["exp_avg"], opt.param_state(params["l2"]["W"])["exp_avg"])
    by_name["exp_avg"][...] = 7
    assert not (opt.param_state("l2.W")["exp_avg"] == 7).any()


def test_before_the_first_step_only_the_step():
    p = np.ones(3)
    opt = fastopt.Adam([p])
    assert opt.param_state(p) == {"step": 0}


@pytest.mark.parametrize("state_dtype", ["bfloat16", "int8"])
def test_compact_state_decoded(state_dtype):
    rng = np.random.default_rng(1)
    params = [rng.normal(size=(300,)).astype(np.float32),
              rng.normal(size=(20, 30)).astype(np.float32)]
    twin = [a.copy() for a in params]
    opt = fastopt.AdamW(params, state_dtype=state_dtype)
    ref = fastopt.AdamW(twin)
    for s in range(3):
        g = [rng.normal(size=a.shape).astype(np.float32) for a in params]
        opt.step(g)
        ref.step([x.copy() for x in g])
    for a, b in zip(params, twin):
        mine, exact = opt.param_state(a), ref.param_state(b)
        assert mine["exp_avg"].dtype == np.float32 and mine["exp_avg"].shape == a.shape
        # the decoded codes: within the format's rounding of float32 state
        tol = 2 ** -7 if state_dtype == "bfloat16" else 0.15
        for k in ("exp_avg", "exp_avg_sq"):
            err = np.abs(mine[k] - exact[k]) / np.abs(exact[k]).max()
            assert err.max() < tol, (k, err.max())


def test_16_bit_params_show_their_master_copy():
    p, q = np.ones(4, np.float16), np.ones(3, np.float32)
    opt = fastopt.Adam([p, q], lr=0.1)
    opt.step([np.ones(4, np.float16), np.ones(3, np.float32)])
    st = opt.param_state(p)
    assert st["master"].dtype == np.float32
    np.testing.assert_allclose(st["master"], 0.9, rtol=1e-6)
    assert "master" not in opt.param_state(q)        # a float32 param is its own


def test_torch_lookup_refused_with_directions():
    p = np.ones(3)
    opt = fastopt.Adam([p])
    opt.step([np.ones(3)])
    with pytest.raises(TypeError, match=r"opt\.param_state\(p\)"):
        opt.state[p]
    assert opt.state[0]["step"] == 1 and opt.state[-1] is opt.state[0]
    with pytest.raises(TypeError, match=r"opt\.param_state\(p\)"):     # a name too
        opt.state["W"]
    with pytest.raises(TypeError, match=r"not an index: opt\.param_state\(opt\.param_groups"):
        opt.param_state(0)
    with pytest.raises(ValueError, match="does not update that array"):
        opt.param_state(p.copy())
    with pytest.raises(ValueError, match=r"no param named 'W'"):
        opt.param_state("W")
    with pytest.raises(TypeError, match=r"takes one of the arrays, or its name .*not a list"):
        opt.param_state([p])


def test_a_key_path_names_a_nested_param():
    """``("l2", "W")`` as ``"l2.W"`` (it said "does not update that array
    (shape None)")."""
    p = {"l1": {"W": np.ones((2, 2))}, "l2": {"W": np.ones((2, 1))}}
    opt = fastopt.Adam(p)
    opt.step({"l1": {"W": np.ones((2, 2))}, "l2": {"W": np.full((2, 1), 2.0)}})
    np.testing.assert_array_equal(opt.param_state(("l2", "W"))["exp_avg"],
                                  opt.param_state("l2.W")["exp_avg"])
    assert opt.param_state(("l2", "W"))["exp_avg"].shape == (2, 1)
    with pytest.raises(ValueError, match=r"no param named 'l3\.W'.*its names: l1\.W, l2\.W"):
        opt.param_state(("l3", "W"))


def test_lbfgs_and_sam():
    p = np.ones(3)
    lb = fastopt.LBFGS([p])
    with pytest.raises(TypeError, match=r"state_dict\(\)\['lbfgs'\]"):
        lb.param_state(p)
    q = np.ones(3)
    sam = fastopt.SAM(fastopt.SGD([q], lr=0.1, momentum=0.9))
    sam.perturb([np.ones(3)])
    sam.step([np.ones(3)])
    st = sam.param_state(q)
    assert st["step"] == 1 and st["momentum_buffer"].shape == (3,)
    with pytest.raises(TypeError, match="param_state"):
        sam.state[q]


def test_a_dotted_name_two_params_share_is_refused_and_key_paths_are_exact():
    """{"a.b": x, "a": {"b": y}}: "a.b" names both (an optax port's trial
    found the flat key's state returned silently); a key path names one,
    integer keys included."""
    p = {"a.b": np.zeros(2), "a": {"b": np.zeros(3)}, "l": {0: np.zeros(4)}}
    opt = fastopt.Adam(p, lr=0.1)
    opt.step({"a.b": np.ones(2), "a": {"b": -np.ones(3)}, "l": {0: np.ones(4)}})
    assert opt.param_state(("a", "b"))["exp_avg"].shape == (3,)
    assert opt.param_state(("a.b",))["exp_avg"].shape == (2,)
    assert opt.param_state(("l", 0))["exp_avg"].shape == (4,)
    assert opt.param_state("l.0")["exp_avg"].shape == (4,)
    with pytest.raises(ValueError, match=r"'a\.b' names 2 params \(params\['a\.b'\], "
                                         r"params\['a'\]\['b'\]\): give the key path"):
        opt.param_state("a.b")
