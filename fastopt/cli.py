"""``fastopt`` command line.

Each subcommand lives in its own module, which exposes ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. The module is imported only
when its command runs, so ``fastopt info`` does not pay for matplotlib or torch.

Exit codes: 0 success, 1 a failed check or run, 2 bad arguments or unusable paths
(one line on stderr, before any work starts), 130 interrupted (Ctrl-C; ``train``
and ``bench`` first write what finished).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

EXIT_INTERRUPTED = 130   # 128 + SIGINT, what a shell reports for a Ctrl-C'd job

# command name -> module implementing it (see the module docstring for the protocol)
COMMANDS = {
    "bench": "fastopt._cmd_bench",
    "check-perf": "fastopt._cmd_check_perf",
    "examples": "fastopt._cmd_examples",
    "info": "fastopt._cmd_info",
    "plot-schedule": "fastopt._cmd_plot_schedule",
    "train": "fastopt._cmd_train",
}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="fastopt", description="fastopt: fused optimizer steps for NumPy code")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module_name in COMMANDS.items():
        # Command modules keep heavy imports inside run(), so this is cheap.
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        # a Ctrl-C the command did not handle itself (e.g. during imports):
        # one line instead of a traceback through whichever library was running
        print(f"fastopt {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


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


if __name__ == "__main__":
    sys.exit(main())
