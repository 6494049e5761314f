"""benchmarks/gpu_check.py: the parts that run without a GPU.

Without a GPU it must exit 2 with a clear message and write nothing; under
the CUDA simulator (``--simulate``, tiny sizes) its whole measuring and
reporting path runs and writes a well-formed results file.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastopt

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
FAMILY = ["SGD", "RMSprop", "Adagrad", "Adamax", "NAdam", "RAdam", "Lion", "LAMB"]
NOT_IN_TORCH = ("Lion", "LAMB")


def _run(args, env_extra=None, timeout=240):
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif("cuda" in fastopt.available_backends(), reason="a GPU is usable here")
def test_without_a_gpu_it_says_so_and_writes_nothing(tmp_path):
    out = tmp_path / "gpu.json"
    proc = _run(["--out", str(out)])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "gpu_check: no GPU run possible:" in proc.stderr
    assert not out.exists()


def test_refuses_the_simulator_for_real_numbers(tmp_path):
    proc = _run(["--out", str(tmp_path / "x.json")], {"NUMBA_ENABLE_CUDASIM": "1"})
    assert proc.returncode == 2 and "NUMBA_ENABLE_CUDASIM" in proc.stderr


@pytest.mark.skipif(importlib.util.find_spec("numba_cuda") is None,
                    reason="numba-cuda not installed")
def test_simulated_dry_run_writes_the_results_file(tmp_path):
    out = tmp_path / "gpu.json"
    proc = _run(["--simulate", "--out", str(out)], {"NUMBA_ENABLE_CUDASIM": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["simulated"] is True
    assert {"date", "card", "versions", "results", "targets", "measured",
            "targets_met"} <= set(report)
    res = report["results"]
    for key in ("d2d_copy_roofline", "fastopt_adamw_fp32_64M", "fastopt_clip_adamw_fp32_64M",
                "fastopt_adamw_1000x1000_packed", "fastopt_adamw_bf16_master_64M"):
        assert "error" not in res[key], res[key]
        assert res[key]["gbps"] > 0
    assert set(report["targets_met"]) == set(report["targets"])
    assert "target adamw_fp32_64M_roofline_fraction" in proc.stdout
    # the family: each optimizer checked against the reference (and torch,
    # on CPU tensors in the dry run, where torch has it) and timed
    family = report["family"]
    assert set(family) == set(FAMILY) | {"SAM", "LBFGS"}
    torch = importlib.util.find_spec("torch") is not None
    for name in FAMILY:
        key = name.lower()
        check = res[f"check_{key}_vs_reference_and_torch"]
        assert check["ok"] is True and check["vs_reference"]["fraction_off"] == 0, check
        assert ("vs_torch" in check) == (torch and name not in NOT_IN_TORCH), check
        assert res[f"fastopt_{key}_fp32_64M"]["gbps"] > 0
        assert family[name]["checked_ok"] is True
        if torch and name not in NOT_IN_TORCH:
            best = family[name]["torch_fastest"]
            assert best in ("foreach", "fused")
            assert res[f"torch_{best}_{key}_fp32_64M"]["gbps"] > 0
            assert family[name]["vs_torch_fastest"] > 0
        else:
            assert family[name]["vs_torch_fastest"] is None
        assert f"family {name}: check ok" in proc.stdout
    assert "no Lion" in res["torch_lion_fp32_64M"].get("skipped", "") or not torch
    # SAM and L-BFGS on device params: checked against the host (L-BFGS also
    # against torch's LBFGS), SAM's round and L-BFGS's two-loop recursion timed
    assert res["check_sam_vs_reference"]["ok"] is True, res["check_sam_vs_reference"]
    lbfgs = res["check_lbfgs_vs_reference_and_torch"]
    assert lbfgs["ok"] is True and ("vs_torch" in lbfgs) == torch, lbfgs
    for key in ("fastopt_sam_sgd_round_fp32_64M", "fastopt_lbfgs_two_loop_fp32_64M"):
        assert res[key]["gbps"] > 0, res[key]
    assert family["SAM"]["checked_ok"] is True and family["LBFGS"]["checked_ok"] is True
    # the MLP and ensemble checks of gpu_check_nn.py, in the same report
    assert report["nn"]["all_equal"] is True and report["nn"]["engines"]
    assert "nn engines:" in proc.stdout
    # compact state (gpu_check_compact.py): bit for bit with the CPU under the
    # simulator, the device checkpoint round trip, each state dtype timed
    compact = report["compact"]
    assert compact["all_ok"] is True, compact["failed"]
    for sd in ("bfloat16", "int8"):
        check = compact["results"][f"check_adamw_{sd}_vs_cpu_numba"]
        assert check["ok"] and check["bit_identical"], check
        assert compact["results"][f"checkpoint_adamw_{sd}_device_round_trip"]["ok"] is True
        assert compact["ratios"][f"{sd}_64M_vs_float32_state"] > 0
    for sd in ("float32", "bfloat16", "int8"):
        assert compact["results"][f"fastopt_adamw_{sd}_state_16M"]["gbps"] > 0


def _script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_family_check_agreement_sees_a_difference():
    """The family check's comparison fails on a wrong element or a NaN, and
    passes within its relative tolerance."""
    gc = _script()
    want = np.linspace(-3.0, 3.0, 200_001).astype(np.float32)
    assert gc.agreement(want * np.float32(1 + 1e-6), want)["ok"]
    for bad in (1.5, np.nan):
        got = want.copy()
        got[10:20] = bad
        out = gc.agreement(got, want)
        assert not out["ok"] and out["fraction_off"] == pytest.approx(10 / want.size)
