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
stamp wraps whichever locator Numba would have used. Where none of them
can write (a read-only install and a read-only HOME, as in a container run
as another user, with no ``NUMBA_CACHE_DIR``), the cache goes to this
user's own directory under the temporary directory instead of Numba's
"no locator available" error at import.

Each module with ``cache=True`` kernels calls :func:`install` before it
defines them (a locator is picked when a kernel is decorated). Set
``NUMBA_CACHE_LOCATOR_CLASSES`` and Numba's own choice wins.
"""

from __future__ import annotations

import atexit
import getpass
import os
import shutil
import stat
import tempfile

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
            # nowhere Numba would write (a read-only install and HOME, as
            # in a container run as another user): Numba raised "no
            # locator available" at import, and every entry point died
            inner = fallback.from_function(py_func, py_file) if fallback else None
            return None if inner is None else cls(inner)

    fallback = _temp_locator(caching)
    return FastoptSourcesLocator


def temp_cache_root() -> str:
    """The cache directory of last resort: this user's own under the
    temporary directory."""
    if hasattr(os, "getuid"):
        uid = os.getuid()
    else:                   # (Windows: the user's own temporary directory anyway)
        try:
            uid = getpass.getuser()
        except Exception:       # noqa: BLE001 - no name to be had: one folder
            uid = "user"
    return os.path.join(tempfile.gettempdir(), f"fastopt-numba-cache-{uid}")


_root = None


def _cache_root():
    """:func:`temp_cache_root` where it is private; else a directory of
    this process's own (``mkdtemp``: private, removed at exit, so the
    kernels compile anew in each process); None where the temporary
    directory cannot be written either."""
    global _root
    if _root is None or not os.path.isdir(_root):
        _root = temp_cache_root()
        if not _private_dir(_root):
            try:
                _root = tempfile.mkdtemp(prefix="fastopt-numba-cache-")
            except OSError:
                _root = None
                return None
            atexit.register(_remove_own, _root, os.getpid())
    return _root


def _remove_own(path, pid) -> None:
    """Remove this process's own cache directory at exit (not a forked
    child's exit: the directory is its parent's)."""
    if os.getpid() == pid:
        shutil.rmtree(path, ignore_errors=True)


def _private_dir(path) -> bool:
    """``path`` made (or found) as a directory only this user can write:
    cached machine code is loaded and run, so a directory in a shared
    /tmp that another user could write to is not used."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError:
        return False
    owner = os.getuid() if hasattr(os, "getuid") else st.st_uid
    return stat.S_ISDIR(st.st_mode) and st.st_uid == owner and not st.st_mode & 0o022


def _temp_locator(caching):
    """A locator under :func:`temp_cache_root`, for where no other one can
    write; None where ``caching`` has no user-directory locator to build on."""
    base = (getattr(caching, "UserProvidedCacheLocator", None)      # (numba-cuda: private)
            or getattr(caching, "_UserProvidedCacheLocator", None))
    if base is None or not hasattr(base, "get_suitable_cache_subpath"):
        return None

    class FastoptTempCacheLocator(base):
        def __init__(self, py_func, py_file):
            self._py_file = py_file
            self._lineno = py_func.__code__.co_firstlineno
            self._cache_path = os.path.join(_cache_root(),
                                            self.get_suitable_cache_subpath(py_file))

        @classmethod
        def from_function(cls, py_func, py_file):
            if _cache_root() is None:
                return None
            return super(base, cls).from_function(py_func, py_file)

    return FastoptTempCacheLocator


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
