"""fastopt.group_params: param groups by a rule over the params' names (the
no-decay-on-biases recipe every fine-tune and optax port writes by hand)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import fastopt
from conftest import assert_same_tree


def _model(rng):
    return {"enc": {"w": rng.standard_normal((4, 3)), "b": rng.standard_normal(3)},
            "dec": {"w": rng.standard_normal((3, 4))}, "scale": rng.standard_normal(())}


def no_decay_on_vectors(name, a):
    return {"weight_decay": 0.0} if a.ndim < 2 else None


def test_groups_by_rule_step_as_the_same_groups_written_by_hand():
    rng = np.random.default_rng(0)
    start = _model(rng)
    copy = lambda: {k: ({kk: vv.copy() for kk, vv in v.items()} if isinstance(v, dict)   # noqa: E731
                        else v.copy()) for k, v in start.items()}
    mine, hand = copy(), copy()
    groups = fastopt.group_params(mine, no_decay_on_vectors)
    assert [set(g) for g in groups] == [{"params"}, {"params", "weight_decay"}]
    assert groups[0]["params"]["dec"] is mine["dec"]        # a whole layer: the user's dict
    assert groups[0]["params"]["enc"] == {"w": mine["enc"]["w"]}
    assert groups[1]["params"] == {"enc": {"b": mine["enc"]["b"]}, "scale": mine["scale"]}
    opt = fastopt.AdamW(groups, lr=1e-2, weight_decay=0.5)
    ref = fastopt.AdamW([{"params": {"enc": {"w": hand["enc"]["w"]}, "dec": hand["dec"]}},
                         {"params": {"enc": {"b": hand["enc"]["b"]}, "scale": hand["scale"]},
                          "weight_decay": 0.0}], lr=1e-2, weight_decay=0.5)
    for _ in range(3):
        g = _model(rng)
        opt.step(g)
        ref.step(g)
    assert_same_tree(mine, hand)


def test_a_whole_layer_replaced_in_the_users_dict_is_refused_at_the_next_step():
    p = _model(np.random.default_rng(1))
    opt = fastopt.AdamW(fastopt.group_params(p, no_decay_on_vectors), lr=1e-2)
    g = _model(np.random.default_rng(2))
    opt.step(g)
    p["dec"]["w"] = np.zeros((3, 4))
    with pytest.raises(ValueError, match=r"\['dec'\]\['w'\] was replaced in the dict"):
        opt.step(g)


def test_names_lists_and_equal_options():
    seen = []
    rule = lambda name, a: seen.append(name) or {"lr": 0.1 if name != "1" else 0.2}  # noqa: E731
    a = [np.zeros(2), np.zeros(3), np.zeros(4)]
    groups = fastopt.group_params(a, rule)
    assert seen == ["0", "1", "2"]
    # a list's parts keep each array's index in it (the gradients come as one list)
    assert [(g["lr"], {i: x.size for i, x in g["params"].items()}) for g in groups] == [
        (0.1, {0: 2, 2: 4}), (0.2, {1: 3})]
    assert all(groups[0]["params"][i] is a[i] for i in (0, 2))
    seen.clear()
    fastopt.group_params({"l1": {"W": np.zeros(1)}, "l2": {0: np.zeros(1)}}, rule)
    assert seen == ["l1.W", "l2.0"]
    # every array in one group: the user's dict itself
    p = {"w": np.zeros(2)}
    assert fastopt.group_params(p, lambda n, x: None) == [{"params": p}]
    assert fastopt.group_params(p, lambda n, x: None)[0]["params"] is p


def test_bad_rules_and_params_are_refused():
    p = {"w": np.zeros(2)}
    with pytest.raises(TypeError, match=r"rule\('w', \.\.\.\) must return a dict"):
        fastopt.group_params(p, lambda n, a: 0.0)
    with pytest.raises(ValueError, match="returned 'params'"):
        fastopt.group_params(p, lambda n, a: {"params": []})
    with pytest.raises(TypeError, match="a dict of name -> array"):
        fastopt.group_params(np.zeros(2), lambda n, a: None)


def _vectors(rng, n=4):
    return [rng.standard_normal(3) for _ in range(n)]


def test_a_split_plain_list_reads_the_gradients_in_the_lists_own_order():
    # as new lists, the groups [p0, p2], [p1, p3] read the user's [g0, g1,
    # g2, g3] in the groups' order: p2 was stepped with g1 (same shapes, no
    # error) while the docstring promised gradients shaped like the params
    rng = np.random.default_rng(3)
    mine = _vectors(rng)
    hand = [p.copy() for p in mine]
    start = [p.copy() for p in mine]
    rule = lambda n, a: {"lr": 0.0} if n in ("1", "3") else None   # noqa: E731
    opt = fastopt.SGD(fastopt.group_params(mine, rule), lr=0.5)
    ref = fastopt.SGD([{"params": [hand[0], hand[2]]},
                       {"params": [hand[1], hand[3]], "lr": 0.0}], lr=0.5)
    for _ in range(3):
        g = [np.full(3, float(i + 1)) for i in range(4)]
        opt.step(g)                       # the params' order
        ref.step([g[0], g[2], g[1], g[3]])  # hand-made groups: the groups' order
        opt.step(tuple(g))                # `return g0, g1, ...`
        ref.step([g[0], g[2], g[1], g[3]])
    assert_same_tree(mine, hand)
    # p2 moved by its own gradient (3 each step, 6 steps of lr 0.5), p1 not at all
    assert np.allclose(mine[2], start[2] - 9.0) and np.array_equal(mine[1], start[1])
    # a list of the wrong length names what it needs
    with pytest.raises(TypeError, match="must be a list of 4"):
        opt.step(g[:3])


@pytest.mark.parametrize("how", ["flat dict", "split list", "one-group list"])
def test_an_array_replaced_where_group_params_split_it_is_refused(how):
    rng = np.random.default_rng(4)
    if how == "flat dict":      # its groups interleave the dict's keys: once unwatched
        p = {"W1": rng.standard_normal((2, 2)), "b1": rng.standard_normal(2),
             "W2": rng.standard_normal((2, 2)), "b2": rng.standard_normal(2)}
        key, label = "W2", r"params\['W2'\] was replaced in the dict"
        g = {k: np.ones_like(v) for k, v in p.items()}
    else:
        p = _vectors(rng)
        key, label = 2, r"params\[2\] was replaced in the list"
        g = [np.ones(3)] * 4
    rule = ((lambda n, a: None) if how == "one-group list"
            else lambda n, a: {"weight_decay": 0.0} if a.ndim == 1 else None)
    opt = fastopt.AdamW(fastopt.group_params(p, rule), lr=1e-2)
    opt.step(g)
    old = p[key]
    p[key] = np.zeros_like(old)
    with pytest.raises(ValueError, match=label):
        opt.step(g)
    p[key] = old                      # put back: steps again
    opt.step(g)
    if how != "flat dict":
        p.append(np.zeros(3))
        with pytest.raises(ValueError, match=r"params\[4\] was (added|appended)"):
            opt.step(g)


def test_name_array_pairs_are_split_by_name():
    rng = np.random.default_rng(5)
    pairs = [("enc.w", rng.standard_normal((2, 2))), ("enc.b", rng.standard_normal(2))]
    seen = []
    groups = fastopt.group_params(pairs, lambda n, a: seen.append((n, a.ndim)) or (
        {"weight_decay": 0.0} if a.ndim == 1 else None))
    assert seen == [("enc.w", 2), ("enc.b", 1)]
    assert groups[1]["params"] == {"enc.b": pairs[1][1]}
    opt = fastopt.AdamW(groups, lr=1e-2)
    opt.step([("enc.w", np.ones((2, 2))), ("enc.b", np.ones(2))])
    with pytest.raises(ValueError, match="comes more than once"):
        fastopt.group_params(pairs + pairs[:1], lambda n, a: None)


def test_a_split_lists_gradients_are_exactly_the_lists_length():
    # a longer list was taken, its extra gradient never read
    p = _vectors(np.random.default_rng(6))
    rule = lambda n, a: {"lr": 0.5} if n in ("1", "3") else None   # noqa: E731
    opt = fastopt.SGD(fastopt.group_params(p, rule), lr=1.0)
    with pytest.raises(TypeError, match="must be a list of 4, as the params"):
        opt.step([np.ones(3)] * 5)
    # one group of them alone still takes the whole list's gradients
    part = fastopt.SGD(fastopt.group_params(p, rule)[:1], lr=1.0)
    before = [a.copy() for a in p]
    part.step([np.full(3, float(i)) for i in range(4)])
    assert np.array_equal(p[2], before[2] - 2.0) and np.array_equal(p[1], before[1])


@pytest.mark.parametrize("how", ["add_param_group", "a group beside them"])
def test_a_plain_group_after_a_split_list_follows_the_lists_items(how):
    # refused as "not a dict" before, though the refusal of an appended
    # array advised add_param_group
    p = _vectors(np.random.default_rng(7))
    rule = lambda n, a: {"lr": 0.5} if n in ("1", "3") else None   # noqa: E731
    extra = np.zeros(2)
    if how == "add_param_group":
        opt = fastopt.SGD(fastopt.group_params(p, rule), lr=1.0)
        opt.add_param_group({"params": [extra], "lr": 0.1})
    else:
        opt = fastopt.SGD(fastopt.group_params(p, rule) + [{"params": [extra], "lr": 0.1}],
                          lr=1.0)
    before = [a.copy() for a in p]
    opt.step([np.full(3, float(i)) for i in range(4)] + [np.ones(2)])
    assert np.array_equal(p[3], before[3] - 1.5) and np.array_equal(extra, [-0.1, -0.1])
    names = [d["name"] for g in opt.state_dict()["param_groups"] for d in g["params"]]
    assert names == ["0", "2", "1", "3", "4"]


def test_the_split_list_itself_may_be_given_to_step():
    # step(grads, params=the_list): refused as "a new array", compared in
    # the groups' order
    p = _vectors(np.random.default_rng(8))
    rule = lambda n, a: {"lr": 0.5} if n in ("1", "3") else None   # noqa: E731
    opt = fastopt.SGD(fastopt.group_params(p, rule), lr=1.0)
    before = [a.copy() for a in p]
    opt.step([np.full(3, float(i)) for i in range(4)], params=p)
    assert np.array_equal(p[3], before[3] - 1.5) and np.array_equal(p[2], before[2] - 2.0)
    with pytest.raises(ValueError, match="not the arrays this SGD updates"):
        opt.step([np.ones(3)] * 4, params=[a.copy() for a in p])


def _reordered(model):
    """The same model built anew with each layer's keys in another order
    (``b`` before ``w``): group_params' groups come in another order."""
    return {k: (dict(reversed(list(v.items()))) if isinstance(v, dict) else v.copy())
            for k, v in model.items()}


@pytest.mark.parametrize("make", [
    lambda g: fastopt.AdamW(g, lr=1e-2),
    lambda g: fastopt.NAdam(g, lr=1e-2),
    lambda g: fastopt.SAM(fastopt.SGD(g, lr=1e-2, momentum=0.9), rho=0.05)],
    ids=["adamw", "nadam", "sam"])
def test_a_checkpoint_loads_into_the_same_groups_in_another_order(tmp_path, make):
    """A CNN trial rebuilt its model dict with each layer's keys in another
    order: group_params gave the same groups in another order, and the
    checkpoint was refused ("names differ")."""
    def steps(model, opt, start, n):
        for t in range(start, start + n):
            grads = {k: ({kk: np.cos(vv + t) for kk, vv in v.items()} if isinstance(v, dict)
                         else np.cos(v + t)) for k, v in model.items()}
            if isinstance(opt, fastopt.SAM):
                opt.perturb(grads)
            opt.step(grads)

    start = _model(np.random.default_rng(3))
    ref = _reordered(_reordered(start))
    ref_opt = make(fastopt.group_params(ref, no_decay_on_vectors))
    steps(ref, ref_opt, 0, 6)
    model = _reordered(_reordered(start))
    opt = make(fastopt.group_params(model, no_decay_on_vectors))
    steps(model, opt, 0, 3)
    fastopt.save(tmp_path / "c.npz", params=model, optimizer=opt)
    again = _reordered(start)
    opt2 = make(fastopt.group_params(again, no_decay_on_vectors))
    inner = getattr(opt2, "base_optimizer", opt2)

    def names(o):
        return [[d["name"] for d in g["params"]] for g in o.state_dict()["param_groups"]]
    assert names(inner) == [["enc.b", "scale"], ["enc.w", "dec.w"]]     # b first: its group
    assert names(getattr(opt, "base_optimizer", opt)) == [["enc.w", "dec.w"], ["enc.b", "scale"]]
    fastopt.load(tmp_path / "c.npz", params=again, optimizer=opt2)
    assert inner.param_groups[0]["weight_decay"] == 0.0
    steps(again, opt2, 3, 3)
    for k, v in ref.items():
        if isinstance(v, dict):
            for kk in v:
                assert np.array_equal(again[k][kk], v[kk]), (k, kk)
        else:
            assert np.array_equal(again[k], v)


def _cnn():
    rng = np.random.default_rng(5)
    return {"conv": {"W": rng.standard_normal((4, 3)), "b": np.zeros(3)},
            "bn": {"gamma": np.ones(3), "beta": np.zeros(3),
                   "running_mean": np.zeros(3), "running_var": np.ones(3)}}


def buffers_out(name, a):
    """The classic recipe, buffers (a batch norm's running statistics) left out."""
    if "running" in name:
        return False
    return {"weight_decay": 0.0} if a.ndim == 1 else None


def test_arrays_the_rule_leaves_out_are_no_params(tmp_path):
    model = _cnn()
    groups = fastopt.group_params(model, buffers_out)
    opt = fastopt.AdamW(groups, lr=1e-2)
    hand = _cnn()
    ref = fastopt.AdamW([{"params": {"conv": {"W": hand["conv"]["W"]}}},
                         {"params": {"conv": {"b": hand["conv"]["b"]},
                                     "bn": {"gamma": hand["bn"]["gamma"],
                                            "beta": hand["bn"]["beta"]}},
                          "weight_decay": 0.0}], lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for t in range(40):
            g = {"conv": {"W": np.cos(model["conv"]["W"] + t), "b": np.ones(3)},
                 "bn": {"gamma": np.ones(3) * t, "beta": -np.ones(3)}}
            # the buffers' gradients: absent, or None
            opt.step(g if t % 2 else {**g, "bn": {**g["bn"], "running_mean": None}})
            ref.step(g)
            # a batch norm's update, rebinding the buffer each step: no param's
            model["bn"]["running_mean"] = 0.9 * model["bn"]["running_mean"] + 0.1
    assert_same_tree(model["conv"], hand["conv"])
    assert np.array_equal(model["bn"]["gamma"], hand["bn"]["gamma"])
    assert np.array_equal(model["bn"]["running_var"], np.ones(3))      # never stepped
    fastopt.save(tmp_path / "c.npz", params=model, optimizer=opt)     # the buffers saved too
    assert "running_mean" in fastopt.load(tmp_path / "c.npz")["params"]["bn"]
    model["conv"]["W"] = np.zeros((4, 3))         # a param replaced: still refused
    with pytest.raises(ValueError, match=r"params\['conv'\]\['W'\] was replaced"):
        opt.step(g)


def test_a_list_with_an_array_left_out_reads_its_gradients_by_place():
    params = [np.ones(3), np.zeros(2), np.ones(2)]      # the middle one a buffer
    opt = fastopt.SGD(fastopt.group_params(params, lambda n, a: False if n == "1" else None),
                      lr=0.5)
    opt.step([np.ones(3), None, np.full(2, 2.0)])
    assert params[0].tolist() == [0.5] * 3 and params[2].tolist() == [0.0, 0.0]
    params[1] = np.ones(2)                              # replaced: no param's
    opt.step([np.ones(3), np.ones(2), np.ones(2)])
    with pytest.raises(TypeError, match=r"must be a list of 3"):
        opt.step([np.ones(3), np.ones(2)])
    params.append(np.ones(1))
    with pytest.raises(ValueError, match=r"params\[3\] was added to a list"):
        opt.step([np.ones(3), None, np.ones(2), None])


def test_a_rule_leaving_out_everything_or_returning_another_value_is_refused():
    with pytest.raises(ValueError, match=r"left out every array \(2\): nothing to train"):
        fastopt.group_params([np.ones(2), np.ones(3)], lambda n, a: False)
    with pytest.raises(TypeError, match=r"must return a dict of group options, None \(the "
                                        r"defaults\) or False \(left out, not trained\), got "
                                        r"bool"):
        fastopt.group_params([np.ones(2)], lambda n, a: True)


def test_an_empty_dict_in_the_params_is_a_place_for_layers_to_come(tmp_path):
    """Continual learning starts with {"heads": {}}: the empty dict was taken
    for an array (the rule was called with it; 'must be an ndarray, got dict')."""
    seen = []

    def rule(name, a):
        seen.append(name)
        return {"weight_decay": 0.0} if a.ndim == 1 else None
    params = {"backbone": {"W": np.ones((3, 2)), "b": np.zeros(2)}, "heads": {}}
    opt = fastopt.AdamW(fastopt.group_params(params, rule), lr=0.1)
    assert seen == ["backbone.W", "backbone.b"]
    grads = {"backbone": {"W": np.ones((3, 2)), "b": np.ones(2)}}
    opt.step({**grads, "heads": {}})
    params["heads"]["t0"] = {"W": np.ones((2, 2))}
    opt.add_param_group({"params": {"heads": {"t0": params["heads"]["t0"]}}, "lr": 0.01})
    opt.step({**grads, "heads": {"t0": {"W": np.ones((2, 2))}}})
    assert params["heads"]["t0"]["W"][0, 0] == pytest.approx(1 - 0.01 * (1 + 1e-2))
    plain = fastopt.SGD({"backbone": params["backbone"], "heads": {}, "extra": []}, lr=0.1)
    plain.step(grads)
    with pytest.raises(ValueError, match=r"^params\['a'\] holds no arrays, only empty dicts "
                                         r"or lists: nothing to optimize"):
        fastopt.Adam({"a": {"b": {}}})


def test_a_layer_appended_to_a_list_that_was_empty_is_refused_unless_added():
    params = {"body": {"W": np.ones(2)}, "heads": []}
    opt = fastopt.Adam(params, lr=0.1)
    opt.step({"body": {"W": np.ones(2)}})
    params["heads"].append({"W": np.ones(3)})
    with pytest.raises(ValueError, match=r"params\['heads'\]\[0\] was added to a list"):
        opt.step({"body": {"W": np.ones(2)}})
    opt.add_param_group({"params": {"heads": params["heads"]}})
    opt.step({"body": {"W": np.ones(2)}, "heads": [{"W": np.ones(3)}]})
    assert params["heads"][0]["W"][0] == pytest.approx(0.9)


def test_what_is_appended_to_a_list_that_was_empty_is_judged_by_its_arrays():
    k = np.ones(4)
    params = {"w": np.ones(2), "layers": [], "names": []}
    opt = fastopt.Adam(params, lr=0.1)
    opt.add_param_group({"params": {"k9": k}})
    params["names"].append("layer 1")                   # metadata: no layer
    params["layers"].append([k])                        # the optimizer's own array
    params["layers"].append({"k": k.reshape(2, 2)})     # a view of all of it
    opt.step({"w": np.ones(2), "k9": np.ones(4)})
    params["layers"].append({"k": k[:2]})               # part of it: not what it steps
    with pytest.raises(ValueError, match=r"params\['layers'\]\[2\] was added to a list"):
        opt.step({"w": np.ones(2), "k9": np.ones(4)})
