"""L-BFGS against torch.optim.LBFGS (Rosenbrock in 2 and n dimensions, logistic
regression; fixed steps and strong Wolfe), the two-loop recursion against the
dense BFGS update, the flat kernels against their NumPy reference, checkpoints
and errors.

Tolerances: the closures are the same NumPy code on both sides, so the only
differences are rounding inside the optimizers. torch's axpy fuses multiply
and add (FMA) and its dot products sum in MKL's order; fastopt's do neither.
On logistic regression that stays at ~1e-16 (float64). Along Rosenbrock's
curved valley the line search amplifies it (~10x per step call here), so
those trajectories are compared for 4 calls of 5 iterations (20 iterations,
the ring of 3 pairs wrapped several times), where float64 stays within
1e-10. float32: fastopt's dots and scalars are float64, torch's float32;
the fixed-step runs stay within 1e-5, the line search's within 1e-5 on
logistic regression (on float32 Rosenbrock its branch decisions differ).
"""

from __future__ import annotations

import numpy as np
import pytest

import fastopt
from conftest import BACKENDS, FAST_BACKENDS, LARGE, assert_same_tree
from lbfgs_problems import logistic_problem, rosenbrock, rosenbrock_start

torch = pytest.importorskip("torch")

TOL = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-5}


SHAPES_OF = {"rosen2": [(2,)], "rosen6": [(2, 2), (2,)], "logistic": [(3, 4), (1,)]}


class Side:
    """The params as fastopt users hold them: a list, a dict, or packed."""

    def __init__(self, x0, shapes, layout, dtype):
        arrays, lo = [], 0
        for s in shapes:
            k = int(np.prod(s))
            arrays.append(x0[lo:lo + k].reshape(s).astype(dtype))
            lo += k
        self.layout, self.dtype = layout, dtype
        if layout == "packed":
            self.params = fastopt.pack(arrays)
            self.arrays = list(self.params)
            self.buf = self.params.zeros_like()
        else:
            self.arrays = arrays
            self.params = ({f"p{i}": a for i, a in enumerate(arrays)} if layout == "dict"
                           else arrays)

    def flat(self):
        return np.concatenate([a.reshape(-1) for a in self.arrays])

    def closure(self, problem, calls=None):
        def closure():
            if calls is not None:
                calls.append(1)
            f, g = problem(self.flat())
            g = g.astype(self.dtype)
            parts, lo = [], 0
            for a in self.arrays:
                parts.append(g[lo:lo + a.size].reshape(a.shape))
                lo += a.size
            if self.layout == "packed":
                for view, x in zip(self.buf, parts):
                    view[...] = x
                return f, self.buf
            if self.layout == "dict":
                return f, {f"p{i}": x for i, x in enumerate(parts)}
            return f, parts
        return closure


def torch_run(x0, dtype, problem, steps, **kw):
    """torch.optim.LBFGS from ``x0`` over one parameter, the same NumPy closure."""
    p = torch.nn.Parameter(torch.from_numpy(x0.astype(dtype)))
    opt = torch.optim.LBFGS([p], **kw)

    def closure():
        f, g = problem(p.detach().numpy())
        p.grad = torch.from_numpy(g.astype(dtype))
        return f

    path = []
    for _ in range(steps):
        opt.step(closure)
        path.append(p.detach().numpy().copy())
    return path, opt.state[p]


def fastopt_run(x0, dtype, problem, shapes, layout, backend, steps, **kw):
    side = Side(x0, shapes, layout, dtype)
    opt = fastopt.LBFGS(side.params, backend=backend, **kw)
    path = []
    for _ in range(steps):
        opt.step(side.closure(problem))
        path.append(side.flat())
    return path, opt


def assert_matches_torch(mine, theirs, dtype):
    (path, opt), (tpath, tstate) = mine, theirs
    tol = TOL[np.dtype(dtype)]
    for k, (a, b) in enumerate(zip(path, tpath)):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol, err_msg=f"after step call {k + 1}")
    sd = opt.state_dict()["lbfgs"]
    assert (sd["func_evals"], sd["n_iter"]) == (tstate["func_evals"], tstate["n_iter"])
    assert len(sd["ro"]) == len(tstate["ro"])
    # the state is gradient-like: a param difference comes back multiplied
    # by the Hessian (~1e2 on Rosenbrock), so 100x the params' tolerance,
    # relative to each vector's size
    tol = 100 * tol
    for name in ("d", "prev_flat_grad", "old_dirs", "old_stps"):
        want = tstate[name]
        want = want.numpy() if name in ("d", "prev_flat_grad") else np.stack(
            [v.numpy() for v in want])
        np.testing.assert_allclose(sd[name], want, rtol=0, err_msg=name,
                                   atol=tol * max(1.0, np.abs(want).max()))
    assert sd["prev_loss"] == pytest.approx(tstate["prev_loss"], rel=tol)
    if dtype == np.float64:    # float32: torch's y.s is a float32 sum of cancelling terms
        assert list(sd["ro"]) == pytest.approx([float(r) for r in tstate["ro"]], rel=tol)
        for name in ("t", "H_diag"):
            assert sd[name] == pytest.approx(float(tstate[name]), rel=tol), name


ROSENBROCK = [("rosen2", 2), ("rosen6", 6)]


@pytest.mark.parametrize("line_search", [None, "strong_wolfe"])
@pytest.mark.parametrize("case", ROSENBROCK, ids=[c[0] for c in ROSENBROCK])
@pytest.mark.parametrize("backend", BACKENDS)
def test_rosenbrock_float64_matches_torch(backend, case, line_search):
    name, n = case
    x0 = rosenbrock_start(n)
    kw = dict(lr=1 if line_search else 0.05, max_iter=5, history_size=3,
              line_search_fn=line_search)
    mine = fastopt_run(x0, np.float64, rosenbrock, SHAPES_OF[name], "list", backend, 4, **kw)
    assert_matches_torch(mine, torch_run(x0, np.float64, rosenbrock, 4, **kw), np.float64)
    if line_search:       # and it got somewhere: near the minimum at (1, ..., 1)
        assert rosenbrock(mine[0][-1])[0] < 0.1 * rosenbrock(x0)[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_rosenbrock_float32_fixed_steps_match_torch(backend):
    x0 = rosenbrock_start(6)
    kw = dict(lr=0.05, max_iter=5, history_size=3)
    mine = fastopt_run(x0, np.float32, rosenbrock, SHAPES_OF["rosen6"], "packed", backend, 6,
                       **kw)
    assert_matches_torch(mine, torch_run(x0, np.float32, rosenbrock, 6, **kw), np.float32)


@pytest.mark.parametrize("line_search", [None, "strong_wolfe"])
@pytest.mark.parametrize("layout", ["list", "dict", "packed"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_logistic_regression_matches_torch(backend, dtype, layout, line_search):
    problem = logistic_problem()
    x0 = np.zeros(13)
    kw = dict(lr=1 if line_search else 0.5, max_iter=6, history_size=4,
              line_search_fn=line_search)
    mine = fastopt_run(x0, dtype, problem, SHAPES_OF["logistic"], layout, backend, 6, **kw)
    assert_matches_torch(mine, torch_run(x0, dtype, problem, 6, **kw), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_coarse_tolerance_change_is_the_outer_loops_only_as_in_torch(backend):
    # torch's line search keeps its own interval tolerance (1e-9) whatever
    # tolerance_change is; passing the user's on made the search stop
    # sooner (18 closure calls against torch's 19, params 9e-4 apart)
    rng = np.random.default_rng(8)
    a = rng.standard_normal((16, 16))
    a = 1e4 * (a @ a.T / 16 + np.eye(16))
    b = rng.standard_normal(16)

    def problem(x):
        return float(0.5 * x @ a @ x + b @ x + 0.25 * np.sum(x ** 4)), a @ x + b + x ** 3

    x0 = 3 * rng.standard_normal(16)
    kw = dict(lr=10.0, tolerance_change=1e-2, line_search_fn="strong_wolfe")
    mine = fastopt_run(x0, np.float64, problem, [(4, 4)], "list", backend, 2, **kw)
    assert_matches_torch(mine, torch_run(x0, np.float64, problem, 2, **kw), np.float64)


def test_converges_and_stops_on_the_gradient_tolerance():
    """Run to convergence: the gradient test ends a step after one closure
    call, and the step returns the loss at the params it started from."""
    problem = logistic_problem()
    side = Side(np.zeros(13), SHAPES_OF["logistic"], "list", np.float64)
    opt = fastopt.LBFGS(side.params, line_search_fn="strong_wolfe", max_iter=200,
                        tolerance_grad=1e-8, tolerance_change=1e-15)
    first = opt.step(side.closure(problem))
    assert first == pytest.approx(np.log(2))
    assert np.abs(problem(side.flat())[1]).max() <= 1e-8
    calls = []
    before = side.flat()
    assert opt.step(side.closure(problem, calls)) == pytest.approx(problem(before)[0])
    assert len(calls) == 1
    np.testing.assert_array_equal(side.flat(), before)
    assert opt.stop_reason == "tolerance_grad"


def test_stop_reason_says_which_test_or_limit_ended_the_step():
    """A scientist's question after each step (scipy's result says it):
    converged, or stopped by a limit and worth another step."""
    x = rosenbrock_start(2)
    opt = fastopt.LBFGS([x], line_search_fn="strong_wolfe", max_iter=3, max_eval=100)
    assert opt.stop_reason is None
    closure = lambda: (rosenbrock(x)[0], [rosenbrock(x)[1]])    # noqa: E731
    opt.step(closure)
    assert opt.stop_reason == "max_iter"
    opt.param_groups[0].update(max_iter=100, max_eval=4)
    opt.step(closure)
    assert opt.stop_reason == "max_eval"
    opt.param_groups[0].update(max_eval=1000, tolerance_grad=0.0)
    while opt.stop_reason != "tolerance_change":
        opt.step(closure)
    assert rosenbrock(x)[0] < 1e-8


def test_a_non_finite_loss_at_the_start_is_warned_about():
    x = np.ones(3)
    opt = fastopt.LBFGS([x], line_search_fn="strong_wolfe")
    with pytest.warns(RuntimeWarning, match="the loss at the params is nan"):
        assert np.isnan(opt.step(lambda: (np.nan, [np.ones(3)])))
    np.testing.assert_array_equal(x, 1.0)


def test_gradients_as_step_takes_them_elsewhere():
    """A Python number for a 0-d param, grads.values() of params by name:
    what the README says every step takes (a user trial found LBFGS raising
    AttributeError and TypeError)."""
    x = np.array(2.0)
    opt = fastopt.LBFGS([x])
    opt.step(lambda: ((float(x) - 1) ** 2, [2 * (float(x) - 1)]))
    assert x == pytest.approx(1.0)
    p = {"a": np.ones(2), "b": np.array(3.0)}
    opt = fastopt.LBFGS(p, line_search_fn="strong_wolfe")
    opt.step(lambda: (float(p["a"] @ p["a"] + p["b"] ** 2),
                      {"b": 2 * float(p["b"]), "a": 2 * p["a"]}.values()))
    assert opt.stop_reason == "tolerance_grad"
    for a in p.values():
        np.testing.assert_allclose(a, 0.0, atol=1e-9)


# -- the two-loop recursion and the ring ----------------------------------------------------

def dense_inverse_hessian(pairs, gamma):
    """N&W eq. 6.17 applied pair by pair: H <- (I - ro s y^T) H (I - ro y s^T) + ro s s^T."""
    n = pairs[0][0].size
    H = gamma * np.eye(n)
    for s, y in pairs:
        ro = 1.0 / (y @ s)
        V = np.eye(n) - ro * np.outer(y, s)
        H = V.T @ H @ V + ro * np.outer(s, s)
    return H


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_loop_recursion_is_the_bfgs_inverse_hessian(backend):
    from fastopt.backends.flat_ops import ops_for
    from fastopt.optim.lbfgs import History, two_loop
    rng = np.random.default_rng(5)
    n, m = 7, 3
    A = rng.standard_normal((n, n))
    A = A @ A.T + n * np.eye(n)                  # y = A s: positive curvature
    hist = History(m, n, np.float64)
    pairs = []
    for _ in range(5):                           # 5 pairs through a ring of 3: it wraps
        s = rng.standard_normal(n)
        y = A @ s
        hist.S[hist.spare], hist.Y[hist.spare] = s, y
        hist.keep(1.0 / (y @ s))
        pairs.append((s, y))
    assert len(hist) == m and sorted(hist.rows + [hist.spare]) == list(range(m + 1))
    kept = pairs[-m:]
    for (s, y, ro), (s2, y2) in zip(hist.pairs(), kept):
        np.testing.assert_array_equal(s, s2)
        assert ro == 1.0 / (y2 @ s2)
    g = rng.standard_normal(n)
    gamma = (kept[-1][1] @ kept[-1][0]) / (kept[-1][1] @ kept[-1][1])
    q = np.empty(n)
    two_loop(ops_for(backend), hist, g, gamma, q)
    np.testing.assert_allclose(q, -dense_inverse_hessian(kept, gamma) @ g, rtol=1e-12)


VECTOR_CASES = [("small", 37), ("large", LARGE)]


@pytest.mark.parametrize("size", VECTOR_CASES, ids=[c[0] for c in VECTOR_CASES])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_flat_kernels_match_the_reference(backend, dtype, size):
    from fastopt.backends import flat_ops
    fast = flat_ops.ops_for(backend)
    n = size[1]
    rng = np.random.default_rng(6)
    x, y, z = (rng.standard_normal(n).astype(dtype) for _ in range(3))
    rel = 1e-12 if dtype == np.float64 else 1e-10     # float64 sums either way
    assert fast.dot(x, y) == pytest.approx(flat_ops.dot(x, y), rel=rel)
    for op, args in (("axpy", (0.3, x)), ("axpy_dot", (0.3, x)), ("scale_dot", (-1.7,))):
        mine, ref = y.copy(), y.copy()
        extra = (z,) if op != "axpy" else ()
        a = getattr(fast, op)(*args, mine, *extra)
        b = getattr(flat_ops, op)(*args, ref, *extra)
        np.testing.assert_array_equal(mine, ref, err_msg=op)     # same IEEE operations
        assert a == pytest.approx(b, rel=rel), op
    pg, d = y.copy(), z.copy()
    ref_pg, ref_d = y.copy(), z.copy()
    assert fast.pair_dots(0.25, x, pg, d) == pytest.approx(
        flat_ops.pair_dots(0.25, x, ref_pg, ref_d), rel=rel)
    np.testing.assert_array_equal(pg, ref_pg)
    np.testing.assert_array_equal(d, ref_d)
    assert fast.abs_sum_max(x) == pytest.approx(flat_ops.abs_sum_max(x), rel=rel)
    x[n // 2] = np.nan
    s, m = fast.abs_sum_max(x)
    assert np.isnan(s) and np.isnan(m)


# -- checkpoints ---------------------------------------------------------------------------

@pytest.mark.parametrize("line_search", [None, "strong_wolfe"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoint_round_trip_resumes_bit_exactly(tmp_path, backend, line_search):
    problem = logistic_problem()
    kw = dict(max_iter=3, history_size=2, line_search_fn=line_search, lr=1 if line_search
              else 0.5)
    side = Side(np.zeros(13), SHAPES_OF["logistic"], "dict", np.float64)
    opt = fastopt.LBFGS(side.params, backend=backend, **kw)
    for _ in range(2):
        opt.step(side.closure(problem))
    fastopt.save(tmp_path / "ck.npz", params=side.arrays, optimizer=opt)
    for _ in range(3):
        opt.step(side.closure(problem))
    side2 = Side(np.ones(13), SHAPES_OF["logistic"], "dict", np.float64)
    opt2 = fastopt.LBFGS(side2.params, backend=backend, **kw)
    fastopt.load(tmp_path / "ck.npz", params=side2.arrays, optimizer=opt2)
    for _ in range(3):
        opt2.step(side2.closure(problem))
    assert_same_tree(opt2.state_dict(), opt.state_dict())
    assert_same_tree(side2.arrays, side.arrays)


def test_checkpoint_mismatch_changes_nothing():
    problem = logistic_problem()
    side = Side(np.zeros(13), SHAPES_OF["logistic"], "list", np.float64)
    opt = fastopt.LBFGS(side.params, history_size=2)
    opt.step(side.closure(problem))
    sd = opt.state_dict()
    fresh = fastopt.LBFGS([a.copy() for a in side.arrays], history_size=2)
    before = fresh.state_dict()
    ls = sd["lbfgs"]
    for bad in (dict(sd, lbfgs=dict(ls, d=ls["d"][:-1])),
                dict(sd, lbfgs=dict(ls, old_dirs=ls["old_dirs"].astype(np.float32))),
                dict(sd, lbfgs=dict(ls, n_iter=0)),
                dict(sd, lbfgs={k: v for k, v in ls.items() if k != "t"}),
                dict(sd, type="SGD")):
        with pytest.raises((ValueError, TypeError)):
            fresh.load_state_dict(bad)
        assert_same_tree(fresh.state_dict(), before)
    small = fastopt.LBFGS([a.copy() for a in side.arrays], history_size=1)
    with pytest.raises(ValueError, match="history_size"):
        small.load_state_dict(dict(sd, param_groups=[dict(sd["param_groups"][0],
                                                          history_size=1)]))


def test_history_size_change_keeps_the_newest_pairs():
    problem = logistic_problem()
    side = Side(np.zeros(13), SHAPES_OF["logistic"], "list", np.float64)
    opt = fastopt.LBFGS(side.params, history_size=4, max_iter=6, lr=0.5)
    opt.step(side.closure(problem))
    newest = opt.state_dict()["lbfgs"]["old_stps"][-2:]
    opt.param_groups[0]["history_size"] = 2
    opt.step(side.closure(problem))      # rebuilt with the newest 2, then stepped on
    sd = opt.state_dict()["lbfgs"]
    assert len(sd["ro"]) == 2
    assert not np.array_equal(sd["old_stps"], newest)    # it moved on


# -- errors ----------------------------------------------------------------------------------

def test_bad_arguments_are_refused():
    p = [np.zeros(3)]
    for kw, exc in ((dict(lr=-1), ValueError), (dict(max_iter=0), ValueError),
                    (dict(max_iter=2.5), TypeError), (dict(history_size=0), ValueError),
                    (dict(max_eval=0), ValueError), (dict(tolerance_grad=-1), ValueError),
                    (dict(line_search_fn="armijo"), ValueError)):
        with pytest.raises(exc):
            fastopt.LBFGS(p, **kw)
    with pytest.raises(ValueError, match="one param group"):
        fastopt.LBFGS([{"params": [np.zeros(2)]}, {"params": [np.zeros(2)], "lr": 0.1}])
    with pytest.raises(TypeError, match="float32 or float64"):
        fastopt.LBFGS([np.zeros(3, np.float16)])
    # its one group: no advice to make another
    with pytest.raises(ValueError, match=r"one dtype \(\.astype\): LBFGS takes one param "
                                         r"group \(torch's rule") as mixed:
        fastopt.LBFGS([np.zeros(2), np.zeros(2, np.float32)])
    assert "group of their own" not in str(mixed.value)
    # backend="cuda" with host arrays: refused as for any optimizer (its
    # device steps are tests/cuda_sim/test_cuda_lbfgs.py's)
    with pytest.raises(Exception) as lbfgs_error:
        fastopt.LBFGS(p, backend="cuda")
    with pytest.raises(Exception) as adam_error:
        fastopt.Adam(p, backend="cuda")
    assert (type(lbfgs_error.value), str(lbfgs_error.value)) == (
        type(adam_error.value), str(adam_error.value))
    with pytest.raises(TypeError, match="closure"):
        fastopt.LBFGS(p).step([np.zeros(3)])
    with pytest.raises(TypeError, match="stepped with gradients"):
        fastopt.SAM(fastopt.LBFGS(p))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_closure_results_change_nothing(backend):
    p = [np.ones(3), np.ones(2)]
    opt = fastopt.LBFGS(p, backend=backend)
    before = opt.state_dict()
    good = [np.ones(3), np.ones(2)]
    for result, exc in ((1.0, TypeError), ((1.0, good, 3), TypeError),
                        (("loss", good), TypeError), ((np.ones(2), good), TypeError),
                        ((1.0, good[:1]), ValueError),
                        ((1.0, [np.ones(3), np.ones(3)]), ValueError),
                        ((1.0, [np.ones(3, np.float32), np.ones(2)]), TypeError),
                        ((1.0, [p[0], np.ones(2)]), ValueError)):
        with pytest.raises(exc):
            opt.step(lambda: result)
        assert_same_tree(p, [np.ones(3), np.ones(2)])
        assert_same_tree(opt.state_dict(), before)


def test_an_error_inside_the_line_search_leaves_the_last_completed_move():
    problem = logistic_problem()
    kw = dict(line_search_fn="strong_wolfe", max_iter=1)
    ref = Side(np.zeros(13), SHAPES_OF["logistic"], "list", np.float64)
    ref_opt = fastopt.LBFGS(ref.params, **kw)
    ref_opt.step(ref.closure(problem))              # one iteration: x1
    first_calls = ref_opt.state[0]["func_evals"]

    side = Side(np.zeros(13), SHAPES_OF["logistic"], "list", np.float64)
    opt = fastopt.LBFGS(side.params, **dict(kw, max_iter=5))
    inner = side.closure(problem)
    calls = []

    def failing():
        calls.append(1)
        if len(calls) > first_calls:             # the second iteration's first trial
            raise RuntimeError("closure failed")
        return inner()

    with pytest.raises(RuntimeError, match="closure failed"):
        opt.step(failing)
    np.testing.assert_array_equal(side.flat(), ref.flat())


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_copy_or_a_pickle_after_a_step_goes_on_as_the_original(backend):
    """Its history keeps the flat operations' module (by name in a copy): a
    deepcopy or pickle made mid-run steps exactly as the original does."""
    import copy
    import pickle

    def run(opt, p):
        return opt.step(lambda: (float(((p[0] - 1) ** 2 * np.arange(1, 4)).sum()),
                                 [2 * (p[0] - 1) * np.arange(1, 4)]))

    p = [np.zeros(3)]
    opt = fastopt.LBFGS(p, backend=backend, max_iter=2)
    run(opt, p)
    copies = [copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))]
    run(opt, p)
    for c in copies:
        q = c.param_groups[0]["params"]
        run(c, q)
        np.testing.assert_array_equal(q[0], p[0])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_nan_or_inf_loss_at_a_trial_step_shrinks_the_step(bad):
    """An explicit integration that blows up at one trial step of the line
    search: the step shrinks, as for any loss too high. (torch, and fastopt
    before, raised an IndexError for NaN there and took a NaN step for inf,
    every param NaN.)"""
    p = np.ones(3)
    calls = [0]

    def closure():
        calls[0] += 1
        return (bad if calls[0] == 2 else 0.5 * p @ p), p.copy()

    opt = fastopt.LBFGS(p, max_iter=10, line_search_fn="strong_wolfe")
    assert opt.step(closure) == 1.5
    assert np.all(np.isfinite(p)) and np.abs(p).max() < 1e-12
    assert calls[0] > 2


def test_an_exactly_linear_stretch_clamps_the_step_as_torch():
    """A zero denominator in the cubic step: torch divides tensors (an
    infinite step, clamped to the bracket's bound); Python floats raised
    ZeroDivisionError."""
    x = np.ones(3)
    opt = fastopt.LBFGS(x, line_search_fn="strong_wolfe", max_iter=5)
    loss = opt.step(lambda: (x.sum(), np.ones_like(x)))
    t = torch.ones(3, dtype=torch.float64, requires_grad=True)
    ref = torch.optim.LBFGS([t], line_search_fn="strong_wolfe", max_iter=5)

    def closure():
        ref.zero_grad()
        out = t.sum()
        out.backward()
        return out
    assert loss == ref.step(closure).item()
    np.testing.assert_array_equal(x, t.detach().numpy())


def test_a_step_that_converges_on_its_last_iteration_says_it_converged():
    """(review) the limits were tested first: a step that reached the
    minimum on its max_iter-th iteration said "max_iter"."""
    x = np.array([3.0, 1.0])
    opt = fastopt.LBFGS([x], max_iter=2, max_eval=100, line_search_fn="strong_wolfe")
    opt.step(lambda: (0.5 * float(x @ x), [x.copy()]))
    np.testing.assert_allclose(x, 0.0, atol=1e-12)
    assert opt.stop_reason == "tolerance_grad"
    # without a line search the last iteration's point is not evaluated: a limit
    y = np.array([3.0, 1.0])
    plain = fastopt.LBFGS([y], max_iter=2, max_eval=100)
    plain.step(lambda: (0.5 * float(y @ y), [y.copy()]))
    assert plain.stop_reason == "max_iter"
    # a closure that raises leaves no reason from an earlier step
    with pytest.raises(RuntimeError):
        opt.step(lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    assert opt.stop_reason is None
