"""``fastopt bench``: the optimizer step against NumPy, PyTorch and the roofline."""

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
    parser.add_argument("--out", default="bench-results",
                        help="folder for bench.json and bench.png (default: %(default)s)")
    parser.add_argument("--no-cold-start", action="store_true",
                        help="skip the new-process compile/cache timing")


class ProgressBar:
    """A one-line progress bar on stderr with elapsed time; quiet when stderr
    is not a terminal except for one line per case (readable in CI logs)."""

    def __init__(self, stream=sys.stderr, width=24):
        self.stream, self.width, self.t0 = stream, width, time.perf_counter()
        self.tty = hasattr(stream, "isatty") and stream.isatty()

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
    from . import bench

    rows = None
    if args.quick:
        rows = [r for r in bench.plan() if r[2][0][0] <= 1 << 15 and len(r[2]) == 1]
    report = bench.run(full=args.full, progress=ProgressBar(), rows=rows,
                       cold=not (args.quick or args.no_cold_start))
    print(bench.format_table(report))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench.json")
    bench.save(report, path)
    print(f"results: {path}")
    chart = os.path.join(args.out, "bench.png")
    if bench.plot(report, chart):
        print(f"chart:   {chart}")
    else:
        print("chart:   skipped (matplotlib not installed: pip install matplotlib)")
    return 0
