"""Adam at lr = 1e-1 .. 1e-5 on MNIST as one batched fastopt.nn.Ensemble run;
lr = 1e-1 blows up, the smallest rates crawl (measured verdicts).
Needs the MNIST test set (--data-dir or $FASTOPT_DATA).

    python examples/lr_sweep.py [-o lr-sweep.png] [--small] [--no-plot]

Same as ``fastopt examples lr-sweep``; the code, with the full lesson in its
docstring, is fastopt/examples/lr_sweep.py (installed with the package).
"""

import sys

from fastopt.cli import main

if __name__ == "__main__":
    sys.exit(main(["examples", "lr-sweep", *sys.argv[1:]]))
