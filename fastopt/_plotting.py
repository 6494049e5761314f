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
