"""``fastopt`` command line.

Each subcommand is a module of this package with ``HELP`` (one line),
``add_arguments(parser)`` beside its ``run(args) -> int``. The modules keep
their heavy imports inside ``run``, so ``fastopt info`` does not pay for
matplotlib or torch.

Exit codes: 0 success, 1 a failed check or run, 2 bad arguments or unusable paths
(one line on stderr, before any work starts), 130 interrupted (Ctrl-C; ``train``
and ``bench`` first write what finished).
"""

from __future__ import annotations

import sys

from . import bench, check_perf, examples, info, plot_schedule, train
from .._arguments import Parser
from .common import EXIT_INTERRUPTED, output_dir_problem, positive_int  # noqa: F401 (API)

#: command name -> the module implementing it
COMMANDS = {
    "bench": bench,
    "check-perf": check_perf,
    "examples": examples,
    "info": info,
    "plot-schedule": plot_schedule,
    "train": train,
}


def main(argv=None):
    from .. import __version__
    parser = Parser(prog="fastopt", description="fastopt: fused optimizer steps for NumPy code")
    parser.add_argument("--version", action="version", version=f"fastopt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
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

