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


def say(verbose, *lines):
    if verbose:
        for line in lines:
            print(line)
