"""What an interactive session does to an optimizer: cells run again, copies,
an optimizer saved before it has params, a model made again under a
trained optimizer, an np.matrix from old code. Each was silently wrong or
failed from inside before (user trials, sixteenth sitting)."""

from __future__ import annotations

import copy
import gc
import weakref

import numpy as np
import pytest

import fastopt

BACKENDS = ["numpy", "numba", "cython"]


def _params():
    return {"W": np.ones((3, 4)), "b": np.zeros(4)}


def _grads():
    return {"W": np.full((3, 4), 0.5), "b": np.ones(4)}


def test_a_shallow_copy_is_refused_a_deep_one_steps_alone():
    """copy.copy shared the moments but not the step counts: both stepped
    them, each bias-correcting for its own count (a param 5% off torch's
    after three steps)."""
    opt = fastopt.Adam(_params(), lr=0.1)
    opt.step(_grads())
    with pytest.raises(TypeError, match=r"copy.copy\(opt\) of this Adam .* copy.deepcopy"):
        copy.copy(opt)
    sam = fastopt.SAM(fastopt.SGD(_params(), lr=0.1))
    with pytest.raises(TypeError, match="copy.copy of a SAM .* copy.deepcopy"):
        copy.copy(sam)
    twin = copy.deepcopy(opt)
    with pytest.warns(UserWarning, match="copied without the arrays it updates"):
        twin.step(_grads())         # (its params are held by nothing but itself)
    assert twin.iterations == 2 and opt.iterations == 1


def test_an_optimizer_without_params_says_to_bind_them(tmp_path):
    """state_dict and fastopt.save raised AttributeError from inside;
    load_state_dict counted 0 param groups. A load stays a CheckpointError
    (a ValueError), as every load that cannot match: a resume loop catches it."""
    opt = fastopt.Adam(lr=1e-3)
    for call in (opt.state_dict, lambda: fastopt.save(tmp_path / "never.npz", optimizer=opt)):
        with pytest.raises(RuntimeError, match=r"has no params yet: .*bind\(params\)"):
            call()
    assert not (tmp_path / "never.npz").exists()
    params = _params()
    fastopt.save(tmp_path / "c.npz", params=params, optimizer=fastopt.Adam(params))
    for call in (lambda: opt.load_state_dict(fastopt.Adam(_params()).state_dict()),
                 lambda: fastopt.load(tmp_path / "c.npz", optimizer=opt)):
        with pytest.raises(fastopt.CheckpointError, match=r"has no params yet.*bind\(params\)"):
            call()


def test_iterations_a_load_would_refuse_are_not_saved(tmp_path):
    # opt.iterations = 2.5 was saved, and the file then refused by load
    opt = fastopt.SGD(_params(), lr=0.1)
    opt.step(_grads())
    for bad, err in ((2.5, TypeError), (-5, ValueError)):
        opt.iterations = bad
        with pytest.raises(err, match="iterations must be"):
            fastopt.save(tmp_path / "c.npz", optimizer=opt)
        assert not (tmp_path / "c.npz").exists()
    opt.iterations = 7
    fastopt.save(tmp_path / "c.npz", optimizer=opt)
    fresh = fastopt.SGD(_params(), lr=0.1)
    fastopt.load(tmp_path / "c.npz", optimizer=fresh)
    assert fresh.iterations == 7


@pytest.mark.parametrize("make", [
    lambda p: fastopt.AdamW(p, lr=0.1), lambda p: fastopt.LBFGS(p)])
def test_binding_the_same_arrays_again_is_a_no_op(make):
    """A cell with opt.bind(params) run again said "make another optimizer
    for other params" though they were the same (L-BFGS would have reset its
    history)."""
    params = _params()
    opt = make(None)
    opt.bind(params)
    if isinstance(opt, fastopt.LBFGS):
        opt.step(lambda: (float((params["W"] ** 2).sum()),
                          {"W": 2 * params["W"], "b": np.zeros(4)}))
        history = copy.deepcopy(opt.state_dict())
    opt.bind(params)
    opt.bind(dict(params))                       # the same arrays in a new dict
    if isinstance(opt, fastopt.LBFGS):
        assert opt.state_dict()["lbfgs"].keys() == history["lbfgs"].keys()
        assert opt.state_dict()["lbfgs"]["n_iter"] == history["lbfgs"]["n_iter"] > 0
    with pytest.raises(RuntimeError, match="already has its params"):
        opt.bind(_params())                     # other arrays
    with pytest.raises(RuntimeError, match="already has its params"):
        opt.bind([{"params": params, "lr": 0.5}])     # settings a no-op would drop
    with pytest.raises(RuntimeError, match="already has its params"):
        opt.bind(a for a in _params().values())   # a generator, read once


def test_loading_into_a_model_made_again_under_a_trained_optimizer(tmp_path):
    """The model's cell run again made new arrays; the load took them and the
    optimizer went on training the old ones: the params never changed."""
    params = _params()
    opt = fastopt.SGD(params, lr=0.1)
    opt.step(_grads())
    fastopt.save(tmp_path / "c.npz", params=params, optimizer=opt)
    params = _params()
    with pytest.raises(fastopt.CheckpointError, match="updates none of the params given"):
        fastopt.load(tmp_path / "c.npz", params=params, optimizer=opt)
    np.testing.assert_array_equal(params["W"], np.ones((3, 4)))      # nothing loaded
    fastopt.load(tmp_path / "c.npz", params=opt.param_groups[0]["params"], optimizer=opt)
    # SAM steps its base's arrays: checked too
    trained = _params()
    sam = fastopt.SAM(fastopt.SGD(trained, lr=0.1))
    sam.perturb(_grads())
    sam.step(_grads())
    fastopt.save(tmp_path / "s.npz", params=trained, optimizer=sam)
    with pytest.raises(fastopt.CheckpointError, match=r"\(SAM\) updates none of the params"):
        fastopt.load(tmp_path / "s.npz", params=_params(), optimizer=sam)


def test_loading_views_of_the_optimizers_buffer(tmp_path):
    """Params that are views of the optimizer's one buffer, starting past its
    first element, overlap what it updates: loaded (the start of each was
    compared, not the spans)."""
    buf = np.ones(20)
    opt = fastopt.SGD(buf, lr=0.1)
    opt.step(np.ones(20))
    view = {"b": buf[12:]}
    fastopt.save(tmp_path / "c.npz", params=view, optimizer=opt)
    fastopt.load(tmp_path / "c.npz", params=view, optimizer=opt)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["adamw", "lamb", "schedule", "clip", "sam", "lbfgs"])
def test_a_stepped_optimizer_is_freed_without_the_cycle_collector(backend, kind):
    """The step plan held the optimizer (and a closure its method): an
    optimizer over 10M params, its cell run 8 times, kept 530 MB until
    gc.collect()."""
    def run():
        p = [np.ones(1000, np.float32), np.ones(10, np.float32)]
        g = [np.ones_like(a) for a in p]
        if kind == "sam":
            opt = fastopt.SAM(fastopt.SGD(p, lr=0.1, backend=backend))
            for _ in range(3):
                opt.perturb(g)
                opt.step(g)
            return weakref.ref(opt)
        if kind == "lbfgs":
            opt = fastopt.LBFGS(p, backend=backend)
            opt.step(lambda: (1.0, g))
            return weakref.ref(opt)
        opt = (fastopt.LAMB(p, backend=backend) if kind == "lamb" else fastopt.AdamW(
            p, backend=backend, max_grad_norm=1.0 if kind == "clip" else None,
            lr=fastopt.schedules.cosine_decay(1e-3, 100) if kind == "schedule" else 1e-3))
        for _ in range(3):
            opt.step(g)
        return weakref.ref(opt)
    gc.collect()
    gc.disable()
    try:
        assert run()() is None
    finally:
        gc.enable()


def test_a_loss_scaler_of_a_replaced_optimizer_says_del():
    scaler = fastopt.LossScaler()
    opt = fastopt.AdamW(_params(), loss_scaler=scaler)
    with pytest.raises(ValueError, match=r"`del` it first, or give this one a new LossScaler"):
        fastopt.AdamW(_params(), loss_scaler=scaler)
    del opt
    fastopt.AdamW(_params(), loss_scaler=scaler)


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["Adam", "RMSprop", "Adagrad", "LAMB"])
def test_an_np_matrix_is_refused_before_anything_is_written(backend, name):
    """Its * is a matrix product: the NumPy backend's g * g raised after the
    group's earlier arrays were written (the step not counted); the
    compiled backends took a matrix grad, the functional API raised from
    Cython's or Numba's dispatch."""
    a, M = np.ones(3), np.ones((2, 3))
    opt = getattr(fastopt, name)([a, M], lr=0.1, backend=backend, weight_decay=0.1)
    with pytest.raises(TypeError, match=r"grads\[1\] is an np.matrix.*np.asarray"):
        opt.step([np.ones(3), np.matrix(np.ones((2, 3)))])
    assert opt.iterations == 0 and (a == 1).all() and (M == 1).all()
    with pytest.raises(TypeError, match=r"\[1\] is an np.matrix.*keep using that view"):
        getattr(fastopt, name)([np.ones(3), np.matrix(np.ones((2, 3)))], backend=backend)
    P = [np.ones(3), np.matrix(np.ones((2, 3)))]
    m, v = [np.zeros(3), np.zeros((2, 3))], [np.zeros(3), np.zeros((2, 3))]
    with pytest.raises(TypeError, match=r"params\[1\] is an np.matrix"):
        fastopt.functional.adam(P, [np.ones(3), np.ones((2, 3))], m, v, step=1, lr=0.1,
                                backend=backend)
    assert (P[0] == 1).all()
    with pytest.raises(TypeError, match="is an np.matrix"):
        fastopt.global_norm([np.matrix([[3.0, 4.0]])])


@pytest.mark.parametrize("backend", BACKENDS)
def test_sam_with_a_schedule_that_ends_leaves_the_params_perturbed(backend):
    """On the NumPy backend SAM restores the params before the base step: a
    schedule failing there left them restored and the perturbation dropped
    (a retry: "called without perturb"); now named before the restore."""
    def lr(k):
        if k >= 2:
            raise ValueError("past the end")
        return 0.1
    p = [np.zeros(2)]
    sam = fastopt.SAM(fastopt.SGD(p, lr=lr, backend=backend), rho=0.05)
    g = [np.ones(2)]
    for _ in range(2):
        sam.perturb(g)
        sam.step(g)
    sam.perturb(g)
    perturbed = p[0].copy()
    with pytest.raises(ValueError, match="failed at step 2: ValueError: past the end"):
        sam.step(g)
    np.testing.assert_array_equal(p[0], perturbed)
    assert sam.perturbed
    sam.base_optimizer.param_groups[0]["lr"] = 0.25     # replaced: the run goes on
    sam.step(g)
    assert sam.base_optimizer.last_lr == [0.25]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [{"lr": "0.1"}, {"betas": (0.9, 2.0)}, {"eps": -1.0}])
def test_sam_refuses_a_bad_base_hyperparameter_with_the_params_still_perturbed(backend, bad):
    """A value read from a config as a string, a beta past 1, written into
    the base's group between perturb and step: on the NumPy backend the
    params were restored first, then the base step raised, and the retry
    said "called without perturb". The base's hyperparameters are checked
    before the restore on every backend."""
    p = [np.linspace(-1.0, 1.0, 5)]
    sam = fastopt.SAM(fastopt.AdamW(p, lr=0.01, backend=backend), rho=0.05)
    g = [np.ones(5)]
    sam.perturb(g)
    perturbed = p[0].copy()
    group = sam.base_optimizer.param_groups[0]
    good = {k: group[k] for k in bad}
    group.update(bad)
    with pytest.raises((TypeError, ValueError), match=r"param_groups\[0\]"):
        sam.step(g)
    np.testing.assert_array_equal(p[0], perturbed)
    assert sam.perturbed and sam.base_optimizer.iterations == 0
    group.update(good)
    sam.step(g)                                   # the retry steps from the restored point
    ref = [np.linspace(-1.0, 1.0, 5)]
    ref_sam = fastopt.SAM(fastopt.AdamW(ref, lr=0.01, backend=backend), rho=0.05)
    ref_sam.perturb(g)
    ref_sam.step(g)
    np.testing.assert_allclose(p[0], ref[0], rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", sorted(
    n for n, c in vars(fastopt).items() if isinstance(c, type)
    and issubclass(c, fastopt.optim.base.Optimizer) and c is not fastopt.optim.base.Optimizer))
def test_a_hyperparameter_set_as_an_attribute_is_refused_not_ignored(name):
    """``opt.lr = 0.01`` (a hand-written optimizer's or Keras' habit) set an
    attribute no step read: the lr never changed. Setting or reading one of
    the optimizer's hyperparameters as an attribute names the param groups;
    a pickled copy, unpickled where no instance was made yet, too."""
    p = [np.ones(3)]
    opt = getattr(fastopt, name)(p, lr=0.1)
    for attr in ("lr", "learning_rate"):
        with pytest.raises(AttributeError, match=r"param_groups\[i\]\['lr'\] = value"):
            setattr(opt, attr, 0.5)
        with pytest.raises(AttributeError, match=r"param_groups\[i\]\['lr'\] is the value"):
            getattr(opt, attr)
    assert opt.param_groups[0]["lr"] == 0.1 and not hasattr(opt, "lr")
    some_other = next(k for k in opt.defaults if k != "lr")
    with pytest.raises(AttributeError, match=f"keeps '{some_other}' in its param groups"):
        setattr(opt, some_other, opt.defaults[some_other])
    opt.notes = "anything else"         # the user's own attributes stay theirs
    assert opt.notes == "anything else"
    if name == "SGD":       # the wrappers, and subclasses from their first instance on
        sam = fastopt.SAM(opt)
        with pytest.raises(AttributeError, match="SAM keeps 'lr' in its param groups"):
            sam.lr = 0.5

        class Mine(fastopt.SGD):
            def __init__(self, params, lr, note=""):
                self.note = note            # a name of its own: fine
                super().__init__(params, lr=lr)
        assert Mine([np.ones(2)], 0.1, "x").note == "x"

        class KeepsLr(fastopt.SGD):
            def __init__(self, params, lr):
                self.lr = lr                # would never reach a step
                super().__init__(params, lr=lr)
        with pytest.raises(AttributeError, match="KeepsLr keeps 'lr' in its param groups"):
            KeepsLr([np.ones(2)], 0.1)
    code = ("import pickle, sys; import fastopt; opt = pickle.loads(sys.stdin.buffer.read())\n"
            "try:\n    opt.lr = 0.5\nexcept AttributeError as e:\n    print('refused', e)\n")
    import pickle
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(opt),
                         capture_output=True, timeout=120, check=True).stdout.decode()
    assert out.startswith(f"refused {name} keeps 'lr'")


def test_a_bare_step_or_zero_grad_is_told_to_pass_the_gradients():
    """torch's first lines, opt.step() and opt.zero_grad(), raised Python's
    'missing 1 required positional argument'."""
    p = [np.ones(2)]
    opt = fastopt.AdamW(p, lr=0.1)
    with pytest.raises(TypeError, match=r"AdamW.step\(\) needs the gradients: fastopt keeps "
                                        r"no .grad .* opt.step\(grads\)"):
        opt.step()
    with pytest.raises(TypeError, match=r"AdamW.zero_grad\(\) needs the gradients.* nothing "
                                        "to zero"):
        opt.zero_grad()
    sam = fastopt.SAM(fastopt.SGD(p, lr=0.1))
    with pytest.raises(TypeError, match=r"SAM.step\(\) needs the gradients"):
        sam.step()
    with pytest.raises(TypeError, match=r"SAM.zero_grad\(\) needs the gradients"):
        sam.zero_grad()
    assert opt.iterations == 0 and (p[0] == 1).all()


def test_grads_none_and_a_zero_max_grad_norm_say_what_to_give_instead():
    params = {"W": np.ones((2, 2)), "b": np.ones(2)}
    opt = fastopt.Adam(params, lr=0.1)
    with pytest.raises(TypeError, match=r"grads is None: .*\(a dict by the params' keys, "
                                        r".*give None for each gradient"):
        opt.step(None)
    with pytest.raises(ValueError, match=r"max_grad_norm must be > 0.0, got 0.0: None turns "
                                         r"clipping off"):
        fastopt.Adam(params, max_grad_norm=0.0)
    opt.step({"W": None, "b": None})        # what the message says: nothing moves
    assert opt.iterations == 1 and (params["W"] == 1).all()


def test_zero_grad_given_the_params_refuses_to_zero_the_weights():
    """opt.zero_grad(params), torch's opt.zero_grad() ported, zeroed the model."""
    params = {"W": np.ones((2, 2)), "b": np.ones(2)}
    opt = fastopt.Adam(params, lr=0.1)
    with pytest.raises(ValueError, match=r"grads\['W'\] is params\['W'\] .*would zero the "
                                         r"model's weights"):
        opt.zero_grad(params)
    theta = np.ones(5)
    views = fastopt.SGD([theta[:2], theta[2:]], lr=0.1)
    with pytest.raises(ValueError, match=r"grads\[1\] is params\[1\]"):
        views.zero_grad([np.ones(2), theta[2:]])
    assert (params["W"] == 1).all() and (params["b"] == 1).all() and (theta == 1).all()
    grads = {"W": np.ones((2, 2)), "b": np.ones(2)}
    opt.zero_grad(grads)
    assert not grads["W"].any() and not grads["b"].any()
    flat = np.ones(5)               # gradients as views of one buffer of the user's
    views.zero_grad([flat[:2], flat[2:]])
    assert not flat.any()
    columns = np.ones((4, 2))       # interleaved: extents meet, no element shared
    opt2 = fastopt.SGD([np.zeros(4), np.zeros(4)], lr=0.1)
    opt2.zero_grad([columns[:, 0], columns[:, 1]])
    assert not columns.any()
    g = np.ones(4)
    opt2.zero_grad([g, g])          # one array twice: zeroed, as before
    assert not g.any()


def test_torch_habits_get_told_what_fastopt_takes():
    """Four habits from torch or hand-written code that raised messages
    about something else (or nothing): a path given to load_state_dict, a
    torch state_dict, step(grads, closure), and hyperparameters passed
    positionally to the functional steps (sgd's 0.9 became the buffers,
    then ignored: no momentum)."""
    p = [np.ones(2)]
    opt = fastopt.Adam(p, lr=0.1)
    opt.step([np.ones(2)])
    before = opt.state_dict()
    with pytest.raises(fastopt.CheckpointError, match=r"got a path \('ck.npz'\): "
                                                      r"fastopt.load\(path"):
        opt.load_state_dict("ck.npz")
    with pytest.raises(fastopt.CheckpointError, match="torch.optim's state_dict layout"):
        opt.load_state_dict({"state": {0: {}}, "param_groups": [{"params": [0]}]})
    assert opt.iterations == 1 and opt.state_dict()["iterations"] == before["iterations"]
    free = fastopt.Adam(lr=0.1)
    with pytest.raises(TypeError, match="second argument is params .* not a closure"):
        free.step([np.ones(2)], lambda: 0.0)
    F = fastopt.functional
    m, v = [np.zeros(2)], [np.zeros(2)]
    with pytest.raises(TypeError, match=r"max_exp_avg_sqs must be arrays like params, got "
                                        r"float 0.001: .* keyword-only"):
        F.adam(p, [np.ones(2)], m, v, 1e-3, step=1)
    with pytest.raises(TypeError, match="momentum_buffers must be arrays like params, got "
                                        "float 0.9"):
        F.sgd(p, [np.ones(2)], 0.9, lr=0.1)
    np.testing.assert_array_equal(m[0], 0.0)
    # a bare array among group dicts was named as a bad array inside group 0
    with pytest.raises(TypeError, match=r"params\[0\] is a param-group dict but params\[1\] "
                                        r"is not one \(ndarray\).*\{'params': \[w\]\}"):
        fastopt.AdamW([{"params": [np.ones(2)]}, np.ones(3)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_sam_refuses_a_param_frozen_between_perturb_and_step_with_it_still_perturbed(backend):
    """The NumPy backend's separate restore wrote the frozen param back,
    then the base refused it: the perturbation was gone, and a retry said
    "called without perturb"."""
    P = fastopt.flat_zeros([(3,), (2,)], np.float64)
    P.data[:] = 1.0
    sam = fastopt.SAM(fastopt.SGD(P, lr=0.1, backend=backend), rho=0.05)
    G = P.zeros_like()
    G.data[:] = 1.0
    sam.perturb(G)
    perturbed = P.data.copy()
    P[0].flags.writeable = False
    with pytest.raises(ValueError, match=r"params\[0\] is read-only now"):
        sam.step(G)
    np.testing.assert_array_equal(P.data, perturbed)
    assert sam.perturbed
    P[0].flags.writeable = True
    sam.step(G)
    np.testing.assert_allclose(P.data, 0.9)
