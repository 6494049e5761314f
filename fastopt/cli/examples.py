"""``fastopt examples NAME``: run one of the optimization lessons and draw its picture.

    fastopt examples gd-paths -o gd.png
    fastopt examples lr-sweep --small --no-plot

The lessons live in :mod:`fastopt.examples` (installed with the package);
each prints the facts it claims. ``fastopt examples list`` names them.
"""

from __future__ import annotations

from .common import user_path

HELP = ("run an optimization lesson (backprop, gd-paths, lr-sweep, adam, schedules, saddle, "
        "optimizer-zoo, sam) to a PNG")


def add_arguments(parser):
    from fastopt.examples import EXAMPLES

    parser.add_argument("name", choices=[*EXAMPLES, "list"], metavar="NAME", nargs="?",
                        default=None,
                        help=f"one of {', '.join(EXAMPLES)}, or 'list' (the default: "
                             "what each one shows)")
    parser.add_argument("-o", "--output", default=None, type=user_path,
                        help="image file (default NAME.png in the current directory)")
    parser.add_argument("--small", action="store_true",
                        help="the seconds-long configuration the tests use")
    parser.add_argument("--no-plot", action="store_true", help="print the facts only")
    parser.add_argument("--data-dir", default=None, type=user_path,
                        help="lr-sweep: directory with the MNIST t10k IDX files (default: "
                             "$FASTOPT_DATA; in a development checkout, its data folder)")


def run(args):
    import sys

    from fastopt import examples

    if args.name is None:
        if args.output or args.small or args.no_plot:
            print("fastopt examples: -o, --small and --no-plot need a NAME "
                  "(fastopt examples list names them)", file=sys.stderr)
            return 2
        args.name = "list"
    if args.name == "list":
        width = max(map(len, examples.EXAMPLES))
        for name in examples.EXAMPLES:
            print(f"{name:<{width}}  {examples.summary(name)}")
        return 0
    output = None if args.no_plot else (args.output or f"{args.name}.png")
    if output is not None:
        try:
            from fastopt.examples._plot import pyplot
            pyplot()
        except ImportError as exc:
            print(f"fastopt examples: {exc} (--no-plot)", file=sys.stderr)
            return 1
        from .common import image_path
        given = output
        output, problem = image_path(given)
        if problem:     # before the lesson runs, not after
            print(f"fastopt examples: -o {given}: {problem}", file=sys.stderr)
            return 2
    kwargs = {"data_dir": args.data_dir} if args.name == "lr-sweep" else {}
    module = examples._module(args.name)
    try:
        module.run(output=output, small=args.small, **kwargs)
    except FileNotFoundError as exc:
        print(f"fastopt examples {args.name}: {exc}", file=sys.stderr)
        return 2
    return 0
