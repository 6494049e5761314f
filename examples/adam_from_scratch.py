"""Adam in ten lines of NumPy vs SGD on an ill-conditioned quadratic:
fastopt.Adam takes the same iterates (to float rounding) and Adam reaches
the tolerance in far fewer steps than SGD's best constant lr.

    python examples/adam_from_scratch.py [-o adam.png] [--small] [--no-plot]

Same as ``fastopt examples adam``; the code, with the full lesson in its
docstring, is fastopt/examples/adam_from_scratch.py (installed with the package).
"""

import sys

from fastopt.cli import main

if __name__ == "__main__":
    sys.exit(main(["examples", "adam", *sys.argv[1:]]))
