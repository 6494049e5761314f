"""What the commands share: exit codes and argument checks."""

from __future__ import annotations

import argparse
import os

EXIT_INTERRUPTED = 130   # 128 + SIGINT, what a shell reports for a Ctrl-C'd job


def positive_int(text):
    """argparse type: an integer >= 1 (a clear usage error instead of a
    traceback from deep inside the run)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def output_dir_problem(path, files=()):
    """Why ``path`` cannot be used as an output directory holding ``files``
    (a phrase to follow ``--out PATH:``), or None. Checked before a long job
    starts, so that it does not run for minutes and then fail on writing its
    results. Creates nothing."""
    full = os.path.abspath(path)
    if os.path.lexists(full):
        if not os.path.isdir(full):
            return "exists and is not a directory"
        if not os.access(full, os.W_OK | os.X_OK):
            return "is not writable"
        for name in files:
            if os.path.isdir(os.path.join(full, name)):
                return f"{name} in it is a directory"
        return None
    parent = os.path.dirname(full)
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"cannot be created: {parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot be created: {parent} is not writable"
    return None
