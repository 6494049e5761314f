"""``fastopt check-perf``: fail when a same-run speed ratio drops below its
committed floor (the CI regression guard; see fastopt/bench/guard.py)."""

import sys

from .common import output_file_problem, positive_int, user_path

HELP = "check same-run speed ratios against the floors shipped with fastopt"

EXIT_OK, EXIT_REGRESSION, EXIT_SETUP, EXIT_MEASURING = 0, 1, 2, 3
EXIT_STATUS = ("exit status: 0 every ratio at or above its floor; 1 a ratio below its "
               "floor on every attempt (a performance regression, and nothing else); 2 a "
               "bad floors file or a setup it cannot measure (nothing measured, every "
               "check skipped included); 3 the measurement itself failed (an error, not a "
               "regression); 130 / 143 interrupted by Ctrl-C / SIGTERM (no verdict; --json "
               "written)")


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
    parser.add_argument("--case", metavar="PATTERN", action="append", default=None,
                        help="check only the cases whose name matches PATTERN (a part "
                             "of it, or a glob such as 'adamw*'); repeat for more "
                             "(default: every case in the floors file)")
    parser.add_argument("--json", metavar="PATH", default=None, type=user_path,
                        help="also write the result as JSON to PATH: every check's "
                             "floor, measured ratios and times, the machine, and the "
                             "exit status with its reason (written whatever the checks' "
                             "outcome)")


def run(args):
    from ..bench import guard as perfguard

    try:
        return _run(args, perfguard)
    except Exception as exc:    # noqa: BLE001 - exit 1 is a regression's, and only that
        import traceback
        traceback.print_exc()
        return _fail(args, EXIT_MEASURING, f"failed: {type(exc).__name__}: {exc}",
                     perfguard.as_json)


def _run(args, perfguard):
    import datetime

    from ..bench.machine import run_entry
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    args.run = run_entry(started, {k: v for k, v in vars(args).items()
                                   if k not in ("func", "command")})
    if args.json is not None:      # before minutes of measuring, not after them
        problem = output_file_problem(args.json)
        if problem:
            print(f"fastopt check-perf: --json {args.json}: {problem}", file=sys.stderr)
            return EXIT_SETUP
    try:
        spec = perfguard.load_floors(args.floors)
        if args.case:
            spec = perfguard.select_cases(spec, args.case)
    except (OSError, ValueError) as exc:      # the message names the file and the entry
        return _fail(args, EXIT_SETUP, str(exc), perfguard.as_json)
    from ..bench import timing
    from .common import TermAsCtrlC
    since = timing.load_snapshot()
    try:
        with TermAsCtrlC() as term:     # --json is written on Ctrl-C and SIGTERM too
            checks = perfguard.run_checks(
                spec, attempts=args.attempts,
                progress=lambda msg: print(f"measuring {msg}", file=sys.stderr, flush=True))
    except KeyboardInterrupt:
        return _fail(args, term.exit_code, "interrupted before the checks ended "
                     f"({'SIGTERM' if term.exit_code == 143 else 'Ctrl-C'}): no verdict",
                     perfguard.as_json)
    except Exception as exc:    # noqa: BLE001 - a failure to measure is no regression (1)
        return _fail(args, EXIT_MEASURING,
                     f"measuring failed: {type(exc).__name__}: {exc}", perfguard.as_json)
    load = timing.load_since(since)
    print(perfguard.report(checks, args.floors))
    if load["other_processes"].get("other_cpu_fraction", 0) >= 0.02:
        # (fastopt bench says so too): a CI job reading a failure needs it
        print(f"WARNING: another process used the CPUs during the checks "
              f"({load['other_processes']['note']}); a threaded step waits for descheduled "
              "threads, so a miss may be the machine's", file=sys.stderr)
    status = EXIT_OK if all(ch.ok for ch in checks) else EXIT_REGRESSION
    error = None
    if checks and all(ch.skipped for ch in checks):
        # a gate that checked nothing (every entry for a build this CPU cannot
        # run) must not read as a pass
        status, error = EXIT_SETUP, ("every check was skipped (" + checks[0].skipped +
                                     "): nothing measured on this machine")
        print(f"fastopt check-perf: {error}", file=sys.stderr)
    if not _write_json(args, perfguard.as_json(checks, args.floors, status, error=error,
                                               load=load, run=args.run)):
        return EXIT_SETUP      # (a traceback exited 1: a regression's code)
    return status


def _fail(args, status, message, as_json):
    print(f"fastopt check-perf: {message}", file=sys.stderr)
    _write_json(args, as_json([], args.floors, status, error=message,
                              run=getattr(args, "run", None)))
    return status


def _write_json(args, result) -> bool:
    """--json's file written (True), or why not said (False)."""
    if args.json is None:
        return True
    import json

    from .._files import write_atomically
    try:
        write_atomically(args.json, (json.dumps(result, indent=1) + "\n").encode())
    except OSError as exc:
        print(f"fastopt check-perf: --json {args.json}: not written: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return False
    print(f"result: {args.json}", file=sys.stderr)
    return True
