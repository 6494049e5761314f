"""Dataset readers. Nothing is downloaded, ever: point them at files you have.

``load_mnist(path=None, split="t10k")``, ``mnist_split(path=None, n_train=8000,
seed=0)`` and ``read_idx(path)``; see :mod:`fastopt.data.mnist` for where
the files are looked for (``path``, then ``$FASTOPT_DATA``, then, in a
development checkout, the project's data folder).
"""

from .mnist import find_mnist, load_mnist, mnist_split, read_idx

__all__ = ["find_mnist", "load_mnist", "mnist_split", "read_idx"]
