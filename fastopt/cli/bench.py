"""``fastopt bench``: the optimizer step against NumPy, PyTorch and the roofline.

``--out`` is checked before anything is measured (exit 2 if it cannot be a
directory). Ctrl-C stops at once: the cases that finished are written to
``bench.json`` (``"interrupted": true``) and ``bench.png``, one line is
printed, and the exit code is 130.
"""

import os
import sys
import time

HELP = "benchmark the optimizer step against NumPy, PyTorch and the memory roofline"


def add_arguments(parser):
    level = parser.add_mutually_exclusive_group()
    level.add_argument("--full", action="store_true",
                       help="more sizes (up to 64M), float64, more rounds (a few minutes)")
    level.add_argument("--quick", action="store_true",
                       help="two small cases, to check an install (seconds)")
    level.add_argument("--optimizers", metavar="NAMES", type=_optimizers,
                       help="instead of the standard matrix, each named optimizer on one 16M "
                            "array (vs the roofline) and a list of 1000 x 1k arrays (vs "
                            "torch's fastest path): comma-separated kinds of "
                            "fastopt.bench.KIND (adamw, sgd, rmsprop, lion, ...), 'family' "
                            "(all but adamw and sgd) or 'all'")
    parser.add_argument("--out", default="bench-results",
                        help="folder for bench.json and bench.png (default: %(default)s)")
    parser.add_argument("--no-cold-start", action="store_true",
                        help="skip the new-process compile/cache timing")
    parser.add_argument("--no-loop", action="store_true",
                        help="skip the step timed inside a NumPy MLP training loop")


def _optimizers(text):
    import argparse

    from .. import bench
    try:
        return bench.parse_optimizers(text)
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
    from .. import bench
    from .common import EXIT_INTERRUPTED, output_dir_problem

    # before minutes of measuring, not after them
    problem = output_dir_problem(args.out, ("bench.json", "bench.png"))
    if problem:
        print(f"fastopt bench: --out {args.out}: {problem}", file=sys.stderr)
        return 2
    rows = bench.plan(args.full, optimizers=args.optimizers)
    if args.quick:
        rows = [r for r in rows if r[2][0][0] <= 1 << 15 and len(r[2]) == 1]
    # the cold start and the training loop are AdamW's: not part of --optimizers
    report, interrupted = _measure(bench, rows, args.full,
                                   cold=not (args.quick or args.no_cold_start
                                             or args.optimizers),
                                   progress=ProgressBar())
    if report is None:
        print("fastopt bench: interrupted before any case finished; nothing written",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    if interrupted:
        paths = _write(bench, report, args.out)
        print(f"fastopt bench: interrupted; {_cases(report)} of {len(rows)} cases finished, "
              f"results of those in {', '.join(paths)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(bench.format_table(report))
    if not (args.quick or args.no_loop or args.optimizers):
        # the step where users call it: after the BLAS forward/backward pass
        try:
            report["in_loop"] = bench.in_loop_case()
        except KeyboardInterrupt:
            report["interrupted"] = True
            paths = _write(bench, report, args.out)
            print(f"fastopt bench: interrupted in the training-loop case; results of the "
                  f"matrix in {', '.join(paths)}", file=sys.stderr)
            return EXIT_INTERRUPTED
        print()
        print(bench.format_in_loop(report["in_loop"]))
    paths = _write(bench, report, args.out)
    print(f"results: {paths[0]}")
    if len(paths) > 1:
        print(f"chart:   {paths[1]}")
    else:
        print("chart:   skipped (matplotlib not installed: pip install matplotlib)")
    return 0


def _measure(bench, rows, full, cold, progress):
    """``bench.run`` one case at a time, so that a Ctrl-C (KeyboardInterrupt,
    at once) keeps the cases that finished; the one being measured is
    dropped, its timings incomplete. Returns ``(report or None, interrupted)``."""
    import numpy as np

    total = len(rows) + (1 if cold else 0)
    report, results = None, []
    since = bench.load_snapshot()
    try:
        for i, row in enumerate(rows):
            progress(i, total, f"{row[0]} {sum(int(np.prod(s)) for s in row[2])}")
            report = bench.run(full=full, rows=[row], cold=False)
            results += report["results"]
            report["results"] = results
            report["load"] = bench.load_since(since)     # over every case so far
        if cold:
            progress(len(rows), total, "cold start")
            cold_starts = bench.run(full=full, rows=[], cold=True)
            report = dict(cold_starts, results=results) if report is None else \
                dict(report, cold_start=cold_starts["cold_start"])
        progress(total, total, "done")
    except KeyboardInterrupt:
        if getattr(progress, "tty", False):   # end the bar's line before the message
            progress.stream.write("\n")
        if report is not None:
            report["interrupted"] = True
        return report, True
    return report, False


def _cases(report):
    return len({(r["case"], r["elements"], r["tensors"], r["dtype"]) for r in report["results"]})


def _write(bench, report, out):
    """bench.json and (with matplotlib) bench.png in ``out``; the paths written."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "bench.json")
    bench.save(report, path)
    chart = os.path.join(out, "bench.png")
    return [path, chart] if bench.plot(report, chart) else [path]
