"""A Ctrl-C during a step's writes: the step is completed, then the
KeyboardInterrupt goes on (fastopt.optim.interrupt). After it the optimizer
is exactly as before the step or exactly as after it, params, state and
counters together, and later steps match a run never interrupted.

Python raises a KeyboardInterrupt between bytecodes: as a native call
returns (its result lost), or at a later line. Both are injected: at every
line event of the step's Python (a trace function raising it, as the
tables test in test_all_or_nothing does), and at the return of each native
call (a wrapper around it). A real SIGINT during large steps closes it."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import numpy as np
import pytest

import fastopt
from fastopt.optim import base

from conftest import FAST_BACKENDS, assert_same_tree, optimizer_snapshot

OPTIM_DIR = os.path.dirname(base.__file__)


def setups():
    """(name, make(backend) -> (params, opt), grads(step) -> list): the
    step's paths: one group without a norm (the list step), clipped (the
    fused norm pass), two groups, a finish of its own (NAdam), a norm that
    overflows (the exact check and its second kernel call), an lr schedule
    (the value it shows in its group written at the step's end), compact
    state just loaded (the table's cache of its buffers made again)."""
    def arrays():
        return [np.linspace(-1, 1, 12).reshape(3, 4), np.ones(5), np.full(6, 2.0)]

    def grads(k):
        return [np.full((3, 4), 0.3 - 0.1 * k), np.full(5, -0.2 + 0.05 * k), np.full(6, 0.1)]

    def one(backend):
        p = arrays()
        return p, fastopt.Adam(p, lr=1e-2, backend=backend)

    def clipped(backend):
        p = arrays()
        return p, fastopt.AdamW(p, lr=1e-2, backend=backend, max_grad_norm=0.5)

    def two(backend):
        p = arrays()
        return p, fastopt.Adam([{"params": p[:2]}, {"params": [p[2]], "lr": 0.1}], lr=1e-2,
                               backend=backend)

    def nadam(backend):
        p = arrays()
        return p, fastopt.NAdam([{"params": p[:2]}, {"params": [p[2]], "lr": 0.1}], lr=1e-2,
                                backend=backend)
    def scheduled(backend):
        p = arrays()
        sched = fastopt.schedules.warmup_cosine(0.1, 2, 10)
        return p, fastopt.Adam([{"params": p[:2], "lr": sched}, {"params": [p[2]]}], lr=1e-2,
                               backend=backend)

    def resumed(backend):   # compact state loaded from a checkpoint: its buffers are new
        p = [a.astype(np.float32) for a in arrays()]
        opt = fastopt.Adam(p, lr=1e-2, backend=backend, state_dtype="int8")
        opt.step([g.astype(np.float32) for g in grads(5)])
        opt.load_state_dict(opt.state_dict())
        return p, opt

    def grads32(k):
        return [g.astype(np.float32) for g in grads(k)]

    def huge(k):            # finite, but their float64 squares overflow the norm's sum
        return [np.full((3, 4), 1e160), np.full(5, -1e160 * (k + 1)), np.full(6, 1e155)]
    return [("one", one, grads), ("clipped", clipped, grads), ("two", two, grads),
            ("nadam", nadam, grads), ("overflow", clipped, huge),
            ("scheduled", scheduled, grads), ("resumed-int8", resumed, grads32)]


SETUPS = setups()


def counters(opt):
    # (NAdam's "mu_product_pending" is worked out by each step before its
    # first write, used by that step only: an earlier step's is no state)
    return (opt.iterations, opt.skipped_steps,
            [{k: v for k, v in st.items()
              if not isinstance(v, (dict, list)) and not k.endswith("_pending")}
             for st in opt.state])


def snapshot_of(opt, params):
    snap = optimizer_snapshot(opt, params)
    for st in snap["state"]:
        for k in [k for k in st if k.endswith("_pending")]:
            del st[k]
    return snap


def run_reference(make, grads, backend, steps):
    """Snapshots after 0..steps uninterrupted steps."""
    params, opt = make(backend)
    snaps = [(snapshot_of(opt, params), counters(opt))]
    for k in range(steps):
        opt.step(grads(k))
        snaps.append((snapshot_of(opt, params), counters(opt)))
    return snaps


def check_whole(opt, params, snaps, k):
    """After an interrupted step k: as after step k-1 or as after step k."""
    now = (snapshot_of(opt, params), counters(opt))
    done = opt.iterations - snaps[0][1][0]      # steps since make (a resumed one has some)
    assert done in (k, k + 1), (done, k)
    assert now[1] == snaps[done][1]
    assert_same_tree(now[0], snaps[done][0])
    return done


#: the setups whose step is traced into the backends' Python too (the
#: tables' caches), not only the optimizer's
TRACE_BACKENDS = {"resumed-int8"}
BACKENDS_DIR = os.path.join(os.path.dirname(OPTIM_DIR), "backends")


#: not traced: the check of who holds the params (orphans.py), which runs
#: before anything is read or written, its hundreds of lines a step apiece
#: at step counts 0, 1, 2, 4, ... (an interrupt there: test_replaced_params)
UNTRACED = os.path.join(OPTIM_DIR, "orphans.py")


def trace_lines(on_line, dirs=(OPTIM_DIR,)):
    def trace(frame, event, arg):
        if not frame.f_code.co_filename.startswith(dirs) or \
                frame.f_code.co_filename == UNTRACED:
            return None

        def line(f, ev, a):
            if ev == "line":
                on_line()
            return line
        return line
    return trace


def count_lines(call, dirs):
    """The line events of ``call()`` in files under ``dirs``."""
    previous, count = sys.gettrace(), []
    sys.settrace(trace_lines(lambda: count.append(1), dirs))
    try:
        call()
    finally:
        sys.settrace(previous)
    return len(count)


def interrupted_at(target, call, dirs):
    """``call()`` with a KeyboardInterrupt raised at its line event number
    ``target``: whether one came out."""
    previous, seen = sys.gettrace(), []

    def interrupt():
        seen.append(1)
        if len(seen) == target + 1:
            raise KeyboardInterrupt
    sys.settrace(trace_lines(interrupt, dirs))
    try:
        call()
        return False
    except KeyboardInterrupt:
        return True
    finally:
        sys.settrace(previous)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("name,make,grads", SETUPS, ids=[s[0] for s in SETUPS])
@pytest.mark.parametrize("which", [0, 2], ids=["first-step", "planned-step"])
def test_an_interrupt_at_any_line_of_a_step_leaves_it_whole(backend, name, make, grads, which):
    snaps = run_reference(make, grads, backend, which + 3)
    dirs = (OPTIM_DIR, BACKENDS_DIR) if name in TRACE_BACKENDS else (OPTIM_DIR,)
    params, opt = make(backend)
    for k in range(which):
        opt.step(grads(k))
    nlines = count_lines(lambda: opt.step(grads(which)), dirs)
    assert nlines > 5
    outcomes = set()
    for target in range(nlines):
        params, opt = make(backend)
        for k in range(which):
            opt.step(grads(k))
        assert interrupted_at(target, lambda: opt.step(grads(which)), dirs), target
        done = check_whole(opt, params, snaps, which)
        outcomes.add(done)
        for k in range(done, which + 3):       # and it goes on as if never interrupted
            opt.step(grads(k))
        assert_same_tree(snapshot_of(opt, params), snaps[which + 3][0])
    assert outcomes == {which, which + 1}       # both sides of the first write were hit


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("name,make,grads", SETUPS, ids=[s[0] for s in SETUPS])
@pytest.mark.parametrize("nth", [0, 1])
@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit])
def test_an_interrupt_as_a_kernel_returns_completes_the_step(monkeypatch, backend, name, make,
                                                             grads, nth, exc):
    """The interrupt raised as the step's ``nth`` native call returns, its
    result lost (a step with fewer calls runs to its end): a Ctrl-C, or the
    SystemExit of a signal handler calling ``sys.exit`` (it was not held:
    the writes were done and the step not counted)."""
    snaps = run_reference(make, grads, backend, 5)
    fired = []

    armed = []

    def raising(real):
        def call(*args, **kwargs):
            out = real(*args, **kwargs)
            if armed:
                fired.append(1)
                if len(fired) == nth + 1:
                    raise exc
            return out
        return call

    if backend == "cython":
        from fastopt.backends import cython_cpu

        class Kernels:
            def __getattr__(self, name):
                return getattr(real_k, name)
        real_k = cython_cpu._k
        proxy = Kernels()
        proxy.step = raising(real_k.step)
        monkeypatch.setattr(cython_cpu, "_k", proxy)
    else:
        from fastopt.backends import numba_cpu
        monkeypatch.setattr(numba_cpu, "_table_serial", raising(numba_cpu._table_serial))
        monkeypatch.setattr(numba_cpu, "_table_parallel", raising(numba_cpu._table_parallel))
    for k in range(4):
        params, opt = make(backend)
        for j in range(k):
            opt.step(grads(j))
        if opt._plan is not None and opt._plan.list_step is not None:
            opt._plan.list_step = raising(opt._plan.list_step)
        fired.clear()
        armed.append(1)
        try:
            opt.step(grads(k))
            assert len(fired) <= nth        # no such call: no interrupt
        except exc:
            pass
        finally:
            armed.clear()
        assert check_whole(opt, params, snaps, k) == k + 1     # a kernel ran: all of it
        for j in range(k + 1, 5):
            opt.step(grads(j))
        assert_same_tree(snapshot_of(opt, params), snaps[5][0])


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_a_real_ctrl_c_during_large_steps_leaves_each_step_whole(backend):
    """SIGINT sent to the process at random times while 1M-element steps
    run; every interrupted step is whole, and the run matches one that was
    never interrupted."""
    rng = np.random.default_rng(0)
    n = 1 << 20
    a = [rng.standard_normal(n).astype(np.float32), rng.standard_normal(1000).astype(np.float32)]
    b = [x.copy() for x in a]
    opt_a = fastopt.AdamW(a, lr=1e-3, backend=backend, max_grad_norm=1.0)
    opt_b = fastopt.AdamW(b, lr=1e-3, backend=backend, max_grad_norm=1.0)
    g = [rng.standard_normal(n).astype(np.float32), rng.standard_normal(1000).astype(np.float32)]
    opt_a.step(g)
    opt_b.step(g)
    t0 = time.perf_counter()
    opt_b.step(g)
    step_time = time.perf_counter() - t0
    interrupted = 0
    main = threading.main_thread().ident
    for trial in range(20):
        delay = rng.uniform(0, 3 * step_time)

        def send():
            time.sleep(delay)
            signal.pthread_kill(main, signal.SIGINT)
        sender = threading.Thread(target=send)
        try:
            sender.start()
            for _ in range(1000):
                opt_a.step(g)
                if opt_a.iterations > opt_b.iterations:
                    opt_b.step(g)
            pytest.fail("no interrupt arrived")
        except KeyboardInterrupt:
            interrupted += 1
            sender.join()
        if opt_a.iterations > opt_b.iterations:
            opt_b.step(g)
        assert opt_a.iterations == opt_b.iterations
        assert [s["step"] for s in opt_a.state] == [s["step"] for s in opt_b.state]
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
        assert_same_tree(opt_a.state_dict()["state"], opt_b.state_dict()["state"])
    assert interrupted == 20


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("groups", [1, 2])
def test_an_interrupt_at_any_line_of_a_sam_perturb_leaves_it_consistent(backend, groups):
    """An interrupt in SAM's perturb as its kernel returned left the params
    at p + e with ``perturbed`` False: a checkpoint then held the perturbed
    weights, and perturbing again moved them twice. Now perturb is whole or
    not done: perturbed with the params at p + e, or not with the params as
    they were (two groups: the tables after the first written too); then
    the run goes on bit for bit."""
    rng = np.random.default_rng(1)
    p0 = [rng.standard_normal(n).astype(np.float32) for n in (1500, 700)]
    g1 = [rng.standard_normal(x.size).astype(np.float32) for x in p0]
    g2 = [rng.standard_normal(x.size).astype(np.float32) for x in p0]

    def make():
        p = [x.copy() for x in p0]
        spec = p if groups == 1 else [{"params": [p[0]]}, {"params": [p[1]], "lr": 1e-3}]
        return p, fastopt.SAM(fastopt.SGD(spec, lr=1e-2, momentum=0.9, backend=backend),
                              rho=0.5, adaptive=groups == 2)
    ref_p, ref = make()
    ref.perturb(g1)
    at_e = [x.copy() for x in ref_p]
    ref.step(g2)
    dirs = (OPTIM_DIR, BACKENDS_DIR)
    counts = []
    for _ in range(2):       # the second count: the first pays for the process's first use
        p, opt = make()
        counts.append(count_lines(lambda: opt.perturb(g1), dirs))
    assert counts[-1] > 5
    outcomes = set()
    for target in range(counts[-1]):
        p, opt = make()
        assert interrupted_at(target, lambda: opt.perturb(g1), dirs), target
        if opt.perturbed:
            assert all(a.tobytes() == b.tobytes() for a, b in zip(p, at_e)), target
            assert opt.grad_norm == ref.grad_norm, target
            outcomes.add("perturbed")
        else:
            assert all(a.tobytes() == b.tobytes() for a, b in zip(p, p0)), target
            outcomes.add("not")
            opt.perturb(g1)
        opt.step(g2)
        assert all(a.tobytes() == b.tobytes() for a, b in zip(p, ref_p)), target
    assert outcomes == {"perturbed", "not"}

@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("state_dtype", ["float32", "int8"])
def test_an_interrupt_at_any_line_of_a_sam_step_leaves_it_consistent(backend, state_dtype):
    """SAM's step restores ``p - e`` (in the base step's kernels, or a pass
    of its own under compact state) and steps the base. An interrupt at any
    line of it leaves SAM as before the step (perturbed) or as after it
    (stepped), or under compact state restored and not perturbed with the
    base not stepped; never params and flag at odds (an interrupt before a
    table's offset was set left it perturbed, flagged not; one after the
    base step, before the flag, restored it twice). Then the run resumes as
    if never interrupted (bit for bit from the first two)."""
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(2000).astype(np.float32)
    g1 = [rng.standard_normal(2000).astype(np.float32)]
    g2 = [rng.standard_normal(2000).astype(np.float32)]

    def make():
        p = [p0.copy()]
        return p, fastopt.SAM(fastopt.AdamW(p, lr=1e-2, backend=backend,
                                            state_dtype=state_dtype), rho=0.5)
    ref_p, ref = make()
    ref.perturb(g1)
    ref.step(g2)
    dirs = (OPTIM_DIR, BACKENDS_DIR)
    nlines = []
    for _ in range(2):       # the second count: the first pays for the process's first use
        p, opt = make()
        opt.perturb(g1)
        nlines.append(count_lines(lambda: opt.step(g2), dirs))
    nlines = nlines[-1]
    assert nlines > 5
    outcomes = set()
    for target in range(nlines):
        p, opt = make()
        opt.perturb(g1)
        perturbed = p[0].copy()
        assert interrupted_at(target, lambda: opt.step(g2), dirs), target
        stepped = opt.base_optimizer.iterations
        if opt.perturbed:
            assert stepped == 0 and p[0].tobytes() == perturbed.tobytes(), target
            outcomes.add("perturbed")
            opt.step(g2)
        elif stepped == 0:
            # compact base state: restored in a pass of its own, then the
            # base step interrupted before its kernels (as a refused one)
            assert state_dtype != "float32", target
            assert p[0].tobytes() == (perturbed - opt.state[0]["e_w"]).tobytes(), target
            outcomes.add("restored")
            opt.perturb(g1)
            opt.step(g2)
            np.testing.assert_allclose(p[0], ref_p[0], rtol=0, atol=1e-6)
            continue
        else:
            outcomes.add("stepped")
        assert p[0].tobytes() == ref_p[0].tobytes(), (target, outcomes)
    assert {"perturbed", "stepped"} <= outcomes


# -- loading a checkpoint, adding a group, binding params: whole or not at all --

def _every_line(setup, call):
    """``(state made by setup(), whether call(state) was interrupted)`` for an
    interrupt at each line event of ``call`` in fastopt/optim."""
    n = count_lines(lambda: call(setup()), (OPTIM_DIR,))
    assert n > 5
    for target in range(n):
        state = setup()
        yield state, interrupted_at(target, lambda: call(state), (OPTIM_DIR,))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_an_interrupt_at_any_line_of_load_state_dict_loads_all_of_it(backend):
    """A Ctrl-C inside load_state_dict's writes left the checkpoint's buffers
    with the old step count and the schedule object in place of its value:
    the next step used another lr, silently. It loads whole, then raises."""
    sched = fastopt.schedules.warmup_cosine(0.01, 3, 20)

    def make():
        p = [np.ones(5), np.full(3, 2.0)]
        return p, fastopt.Adam(p, lr=sched, backend=backend)
    p, saved = make()
    for k in range(5):
        saved.step([np.full(5, 0.1 * k), np.full(3, -0.2)])
    sd = saved.state_dict()
    ref_p, ref = make()
    ref.load_state_dict(sd)

    def setup():
        q, opt = make()
        opt.step([np.full(5, 0.3), np.full(3, 0.3)])
        return opt
    before = setup()
    outcomes = set()
    for opt, _ in _every_line(setup, lambda opt: opt.load_state_dict(sd)):
        loaded = opt.iterations == 5        # else untouched: the checks were interrupted
        outcomes.add(loaded)
        assert opt.param_groups[0]["lr"] == sched(opt.iterations)
        assert_same_tree(opt.state_dict(), (ref if loaded else before).state_dict())
    assert outcomes == {False, True}


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_an_interrupt_at_any_line_of_add_param_group_adds_it_or_not(backend):
    """A Ctrl-C inside add_param_group left the optimizer refusing every
    step (and the group being added again): now it is added whole, or not."""
    first, added = fastopt.schedules.warmup_cosine(0.1, 2, 9), fastopt.schedules.cosine_decay(0.1, 5)

    def setup():
        p = [np.ones(4)]
        opt = fastopt.Adam(p, lr=first, backend=backend)
        opt.step([np.ones(4)])
        return opt, np.ones(3)
    outcomes = set()
    for (opt, extra), _ in _every_line(setup, lambda s: s[0].add_param_group(
            {"params": [s[1]], "lr": added})):
        outcomes.add(len(opt.param_groups))
        if len(opt.param_groups) == 1:
            opt.add_param_group({"params": [extra], "lr": added})
        # both schedules kept (a run of the adding again took a shown value
        # for the user's number), and the group's bookkeeping whole
        assert (opt.lr_schedule(0), opt.lr_schedule(1)) == (first, added)
        opt.step([np.ones(4), np.ones(3)])
        assert opt.state_dict()["state"][1]["step"] == 1
        assert not np.array_equal(extra, np.ones(3))
        opt.param_groups[1]["params"].append(np.ones(2))
        with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]"):
            opt.step([np.ones(4), np.ones(3)])
    assert outcomes == {1, 2}


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_an_interrupt_at_any_line_of_bind_binds_or_not(backend):
    """A Ctrl-C inside bind (an optimizer made before its params) left no
    _params or a group it then refused: now bound whole, schedule and all."""
    sched = fastopt.schedules.warmup_cosine(0.01, 3, 20)
    ref_p = [np.ones(5)]
    ref = fastopt.AdamW(ref_p, lr=sched, backend=backend)
    ref.step([np.full(5, 0.5)])

    def setup():
        return fastopt.AdamW(lr=sched, backend=backend), [np.ones(5)]
    outcomes = set()
    for (opt, p), _ in _every_line(setup, lambda s: s[0].bind(s[1])):
        outcomes.add(bool(opt.param_groups))
        opt.step([np.full(5, 0.5)], params=p)
        assert opt.lr_schedule(0) is sched
        np.testing.assert_array_equal(p[0], ref_p[0])
    assert outcomes == {False, True}
