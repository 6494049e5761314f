"""Params as NumPy code holds them: plain lists, dicts of names, nested dicts
of layers, optimizers made before their params, new gradient arrays every
step. Each is one compiled call per group and steps exactly like the
reference; bad gradients are refused by name with nothing written."""

from __future__ import annotations

import numpy as np
import pytest

import fastopt
from fastopt.backends import get_backend

from conftest import (BACKENDS, assert_bit_identical, assert_same_tree, count_native_steps,
                      optimizer_snapshot, rng_array)

SHAPES = {"layer1": {"W": (6, 5), "b": (5,)}, "layer2": {"W": (5, 3), "b": (3,)}}


def model(dtype, seed=0):
    rng = np.random.default_rng(seed)
    return {layer: {k: rng_array(rng, s, dtype) for k, s in d.items()}
            for layer, d in SHAPES.items()}


def grads_like(params, seed):
    """New gradient arrays, as a backward pass makes them each step."""
    rng = np.random.default_rng(seed)
    return {layer: {k: rng_array(rng, a.shape, a.dtype) for k, a in d.items()}
            for layer, d in params.items()}


def leaves(tree):
    return [a for d in tree.values() for a in d.values()]


def count_steps(monkeypatch, backend):
    module = get_backend(backend)
    if not getattr(module, "compiled_tables", False):
        return None
    return count_native_steps(monkeypatch, module)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("clip", [None, 0.5])
def test_nested_dicts_lists_and_packed_step_alike(monkeypatch, backend, dtype, clip):
    """The same model as nested dicts, as a plain list and packed: the same
    trajectory, bit for bit, in one compiled call per step."""
    named = model(dtype)
    plain = [a.copy() for a in leaves(named)]
    packed = fastopt.pack([a.copy() for a in plain])
    opts = [fastopt.AdamW(p, lr=1e-2, backend=backend, max_grad_norm=clip)
            for p in (named, plain, packed)]
    calls = count_steps(monkeypatch, backend)
    for t in range(4):
        g = grads_like(named, seed=t)
        norms = [opts[0].step(g), opts[1].step(leaves(g)),
                 opts[2].step(fastopt.pack(leaves(g)))]
        assert norms[0] == norms[1] == norms[2]
    if calls is not None:
        assert calls == [sum(a.size for a in plain)] * 12
    for a, b, c in zip(leaves(named), plain, packed):
        assert_bit_identical(a, b)
        assert_bit_identical(a, c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lists_match_the_reference(backend):
    rng = np.random.default_rng(4)
    shapes = [(1000,)] * 20 + [(3, 7), (1,), (0,), (40000,)]
    ref = [rng_array(rng, s, np.float32) for s in shapes]
    fast = [a.copy() for a in ref]
    o_ref = fastopt.SGD(ref, lr=0.1, momentum=0.9, nesterov=True, backend="numpy")
    o_fast = fastopt.SGD(fast, lr=0.1, momentum=0.9, nesterov=True, backend=backend)
    for _ in range(3):
        g = [rng_array(rng, s, np.float32) for s in shapes]
        o_ref.step(g)
        o_fast.step(g)
    for a, b in zip(ref, fast):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_optimizer_made_before_its_params(backend):
    """numpy-ml's pattern: one optimizer per layer, made before the layer's
    params exist, bound at the first step; later steps pass the same dict."""
    params = model(np.float64)
    twin = model(np.float64)
    lazy = {name: fastopt.Adam(lr=1e-2, backend=backend) for name in params}
    eager = fastopt.Adam(twin, lr=1e-2, backend=backend)
    assert "no params yet" in repr(lazy["layer1"])
    with pytest.raises(RuntimeError, match="has no params yet"):
        lazy["layer1"].step({"W": np.ones((6, 5)), "b": np.ones(5)})
    for t in range(3):
        g = grads_like(params, seed=t)
        for name, opt in lazy.items():
            opt.step(g[name], params=params[name])
        eager.step(g)
    for a, b in zip(leaves(params), leaves(twin)):
        assert_bit_identical(a, b)
    # other arrays under the same names: refused, nothing written
    before = params["layer1"]["W"].copy()
    other = {"W": np.zeros((6, 5)), "b": np.zeros(5)}
    with pytest.raises(ValueError, match="not the arrays this Adam updates"):
        lazy["layer1"].step(grads_like(params, 9)["layer1"], params=other)
    assert_bit_identical(params["layer1"]["W"], before)
    with pytest.raises(RuntimeError, match="already has its params"):
        lazy["layer1"].bind(other)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad,exc,match", [
    (lambda g: g["layer2"].pop("b"), ValueError, r"missing grads\['layer2'\]\['b'\]"),
    (lambda g: g["layer2"].update(W=np.ones((3, 5))), ValueError,
     r"grads\['layer2'\]\['W'\] has shape \(3, 5\)"),
    (lambda g: g["layer2"].update(W=np.ones((5, 3), np.int32)), TypeError,
     r"grads\['layer2'\]\['W'\] must be float32 or float64"),
    (lambda g: g["layer1"].update(b=g["layer1"]["b"].astype(np.float32)), TypeError,
     r"grads\['layer1'\]\['b'\] has dtype float32"),
    (lambda g: g["layer1"].update(b=[0.0] * 5), TypeError,
     r"grads\['layer1'\]\['b'\] must be an ndarray"),
    (lambda g: g.update(layer1=np.ones(3)), TypeError, r"grads\['layer1'\] must be a dict"),
])
def test_bad_named_grads_are_refused_by_name_with_nothing_written(backend, bad, exc, match):
    params = model(np.float64)
    opt = fastopt.AdamW(params, lr=1e-2, backend=backend, max_grad_norm=1.0)
    opt.step(grads_like(params, 0))
    before = optimizer_snapshot(opt, leaves(params))
    g = grads_like(params, 1)
    bad(g)
    with pytest.raises(exc, match=match):
        opt.step(g)
    after = optimizer_snapshot(opt, leaves(params))
    for a, b in zip(after["params"], before["params"]):
        assert_bit_identical(a, b)
    assert opt.iterations == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_gradient_that_aliases_what_the_step_writes_is_refused(backend):
    ps = [np.ones(4), np.ones(3)]
    opt = fastopt.SGD(ps, lr=0.1, momentum=0.9, backend=backend)
    opt.step([np.ones(4), np.ones(3)])
    with pytest.raises(ValueError, match=r"grads\[1\] overlaps params\[1\]"):
        opt.step([np.ones(4), ps[1]])
    buf = opt.state[0]["flat"]["momentum_buffer"]
    with pytest.raises(ValueError, match=r"grads\[0\] overlaps optimizer state"):
        opt.step([buf[:4], np.ones(3)])
    np.testing.assert_array_equal(ps[1], 0.9)
    # a gradient reused for two params is only read: fine
    g = np.full(4, 2.0)
    opt2 = fastopt.SGD([np.ones(4), np.ones(4)], lr=0.1, backend=backend)
    opt2.step([g, g])


def test_checkpoints_record_the_names(tmp_path):
    params = model(np.float32)
    opt = fastopt.AdamW(params, lr=1e-2)
    opt.step(grads_like(params, 0))
    sd = opt.state_dict()
    assert [d["name"] for d in sd["param_groups"][0]["params"]] == \
        ["layer1.W", "layer1.b", "layer2.W", "layer2.b"]
    fastopt.save(tmp_path / "ck.npz", params=leaves(params), optimizer=opt)
    renamed = {"first": params["layer1"], "layer2": params["layer2"]}
    other = fastopt.AdamW({k: {n: a.copy() for n, a in d.items()}
                           for k, d in renamed.items()}, lr=1e-2)
    with pytest.raises(ValueError, match="first.W"):
        other.load_state_dict(sd)
    same = fastopt.AdamW(model(np.float32), lr=1e-2)
    same.load_state_dict(sd)
    assert same.state[0]["step"] == 1


def test_mixed_named_and_unnamed_groups_are_refused():
    with pytest.raises(ValueError, match="give every group's params by name, or none"):
        fastopt.SGD([{"params": {"w": np.ones(3)}}, {"params": [np.ones(2)]}], lr=0.1)
    with pytest.raises(ValueError, match=r"params\['w'\] is a name in two param groups"
                       r".*keep each layer's key"):
        fastopt.SGD([{"params": {"w": np.ones(3)}}, {"params": {"w": np.ones(2)}}], lr=0.1)
    # a layer's array in one group, a layer of that name in another
    with pytest.raises(ValueError, match=r"params\['l'\] is a name in two param groups"
                       r".*keep each layer's key"):
        fastopt.SGD([{"params": {"l": np.ones(3)}}, {"params": {"l": {"b": np.ones(2)}}}],
                    lr=0.1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_layers_weights_and_biases_in_two_groups(tmp_path, backend):
    """No weight decay on biases, over a dict of layers: each layer's W in
    one group and its b in another (refused before: the layer's key was in
    both). The grads come as the model's own dict; the step is the same as
    over the groups as lists; a checkpoint loads back by name."""
    params, plain = model(np.float32), model(np.float32)

    def groups(p):
        return [{"params": {k: {"W": d["W"]} for k, d in p.items()}, "weight_decay": 0.1},
                {"params": {k: {"b": d["b"]} for k, d in p.items()}, "weight_decay": 0.0}]

    opt = fastopt.AdamW(groups(params), lr=1e-2, backend=backend)
    ref = fastopt.AdamW([{"params": [d["W"] for d in plain.values()], "weight_decay": 0.1},
                         {"params": [d["b"] for d in plain.values()], "weight_decay": 0.0}],
                        lr=1e-2, backend=backend)
    assert opt.state_dict()["param_groups"][1]["params"][0]["name"] == "layer1.b"
    for seed in range(3):
        g = grads_like(params, seed)
        opt.step(g)
        ref.step([d["W"] for d in g.values()] + [d["b"] for d in g.values()])
    for layer in params:
        for k in params[layer]:
            np.testing.assert_array_equal(params[layer][k], plain[layer][k])
    with pytest.raises(ValueError, match=r"grads\['layer1'\] is missing "
                                         r"grads\['layer1'\]\['b'\]"):
        opt.step({k: {"W": d["W"]} for k, d in grads_like(params, 5).items()})
    fastopt.save(tmp_path / "c.npz", params=params, optimizer=opt)
    again = model(np.float32, seed=1)
    opt2 = fastopt.AdamW(groups(again), lr=1e-2, backend=backend)
    fastopt.load(tmp_path / "c.npz", params=again, optimizer=opt2)
    g = grads_like(params, 9)
    opt.step(g)
    opt2.step(g)
    for layer in params:
        for k in params[layer]:
            np.testing.assert_array_equal(again[layer][k], params[layer][k])


def test_a_group_of_float32_and_float64_is_refused_at_construction():
    with pytest.raises(ValueError, match="mixes float32 and float64"):
        fastopt.Adam([np.ones(3, np.float32), np.ones(3)], lr=0.1)
    # each dtype in its own group is fine
    fastopt.Adam([{"params": [np.ones(3, np.float32)]}, {"params": [np.ones(3)]}], lr=0.1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_none_says_what_it_needs(backend):
    p = [np.ones(3)]
    opt = fastopt.SGD(p, lr=0.1, backend=backend)
    with pytest.raises(TypeError, match="grads is None: step\\(\\) needs the gradients"):
        opt.step(None)
    np.testing.assert_array_equal(p[0], 1.0)
    assert opt.iterations == 0


def test_params_by_name_passed_again_in_another_key_order_are_the_same_params():
    """step(params=) with the dict built again in another key order was
    refused as 'not the arrays this optimizer updates'."""
    P = {"W": np.ones((2, 3)), "b": np.zeros(3)}
    G = {"W": np.ones((2, 3)), "b": np.ones(3)}
    opt = fastopt.Adam(lr=0.1)
    opt.step(G, params=P)
    again = {"b": P["b"], "W": P["W"]}
    opt.step(G, params=again)
    assert opt.state[0]["step"] == 2
    # grads as a list would follow the new order: b's gradient onto W
    with pytest.raises(ValueError, match="in another key order than it was given, and grads "
                                         "is a list"):
        opt.step([G["b"], G["W"]], params=again)
    opt.step(G, params=again)
    assert opt.state[0]["step"] == 3
    with pytest.raises(ValueError, match="in another key order"):
        opt.step([G["b"], G["W"]], params=again)      # every time, not only the first
    with pytest.raises(ValueError, match="params are not the arrays"):
        opt.step(G, params={"b": P["b"], "W": np.ones((2, 3))})


def test_a_group_mixing_16_bit_and_float64_names_the_dtypes_given():
    with pytest.raises(ValueError, match=r"mixes float16 and float64 params \(computed in "
                                         r"float32 and float64\)"):
        fastopt.Adam([np.ones(3, np.float16), np.ones(3)], lr=0.1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_optimizer_per_layer_takes_the_whole_models_grads(backend):
    # keys beside its params' are other arrays' gradients, not read (they
    # were refused: each optimizer needed its own slice of the dict)
    params, twin = model(np.float64), model(np.float64)
    first = fastopt.AdamW({"layer1": params["layer1"]}, lr=1e-2, backend=backend)
    second = fastopt.AdamW(params["layer2"], lr=1e-2, backend=backend)   # by its own keys
    whole = fastopt.AdamW(twin, lr=1e-2, backend=backend)
    for t in range(3):
        g = grads_like(params, seed=t)
        whole.step(g)
        g["frozen"] = {"W": np.ones(4)}
        g["layer1"]["unused"] = np.ones(2)
        first.step(g)
        second.step({**g["layer2"], "x": np.ones(1)})
    for a, b in zip(leaves(params), leaves(twin)):
        assert_bit_identical(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_array_replaced_in_a_groups_dict_or_list_is_refused_by_name(backend):
    """Weight decay on weights only is param groups over the model's own
    dicts; an array replaced there (``model["layer2"]["W"] = new``) went on
    unnoticed, the step updating the old one, where the same replacement in
    a plain dict of params was refused."""
    params = model(np.float64)
    opt = fastopt.AdamW([{"params": {"layer1": params["layer1"], "layer2": {
        "W": params["layer2"]["W"]}}},
        {"params": {"layer2": {"b": params["layer2"]["b"]}}, "weight_decay": 0.0}],
        lr=0.1, backend=backend)
    opt.step(grads_like(params, 0))
    before = optimizer_snapshot(opt, leaves(params))
    old = params["layer1"]["W"]
    params["layer1"]["W"] = old * 1.0
    with pytest.raises(ValueError, match=r"groups\[0\]\['params'\]\['layer1'\]\['W'\] was replaced "
                                         r"in the dict this optimizer was made from"):
        opt.step(grads_like(params, 1))
    params["layer1"]["W"] = old
    assert_same_tree(optimizer_snapshot(opt, leaves(params)), before)    # nothing written
    opt.step(grads_like(params, 1))           # put back: steps again
    # groups over plain lists: the same, by position
    w, b = np.ones(3), np.zeros(2)
    weights = [w]
    opt2 = fastopt.SGD([{"params": weights}, {"params": [b], "weight_decay": 0.0}], lr=0.1,
                       backend=backend)
    opt2.step([np.ones(3), np.ones(2)])
    weights[0] = np.ones(3)
    with pytest.raises(ValueError, match=r"groups\[0\]\['params'\]\[0\] was replaced in the list"):
        opt2.step([np.ones(3), np.ones(2)])
    np.testing.assert_array_equal(w, 0.9)     # nothing written
    # a group given as one array, or packed: not watched, and no error
    flat = fastopt.pack([np.ones(3)])
    fastopt.SGD([{"params": np.ones(2)}, {"params": flat}], lr=0.1,
                backend=backend).step([np.ones(2), np.ones(3)])


def test_a_list_of_gradients_for_params_by_name_is_named_by_index_and_order():
    """A list is read in the params' own order (an optax port's
    jax.tree_util.tree_leaves sorts the keys): a mismatch names the list's
    index beside the param's key, and says the order read."""
    p = {"z": {"w": np.zeros((3, 4))}, "a": {"w": np.zeros(4)}}
    opt = fastopt.Adam(p)
    with pytest.raises(ValueError, match=r"grads\[0\] has shape \(4,\) but params\['z'\]\['w'\] "
                                         r"has shape \(3, 4\); a list of gradients is read in "
                                         r"the params' own order \(z\.w, a\.w\): give a dict"):
        opt.step([np.zeros(4), np.zeros((3, 4))])
    with pytest.raises(ValueError, match=r"^grads\['z'\]\['w'\] has shape \(4,\) but "
                                         r"params\['z'\]\['w'\] has shape \(3, 4\)$"):
        opt.step({"z": {"w": np.zeros(4)}, "a": {"w": np.zeros(4)}})
    assert opt.iterations == 0
