"""``fastopt.bench`` and ``fastopt bench``: the baselines compute the same
step as fastopt (a speedup over a wrong baseline means nothing), the
roofline moves the step's bytes, and the report degrades cleanly without
torch, a GPU or matplotlib."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import fastopt
from fastopt import bench

from conftest import FAST_BACKENDS

torch = pytest.importorskip("torch")

SHAPES = [(7, 3), (40,), (5,)]




@pytest.mark.parametrize("kind", bench.KINDS)
def test_numpy_baselines_compute_the_fastopt_step(kind):
    """The straightforward NumPy step is the same optimizer as fastopt's."""
    rng = np.random.default_rng(0)
    ps = [rng.standard_normal(s) for s in SHAPES]
    gs = [[rng.standard_normal(s) for s in SHAPES] for _ in range(4)]
    mine = [p.copy() for p in ps]
    cls = fastopt.AdamW if kind == "adamw" else fastopt.SGD
    opt = cls(mine, backend="numpy", **bench.HYPERS[kind])
    states = [[np.zeros(s) for _ in range(2 if kind == "adamw" else 1)] for s in SHAPES]
    update = bench.numpy_adamw if kind == "adamw" else bench.numpy_sgd
    for t, g in enumerate(gs, start=1):
        opt.step(g)
        for p, gi, st in zip(ps, g, states):
            update(p, gi, *st, t, **bench.HYPERS[kind])
    for a, b in zip(ps, mine):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", bench.KINDS)
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("impl", [*FAST_BACKENDS, "numpy", "torch-fused",
                                  "torch-foreach", "torch-forloop", "roofline"])
def test_make_step_runs_and_changes_params(impl, kind, clip):
    fn, note = bench.make_step(impl, kind, SHAPES, "float32", clip)
    assert fn is not None, note
    # each implementation owns its arrays; one call must run without error and
    # must not allocate a new result: check the step is repeatable
    fn()
    fn()


def test_roofline_moves_the_steps_arrays():
    k = bench._stream_kernels()
    p, g, m, v = (np.full(10, x, np.float32) for x in (1.0, 2.0, 3.0, 4.0))
    k["rw4_3"](p, g, m, v)
    assert (p == 3).all() and (m == 5).all() and (v == 6).all() and (g == 2).all()
    assert k["read1"](g) == pytest.approx(20.0)
    b = np.full(10, 5.0, np.float32)
    k["rw3_2"](p, g, b)
    assert (p == 5).all() and (b == 7).all()
    for name in ("rw4_3", "rw3_2", "read1"):    # the serial twins compute the same
        assert k[name + "_serial"].py_func is k[name].py_func
    assert bench.step_bytes("adamw", 10, "float32") == 7 * 40
    assert bench.step_bytes("sgd", 10, "float64", clip=True) == 6 * 80


def test_make_step_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind must be one of"):
        bench.make_step("numba", "lamb", SHAPES)


def test_compare_and_speedups():
    res = bench.compare("tiny", "adamw", SHAPES, impls=("numba", "roofline", "numpy"),
                        rounds=1)
    assert [r.impl for r in res] == ["numba", "roofline", "numpy"]
    assert all(r.seconds > 0 and r.gbps > 0 for r in res)
    ratios = bench.speedups(res)
    assert ratios["numpy"]["numpy"] == pytest.approx(1.0)
    assert ratios["numba"]["roofline"] == pytest.approx(res[1].seconds / res[0].seconds)
    assert ratios["numba"]["torch"] is None     # torch-fused was not timed


TINY_ROWS = [(bench.SWEEP_CASE, "adamw", [(n,)], "float32", False) for n in (256, 4096)]


def test_report_without_torch_or_gpu(monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "torch_or_none", lambda: None)
    monkeypatch.setattr(bench, "gpu_name", lambda: None)
    seen = []
    report = bench.run(rows=TINY_ROWS, cold=False,
                       progress=lambda i, n, label: seen.append((i, n)))
    assert seen[0] == (0, 2) and seen[-1] == (2, 2)
    by = {(r["impl"], r["elements"]): r for r in report["results"]}
    assert by[("torch-fused", 256)]["note"] == "torch not installed"
    assert by[("torch-fused", 256)]["seconds"] is None
    assert by[("cuda", 256)]["note"] == "no GPU"
    assert by[("numba", 4096)]["vs_torch"] is None
    assert by[("numba", 4096)]["vs_numpy"] > 0
    assert report["machine"]["torch"] == "not installed"
    assert report["machine"]["gpu"] == "no GPU"
    table = bench.format_table(report)
    assert "torch not installed" in table and "GPU: no GPU" in table
    path = tmp_path / "b.json"
    bench.save(report, path)
    assert json.loads(path.read_text())["results"] == report["results"]


def test_chart_is_a_png_with_every_series(tmp_path):
    pytest.importorskip("matplotlib")
    report = bench.run(rows=TINY_ROWS, cold=False)
    path = tmp_path / "bench.png"
    assert bench.plot(report, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_chart_skipped_without_matplotlib(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    report = bench.run(rows=TINY_ROWS[:1], cold=False)
    assert bench.plot(report, tmp_path / "x.png") is False
    assert not (tmp_path / "x.png").exists()


def test_cli_quick_with_core_install_only(tmp_path):
    """``fastopt bench --quick`` in a process where torch cannot be imported."""
    code = ("import sys; sys.modules['torch'] = None; from fastopt.cli import main; "
            f"sys.exit(main(['bench', '--quick', '--out', {str(tmp_path)!r}]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert "torch not installed" in out.stdout
    assert "vs numpy" in out.stdout and "%roof" in out.stdout
    assert "3/3" in out.stderr          # the progress bar reached the end
    data = json.loads((tmp_path / "bench.json").read_text())
    assert {r["impl"] for r in data["results"]} >= {"numba", "numpy", "roofline"}
