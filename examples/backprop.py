"""dL/dw1, dL/db1, dL/dw2, dL/db2 of y = w2*sigmoid(w1*x + b1) + b2,
L = (y - target)^2, by the chain rule; checked against centred finite
differences and against fastopt.nn.MLP's backward on the same 1-1-1 network.

    python examples/backprop.py [-o backprop.png] [--small] [--no-plot]

Same as ``fastopt examples backprop``; the code, with the full lesson in its
docstring, is fastopt/examples/backprop.py (installed with the package).
"""

import sys

from fastopt.cli import main

if __name__ == "__main__":
    sys.exit(main(["examples", "backprop", *sys.argv[1:]]))
