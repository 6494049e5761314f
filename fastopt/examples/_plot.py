"""matplotlib for the examples: files only (nothing global changed), and a clear
error without it."""

from __future__ import annotations

import numpy as np

from .._files import write_atomically
from .._plotting import agg_pyplot, save_figure


def pyplot():
    """pyplot's ``subplots`` for pictures written to files
    (:class:`fastopt._plotting.FilesOnly`)."""
    plt = agg_pyplot()
    if plt is None:
        raise ImportError("the examples draw with matplotlib, which is not installed: "
                          "pip install matplotlib (or pip install 'fastopt[train]'), "
                          "or run without a picture")
    return plt


def save(fig, path, dpi=80):
    """Write ``fig`` to ``path`` (whole or not at all) and clear it."""
    try:
        save_figure(fig, path, dpi=dpi)
    finally:
        fig.clf()


def save_palette(fig, path, dpi=80, colors=128):
    """:func:`save`, then rewrite the PNG with a palette of ``colors`` colours: a
    busy picture (many antialiased paths) shrinks ~3x and looks the same.
    Needs Pillow (a dependency of matplotlib)."""
    import io

    from PIL import Image

    drawn, small_png = io.BytesIO(), io.BytesIO()
    try:
        fig.savefig(drawn, format="png", dpi=dpi)
    finally:
        fig.clf()
    with Image.open(drawn) as im:
        small = im.convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT,
                                           dither=Image.Dither.NONE)
    small.save(small_png, format="PNG", optimize=True)
    write_atomically(path, small_png.getvalue())


def contour_map(ax, f, xlim, ylim, levels, title):
    """A map of ``f(x, y)`` on ``ax``: grey contours at ``levels`` over the
    frame ``xlim`` x ``ylim``, the axes named x and y."""
    xs, ys = np.meshgrid(np.linspace(*xlim, 300), np.linspace(*ylim, 200))
    ax.contour(xs, ys, f(xs, ys), levels=levels, colors="0.75", linewidths=0.6)
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title(title, fontsize=10)


def say(verbose, *lines):
    if verbose:
        for line in lines:
            print(line)


def report(verbose, lines, output, draw):
    """The end of an example's ``run``: print ``lines``, then ``draw(output)``
    and say so when a picture was asked for."""
    say(verbose, *lines)
    if output is not None:
        draw(output)
        say(verbose, f"wrote {output}")
