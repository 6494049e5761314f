"""Hardening of ``fastopt train`` and ``fastopt bench``: output
paths are checked before any work, ``--threads 0`` is a usage error, and
Ctrl-C ends a run with the results of what finished, one line and exit 130
instead of a traceback and nothing."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from test_train import _fake_mnist

from fastopt.bench import matrix, ratios
from fastopt.cli import main
from fastopt.nn import training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _must_not_run(*args, **kwargs):
    raise AssertionError("the job started although its output path is unusable")


def test_train_out_under_a_file_fails_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(training, "fit", _must_not_run)
    (tmp_path / "existing_file").write_text("x")
    data = _fake_mnist(tmp_path / "mnist", n=8100)
    out = tmp_path / "existing_file" / "sub"
    rc = main(["train", "--data-dir", str(data), "--quiet", "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err and "not a directory" in err


def test_train_out_that_is_a_file_fails_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(training, "fit", _must_not_run)
    (tmp_path / "f").write_text("x")
    rc = main(["train", "--data-dir", str(tmp_path / "no-data"), "--out", str(tmp_path / "f")])
    assert rc == 2     # the --out check comes first, before loading the data
    assert "is not a directory" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-3", "two"])
def test_train_threads_must_be_positive(value, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--threads", value, "--out", "/nonexistent/never-used"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--threads" in err and ">= 1" in err and "Traceback" not in err


@pytest.mark.parametrize("argv, said", [
    (["train", "--epocs", "3"], "fastopt train: error: unrecognized arguments: --epocs 3; "
                                "did you mean --epochs? (see fastopt train --help)"),
    (["info", "--jsn=x"], "fastopt info: error: unrecognized arguments: --jsn=x; did you "
                          "mean --json? (see fastopt info --help)"),
    (["info", "extra"], "fastopt info: error: unrecognized arguments: extra (see fastopt "
                        "info --help)"),
    (["--json", "info"], "fastopt info: error: unrecognized arguments: --json; --json is the "
                         "subcommand's: put it after info (see fastopt info --help)"),
])
def test_an_unknown_flag_is_said_by_its_subcommand_with_the_flag_meant(argv, said, capsys):
    """The top-level parser said it, pointing to `fastopt --help`, which
    lists no subcommand's flags."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip() == said


def test_bench_out_that_is_a_file_fails_before_measuring(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(matrix, "run", _must_not_run)
    monkeypatch.setattr(ratios, "compare", _must_not_run)
    f = tmp_path / "results.txt"
    f.write_text("keep me")
    assert main(["bench", "--quick", "--out", str(f)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(f) in err and "not a directory" in err
    assert f.read_text() == "keep me"


def _default_sigint():
    # A test run started in the background by a non-interactive shell
    # (`bash .ci/run &`) inherits SIGINT ignored, and Python keeps an ignored
    # SIGINT ignored: the child would never see the Ctrl-C these tests send.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _child(code, cwd):
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                                [ROOT, os.path.join(ROOT, "tests")])),
                            preexec_fn=_default_sigint)


def _interrupt_when(child, stream, marker, timeout=60, sig=signal.SIGINT):
    """Send ``sig`` once ``marker`` shows up in the child's ``stream``;
    returns (returncode, stdout, stderr)."""
    seen = []
    try:
        for line in getattr(child, stream):
            seen.append(line)
            if marker in line:
                child.send_signal(sig)
                break
        out, err = child.communicate(timeout=timeout)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    if stream == "stdout":
        out = "".join(seen) + out
    else:
        err = "".join(seen) + err
    return child.returncode, out, err


@pytest.mark.parametrize("sig,code,said", [(signal.SIGINT, 130, "interrupted"),
                                           (signal.SIGTERM, 143, "terminated (SIGTERM)")])
def test_train_ctrl_c_writes_finished_epochs(tmp_path, sig, code, said):
    """SIGINT after the first epoch of a long run: metrics and curves of the
    finished epochs, one line on stderr, exit 130. SIGTERM (a scheduler's
    stop, a kill) ended it with nothing written: the same, exit 143."""
    data = _fake_mnist(tmp_path / "mnist", n=8200)
    out = tmp_path / "out"
    child = _child(f"""
        import sys
        from fastopt.cli import main
        sys.exit(main(["train", "--data-dir", {str(data)!r}, "--hidden", "8",
                       "--backend", "numpy", "--epochs", "100000", "--batch-size", "2000",
                       "--quiet", "--out", {str(out)!r}]))
    """, tmp_path)
    rc, stdout, stderr = _interrupt_when(child, "stdout", "epoch   1:", sig=sig)
    assert rc == code, stderr
    assert "Traceback" not in stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and said in lines[0] and "of 100000 epochs" in lines[0]
    m = json.loads((out / "metrics.json").read_text())
    assert m["interrupted"] is True
    assert 1 <= len(m["epochs"]) < 100000
    assert m["final_val_acc"] == m["epochs"][-1]["val_acc"]
    assert [r["epoch"] for r in m["epochs"]] == list(range(1, len(m["epochs"]) + 1))
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_bench_ctrl_c_writes_finished_cases(tmp_path, sig, code):
    """SIGINT while the second case is being measured: bench.json holds the
    first, its table is printed, one line on stderr, exit 130. (Timings reduced to NumPy, one
    round, and the second case held open, so the signal lands inside it.)
    SIGTERM, a batch scheduler's stop, ended it with nothing written: the
    same, exit 143."""
    out = tmp_path / "out"
    child = _child(f"""
        import sys, time
        sys.modules["torch"] = None
        from fastopt.bench import ratios
        from fastopt.cli import main
        real = ratios.compare
        calls = []

        def compare(row, impls=None, rounds=4):
            calls.append(row.case)
            if len(calls) == 2:
                time.sleep(60)       # "measuring" until the Ctrl-C comes
            return real(row, ("numpy",), 1)
        ratios.compare = compare
        sys.exit(main(["bench", "--quick", "--out", {str(out)!r}]))
    """, tmp_path)
    rc, stdout, stderr = _interrupt_when(child, "stderr", "1/3", sig=sig)
    assert rc == code, stderr
    assert "Traceback" not in stderr
    last = [ln for ln in stderr.splitlines() if ln.strip()][-1]
    assert "interrupted" in last and "1 of 3 cases" in last
    report = json.loads((out / "bench.json").read_text())
    assert report["interrupted"] is True
    # when and with what it ran, for a dashboard's axes (and from which commit: a
    # git checkout's hash here, None where the package is installed from a wheel)
    run = report["run"]
    assert run["started"].endswith("+00:00") and run["options"]["quick"] is True
    assert run["commit"] is None or len(run["commit"].split("+")[0]) == 40
    assert {(r["elements"], r["impl"]) for r in report["results"] if r["seconds"]} == \
        {(1 << 10, "numpy")}
    # the finished case's table on stdout, as a full run prints it (nothing before)
    assert "1024" in stdout and "numpy" in stdout and "%roof" in stdout


def test_bench_sigterm_before_measuring_exits_143(tmp_path):
    """A SIGTERM before the first case (the imports, the run's git calls)
    reached the generic Ctrl-C handler: exit 130 for a SIGTERM."""
    out = tmp_path / "out"
    child = _child(f"""
        import sys, time
        from fastopt.bench import machine
        from fastopt.cli import main

        def run_entry(started, options):
            print("git", file=sys.stderr, flush=True)
            time.sleep(60)
        machine.run_entry = run_entry
        sys.exit(main(["bench", "--quick", "--out", {str(out)!r}]))
    """, tmp_path)
    rc, stdout, stderr = _interrupt_when(child, "stderr", "git", sig=signal.SIGTERM)
    assert rc == 143, stderr
    assert "Traceback" not in stderr and "nothing written" in stderr
    assert not (out / "bench.json").exists()


@pytest.mark.parametrize("sig,code,said", [(signal.SIGINT, 130, "Ctrl-C"),
                                           (signal.SIGTERM, 143, "SIGTERM")])
def test_check_perf_interrupted_still_writes_its_json(tmp_path, sig, code, said):
    """--help promises the JSON "whatever the checks' outcome": a CI job's
    timeout (SIGTERM) or a Ctrl-C left none."""
    out = tmp_path / "cp.json"
    child = _child(f"""
        import sys, time
        from fastopt.bench import guard
        from fastopt.cli import main

        def run_checks(spec, attempts=None, progress=None):
            progress("a case")
            time.sleep(60)       # measuring until the signal comes
        guard.run_checks = run_checks
        sys.exit(main(["check-perf", "--json", {str(out)!r}]))
    """, tmp_path)
    rc, stdout, stderr = _interrupt_when(child, "stderr", "measuring a case", sig=sig)
    assert rc == code, stderr
    assert "Traceback" not in stderr
    result = json.loads(out.read_text())
    assert result["exit_status"] == code and result["ok"] is False
    assert result["error"] == f"interrupted before the checks ended ({said}): no verdict"


@pytest.mark.parametrize("argv,message", [
    (["--threads", "100000"], "--threads 100000: 100000 threads asked for, but Numba's thread pool"),
    (["--batch-size", "100000"], "--batch-size 100000 is more than the 8000 training samples"),
    (["--warmup-steps", "5"], "--warmup-steps 5: only with --schedule warmup-cosine"),
    (["--warmup-steps", "63", "--schedule", "warmup-cosine", "--epochs", "1"],
     "--warmup-steps 63: the run has 63 steps in all"),
])
def test_train_refuses_settings_it_cannot_honour(tmp_path, monkeypatch, capsys, argv, message):
    """One line and exit 2 before training: a thread count Numba cannot run
    was a traceback, the others were accepted and ignored (a batch larger
    than the data ran one step an epoch; a warmup past the end never
    reached the peak lr, or was dropped under the constant schedule)."""
    monkeypatch.setattr(training, "fit", _must_not_run)
    data = _fake_mnist(tmp_path / "mnist", n=10000)
    rc = main(["train", "--data-dir", str(data), "--quiet", "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and message in err, err


@pytest.mark.parametrize("argv,message", [
    (["train", "--target", "94"], "argument --target: expected a held-out accuracy as a "
                                  "fraction in (0, 1] (0.94 for 94%), got '94'"),
    (["train", "--seed", "-1"], "argument --seed: must be >= 0, got -1"),
    (["train", "--epochs", "0"], "argument --epochs: must be >= 1"),
    (["check-perf", "--attempts", "0"], "argument --attempts: must be >= 1, got 0"),
    (["plot-schedule", "constant(1e-3)", "--steps", "0"], "argument --steps: must be >= 1"),
])
def test_usage_errors_name_the_option(capsys, argv, message):
    """``--attempts 0`` and ``--steps 0`` fell back to defaults, ``--attempts
    -3`` measured nothing and reported a regression, ``--target 94`` (a
    percentage) reported "never reached 9400%"."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and "Traceback" not in err
    # one line, as the README says (argparse printed its usage block first)
    assert len(err.strip().splitlines()) == 1 and "--help" in err, err


def test_version(capsys):
    import fastopt
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"fastopt {fastopt.__version__}"


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_out_where_nothing_can_be_made_fails_before_training(tmp_path, monkeypatch, capsys):
    """/proc lets its owner "write" by its permission bits (root: always),
    yet nothing can be made in it: the check used os.access, so a run
    trained for minutes and then died with a traceback, its results lost."""
    monkeypatch.setattr(training, "fit", _must_not_run)
    data = _fake_mnist(tmp_path / "mnist", n=8100)
    rc = main(["train", "--data-dir", str(data), "--quiet", "--out", "/proc/fastopt-out"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "/proc/fastopt-out" in err, err
    # a folder that can be made is checked by making it (the results will
    # need it), with no probe file left in it
    from fastopt.cli.common import output_dir_problem
    assert output_dir_problem(str(tmp_path / "a" / "b"), ("metrics.json",)) is None
    assert (tmp_path / "a" / "b").is_dir() and not any((tmp_path / "a" / "b").iterdir())
    assert output_dir_problem(str(tmp_path)) is None and not any(
        p.name.startswith(".fastopt-probe") for p in tmp_path.iterdir())


@pytest.mark.parametrize("command", ["bench", "train"])
def test_an_empty_out_is_refused_before_any_work(tmp_path, monkeypatch, capsys, command):
    """``--out ""``: bench measured the whole matrix and then died with a
    FileNotFoundError traceback; train wrote into the current folder. Both
    refuse it first, in one line."""
    from fastopt.bench import matrix
    monkeypatch.setattr(training, "fit", _must_not_run)
    monkeypatch.setattr(matrix, "run", _must_not_run)
    monkeypatch.chdir(tmp_path)
    argv = ([command, "--out", "", "--quick"] if command == "bench" else
            [command, "--data-dir", str(_fake_mnist(tmp_path / "mnist", n=8100)), "--quiet",
             "--out", ""])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"fastopt {command}: --out '': is empty (--out . is the current directory)"
    assert sorted(p.name for p in tmp_path.iterdir()) == (["mnist"] if command == "train"
                                                          else [])


def test_results_that_cannot_be_written_are_one_line(tmp_path, monkeypatch, capsys):
    """A write that fails after training (the folder taken away meanwhile)
    says so in one line, after the accuracies, instead of a traceback."""
    out = tmp_path / "out"
    rc, err = _train_writing_fails(tmp_path, monkeypatch, capsys, out,
                                   PermissionError(13, "Permission denied"))
    assert rc == 1 and err.splitlines()[-1] == (
        f"fastopt train: could not write the results in --out {out}: Permission denied"), err


def _train_writing_fails(tmp_path, monkeypatch, capsys, out, error):
    """A one-epoch ``fastopt train`` into ``out`` whose results' writes
    raise ``error``: its exit code and stderr."""
    data = _fake_mnist(tmp_path / "mnist", n=8100)
    import fastopt._files as files

    def refuse(path, data):
        raise error
    monkeypatch.setattr(files, "write_atomically", refuse)
    rc = main(["train", "--data-dir", str(data), "--hidden", "8", "--epochs", "1",
               "--quiet", "--no-plot", "--threads", "1", "--out", str(out)])
    return rc, capsys.readouterr().err.strip()


def test_train_lr_with_ensemble_lrs_is_refused(tmp_path, capsys):
    data = _fake_mnist(tmp_path / "mnist", n=8100)
    rc = main(["train", "--data-dir", str(data), "--quiet", "--out", str(tmp_path / "o"),
               "--lr", "0.1", "--ensemble-lrs", "1e-2,1e-3"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--lr and --ensemble-lrs" in err, err


def test_a_run_without_curves_removes_an_older_one(tmp_path):
    """An older run's curves.png beside this run's metrics.json read as
    this run's."""
    data = _fake_mnist(tmp_path / "mnist", n=8100)
    out = tmp_path / "out"
    out.mkdir()
    (out / "curves.png").write_bytes(b"old")
    rc = main(["train", "--data-dir", str(data), "--hidden", "8", "--epochs", "1", "--quiet",
               "--no-plot", "--threads", "1", "--out", str(out)])
    assert rc == 0 and (out / "metrics.json").is_file() and not (out / "curves.png").exists()
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json"]   # no temporary left


@pytest.mark.parametrize("content,message", [
    (None, "not found"), ("{", "is not valid JSON"), ('{"cases": []}', "non-empty 'cases'")])
def test_check_perf_bad_floors_file_is_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "floors.json"
    if content is not None:
        path.write_text(content)
    assert main(["check-perf", "--floors", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and str(path) in err


@pytest.mark.parametrize("command", [
    ["plot-schedule", "constant(1e-3)"], ["examples", "backprop", "--small"]])
@pytest.mark.parametrize("name,message", [
    ("s.txt", ".txt is not an image format matplotlib writes"),
    ("missing/x.png", "does not exist")])
def test_image_output_checked_before_drawing(tmp_path, monkeypatch, capsys, command, name,
                                             message):
    """A bad extension or a missing folder was a matplotlib traceback (after
    running a whole lesson, for ``examples``)."""
    pytest.importorskip("matplotlib")
    from fastopt.examples import backprop
    monkeypatch.setattr(backprop, "run", _must_not_run)
    rc = main([*command, "-o", str(tmp_path / name)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and message in err


def test_plot_schedule_names_the_file_it_writes(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert main(["plot-schedule", "constant(1e-3)", "-o", str(tmp_path / "lr")]) == 0
    assert (tmp_path / "lr.png").exists()
    assert f"wrote {tmp_path / 'lr.png'} " in capsys.readouterr().out


def test_plot_schedule_legend_tells_two_long_schedules_of_one_kind_apart(tmp_path,
                                                                          monkeypatch):
    """one_cycle's repr is past the legend's length, and two of them (two
    peak lrs) were both labelled "one_cycle"."""
    plt = pytest.importorskip("matplotlib.pyplot")
    labels = []
    monkeypatch.setattr(plt.Axes, "legend", lambda ax, *a, **k: labels.extend(
        ax.get_legend_handles_labels()[1]))
    long_one = "one_cycle(max_value=1e-3, total_steps=1000, pct_start=0.3, " + " " * 40 + ")"
    assert main(["plot-schedule", "one_cycle(1e-3, 1000)", "one_cycle(3e-3, 1000)",
                 long_one, long_one, "constant(1e-3)", "-o", str(tmp_path / "lr.png")]) == 0
    assert labels[:2] == ["one_cycle(1e-3, 1000)", "one_cycle(3e-3, 1000)"]
    assert labels[2:4] == ["one_cycle (schedule 3)", "one_cycle (schedule 4)"]
    assert labels[4] == "constant(value=0.001)"


def test_bench_ctrl_c_while_writing_says_what_was_written(tmp_path, monkeypatch, capsys):
    """A Ctrl-C while the chart was drawn (after the table was printed)
    ended in "fastopt bench: interrupted", with bench.json written and no
    word of it."""
    from fastopt.bench import report

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(report, "plot", interrupted)
    out = tmp_path / "b"
    rc = main(["bench", "--quick", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 130 and err[-1] == ("fastopt bench: interrupted while writing the results; "
                                     f"wrote {out / 'bench.json'}"), err
    assert json.loads((out / "bench.json").read_text())["results"]


def test_train_says_when_other_processes_took_the_cpus(tmp_path, monkeypatch, capsys):
    """Under another process's load the default threads ran epochs 8x
    slower and train said nothing (bench warns)."""
    from fastopt.bench import timing
    monkeypatch.setattr(timing, "load_since",
                        lambda snap: {"other_processes": {"other_cpu_fraction": 0.4}})
    data = _fake_mnist(tmp_path / "mnist", n=8100)
    rc = main(["train", "--data-dir", str(data), "--hidden", "8", "--epochs", "1", "--quiet",
               "--no-plot", "--threads", "1", "--out", str(tmp_path / "o")])
    assert rc == 0
    assert "note: other processes used 40% of the CPUs during training" in capsys.readouterr().err


def test_out_paths_expand_the_home_folder_and_a_refused_run_leaves_no_folder(
        tmp_path, monkeypatch, capsys):
    """``--out=~/runs/a`` (no shell expands ~ after "=") made a folder named
    "~" in the working directory; a run refused after its --out was made
    left that folder behind, empty; ``-o DIR`` wrote DIR.png beside it."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    data = _fake_mnist(tmp_path / "mnist", n=8100)
    rc = main(["train", "--data-dir", str(data), "--hidden", "8", "--epochs", "1", "--quiet",
               "--no-plot", "--threads", "1", "--out=~/runs/a"])
    assert rc == 0 and (tmp_path / "home" / "runs" / "a" / "metrics.json").is_file()
    assert not (tmp_path / "~").exists()
    rc = main(["train", "--data-dir", str(data), "--quiet", "--lr", "-1",
               "--out", str(tmp_path / "new" / "run")])
    assert rc == 2 and "--lr -1.0: must be a finite number >= 0" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    (tmp_path / "pics").mkdir()
    assert main(["plot-schedule", "constant(1e-3)", "-o", str(tmp_path / "pics")]) == 2
    assert "is a directory" in capsys.readouterr().err and not (tmp_path / "pics.png").exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs symlinks and named pipes")
def test_results_write_through_a_symlink_and_refuse_a_pipe(tmp_path):
    from fastopt._files import write_atomically
    (tmp_path / "real.json").write_text("old")
    os.symlink("real.json", tmp_path / "link.json")
    write_atomically(tmp_path / "link.json", b"new")
    assert os.path.islink(tmp_path / "link.json") and (tmp_path / "real.json").read_text() == "new"
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(FileExistsError):
        write_atomically(tmp_path / "pipe", b"x")
    assert not os.path.isfile(tmp_path / "pipe")


def test_a_refused_out_takes_back_only_the_folders_it_made(tmp_path, monkeypatch, capsys):
    """The folders made for an earlier --out were removed by a later
    refusal, and the parents made before a folder failed were left."""
    from fastopt.cli.common import output_dir_problem
    monkeypatch.chdir(tmp_path)
    assert output_dir_problem("mine") is None
    (tmp_path / "afile").write_text("x")
    assert main(["train", "--quiet", "--out", "afile"]) == 2
    assert (tmp_path / "mine").is_dir()
    assert main(["train", "--quiet", "--out", "newparent/" + "x" * 300]) == 2
    assert "cannot be created" in capsys.readouterr().err
    assert not (tmp_path / "newparent").exists()


def test_a_picture_is_written_whole_or_not_at_all(tmp_path):
    """bench.png, curves.png, the schedule plot and the examples' pictures
    go through save_figure: a drawing that fails (a Ctrl-C, a full disk)
    leaves the earlier file as it was and nothing beside it; a dashboard
    polling the file never reads half a PNG."""
    pytest.importorskip("matplotlib")
    from fastopt._plotting import agg_pyplot, save_figure

    plt = agg_pyplot()
    target = tmp_path / "bench.png"
    target.write_bytes(b"the earlier picture")
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])

    def interrupted(out, **kw):
        out.write(b"\x89PNG half of it")
        raise KeyboardInterrupt
    drawing, fig.savefig = fig.savefig, interrupted
    with pytest.raises(KeyboardInterrupt):
        save_figure(fig, target, dpi=50)
    assert target.read_bytes() == b"the earlier picture"
    assert [p.name for p in tmp_path.iterdir()] == ["bench.png"]
    fig.savefig = drawing
    save_figure(fig, target, dpi=50)
    save_figure(fig, tmp_path / "lr", dpi=50)          # no extension: PNG
    save_figure(fig, tmp_path / "lr.svg")
    assert target.read_bytes()[:8] == (tmp_path / "lr").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in (tmp_path / "lr.svg").read_bytes()[:400]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.png", "lr", "lr.svg"]


def test_a_second_bench_on_the_same_out_is_refused(tmp_path, capsys, monkeypatch):
    """Two fastopt bench runs on one --out wrote bench.json and bench.png
    over each other's, both exiting 0 (asv maintainer's trial)."""
    from fastopt.cli.out_lock import OutLock
    first = OutLock(tmp_path, "bench")
    assert first.acquire() is None            # a first run holds the folder
    monkeypatch.setattr(matrix, "run", lambda *a, **k: pytest.fail("measured"))
    try:
        assert main(["bench", "--quick", "--out", str(tmp_path)]) == 2
    finally:
        first.release()
    err = capsys.readouterr().err
    assert f"--out {tmp_path}: another fastopt bench (pid {os.getpid()}) is writing" in err
    assert not (tmp_path / ".fastopt-bench.lock").exists()
    # a train run's lock is its own: bench and train may share a folder
    train = OutLock(tmp_path)
    assert train.acquire() is None
    assert OutLock(tmp_path, "bench").acquire() is None
    train.release()


def test_bench_without_a_chart_removes_an_earlier_one(tmp_path, monkeypatch):
    """Without matplotlib, the bench.png of an earlier run stayed beside the
    new bench.json, read as its chart."""
    from fastopt.bench import report
    (tmp_path / "bench.png").write_bytes(b"an earlier run's chart")
    monkeypatch.setattr(report, "plot", lambda rep, path: False)
    written = report.write({"results": []}, str(tmp_path))
    assert written == [str(tmp_path / "bench.json")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"]


def test_an_earlier_runs_results_that_could_not_be_replaced_are_removed(tmp_path, monkeypatch,
                                                                        capsys):
    """A full disk at the end of a run left the previous run's metrics.json
    in place: a job parsing it without the exit code took it for this one's."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text('{"final_val_acc": 0.99}')
    rc, err = _train_writing_fails(tmp_path, monkeypatch, capsys, out,
                                   OSError(28, "No space left on device"))
    assert rc == 1 and err.splitlines()[-1] == (
        f"fastopt train: could not write the results in --out {out}: No space left on device "
        "(removed an earlier run's metrics.json)"), err
    assert not (out / "metrics.json").exists()
