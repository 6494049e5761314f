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


def test_torchs_state_clear_is_refused_and_reset_state_starts_groups_afresh():
    """opt.state.clear() (the README's torch reset) emptied the state: every
    later step, param_state and state_dict failed with an IndexError."""
    import fastopt.schedules as S
    w, h = np.ones(3), np.ones(2)
    opt = fastopt.Adam([{"params": [w]}, {"params": [h], "lr": 0.5}],
                       lr=S.warmup_cosine(0.1, 2, 100))
    for _ in range(3):
        opt.step([np.ones(3), np.ones(2)])
    for change in (lambda s: s.clear(), lambda s: s.pop(), lambda s: s.__setitem__(0, {}),
                   lambda s: s.__delitem__(0), lambda s: s.insert(0, {})):
        with pytest.raises(TypeError, match=r"opt.reset_state\(\) starts the moments"):
            change(opt.state)
    assert len(opt.state) == 2
    opt.reset_state([1])                         # the head alone
    assert [st["step"] for st in opt.state_dict()["state"]] == [3, 0]
    assert opt.iterations == 3 and opt.param_groups[1]["lr"] == 0.5
    assert opt.param_state(h) == {"step": 0}
    before = h.copy()
    opt.step([np.ones(3), np.ones(2)])
    np.testing.assert_allclose(before - h, 0.5)      # a fresh Adam's first step: lr
    opt.reset_state()
    assert [st["step"] for st in opt.state_dict()["state"]] == [0, 0] and opt.iterations == 4
    with pytest.raises(ValueError, match=r"groups\[...\] = 2: this Adam has 2 param groups"):
        opt.reset_state([2])
    with pytest.raises(TypeError, match=r"reset_state\(\[1\]\)"):
        opt.reset_state(1)


def test_reset_state_of_lbfgs_and_sam():
    lb = fastopt.LBFGS([np.ones(2)])
    lb.step(lambda: (0.0, [np.ones(2)]))
    assert lb.state_dict()["lbfgs"]["n_iter"] == 1
    lb.reset_state()
    assert lb.state_dict()["lbfgs"]["n_iter"] == 0 and lb.iterations == 1
    sam = fastopt.SAM(fastopt.SGD([np.ones(2)], lr=0.1, momentum=0.9))
    sam.perturb([np.ones(2)])
    with pytest.raises(RuntimeError, match="SAM is perturbed"):
        sam.reset_state()
    sam.step([np.ones(2)])
    sam.reset_state()
    assert sam.base_optimizer.state_dict()["state"][0]["step"] == 0


def test_a_numpy_scalar_lr_is_stored_as_the_python_float_a_checkpoint_gives_back(tmp_path):
    """A Keras-style scheduler's np.float32 lr stayed np.float32 in the
    group, came back from a checkpoint as a float, and the resumed run's lr
    arithmetic (lr * 0.9) differed from the uninterrupted run's."""
    w = np.ones(3, np.float32)
    opt = fastopt.Adam([w], lr=1e-3)
    opt.param_groups[0]["lr"] = np.float32(9e-4)
    opt.step([np.ones(3, np.float32)])
    lr = opt.param_groups[0]["lr"]
    assert type(lr) is float and lr == float(np.float32(9e-4))
    fastopt.save(tmp_path / "c.npz", params=[w], optimizer=opt)
    again = fastopt.Adam([w.copy()], lr=lr)
    fastopt.load(tmp_path / "c.npz", optimizer=again)
    assert type(again.param_groups[0]["lr"]) is float and again.param_groups[0]["lr"] == lr


def test_reset_state_keeps_a_plain_callable_lr_and_16_bit_master_weights():
    """reset_state went through state_dict, which cannot save a plain
    callable: the reset was refused with a message about saving."""
    import warnings
    ml_dtypes = pytest.importorskip("ml_dtypes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")         # (a plain callable lr is warned about)
        opt = fastopt.Adam([np.ones(3)], lr=lambda t: 0.1 * 0.9 ** t)
    opt.step([np.ones(3)])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.09)      # the next step's
    opt.reset_state()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.09)
    opt.step([np.ones(3)])
    assert opt.iterations == 2 and opt.last_lr == [pytest.approx(0.09)]
    p = [np.full(4, 1.0, ml_dtypes.bfloat16)]
    half = fastopt.AdamW(p, lr=1e-3)
    for _ in range(3):
        half.step([np.ones(4, ml_dtypes.bfloat16)])
    master = half.param_state(p[0])["master"]
    half.reset_state()
    assert np.array_equal(half.param_state(p[0])["master"], master)
    assert half.param_state(p[0]).keys() == {"step", "master"}


def test_name_pairs_with_a_number_for_a_0d_param_and_dict_items_are_read_by_name():
    params = [("w", np.ones(3)), ("s", np.array(2.0))]
    opt = fastopt.SGD(params, lr=0.1)
    opt.step([("w", np.ones(3)), ("s", 0.5)])            # the number as the 0-d param's
    assert params[1][1] == pytest.approx(1.95)
    opt.step({"w": np.ones(3), "s": np.array(1.0)}.items())
    assert params[0][1].tolist() == pytest.approx([0.8] * 3)
    model = {"w": np.ones(2)}
    opt2 = fastopt.SGD(model, lr=0.1)
    opt2.step({"w": np.ones(2)}.items())
    assert model["w"].tolist() == pytest.approx([0.9, 0.9])
    # params as d.items() stay refused: the optimizer would watch a list made
    # from the dict, not the dict, and a replaced array go unseen
    with pytest.raises(TypeError, match="dict_items"):
        fastopt.SGD(model.items(), lr=0.1)


def test_a_label_written_into_a_group_is_told_to_be_deleted():
    opt = fastopt.AdamW([np.ones(2)])
    opt.param_groups[0]["name"] = "decoder"
    with pytest.raises(ValueError, match=r"unknown keys \['name'\].*del opt.param_groups\[0\]"
                                         r"\['name'\]"):
        opt.step([np.ones(2)])
