"""``fastopt.bench`` and ``fastopt bench``: the baselines compute the same
step as fastopt (a speedup over a wrong baseline means nothing), the
roofline moves the step's bytes, and the report degrades cleanly without
torch, a GPU or matplotlib."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import numpy as np
import pytest

import fastopt
from fastopt import bench
from fastopt.bench import baselines, cases, in_loop, machine, matrix, roofline

from conftest import FAST_BACKENDS

torch = pytest.importorskip("torch")

SHAPES = [(7, 3), (40,), (5,)]


@pytest.mark.parametrize("kind", bench.KINDS)
def test_numpy_baselines_compute_the_fastopt_step(kind):
    """The straightforward NumPy step is the same optimizer as fastopt's
    (8 steps: RAdam's rectified branch starts at step 7)."""
    spec = bench.KIND[kind]
    rng = np.random.default_rng(0)
    ps = [rng.standard_normal(s) for s in SHAPES]
    gs = [[rng.standard_normal(s) for s in SHAPES] for _ in range(8)]
    mine = [p.copy() for p in ps]
    opt = getattr(fastopt, spec.optimizer)(mine, backend="numpy", **spec.hypers)
    states = [{} for _ in SHAPES]
    for t, g in enumerate(gs, start=1):
        opt.step(g)
        for p, gi, st in zip(ps, g, states):
            spec.numpy_step(p, gi, st, t, **spec.hypers)
    for a, b in zip(ps, mine):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", [k for k in bench.KINDS if len(bench.KIND[k].passes) == 1])
def test_bytes_per_element_count_the_optimizers_state(kind):
    """A one-pass step reads p, g and each state buffer and writes p and
    each buffer: the roofline and GB/s count exactly the buffers the
    optimizer keeps with the benchmark's hyperparameters."""
    spec = bench.KIND[kind]
    p = np.ones(8, np.float32)
    opt = getattr(fastopt, spec.optimizer)([p], backend="numpy", **spec.hypers)
    opt.step([np.ones(8, np.float32)])
    buffers = len(opt.state[0]["flat"])
    assert bench.ARRAYS_MOVED[kind] == 3 + 2 * buffers
    assert spec.passes == ((2 + buffers, 1 + buffers),)
    assert bench.step_bytes(kind, 10, "float32") == (3 + 2 * buffers) * 40


def test_compact_state_rows_count_each_implementations_own_bytes():
    """In a ``<state> state`` row fastopt and the roofline move the compact
    state's bytes, torch and NumPy keep float32 state (28 B per element):
    their GB/s were computed from the compact count, 20/28 or 16/28 of what
    they moved."""
    from fastopt.bench import ratios
    rows = {r.case.split()[1]: r for r in cases.state_rows(sizes=(1 << 16,))}
    n = 1 << 16
    for state, own in (("float32", 28), ("bfloat16", 20), ("int8", 16)):
        row = rows[state]
        for impl in ("cython", "numba", "roofline"):
            assert int(ratios.impl_bytes(row, impl) / n) == own, (state, impl)
        for impl in ("torch-fused", "numpy"):
            assert ratios.impl_bytes(row, impl) == 28 * n, (state, impl)


def test_lamb_bytes_are_its_two_passes():
    """LAMB needs each array's norms before it can write the weights: pass
    one reads p, g, m, v and writes m, v; pass two reads p, m, v and writes p
    (40 B per float32 element), and the roofline streams both passes."""
    assert bench.KIND["lamb"].passes == ((4, 2), (3, 1))
    assert bench.step_bytes("lamb", 10, "float32") == 10 * 40
    p = np.ones(8, np.float32)
    opt = fastopt.LAMB([p], backend="numpy", **bench.HYPERS["lamb"])
    opt.step([np.ones(8, np.float32)])
    assert sorted(opt.state[0]["flat"]) == ["exp_avg", "exp_avg_sq"]


def _torch_path_exists(kind, impl):
    spec = bench.KIND[kind]
    if not spec.in_torch:
        return False
    variant = impl.split("-", 1)[1]
    flag = next(iter(baselines.TORCH_VARIANTS[variant]))
    return flag in inspect.signature(getattr(torch.optim, spec.optimizer)).parameters


@pytest.mark.parametrize("kind", bench.KINDS)
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("impl", [*FAST_BACKENDS, "numpy", *bench.TORCH_PATHS, "roofline"])
def test_make_step_runs_or_says_why_not(impl, kind, clip):
    fn, note = bench.make_step(impl, kind, SHAPES, "float32", clip)
    if impl in bench.TORCH_PATHS and not _torch_path_exists(kind, impl):
        # torch has no fused RMSprop, Adamax, NAdam, RAdam, and no Lion or LAMB
        assert fn is None
        optimizer = bench.KIND[kind].optimizer
        assert note == (f"torch.optim.{optimizer} has no {impl[6:]} path"
                        if bench.KIND[kind].in_torch
                        else f"torch.optim has no {optimizer}: numpy is its baseline")
        return
    assert fn is not None, note
    # each implementation owns its arrays; the step must be repeatable
    fn()
    fn()


def test_roofline_moves_the_steps_arrays():
    k = roofline.stream_kernels()
    p, g, m, v = (np.full(10, x, np.float32) for x in (1.0, 2.0, 3.0, 4.0))
    k["rw4_3"](p, g, m, v)
    assert (p == 3).all() and (m == 5).all() and (v == 6).all() and (g == 2).all()
    assert k["read1"](g) == pytest.approx(20.0)
    b = np.full(10, 5.0, np.float32)
    k["rw3_2"](p, g, b)
    assert (p == 5).all() and (b == 7).all()
    k["rw4_2"](p, g, m, v)          # reads p (into v) without writing it
    assert (p == 5).all() and (m == 7).all() and (v == 13).all()
    k["rw3_1"](p, m, v)
    assert (p == 25).all() and (m == 7).all() and (v == 13).all()
    for name in ("rw4_3", "rw3_2", "rw4_2", "rw3_1", "read1"):    # the serial twins
        assert k[name + "_serial"].py_func is k[name].py_func
    assert bench.step_bytes("adamw", 10, "float32") == 7 * 40
    assert bench.step_bytes("sgd", 10, "float64", clip=True) == 6 * 80
    for kind in bench.KINDS:       # every kind's passes have a streaming kernel
        assert all(f"rw{r}_{w}" in k for r, w in bench.KIND[kind].passes)


def test_make_step_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind must be one of"):
        bench.make_step("numba", "adadelta", SHAPES)


# -- the optimizer family's rows -------------------------------------------------

def test_every_optimizer_has_its_two_workloads():
    names = [r.case for kind in bench.KINDS for r in bench.family_rows(kind)]
    assert len(set(names)) == len(names) == 2 * len(bench.KINDS)
    for kind in bench.KINDS:
        big, lists = bench.family_rows(kind)
        assert big == bench.Row(f"{bench.KIND[kind].label} 1 x 16M", kind, [(1 << 24,)],
                                "float32", False, "packed")
        assert lists.shapes == [(1000,)] * 1000 and lists.layout == "list"
        assert (lists.kind, lists.dtype, lists.clip) == (kind, "float32", False)
    # the standard matrix takes SGD's 16M and AdamW's list case from there
    standard = bench.plan()
    assert bench.family_rows("sgd")[0] in standard
    assert bench.family_rows("adamw")[1] in standard
    assert not any(r.kind in bench.FAMILY for r in standard)    # the default stays short


def test_plan_with_optimizers_is_their_workloads_only():
    kinds = bench.parse_optimizers("lion, rmsprop-centered,lion")
    assert kinds == ("lion", "rmsprop-centered")
    assert bench.plan(optimizers=kinds) == [*bench.family_rows("lion"),
                                            *bench.family_rows("rmsprop-centered")]
    assert bench.parse_optimizers("family") == bench.FAMILY
    assert bench.parse_optimizers("all") == bench.KINDS
    assert set(bench.FAMILY) == set(bench.KINDS) - {"adamw", "sgd"}
    with pytest.raises(ValueError, match="unknown optimizer 'adam': use adamw, sgd"):
        bench.parse_optimizers("lion,adam")


def test_workloads_are_every_named_case_once():
    work = bench.workloads()
    assert all(name == row.case for name, row in work.items())
    for kind in bench.KINDS:
        assert all(work[r.case] == r for r in bench.family_rows(kind))
    named = [r for r in bench.plan(full=True) if r.case != bench.SWEEP_CASE]
    assert all(work[r.case] == r for r in named)
    assert bench.SWEEP_CASE not in work


def test_family_rows_in_the_table(monkeypatch):
    """The row logic on tiny cases: torch's fastest existing path is the
    peer, a path torch lacks is said, and an optimizer torch lacks is read
    against NumPy, in the table and the chart's labels."""
    rows = [bench.Row("list lion 3 x 1k", "lion", [(1000,)] * 3, layout="list"),
            bench.Row("list rmsprop 3 x 1k", "rmsprop", [(1000,)] * 3, layout="list")]
    report = bench.run(rows=rows, cold=False)
    by = {(r["case"], r["impl"]): r for r in report["results"]}
    lion = by[("list lion 3 x 1k", "cython" if "cython" in FAST_BACKENDS else "numba")]
    assert lion["vs_torch_best"] is None and lion["vs_numpy"] > 0
    assert all(by[("list lion 3 x 1k", t)]["seconds"] is None for t in bench.TORCH_PATHS)
    rms = by[("list rmsprop 3 x 1k", "numba")]
    assert by[("list rmsprop 3 x 1k", "torch-fused")]["note"] == \
        "torch.optim.RMSprop has no fused path"
    assert rms["vs_torch_best_impl"] in ("torch-foreach", "torch-forloop")
    best = min(by[("list rmsprop 3 x 1k", t)]["seconds"]
               for t in ("torch-foreach", "torch-forloop"))
    assert rms["vs_torch_best"] == pytest.approx(best / rms["seconds"])
    assert rms["bytes_per_step"] == 5 * 4 * 3000             # p, g, v read; p, v written
    table = bench.format_table(report)
    assert "no torch Lion: its baseline is numpy" in table
    assert f"best torch: {rms['vs_torch_best_impl']}" in table
    assert "bytes per element and step (what GB/s and the roofline count): rmsprop 20, " \
        "lion 20" in table


def test_chart_of_family_rows_alone(tmp_path):
    """``--optimizers`` has no size sweep: the chart is the cases panel."""
    pytest.importorskip("matplotlib")
    rows = [bench.Row("list lion 2 x 1k", "lion", [(1000,)] * 2, layout="list")]
    report = bench.run(rows=rows, cold=False)
    assert bench.plot(report, tmp_path / "f.png")
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_optimizers_runs_only_their_rows(monkeypatch, tmp_path, capsys):
    """``fastopt bench --optimizers``: the named optimizers' workloads (made
    tiny here), no training-loop case, no cold start."""
    from fastopt.cli import main
    monkeypatch.setattr(cases, "family_rows", lambda kind: [
        bench.Row(f"list {kind} 2 x 1k", kind, [(1000,)] * 2, layout="list")])
    monkeypatch.setattr(in_loop, "in_loop_case", lambda **kw: pytest.fail("in-loop ran"))
    monkeypatch.setattr(matrix, "cold_start", lambda *a: pytest.fail("cold start ran"))
    assert main(["bench", "--optimizers", "lion,nadam", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    assert {r["case"] for r in data["results"]} == {"list lion 2 x 1k", "list nadam 2 x 1k"}
    assert "in_loop" not in data and not data["cold_start"]
    assert data["interrupted"] is False        # always there, as in train's metrics.json
    assert "list nadam 2 x 1k" in capsys.readouterr().out


def test_cli_rejects_an_unknown_optimizer(capsys):
    from fastopt.cli import main
    with pytest.raises(SystemExit) as e:
        main(["bench", "--optimizers", "lion,bogus"])
    assert e.value.code == 2
    assert "unknown optimizer 'bogus'" in capsys.readouterr().err


def test_compare_and_speedups():
    res = bench.compare(bench.Row("tiny", "adamw", SHAPES),
                        impls=("numba", "roofline", "numpy"), rounds=1)
    assert [r.impl for r in res] == ["numba", "roofline", "numpy"]
    assert all(r.seconds > 0 and r.gbps > 0 for r in res)
    ratios = bench.speedups(res)
    assert ratios["numpy"]["numpy"] == pytest.approx(1.0)
    assert ratios["numba"]["roofline"] == pytest.approx(res[1].seconds / res[0].seconds)
    assert ratios["numba"]["torch"] is None     # torch-fused was not timed


TINY_ROWS = [bench.Row(bench.SWEEP_CASE, "adamw", [(n,)]) for n in (256, 4096)]


def test_report_without_torch_or_gpu(monkeypatch, tmp_path):
    monkeypatch.setattr(machine, "torch_or_none", lambda: None)
    monkeypatch.setattr(machine, "gpu_name", lambda: None)
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


@pytest.mark.parametrize("clip", [False, True])
def test_torch_foreach_nesterov_stays_finite_on_the_same_grads(clip):
    # foreach SGD with nesterov adds the momentum into the grads in place:
    # fed the same grads (as the benchmarks feed them) it reached inf within
    # a few hundred steps, and the timed rows ran on inf
    ps = [np.ones(64, np.float32), np.ones(3, np.float32)]
    gs = [np.full(64, 0.5, np.float32), np.full(3, -0.5, np.float32)]
    step, note = baselines.torch_optimizer_step(cases.KIND["sgd"], ps, gs, clip, "foreach")
    assert note == ""
    for _ in range(500):
        step()
    assert all(np.isfinite(p).all() for p in ps)
