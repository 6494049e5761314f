"""``fastopt check-perf``: fail when a same-run speed ratio drops below its
committed floor (the CI regression guard; see fastopt/bench/guard.py)."""

import sys

from .common import positive_int, user_path

HELP = "check same-run speed ratios against the floors shipped with fastopt"


EXIT_STATUS = ("exit status: 0 every ratio at or above its floor; 1 a ratio below its "
               "floor on every attempt (a performance regression); 2 a bad floors file "
               "or a setup it cannot measure (nothing measured); 3 the measurement "
               "itself failed (an error, not a regression)")


def add_arguments(parser):
    parser.epilog = EXIT_STATUS
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
    try:
        checks = perfguard.run_checks(
            spec, attempts=args.attempts,
            progress=lambda msg: print(f"measuring {msg}", file=sys.stderr, flush=True))
    except Exception as exc:    # noqa: BLE001 - a failure to measure is no regression (1)
        print(f"fastopt check-perf: measuring failed: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return 3
    print(perfguard.report(checks, args.floors))
    return 0 if all(ch.ok for ch in checks) else 1
