"""fastopt.group_params: param groups by a rule over the params' names (the
no-decay-on-biases recipe every fine-tune and optax port writes by hand)."""

from __future__ import annotations

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
    assert [(g["lr"], [x.size for x in g["params"]]) for g in groups] == [(0.1, [2, 4]),
                                                                           (0.2, [3])]
    assert all(x is y for x, y in zip(groups[0]["params"], (a[0], a[2])))
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
