"""Numba's disk cache for fastopt's kernels, fresh across the files a kernel
inlines.

Numba stamps a cached kernel with its own source file's modification time
and size, nothing else (a documented limit): a kernel in
``backends/numba_cpu.py`` that inlines ``backends/compact_jit.py`` or
``backends/elements.py`` keeps loading its old machine code after an edit to
those files alone, with no error (a ``git pull`` that changes only them,
say). For fastopt's own files the stamp here also covers every ``.py`` file
of the packages that hold kernel code (``fastopt/backends`` and
``fastopt/nn``): an edit to any of them recompiles each fastopt kernel
once. Where the cache lives is Numba's choice as before
(``NUMBA_CACHE_DIR``, beside the sources, or the user-wide directory): the
stamp wraps whichever locator Numba would have used.

Each module with ``cache=True`` kernels calls :func:`install` before it
defines them (a locator is picked when a kernel is decorated). Set
``NUMBA_CACHE_LOCATOR_CLASSES`` and Numba's own choice wins.
"""

from __future__ import annotations

import os

from ._held import hold_numba_compiles

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
#: the packages whose .py files the stamp covers (kernels and what they inline)
KERNEL_DIRS = tuple(os.path.join(_PACKAGE, d) for d in ("backends", "nn"))

_stamp = None


def sources_stamp(dirs=KERNEL_DIRS) -> tuple:
    """``(path, mtime_ns, size)`` of every ``.py`` file under ``dirs``,
    sorted: any edit, added or removed file changes it."""
    found = []
    for top in dirs:
        for root, subdirs, files in os.walk(top):
            subdirs[:] = sorted(d for d in subdirs if d != "__pycache__")
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(root, name)
                    st = os.stat(path)
                    found.append((os.path.relpath(path, _PACKAGE), st.st_mtime_ns, st.st_size))
    return tuple(sorted(found))


def _current_stamp():
    global _stamp
    if _stamp is None:          # once per process: the files do not change under it
        _stamp = sources_stamp()
    return _stamp


def _is_fastopt_source(py_file) -> bool:
    return os.path.abspath(py_file).startswith(_PACKAGE + os.sep)


def _stamped_locator(caching):
    """The locator class for one caching module (Numba's, or numba-cuda's
    own copy of it)."""

    class FastoptSourcesLocator:
        """Numba's locator for a fastopt kernel, its stamp widened to the
        kernel packages' sources (see the module doc)."""

        def __init__(self, inner):
            self.inner = inner

        def ensure_cache_path(self):
            return self.inner.ensure_cache_path()

        def get_cache_path(self):
            return self.inner.get_cache_path()

        def get_disambiguator(self):
            return self.inner.get_disambiguator()

        def get_source_stamp(self):
            return (self.inner.get_source_stamp(), _current_stamp())

        @classmethod
        def from_function(cls, py_func, py_file):
            if not _is_fastopt_source(py_file):
                return None
            for other in caching.CacheImpl._locator_classes:
                if other is not cls:
                    inner = other.from_function(py_func, py_file)
                    if inner is not None:
                        return cls(inner)
            return None

    return FastoptSourcesLocator


def install(caching=None) -> None:
    """Put the widened stamp first in ``caching``'s locator list (Numba's
    ``numba.core.caching`` by default; numba-cuda has its own module). Once
    per module; a no-op where that module has no such list. Also holds a
    Ctrl-C until a compile or cache load of a fastopt kernel ends
    (:mod:`fastopt._held`)."""
    hold_numba_compiles()
    if caching is None:
        from numba.core import caching
    classes = getattr(getattr(caching, "CacheImpl", None), "_locator_classes", None)
    if not isinstance(classes, list):
        return
    if any(getattr(c, "__name__", "") == "FastoptSourcesLocator" for c in classes):
        return
    classes.insert(0, _stamped_locator(caching))


def install_cuda() -> None:
    """:func:`install` for numba-cuda's kernels (its own caching module)."""
    try:
        from numba.cuda.core import caching
    except ImportError:         # an older numba-cuda: Numba's module serves it
        return install()
    install(caching)
