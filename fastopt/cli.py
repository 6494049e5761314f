"""``fastopt`` command line: ``fastopt bench``, ``fastopt info``."""

from __future__ import annotations

import argparse
import os
import sys


def _progress(i, total, label):
    width = 24
    done = int(width * i / total)
    sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {i}/{total} {label:<28}")
    if i == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def cmd_bench(args):
    from . import bench

    report = bench.run(full=args.full, progress=_progress)
    _progress(1, 1, "done")
    print(bench.format_table(report))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench.json")
    bench.save(report, path)
    print(f"results: {path}")
    return 0


def cmd_info(args):
    import fastopt

    print(f"fastopt {fastopt.__version__}")
    for name, info in fastopt.backend_info().items():
        print(f"  {name:<7} {info}")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="fastopt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="benchmark the optimizer step against NumPy, "
                       "PyTorch and the memory roofline")
    b.add_argument("--full", action="store_true", help="more sizes and rounds")
    b.add_argument("--out", default="bench-results", help="folder for bench.json")
    b.set_defaults(func=cmd_bench)
    i = sub.add_parser("info", help="backends and threading")
    i.set_defaults(func=cmd_info)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
