"""matplotlib for the examples: the Agg backend, and a clear error without it."""

from __future__ import annotations

from .._plotting import agg_pyplot


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only, no display)."""
    plt = agg_pyplot()
    if plt is None:
        raise ImportError("the examples draw with matplotlib, which is not installed: "
                          "pip install matplotlib (or pip install 'fastopt[train]'), "
                          "or run without a picture")
    return plt


def save(fig, path, dpi=80):
    """Write ``fig`` to ``path`` and close it."""
    fig.savefig(path, dpi=dpi)
    fig.clf()
    import matplotlib.pyplot as plt
    plt.close(fig)


def save_palette(fig, path, dpi=80, colors=128):
    """:func:`save`, then rewrite the PNG with a palette of ``colors`` colours: a
    busy picture (many antialiased paths) shrinks ~3x and looks the same.
    Needs Pillow (a dependency of matplotlib)."""
    from PIL import Image

    save(fig, path, dpi=dpi)
    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT,
                                           dither=Image.Dither.NONE)
    small.save(path, format="PNG", optimize=True)


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
