"""Learning-rate schedules: values against torch.optim.lr_scheduler, the
closed form, composition, serialisation and use inside the optimizers."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

import fastopt
from fastopt import schedules as S

torch = pytest.importorskip("torch")

RTOL = 1e-12   # closed form vs torch's recursive updates: float64 rounding only


def torch_lrs(make_sched, n, base_lr=0.1):
    """The lr torch uses at each of ``n`` optimizer steps (step 0 first)."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=base_lr)
    sched = make_sched(opt)
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(n):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
    return np.array(out)


def ours(sched, n):
    return np.array([sched(t) for t in range(n)])


L = torch.optim.lr_scheduler

CASES = [
    ("LinearLR", lambda o: L.LinearLR(o, start_factor=0.25, end_factor=1.0, total_iters=7),
     S.linear(0.025, 0.1, 7), 20),
    ("LinearLR-down", lambda o: L.LinearLR(o, start_factor=1.0, end_factor=0.1, total_iters=13),
     S.linear(0.1, 0.01, 13), 30),
    ("CosineAnnealingLR", lambda o: L.CosineAnnealingLR(o, T_max=50, eta_min=1e-3),
     S.cosine_decay(0.1, 50, final_value=1e-3), 51),
    ("CosineAnnealingLR-alpha", lambda o: L.CosineAnnealingLR(o, T_max=17, eta_min=0.01),
     S.cosine_decay(0.1, 17, alpha=0.1), 18),
    ("StepLR", lambda o: L.StepLR(o, step_size=5, gamma=0.5), S.step_decay(0.1, 0.5, step_size=5), 40),
    ("MultiStepLR", lambda o: L.MultiStepLR(o, milestones=[3, 10, 11], gamma=0.1),
     S.step_decay(0.1, 0.1, milestones=[10, 3, 11]), 20),
    ("ExponentialLR", lambda o: L.ExponentialLR(o, gamma=0.95), S.exponential(0.1, 0.95), 100),
    ("OneCycleLR-cos", lambda o: L.OneCycleLR(o, max_lr=0.1, total_steps=100, cycle_momentum=False),
     S.one_cycle(0.1, 100), 100),
    ("OneCycleLR-linear", lambda o: L.OneCycleLR(o, max_lr=0.1, total_steps=37, pct_start=0.25,
                                                 anneal_strategy="linear", cycle_momentum=False),
     S.one_cycle(0.1, 37, pct_start=0.25, anneal="linear"), 37),
    ("OneCycleLR-3phase", lambda o: L.OneCycleLR(o, max_lr=0.1, total_steps=50, three_phase=True,
                                                 div_factor=10, final_div_factor=100,
                                                 cycle_momentum=False),
     S.one_cycle(0.1, 50, three_phase=True, div_factor=10, final_div_factor=100), 50),
    ("SequentialLR", lambda o: L.SequentialLR(o, [L.LinearLR(o, start_factor=0.1, total_iters=5),
                                                  L.CosineAnnealingLR(o, T_max=20, eta_min=1e-3)],
                                              milestones=[5]),
     S.join([S.linear(0.01, 0.1, 5), S.cosine_decay(0.1, 20, final_value=1e-3)], [5]), 26),
]


@pytest.mark.parametrize("name,make,sched,n", CASES, ids=[c[0] for c in CASES])
def test_matches_torch(name, make, sched, n):
    np.testing.assert_allclose(ours(sched, n), torch_lrs(make, n), rtol=RTOL, atol=0)


def test_deliberate_differences_from_torch():
    # Past T_max torch's cosine rises again (period 2*T_max); ours holds the floor.
    t = torch_lrs(lambda o: L.CosineAnnealingLR(o, T_max=10, eta_min=0.0), 15)
    c = S.cosine_decay(0.1, 10)
    assert t[14] > 0 and c(14) == 0.0
    # one_cycle holds its final value past total_steps (torch raises).
    oc = S.one_cycle(0.1, 10)
    assert oc(10) == oc(9) == oc(1000)


def test_formulas():
    w = S.warmup_cosine(peak_value=1.0, warmup_steps=10, total_steps=110, alpha=0.1)
    assert w(0) == 0.0 and w(5) == 0.5 and w(10) == 1.0
    assert w(60) == pytest.approx(0.55, rel=1e-15)
    assert w(110) == pytest.approx(0.1, rel=1e-15) and w(10**6) == w(110)
    assert S.constant(3e-4)(123) == 3e-4
    assert S.warmup(1.0, 4)(2) == 0.5 and S.warmup(1.0, 4)(99) == 1.0
    assert S.linear(1.0, 0.0, 10, transition_begin=5)(5) == 1.0
    assert S.linear(1.0, 0.0, 10, transition_begin=5)(10) == 0.5
    j = S.join([S.constant(1.0), S.constant(2.0), S.exponential(4.0, 0.5)], [3, 6])
    assert [j(t) for t in range(9)] == [1, 1, 1, 2, 2, 2, 4, 2, 1]
    assert S.cosine_decay(2.0, 4, alpha=0.25)(4) == 0.5


@pytest.mark.parametrize("sched", [c[2] for c in CASES] + [
    S.constant(0.5), S.warmup_cosine(1e-3, 5, 50, final_value=1e-5)])
def test_round_trip(sched):
    spec = json.loads(json.dumps(sched.to_dict()))
    back = S.from_dict(spec)
    assert back == sched and repr(back) == repr(sched)
    assert ours(back, 60).tobytes() == ours(sched, 60).tobytes()


@pytest.mark.parametrize("bad,err", [
    (lambda: S.linear(1.0, 0.0, 0), ValueError),
    (lambda: S.cosine_decay(-1.0, 10), ValueError),
    (lambda: S.step_decay(1.0, 0.1), ValueError),
    (lambda: S.step_decay(1.0, 0.1, step_size=2, milestones=[3]), ValueError),
    (lambda: S.join([S.constant(1.0), S.constant(2.0)], [3, 4]), ValueError),
    (lambda: S.join([S.constant(1.0), S.constant(2.0), S.constant(3.0)], [4, 4]), ValueError),
    (lambda: S.one_cycle(1.0, 10, anneal="cosine"), ValueError),
    (lambda: S.exponential(1.0, float("nan")), ValueError),
    (lambda: S.from_dict({"kind": "nope"}), ValueError),
    (lambda: S.from_dict({"kind": "constant", "valu": 1.0}), ValueError),
    (lambda: S.constant(1.0)(-1), ValueError),
    (lambda: S.constant(1.0)(1.5), TypeError),
])
def test_bad_arguments(bad, err):
    with pytest.raises(err):
        bad()


@pytest.mark.filterwarnings("ignore:param_groups.*is at 0:RuntimeWarning")   # (past its end on purpose)
def test_optimizer_uses_schedule_per_group_and_matches_torch():
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal(6)
    grads = [rng.standard_normal(6) for _ in range(12)]
    sched = S.warmup_cosine(0.1, 3, 10, alpha=0.0)
    a, b = w0[:3].copy(), w0[3:].copy()
    opt = fastopt.SGD([{"params": [a]}, {"params": [b], "lr": 0.05}], lr=sched,
                      momentum=0.9, backend="numpy")
    ta = torch.nn.Parameter(torch.tensor(w0[:3]))
    tb = torch.nn.Parameter(torch.tensor(w0[3:]))
    topt = torch.optim.SGD([{"params": [ta]}, {"params": [tb]}], lr=0.1, momentum=0.9)
    lam = L.LambdaLR(topt, [lambda t: sched(t) / 0.1, lambda t: 0.5])
    for t, g in enumerate(grads):
        opt.step([g[:3].copy(), g[3:].copy()])
        assert opt.last_lr == [sched(t), 0.05]
        ta.grad, tb.grad = torch.tensor(g[:3]), torch.tensor(g[3:])
        topt.step()
        lam.step()
    np.testing.assert_allclose(a, ta.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(b, tb.detach().numpy(), rtol=1e-12)
    assert opt.iterations == len(grads)


def test_changing_lr_between_steps_does_not_recompile():
    pytest.importorskip("numba")
    p = np.zeros(8, np.float32)
    g = np.ones(8, np.float32)
    opt = fastopt.AdamW(p, lr=S.exponential(1e-3, 0.9), backend="numba")
    opt.step(g)
    from fastopt.backends import numba_cpu
    kernels = (numba_cpu._table_serial,)     # what the step calls from Python
    before = [len(k.signatures) for k in kernels]
    assert all(before)
    for lr in (S.constant(1e-2), 3e-4, S.linear(1e-3, 0.0, 5)):
        opt.param_groups[0]["lr"] = lr
        opt.step(g)
    assert [len(k.signatures) for k in kernels] == before


def test_bad_schedule_value_rejected_before_writing():
    p = np.ones(4)
    opt = fastopt.SGD(p, lr=S.constant(0.1), backend="numpy")
    opt.param_groups[0]["lr"] = lambda t: float("nan")
    with pytest.raises(ValueError, match="schedule value at step 0"):
        opt.step(np.ones(4))
    assert (p == 1).all() and opt.iterations == 0


def test_parse_schedule_builds_the_same_schedules_as_the_constructors():
    text = "join([linear(0.0, 1e-3, 10), cosine_decay(1e-3, 90, alpha=0.1)], [10])"
    parsed = S.parse_schedule(text)
    built = S.join([S.linear(0.0, 1e-3, 10), S.cosine_decay(1e-3, 90, alpha=0.1)], [10])
    assert parsed.to_dict() == built.to_dict()
    assert [parsed(t) for t in range(120)] == [built(t) for t in range(120)]
    spec = S.one_cycle(1e-3, 100).to_dict()
    assert S.parse_schedule(json.dumps(spec)).to_dict() == spec


@pytest.mark.parametrize("text, message", [
    ("__import__('os').getcwd()", "unknown schedule"),
    ("from_dict({'kind': 'constant', 'value': 1.0})", "unknown schedule"),
    ("parse_schedule('constant(1)')", "unknown schedule"),
    ("constant(1e-3) + 1", "written as name"),
    ("constant(1e-3", "cannot parse"),
    ("cosine_decay(1e-3, -5)", "cosine_decay"),
])
def test_parse_schedule_refuses_anything_but_constructor_calls(text, message):
    with pytest.raises(ValueError, match=message):
        S.parse_schedule(text)


def test_settles_at_is_where_the_schedule_stops_changing():
    assert S.settles_at(S.warmup_cosine(1e-3, 10, 100)) == 100
    assert S.settles_at(S.constant(1e-3)) == 0
    sched = S.parse_schedule("join([constant(1.0), linear(1.0, 0.0, 50)], [20])")
    assert S.settles_at(sched) == 70
    assert sched(69) != sched(70) == sched(500)


def test_plot_schedule_cli(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from fastopt.cli import main
    out = tmp_path / "lr.png"
    rc = main(["plot-schedule", "warmup_cosine(1e-3, 10, 100)",
               json.dumps(S.one_cycle(1e-3, 100).to_dict()), "--steps", "120", "-o", str(out)])
    assert rc == 0 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot-schedule", "__import__('os').getcwd()"]) == 2
    assert "unknown schedule" in capsys.readouterr().err


def test_plot_schedule_without_matplotlib(monkeypatch, capsys, tmp_path):
    import sys
    from fastopt.cli import main
    monkeypatch.setitem(sys.modules, "matplotlib", None)    # import fails
    assert main(["plot-schedule", "constant(1e-3)", "-o", str(tmp_path / "x.png")]) == 1
    assert "needs matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_a_copy_keeps_the_lr_schedule_and_its_place(how):
    """A pickled (or deep-copied) optimizer keeps its schedule: the group's
    lr is a new float object after pickling, which must not read as a number
    the user wrote over the schedule."""
    import copy
    import pickle

    sched = S.linear(1.0, 0.0, 10)
    opt = fastopt.SGD([np.ones(4)], lr=sched)
    for _ in range(3):
        opt.step([np.ones(4)])
    params = opt.param_groups[0]["params"]
    mine, twin = (pickle.loads(pickle.dumps((params, opt))) if how == "pickle"
                  else copy.deepcopy((params, opt)))
    assert twin.lr_schedule(0) is not None
    for _ in range(3):
        opt.step([np.ones(4)])
        twin.step([np.ones(4)])
        assert twin.last_lr == opt.last_lr
    np.testing.assert_array_equal(mine[0], opt.param_groups[0]["params"][0])
    assert mine[0] is twin.param_groups[0]["params"][0]
    twin.param_groups[0]["lr"] = 0.25             # a number written over it still wins
    twin.step([np.ones(4)])
    assert twin.last_lr == [0.25] and twin.lr_schedule(0) is None


def test_a_schedule_that_overflows_is_named_at_the_step():
    """exponential with gamma > 1 overflows a float after enough steps: the
    step names the group's lr and the step (an OverflowError from deep in
    the schedule before), and nothing is written; plot-schedule says so in
    one line, and a spec with a kind that is no name is a ValueError."""
    p = [np.ones(3)]
    opt = fastopt.SGD(p, lr=fastopt.schedules.exponential(1e-3, 1.5))
    opt.iterations = 1768       # 1e-3 * 1.5**1768 > 1.8e308
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['lr'\]: the schedule failed at "
                                         r"step 1768"):
        opt.step([np.ones(3)])
    assert p[0].tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="unknown schedule kind"):
        fastopt.schedules.parse_schedule('{"kind": ["x"]}')
    with pytest.raises(ValueError, match="cannot parse schedule"):
        fastopt.schedules.parse_schedule('{"kind": 1,')


def test_growing_schedules_empty_milestones_and_arithmetic_say_what_is_wrong():
    """An exponential with gamma > 1 overflowed with a bare errno message;
    empty milestones (a constant) crashed plot-schedule's range; arithmetic
    in a schedule's text said "malformed node or string"."""
    with pytest.raises(ValueError, match=r"exponential\(init_value=0.001, gamma=1.5\) at step "
                                         r"10000: the lr grows past the largest float"):
        S.exponential(1e-3, 1.5)(10000)
    flat = S.step_decay(1e-3, 0.5, milestones=[])
    assert flat(0) == flat(10 ** 6) == 1e-3 and S.settles_at(flat) == 0
    with pytest.raises(ValueError, match=r"'10 \*\* 3' is not a literal.*write 1000"):
        S.parse_schedule("cosine_decay(1e-3, 10**3)")


def test_plot_schedule_of_an_overflowing_or_constant_schedule(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from fastopt.cli import main
    out = tmp_path / "s.png"
    assert main(["plot-schedule", "step_decay(1e-3, 0.5, milestones=[])", "-o", str(out)]) == 0
    assert out.is_file()
    assert main(["plot-schedule", "exponential(1e-3, 1.5)", "--steps", "3000",
                 "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "at step 1768: the lr grows past" in err


@pytest.mark.filterwarnings("ignore:param_groups.*is at 0:RuntimeWarning")   # (past its end on purpose)
def test_a_schedule_assigned_mid_run_starts_from_its_beginning_with_from_step():
    # read at the optimizer's count, cosine_decay(1e-3, 50) assigned at step
    # 100 sat at its floor (0) for good; from_step starts it there
    p = [np.ones(3)]
    opt = fastopt.SGD(p, lr=0.1)
    for _ in range(100):
        opt.step([np.zeros(3)])
    cos = fastopt.schedules.cosine_decay(1e-3, 50)
    opt.param_groups[0]["lr"] = fastopt.schedules.from_step(cos, opt.iterations)
    used = []
    for _ in range(60):
        opt.step([np.zeros(3)])
        used += opt.last_lr
    assert used == [cos(k) for k in range(60)] and used[0] == 1e-3
    sched = opt.lr_schedule(0)
    assert fastopt.schedules.from_dict(sched.to_dict()) == sched
    assert fastopt.schedules.parse_schedule("from_step(cosine_decay(1e-3, 50), 100)") == sched
    assert fastopt.schedules.from_step(cos, 0) is cos
    with pytest.raises(ValueError, match="start"):
        fastopt.schedules.from_step(cos, -1)
    with pytest.raises(TypeError, match="takes a fastopt schedule"):
        fastopt.schedules.from_step(lambda step: 1e-3, 5)


def test_a_schedule_failing_ahead_of_its_step_leaves_the_step_taken():
    """Each step shows the next step's lr in param_groups; an IndexError
    there (a list of lrs run out) came out of the step that had just been
    taken, and a loop that retried took it twice. The step that needs the
    value raises, naming it, before writing."""
    lrs = [0.1, 0.2, 0.3]
    p = [np.zeros(2)]
    opt = fastopt.SGD(p, lr=lambda k: lrs[k])
    for k in range(3):
        opt.step([np.ones(2)])
    np.testing.assert_allclose(p[0], [-0.6, -0.6])
    assert opt.iterations == 3 and opt.last_lr == [0.3]
    with pytest.raises(ValueError, match=r"failed at step 3: IndexError: list index out") as err:
        opt.step([np.ones(2)])
    assert isinstance(err.value.__cause__, IndexError)      # its traceback kept
    np.testing.assert_allclose(p[0], [-0.6, -0.6])
    assert opt.iterations == 3


def test_a_checkpoint_at_a_schedules_end_loads(tmp_path):
    """A schedule that raises past its last step (as torch's OneCycleLR), or
    an lr range test that overflows: the run's last checkpoint was refused
    by load ("does not match"), its schedule then not replaceable."""
    class Strict(S.Schedule):
        kind = "strict_test_schedule"

        def __init__(self, n):
            self._args = {"n": n}

        def value(self, step):
            if step >= self._args["n"]:
                raise ValueError(f"past its {self._args['n']} steps")
            return 0.1
    p = [np.zeros(2)]
    opt = fastopt.SGD(p, lr=Strict(3))
    for _ in range(3):
        opt.step([np.ones(2)])
    fastopt.save(tmp_path / "c.npz", params=p, optimizer=opt)
    q = [np.ones(2)]
    again = fastopt.SGD(q, lr=Strict(3))
    fastopt.load(tmp_path / "c.npz", params=q, optimizer=again)
    np.testing.assert_array_equal(q[0], p[0])
    with pytest.raises(ValueError, match="failed at step 3: ValueError: past its 3 steps"):
        again.step([np.ones(2)])
    again.param_groups[0]["lr"] = 0.01                   # replaced, the run goes on
    again.step([np.ones(2)])
    np.testing.assert_allclose(q[0], p[0] - 0.01)
    fresh = fastopt.SGD([np.zeros(2)], lr=Strict(3))      # at step 0 it is still refused
    sd = fresh.state_dict()
    sd["param_groups"][0]["lr"] = {"schedule": {"kind": "strict_test_schedule", "n": 0}}
    with pytest.raises(ValueError, match="failed at step 0"):
        fresh.load_state_dict(sd)


def test_closed_forms_overflow_only_where_the_lr_does():
    # gamma ** step overflowed first: "grows past the largest float" for an lr of 0
    assert S.exponential(0.0, 2.0)(2000) == 0.0
    assert S.step_decay(0.0, 2.0, step_size=1)(2000) == 0.0
    assert S.exponential(1e-300, 1e10)(31) == pytest.approx(1e10, rel=1e-12)
    assert S.exponential(0.5, 0.9)(7) == 0.5 * 0.9 ** 7         # torch's bits where it fits
    for s, k in ((S.exponential(1.0, 2.0), 2000), (S.exponential(10.0, 2.0), 1023),
                 (S.step_decay(10.0, 2.0, step_size=1), 1023), (S.exponential(1.0, 2.0), 1024),
                 (S.exponential(1e-300, 1e300), 10 ** 306)):
        with pytest.raises(ValueError, match="grows past the largest float"):
            s(k)           # never inf, nor a float rounded back under the largest


def test_small_schedule_edges():
    assert len({S.constant(-0.0), S.constant(0.0)}) == 1       # equal, so one hash
    assert S.one_cycle(1.0, 100, three_phase=np.bool_(True)).to_dict()["three_phase"] is True
    with pytest.raises(TypeError, match="weight_decay is a linear: only lr takes a schedule"):
        fastopt.AdamW([np.zeros(3)], weight_decay=S.linear(0.1, 0.0, 10))
    unbound = fastopt.SGD(lr=S.linear(0.1, 0.0, 10))
    with pytest.raises(RuntimeError, match=r"no params yet.*opt.defaults\['lr'\]"):
        unbound.lr_schedule(0)
    unbound.bind([np.zeros(3)])
    assert unbound.lr_schedule(-1) == S.linear(0.1, 0.0, 10)
    with pytest.raises(IndexError, match="param group 1 of 1"):
        unbound.lr_schedule(1)


def test_plot_schedule_draws_each_break(tmp_path):
    """It drew every ceil(steps/4000)-th step: a one-step spike at 5000 of
    11000 steps was missing, step decay's drops late."""
    from fastopt.cli.plot_schedule import _breaks
    spike = S.join([S.constant(1e-3), S.constant(0.1), S.constant(1e-3)], [5000, 5001])
    found = set()
    _breaks(spike.to_dict(), 0, 11000, found)
    assert {4999, 5000, 5001} <= found
    found = set()
    _breaks(S.join([S.constant(1.0), S.step_decay(1.0, 0.5, step_size=7)], [10]).to_dict(),
            0, 100, found)
    assert {16, 17, 23, 24} <= found and 9 in found
    pytest.importorskip("matplotlib")
    import matplotlib.axes

    from fastopt.cli import main
    drawn = []
    real = matplotlib.axes.Axes.plot

    def plot(self, xs, ys, *a, **k):
        drawn.append(max(ys))
        return real(self, xs, ys, *a, **k)
    import unittest.mock
    with unittest.mock.patch.object(matplotlib.axes.Axes, "plot", plot):
        assert main(["plot-schedule", "join([constant(0.001), constant(0.1), constant(0.001)], "
                     "[5000, 5001])", "-o", str(tmp_path / "s.png")]) == 0
    assert drawn == [0.1]


def test_join_of_numbers_and_a_call_missing_an_argument_say_what_to_write():
    """join([0.1, 0.01], [10]) said "a schedule spec is a dict with a 'kind'
    key"; "warmup_cosine(1e-3, 10)" on the command line said
    "warmup_cosine.__init__() missing 1 required positional argument"."""
    from fastopt import schedules as S
    with pytest.raises(TypeError, match=r"schedules\[1\] is the number 0.01, not a schedule: "
                                        r"constant\(0.01\)"):
        S.join([S.constant(0.1), 0.01], [10])
    with pytest.raises(ValueError, match=r"warmup_cosine\(peak_value, warmup_steps, "
                                         r"total_steps, .*\): missing a required argument: "
                                         r"'total_steps'"):
        S.parse_schedule("warmup_cosine(1e-3, 10)")


def test_a_schedule_takes_an_array_of_steps_to_plot():
    s = fastopt.schedules.warmup_cosine(0.1, 10, 100)
    steps = np.arange(120).reshape(4, 30)
    values = s(steps)
    assert values.dtype == np.float64 and values.shape == (4, 30)
    assert values.ravel().tolist() == [s(k) for k in range(120)]
    assert s(range(5)).tolist() == [s(k) for k in range(5)]
    assert type(s(np.array(7))) is float          # a 0-d array: one step, as before
    with pytest.raises(TypeError, match="steps must be integers"):
        s(np.linspace(0, 1, 3))
    with pytest.raises(ValueError, match="step must be >= 0"):
        s(np.array([3, -1]))


def test_warmup_cosine_as_optax_defines_it_and_its_argument_order_refused():
    """optax's warmup_cosine_decay_schedule(init, peak, warmup, decay_steps,
    end): decay_steps counts the warmup, warmup 0 is the cosine alone. Its
    argument order (init_value first) put a 0.0 peak here without a word."""
    def optax_like(t, init, peak, warmup, decay_steps, end):   # its definition, by hand
        if warmup and t < warmup:
            return init + (peak - init) * t / warmup
        frac = min(t - warmup, decay_steps - warmup) / (decay_steps - warmup)
        return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * frac))
    for warmup, init in ((0, 0.0), (7, 1e-4)):
        s = S.warmup_cosine(3e-3, warmup, 50, init_value=init, final_value=1e-5)
        for t in range(60):
            assert s.value(t) == pytest.approx(optax_like(t, init, 3e-3, warmup, 50, 1e-5),
                                               rel=1e-12, abs=1e-18)
        assert S.from_dict(s.to_dict()).to_dict() == s.to_dict()
    assert S.warmup_cosine(1.0, 0, 10).value(0) == 1.0
    with pytest.raises(ValueError, match="peak_value is 0 below init_value 1000.*optax's "
                                         "warmup_cosine_decay_schedule takes init_value first"):
        S.warmup_cosine(0.0, 3, 100, 1000)
    with pytest.raises(TypeError, match="warmup_steps must be an int.*optax's"):
        S.warmup_cosine(0.0, 1e-3, 100, 1000)
    with pytest.raises(ValueError, match="init_value 0.1 with warmup_steps=0"):
        S.warmup_cosine(1.0, 0, 10, init_value=0.1)
    # an lr of 0 throughout (a control run) is still a schedule
    assert S.from_dict(S.warmup_cosine(0.0, 3, 100).to_dict()).value(50) == 0.0


def test_steps_past_a_schedules_end_at_lr_0_are_said_once():
    # a warm start (or partial_fit) after a finished cosine run stepped at
    # lr 0 without a word, the weights never moving
    import warnings
    p = [np.ones(2)]
    opt = fastopt.Adam(p, lr=fastopt.schedules.cosine_decay(1e-2, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(10):             # the run the schedule was made for
            opt.step([np.ones(2)])
    with pytest.warns(RuntimeWarning, match=r"lr schedule cosine_decay\(.*\) is at 0 "
                                            r"\(step 10, past its end\?\)") as said:
        for _ in range(3):
            opt.step([np.ones(2)])
    assert len(said) == 1
    # a warmup from 0 is no end, nor a 0 written over a schedule (it ends it)
    r = [np.ones(2)]
    stopped = fastopt.SGD(r, lr=fastopt.schedules.cosine_decay(1e-2, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stopped.step([np.ones(2)])
        stopped.param_groups[0]["lr"] = 0.0
        stopped.step([np.ones(2)])
    q = [np.ones(2)]
    warm = fastopt.Adam(q, lr=fastopt.schedules.warmup_cosine(1e-2, 3, 10, init_value=0.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(10):
            warm.step([np.ones(2)])
