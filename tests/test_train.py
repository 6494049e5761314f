"""``fastopt train``: runs end to end on a tiny synthetic MNIST; bad specs fail clearly."""

from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pytest

import fastopt
from fastopt.cli import main


def _fake_mnist(d, n=300, seed=0):
    """A learnable fake MNIST: the label is drawn as a bright 4x4 block."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
    for i, c in enumerate(labels):
        r, col = divmod(int(c), 5)
        images[i, 4 + 8 * r:8 + 8 * r, 2 + 5 * col:6 + 5 * col] = 255
    d.mkdir(parents=True, exist_ok=True)
    for name, arr, magic in (("t10k-images-idx3-ubyte", images, 2051),
                             ("t10k-labels-idx1-ubyte", labels, 2049)):
        head = struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape)
        (d / (name + ".gz")).write_bytes(gzip.compress(head + arr.tobytes()))
    return d


def test_train_single_model_writes_metrics_and_plot(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    data = _fake_mnist(tmp_path / "mnist", n=10000)
    monkeypatch.setenv("FASTOPT_DATA", str(data))
    out = tmp_path / "out"
    rc = main(["train", "--data", "mnist", "--hidden", "32", "--optimizer", "adamw",
               "--lr", "3e-3", "--schedule", "warmup-cosine", "--epochs", "2",
               "--batch-size", "256", "--out", str(out)])
    assert rc == 0
    captured = capsys.readouterr()
    assert "samples/s" in captured.err and "loss" in captured.err     # progress bar
    # not a terminal: one line an epoch, no carriage returns in a log file
    assert "\r" not in captured.err and captured.err.count("samples/s") == 2
    assert "held-out accuracy lr=0.003:" in captured.out
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["epochs"]) == 2 and m["sizes"] == [784, 32, 10]
    assert m["final_val_acc"][0] > 0.9          # the fake digits are easy
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_train_ensemble_sweep(tmp_path, monkeypatch, capsys):
    data = _fake_mnist(tmp_path / "mnist", n=10000)
    out = tmp_path / "out"
    rc = main(["train", "--data-dir", str(data), "--hidden", "16", "--epochs", "1",
               "--ensemble-lrs", "1e-2,1e-3,1e-5", "--batch-size", "256", "--quiet",
               "--threads", "1",
               "--no-plot", "--out", str(out)])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["labels"] == ["lr=0.01", "lr=0.001", "lr=1e-05"]
    # the sweep's lrs, not the default lr that no model used
    assert m["config"]["lr"] is None and m["config"]["ensemble_lrs"] == [1e-2, 1e-3, 1e-5]
    accs = m["final_val_acc"]
    assert len(accs) == 3 and accs[0] > accs[2]   # 1e-5 barely moves in one epoch


def test_an_lr_sweep_with_clipping_trains_each_model_as_alone(tmp_path, capsys):
    """A teacher's trial: with one clipping norm over the sweep, the lr=0.1
    model's accuracy moved with its neighbour's lr (89.40% beside 0.1,
    89.85% beside 10). Each model is now clipped by its own norm."""
    data = _fake_mnist(tmp_path / "mnist", n=10000)
    accs = []
    for lrs in ("0.5,0.1", "50,0.1"):
        out = tmp_path / lrs
        assert _train(out, data, "--epochs", "1", "--optimizer", "sgd", "--ensemble-lrs",
                      lrs, "--max-grad-norm", "0.5") == 0
        m = json.loads((out / "metrics.json").read_text())
        accs.append([r["val_loss"][1] for r in m["epochs"]])
        assert m["hyperparameters"]["max_grad_norm"] == 0.5
        assert m["hyperparameters"]["clip"] == "per model"
    assert accs[0] == accs[1]


def test_a_diverged_model_is_said_and_its_metrics_are_strict_json(tmp_path, capsys):
    """lr=1e8: the run printed its NaN model's 10% as a result (one class's
    share) and wrote NaN/Infinity tokens into metrics.json, which
    JSON.parse refuses and jq read as 1.8e308."""
    data = _fake_mnist(tmp_path / "mnist", n=10000)
    out = tmp_path / "out"
    rc = main(["train", "--data-dir", str(data), "--hidden", "16", "--epochs", "1",
               "--ensemble-lrs", "1e8,1e-3", "--optimizer", "sgd", "--quiet", "--threads", "1",
               "--no-plot", "--out", str(out)])
    assert rc == 0
    said = capsys.readouterr().out
    assert "lr=1e+08: " in said and "DIVERGED (training loss nan by epoch 1)" in said
    assert "lr=0.001: " in said and said.count("DIVERGED") == 1
    text = (out / "metrics.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    m = json.loads(text)
    assert m["diverged"] == ["lr=1e+08"] and m["epochs"][0]["train_loss"][0] is None
    # the resolved hyperparameters, defaults included (config had momentum null)
    assert "(momentum 0.9, weight decay 0)" in said and m["config"]["momentum"] is None
    assert m["hyperparameters"]["momentum"] == 0.9 and m["hyperparameters"]["nesterov"] is False


@pytest.mark.parametrize("argv, said", [
    (["--max-grad-norm", "0"], "--max-grad-norm 0.0: must be > 0.0"),
    (["--weight-decay", "-1"], "--weight-decay -1.0: must be >= 0.0"),
    (["--optimizer", "sgd", "--momentum", "-1"], "--momentum -1.0: must be >= 0.0")])
def test_a_bad_optimizer_value_is_named_by_its_flag(tmp_path, capsys, argv, said):
    """They were named as Python parameters (max_grad_norm must be > 0.0)."""
    data = _fake_mnist(tmp_path / "mnist", n=10000)
    rc = main(["train", "--data-dir", str(data), "--epochs", "1", "--quiet", "--no-plot",
               "--out", str(tmp_path / "out"), *argv])
    assert rc == 2 and f"fastopt train: {said}" in capsys.readouterr().err


def test_a_run_beside_another_runs_checkpoint_says_so(tmp_path, capsys):
    """Without --checkpoint it wrote its metrics.json beside the other run's
    checkpoint, unsaid: one folder, two runs."""
    data = _fake_mnist(tmp_path / "mnist", n=10000)
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint.npz").write_bytes(b"")
    rc = main(["train", "--data-dir", str(data), "--hidden", "8", "--epochs", "1", "--quiet",
               "--no-plot", "--out", str(out)])
    assert rc == 0 and "is another run's checkpoint" in capsys.readouterr().err


def test_train_without_hidden_layers_says_so(tmp_path, capsys):
    """--hidden '' trains softmax regression; its header named an activation
    (relu) that no layer had."""
    data = _fake_mnist(tmp_path / "mnist", n=10000)
    rc = main(["train", "--data-dir", str(data), "--hidden", "", "--epochs", "1",
               "--no-plot", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert rc == 0 and "model(s) 784-10 (no hidden layer: softmax regression)," in out
    assert "relu" not in out.splitlines()[0]


def test_train_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--hidden", "256,,x"])
    assert "layer spec" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--ensemble-lrs", "1e-3,abc"])
    assert "comma-separated numbers" in capsys.readouterr().err
    rc = main(["train", "--data-dir", str(tmp_path / "missing"), "--out", str(tmp_path)])
    assert rc == 2 and "never downloads" in capsys.readouterr().err


@pytest.mark.parametrize("name,lr", [("rmsprop", 1e-3), ("adagrad", 3e-2), ("adamax", 3e-3),
                                     ("nadam", 3e-3), ("radam", 3e-3), ("lion", 3e-4)])
def test_train_accepts_every_optimizer(tmp_path, name, lr):
    """``fastopt train --optimizer NAME`` for the whole family: one epoch on
    the fake digits learns them."""
    data = _fake_mnist(tmp_path / "mnist", n=10000)
    out = tmp_path / "out"
    rc = main(["train", "--data-dir", str(data), "--hidden", "32", "--epochs", "1",
               "--optimizer", name, "--lr", str(lr), "--batch-size", "128", "--quiet",
               "--no-plot", "--out", str(out)])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["final_val_acc"][0] > 0.8, (name, m["final_val_acc"])


def test_train_with_sam_computes_two_gradients_a_step(tmp_path, monkeypatch, capsys):
    """``--sam RHO`` wraps the optimizer in SAM: each batch evaluates the
    gradients at p and at p + e (two backward passes), and it learns."""
    from fastopt.nn import Ensemble
    calls = []
    inner = Ensemble.loss_and_grad

    def counted(self, *args, **kw):
        calls.append(1)
        return inner(self, *args, **kw)

    monkeypatch.setattr(Ensemble, "loss_and_grad", counted)
    data = _fake_mnist(tmp_path / "mnist", n=10000)
    out = tmp_path / "out"
    rc = main(["train", "--data-dir", str(data), "--hidden", "32", "--epochs", "1",
               "--optimizer", "sgd", "--lr", "0.05", "--sam", "0.05", "--batch-size", "256",
               "--quiet", "--no-plot", "--out", str(out)])
    assert rc == 0
    assert "sgd + SAM rho=0.05" in capsys.readouterr().out
    assert len(calls) == 2 * 32          # 8000 samples in batches of 256: 32 steps
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["sam"] == 0.05 and m["final_val_acc"][0] > 0.8


def test_train_lbfgs_full_batch(tmp_path):
    data = _fake_mnist(tmp_path / "mnist", n=10000)
    out = tmp_path / "out"
    rc = main(["train", "--data-dir", str(data), "--hidden", "32", "--epochs", "2",
               "--optimizer", "lbfgs", "--batch-size", "8000", "--quiet", "--no-plot",
               "--out", str(out)])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["lr"] == 1.0                     # lbfgs's own default
    losses = [r["train_loss"][0] for r in m["epochs"]]
    assert losses[1] < losses[0] and m["final_val_acc"][0] > 0.8


@pytest.mark.parametrize("argv,message", [
    (["--optimizer", "lbfgs"], "add --batch-size 8000"),        # the default batch of 128
    (["--optimizer", "lbfgs", "--batch-size", "8000", "--sam", "0.05"], "not lbfgs"),
    (["--optimizer", "lbfgs", "--batch-size", "8000", "--max-grad-norm", "1"],
     "no --max-grad-norm"),
    (["--sam", "0.05", "--ensemble-lrs", "1e-2,1e-3"], "not an --ensemble-lrs sweep"),
    # (named by its flags, not as the optimizer's params[0] refusal)
    (["--dtype", "float64", "--state-dtype", "int8"], "--dtype float64 params keep float64"),
])
def test_train_refuses_what_sam_and_lbfgs_cannot_do(tmp_path, capsys, argv, message):
    data = _fake_mnist(tmp_path / "mnist", n=10000)
    out = tmp_path / "out"
    rc = main(["train", "--data-dir", str(data), "--hidden", "8", "--epochs", "1", "--quiet",
               "--no-plot", "--out", str(out), *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (out / "metrics.json").exists()


@pytest.mark.parametrize("argv,message", [
    (["--sam", "0.05"], "trains on the GPU with a plain optimizer"),
    (["--optimizer", "lbfgs", "--batch-size", "8000"], "trains on the GPU with a plain optimizer"),
    (["--backend", "numba"], "--backend numba is a CPU nn backend"),
    # no GPU here (and no simulator): the model's own refusal, in one line
    ([], "nn backend 'cuda' is not available here"),
])
def test_train_on_the_gpu_refuses_clearly_what_it_cannot_do(tmp_path, capsys, argv, message):
    if not argv:
        from numba import cuda
        if cuda.is_available():
            pytest.skip("a GPU is here: the run would train")
    data = _fake_mnist(tmp_path / "mnist", n=10000)
    out = tmp_path / "out"
    rc = main(["train", "--device", "cuda", "--data-dir", str(data), "--hidden", "8",
               "--epochs", "1", "--quiet", "--no-plot", "--out", str(out), *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (out / "metrics.json").exists()


def test_train_rejects_a_bad_sam_radius(capsys):
    for bad in ("0", "-0.1", "x", "inf"):
        with pytest.raises(SystemExit):
            main(["train", "--sam", bad])
        assert "positive SAM radius" in capsys.readouterr().err


def test_fit_refuses_lbfgs_on_mini_batches():
    from fastopt.nn import Ensemble
    from fastopt.nn.training import fit, make_optimizer
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((64, 5)).astype(np.float32), rng.integers(0, 3, 64)
    model = Ensemble(1, (5, 4, 3), seed=0)
    opt = make_optimizer(model, "lbfgs", 1.0)
    with pytest.raises(ValueError, match="batch_size=64"):
        fit(model, opt, X, y, epochs=1, batch_size=16)
    history = fit(model, opt, X, y, epochs=3, batch_size=64)
    losses = [r["train_loss"][0] for r in history["epochs"]]
    assert losses[2] < losses[0]


def test_momentum_is_refused_for_an_optimizer_without_one():
    """``fastopt train --optimizer adam --momentum 0.9`` ignored the momentum."""
    from fastopt.nn import Ensemble
    from fastopt.nn.training import make_optimizer
    model = Ensemble(1, (5, 4, 3), seed=0)
    with pytest.raises(ValueError, match="momentum is an SGD setting; adam"):
        make_optimizer(model, "adam", 1e-3, momentum=0.9)
    assert make_optimizer(model, "sgd", 0.1).param_groups[0]["momentum"] == 0.9
    assert make_optimizer(model, "sgd", 0.1, momentum=0.5).param_groups[0]["momentum"] == 0.5


@pytest.mark.parametrize("name", ["lamb", "nadam"])
def test_make_optimizer_refuses_sharding_what_does_not_shard_by_its_flags(name):
    """``--shard-state --optimizer lamb`` exited 1 with the sharded
    optimizer's API message, repeated once per rank."""
    import types

    from fastopt.nn import Ensemble
    from fastopt.nn.training import make_optimizer
    model = Ensemble(1, (4, 3, 2), "relu", seed=0)
    with pytest.raises(ValueError, match=rf"--optimizer {name} with --shard-state: .*leave out "
                                         r"--shard-state"):
        make_optimizer(model, name, 1e-3, parallel=types.SimpleNamespace(shard_state=True))


def _train(out, data, *extra):
    return main(["train", "--data-dir", str(data), "--hidden", "16", "--batch-size", "500",
                 "--quiet", "--no-plot", "--threads", "1", "--out", str(out), *extra])


def _same_training(a, b):
    """Two runs' metrics (losses and accuracies per epoch) and final
    checkpoints (params and optimizer state) are the same bit for bit."""
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    keys = ("epoch", "train_loss", "val_loss", "val_acc")
    assert [[r[k] for k in keys] for r in ma["epochs"]] == \
        [[r[k] for k in keys] for r in mb["epochs"]]
    ca, cb = (fastopt.checkpoint.read(d / "checkpoint.npz") for d in (a, b))
    np.testing.assert_array_equal(ca["params"][0], cb["params"][0])
    sa, sb = ca["optimizer"]["state"][0], cb["optimizer"]["state"][0]
    assert sa["step"] == sb["step"]
    for name in sa["buffers"]:
        np.testing.assert_array_equal(sa["buffers"][name], sb["buffers"][name])


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_train_resumes_after_ctrl_c_bit_for_bit(tmp_path, monkeypatch, capsys, optimizer):
    """--checkpoint writes the models and the optimizer after each epoch; a
    run stopped in its third epoch and --resume'd ends exactly as one never
    stopped (the schedule's position, the batches' order, the moments)."""
    from fastopt.nn import Ensemble
    data = _fake_mnist(tmp_path / "mnist", n=10000)
    run = ["--optimizer", optimizer, "--lr", "0.01", "--schedule", "warmup-cosine",
           "--epochs", "4", "--checkpoint"]
    assert _train(tmp_path / "straight", data, *run) == 0
    plain, calls = Ensemble.train_step, [0]

    def stopped_in_epoch_3(self, *a, **k):
        calls[0] += 1
        if calls[0] == 2 * 16 + 2:      # 8000 training samples: 16 batches an epoch
            raise KeyboardInterrupt
        return plain(self, *a, **k)
    monkeypatch.setattr(Ensemble, "train_step", stopped_in_epoch_3)
    capsys.readouterr()
    assert _train(tmp_path / "stopped", data, *run) == 130
    err = capsys.readouterr().err
    assert "2 of 4 epochs finished" in err and "--resume goes on from epoch 3" in err
    monkeypatch.setattr(Ensemble, "train_step", plain)
    assert _train(tmp_path / "stopped", data, *run) == 2       # again, without --resume
    assert ("exists (a run stopped after epoch 2 of --epochs 4): pass --resume"
            in capsys.readouterr().err)
    assert _train(tmp_path / "stopped", data, *run, "--resume") == 0
    assert "resuming after epoch 2" in capsys.readouterr().out
    _same_training(tmp_path / "straight", tmp_path / "stopped")


def test_train_resume_grows_epochs_with_a_constant_schedule(tmp_path, capsys):
    data = _fake_mnist(tmp_path / "mnist", n=10000)
    assert _train(tmp_path / "three", data, "--epochs", "3", "--checkpoint") == 0
    assert _train(tmp_path / "grown", data, "--epochs", "1", "--checkpoint") == 0
    assert _train(tmp_path / "grown", data, "--epochs", "3", "--resume") == 0
    _same_training(tmp_path / "three", tmp_path / "grown")
    capsys.readouterr()
    assert _train(tmp_path / "grown", data, "--epochs", "2", "--resume") == 2
    assert "has finished 3 epochs, more than --epochs 2" in capsys.readouterr().err


def test_train_ctrl_c_while_the_checkpoint_is_renamed(tmp_path, monkeypatch, capsys):
    """A second Ctrl-C landing after the epoch's checkpoint was renamed into
    place, before the run had counted it: the message said to resume from
    that epoch, which the file had finished."""
    import fastopt.cli.train_checkpoint as tc
    data = _fake_mnist(tmp_path / "mnist", n=10000)
    real, calls = tc.save_epoch, [0]

    def save_then_interrupted(*a, **k):
        real(*a, **k)
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(tc, "save_epoch", save_then_interrupted)
    import fastopt.cli.train as train_cli
    monkeypatch.setattr(train_cli, "save_epoch", save_then_interrupted)
    assert _train(tmp_path / "out", data, "--epochs", "4", "--checkpoint") == 130
    err = capsys.readouterr().err
    assert "--resume goes on from epoch 3" in err, err


def test_train_resume_refuses_what_is_not_this_run(tmp_path, capsys):
    """Exit 2 and one line naming the reason; the checkpoint is left as it was."""
    data = _fake_mnist(tmp_path / "mnist", n=10000)
    out = tmp_path / "out"
    # nothing to go on from: the run starts (a requeued job's one command line)
    assert _train(tmp_path / "none", data, "--resume", "--epochs", "1") == 0
    assert "--resume: no " in capsys.readouterr().err
    assert (tmp_path / "none" / "checkpoint.npz").is_file()
    assert _train(out, data, "--epochs", "2", "--schedule", "warmup-cosine",
                  "--checkpoint") == 0
    before = (out / "checkpoint.npz").read_bytes()
    for extra, message in [
            (["--epochs", "2", "--lr", "0.5"], "a run with --lr 0.001, not 0.5"),
            (["--epochs", "2", "--hidden", "8"], "a run with --hidden 16, not 8"),
            (["--epochs", "3"], "its --schedule warmup-cosine spans them all; give --epochs 2")]:
        capsys.readouterr()
        rc = _train(out, data, "--schedule", "warmup-cosine", *extra, "--resume")
        err = capsys.readouterr().err
        assert rc == 2 and message in err, err
    # a finished run requeued: nothing to do, no usage error (it exited 2)
    assert _train(out, data, "--schedule", "warmup-cosine", "--epochs", "2", "--resume") == 0
    assert ("has finished 2 epochs of --epochs 2: nothing left to train"
            in capsys.readouterr().err)
    assert (out / "checkpoint.npz").read_bytes() == before
    (out / "checkpoint.npz").write_bytes(before[:100])
    assert _train(out, data, "--schedule", "warmup-cosine", "--epochs", "2", "--resume") == 2
    assert "is not a readable fastopt checkpoint" in capsys.readouterr().err


def test_train_with_checkpoint_will_not_start_over_an_unfinished_run(tmp_path, capsys):
    """Run again without --resume (up-arrow, Enter): its first epoch wrote
    over the stopped run's checkpoint. Refused, exit 2, the file as it was."""
    data = _fake_mnist(tmp_path / "mnist", n=10000)
    out = tmp_path / "out"
    assert _train(out, data, "--epochs", "1", "--checkpoint") == 0
    before = (out / "checkpoint.npz").read_bytes()
    capsys.readouterr()
    assert _train(out, data, "--epochs", "3", "--checkpoint") == 2
    err = capsys.readouterr().err
    assert "exists (a finished run of --epochs 1): delete it" in err, err
    assert (out / "checkpoint.npz").read_bytes() == before
    assert _train(out, data, "--epochs", "3", "--resume") == 0


def test_train_resume_takes_a_default_given_explicitly_as_the_same_run(tmp_path, capsys):
    data = _fake_mnist(tmp_path / "mnist", n=10000)
    out = tmp_path / "out"
    assert _train(out, data, "--epochs", "1", "--checkpoint", "--optimizer", "sgd",
                  "--schedule", "warmup-cosine") == 0
    capsys.readouterr()
    assert _train(out, data, "--epochs", "1", "--resume", "--optimizer", "sgd",
                  "--schedule", "warmup-cosine", "--momentum", "0.9", "--weight-decay", "0",
                  "--warmup-steps", "1") == 0
    assert "nothing left to train" in capsys.readouterr().err    # the options agreed


def test_fit_refuses_records_of_epochs_the_optimizer_is_not_at_the_end_of():
    """A checkpoint saved inside an epoch (in an except KeyboardInterrupt:)
    and its finished records: fit replayed that epoch from its start."""
    from fastopt.nn import Ensemble
    from fastopt.nn.training import fit
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((40, 6)).astype(np.float32), rng.integers(0, 3, 40)
    model = Ensemble(1, (6, 8, 3), seed=0)
    opt = fastopt.AdamW(model.param_groups(lr=1e-2))
    history = fit(model, opt, X, y, epochs=1, batch_size=10)
    model.train_step(opt, X[:10], y[:10])           # one step into epoch 2
    with pytest.raises(ValueError, match="finished lists 1 epochs of 4 steps, but the "
                                         "optimizer has taken 5 steps"):
        fit(model, opt, X, y, epochs=3, batch_size=10, finished=history["epochs"])


def test_a_second_run_on_the_same_out_is_refused_while_the_first_runs(tmp_path, capsys):
    """Two runs given one --out (a job submitted twice) both passed the
    checks before either wrote, then wrote over each other's results and
    checkpoint, both exiting 0. The first holds a lock on --out until it
    exits (the system drops it when the process dies, SIGKILL included)."""
    import os

    from fastopt.cli.out_lock import LOCK, OutLock
    data = _fake_mnist(tmp_path / "mnist", n=10000)
    out = tmp_path / "out"
    out.mkdir()
    first = OutLock(out)                   # the first run, as it holds --out
    assert first.acquire() is None
    for extra in ([], ["--checkpoint"], ["--resume"]):
        assert _train(out, data, "--epochs", "1", *extra) == 2
        err = capsys.readouterr().err
        assert (f"--out {out}: another fastopt train (pid {os.getpid()}) is writing to this "
                "--out; wait for it to end, or give this run another --out") in err, err
    assert sorted(p.name for p in out.iterdir()) == [LOCK]      # nothing written
    first.release()
    assert list(out.iterdir()) == []
    assert _train(out, data, "--epochs", "1", "--checkpoint") == 0
    assert not (out / LOCK).exists()       # let go of at exit
    assert (out / "checkpoint.npz").is_file()


def test_a_lock_left_by_a_killed_run_is_no_lock(tmp_path):
    """SIGKILL leaves the lock file, not the lock: the next run goes on."""
    import subprocess
    import sys

    from fastopt.cli.out_lock import LOCK
    data = _fake_mnist(tmp_path / "mnist", n=10000)
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from fastopt.cli.out_lock import OutLock; "
        f"assert OutLock({str(out)!r}).acquire() is None; print('held', flush=True); "
        "time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert _train(out, data, "--epochs", "1") == 2
    finally:
        holder.kill()
        holder.wait()
    assert (out / LOCK).exists()
    assert _train(out, data, "--epochs", "1") == 0


def test_a_checkpoint_that_could_not_be_written_fails_the_run(tmp_path, monkeypatch, capsys):
    """A full disk: each failed write is said and training goes on, but the
    run exited 0 with its checkpoint epochs behind, so a job wrapper relying
    on --resume could not tell. Exit 1, naming what the file holds."""
    import fastopt.cli.train as train_cli
    data = _fake_mnist(tmp_path / "mnist", n=10000)
    real, calls = train_cli.save_epoch, [0]

    def disk_full_from_epoch_2(*a, **k):
        calls[0] += 1
        if calls[0] >= 2:
            raise OSError(28, "No space left on device")
        return real(*a, **k)
    monkeypatch.setattr(train_cli, "save_epoch", disk_full_from_epoch_2)
    out = tmp_path / "out"
    assert _train(out, data, "--epochs", "3", "--checkpoint") == 1
    err = capsys.readouterr().err
    assert "after epoch 2: No space left on device; training goes on" in err
    assert f"{out / 'checkpoint.npz'} holds 1 of the 3 epochs: writing it failed" in err
    assert (out / "metrics.json").is_file()        # the results are whole


def test_a_blown_up_but_finite_loss_is_called_diverged(tmp_path, capsys):
    """A teacher's trial: lr=100 SGD ended at a training loss of 9e24 and
    was printed as an ordinary 10.5% result, "diverged": [] in metrics."""
    data = _fake_mnist(tmp_path / "mnist", n=10000)
    out = tmp_path / "out"
    assert _train(out, data, "--epochs", "1", "--optimizer", "sgd", "--momentum", "0",
                  "--ensemble-lrs", "100,1e-3") == 0
    said = capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    loss = m["epochs"][0]["train_loss"][0]
    assert loss is None or loss > 10 * np.log(10)
    assert m["diverged"] == ["lr=100"] and said.count("DIVERGED") == 1


def test_diverged_judges_the_last_epoch_for_a_finite_blow_up():
    """(review) a model that blew up in epoch 1 and then reached 100% was
    called DIVERGED; non-finite stays DIVERGED wherever it came."""
    from fastopt.cli.train import _diverged
    history = {"epochs": [{"epoch": 1, "train_loss": [73.2, 1.0, float("nan"), 9e24]},
                          {"epoch": 2, "train_loss": [1e-5, 30.0, 2.0, 9e24]}]}
    assert _diverged(history, 10) == {1: ("30", 2), 2: ("nan", 1), 3: ("9e+24", 2)}


def test_fit_trains_an_mlp():
    """(review) fit passed train_step a keyword MLP did not take."""
    from fastopt.nn import MLP
    from fastopt.nn.training import fit
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((256, 20)), rng.integers(0, 3, 256)
    net = MLP((20, 16, 3), seed=0)
    history = fit(net, fastopt.SGD(net.param_groups(), lr=0.1), X, y, epochs=1, batch_size=64)
    assert len(history["epochs"]) == 1


def test_a_second_sigterm_is_the_same_request_and_a_second_ctrl_c_stops_at_once():
    """A scheduler signals every process and mpiexec forwards the signal
    too: a second SIGTERM took the abort path of a second Ctrl-C."""
    import signal

    from fastopt.cli.train import _StopOnCtrlC
    stop = _StopOnCtrlC()
    stop._handle(signal.SIGTERM, None)
    stop._handle(signal.SIGTERM, None)
    assert stop.requested and stop.exit_code == 143
    with pytest.raises(KeyboardInterrupt):
        stop._handle(signal.SIGINT, None)
