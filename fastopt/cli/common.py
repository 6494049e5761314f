"""What the commands share: exit codes and argument checks."""

from __future__ import annotations

import contextlib
import os
import tempfile

from .._arguments import int_at_least, non_negative_int, positive_int  # noqa: F401 (shared)

EXIT_INTERRUPTED = 130   # 128 + SIGINT, what a shell reports for a Ctrl-C'd job


class TermAsCtrlC:
    """While active, SIGTERM (a batch scheduler's stop, or ``timeout``'s)
    is taken as Ctrl-C: KeyboardInterrupt, so a command writes what
    finished as it does on Ctrl-C, and ``exit_code`` is 143 (128 +
    SIGTERM) instead of 130. Left alone: a handler the embedding program
    set, SIG_IGN (nohup), and threads other than the main one."""

    def __init__(self):
        self.exit_code, self._old = EXIT_INTERRUPTED, None

    def __enter__(self):
        import signal
        import threading
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL):
            self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.exit_code = 128 + signum
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        import signal
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
            self._old = None
        return False


def user_path(text):
    """argparse type for a path: ``~`` expanded, as a shell does for a
    separate word but not after ``--out=`` (a folder named ``~`` was made)."""
    return os.path.expanduser(text)


def image_path(path):
    """``(path, problem)`` for an image that matplotlib will write to
    ``path``: with no extension, ``.png`` added (as matplotlib would add it,
    so that what is printed is the file written); ``problem`` (a phrase to
    follow ``-o PATH:``) when the extension names no format matplotlib
    writes or the file cannot be made, else None. Checked before the work
    that draws it, by making a file beside it (removed at once)."""
    from matplotlib.backend_bases import FigureCanvasBase

    if os.path.isdir(path):     # not "<dir>.png" beside it
        return path, "is a directory"
    root, ext = os.path.splitext(path)
    if not ext:
        path += ".png"
    formats = FigureCanvasBase.get_supported_filetypes()
    if ext and ext[1:].lower() not in formats:
        return path, (f"{ext} is not an image format matplotlib writes "
                      f"(one of {', '.join('.' + f for f in sorted(formats))})")
    return path, output_file_problem(path)


def output_file_problem(path):
    """Why a file cannot be written at ``path`` (a phrase to follow the
    option and the path), or None; checked before the work whose result it
    will hold, by making a file beside it (removed at once)."""
    full = os.path.abspath(path)
    parent = os.path.dirname(full)
    if os.path.isdir(full):
        return "is a directory"
    if not os.path.isdir(parent):
        return f"its directory {parent} does not exist"
    if os.path.exists(full) and not os.access(full, os.W_OK):
        return "is not writable"
    problem = _probe_write(parent)
    return None if problem is None else f"cannot be written: {problem}"


def output_dir_problem(path, files=()):
    """Why ``path`` cannot be used as an output directory holding ``files``
    (a phrase to follow ``--out PATH:``), or None. Checked before a long job
    starts, so that it does not run for minutes and then fail on writing its
    results. Checked by doing it: the directory is made (with its missing
    parents, as the results will need it; runs started together may make
    it at once) and a file written in it and removed (permission bits say
    yes to root, and on /proc or /sys, where the write then fails)."""
    _made.clear()
    if not os.fspath(path):
        return "is empty (--out . is the current directory)"
    full = os.path.abspath(path)
    if os.path.lexists(full) and not os.path.isdir(full):
        return "exists and is not a directory"
    for name in files:
        if os.path.isdir(os.path.join(full, name)):
            return f"{name} in it is a directory"
    missing = []            # the folders to make, deepest first
    folder = full
    while not os.path.lexists(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        return f"cannot be created: {folder} is not a directory"
    try:
        os.makedirs(full, exist_ok=True)
    except OSError as exc:       # the parents it made before it failed are ours too
        _made.extend(d for d in reversed(missing) if os.path.isdir(d))
        return f"cannot be created: {_reason(exc)}"
    _made.extend(reversed(missing))
    problem = _probe_write(full)
    return None if problem is None else f"is not writable: {problem}"


#: folders output_dir_problem made (parents first): removed again, when
#: still empty, by remove_unused_output_dirs
_made = []


def remove_unused_output_dirs():
    """A run that stops on a bad argument after its --out was checked (and
    made) takes the folders back that it made and left empty."""
    while _made:
        with contextlib.suppress(OSError):      # not empty (another run's), or gone
            os.rmdir(_made.pop())


def _probe_write(folder):
    """Why a file cannot be written in ``folder`` (an existing directory),
    or None: one is made and removed."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".fastopt-probe-")
    except OSError as exc:
        return _reason(exc)
    os.close(fd)
    with contextlib.suppress(OSError):
        os.remove(probe)
    return None


def _reason(exc):
    return exc.strerror or str(exc)
