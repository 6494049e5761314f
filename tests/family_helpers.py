"""Helpers shared by the optimizer-family tests (test_optim_family*.py):
the problem, params as a user passes them, state and closeness checks."""

from __future__ import annotations

import numpy as np
import pytest

import fastopt

from conftest import rng_array

STEPS = 60
SHAPES = [(6, 4), (4,), (4, 5), (5,), (3, 1, 2)]
DTYPES = [np.float32, np.float64]
DTYPE_IDS = ["float32", "float64"]
PATHS = ["packed", "list"]
# relative tolerance, with an absolute floor of the same size (params are ~1)
TORCH_TOL = {np.dtype(np.float32): 2e-5, np.dtype(np.float64): 1e-10}


def problem(dtype, seed=0, steps=STEPS, scales=(1.0,)):
    """Initial params and ``steps`` gradient lists."""
    rng = np.random.default_rng(seed)
    init = [rng_array(rng, s, dtype) for s in SHAPES]
    grads = []
    for _ in range(steps):
        scale = rng.choice(scales)
        grads.append([rng_array(rng, s, dtype, scale=scale) for s in SHAPES])
    return init, grads


class Side:
    """fastopt's params and grads as a user passes them: packed, a list, or
    a dict by name (``arrays``: the params in order, whatever the layout)."""

    def __init__(self, init, path):
        self.path = path
        if path == "packed":
            self.params = fastopt.pack([a.copy() for a in init])
            self.buf = self.params.zeros_like()
        elif path == "dict":
            self.params = {f"w{i}": a.copy() for i, a in enumerate(init)}
        else:
            self.params = [a.copy() for a in init]
        self.arrays = list(self.params.values() if path == "dict" else self.params)

    def grads(self, g):
        if self.path == "packed":
            for view, x in zip(self.buf, g):
                view[...] = x
            return self.buf
        if self.path == "dict":
            return {f"w{i}": x.copy() for i, x in enumerate(g)}
        return [x.copy() for x in g]     # new arrays every step


def concat_state(opt, name):
    return np.concatenate([run[name] for run in opt.state[0]["runs"]])


def assert_close(actual, expected, tol, what):
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol, err_msg=what)


def check_against_torch(opt, side, want, dtype):
    """The run's params, state buffers (torch's names) and step count equal
    torch's ``want = (params, state[, mu_product])``."""
    want_params, want_state, want_mu = (*want, None)[:3]
    tol = TORCH_TOL[np.dtype(dtype)]
    for i, (p, w) in enumerate(zip(side.params, want_params)):
        assert p.dtype == w.dtype
        assert_close(p, w, tol, f"param {i}")
    # the same state buffers as torch, by torch's names
    assert sorted(opt.state[0]["flat"]) == sorted(want_state)
    for key, w in want_state.items():
        assert_close(concat_state(opt, key), w, tol, key)
    assert opt.state[0]["step"] == STEPS
    if want_mu is not None:     # torch's is float32 under its float32 default
        assert opt.state[0]["mu_product"] == pytest.approx(
            want_mu, rel=1e-14 if dtype == np.float64 else 1e-6)


class FakeDeviceArray:
    """Looks like a GPU array to fastopt (``__cuda_array_interface__``)."""

    shape, dtype = (4,), np.dtype(np.float32)

    @property
    def __cuda_array_interface__(self):
        return {"shape": (4,), "typestr": "<f4", "data": (0, False), "version": 3}


#: each optimizer of the family with the settings the shared tests use
FAMILY = {
    "RMSprop": dict(lr=1e-2, centered=True, momentum=0.9, weight_decay=0.01),
    "Adagrad": dict(lr=5e-2, lr_decay=0.01, initial_accumulator_value=0.5),
    "Lion": dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1),
    "Adamax": dict(lr=1e-2, weight_decay=0.01),
    "NAdam": dict(lr=1e-2, weight_decay=0.01, momentum_decay=0.01),
    "RAdam": dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.01,
                  decoupled_weight_decay=True),
    "LAMB": dict(lr=1e-2, weight_decay=0.01),
}
#: the state buffers each keeps
STATE = {"RMSprop": ["square_avg", "grad_avg", "momentum_buffer"], "Adagrad": ["sum"],
         "Lion": ["exp_avg"],
         "Adamax": ["exp_avg", "exp_inf"], "NAdam": ["exp_avg", "exp_avg_sq"],
         "RAdam": ["exp_avg", "exp_avg_sq"], "LAMB": ["exp_avg", "exp_avg_sq"]}
