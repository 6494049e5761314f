"""Params held as a list of layer dicts (``[{"W": ..., "b": ...}, ...]``)
or with lists inside dicts (JAX-style pytrees): stepped by name as a dict
of layers is, gradients in the same shape, refusals naming the array by
its place, a replaced array seen, checkpoints by name."""

from __future__ import annotations

import numpy as np
import pytest

import fastopt
from fastopt.backends import get_backend

from conftest import BACKENDS, assert_bit_identical, count_native_steps, rng_array

SHAPES = [{"W": (6, 5), "b": (5,)}, {"W": (5, 3), "b": (3,)}]


def layers(dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    return [{k: rng_array(rng, s, dtype) for k, s in d.items()} for d in SHAPES]


def grads_like(params, seed):
    """New gradient arrays in the params' shape, as a backward pass makes them."""
    rng = np.random.default_rng(seed)
    return [{k: rng_array(rng, a.shape, a.dtype) for k, a in d.items()} for d in params]


def leaves(tree):
    return [a for d in tree for a in d.values()]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("clip", [None, 0.5])
def test_a_list_of_layers_steps_as_the_plain_list_in_one_call(monkeypatch, backend, clip):
    named = layers()
    plain = [a.copy() for a in leaves(named)]
    opts = [fastopt.AdamW(p, lr=1e-2, backend=backend, max_grad_norm=clip)
            for p in (named, plain)]
    module = get_backend(backend)
    calls = (count_native_steps(monkeypatch, module)
             if getattr(module, "compiled_tables", False) else None)
    for t in range(4):
        g = grads_like(named, seed=t)
        as_tuple = tuple(g) if t == 3 else g      # `return [...]` or `return (...)`
        assert opts[0].step(as_tuple) == opts[1].step(leaves(g))
    if calls is not None:
        assert calls == [sum(a.size for a in plain)] * 8
    for a, b in zip(leaves(named), plain):
        assert_bit_identical(a, b)
    names = [d["name"] for d in opts[0].state_dict()["param_groups"][0]["params"]]
    assert names == ["0.W", "0.b", "1.W", "1.b"]
    assert opts[0].param_state("1.W")["exp_avg"].shape == (5, 3)
    assert opts[0].param_state((1, "b"))["exp_avg"].shape == (3,)


def test_lists_inside_dicts_step_as_the_plain_list():
    rng = np.random.default_rng(1)
    tree = {"blocks": [rng.standard_normal(4), (rng.standard_normal((2, 3)),)],
            "head": {"W": rng.standard_normal((3, 2))}}
    flat = [tree["blocks"][0].copy(), tree["blocks"][1][0].copy(), tree["head"]["W"].copy()]
    a, b = fastopt.Adam(tree, lr=0.1), fastopt.Adam(flat, lr=0.1)
    g = {"blocks": [np.ones(4), [np.full((2, 3), 2.0)]], "head": {"W": np.ones((3, 2))}}
    a.step(g)
    b.step([np.ones(4), np.full((2, 3), 2.0), np.ones((3, 2))])
    for x, y in zip([tree["blocks"][0], tree["blocks"][1][0], tree["head"]["W"]], flat):
        assert_bit_identical(x, y)
    with pytest.raises(TypeError, match=r"grads\['blocks'\] must be a list of 2, as the "
                                        r"params .* got one of 1"):
        a.step({"blocks": [np.ones(4)], "head": {"W": np.ones((3, 2))}})


@pytest.mark.parametrize("bad, match", [
    (lambda g: g[1].update(W=np.ones((3, 5))),
     r"grads\[1\]\['W'\] has shape \(3, 5\) but params\[1\]\['W'\] has shape \(5, 3\)"),
    (lambda g: g[1].pop("b"), r"grads\[1\] is missing grads\[1\]\['b'\]"),
    (lambda g: g.pop(), r"grads must be a list of 2, as the params .* got one of 1"),
    (lambda g: g.__setitem__(0, np.ones(5)), r"grads\[0\] must be a dict"),
])
def test_bad_gradients_are_refused_by_their_place_with_nothing_written(bad, match):
    params = layers()
    opt = fastopt.AdamW(params, lr=1e-2)
    opt.step(grads_like(params, 0))
    before = [a.copy() for a in leaves(params)]
    g = grads_like(params, 1)
    bad(g)
    with pytest.raises((TypeError, ValueError), match=match):
        opt.step(g)
    for a, b in zip(leaves(params), before):
        assert_bit_identical(a, b)
    # a flat list of the arrays is not the params' shape either
    with pytest.raises(TypeError, match="must be a list of 2"):
        opt.step(leaves(grads_like(params, 2)))


def test_an_array_or_layer_replaced_in_the_list_is_refused_by_name():
    params = layers()
    opt = fastopt.SGD(params, lr=0.1)
    opt.step(grads_like(params, 0))
    kept = params[1]["W"]
    params[1]["W"] = kept * 1.0          # a NumPy habit: rebinding
    with pytest.raises(ValueError, match=r"params\[1\]\['W'\] was replaced in the list"):
        opt.step(grads_like(params, 1))
    params[1]["W"] = kept
    opt.step(grads_like(params, 1))
    params[0] = dict(params[0])          # the same arrays in a new layer dict: fine
    opt.step(grads_like(params, 2))
    params[0] = {"W": np.zeros((6, 5)), "b": params[0]["b"]}
    with pytest.raises(ValueError, match=r"params\[0\]\['W'\] was replaced"):
        opt.step(grads_like(params, 3))


def test_a_checkpoint_of_a_list_of_layers_resumes_bit_for_bit(tmp_path):
    params, twin = layers(), layers()
    opt, ref = fastopt.Adam(params, lr=1e-2), fastopt.Adam(twin, lr=1e-2)
    for t in range(2):
        opt.step(grads_like(params, t))
        ref.step(grads_like(twin, t))
    fastopt.save(tmp_path / "ck.npz", params=params, optimizer=opt)
    back = layers(seed=5)
    again = fastopt.Adam(back, lr=1e-2)
    fastopt.load(tmp_path / "ck.npz", params=back, optimizer=again)
    for t in range(2, 4):
        again.step(grads_like(back, t))
        ref.step(grads_like(twin, t))
    for a, b in zip(leaves(back), leaves(twin)):
        assert_bit_identical(a, b)


def test_group_params_splits_a_list_of_layers_keeping_each_layers_place():
    """optax's mask over a list of layers: no weight decay on the biases,
    the gradients still one list like the params, the same steps as the
    groups written by hand over flat lists."""
    params, twin = layers(), layers()
    groups = fastopt.group_params(params, lambda name, a: {"weight_decay": 0.0}
                                  if a.ndim == 1 else None)
    opt = fastopt.AdamW(groups, lr=1e-2, weight_decay=0.5)
    ref = fastopt.AdamW([{"params": [twin[0]["W"], twin[1]["W"]]},
                         {"params": [twin[0]["b"], twin[1]["b"]], "weight_decay": 0.0}],
                        lr=1e-2, weight_decay=0.5)
    for t in range(3):
        g = grads_like(params, t)
        opt.step(g)
        ref.step([g[0]["W"], g[1]["W"], g[0]["b"], g[1]["b"]])
    for a, b in zip(leaves(params), leaves(twin)):
        assert_bit_identical(a, b)
    assert [d["name"] for gr in opt.state_dict()["param_groups"] for d in gr["params"]] == [
        "0.W", "1.W", "0.b", "1.b"]
    # hand-made groups over flat lists take a flat list, and say so to a list of layers
    with pytest.raises(ValueError, match=r"grads\[0\] is a dict: params given as lists of "
                                         "arrays take grads as one flat list"):
        ref.step(grads_like(twin, 9))
    # a list inside a dict splits the same way
    tree = {"enc": [np.ones(3), np.ones((2, 2))], "head": {"W": np.ones((2, 2))}}
    groups = fastopt.group_params(tree, lambda n, a: {"lr": 0.5} if a.ndim == 1 else None)
    assert [list(g["params"]) for g in groups] == [["enc"], ["enc", "head"]]
    fastopt.SGD(groups, lr=0.1).step({"enc": [np.ones(3), np.ones((2, 2))],
                                      "head": {"W": np.ones((2, 2))}})
    assert_bit_identical(tree["enc"][0], np.full(3, 0.5))
    assert_bit_identical(tree["head"]["W"], np.full((2, 2), 0.9))


def test_a_frozen_layer_of_a_list_is_left_as_it_is_in_a_group_of_its_own():
    params = layers()
    groups = fastopt.group_params(params, lambda n, a: {"lr": 0.1} if n.startswith("0.")
                                  else None)
    opt = fastopt.AdamW(groups, lr=1e-2)
    opt.step(grads_like(params, 0))
    before = [a.copy() for a in params[0].values()]
    g = grads_like(params, 1)
    g[0] = None                         # the whole layer frozen
    for _ in range(2):                  # (the second, planned)
        opt.step(g)
    for a, b in zip(params[0].values(), before):
        assert_bit_identical(a, b)
    assert opt.param_state("1.W")["step"] == 3 and opt.param_state("0.W")["step"] == 1
    # an array replaced in the user's list is seen: the optimizer watches it
    params[1]["W"] = np.zeros((5, 3))
    with pytest.raises(ValueError, match=r"params\[1\]\['W'\] was replaced in the list"):
        opt.step(grads_like(params, 2))


def test_watched_in_a_group_dict_and_an_appended_layer_is_refused():
    params = layers()
    opt = fastopt.Adam([{"params": params, "lr": 0.1}])
    opt.step(grads_like(params, 0))
    params[1]["W"] = np.zeros((5, 3))
    with pytest.raises(ValueError, match=r"groups\[0\]\['params'\]\[1\]\['W'\] was "
                                         "replaced in the list"):
        opt.step(grads_like(params, 1))
    params = layers()
    opt = fastopt.Adam(params)
    opt.step(grads_like(params, 0))
    params.append({"W": np.ones((3, 2))})
    with pytest.raises(ValueError, match=r"params\[2\] was added to a list in the params"):
        opt.step(grads_like(params[:2], 1))
    params.pop()
    opt.step(grads_like(params, 1))
    # (loss, grads): the pair is named, not read as two layers
    with pytest.raises(TypeError, match=r"a \(loss, grads\) pair\?"):
        opt.step((0.5, grads_like(params, 1)))


def test_pack_of_a_list_of_layers_says_the_optimizer_takes_it_as_it_is():
    with pytest.raises(TypeError, match=r"arrays\[0\] is a dict: an optimizer takes a list "
                                        "of layer dicts as it is"):
        fastopt.pack(layers())
    assert len(fastopt.pack([[1.0, 2.0], np.ones(3)])) == 2     # numbers: an array's values


def test_one_optimizer_per_layer_handed_the_whole_list_says_to_pass_its_layer():
    params = layers()
    opts = [fastopt.Adam(layer, lr=1e-2) for layer in params]
    g = grads_like(params, 0)
    with pytest.raises(TypeError, match=r"grads\[0\] must be an ndarray, got dict \(a whole "
                                        r"model's gradients, one item per layer\? these params "
                                        r"are params\['W'\], params\['b'\]"):
        opts[0].step(g)
    for opt, layer_grads in zip(opts, g):
        opt.step(layer_grads)


@pytest.mark.parametrize("change, match", [
    (lambda p: p[1].__setitem__("b", np.zeros(3)), r"params\[1\]\['b'\] was replaced in the list"),
    (lambda p: p.__setitem__(0, {"W": np.zeros((6, 5)), "b": np.zeros(5)}),
     r"params\[0\]\['W'\] was replaced in the list"),
    (lambda p: p.append({"W": np.zeros((3, 2))}), r"params\[2\] was added to a list in "
                                                   "the params"),
])
def test_layers_split_between_groups_are_watched_in_the_users_own_list(change, match):
    """Weights and biases in two groups hold new dicts per layer: the user's
    list itself is watched (an array replaced there went unseen)."""
    params = layers()
    groups = fastopt.group_params(params, lambda n, a: {"weight_decay": 0.0}
                                  if a.ndim == 1 else None)
    opt = fastopt.AdamW(groups, lr=1e-2)
    opt.step(grads_like(params, 0))
    kept = [a.copy() for a in opt.param_groups[0]["params"]]
    change(params)
    with pytest.raises(ValueError, match=match):
        opt.step(grads_like(params[:2], 1))
    for a, b in zip(opt.param_groups[0]["params"], kept):
        assert_bit_identical(a, b)


def test_a_model_whose_first_item_is_a_number_array_is_no_loss_pair():
    params = [np.array(0.5), {"W": np.ones((2, 2))}]
    opt = fastopt.SGD(params, lr=0.1)
    for _ in range(2):
        opt.step([np.array(1.0), {"W": np.ones((2, 2))}])
    assert float(params[0]) == pytest.approx(0.3)
    with pytest.raises(TypeError, match=r"a \(loss, grads\) pair\?"):
        opt.step((0.5, [np.array(1.0), {"W": np.ones((2, 2))}]))


def test_an_optimizer_over_some_groups_of_a_list_reads_the_whole_lists_gradients():
    params = layers()
    groups = fastopt.group_params(params, lambda n, a: {"lr": 0.5} if n.startswith("1.")
                                  else None)
    opt = fastopt.SGD(groups[1:], lr=0.1)       # layer 1 alone; layer 0 trained elsewhere
    before = params[0]["W"].copy()
    opt.step(grads_like(params, 0))
    assert_bit_identical(params[0]["W"], before)
    # (the whole list's length, which group_params recorded)
    with pytest.raises(TypeError, match=r"grads must be a list of 2, as the params"):
        opt.step(grads_like(params, 0)[:1])


def test_a_list_of_layers_given_whole_is_one_group_and_says_how_to_split_it():
    params = layers()
    with pytest.raises(ValueError, match=r"params is a list in two param groups: each "
                                         "group's list counts from 0.*group_params"):
        fastopt.AdamW([{"params": [params[0]]}, {"params": [params[1]]}])
    opt = fastopt.AdamW(params, lr=1e-2)
    g = grads_like(params, 0)
    g[0] = {"W": None, "b": None}       # a frozen layer
    with pytest.raises(TypeError, match=r"a list of layers given whole is one group: split "
                                        r"it with fastopt.group_params"):
        opt.step(g)


def test_a_list_group_beside_a_dict_group_is_refused_as_such():
    params = layers()
    with pytest.raises(ValueError, match=r"params is a list in one param group and a dict "
                                         "in another"):
        fastopt.AdamW([{"params": [params[0]]}, {"params": {"x": params[1]["W"]}}])


def test_an_array_appended_to_a_list_inside_a_dict_is_refused():
    tree = {"blocks": [np.ones(3), np.ones(2)], "head": {"W": np.ones((2, 2))}}
    g = {"blocks": [np.ones(3), np.ones(2)], "head": {"W": np.ones((2, 2))}}
    opt = fastopt.Adam(tree, lr=0.1)
    opt.step(g)
    tree["blocks"].append(np.ones(4))
    with pytest.raises(ValueError, match=r"params\['blocks'\]\[2\] was added to a list"):
        opt.step(g)
    # one the optimizer steps (add_param_group) is fine there
    tree["blocks"][2] = extra = np.ones(4)
    opt.add_param_group({"params": {"extra": extra}})
    opt.step({**g, "extra": np.ones(4)})


def test_an_array_added_beside_a_dicts_layers_is_ignored_as_keys_added_are():
    """It made the watch's listing of layers raise, and the step then failed
    with an UnboundLocalError of the watch's own."""
    params = {"l1": {"W": np.ones(2)}, "l2": {"W": np.ones(3)}}
    g = {"l1": {"W": np.ones(2)}, "l2": {"W": np.ones(3)}}
    opt = fastopt.SGD(params, lr=0.1)
    opt.step(g)
    params["scale"] = np.ones(1)         # not trained: as any key added
    opt.step(g)
    opt.step(g)
    np.testing.assert_allclose(params["l1"]["W"], 0.7, rtol=1e-12)   # three steps, none lost
    params["l2"]["W"] = np.zeros(3)
    with pytest.raises(ValueError, match=r"params\['l2'\]\['W'\] was replaced in the dict"):
        opt.step(g)


def test_an_array_added_beside_many_layers_stops_the_watch_not_the_steps():
    from fastopt.optim.given import DEEP_MAX
    params = {f"l{i}": {"W": np.ones(2), "b": np.ones(1)} for i in range(DEEP_MAX)}
    g = {k: {"W": np.ones(2), "b": np.ones(1)} for k in params}
    opt = fastopt.SGD(params, lr=0.5)
    opt.step(g)
    params["scale"] = np.ones(1)
    for _ in range(2):
        opt.step(g)
    assert opt._watch.shape == "list"        # (no longer walked each step)
    np.testing.assert_allclose(params["l0"]["W"], -0.5)
