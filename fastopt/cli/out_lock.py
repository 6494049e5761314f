"""One ``fastopt train`` (or ``fastopt bench``) per ``--out`` at a time.

Two runs given the same ``--out`` (a batch job submitted twice, a requeue
while the first still runs) both passed the checks for an existing
checkpoint before either wrote one, and then wrote their results and
checkpoints over each other's, both exiting 0. A run now holds an advisory
lock on ``OUT/.fastopt-train.lock`` (``flock``: the system lets go of it
when the process ends, SIGKILL included, so a killed run leaves no stale
lock) from its checks to its exit, and a second run is refused with the
first one's pid. ``fastopt bench`` holds its own (two runs on one --out
wrote bench.json and bench.png over each other's, both exiting 0).
"""

from __future__ import annotations

import contextlib
import os

#: the lock file of ``fastopt <command>`` in its --out
LOCK_OF = ".fastopt-{command}.lock"
LOCK = LOCK_OF.format(command="train")


class OutLock:
    """``fastopt <command>``'s lock on one output folder (which exists)."""

    def __init__(self, folder, command="train"):
        self.command = command
        self.path = os.path.join(os.fspath(folder) or ".", LOCK_OF.format(command=command))
        self._fd = None

    def acquire(self) -> str | None:
        """Take the lock; None, or why not (another run holds it)."""
        try:
            import fcntl
        except ImportError:          # (no flock on Windows: no lock there)
            return None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                return f"cannot make the lock file {self.path}: {exc.strerror or exc}"
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _read(fd)
                os.close(fd)
                return (f"another fastopt {self.command}"
                        f"{f' (pid {holder})' if holder else ''} is "
                        "writing to this --out; wait for it to end, or give this run "
                        "another --out")
            # the file may have been removed by the run that held it between
            # our open and our lock: a lock on a removed file guards nothing
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except OSError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return None

    def release(self) -> None:
        """Remove the lock file (so an unused --out can be taken back) and
        let go of the lock."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.remove(self.path)
        os.close(self._fd)
        self._fd = None


def _read(fd) -> str:
    with contextlib.suppress(OSError, ValueError):
        return os.pread(fd, 32, 0).decode().strip()
    return ""
