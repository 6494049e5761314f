"""A step that fails anywhere before its kernels run leaves params, state
and counters exactly as they were: every allocation and check comes first.
Failures are injected at each allocation and between groups."""

from __future__ import annotations

import numpy as np
import pytest

import fastopt
from fastopt.optim import base

from conftest import BACKENDS, assert_same_tree, optimizer_snapshot


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
    with pytest.raises(exc, match="injected"):
        opt.step(grads())
    monkeypatch.undo()
    assert_same_tree(optimizer_snapshot(opt, params), before)
    assert opt.iterations == 1 and [s["step"] for s in opt.state] == [1, 1]
