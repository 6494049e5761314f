"""Processes and threads: a forked child steps (serially), multiprocessing
works with every start method, one optimizer stepped from two threads
serialises, copies do not write into the original."""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import fastopt

COMPILED = [b for b in ("cython", "numba") if b in fastopt.available_backends()]
N = 1 << 17           # above the serial size: the parent's steps use the thread team


def run_steps(backend, steps=5, n=N):
    """A fixed little run; its final params (deterministic)."""
    p = [np.linspace(-1, 1, n, dtype=np.float32), np.ones(7, np.float32)]
    opt = fastopt.AdamW(p, lr=1e-2, backend=backend, max_grad_norm=1.0)
    for t in range(steps):
        opt.step([np.full(n, 0.01 * (t + 1), np.float32), np.full(7, -1.0, np.float32)])
    return np.concatenate([a.ravel() for a in p])


@pytest.mark.parametrize("backend", COMPILED)
def test_os_fork_after_threaded_steps(backend):
    """The parent runs threaded steps, forks; the child steps (serial
    kernels, since the OpenMP team is the parent's) and gets the same bits."""
    code = textwrap.dedent(f"""
        import os, sys, numpy as np
        sys.path.insert(0, {str(__import__('os').path.dirname(__file__))!r})
        from test_processes import run_steps
        import fastopt
        want = run_steps({backend!r})             # threaded in the parent
        pid = os.fork()
        if pid == 0:
            from fastopt._openmp import in_forked_child
            ok = in_forked_child() and np.array_equal(run_steps({backend!r}), want)
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        sys.exit(os.waitstatus_to_exitcode(status))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def _worker(args):
    backend, steps = args
    return run_steps(backend, steps)


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_multiprocessing_pool_every_start_method(method):
    backend = COMPILED[0] if COMPILED else "numpy"
    code = textwrap.dedent(f"""
        import sys, multiprocessing as mp, numpy as np
        sys.path.insert(0, {str(__import__('os').path.dirname(__file__))!r})
        from test_processes import run_steps, _worker
        if __name__ == "__main__":
            want = run_steps({backend!r}, 3)          # the parent used its threads first
            with mp.get_context({method!r}).Pool(2) as pool:
                got = pool.map(_worker, [({backend!r}, 3)] * 3)
            sys.exit(0 if all(np.array_equal(g, want) for g in got) else 3)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.parametrize("backend", ["numpy", *COMPILED])
def test_one_optimizer_two_threads_serialises(backend):
    """Steps from two threads run one after the other: with the same
    gradient every step, the result is exactly 2 x 30 steps in a row."""
    def make():
        p = [np.linspace(0, 1, 5000, dtype=np.float32)]
        return p, fastopt.Adam(p, lr=1e-3, backend=backend)

    p, opt = make()
    g = [np.full(5000, 0.5, np.float32)]

    def worker():
        for _ in range(30):
            opt.step(g)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    q, serial = make()
    for _ in range(60):
        serial.step(g)
    assert opt.iterations == 60 and opt.state[0]["step"] == 60
    np.testing.assert_array_equal(p[0], q[0])


@pytest.mark.parametrize("backend", ["numpy", *COMPILED])
def test_a_copy_steps_its_own_arrays(backend):
    p = [np.ones(100, np.float32)]
    opt = fastopt.SGD(p, lr=0.5, momentum=0.9, backend=backend)
    opt.step([np.ones(100, np.float32)])
    twin = copy.deepcopy(opt)
    with pytest.warns(UserWarning, match="copied without the arrays it updates"):
        twin.step([np.ones(100, np.float32)])
    np.testing.assert_array_equal(p[0], 0.5)              # the original is untouched
    np.testing.assert_allclose(twin.param_groups[0]["params"][0], 0.5 - 0.5 * 1.9)


@pytest.mark.parametrize("backend", ["numpy", *COMPILED])
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copys_checkpoint_holds_the_state_its_steps_wrote(backend, how):
    """Two separate arrays are two runs, each with its view of the group's
    state buffer: a copy must keep the views views of its buffer, or its
    state_dict returns the moments as they were when it was copied."""
    rng = np.random.default_rng(0)
    p = [rng.standard_normal(50).astype(np.float32) for _ in range(2)]
    grads = [[rng.standard_normal(50).astype(np.float32) for _ in range(2)] for _ in range(3)]
    opt = fastopt.AdamW(p, lr=1e-2, backend=backend)
    opt.step(grads[0])
    assert len(opt.state[0]["runs"]) == 2
    # (with its params, which its param_groups show)
    q, twin = copy.deepcopy((p, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((p, opt)))
    for o in (opt, twin):
        for g in grads[1:]:
            o.step(g)
    mine, theirs = opt.state_dict()["state"][0], twin.state_dict()["state"][0]
    assert mine["step"] == theirs["step"] == 3
    for name in mine["buffers"]:
        np.testing.assert_array_equal(theirs["buffers"][name], mine["buffers"][name])


@pytest.mark.parametrize("backend", ["numpy", *COMPILED])
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("layout", ["two arrays", "views of one buffer"])
def test_a_copys_sync_master_reads_its_own_16bit_params(backend, how, layout):
    """sync_master on a copy read each run's flat view as it was copied (an
    array of its own), so weights written into the copy's 16-bit params
    were overwritten by its next step; and views of one buffer, copied,
    no longer lie end to end (two runs where there was one)."""
    if layout == "two arrays":
        p = [np.full(3, 0.5, np.float16), np.full(4, 0.5, np.float16)]
    else:
        buf = np.full(7, 0.5, np.float16)
        p = [buf[:3], buf[3:]]
    g = [np.full(3, 0.1, np.float16), np.full(4, 0.1, np.float16)]
    opt = fastopt.Adam(p, lr=1e-3, backend=backend)
    opt.step(g)
    ref_p = [np.full(3, 0.5, np.float16), np.full(4, 0.5, np.float16)]
    ref = fastopt.Adam(ref_p, lr=1e-3, backend=backend)     # the same, not copied
    ref.step(g)
    p, opt = copy.deepcopy((p, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((p, opt)))
    for o, arrays in ((opt, p), (ref, ref_p)):
        for a in arrays:
            a[...] = 0
        o.sync_master()
        o.step(g)
    np.testing.assert_allclose(ref_p[0], -0.001, rtol=1e-2)
    for a, b in zip(p, ref_p):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(opt.state_dict()["state"][0]["buffers"]["master"],
                                  ref.state_dict()["state"][0]["buffers"]["master"])


@pytest.mark.parametrize("backend", ["numpy", *COMPILED])
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("given", ["FlatArrays", "groups of FlatArrays"])
@pytest.mark.parametrize("order", ["params first", "optimizer first"])
def test_packed_params_copied_with_their_optimizer_are_the_ones_it_steps(
        backend, how, given, order):
    """A FlatArrays' copy makes its views anew from its copied buffer; the
    copied optimizer stepped copies of the old views instead, so the
    copied params never changed (and the copy's FlatArrays grads read
    gradients cached at the copy)."""
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal(5).astype(np.float32)]
    params = fastopt.pack(arrays)
    grads = params.zeros_like()
    spec = params if given == "FlatArrays" else [{"params": params, "lr": 0.1}]
    opt = fastopt.AdamW(spec, lr=0.1, backend=backend)
    grads.data[...] = 1.0
    opt.step(grads)
    before = params.data.copy()
    both = (params, grads, opt) if order == "params first" else (opt, params, grads)
    both = copy.deepcopy(both) if how == "deepcopy" else pickle.loads(pickle.dumps(both))
    twin, (p2, g2) = (both[2], both[:2]) if order == "params first" else (both[0], both[1:])
    g2.data[...] = -1.0                          # the copy's grads, written in place
    twin.step(g2)
    np.testing.assert_array_equal(params.data, before)     # the original is untouched
    assert np.all(p2.data > before)                        # stepped against -1 gradients
    assert all(a is b for a, b in zip(twin.param_groups[0]["params"], p2))
    opt.step([-np.ones_like(a) for a in params])           # the original, the same step
    np.testing.assert_array_equal(p2.data, params.data)


@pytest.mark.parametrize("backend", ["numpy", *COMPILED])
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("order", ["16-bit first", "float32 first"])
def test_a_copy_of_a_group_mixing_float32_and_16bit_params_steps_as_the_original(
        backend, how, order):
    """A group may hold float32 params and 16-bit ones (with their float32
    master copies): a copy raised KeyError 'master', or (the other order)
    lost the master and failed at its first step."""
    bf16 = pytest.importorskip("ml_dtypes").bfloat16
    arrays = {"W": np.linspace(-1, 1, 6).astype(bf16), "ln": np.linspace(0, 1, 3, dtype=np.float32)}
    if order == "float32 first":
        arrays = {"ln": arrays["ln"], "W": arrays["W"]}
    grads = {k: np.full(a.shape, 0.25, a.dtype) for k, a in arrays.items()}
    opt = fastopt.AdamW(arrays, lr=1e-2, backend=backend)
    opt.step(grads)
    both = (arrays, opt)
    twin_arrays, twin = (copy.deepcopy(both) if how == "deepcopy"
                         else pickle.loads(pickle.dumps(both)))
    for o in (opt, twin):
        o.step(grads)
    for k in arrays:
        np.testing.assert_array_equal(twin_arrays[k], arrays[k])
    mine, theirs = opt.state_dict()["state"][0], twin.state_dict()["state"][0]
    for name in mine["buffers"]:
        np.testing.assert_array_equal(theirs["buffers"][name], mine["buffers"][name])


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_packed_groups_added_later_are_stepped_by_the_copy(how):
    """The FlatArrays a group was given as, added by add_param_group, is
    followed by a copy too (the links were read from the params first given)."""
    p = fastopt.pack([np.ones(3, np.float32)])
    q = fastopt.pack([np.ones(2, np.float32), np.ones(4, np.float32)])
    opt = fastopt.AdamW(p, lr=0.1)
    opt.add_param_group({"params": q})
    both = (p, q, opt)
    p2, q2, twin = copy.deepcopy(both) if how == "deepcopy" else pickle.loads(pickle.dumps(both))
    twin.step([np.ones(3, np.float32), np.ones(2, np.float32), np.ones(4, np.float32)])
    assert np.all(p2.data < 1) and np.all(q2.data < 1)
    assert np.all(p.data == 1) and np.all(q.data == 1)


def test_a_load_lets_the_replaced_state_of_several_groups_go():
    """With several tables the step also remembers the state buffers it
    wrote (to refuse grads that overlap them): a load forgets them too."""
    import gc
    import weakref
    p = [np.zeros(100, np.float32), np.zeros(50, np.float32)]
    opt = fastopt.AdamW([{"params": [p[0]]}, {"params": [p[1]], "lr": 0.1}], lr=1e-3)
    for _ in range(3):
        opt.step([np.ones(100, np.float32), np.ones(50, np.float32)])
    sd = opt.state_dict()
    old = [weakref.ref(st["flat"]["exp_avg"]) for st in opt.state]
    opt.load_state_dict(sd)
    gc.collect()
    assert [r() for r in old] == [None, None]


def test_add_param_group_to_an_optimizer_made_without_params():
    """It raised AttributeError (the check of the groups before it needed params)."""
    opt = fastopt.AdamW(lr=0.1)
    p = [np.ones(3)]
    opt.add_param_group({"params": p, "lr": 0.5})
    opt.step([np.ones(3)])
    assert opt.param_groups[0]["lr"] == 0.5 and np.all(p[0] < 1)


def test_a_refused_step_leaves_no_tables_over_a_retyped_param():
    """NumPy backend: a step refused for a param retyped in place had just
    made its tables (views in the wrong dtype) and kept them: once the
    dtype was put back, the next step zeroed the param and its moments."""
    p = [np.ones(3), np.ones(3)]
    opt = fastopt.Adam(p, lr=1e-2, backend="numpy")
    g = [np.full(3, 0.5), np.full(3, 0.5)]
    opt.step(g)
    p[0].flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        opt.step(g)                 # (drops the tables)
    p[0].flags.writeable = True
    p[1].dtype = np.int64
    with pytest.raises(ValueError, match="was given as float64"):
        opt.step(g)
    p[1].dtype = np.float64
    opt.step(g)
    np.testing.assert_allclose(p[0], 0.98)
    np.testing.assert_allclose(p[1], 0.98)


@pytest.mark.parametrize("wait_s,waited_out", [(5.0, False), (0.05, True)])
def test_a_fork_during_another_threads_step(wait_s, waited_out):
    """A child forked while another thread was inside a step inherited the
    step lock held by a thread it does not have: its first step or
    state_dict on that optimizer waited forever. The fork now waits for
    the step (the child gets it whole); past forks.WAIT_S it goes on, and
    the child gets a new lock and a warning."""
    code = textwrap.dedent(f"""
        import os, sys, threading, time, warnings, numpy as np
        import fastopt
        from fastopt.optim import forks
        forks.WAIT_S = {wait_s}
        x = np.array([3.0])
        opt = fastopt.LBFGS([x], max_iter=1)
        opt.step(lambda: (float(x[0] ** 2), [2 * x]))   # its first-step imports done
        inside = threading.Event()

        def closure():
            inside.set()
            time.sleep(0.5)           # the step holds its lock meanwhile
            return float(x[0] ** 2), [2 * x]
        t = threading.Thread(target=opt.step, args=(closure,))
        t.start()
        inside.wait()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pid = os.fork()
            if pid == 0:
                opt.state_dict()              # (it waited forever here)
                whole = opt.iterations == 2
                warned = any("forked while another thread" in str(w.message) for w in caught)
                os._exit(0 if (whole, warned) == {(not waited_out, waited_out)!r} else 3)
        _, status = os.waitpid(pid, 0)
        t.join()
        sys.exit(os.waitstatus_to_exitcode(status))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]


def test_params_appended_after_construction_are_refused():
    p = [np.ones(3)]
    opt = fastopt.SGD(p, lr=0.1)
    opt.param_groups[0]["params"].append(np.ones(2))
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\] changed after"):
        opt.step([np.ones(3), np.ones(2)])
    np.testing.assert_array_equal(p[0], 1.0)


def test_add_param_group_steps_the_new_group_and_keeps_the_old_state():
    a, b = np.ones(3), np.ones(2)
    opt = fastopt.SGD([a], lr=0.1, momentum=0.9)
    opt.step([np.ones(3)])
    with pytest.raises(ValueError, match="overlaps"):
        opt.add_param_group({"params": [a[:2]]})
    opt.add_param_group({"params": [b], "lr": 0.5})
    opt.step([np.ones(3), np.ones(2)])
    np.testing.assert_allclose(a, 1 - 0.1 - 0.1 * 1.9)     # momentum kept
    np.testing.assert_allclose(b, 0.5)                      # its first step: buf = g
    assert [s["step"] for s in opt.state] == [2, 1]
    twin = fastopt.SGD([{"params": [a.copy()]}, {"params": [b.copy()]}], lr=0.1,
                       momentum=0.9)
    with pytest.warns(UserWarning, match=r"param_groups\[1\] lr=0\.5 replaces 0\.1"):
        twin.load_state_dict(opt.state_dict())
    assert twin.param_groups[1]["lr"] == 0.5


def test_zero_grad_and_load_state_dict_settings():
    p = fastopt.pack([np.ones(3), np.ones(2)])
    g = p.zeros_like()
    g.data[:] = 5.0
    opt = fastopt.SGD(p, lr=0.1, max_grad_norm=1.0)
    opt.zero_grad(g)
    assert not g.data.any()
    lists = [np.ones(3), np.ones(2)]
    opt.zero_grad(lists)
    assert not any(x.any() for x in lists)
    # strided buffers (as the step reads them) are zeroed where they are; a
    # read-only one is refused before anything is zeroed
    wide = np.ones((3, 2))
    strided = [wide[:, 0], np.ones(4)[::2]]
    opt.zero_grad(strided)
    np.testing.assert_array_equal(wide, [[0, 1], [0, 1], [0, 1]])
    assert not strided[1].any()
    frozen = np.ones((3, 2))[:, 0]
    frozen.flags.writeable = False
    keep = np.ones(2)
    with pytest.raises(ValueError, match=r"grads\[0\] is read-only"):
        opt.zero_grad([frozen, keep])
    assert keep.all()
    with pytest.raises(TypeError, match=r"grads\[1\] is a NumPy scalar \(float64\), which "
                                        r"cannot be zeroed in place"):
        fastopt.SGD([np.ones(3), np.ones(())], lr=0.1).zero_grad([keep[:1].repeat(3),
                                                                 np.float64(1.0)])
    # refused: a FlatArrays laid out unlike the params (it was zeroed), None,
    # and an optimizer with no params yet (an AttributeError)
    with pytest.raises(ValueError, match="not like the params"):
        opt.zero_grad(fastopt.pack([np.ones(5)]))
    with pytest.raises(TypeError, match=r"grads is None: zero_grad\(\) needs"):
        opt.zero_grad(None)
    with pytest.raises(RuntimeError, match="no params yet"):
        fastopt.SGD(lr=0.1).zero_grad(lists)
    sd = opt.state_dict()
    other = fastopt.SGD(fastopt.pack([np.ones(3), np.ones(2)]), lr=0.1)
    with pytest.warns(UserWarning, match="max_grad_norm=1.0 replaces this optimizer's None"):
        other.load_state_dict(sd)
    assert other.max_grad_norm == 1.0


def test_a_scheduled_lr_reads_as_the_number_the_next_step_uses():
    """torch users read opt.param_groups[i]["lr"] to log the lr: with a
    schedule it is the number the next step uses; writing a number replaces
    the schedule, assigning a schedule takes over; checkpoints keep it."""
    from fastopt import schedules as S

    sched = S.linear(1.0, 0.0, 10)
    p = [np.ones(3)]
    opt = fastopt.SGD(p, lr=sched)
    group = opt.param_groups[0]
    assert group["lr"] == sched(0) and isinstance(group["lr"], float)
    assert opt.lr_schedule(0) is sched
    opt.step([np.ones(3)])
    assert opt.last_lr == [sched(0)] and group["lr"] == sched(1)
    sd = opt.state_dict()
    assert sd["param_groups"][0]["lr"] == {"schedule": sched.to_dict()}
    twin = fastopt.SGD([np.ones(3)], lr=0.3)
    with pytest.warns(UserWarning, match=r"lr schedule linear\(.*\) replaces 0\.3"):
        twin.load_state_dict(sd)
    assert twin.param_groups[0]["lr"] == sched(1)
    twin.step([np.ones(3)])
    assert twin.last_lr == [sched(1)]
    group["lr"] = 0.5                                   # a number replaces the schedule
    opt.step([np.ones(3)])
    opt.step([np.ones(3)])
    assert opt.last_lr == [0.5] and group["lr"] == 0.5 and opt.lr_schedule(0) is None
    group["lr"] = S.constant(0.25)                      # a schedule takes over
    opt.step([np.ones(3)])
    assert opt.last_lr == [0.25] and group["lr"] == 0.25


@pytest.mark.skipif("cython" not in fastopt.available_backends(), reason="needs the Cython build")
def test_omp_num_threads_holds_whatever_loaded_numba_first():
    """OMP_NUM_THREADS=1 (what joblib's workers and many job scripts set):
    the Cython team kept to it only where nothing had started Numba's
    threading layer before it loaded (which resets OpenMP's count), and
    fastopt.get_num_threads() reported Numba's 2 while the step ran on 1."""
    code = textwrap.dedent("""
        import os, numba, numpy as np
        @numba.njit(parallel=True)
        def f(x):
            for i in numba.prange(x.size):
                x[i] += 1.0
        f(np.zeros(1000))                 # Numba's OpenMP layer started first
        import fastopt
        from fastopt.backends import get_backend
        print(fastopt.get_num_threads(), get_backend("cython").get_num_threads())
    """)
    env = dict(__import__("os").environ, OMP_NUM_THREADS="1", NUMBA_THREADING_LAYER="omp")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=env)
    if out.returncode and "threading layer" in out.stderr:
        pytest.skip("Numba's OpenMP threading layer is not available here")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["1", "1"]
