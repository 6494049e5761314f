"""The lessons of an optimization primer as runnable examples, each leaving a picture.

=============  ==============================================================
name           lesson
=============  ==============================================================
backprop       dL/dw by hand for a 1-1-1 sigmoid net, checked against finite
               differences and fastopt.nn.MLP's backward
gd-paths       gradient descent vs momentum on x^2 + 10 y^2, and a step
               size that diverges
lr-sweep       five learning rates in one batched Ensemble run on MNIST:
               where training fails and where it crawls
adam           Adam in ten lines of NumPy vs SGD on an ill-conditioned
               quadratic; fastopt.Adam takes the same iterates
schedules      warmup+cosine, step decay and one-cycle, as an optimizer sees them
saddle         plain GD stalls near a saddle's ridge; momentum, gradient noise
               and Adam escape (x^2 - y^2 and the flat x^2 - y^4)
optimizer-zoo  every fastopt optimizer on x^2 + 10 y^2 and on Rosenbrock, each
               at its best lr: paths and losses
sam            SGD settles in a sharp minimum; SAM bounces out of it and rests
               in a flat one of the same depth
=============  ==============================================================

Run one with ``fastopt examples NAME -o picture.png [--small]`` or from
Python::

    from fastopt.examples import run_example
    facts = run_example("gd-paths", output="gd.png")

Each example's ``run(output=None, small=False, verbose=True)`` returns a
dict of the facts it claims (and prints them when ``verbose``); ``output``
is where the PNG goes (``None``: no picture, matplotlib not needed).
``small=True`` is the seconds-long configuration the tests use.
"""

from __future__ import annotations

import importlib

EXAMPLES = {
    "backprop": "fastopt.examples.backprop",
    "gd-paths": "fastopt.examples.gd_paths",
    "lr-sweep": "fastopt.examples.lr_sweep",
    "adam": "fastopt.examples.adam_from_scratch",
    "schedules": "fastopt.examples.schedule_gallery",
    "saddle": "fastopt.examples.saddle",
    "optimizer-zoo": "fastopt.examples.optimizer_zoo",
    "sam": "fastopt.examples.sam_minima",
}

__all__ = ["EXAMPLES", "run_example", "summary"]


def _module(name):
    if name not in EXAMPLES:
        raise ValueError(f"unknown example {name!r}; one of {list(EXAMPLES)}")
    return importlib.import_module(EXAMPLES[name])


def summary(name) -> str:
    """The first line of the example's docstring."""
    return _module(name).__doc__.strip().splitlines()[0]


def run_example(name, output=None, small=False, verbose=True) -> dict:
    """Run example ``name``; returns its facts (see the module docstring)."""
    return _module(name).run(output=output, small=small, verbose=verbose)
