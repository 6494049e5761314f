"""LAMB's two-phase step on device arrays: per-array sums over pieces.

Each array is cut in pieces of ``PIECE`` elements; a block sums a piece's
``p^2`` and ``r^2`` in a fixed tree order, a second kernel adds each
array's pieces, a third writes the weights. Here: arrays that span several
pieces (packed in one buffer and as a list), against the NumPy reference
on the host; the sums do not depend on the grid; a zero tensor and a NaN
gradient behave as on the host. (The family's settings, clipping, the
skip, bfloat16 and checkpoints: tests/test_cuda_family.py.)
"""

from __future__ import annotations

import numpy as np
import pytest
from cuda_helpers import close, dev, host  # skips the module where CUDA is unusable

import fastopt
from fastopt.backends import numba_cuda as C
from fastopt.backends._cuda_kernels import PIECE

#: a single-piece array, one of several pieces and a partial last one,
#: one of exactly two pieces, a tiny one
SHAPES = [(3, 5), (2 * PIECE + 7,), (2, PIECE), (1,)]


def _problem(dtype, steps, seed=0):
    rng = np.random.default_rng(seed)
    init = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    grads = [[rng.standard_normal(s).astype(dtype) for s in SHAPES] for _ in range(steps)]
    return init, grads


def _packed_grads(buf, g):
    buf.data.copy_to_device(np.concatenate([x.reshape(-1) for x in g]))
    return buf


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "list"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_arrays_over_several_pieces_equal_the_host(dtype, packed):
    init, grads = _problem(dtype, steps=3)
    kw = dict(lr=1e-2, weight_decay=0.05)
    ref_params = [a.copy() for a in init]
    ref = fastopt.LAMB(ref_params, backend="numpy", **kw)
    if packed:
        params = C.pack(init)
        buf = params.zeros_like()
    else:
        params = [dev(a) for a in init]
    opt = fastopt.LAMB(params, **kw)
    for g in grads:
        opt.step(_packed_grads(buf, g) if packed else [dev(x) for x in g])
        ref.step(g)
    got = params.copy_to_host() if packed else [host(p) for p in params]
    for i, (a, b) in enumerate(zip(got, ref_params)):
        close(a, b, f"params[{i}]")
    for name in ("exp_avg", "exp_avg_sq"):
        close(opt.state_dict()["state"][0]["buffers"][name],
              ref.state_dict()["state"][0]["buffers"][name], name)


def test_the_sums_do_not_depend_on_the_grid(monkeypatch):
    """The same steps with the default grids (several blocks striding over
    the pieces) and with one block per launch: bit for bit the same."""
    init, grads = _problem(np.float32, steps=2, seed=1)
    real = C.grid_blocks

    def run(pick):
        monkeypatch.setattr(C, "grid_blocks", pick)
        params = [dev(a) for a in init]
        opt = fastopt.LAMB(params, lr=1e-2)
        for g in grads:
            opt.step([dev(x) for x in g])
        monkeypatch.undo()
        return [host(p) for p in params]

    grids = []
    default = run(lambda *args: grids.append(real(*args)) or grids[-1])
    single = run(lambda *args: 1)
    assert max(grids) > 1
    for a, b in zip(default, single):
        np.testing.assert_array_equal(a, b)


def test_pieces_of_a_layout():
    """Pieces never span two arrays; each array's pieces are consecutive;
    an empty array has none."""
    bounds = [0, 3, 3, 3 + 2 * PIECE + 1, 3 + 3 * PIECE + 1]
    pc = C.pieces(bounds)
    plo, phi, pk, pfirst = (host(a) for a in (pc.plo, pc.phi, pc.pk, pc.pfirst))
    assert pc.narrays == 4 and pc.npieces == 1 + 0 + 3 + 1
    assert pfirst.tolist() == [0, 1, 1, 4, 5]
    assert pk.tolist() == [0, 2, 2, 2, 3]
    for j in range(pc.npieces):
        assert bounds[pk[j]] <= plo[j] < phi[j] <= bounds[pk[j] + 1]
        assert phi[j] - plo[j] <= PIECE
    assert (plo[1:] == phi[:-1]).all()


def test_zero_tensor_and_nan_gradient_as_on_the_host():
    """A zero tensor with a zero gradient moves by lr * r (trust 1); a NaN
    gradient makes its whole tensor NaN and leaves the others finite."""
    init, grads = _problem(np.float64, steps=1, seed=2)
    init[0][...] = 0.0
    grads[0][0][...] = 0.0
    grads[0][1][5] = np.nan
    ref_params = [a.copy() for a in init]
    params = [dev(a) for a in init]
    fastopt.LAMB(params, lr=1e-2).step([dev(x) for x in grads[0]])
    fastopt.LAMB(ref_params, lr=1e-2, backend="numpy").step(grads[0])
    got = [host(p) for p in params]
    assert np.isnan(got[1]).all() and np.isnan(ref_params[1]).all()
    for i in (0, 2, 3):
        close(got[i], ref_params[i], f"params[{i}]")
