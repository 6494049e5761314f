"""Hardening of ``fastopt.save`` (issue 19): nothing is written unless all
of it can be read back, a save killed at any point leaves the last good
checkpoint readable and no temporary files for long, and a missing
directory is named as such."""

from __future__ import annotations

import os
import random
import signal
import stat
import sys
import time

import numpy as np
import pytest

import fastopt


def _temps(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def _good(tmp_path):
    path = tmp_path / "c.npz"
    params = [np.ones(4, np.float32)]
    opt = fastopt.AdamW(params, backend="numpy")
    opt.step([np.ones(4, np.float32)])
    fastopt.save(path, params=params, optimizer=opt, extra={"epoch": 1})
    return path, opt


@pytest.mark.parametrize("extra", [
    {"x": np.array([object()], dtype=object)},
    {"nested": [1, {"x": np.array([None, 2], dtype=object)}]},
])
def test_object_arrays_are_refused_and_the_previous_file_is_untouched(tmp_path, extra):
    path, opt = _good(tmp_path)
    before = path.read_bytes()
    with pytest.raises(TypeError, match=r"\['x'\]"):
        fastopt.save(path, params=list(opt.param_groups[0]["params"]), optimizer=opt,
                     extra=extra)
    assert path.read_bytes() == before
    assert _temps(tmp_path) == []
    assert fastopt.load(path)["extra"] == {"epoch": 1}


def test_object_array_in_optimizer_state_is_refused(tmp_path):
    path, opt = _good(tmp_path)
    before = path.read_bytes()

    class Odd:
        def state_dict(self):
            return {"buf": np.array([1, "a"], dtype=object)}
    with pytest.raises(TypeError, match=r"\['optimizer'\]\['buf'\]"):
        fastopt.save(path, optimizer=Odd())
    assert path.read_bytes() == before


def test_missing_directory_is_named_before_anything_is_written(tmp_path):
    target = tmp_path / "no-such-dir" / "c.npz"
    with pytest.raises(FileNotFoundError, match="does not exist") as err:
        fastopt.save(target, params=[np.ones(3)])
    message = str(err.value)
    assert str(target) in message and ".tmp" not in message
    assert not (tmp_path / "no-such-dir").exists()


def test_directory_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="is not a directory") as err:
        fastopt.save(tmp_path / "f" / "c.npz", params=[np.ones(3)])
    assert ".tmp" not in str(err.value)


def test_save_fsyncs_the_file_and_the_directory(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    fastopt.save(tmp_path / "c.npz", params=[np.ones(3)])
    assert synced == ["file", "dir"]     # the data before the rename, the rename after
    umask = os.umask(0)                  # created with the umask's permissions, as open()
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "c.npz").stat().st_mode) == 0o666 & ~umask


def _dead_pid():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_saves_killed_at_random_points(tmp_path):
    """A child saves over and over and is SIGKILLed after a random delay,
    several times: the checkpoint always loads (the last good one), and the
    next save removes every temporary file the killed saves left."""
    path = tmp_path / "c.npz"
    big = np.random.default_rng(0).standard_normal(1 << 18)   # 2 MB: most time is writing
    rng = random.Random(19)
    last = -1
    for _ in range(6):
        pid = os.fork()
        if pid == 0:   # the child: no pytest machinery, just saves, until killed
            try:
                for i in range(last + 1, 10 ** 9):
                    fastopt.save(path, params=[big], extra={"i": i})
            finally:
                os._exit(1)
        deadline = time.monotonic() + 5
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(rng.uniform(0.0, 0.03))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        got = fastopt.load(path)       # never a half-written file
        assert got["extra"]["i"] >= last and got["params"][0].tobytes() == big.tobytes()
        last = got["extra"]["i"]
    # an orphan of a dead process, whatever the kills above happened to leave
    (tmp_path / f"c.npz.tmp-{_dead_pid()}").write_bytes(b"half a checkpoint")
    # a temporary file of a live process (another save in flight) is kept
    live = tmp_path / f"c.npz.tmp-{os.getpid()}-abcd"
    live.write_bytes(b"in flight")
    other = tmp_path / f"other.npz.tmp-{_dead_pid()}"       # another target's: not ours
    other.write_bytes(b"x")
    fastopt.save(path, params=[big], extra={"i": "parent"})
    assert _temps(tmp_path) == sorted([live.name, other.name])
    assert fastopt.load(path)["extra"]["i"] == "parent"


def test_killed_save_in_a_fresh_process_is_cleaned(tmp_path):
    """The same with a separate interpreter that is killed while writing
    (np.savez made slow), so the orphan is certain."""
    import subprocess
    path = tmp_path / "c.npz"
    fastopt.save(path, params=[np.arange(3.0)], extra={"i": 0})
    code = (
        "import sys, time, numpy as np, fastopt\n"
        "real = np.savez\n"
        "def slow(f, **a):\n"
        "    f.write(b'PK partial'); f.flush(); print('writing', flush=True); time.sleep(60)\n"
        "np.savez = slow\n"
        f"fastopt.save({str(path)!r}, params=[np.arange(3.0)], extra={{'i': 1}})\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
        assert len(_temps(tmp_path)) == 1
        child.kill()
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
    assert fastopt.load(path)["extra"] == {"i": 0}
    fastopt.save(path, params=[np.arange(3.0)], extra={"i": 2})
    assert _temps(tmp_path) == []


@pytest.mark.parametrize("backend", ["numpy", "numba", "cython"])
def test_a_flag_written_as_an_int_is_not_saved_into_an_unloadable_file(tmp_path, backend):
    """``group["amsgrad"] = 0`` equals False: the checked values' cache took
    it as unchanged, fastopt.save wrote it, fastopt.load refused the file."""
    import fastopt
    p = [np.ones(4)]
    opt = fastopt.Adam(p, lr=1e-2, backend=backend)
    opt.step([np.ones(4)])
    opt.param_groups[0]["amsgrad"] = 0
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['amsgrad'\] must be a bool, "
                                        r"got int"):
        fastopt.save(tmp_path / "c.npz", params=p, optimizer=opt)
    assert not (tmp_path / "c.npz").exists()
    opt.param_groups[0]["amsgrad"] = False
    fastopt.save(tmp_path / "c.npz", params=p, optimizer=opt)
    q = [np.zeros(4)]
    fastopt.load(tmp_path / "c.npz", params=q, optimizer=fastopt.Adam(q, lr=1e-2))
    np.testing.assert_array_equal(q[0], p[0])


def test_another_machines_temporary_file_in_flight_is_kept(tmp_path):
    """A shared folder (NFS, or a container with its own process ids): a
    save here removed another machine's temporary file while it was being
    written, its process id dead here, and that save then failed."""
    from fastopt import checkpoint
    path = tmp_path / "c.npz"
    dead = _dead_pid()
    foreign = tmp_path / f"c.npz.tmp-{dead}-0000beef-abcd1234"
    foreign.write_bytes(b"being written elsewhere")
    old = tmp_path / f"c.npz.tmp-{dead}-0000beef-00000000"   # an hour untouched: gone
    old.write_bytes(b"left by a crash elsewhere")
    hour_ago = time.time() - checkpoint.FOREIGN_AGE_S - 5
    os.utime(old, (hour_ago, hour_ago))
    ours = tmp_path / f"c.npz.tmp-{dead}-{checkpoint._origin_tag()}-00000000"
    ours.write_bytes(b"left by a crash here")
    fastopt.save(path, params=[np.ones(3)])
    assert _temps(tmp_path) == [foreign.name]


def test_a_full_disk_while_writing_names_the_users_path(tmp_path, monkeypatch):
    """np.savez's write fails with ENOSPC and no file name: it was raised
    bare, where a read-only folder's error named the checkpoint."""
    import errno

    def full(f, **arrays):
        raise OSError(errno.ENOSPC, "No space left on device")
    fastopt.save(tmp_path / "c.npz", params=[np.zeros(3)])
    monkeypatch.setattr(np, "savez", full)
    with pytest.raises(OSError, match=r"cannot save checkpoint: No space left on device: "
                                      r"'[^']*c\.npz'$") as info:
        fastopt.save(tmp_path / "c.npz", params=[np.ones(3)])
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert _temps(tmp_path) == []
    assert np.array_equal(fastopt.load(tmp_path / "c.npz")["params"][0], np.zeros(3))
