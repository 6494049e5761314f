"""A frozen layer: its gradients given as None (a user trial found that
the lr=0 recipe still advances the group's step count and decays its
moments, so that after unfreezing the first Adam step was 0.25x torch's,
which skips a param whose grad is None). A group whose every gradient is
None is now left as it is, state and step count included; the other
groups step as torch's do."""

from __future__ import annotations

import numpy as np
import pytest

import fastopt

from conftest import BACKENDS, assert_same_tree, optimizer_snapshot

torch = pytest.importorskip("torch")

#: (fastopt and torch class name, kwargs): each keeps a per-param state
#: and step count in torch, per group in fastopt
FAMILY = [("Adam", {}), ("AdamW", {}), ("SGD", dict(momentum=0.9, nesterov=True)),
          ("NAdam", {}), ("RAdam", {}), ("RMSprop", dict(momentum=0.5, centered=True)),
          ("Adagrad", {}), ("Adamax", {})]
SHAPES = [(3, 4), (4,), (4, 2)]


def _two_groups(rng):
    """A backbone (the first two arrays) and a head, by name."""
    return {"backbone": {"W": rng.standard_normal(SHAPES[0]), "b": rng.standard_normal(SHAPES[1])},
            "head": {"W": rng.standard_normal(SHAPES[2])}}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,kw", FAMILY, ids=[n for n, _ in FAMILY])
def test_a_frozen_group_matches_torch_with_none_grads(name, kw, backend):
    rng = np.random.default_rng(0)
    p = _two_groups(rng)
    tp = [torch.tensor(a, dtype=torch.float64, requires_grad=True)
          for layer in p.values() for a in layer.values()]
    opt = getattr(fastopt, name)([{"params": {"backbone": p["backbone"]}},
                                  {"params": {"head": p["head"]}}], lr=1e-2,
                                 backend=backend, **kw)
    ref = getattr(torch.optim, name)(tp, lr=1e-2, **kw)
    for step in range(30):
        g = [rng.standard_normal(s) for s in SHAPES]
        frozen = 10 <= step < 20 or step < 3          # frozen from the start too
        opt.step({"backbone": None if frozen else {"W": g[0], "b": g[1]},
                  "head": {"W": g[2]}})
        for t, x, f in zip(tp, g, (frozen, frozen, False)):
            t.grad = None if f else torch.tensor(x)
        ref.step()
        if step == 5:
            assert opt.state_dict()["state"][0]["step"] == 3
    got = [a for layer in p.values() for a in layer.values()]
    # (torch keeps NAdam's mu_product as a float32 tensor at its default dtype)
    tol = 1e-8 if name == "NAdam" else 1e-12
    for a, t in zip(got, tp):
        np.testing.assert_allclose(a, t.detach().numpy(), rtol=tol, atol=tol)
    assert [st["step"] for st in opt.state_dict()["state"]] == [17, 30]
    assert opt.iterations == 30


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_frozen_group_is_left_bit_for_bit_and_the_rest_steps_as_without_it(backend):
    rng = np.random.default_rng(1)
    p = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    alone = [p[2].copy()]
    opt = fastopt.AdamW([{"params": p[:2]}, {"params": p[2:]}], lr=1e-2, backend=backend)
    head = fastopt.AdamW([{"params": alone}], lr=1e-2, backend=backend)
    grads = [[rng.standard_normal(s).astype(np.float32) for s in SHAPES] for _ in range(6)]
    for g in grads[:3]:
        opt.step(g)
        head.step(g[2:])
    frozen = optimizer_snapshot(opt, p[:2])
    frozen_state = [np.copy(b) for b in opt.state[0]["flat"].values()]
    for g in grads[3:]:
        opt.step([None, None, g[2]])
        head.step(g[2:])
    after = optimizer_snapshot(opt, p[:2])
    assert_same_tree(after["params"], frozen["params"])
    for b, was in zip(opt.state[0]["flat"].values(), frozen_state):
        np.testing.assert_array_equal(b, was)
    np.testing.assert_array_equal(p[2], alone[0])      # the head: as if alone
    assert opt.last_lr == [1e-2, 1e-2]


def test_a_group_with_some_gradients_none_is_refused_naming_it_and_nothing_moves():
    rng = np.random.default_rng(2)
    p = _two_groups(rng)
    opt = fastopt.Adam([{"params": {"backbone": p["backbone"]}},
                        {"params": {"head": p["head"]}}])
    opt.step({"backbone": {"W": np.ones(SHAPES[0]), "b": np.ones(4)},
              "head": {"W": np.ones(SHAPES[2])}})
    arrays = [a for layer in p.values() for a in layer.values()]
    before = optimizer_snapshot(opt, arrays)
    with pytest.raises(TypeError, match=r"grads\['backbone'\]\['b'\] is None but other params "
                                        r"of its group \(param_groups\[0\]\) have gradients.*"
                                        r"a group of their own"):
        opt.step({"backbone": {"W": np.ones(SHAPES[0]), "b": None},
                  "head": {"W": np.ones(SHAPES[2])}})
    assert_same_tree(optimizer_snapshot(opt, arrays), before)
    assert opt.iterations == 1


def test_clipping_takes_the_norm_of_the_gradients_given():
    """As torch's clip_grad_norm_ over the params that have a grad."""
    rng = np.random.default_rng(3)
    p = [rng.standard_normal(s) for s in SHAPES]
    tp = [torch.tensor(a, requires_grad=True) for a in p]
    opt = fastopt.SGD([{"params": p[:2]}, {"params": p[2:]}], lr=0.1, max_grad_norm=0.5)
    ref = torch.optim.SGD(tp, lr=0.1)
    for step in range(4):
        g = [3 * rng.standard_normal(s) for s in SHAPES]
        given = [None, None, g[2]] if step % 2 else g
        norm = opt.step(given)
        for t, x in zip(tp, given):
            t.grad = None if x is None else torch.tensor(x)
        want = torch.nn.utils.clip_grad_norm_(tp, 0.5)
        ref.step()
        assert norm == pytest.approx(float(want), rel=1e-14)
    for a, t in zip(p, tp):
        np.testing.assert_allclose(a, t.detach().numpy(), rtol=1e-14, atol=1e-15)
    every = fastopt.Adam([np.ones(3)], max_grad_norm=1.0)
    assert every.step([None]) == 0.0 and every.iterations == 1     # nothing given: norm 0
    np.testing.assert_array_equal(every.param_groups[0]["params"][0], 1.0)


def test_a_non_finite_gradient_beside_a_frozen_group_skips_the_step():
    p = [np.ones(3), np.ones(2)]
    opt = fastopt.Adam([{"params": [p[0]]}, {"params": [p[1]]}], skip_nonfinite=True)
    opt.step([np.ones(3), np.ones(2)])
    before = optimizer_snapshot(opt, p)
    opt.step([None, np.array([1.0, np.nan])])
    assert opt.skipped_steps == 1 and np.isnan(opt.grad_norm)
    after = optimizer_snapshot(opt, p)
    assert_same_tree(after["params"], before["params"])
    assert_same_tree(after["state"], before["state"])
    opt.step([None, np.ones(2)])
    assert [st["step"] for st in opt.state] == [1, 2]


@pytest.mark.parametrize("state_dtype", ["bfloat16", "int8"])
def test_compact_state_of_a_frozen_group_is_kept_as_it_was(state_dtype):
    rng = np.random.default_rng(4)
    p = [rng.standard_normal(300).astype(np.float32), rng.standard_normal(5).astype(np.float32)]
    opt = fastopt.AdamW([{"params": [p[0]]}, {"params": [p[1]]}], state_dtype=state_dtype)
    opt.step([np.ones(300, np.float32), np.ones(5, np.float32)])
    sd = opt.state_dict()["state"][0]
    opt.step([None, np.ones(5, np.float32)])
    assert_same_tree(opt.state_dict()["state"][0], sd)


def test_a_list_of_none_for_every_param_only_counts_the_step():
    """Everything frozen (torch: no param has a grad): the lr schedule goes on."""
    p = np.ones(3)
    opt = fastopt.Adam([p], lr=fastopt.schedules.linear(1e-2, 0.0, 10))
    opt.step([np.ones(3)])
    moved = p.copy()
    opt.step([None])
    opt.step({0: None}.values())
    assert opt.iterations == 3 and opt.state[0]["step"] == 1
    np.testing.assert_array_equal(p, moved)
    opt.step([np.ones(3)])
    assert opt.last_lr[0] == pytest.approx(1e-2 * (1 - 3 / 10))


def test_the_clipping_functions_leave_a_frozen_layers_none_out():
    """global_norm and clip_by_global_norm take the same gradients as the
    step, Nones included (torch's clip_grad_norm_ skips params without a
    grad), naming the others by their place as before."""
    rng = np.random.default_rng(5)
    head = rng.standard_normal(4)
    by_name = {"backbone": None, "head": {"W": head.copy(), "b": None}}
    listed = [None, head.copy(), None]
    want = float(np.linalg.norm(head))
    assert fastopt.global_norm(by_name) == fastopt.global_norm(listed) == pytest.approx(want)
    assert fastopt.global_norm([None]) == 0.0
    assert fastopt.clip_by_global_norm(by_name, 0.5) == pytest.approx(want)
    assert fastopt.clip_by_global_norm(listed, 0.5) == pytest.approx(want)
    np.testing.assert_allclose(by_name["head"]["W"], head * 0.5 / (want + 1e-6))
    np.testing.assert_allclose(listed[1], head * 0.5 / (want + 1e-6))
    with pytest.raises(TypeError, match=r"grads\[2\] must be an ndarray, got str"):
        fastopt.global_norm([None, head, "x"])
    opt = fastopt.SGD([{"params": [np.ones(3)]}, {"params": [np.ones(4)]}], max_grad_norm=1.0)
    assert opt.step([None, head]) == pytest.approx(want)


def test_frozen_groups_with_pairs_a_loss_scaler_and_sam():
    """A review's cases: (name, None) pairs freeze as a dict's None does; a
    step with every group frozen checks no gradient, so the loss scaler
    counts no good step; SAM says why it takes no None."""
    p = {"a": np.ones(3), "b": np.ones(2)}
    opt = fastopt.Adam([{"params": {"a": p["a"]}}, {"params": {"b": p["b"]}}])
    opt.step([("b", np.ones(2)), ("a", None)])
    assert [st["step"] for st in opt.state] == [0, 1]
    np.testing.assert_array_equal(p["a"], 1.0)
    scaler = fastopt.LossScaler(init_scale=8.0, growth_interval=2)
    q = np.ones(3, np.float32)
    opt = fastopt.Adam([q], loss_scaler=scaler)
    opt.step([np.ones(3, np.float32)])
    before = dict(vars(scaler))
    for _ in range(3):
        opt.step([None])
    assert dict(vars(scaler)) == before
    sam = fastopt.SAM(fastopt.SGD([{"params": [np.ones(3)]}, {"params": [np.ones(2)]}], lr=0.1))
    with pytest.raises(TypeError, match=r"grads\[0\] is None: SAM steps every param"):
        sam.perturb([None, np.ones(2)])


@pytest.mark.parametrize("backend", ["cython", "numba"])
def test_frozen_steps_are_planned_and_step_as_the_full_path(backend):
    """A frozen step leaves a plan for the same frozen groups (a fine-tune's
    every step: ~0.1 ms of fixed cost on the full path); each change (a
    frozen group given gradients, another group frozen, a frozen group's
    value changed) takes the full path, and the result is the reference's."""
    rng = np.random.default_rng(7)
    shapes = SHAPES + [(5,)]
    start = [rng.standard_normal(s) for s in shapes]
    grads = [[rng.standard_normal(s) for s in shapes] for _ in range(12)]
    # (which groups are frozen at each step; after step 6 group 0's weight decay changes)
    frozen = [{0}, {0}, {0}, set(), {0, 1}, {0, 1}, {0}, {0}, {1}, {1}, set(), {0}]
    runs = {}
    for be in (backend, "numpy"):
        p = [a.copy() for a in start]
        opt = fastopt.AdamW([{"params": p[:2]}, {"params": p[2:3]}, {"params": p[3:]}],
                            lr=1e-2, backend=be)
        planned, plans = [], []
        for step, (g, off) in enumerate(zip(grads, frozen)):
            if step == 7:
                opt.param_groups[0]["weight_decay"] = 0.5
            given = [None if (i < 2 and 0 in off) or (i == 2 and 1 in off) else x
                     for i, x in enumerate(g)]
            opt.step(given)
            plan = opt._plan
            plans.append(plan)
            planned.append(None if plan is None else set(plan.frozen_set))
        runs[be] = (p, [st["step"] for st in opt.state], planned, plans)
    p, steps, planned, plans = runs[backend]
    for a, want in zip(p, runs["numpy"][0]):
        np.testing.assert_allclose(a, want, rtol=1e-12, atol=1e-14)
    assert steps == runs["numpy"][1] == [4, 8, 12]
    # every compiled step leaves a plan for the groups it left, and a step
    # like the last runs by it (the same plan), unless a value changed
    assert planned == frozen
    assert plans[1] is plans[0] and plans[2] is plans[0] and plans[5] is plans[4]
    assert plans[7] is not plans[6] and plans[9] is plans[8]


def test_a_frozen_groups_list_value_edited_in_place_takes_the_full_path():
    """The frozen plan compares copies of a group's list values (review:
    the list itself compared equal to itself, edited or not)."""
    p = [np.ones(3), np.ones(2)]
    opt = fastopt.Adam([{"params": [p[0]]}, {"params": [p[1]]}])
    opt.step([np.ones(3), np.ones(2)])
    opt.param_groups[0]["betas"] = [0.9, 0.999]      # a list, as a user may write it
    opt.step([None, np.ones(2)])
    opt.step([None, np.ones(2)])
    opt.param_groups[0]["betas"][0] = 2.0
    with pytest.raises(ValueError, match=r"\['betas'\]\[0\] must be < 1.0"):
        opt.step([None, np.ones(2)])


def test_a_dict_with_a_frozen_layer_names_a_bad_gradient_by_key():
    W = {"l1": {"w": np.ones(3), "b": np.ones(2)}, "l2": {"w": np.ones(4)}}
    opt = fastopt.Adam([{"params": {"l1": W["l1"]}}, {"params": {"l2": W["l2"]}}])
    with pytest.raises(ValueError, match=r"^grads\['l2'\]\['w'\] has shape \(5,\) but "
                                         r"params\['l2'\]\['w'\] has shape \(4,\)$"):
        opt.step({"l1": None, "l2": {"w": np.ones(5)}})
