"""warmup+cosine, step decay and one-cycle from fastopt.schedules, drawn as the
lr a real fastopt.SGD used at each step.

    python examples/schedule_gallery.py [-o schedules.png] [--small] [--no-plot]

Same as ``fastopt examples schedules``; the code, with the full lesson in its
docstring, is fastopt/examples/schedule_gallery.py (installed with the package).
"""

import sys

from fastopt.cli import main

if __name__ == "__main__":
    sys.exit(main(["examples", "schedules", *sys.argv[1:]]))
