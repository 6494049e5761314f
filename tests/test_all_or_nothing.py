"""A step that fails anywhere before its kernels run leaves params, state
and counters exactly as they were: every allocation and check comes first.
Failures are injected at each allocation and between groups."""

from __future__ import annotations

import numpy as np
import pytest

import fastopt
from fastopt.optim import base

from conftest import BACKENDS, FAST_BACKENDS, assert_same_tree, optimizer_snapshot


def two_groups(backend, packed):
    arrays = [np.linspace(-1, 1, 12).reshape(3, 4), np.ones(5), np.full(6, 2.0)]
    params = fastopt.pack(arrays) if packed else arrays
    opt = fastopt.Adam([{"params": list(params[:2])}, {"params": [params[2]], "lr": 0.1}],
                       lr=1e-2, amsgrad=True, backend=backend, max_grad_norm=1.0)
    return list(params), opt


def grads():
    return [np.full((3, 4), 0.3), np.full(5, -0.2), np.full(6, 0.1)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("fail_at", range(6))   # 2 groups x 3 Adam buffers
@pytest.mark.parametrize("exc", [MemoryError, KeyboardInterrupt])
def test_allocation_failure_on_the_first_step_changes_nothing(monkeypatch, backend, packed,
                                                              fail_at, exc):
    params, opt = two_groups(backend, packed)
    before = optimizer_snapshot(opt, params)
    real, calls = np.zeros, []

    def zeros(*a, **k):
        calls.append(1)
        if len(calls) == fail_at + 1:
            raise exc("injected")
        return real(*a, **k)

    monkeypatch.setattr(base.np, "zeros", zeros)
    with pytest.raises(exc, match="injected"):
        opt.step(grads())
    monkeypatch.undo()
    assert_same_tree(optimizer_snapshot(opt, params), before)
    assert opt.iterations == 0 and [s["step"] for s in opt.state] == [0, 0]
    opt.step(grads())                       # and it steps normally afterwards
    assert [s["step"] for s in opt.state] == [1, 1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("exc", [KeyboardInterrupt, ValueError])
def test_an_error_between_groups_changes_nothing(monkeypatch, backend, exc):
    params, opt = two_groups(backend, packed=False)
    opt.step(grads())
    before = optimizer_snapshot(opt, params)
    real = type(opt)._element_step

    def second_group_fails(self, h, state):
        if state is self.state[1]:
            raise exc("injected")
        return real(self, h, state)

    monkeypatch.setattr(type(opt), "_element_step", second_group_fails)
    opt._plan = None      # the full step (a planned one makes no element step anew)
    with pytest.raises(exc, match="injected"):
        opt.step(grads())
    monkeypatch.undo()
    assert_same_tree(optimizer_snapshot(opt, params), before)
    assert opt.iterations == 1 and [s["step"] for s in opt.state] == [1, 1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_interrupt_anywhere_in_building_the_tables_leaves_a_working_optimizer(backend):
    """A Ctrl-C raised at any line of the first step's table building (a
    trace function raises it, as Python would at a call) leaves the
    optimizer as if that step never ran: the next steps match a run that was
    never interrupted. (It once left ``_tables`` set without ``_single``:
    every later step raised AttributeError.)"""
    import sys
    from fastopt.optim.base import Optimizer

    code = Optimizer._host_tables.__code__

    def tracer(on_line):
        def trace(frame, event, arg):
            if frame.f_code is not code:
                return None

            def line(f, ev, a):
                if ev == "line":
                    on_line(f.f_lineno)
                return line
            return line
        return trace

    reference, ref_opt = two_groups(backend, False)
    lines = []
    previous = sys.gettrace()                # (a coverage tool's, say)
    sys.settrace(tracer(lines.append))      # the lines a first step runs
    try:
        ref_opt.step(grads())
    finally:
        sys.settrace(previous)
    ref_opt.step(grads())
    assert len(set(lines)) >= 4
    for target in sorted(set(lines)):
        params, opt = two_groups(backend, False)
        fired = []

        def interrupt(lineno):
            if lineno == target and not fired:
                fired.append(target)
                raise KeyboardInterrupt
        sys.settrace(tracer(interrupt))
        try:
            opt.step(grads())
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(previous)
        assert fired, target
        for _ in range(2):
            opt.step(grads())
        for a, b in zip(params, reference):
            np.testing.assert_array_equal(a, b, err_msg=f"interrupted at line {target}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_grad_aliasing_another_groups_param_is_refused(backend):
    """A grad that overlaps another group's param (which that group's update
    may change before or after it is read) is refused, as within a group,
    whichever group it belongs to, with nothing written."""
    a, c = np.ones(5), np.ones(8)
    opt = fastopt.SGD([{"params": [a]}, {"params": [c]}], lr=0.1, backend=backend)
    with pytest.raises(ValueError, match=r"grads\[0\] overlaps params\[1\]"):
        opt.step([c[:5], np.ones(8)])
    a8 = np.ones(8)
    opt2 = fastopt.SGD([{"params": [a8]}, {"params": [np.ones(3)]}], lr=0.1, backend=backend)
    with pytest.raises(ValueError, match=r"grads\[1\] overlaps params\[0\]"):
        opt2.step([np.ones(8), a8[:3]])
    np.testing.assert_array_equal(a, 1.0)
    np.testing.assert_array_equal(c, 1.0)
    np.testing.assert_array_equal(a8, 1.0)
    opt.step([np.ones(5), np.ones(8)])
    np.testing.assert_allclose(a, 0.9)
    np.testing.assert_allclose(c, 0.9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_grad_aliasing_another_groups_state_is_refused(backend):
    """Group 0's exp_avg as group 1's grad (from the step plan, the steps
    after the first): refused with nothing written, as by the NumPy backend."""
    a, c = np.ones(5), np.ones(3)
    opt = fastopt.Adam([{"params": [a]}, {"params": [c]}], lr=0.1, backend=backend)
    for _ in range(2):
        opt.step([np.full(5, 2.0), np.ones(3)])
    before = optimizer_snapshot(opt, [a, c])
    with pytest.raises(ValueError, match="overlaps optimizer state 'exp_avg' of group 0"):
        opt.step([np.full(5, 2.0), opt.state[0]["flat"]["exp_avg"][:3]])
    assert_same_tree(optimizer_snapshot(opt, [a, c]), before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sam_refuses_a_grad_aliasing_another_groups_param(backend):
    a, c = np.ones(5), np.ones(8)
    sam = fastopt.SAM(fastopt.SGD([{"params": [a]}, {"params": [c]}], lr=0.1,
                                  backend=backend), rho=0.05)
    with pytest.raises(ValueError, match=r"grads\[0\] overlaps params\[1\]"):
        sam.perturb([c[:5], np.ones(8)])
    np.testing.assert_array_equal(c, 1.0)
    sam.perturb([np.ones(5), np.ones(8)])
    sam.step([np.ones(5), np.ones(8)])
    np.testing.assert_allclose(a, 0.9)


def test_the_reference_backend_refuses_a_param_made_read_only_later():
    """The NumPy backend writes array by array: a param made read-only after
    the optimizer was built is refused before the first write (it once
    updated the arrays before it and then raised NumPy's own error), and
    the step goes on once it is writable again."""
    params = [np.ones(4), np.ones(3)]
    opt = fastopt.Adam(params, lr=0.1, backend="numpy")
    before = optimizer_snapshot(opt, params)
    params[1].setflags(write=False)
    with pytest.raises(ValueError, match=r"params\[1\] is read-only"):
        opt.step([np.ones(4), np.ones(3)])
    assert_same_tree(optimizer_snapshot(opt, params), before)
    params[1].setflags(write=True)
    opt.step([np.ones(4), np.ones(3)])
    np.testing.assert_allclose(params[1], 0.9)
    assert opt.iterations == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grads_as", ["dict", "list", "flat"])
def test_a_param_frozen_read_only_later_is_refused_on_every_backend(backend, grads_as):
    """``W.flags.writeable = False`` to freeze a layer: the compiled steps
    (the planned one too) went on writing it, trained as before. Refused by
    name before anything is written; a checkpoint of the frozen model is
    still taken; writable again, the run goes on."""
    if grads_as == "flat":
        flat = fastopt.flat_zeros([(2, 3), (3,)], np.float64)
        flat.data[:] = 1.0
        params = {"W": flat[0], "b": flat[1]}

        def grads():
            g = flat.zeros_like()
            g.data[:] = 1.0
            return g
    else:
        params = {"W": np.ones((2, 3)), "b": np.ones(3)}

        def grads():
            g = {"W": np.ones((2, 3)), "b": np.ones(3)}
            return g if grads_as == "dict" else list(g.values())
    opt = fastopt.AdamW(params, lr=0.1, backend=backend)
    for _ in range(3):          # the planned step's path too
        opt.step(grads())
    before = optimizer_snapshot(opt, list(params.values()))
    params["W"].flags.writeable = False
    for _ in range(2):
        with pytest.raises(ValueError, match=r"params\['W'\] is read-only .* lr 0"):
            opt.step(grads())
        assert_same_tree(optimizer_snapshot(opt, list(params.values())), before)
    sd = opt.state_dict()               # saving a frozen model is no write
    assert sd["iterations"] == 3
    params["W"].flags.writeable = True
    opt.step(grads())
    assert opt.iterations == 4 and (params["W"] < before["params"][0]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_key_added_to_a_group_later_is_refused_like_at_construction(backend):
    """A misspelt hyperparameter written into a group after construction is
    refused at the next step (it would be ignored), naming it, with nothing
    written; the step goes on once it is gone. (It was taken silently, and
    the optimizer's own state_dict then failed to load.)"""
    params = [np.ones(4)]
    opt = fastopt.Adam(params, lr=0.1, backend=backend)
    for _ in range(2):                  # the second from the step plan
        opt.step([np.ones(4)])
    before = optimizer_snapshot(opt, params)
    opt.param_groups[0]["weight_decy"] = 0.1
    with pytest.raises(ValueError, match=r"unknown keys \['weight_decy'\]"):
        opt.step([np.ones(4)])
    assert_same_tree(optimizer_snapshot(opt, params), before)
    del opt.param_groups[0]["weight_decy"]
    opt.step([np.ones(4)])
    opt.load_state_dict(opt.state_dict())
    assert opt.iterations == 3


def test_merged_ranges_are_the_union_of_the_ranges_sorted():
    """The byte ranges a grad must miss: random ranges (overlapping, touching,
    nested, repeated) merge as a plain sorted sweep merges them."""
    from fastopt.backends.tables import merged_ranges

    def sweep(pairs):
        out = []
        for lo, hi in sorted(pairs):
            if out and lo <= out[-1][1]:
                out[-1][1] = max(out[-1][1], hi)
            else:
                out.append([lo, hi])
        return np.asarray(out, np.int64).reshape(-1)

    rng = np.random.default_rng(0)
    for _ in range(500):
        k = int(rng.integers(1, 9))
        los = rng.integers(0, 60, k)
        pairs = [(int(lo), int(lo + n)) for lo, n in zip(los, rng.integers(1, 20, k))]
        np.testing.assert_array_equal(
            merged_ranges([], np.asarray(pairs, np.int64).reshape(-1)), sweep(pairs))
    base = np.zeros(100)
    at = base.__array_interface__["data"][0]
    np.testing.assert_array_equal(merged_ranges([base[:10], base[5:20], base[50:60]]) - at,
                                  [0, 160, 400, 480])
    assert merged_ranges([]).size == 0 and merged_ranges([base[:0]]).size == 0


@pytest.mark.parametrize("backend", ["cython", "numba"])
def test_the_tables_of_one_step_share_one_array_of_written_ranges(backend):
    """Every group's grads are checked against all that the step writes: one
    array for all the tables (not a merged copy each: a thousand groups made
    16 MB of copies and a cache miss per grad), covering each table's own
    params and state."""
    from fastopt.backends.tables import merged_ranges
    if backend not in fastopt.available_backends():
        pytest.skip(f"{backend} not available")
    params = [np.ones(100, np.float32) for _ in range(6)]
    opt = fastopt.Adam([{"params": params[i:i + 2]} for i in range(0, 6, 2)], backend=backend)
    for _ in range(3):
        opt.step([np.ones(100, np.float32) for _ in range(6)])
    tables = opt._all_tables
    assert len(tables) == 3 and len({id(t.written) for t in tables}) == 1
    everything = merged_ranges(params + [b for st in opt.state for b in st["flat"].values()])
    np.testing.assert_array_equal(tables[0].written, everything)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("planned", [False, True])
def test_a_param_replaced_in_its_groups_list_is_refused_by_name(backend, planned):
    """``param_groups[0]["params"][1] = new`` used to be ignored: the step
    went on updating the old array. Refused at the next step, naming it,
    with nothing written; putting the same array back is fine."""
    params = [np.ones(3), np.ones(2)]
    opt = fastopt.Adam(params, lr=0.1, backend=backend)
    grads = [np.ones(3), np.ones(2)]
    if planned:
        opt.step(grads)
        opt.step(grads)
    before = optimizer_snapshot(opt, params)
    lst = opt.param_groups[0]["params"]
    lst[1] = np.ones(2)
    with pytest.raises(ValueError, match=r"\['params'\]\[1\] was replaced"):
        opt.step(grads)
    assert_same_tree(optimizer_snapshot(opt, params), before)
    lst[1] = params[1]                     # the array it was given: steps again
    opt.step(grads)
    assert opt.state[0]["step"] == (3 if planned else 1)
    opt.param_groups[0]["params"] = list(params)    # another list, the same arrays
    with pytest.raises(ValueError, match="was replaced by another list"):
        opt.step(grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("planned", [False, True])
def test_a_group_appended_to_or_removed_from_param_groups_is_refused(backend, planned):
    """``opt.param_groups.append(group)`` (torch's habit, for add_param_group)
    gave an IndexError inside the step; ``del opt.param_groups[k]`` left the
    step demanding the removed group's grads and ignoring them. Both refused
    at the next step (and by state_dict), naming the group, with nothing
    written; the group put back steps again."""
    params = [np.ones(3), np.ones(4), np.ones(2)]
    opt = fastopt.SGD([{"params": [p]} for p in params], lr=0.1, momentum=0.9,
                      backend=backend)
    grads = [np.ones(3), np.ones(4), np.ones(2)]
    if planned:
        opt.step(grads)
        opt.step(grads)
    before = optimizer_snapshot(opt, params)
    extra = np.ones(5)
    opt.param_groups.append({"params": [extra], "lr": 0.1})
    for call in (lambda: opt.step(grads + [np.ones(5)]), lambda: opt.step(grads),
                 opt.state_dict):
        with pytest.raises(ValueError, match=r"param_groups\[3\] was put in param_groups "
                                             r"after .*\(3 groups then, 4 now\).*"
                                             r"add_param_group"):
            call()
    opt.param_groups.pop()
    middle = opt.param_groups.pop(1)
    for call in (lambda: opt.step([grads[0], grads[2]]), lambda: opt.step(grads)):
        with pytest.raises(ValueError, match=r"param_groups\[1\] was removed from "
                                             r"param_groups .*\(3 groups then, 2 now\)"):
            call()
    assert_same_tree(optimizer_snapshot(opt, params), before)
    assert not (extra != 1).any()
    opt.param_groups.insert(1, middle)
    opt.step(grads)
    assert opt.state[1]["step"] == (3 if planned else 1)
    # SAM's perturb too (it raised an IndexError, or perturbed what was left)
    sam = fastopt.SAM(opt, rho=0.1)
    opt.param_groups.append({"params": [extra], "lr": 0.1})
    before = [p.copy() for p in params]
    with pytest.raises(ValueError, match=r"param_groups\[3\] was put in param_groups"):
        sam.perturb(grads)
    opt.param_groups.pop()
    opt.param_groups.pop(0)
    with pytest.raises(ValueError, match=r"param_groups\[0\] was removed"):
        sam.perturb(grads)
    assert not sam.perturbed and all(np.array_equal(p, b) for p, b in zip(params, before))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["dict", "nested", "list"])
def test_a_param_rebound_in_the_users_own_dict_or_list_is_refused(backend, layout):
    """``params["W"] = params["W"] * 2`` (or ``params.update(np.load(...))``)
    in the dict the optimizer was made from: the optimizer went on stepping
    the old array without a word, and the new one was never trained. Refused
    at the next step, naming the key, with nothing written; keys added are
    ignored, and the same array put back steps again."""
    w, b, s = np.ones(3), np.ones(2), np.ones(1)          # s: one element, compared by identity
    if layout == "dict":
        params, key, label = {"W": w, "b": b, "s": s}, ("b",), r"params\['b'\]"
    elif layout == "nested":
        params, key, label = {"l1": {"W": w}, "l2": {"b": b, "s": s}}, ("l2", "b"), \
            r"params\['l2'\]\['b'\]"
    else:
        params, key, label = [w, b, s], (1,), r"params\[1\]"

    def grads():
        g = [np.ones(3), np.ones(2), np.ones(1)]
        if layout == "dict":
            return dict(zip("Wbs", g))
        return {"l1": {"W": g[0]}, "l2": {"b": g[1], "s": g[2]}} if layout == "nested" else g

    def put(value, k=key):
        d = params
        for part in k[:-1]:
            d = d[part]
        d[k[-1]] = value

    opt = fastopt.Adam(params, lr=0.1, backend=backend)
    for _ in range(2):
        opt.step(grads())
    before = optimizer_snapshot(opt, [w, b, s])
    for replacement in (b * 2, b.copy()):       # another array, even one of equal values
        put(replacement)
        with pytest.raises(ValueError, match=label + " was replaced in the"):
            opt.step(grads())
        assert_same_tree(optimizer_snapshot(opt, [w, b, s]), before)
    put(b)
    put(s.copy(), key[:-1] + (("s",) if layout != "list" else (2,)))
    with pytest.raises(ValueError, match="was replaced in the"):
        opt.step(grads())
    put(s, key[:-1] + (("s",) if layout != "list" else (2,)))
    if layout == "dict":
        params["extra"] = np.zeros(5)               # not the optimizer's: ignored
    opt.step(grads())
    assert opt.state[0]["step"] == 3
    if layout == "dict":
        del params["b"]
        with pytest.raises(ValueError, match=r"params\['b'\] was removed from the dict"):
            opt.step(grads())

@pytest.mark.parametrize("backend", BACKENDS)
def test_an_array_appended_to_the_params_list_is_refused_unless_added(backend):
    """``params.append(W3)`` to grow the model: the new array was never
    trained, without a word (a grads list of 2 stepped the first two).
    Refused by name; added with add_param_group as well, the run goes on."""
    params = [np.ones(3), np.ones(2)]
    opt = fastopt.SGD(params, lr=0.1, backend=backend)
    opt.step([np.ones(3), np.ones(2)])
    before = optimizer_snapshot(opt, params)
    params.append(np.ones(4))
    for grads in ([np.ones(3), np.ones(2)], [np.ones(3), np.ones(2), np.ones(4)]):
        with pytest.raises(ValueError, match=r"params\[2\] was appended to the list .*"
                                             r"add_param_group"):
            opt.step(grads)
        assert_same_tree(optimizer_snapshot(opt, params[:2]), before)
    np.testing.assert_array_equal(params[2], 1.0)
    opt.add_param_group({"params": [params[2]]})
    opt.step([np.ones(3), np.ones(2), np.ones(4)])
    np.testing.assert_allclose(params[2], 0.9)
    np.testing.assert_allclose(params[0], 0.8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_checkpoint_after_a_refused_append_says_why(backend):
    """A state_dict (or fastopt.save) taken after params were appended to a
    group raised IndexError (params by name) or wrote a checkpoint that
    could not be loaded (a list): refused as the step refuses it."""
    params = {"w": np.ones(3), "b": np.ones(2)}
    opt = fastopt.Adam(params, lr=0.1, backend=backend)
    opt.step({"w": np.ones(3), "b": np.ones(2)})
    opt.param_groups[0]["params"].append(np.ones(4))
    with pytest.raises(ValueError, match="add_param_group"):
        opt.state_dict()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_deleted_hyperparameter_is_named(backend):
    params = [np.ones(3)]
    opt = fastopt.AdamW(params, lr=1e-3, backend=backend)
    opt.step([np.ones(3)])
    before = params[0].copy()
    for key in ("eps", "lr"):
        saved = opt.param_groups[0].pop(key)
        with pytest.raises(ValueError, match=rf"missing keys \['{key}'\]"):
            opt.step([np.ones(3)])
        np.testing.assert_array_equal(params[0], before)
        opt.param_groups[0][key] = saved
    opt.step([np.ones(3)])
    assert opt.state[0]["step"] == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_state_dict_taken_while_another_thread_steps_holds_one_step(backend):
    """state_dict() from a checkpointing thread while the training thread
    steps: each one holds the state of one step (it took moments from
    several steps, unlike its own step count, in 11-13 of 40)."""
    import threading
    n = 1 << 18
    params = [np.zeros(n, np.float32)]
    opt = fastopt.Adam(params, lr=1e-3, backend=backend)
    ref = fastopt.Adam([np.zeros(1, np.float32)], lr=1e-3, backend=backend)
    grads = [np.full(n, 0.5, np.float32)]
    expected = {}                       # step -> exp_avg of every element
    for k in range(1, 41):
        ref.step([np.full(1, 0.5, np.float32)])
        expected[k] = float(ref.state_dict()["state"][0]["buffers"]["exp_avg"][0])
    opt.step(grads)

    def train():
        for _ in range(39):
            opt.step(grads)
    worker = threading.Thread(target=train)
    worker.start()
    taken = [opt.state_dict()]
    while worker.is_alive():
        taken.append(opt.state_dict())
    worker.join()
    for sd in taken:
        m = sd["state"][0]["buffers"]["exp_avg"]
        assert (m == np.float32(expected[sd["state"][0]["step"]])).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_param_group_refuses_a_group_whose_param_was_replaced(backend):
    """add_param_group reads the groups' arrays again: a param replaced
    before it passed for one given and was stepped with the old one's state
    (with another size: a crash)."""
    params = [np.ones(4), np.ones(2)]
    opt = fastopt.SGD(params, lr=0.1, momentum=0.9, backend=backend)
    opt.step([np.ones(4), np.ones(2)])
    opt.param_groups[0]["params"][0] = np.zeros(1000)
    with pytest.raises(ValueError, match=r"\['params'\]\[0\] was replaced"):
        opt.add_param_group({"params": [np.ones(3)]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_state_dict_with_a_deleted_hyperparameter_is_refused(backend):
    """(It wrote a checkpoint that its own load refused.)"""
    opt = fastopt.AdamW([np.ones(3)], lr=1e-3, backend=backend)
    opt.step([np.ones(3)])
    for key in ("lr", "eps"):
        saved = opt.param_groups[0].pop(key)
        with pytest.raises(ValueError, match=rf"missing keys \['{key}'\]"):
            opt.state_dict()
        opt.param_groups[0][key] = saved
    opt.param_groups[0]["epsilon"] = 1e-8
    with pytest.raises(ValueError, match="unknown keys"):
        opt.state_dict()


@pytest.mark.parametrize("backend", BACKENDS)
def test_save_from_another_thread_holds_params_and_state_of_one_step(backend, monkeypatch,
                                                                     tmp_path):
    """A step that runs while fastopt.save writes (another thread) is not in
    the checkpoint: the params were kept as live arrays and written after
    the state was copied."""
    import threading
    from fastopt import checkpoint
    params = [np.ones(5)]
    opt = fastopt.SGD(params, lr=0.1, backend=backend)
    grads = [np.ones(5)]
    opt.step(grads)
    real = checkpoint._write_atomically

    def write_while_stepping(*args):
        t = threading.Thread(target=opt.step, args=(grads,))
        t.start()
        t.join()
        return real(*args)
    monkeypatch.setattr(checkpoint, "_write_atomically", write_while_stepping)
    fastopt.save(tmp_path / "c.npz", params=params, optimizer=opt)
    back = fastopt.load(tmp_path / "c.npz")
    assert back["optimizer"]["iterations"] == 1 and opt.iterations == 2
    np.testing.assert_array_equal(back["params"][0], np.full(5, 0.9))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("cls,where", [(fastopt.SGD, "_plan_lr"), (fastopt.Adam, "_plan_lr"),
                                       (fastopt.RMSprop, "_plan_element")])
def test_an_interrupt_while_the_plan_takes_a_new_lr_keeps_the_new_lr(backend, monkeypatch,
                                                                     cls, where):
    """The plan stored the new lr before the element step made from it: a
    Ctrl-C between the two kept the old lr's step for good. (SGD and Adam
    take a new lr in _plan_lr, the others make their element step again.)"""
    def run(interrupt):
        params = [np.ones(3)]
        opt = cls(params, lr=0.1, backend=backend)
        for _ in range(2):
            opt.step([np.ones(3)])
        opt.param_groups[0]["lr"] = 0.5
        before = params[0].copy()
        if interrupt:
            real, calls = getattr(cls, where), []

            def interrupted(self, *args):
                calls.append(1)
                if len(calls) == 1:
                    raise KeyboardInterrupt
                return real(self, *args)
            monkeypatch.setattr(cls, where, interrupted)
            with pytest.raises(KeyboardInterrupt):
                opt.step([np.ones(3)])
            np.testing.assert_array_equal(params[0], before)      # nothing written
            monkeypatch.undo()
        opt.step([np.ones(3)])
        return params[0]
    np.testing.assert_array_equal(run(True), run(False))          # with lr 0.5


def test_fastopt_cuda_is_an_attribute_or_absent_never_an_import_error():
    """hasattr / getattr with a default only expect AttributeError."""
    present = hasattr(fastopt, "cuda")
    assert getattr(fastopt, "cuda", None) is not None or not present


def test_lbfgs_refuses_a_param_rebound_in_the_users_dict():
    """L-BFGS has a step of its own: a replaced entry trained silently."""
    params = {"W": np.ones(3), "b": np.ones(2)}
    opt = fastopt.LBFGS(params, lr=0.1)

    def closure():
        return float(params["W"].sum()), {"W": np.ones(3), "b": np.ones(2)}
    opt.step(closure)
    params["W"] = params["W"] + 1
    with pytest.raises(ValueError, match=r"params\['W'\] was replaced in the dict"):
        opt.step(closure)


def test_the_watch_follows_params_given_at_step_and_stays_after_add_param_group():
    """Three ways the check went quiet: a dict given by step(params=...)
    (the step skips its comparison once it is the one given), any dict
    after add_param_group, and SAM's perturb. A view of the whole array
    (``a[:]``, a reshape) is the optimizer's memory: fine."""
    g = {"W": np.ones(3)}
    p = {"W": np.zeros(3)}
    opt = fastopt.SGD(lr=0.1)
    opt.step(g, params=p)
    q = dict(p)
    opt.step(g, params=q)
    q["W"] = q["W"] - 0.0
    with pytest.raises(ValueError, match=r"params\['W'\] was replaced"):
        opt.step(g, params=q)

    p = {"W": np.zeros(3)}
    opt = fastopt.SGD(p, lr=0.1)
    opt.add_param_group({"params": {"H": np.zeros(2)}})
    opt.step({"W": np.ones(3), "H": np.ones(2)})
    p["W"] = p["W"][:]                    # a view of all of it: trained as before
    opt.step({"W": np.ones(3), "H": np.ones(2)})
    np.testing.assert_allclose(p["W"], np.full(3, -0.2))
    p["W"] = p["W"] - 0.0
    with pytest.raises(ValueError, match=r"params\['W'\] was replaced"):
        opt.step({"W": np.ones(3), "H": np.ones(2)})

    p = {"W": np.zeros(3)}
    sam = fastopt.SAM(fastopt.SGD(p, lr=0.1), rho=0.1)
    sam.perturb(g)
    sam.step(g)
    old = p["W"]
    p["W"] = p["W"] * 1.0
    before = old.copy()
    with pytest.raises(ValueError, match=r"params\['W'\] was replaced"):
        sam.perturb(g)
    assert not sam.perturbed and np.array_equal(old, before)


def test_the_watch_compares_objects_not_values_once_a_change_is_accepted():
    """A view accepted as the same memory was compared element by element
    at every step (a (N, 1) view of a bias: an N x N array); a dict passed
    anew to step(params=...) was checked against the one before it."""
    p = {"b": np.zeros(50)}
    opt = fastopt.SGD(p, lr=0.1)
    g = {"b": np.ones(50)}
    opt.step(g)
    view = p["b"].reshape(50, 1)
    p["b"] = view
    opt.step(g)
    assert opt._watch.ref[0] is view          # known now: later steps compare identity
    p["extra"] = 1                            # a key added: listed and known too
    opt.step(g)
    assert len(opt._watch.ref) == 2
    np.testing.assert_allclose(view[:, 0], np.full(50, -0.3))     # three steps, one array

    W = np.zeros(3)
    opt = fastopt.SGD(lr=0.1)
    for _ in range(3):
        params = {"W": W}                     # a fresh dict of the same array each step
        opt.step({"W": np.ones(3)}, params=params)
        params["W"] = params["W"] * 0         # scratch use of a dict it is done with
    np.testing.assert_allclose(W, np.full(3, -0.3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_overflow_runs_as_ieee_says_with_warnings_made_errors(backend):
    # NumPy's overflow warnings, made errors (-W error, pytest's
    # filterwarnings), stopped the numpy backend's step after its first
    # array, and a LossScaler reaching float32's top after the writes: each
    # step is whole, with the values the compiled kernels give
    import warnings

    def run():
        p = [np.ones(2, np.float32), np.ones(2, np.float32)]
        opt = fastopt.Adam(p, lr=0.1, backend=backend)
        opt.step([np.array([3e38, 1.0], np.float32), np.array([1.0, 3e38], np.float32)])
        scaler = fastopt.LossScaler(init_scale=2.0 ** 127, growth_interval=1)
        q = [np.ones(2, np.float32)]
        sgd = fastopt.SGD(q, lr=1.0, loss_scaler=scaler, backend=backend)
        sgd.step([np.array([2.0 ** 126, 0.0], np.float32)])
        return p, opt.iterations, q, sgd.iterations, scaler.scale, scaler.growth_tracker

    quiet = run()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        strict = run()
    assert quiet[1] == quiet[3] == 1 and quiet[4] == 2.0 ** 127 and quiet[5] == 0
    np.testing.assert_array_equal(quiet[2][0], [0.5, 1.0])
    for a, b in zip(quiet[0] + quiet[2], strict[0] + strict[2]):
        np.testing.assert_array_equal(a, b)
    assert quiet[1:2] + quiet[3:] == strict[1:2] + strict[3:]
