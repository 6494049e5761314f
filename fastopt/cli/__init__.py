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
    commands = {}
    for name, module in COMMANDS.items():
        p = commands[name] = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # said by the subcommand, with its --help and the flag meant: the
        # top-level parser named `fastopt --help`, which lists no flags
        _refuse_unknown(commands[args.command], unknown)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        # a Ctrl-C the command did not handle itself (e.g. during imports):
        # one line instead of a traceback through whichever library was running
        print(f"fastopt {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _refuse_unknown(parser, unknown):
    import difflib
    flags = [o for action in parser._actions for o in action.option_strings]
    first = next((u.split("=", 1)[0] for u in unknown if u.startswith("-")), None)
    if first in flags:      # `fastopt --json info`: the subcommand's own flag, before it
        hint = f"; {first} is the subcommand's: put it after {parser.prog.split()[-1]}"
    else:
        close = difflib.get_close_matches(first, flags, n=1) if first else []
        hint = f"; did you mean {close[0]}?" if close else ""
    parser.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
