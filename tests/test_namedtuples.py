"""Params held in namedtuples (``Layer(W=..., b=...)``, a JAX habit): a node
whose arrays are named by its fields, as a dict's by its keys. Gradients
come as the same namedtuple (read by field name), a dict by the fields, or
a plain tuple in the fields' order; checkpoints and ``param_state`` name
them by field; inside a dict a namedtuple replaced with ``_replace`` is
refused as a replaced array is."""

from __future__ import annotations

from collections import namedtuple

import numpy as np
import pytest

import fastopt

from conftest import BACKENDS, assert_bit_identical

Layer = namedtuple("Layer", "W b")
Swapped = namedtuple("Swapped", "b W")


def model(seed=0):
    rng = np.random.default_rng(seed)
    return {"l1": Layer(rng.standard_normal((4, 3)), rng.standard_normal(3)),
            "l2": [Layer(rng.standard_normal((3, 2)), rng.standard_normal(2))]}


def leaves(m):
    return [m["l1"].W, m["l1"].b, m["l2"][0].W, m["l2"][0].b]


def grads_of(m, seed):
    rng = np.random.default_rng(seed)
    return {"l1": Layer(*(rng.standard_normal(a.shape) for a in m["l1"])),
            "l2": [Layer(*(rng.standard_normal(a.shape) for a in m["l2"][0]))]}


@pytest.mark.parametrize("backend", BACKENDS)
def test_namedtuples_step_as_the_plain_list_named_by_their_fields(backend):
    mine = model()
    plain = [a.copy() for a in leaves(mine)]
    opt = fastopt.AdamW(mine, lr=1e-2, max_grad_norm=0.5, backend=backend)
    ref = fastopt.AdamW(plain, lr=1e-2, max_grad_norm=0.5, backend=backend)
    for t in range(3):
        g = grads_of(mine, t)
        assert opt.step(g) == ref.step(leaves(g))
    for a, b in zip(leaves(mine), plain):
        assert_bit_identical(a, b)
    names = [d["name"] for d in opt.state_dict()["param_groups"][0]["params"]]
    assert names == ["l1.W", "l1.b", "l2.0.W", "l2.0.b"]
    assert opt.param_state("l2.0.b")["exp_avg"].shape == (2,)


def test_a_namedtuples_gradients_by_field_name_dict_or_position():
    one = Layer(np.zeros((2, 2)), np.zeros(2))
    opt = fastopt.SGD(one, lr=1.0)
    gw, gb = np.full((2, 2), 1.0), np.full(2, 2.0)
    opt.step(Swapped(b=gb, W=gw))          # by name, whatever the fields' order
    opt.step({"W": gw, "b": gb})
    opt.step((gw, gb))                      # `return dW, db`
    assert np.array_equal(one.W, -3 * gw) and np.array_equal(one.b, -3 * gb)
    with pytest.raises(TypeError, match=r"namedtuple with the params' fields \(W, b\).*"
                                        r"got one of 3"):
        opt.step((gw, gb, gb))
    with pytest.raises(ValueError, match=r"grads\.W has shape \(2,\) but params\.W"):
        opt.step((gb, gw))                  # by position: the fields' order


def test_a_namedtuple_replaced_inside_the_dict_is_refused():
    m = model()
    opt = fastopt.Adam(m, lr=1e-2)
    g = grads_of(m, 0)
    opt.step(g)
    m["l1"] = m["l1"]._replace(W=np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"params\['l1'\]\.W was replaced.*"
                                         r"params\['l1'\] = params\['l1'\]\._replace\(W=old\)"):
        opt.step(g)


def test_group_params_splits_a_namedtuple_by_field():
    mine, hand = model(), model()
    rule = lambda n, a: {"weight_decay": 0.0} if a.ndim == 1 else None   # noqa: E731
    seen = []
    groups = fastopt.group_params(mine, lambda n, a: seen.append(n) or rule(n, a))
    assert seen == ["l1.W", "l1.b", "l2.0.W", "l2.0.b"]
    opt = fastopt.AdamW(groups, lr=1e-2, weight_decay=0.5)
    ref = fastopt.AdamW([{"params": [hand["l1"].W, hand["l2"][0].W]},
                         {"params": [hand["l1"].b, hand["l2"][0].b], "weight_decay": 0.0}],
                        lr=1e-2, weight_decay=0.5)
    for t in range(3):
        g = grads_of(mine, t)
        opt.step(g)
        ref.step([g["l1"].W, g["l2"][0].W, g["l1"].b, g["l2"][0].b])
    for a, b in zip(leaves(mine), leaves(hand)):
        assert_bit_identical(a, b)


def test_a_namedtuple_checkpoint_loads_by_field_name(tmp_path):
    saved = Layer(np.arange(4.0).reshape(2, 2), np.ones(2))
    opt = fastopt.Adam(saved, lr=0.1)
    opt.step(Layer(np.ones((2, 2)), np.ones(2)))
    fastopt.save(tmp_path / "c.npz", params=saved, optimizer=opt)
    for target in (Layer(np.zeros((2, 2)), np.zeros(2)),
                   {"W": np.zeros((2, 2)), "b": np.zeros(2)}):
        o = fastopt.Adam(target, lr=0.1)
        fastopt.load(tmp_path / "c.npz", params=target, optimizer=o)
        w = target.W if isinstance(target, Layer) else target["W"]
        assert np.array_equal(w, saved.W)
        assert np.array_equal(o.param_state("W")["exp_avg"], opt.param_state("W")["exp_avg"])


def test_lbfgs_over_a_namedtuple():
    P = namedtuple("P", "a b")
    p = P(np.array([1.5, -0.5]), np.array(2.0))

    def closure():
        return (float(((p.a - 1) ** 2).sum() + (p.b - 3) ** 2),
                P(2 * (p.a - 1), 2 * (p.b - 3)))
    opt = fastopt.LBFGS(p, line_search_fn="strong_wolfe")
    opt.step(closure)
    assert np.allclose(p.a, 1.0) and np.allclose(p.b, 3.0)
    with pytest.raises(TypeError, match="None gradient.*no frozen params"):
        opt.step(lambda: (1.0, P(p.a * 0, None)))


def test_a_split_namedtuple_reads_a_plain_tuple_in_its_own_fields_order():
    # the groups' parts merge in the groups' order (W1, W2, b1, b2): a plain
    # tuple was read in that order, b1 stepped with W2's gradient
    L4 = namedtuple("L4", "W1 b1 W2 b2")
    p = L4(*[np.zeros(2) for _ in range(4)])
    groups = fastopt.group_params(p, lambda n, a: {"weight_decay": 0.0} if n[0] == "b"
                                  else None)
    opt = fastopt.SGD(groups, lr=1.0)
    opt.step(tuple(np.full(2, float(i)) for i in (1, 2, 3, 4)))
    assert [float(a[0]) for a in p] == [-1.0, -2.0, -3.0, -4.0]
    with pytest.raises(TypeError, match=r"fields \(W1, b1, W2, b2\).*tuple of 4"):
        opt.step((np.ones(2),) * 3)


def test_a_namedtuple_saved_as_a_list_loads_by_position(tmp_path):
    # before namedtuples were named by field, their checkpoints held a list
    saved = [np.arange(4.0).reshape(2, 2), np.ones(2)]
    fastopt.save(tmp_path / "c.npz", params=saved)
    target = Layer(np.zeros((2, 2)), np.zeros(2))
    fastopt.load(tmp_path / "c.npz", params=target)
    assert np.array_equal(target.W, saved[0]) and np.array_equal(target.b, saved[1])


def test_a_field_of_a_nested_namedtuple_replaced_is_told_how_to_put_it_back():
    Model = namedtuple("Model", "enc head")
    params = {"m": Model(Layer(np.zeros((2, 2)), np.zeros(2)), np.zeros(3))}
    opt = fastopt.SGD(params, lr=0.1)
    grads = {"m": Model(Layer(np.ones((2, 2)), np.ones(2)), np.ones(3))}
    opt.step(grads)
    params["m"] = params["m"]._replace(enc=params["m"].enc._replace(W=np.zeros((2, 2))))
    with pytest.raises(ValueError, match=r"params\['m'\]\.enc\.W was replaced.*"
                                         r"params\['m'\] = params\['m'\]\._replace\(enc=params"
                                         r"\['m'\]\.enc\._replace\(W=old\)\)"):
        opt.step(grads)
