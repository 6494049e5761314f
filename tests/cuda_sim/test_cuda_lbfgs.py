"""L-BFGS on device params, against L-BFGS on the host (the NumPy reference),
and its device vector operations (fastopt.backends.flat_cuda) against
their NumPy reference (flat_ops).

The vectors, the history ring and every update are on the device; each
dot product is read back by the host (the algorithm decides there). The
closures compute on the host from a copy of the device params: only the
optimizer is under test. (L-BFGS on the host against torch: test_lbfgs.py.)
"""

from __future__ import annotations

import numpy as np
import pytest
from cuda_helpers import close, dev, host  # skips the module where CUDA is unusable
from lbfgs_problems import logistic_problem, rosenbrock

import fastopt
from fastopt.backends import flat_cuda as FC
from fastopt.backends import flat_ops as F
from fastopt.backends import numba_cuda as C
from fastopt.backends._flat_cuda_kernels import CHUNK

#: L-BFGS trajectories: float64 within this (the task's tolerance)
TOL = 1e-10


# -- the vector operations ------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_vector_operations_match_the_reference(dtype):
    """Over several chunks and a partial one: the updated vectors (a GPU
    may contract multiply-adds, so to rounding) and the float64 sums."""
    n = 3 * CHUNK + 5
    rng = np.random.default_rng(0)
    x, y, z = (rng.standard_normal(n).astype(dtype) for _ in range(3))
    rel = 1e-12
    assert FC.dot(dev(x), dev(y)) == pytest.approx(F.dot(x, y), rel=rel)
    for op, args, extra in (("axpy", (0.3,), ()), ("axpy_dot", (0.3,), (z,)),
                            ("scale_dot", (), (z,))):
        mine, ref = dev(y), y.copy()
        a_args = args + ((dev(x),) if op != "scale_dot" else (-1.7,))
        r_args = args + ((x,) if op != "scale_dot" else (-1.7,))
        got = getattr(FC, op)(*a_args, mine, *(dev(e) for e in extra))
        want = getattr(F, op)(*r_args, ref, *extra)
        close(host(mine), ref, op)
        if want is not None:
            assert got == pytest.approx(want, rel=rel), op
    pg, d = dev(y), dev(z)
    ref_pg, ref_d = y.copy(), z.copy()
    assert FC.pair_dots(0.25, dev(x), pg, d) == pytest.approx(
        F.pair_dots(0.25, x, ref_pg, ref_d), rel=rel)
    close(host(pg), ref_pg, "y")
    close(host(d), ref_d, "s")
    out = FC.empty(n, dtype)
    FC.negate(dev(x), out)
    np.testing.assert_array_equal(host(out), -x)
    FC.scale(2.5, out)
    close(host(out), -x * dtype(2.5), "scale")
    assert FC.abs_sum_max(dev(x)) == pytest.approx(F.abs_sum_max(x), rel=rel)
    x[n // 2] = np.nan
    s, m = FC.abs_sum_max(dev(x))
    assert np.isnan(s) and np.isnan(m)


def test_dot_does_not_depend_on_the_grid(monkeypatch):
    rng = np.random.default_rng(1)
    x, y = (dev(rng.standard_normal(5 * CHUNK + 3)) for _ in range(2))
    default = FC.dot(x, y)
    monkeypatch.setattr(C, "grid_blocks", lambda *a: 1)
    assert FC.dot(x, y) == default          # bit for bit


# -- L-BFGS ------------------------------------------------------------------------------

def _split(flat, like):
    """``flat`` as arrays shaped like ``like``'s."""
    parts = np.split(flat, np.cumsum([a.size for a in like])[:-1])
    return [q.reshape(a.shape) for q, a in zip(parts, like)]


class Pair:
    """The same L-BFGS on device params (packed or a list) and on host
    params, the closure computing on host copies."""

    def __init__(self, x0, shapes, packed, **kw):
        arrays, lo = [], 0
        for s in shapes:
            k = int(np.prod(s))
            arrays.append(x0[lo:lo + k].reshape(s).copy())
            lo += k
        self.packed = packed
        self.params = C.pack(arrays) if packed else [dev(a) for a in arrays]
        self.host_params = [a.copy() for a in arrays]
        self.opt = fastopt.LBFGS(self.params, **kw)
        self.ref = fastopt.LBFGS(self.host_params, backend="numpy", **kw)

    def flat(self):
        if self.packed:
            return host(self.params.data)
        return np.concatenate([host(p).reshape(-1) for p in self.params])

    def closures(self, problem):
        def on_device():
            f, g = problem(self.flat())
            if self.packed:
                buf = self.params.zeros_like()
                buf.data.copy_to_device(g)
                return f, buf
            return f, [dev(q) for q in _split(g, self.params)]

        def on_host():
            f, g = problem(np.concatenate([p.reshape(-1) for p in self.host_params]))
            return f, _split(g, self.host_params)
        return on_device, on_host

    def steps(self, problem, calls):
        on_device, on_host = self.closures(problem)
        for _ in range(calls):
            assert self.opt.step(on_device) == pytest.approx(self.ref.step(on_host), rel=TOL)

    def same(self):
        want = np.concatenate([p.reshape(-1) for p in self.host_params])
        np.testing.assert_allclose(self.flat(), want, rtol=TOL, atol=TOL)


#: (problem, start, param shapes, packed, options); small: the simulator runs
#: every CUDA thread of the ~15 launches per iteration in Python
CASES = {
    "rosenbrock-fixed-packed": (rosenbrock, np.array([-1.2, 1.0, -1.2, 1.0]), [(2, 2)],
                                True, dict(lr=0.5, max_iter=3, history_size=2)),
    "logistic-wolfe-list": (logistic_problem(n=60, d=5), np.zeros(6), [(5,), (1,)], False,
                            dict(max_iter=3, history_size=2, line_search_fn="strong_wolfe")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_device_lbfgs_equals_host_lbfgs(case):
    """Two step calls (the ring of 2 pairs wraps): the losses, params and state."""
    problem, x0, shapes, packed, kw = CASES[case]
    pair = Pair(x0, shapes, packed, **kw)
    pair.steps(problem, 2)
    pair.same()
    d, h = pair.opt.state_dict()["lbfgs"], pair.ref.state_dict()["lbfgs"]
    assert (d["n_iter"], d["func_evals"]) == (h["n_iter"], h["func_evals"])
    for key in ("d", "prev_flat_grad", "old_dirs", "old_stps", "ro"):
        np.testing.assert_allclose(d[key], h[key], rtol=TOL, atol=TOL, err_msg=key)
    assert d["H_diag"] == pytest.approx(h["H_diag"], rel=TOL)


def test_checkpoints_move_between_device_and_host():
    """Stepped on the device, resumed on the host and stepped, resumed on
    the device again and stepped: the same as the host all along."""
    problem, x0, shapes, packed, kw = CASES["logistic-wolfe-list"]
    pair = Pair(x0, shapes, packed, **kw)
    on_device, on_host = pair.closures(problem)
    pair.opt.step(on_device)
    pair.ref.step(on_host)
    middle = [host(p) for p in pair.params]
    resumed = fastopt.LBFGS(middle, backend="numpy", **kw)
    resumed.load_state_dict(pair.opt.state_dict())
    resumed.step(lambda: (lambda f, g: (f, _split(g, middle)))(
        *problem(np.concatenate([p.reshape(-1) for p in middle]))))
    pair.ref.step(on_host)
    np.testing.assert_allclose(np.concatenate(middle), np.concatenate(pair.host_params),
                               rtol=TOL, atol=TOL)
    back = Pair(np.concatenate(middle), shapes, False, **kw)
    back.opt.load_state_dict(resumed.state_dict())
    assert back.opt.state[0]["history"].S[0] is not None and not isinstance(
        back.opt.state[0]["history"].S[0], np.ndarray)           # the ring is on the device
    back.ref = pair.ref
    back.host_params = pair.host_params
    back.steps(problem, 1)
    back.same()


def test_float16_device_params_are_refused():
    with pytest.raises(TypeError, match="float32 or float64"):
        fastopt.LBFGS([dev(np.zeros(3, np.float16))])
