"""Command-line parsing shared by ``fastopt ...`` and the ``python -m
fastopt.bench.*`` scripts: a bad argument is one line, said once."""

from __future__ import annotations

import argparse

from ._launcher import launched_rank


class Parser(argparse.ArgumentParser):
    """A bad argument is one line on stderr (argparse prints the whole
    usage block first), naming --help for the rest; under ``mpiexec -n N``
    said once, by rank 0 (every rank parses the same arguments)."""

    def error(self, message):
        self.exit(2, None if launched_rank() else
                  f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def int_at_least(low):
    """argparse type: an integer >= ``low`` (a clear usage error instead of
    a traceback from deep inside the run)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)
