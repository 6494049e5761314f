"""``fastopt check-perf``: fail when a same-run speed ratio drops below its
committed floor (the CI regression guard; see fastopt/bench/guard.py)."""

import sys

from .common import positive_int, user_path

HELP = "check same-run speed ratios against the floors shipped with fastopt"


def add_arguments(parser):
    # default None: the guard reads the floors shipped inside the package
    # (importlib.resources), so the command works from any directory
    parser.add_argument("--floors", default=None, type=user_path,
                        help="floors file (default: the one shipped with fastopt, "
                             "fastopt/bench/floors.json)")
    parser.add_argument("--attempts", type=positive_int, default=None,
                        help="measurements before a ratio below its floor fails "
                             "(default: the file's, else 3)")


def run(args):
    from ..bench import guard as perfguard

    try:
        spec = perfguard.load_floors(args.floors)
    except (OSError, ValueError) as exc:      # the message names the file and the entry
        print(f"fastopt check-perf: {exc}", file=sys.stderr)
        return 2
    checks = perfguard.run_checks(
        spec, attempts=args.attempts,
        progress=lambda msg: print(f"measuring {msg}", file=sys.stderr, flush=True))
    print(perfguard.report(checks, args.floors))
    return 0 if all(ch.ok for ch in checks) else 1
