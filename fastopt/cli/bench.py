"""``fastopt bench``: the optimizer step against NumPy, PyTorch and the roofline.

``--out`` is checked before anything is measured (exit 2 if it cannot be a
directory). Ctrl-C stops at once: the cases that finished are written to
``bench.json`` (``"interrupted": true``) and ``bench.png``, one line is
printed, and the exit code is 130. SIGTERM (a batch scheduler's stop) does
the same with exit code 143.
"""

import sys
import time

from .common import user_path

HELP = "benchmark the optimizer step against NumPy, PyTorch and the memory roofline"


def add_arguments(parser):
    level = parser.add_mutually_exclusive_group()
    level.add_argument("--full", action="store_true",
                       help="more sizes (up to 64M), float64, more rounds (a few minutes)")
    level.add_argument("--quick", action="store_true",
                       help="three small cases, to check an install (seconds)")
    level.add_argument("--optimizers", metavar="NAMES", type=_optimizers,
                       help="instead of the standard matrix, each named optimizer on one 16M "
                            "array (vs the roofline) and a list of 1000 x 1k arrays (vs "
                            "torch's fastest path): comma-separated kinds of "
                            "fastopt.bench.cases.KIND (adamw, sgd, rmsprop, lion, ...), "
                            "'family' (all but adamw and sgd) or 'all'")
    parser.add_argument("--out", default="bench-results", type=user_path,
                        help="folder for bench.json and bench.png (default: %(default)s)")
    parser.add_argument("--no-cold-start", action="store_true",
                        help="skip the new-process compile/cache timing")
    parser.add_argument("--no-loop", action="store_true",
                        help="skip the step timed inside a NumPy MLP training loop")


def _optimizers(text):
    import argparse

    from ..bench import cases
    try:
        return cases.parse_optimizers(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class ProgressBar:
    """A one-line progress bar on stderr with elapsed time; quiet when stderr
    is not a terminal except for one line per case (readable in CI logs)."""

    def __init__(self, stream=None, width=24):
        # sys.stderr when called, not when this module was imported (a test
        # harness or a caller may have swapped it since)
        self.stream = sys.stderr if stream is None else stream
        self.width, self.t0 = width, time.perf_counter()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def __call__(self, i, total, label):
        done = int(self.width * i / total)
        line = (f"[{'#' * done}{'.' * (self.width - done)}] {i}/{total} "
                f"{time.perf_counter() - self.t0:5.0f}s {label}")
        if self.tty:
            self.stream.write(f"\r{line:<78}" + ("\n" if i == total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def run(args):
    from .common import TermAsCtrlC
    with TermAsCtrlC() as term:    # SIGTERM writes what finished too, exit 143
        try:
            return _run(args, term)
        except KeyboardInterrupt:     # outside the measuring and the writing: nothing to keep
            print("fastopt bench: interrupted before any case finished; nothing written",
                  file=sys.stderr)
            return term.exit_code


def _run(args, term):
    from .common import output_dir_problem
    from .out_lock import OutLock

    # before minutes of measuring, not after them
    problem = output_dir_problem(args.out, ("bench.json", "bench.png"))
    lock = None
    if not problem:
        lock = OutLock(args.out, "bench")
        problem = lock.acquire()
    if problem:
        from .common import remove_unused_output_dirs
        remove_unused_output_dirs()     # parents made before the folder failed
        print(f"fastopt bench: --out {args.out or repr('')}: {problem}", file=sys.stderr)
        return 2
    try:
        return _measure_and_write(args, term)
    finally:
        lock.release()


def _measure_and_write(args, term):
    """bench's measuring and writing, --out checked and held."""
    import datetime

    from ..bench import cases, in_loop, matrix, report
    from ..bench.machine import run_entry

    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    # before measuring (two git calls): a stop after it then finds nothing left to do
    run = run_entry(started, {k: v for k, v in vars(args).items()
                              if k not in ("func", "command")})
    rows = cases.plan(args.full, optimizers=args.optimizers, quick=args.quick)
    progress = ProgressBar()
    # the cold start and the training loop are AdamW's: not part of --optimizers
    measured = matrix.run(args.full, progress, rows,
                          cold=not (args.quick or args.no_cold_start or args.optimizers),
                          interruptible=True)
    if measured is not None:     # when, with what, from which commit: a dashboard's axes
        measured["run"] = run
    if measured is None or measured.get("interrupted"):
        if progress.tty:          # end the bar's line before the message
            progress.stream.write("\n")
        if measured is None:
            print("fastopt bench: interrupted before any case finished; nothing written",
                  file=sys.stderr)
            return term.exit_code
        paths = report.write(measured, args.out)
        print(report.format_table(measured))      # what finished, as a full run shows it
        print(f"fastopt bench: interrupted; {_cases(measured)} of {len(rows)} cases finished, "
              f"results of those in {', '.join(paths)}", file=sys.stderr)
        return term.exit_code
    print(report.format_table(measured))
    if not (args.quick or args.no_loop or args.optimizers):
        # the step where users call it: after the BLAS forward/backward pass
        try:
            measured["in_loop"] = in_loop.in_loop_case()
        except KeyboardInterrupt:
            measured["interrupted"] = True
            paths = report.write(measured, args.out)
            print(f"fastopt bench: interrupted in the training-loop case; results of the "
                  f"matrix in {', '.join(paths)}", file=sys.stderr)
            return term.exit_code
        print()
        print(report.format_in_loop(measured["in_loop"]))
    measured["interrupted"] = False      # the key is always there, as in train's metrics
    written = []
    try:
        report.write(measured, args.out, written)
    except KeyboardInterrupt:
        print("fastopt bench: interrupted while writing the results; "
              + (f"wrote {', '.join(written)}" if written else "nothing written"),
              file=sys.stderr)
        return term.exit_code
    print(f"results: {written[0]}")
    if len(written) > 1:
        print(f"chart:   {written[1]}")
    else:
        print("chart:   none (matplotlib not installed: pip install matplotlib; an earlier "
              "bench.png in --out was removed)")
    return 0


def _cases(measured):
    return len({(r["case"], r["elements"], r["tensors"], r["dtype"])
                for r in measured["results"]})
