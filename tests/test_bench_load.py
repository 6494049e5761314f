"""fastopt bench says when another process used the CPUs during the run,
shows the spread of its repeats, the threads, and torch's fastest path."""

from __future__ import annotations

import subprocess
import sys

from fastopt import bench

ROW = bench.Row("tiny", "adamw", [(1000,)] * 4, layout="list")


def test_a_busy_machine_is_said_in_the_table():
    burn = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(2)]
    try:
        report = bench.run(rows=[ROW], cold=False)
    finally:
        for p in burn:
            p.kill()
    table = bench.format_table(report)
    assert report["load"]["other_processes"]["other_cpu_fraction"] > 0.2
    assert "WARNING: another process used the CPUs" in table
    assert "threads: fastopt" in table


def test_the_spread_and_torch_s_fastest_path_are_reported():
    report = bench.run(rows=[ROW], cold=False)
    rows = {r["impl"]: r for r in report["results"]}
    for impl in ("cython", "numba", "numpy"):
        r = rows.get(impl)
        if r and r["seconds"]:
            assert r["median_seconds"] >= r["seconds"]
    if rows["torch-fused"]["seconds"]:
        best = min((rows[k]["seconds"], k) for k in bench.TORCH_PATHS if rows[k]["seconds"])
        assert rows["numpy"]["vs_torch_best_impl"] == best[1]
        assert abs(rows["numpy"]["vs_torch_best"] - best[0] / rows["numpy"]["seconds"]) < 1e-9
    assert "spread" in bench.format_table(report)


def test_ratios_against_a_torch_row_whose_rounds_spread_widely_are_marked():
    """A trial's busy machine printed 523x against torch fused (its rounds
    spread 3.9x) unmarked; a steady row's ratio stays as it is."""
    report = bench.run(rows=[ROW], cold=False)
    rows = {r["impl"]: r for r in report["results"]}
    fused = rows["torch-fused"]
    if not fused["seconds"]:
        import pytest
        pytest.skip("torch not installed")
    mine = next(r for r in report["results"] if r["impl"] in ("cython", "numba", "numpy"))
    fused["median_seconds"] = fused["seconds"]                 # steady
    steady = bench.format_table(report)
    assert f"{mine['vs_torch']:.2f}?" not in steady and "? = against a torch row" not in steady
    fused["median_seconds"] = 4 * fused["seconds"]             # spread 4
    noisy = bench.format_table(report)
    assert f"{mine['vs_torch']:.2f}?" in noisy
    assert "? = against a torch row whose spread is over 1.5" in noisy
