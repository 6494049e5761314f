"""The optimization lessons (fastopt.examples): each runs in its small
configuration, draws its PNG, and the facts it claims are asserted here."""

from __future__ import annotations

import math
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

from fastopt.cli import main
from fastopt.examples import EXAMPLES, run_example
from fastopt.examples.lr_sweep import verdicts

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def _has_mnist():
    from fastopt.data import find_mnist
    try:
        find_mnist()
        return True
    except FileNotFoundError:
        return False


needs_mnist = pytest.mark.skipif(not _has_mnist(), reason="MNIST test set not found "
                                 "(set FASTOPT_DATA or put it at ../shared/data/mnist)")


def _run(name, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / f"{name}.png"
    facts = run_example(name, output=str(out), small=True, verbose=False)
    assert out.read_bytes()[:8] == PNG
    return facts


def test_backprop_hand_gradients_match_finite_differences_and_mlp(tmp_path):
    f = _run("backprop", tmp_path)
    assert f["max_err_finite_difference"] < 1e-8      # centred differences: O(eps^2)
    assert f["max_err_mlp"] < 1e-12                   # fastopt's backward: same numbers
    assert f["loss_err_mlp"] < 1e-12                  # MSE of one sample = (y - t)^2
    assert f["max_err_batch_mean"] < 1e-12            # batch: MSE is a mean
    assert f["sum_over_mean_ratio"] == pytest.approx(f["batch_size"])
    assert all(np.isfinite(v) and v != 0 for v in f["grads"].values())


def test_backprop_closed_form_on_a_hand_worked_point():
    from fastopt.examples.backprop import grads_by_hand

    # x=1, t=0, all weights 0 except w2=1: h = sigmoid(0) = 1/2, y = 1/2
    g = grads_by_hand(1.0, 0.0, w1=0.0, b1=0.0, w2=1.0, b2=0.0)
    assert g == pytest.approx({"w2": 0.5, "b2": 1.0, "w1": 0.25, "b1": 0.25})


def test_gd_paths_momentum_wins_and_large_lr_diverges(tmp_path):
    f = _run("gd-paths", tmp_path)
    assert f["winner"] == "momentum"
    assert f["steps_momentum"] is not None and f["steps_gd"] is not None
    assert f["steps_momentum"] < f["steps_gd"]
    assert f["stability_limit"] == pytest.approx(0.1)
    assert f["lr_diverge"] > f["stability_limit"] and f["diverged"]
    assert f["diverge_growth_per_step"] == pytest.approx(abs(1 - 20 * f["lr_diverge"]))


def test_adam_from_scratch_equals_fastopt_and_beats_sgd(tmp_path):
    f = _run("adam", tmp_path)
    assert f["max_abs_diff_fused_vs_scratch"] < 1e-13     # x0 = 1: float64 rounding
    assert f["final_loss_fastopt_adam"] == pytest.approx(f["final_loss_adam"], rel=1e-9)
    assert f["adam_faster"]
    assert f["steps_adam"] is not None
    assert f["steps_sgd"] is None or f["steps_adam"] < f["steps_sgd"]
    assert f["final_loss_adam"] < f["final_loss_sgd"]


def test_schedule_gallery_landmarks(tmp_path):
    f = _run("schedules", tmp_path)
    s = f["schedules"]
    assert all(v["matches_closed_form"] for v in s.values())
    wc = s["warmup + cosine"]
    assert (wc["first"], wc["argmax"], wc["max"]) == (0.0, 100, pytest.approx(1e-3))
    assert wc["last"] == pytest.approx(1e-4, rel=1e-3)
    sd = s["step decay"]
    assert sd["drops"] == [500, 800] and sd["last"] == pytest.approx(1e-5)
    oc = s["one-cycle"]
    assert oc["first"] == pytest.approx(1e-3 / 25) and oc["argmax"] == 299
    assert oc["last"] == pytest.approx(1e-3 / 25 / 1e4)


@needs_mnist
def test_lr_sweep_fails_high_and_crawls_low(tmp_path):
    f = _run("lr-sweep", tmp_path)
    assert f["lrs"] == [1e-1, 1e-2, 1e-3, 1e-4, 1e-5]
    assert f["fails"] == [1e-1]                  # Adam at 0.1 blows up
    assert f["peak_train_loss"][0] > 2 * f["initial_loss"]
    assert 1e-5 in f["crawls"]
    assert f["verdicts"][1] == "good" and f["best_lr"] == 1e-2
    crawl = f["lrs"].index(1e-5)
    assert f["initial_loss"] - f["final_loss"][crawl] < 0.25 * (
        f["initial_loss"] - f["final_loss"][1])


def test_lr_sweep_verdict_rules():
    # initial 2.3: a NaN and a blow-up fail; 0.3 is best; 2.2 gained < 1/4 of 2.0
    v = verdicts(2.3, [float("nan"), 1.0, 0.3, 2.2], [math.inf, 5.0, 2.3, 2.3])
    assert v == ["fails", "fails", "good", "crawls"]
    # no better than the start, without a blow-up: crawls
    assert verdicts(2.3, [2.4, 2.3, 1.0], [2.4, 2.3, 2.3]) == ["crawls", "crawls", "good"]


def test_examples_ship_with_the_package():
    setuptools = pytest.importorskip("setuptools")
    found = setuptools.find_packages(str(ROOT), include=["fastopt*"])   # pyproject's rule
    assert "fastopt.examples" in found


def test_lr_sweep_without_data_is_a_clear_error(tmp_path, capsys):
    assert main(["examples", "lr-sweep", "--no-plot", "--data-dir", str(tmp_path)]) == 2
    assert "MNIST" in capsys.readouterr().err


def test_cli_writes_the_png_where_asked(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "sub.png"
    assert main(["examples", "backprop", "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG
    assert "dL/dw1" in capsys.readouterr().out
    assert main(["examples", "list"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in EXAMPLES)
    assert main(["examples"]) == 0                  # (was exit 2: "NAME is required")
    assert capsys.readouterr().out == listing
    assert main(["examples", "-o", str(tmp_path / "x.png")]) == 2      # not ignored
    assert "need a NAME" in capsys.readouterr().err


def test_cli_without_matplotlib_says_so(tmp_path, capsys, monkeypatch):
    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "matplotlib", None)    # import matplotlib -> ImportError
    assert main(["examples", "schedules", "-o", str(tmp_path / "x.png")]) == 1
    assert "pip install matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
    assert main(["examples", "schedules", "--no-plot"]) == 0     # the facts need no plot


@pytest.mark.parametrize("script", sorted((ROOT / "examples").glob("*.py")),
                         ids=lambda p: p.stem)
def test_example_scripts_run(script, monkeypatch, capsys):
    text = script.read_text()
    name = next(n for n in EXAMPLES if f'"examples", "{n}"' in text)
    if name == "lr-sweep" and not _has_mnist():
        pytest.skip("MNIST test set not found")
    monkeypatch.setattr(sys, "argv", [str(script), "--small", "--no-plot"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(script), run_name="__main__")
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip()


def test_drawing_an_example_leaves_a_notebooks_matplotlib_as_it_was(tmp_path):
    """A teacher's trial: an example switched matplotlib to Agg for the whole
    session (matplotlib.use), so a notebook's own plots stopped showing."""
    code = ("import matplotlib; matplotlib.use('pdf'); import matplotlib.pyplot as plt\n"
            "from fastopt.examples import run_example\n"
            f"run_example('schedules', output={str(tmp_path / 's.png')!r})\n"
            "print(matplotlib.get_backend(), plt.get_fignums())\n")
    import subprocess
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "pdf []"
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
