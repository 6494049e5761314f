"""matplotlib for fastopt's pictures (bench chart, schedules, training
curves, examples): files only, on the Agg backend, and imported only when a
picture is drawn, so the core install works without it."""

from __future__ import annotations


def agg_pyplot():
    """``matplotlib.pyplot`` on the Agg backend, or None if matplotlib is
    not installed (callers say what to install)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, **savefig_kw):
    """``fig.savefig(path)`` whole or not at all: drawn in memory, then
    written beside ``path`` and renamed over it (a Ctrl-C, a full disk or
    a reader such as a dashboard polling the file never sees half a
    picture); the format from ``path``'s extension, PNG without one."""
    import io
    import os

    from ._files import write_atomically

    ext = os.path.splitext(path)[1][1:].lower()
    buf = io.BytesIO()
    fig.savefig(buf, format=savefig_kw.pop("format", None) or ext or "png", **savefig_kw)
    write_atomically(path, buf.getvalue())
