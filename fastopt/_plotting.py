"""matplotlib for fastopt's pictures (bench chart, schedules, training
curves, examples): files only, drawn by the Agg renderer on figures pyplot
never sees, and imported only when a picture is drawn, so the core install
works without it."""

from __future__ import annotations


class FilesOnly:
    """pyplot's ``subplots``, all fastopt's pictures use, on plain
    :class:`matplotlib.figure.Figure` objects with an Agg canvas: nothing
    global changes (``matplotlib.use("Agg")`` switched a notebook that ran
    an example to files only: its own plots no longer showed), and pyplot
    keeps no reference (nothing to close: a figure goes with its last
    reference)."""

    @staticmethod
    def subplots(nrows=1, ncols=1, *, figsize=None, **kw):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=figsize)
        FigureCanvasAgg(fig)
        return fig, fig.subplots(nrows, ncols, **kw)


def agg_pyplot():
    """:class:`FilesOnly` (pyplot's ``subplots`` for figures written to
    files), or None if matplotlib is not installed (callers say
    what to install)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return None
    return FilesOnly


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
