"""matplotlib for the examples: the Agg backend, and a clear error without it."""

from __future__ import annotations


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only, no display)."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("the examples draw with matplotlib, which is not installed: "
                          "pip install matplotlib (or pip install 'fastopt[train]'), "
                          "or run without a picture") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
