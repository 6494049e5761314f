"""SAM on device params, against SAM on the host (the NumPy reference).

``perturb`` is the optimizers' device norm pass (weighted by ``|p|`` for
ASAM), the scale decided on the device, and a perturbation kernel;
``step`` hands ``e`` to the base optimizer's device step as an offset that
its kernels subtract as they read the weights (restore and step in one
pass; a skipped step still restores). Also that offset on the update
kernels themselves.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from cuda_helpers import close, dev, host  # skips the module where CUDA is unusable
from test_cuda_backend import dev_at

import fastopt
from fastopt.backends import numba_cuda as C
from fastopt.backends import reference as R
from fastopt.backends.scalars import adam_element, adam_scalars

SHAPES = [(4, 9), (13,), (3,)]
#: (base optimizer, its settings, adaptive, packed, dtype)
CASES = {
    "sgd-packed-f64": ("SGD", dict(lr=0.1, momentum=0.9), False, True, np.float64),
    "adamw-asam-list-f32": ("AdamW", dict(lr=1e-2, weight_decay=0.1), True, False,
                            np.float32),
    "lamb-list-f64": ("LAMB", dict(lr=1e-2, weight_decay=0.01), False, False, np.float64),
}


def _grads(rng, dtype, steps):
    return [[rng.standard_normal(s).astype(dtype) for s in SHAPES] for _ in range(steps)]


class Pair:
    """The same SAM on device params and on host params (NumPy backend)."""

    def __init__(self, name, kw, adaptive, packed, dtype, seed=0, **options):
        rng = np.random.default_rng(seed)
        init = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
        self.packed = packed
        if packed:
            self.params = C.pack(init)
            self.buf = self.params.zeros_like()
        else:
            self.params = [dev(a) for a in init]
        self.host_params = [a.copy() for a in init]
        cls = getattr(fastopt, name)
        self.sam = fastopt.SAM(cls(self.params, **kw, **options), rho=0.05, adaptive=adaptive)
        self.ref = fastopt.SAM(cls(self.host_params, backend="numpy", **kw, **options),
                               rho=0.05, adaptive=adaptive)

    def device_grads(self, g):
        if self.packed:
            self.buf.data.copy_to_device(np.concatenate([x.reshape(-1) for x in g]))
            return self.buf
        return [dev(x) for x in g]

    def both(self, method, g):
        return (getattr(self.sam, method)(self.device_grads(g)),
                getattr(self.ref, method)(g))

    def device_params(self):
        if self.packed:
            return self.params.copy_to_host()
        return [host(p) for p in self.params]

    def same(self, what=""):
        for i, (a, b) in enumerate(zip(self.device_params(), self.host_params)):
            close(a, b, f"{what} params[{i}]")


@pytest.mark.parametrize("case", list(CASES))
def test_device_sam_equals_host_sam(case, monkeypatch):
    """Three perturb/step rounds: the norms, e and the params while
    perturbed, and the params and base state after each step, which is one
    pass: every update launch is handed e as its offset."""
    offsets, real = [], C.update
    monkeypatch.setattr(C, "update", lambda *a, **k: (offsets.append(a[6] is not None),
                                                      real(*a, **k))[1])
    pair = Pair(*CASES[case])
    dtype = CASES[case][-1]
    rng = np.random.default_rng(1)
    for t, (g1, g2) in enumerate(zip(_grads(rng, dtype, 3), _grads(rng, dtype, 3))):
        norm, want = pair.both("perturb", g1)       # float64 sums of (float32) params
        assert norm == pytest.approx(want, rel=1e-12 if dtype == np.float64 else 1e-6)
        pair.same(f"perturbed {t}")
        for a, b in zip(pair.sam.state_dict()["e_w"], pair.ref.state_dict()["e_w"]):
            close(a, b, "e_w")
        pair.both("step", g2)
        pair.same(f"step {t}")
        assert not pair.sam.perturbed
    assert offsets and all(offsets)
    d, h = pair.sam.state_dict()["base"], pair.ref.state_dict()["base"]
    assert d["state"][0]["step"] == h["state"][0]["step"] == 3
    for key, buf in h["state"][0]["buffers"].items():
        close(d["state"][0]["buffers"][key], buf, key)


def test_nonfinite_perturb_is_skipped_as_on_the_host():
    pair = Pair("SGD", dict(lr=0.1), False, False, np.float32)
    rng = np.random.default_rng(2)
    g1, g2 = _grads(rng, np.float32, 2)
    g1[1][4] = np.inf
    before = pair.device_params()
    with pytest.warns(RuntimeWarning, match="NaN or inf"):
        norm = pair.sam.perturb(pair.device_grads(g1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        pair.ref.perturb(g1)
    assert not np.isfinite(norm) and pair.sam.skipped_perturbs == 1
    assert not pair.sam.perturbed
    for a, b in zip(pair.device_params(), before):
        np.testing.assert_array_equal(a, b)
    pair.both("step", g2)                        # the base's plain step
    pair.same("after the plain step")


def test_a_skipped_base_step_still_restores_the_params():
    """The base skips non-finite gradients: its kernels write nothing but
    the restore (p - e), as the host's restore-then-skip does."""
    pair = Pair("AdamW", dict(lr=1e-2), False, True, np.float64, skip_nonfinite=True)
    rng = np.random.default_rng(3)
    g1, g2 = _grads(rng, np.float64, 2)
    g2[0][1, 2] = np.nan
    start = pair.device_params()
    pair.both("perturb", g1)
    pair.both("step", g2)
    assert pair.sam.base_optimizer.skipped_steps == pair.ref.base_optimizer.skipped_steps == 1
    for a, b in zip(pair.device_params(), start):
        np.testing.assert_array_equal(a, b)      # back where it started, exactly
    pair.same()


def test_refusals_write_nothing_or_restore():
    """Wrong grads at step, or a bad lr written into the base's param group:
    refused with the params still perturbed (fix it, call step again), as
    on the host."""
    pair = Pair("SGD", dict(lr=0.1, momentum=0.9), False, False, np.float64)
    rng = np.random.default_rng(4)
    g1, g2 = _grads(rng, np.float64, 2)
    pair.both("perturb", g1)
    perturbed = pair.device_params()
    with pytest.raises(ValueError, match="grads has 2 arrays"):
        pair.sam.step([dev(x) for x in g2[:2]])
    assert pair.sam.perturbed
    for a, b in zip(pair.device_params(), perturbed):
        np.testing.assert_array_equal(a, b)
    for sam in (pair.sam, pair.ref):
        sam.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr"):
        pair.sam.step(pair.device_grads(g2))
    with pytest.raises(ValueError, match="lr"):
        pair.ref.step(g2)
    assert pair.sam.perturbed and pair.ref.perturbed
    pair.same("still perturbed")
    for sam in (pair.sam, pair.ref):
        sam.param_groups[0]["lr"] = 0.1
    pair.sam.step(pair.device_grads(g2))
    pair.ref.step(g2)
    pair.same("stepped after the retry")


def test_checkpoint_while_perturbed_moves_between_device_and_host():
    """Saved between perturb and step on the device, resumed on the host
    (whose params are the perturbed ones), stepped there: the same as the
    host all along."""
    pair = Pair("AdamW", dict(lr=1e-2), True, False, np.float64)
    rng = np.random.default_rng(5)
    g1, g2 = _grads(rng, np.float64, 2)
    pair.both("perturb", g1)
    resumed_params = pair.device_params()
    resumed = fastopt.SAM(fastopt.AdamW(resumed_params, lr=1e-2, backend="numpy"),
                          adaptive=True)
    resumed.load_state_dict(pair.sam.state_dict())
    resumed.step(g2)
    pair.ref.step(g2)
    for i, (a, b) in enumerate(zip(resumed_params, pair.host_params)):
        close(a, b, f"params[{i}]")
    back = Pair("AdamW", dict(lr=1e-2), True, False, np.float64)   # and host -> device
    back.ref.perturb(g1)
    for p, a in zip(back.params, back.host_params):
        p.copy_to_device(a)
    back.sam.load_state_dict(back.ref.state_dict())
    assert back.sam.perturbed
    back.both("step", g2)
    back.same("resumed on the device")


@pytest.mark.parametrize("aligned", [True, False], ids=["vector", "scalar"])
def test_update_kernels_subtract_an_offset_as_they_read(aligned):
    """``update(..., off=e)`` steps ``w - e``: Adam's four-wide kernel and
    its scalar loop against the reference stepping the restored weights;
    a skipped step writes ``w - e`` alone."""
    rng = np.random.default_rng(6)
    n = 4 * C.THREADS + 3
    p, e, g = (rng.standard_normal(n).astype(np.float32) for _ in range(3))
    m, v = np.zeros(n, np.float32), np.zeros(n, np.float32)
    dp, de, dg, dm, dv = (dev_at(a, 0 if aligned else 1) for a in (p, e, g, m, v))
    assert C.vector_ok(dp, de, dg, dm, dv) == aligned
    s = adam_scalars(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
                     decoupled=True, step=1)
    C.update(adam_element(s, False), dp, dg, (dm, dv), off=de)
    want = p - e
    R.adam_update(want, g, m, v, None, s)
    close(host(dp), want, "p")
    close(host(dm), m, "m")
    skip = C.norm_control([dev(np.full(3, np.nan, np.float32))], check=True)
    C.update(adam_element(s, False), dp, dg, (dm, dv), ctrl=skip, off=de)
    close(host(dp), want - e, "restored by a skipped step")
    close(host(dm), m, "m untouched")
