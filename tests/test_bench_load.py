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
