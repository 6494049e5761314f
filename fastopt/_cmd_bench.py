"""``fastopt bench``: the optimizer step against NumPy, PyTorch and the roofline."""

import os
import sys

HELP = "benchmark the optimizer step against NumPy, PyTorch and the memory roofline"


def add_arguments(parser):
    parser.add_argument("--full", action="store_true", help="more sizes and rounds")
    parser.add_argument("--out", default="bench-results", help="folder for bench.json")


def _progress(i, total, label):
    width = 24
    done = int(width * i / total)
    sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {i}/{total} {label:<28}")
    if i == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def run(args):
    from . import bench

    report = bench.run(full=args.full, progress=_progress)
    _progress(1, 1, "done")
    print(bench.format_table(report))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench.json")
    bench.save(report, path)
    print(f"results: {path}")
    return 0
