"""``fastopt plot-schedule``: draw one or more lr schedules to an image.

Each schedule is written as a call of a :mod:`fastopt.schedules`
constructor with literal arguments, or as the JSON of its ``to_dict()``::

    fastopt plot-schedule "warmup_cosine(peak_value=1e-3, warmup_steps=100, total_steps=1000)" \\
        "one_cycle(1e-3, 1000)" --steps 1200 -o lr.png

The text is parsed by :func:`fastopt.schedules.parse_schedule` (names of
schedules and literal values only), never evaluated.
"""

from __future__ import annotations

from .common import image_path, positive_int, user_path

HELP = "draw lr schedules (fastopt.schedules) over steps to a PNG/SVG/PDF"


def add_arguments(parser):
    parser.add_argument("schedules", nargs="+", metavar="SCHEDULE",
                        help='e.g. "cosine_decay(1e-3, 1000, alpha=0.1)" or a JSON spec')
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="steps to draw (default: 1000, or 10%% past where the longest "
                             "schedule settles)")
    parser.add_argument("-o", "--output", default="lr.png", type=user_path,
                        help="image file (default lr.png)")
    parser.add_argument("--log", action="store_true", help="logarithmic lr axis")


def run(args):
    import sys

    from ..schedules import parse_schedule, settles_at

    try:
        scheds = [parse_schedule(t) for t in args.schedules]
    except ValueError as exc:
        print(f"fastopt plot-schedule: {exc}", file=sys.stderr)
        return 2
    from .._plotting import agg_pyplot, save_figure
    plt = agg_pyplot()
    if plt is None:
        print("fastopt plot-schedule needs matplotlib: pip install matplotlib "
              "(or the train extra: pip install 'fastopt[train]')", file=sys.stderr)
        return 1

    output, problem = image_path(args.output)
    if problem:
        print(f"fastopt plot-schedule: -o {args.output}: {problem}", file=sys.stderr)
        return 2
    steps = args.steps or max([1000] * (not any(map(settles_at, scheds)))
                              + [int(settles_at(s) * 1.1) + 1 for s in scheds])
    # at most a few thousand points: a figure has fewer pixels, and a long
    # run of schedule calls (--steps 100000000) would take minutes
    stride = -(-steps // 4000)
    # and each schedule's own breaks (a join's boundaries, step decay's
    # drops), on both sides: a one-step spike or a drop between two samples
    # was drawn missing, or late
    breaks = set()
    for s in scheds:
        _breaks(s.to_dict(), 0, steps, breaks)
    xs = sorted({*range(0, steps, stride), steps - 1, *(b for b in breaks if 0 <= b < steps)})
    try:
        curves = [[s(t) for t in xs] for s in scheds]
    except (ArithmeticError, ValueError) as exc:    # exponential with gamma > 1, overflowing
        print(f"fastopt plot-schedule: a schedule failed within {steps} steps: {exc}",
              file=sys.stderr)
        return 2
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (s, ys) in enumerate(zip(scheds, curves)):
        ax.plot(xs, ys, label=_label(s, args.schedules[i], i),
                marker="o" if len(xs) == 1 else None)      # one step: a point, not nothing
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    if args.log:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, output, dpi=120)
    print(f"wrote {output} ({len(scheds)} schedule(s), {steps} steps)")
    return 0


def _label(schedule, given, i):
    """A legend entry: the schedule's repr, or the text given for it, where
    short; else its kind and place on the command line (two long schedules
    of one kind were both labelled with just the kind)."""
    for text in (repr(schedule), given.strip()):
        if len(text) < 90:
            return text
    return f"{schedule.kind} (schedule {i + 1})"


#: breaks gathered per schedule at most (step decay's drops every few steps)
_MAX_BREAKS = 8000


def _breaks(spec, offset, steps, out):
    """The steps where the schedule of ``spec`` (its to_dict()) jumps, and
    the steps before them, shifted by ``offset``, into ``out``."""
    kind = spec.get("kind")
    if kind == "join":
        bounds = spec["boundaries"]
        for b in bounds:
            out.update((offset + b - 1, offset + b))
        for sub, start in zip(spec["schedules"], [0, *bounds]):
            if offset + start < steps:
                _breaks(sub, offset + start, steps, out)
    elif kind == "step_decay":
        drops = (spec["milestones"] if "milestones" in spec else
                 range(spec["step_size"], max(steps - offset, 0), spec["step_size"]))
        for m in drops[:_MAX_BREAKS]:       # (a range slices lazily)
            out.update((offset + m - 1, offset + m))
    elif kind == "warmup_cosine":
        out.add(offset + spec["warmup_steps"])
