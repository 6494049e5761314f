"""Plain gradient descent vs momentum (beta 0.9) with fastopt.SGD on
f(x, y) = x^2 + 10 y^2 from the same start: momentum reaches the minimum in
fewer steps at the same lr, and lr = 0.105 (> 2/20) diverges.

    python examples/gd_paths.py [-o gd-paths.png] [--small] [--no-plot]

Same as ``fastopt examples gd-paths``; the code, with the full lesson in its
docstring, is fastopt/examples/gd_paths.py (installed with the package).
"""

import sys

from fastopt.cli import main

if __name__ == "__main__":
    sys.exit(main(["examples", "gd-paths", *sys.argv[1:]]))
