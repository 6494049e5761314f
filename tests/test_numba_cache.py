"""fastopt's Numba kernels are cached on disk stamped with every source file
of the kernel packages (fastopt/_numba_cache.py): Numba alone stamps a
kernel with its own file, and a kernel that inlines an edited file would
load stale machine code."""

import os
import time

from numba import njit

import fastopt._numba_cache as NC


def test_the_stamp_changes_with_any_edit_addition_or_removal(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text("x = 1\n")
    (pkg / "sub" / "b.py").write_text("y = 2\n")
    (pkg / "notes.txt").write_text("not a source")
    first = NC.sources_stamp([str(pkg)])
    assert len(first) == 2 and NC.sources_stamp([str(pkg)]) == first
    (pkg / "notes.txt").write_text("still not a source")
    assert NC.sources_stamp([str(pkg)]) == first
    (pkg / "sub" / "b.py").write_text("y = 3\n")             # same size, new mtime
    later = time.time() + 5
    os.utime(pkg / "sub" / "b.py", (later, later))
    edited = NC.sources_stamp([str(pkg)])
    assert edited != first
    (pkg / "c.py").write_text("")
    added = NC.sources_stamp([str(pkg)])
    assert added != edited
    (pkg / "c.py").unlink()
    assert NC.sources_stamp([str(pkg)]) == edited


def test_fastopt_kernels_carry_the_stamp_of_the_kernel_packages():
    from fastopt.backends import numba_cpu
    from fastopt.nn import _numba
    for kernel in (numba_cpu._table_serial, numba_cpu._table_parallel):
        loc = kernel._cache._impl.locator
        assert type(loc).__name__ == "FastoptSourcesLocator"
        own, tree = loc.get_source_stamp()
        assert own == loc.inner.get_source_stamp()      # Numba's own stamp is kept
        assert tree == NC.sources_stamp()
        names = {path for path, _, _ in tree}
        assert os.path.join("backends", "compact_jit.py") in names
        assert os.path.join("backends", "elements.py") in names
    assert any(type(getattr(f, "_cache", None)).__name__ == "FunctionCache" and
               type(f._cache._impl.locator).__name__ == "FastoptSourcesLocator"
               for f in vars(_numba).values())


def _users_kernel(x):
    return x + 1


def test_other_code_keeps_numbas_own_locator():
    """(A locator is picked when a kernel is decorated: nothing compiles.)"""
    mine = njit(cache=True)(_users_kernel)          # a file outside fastopt
    assert type(mine._cache._impl.locator).__name__ != "FastoptSourcesLocator"


def test_the_cuda_kernels_get_the_stamp_too():
    from fastopt.backends import _cuda_kernels  # noqa: F401  (installs it)
    from numba.cuda.core import caching
    assert caching.CacheImpl._locator_classes[0].__name__ == "FastoptSourcesLocator"
    assert sum(c.__name__ == "FastoptSourcesLocator"
               for c in caching.CacheImpl._locator_classes) == 1


def test_with_nowhere_numba_would_write_the_cache_goes_to_a_private_temp_dir(
        tmp_path, monkeypatch):
    # a read-only install and HOME (a container run as another user): every
    # Numba locator refuses, and Numba raised "no locator available" at import
    from numba.core import caching
    monkeypatch.setattr(NC.tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(NC, "_root", None)
    for name in ("UserProvidedCacheLocator", "InTreeCacheLocator", "UserWideCacheLocator",
                 "IPythonCacheLocator", "ZipCacheLocator"):
        monkeypatch.setattr(getattr(caching, name), "from_function",
                            classmethod(lambda cls, f, file: None))
    NC.install()

    def kernel(x):
        return x + 1
    kernel.__module__ = "fastopt.backends.numba_cpu"
    py_file = os.path.join(os.path.dirname(NC.__file__), "backends", "numba_cpu.py")
    stamped = next(c for c in caching.CacheImpl._locator_classes
                   if c.__name__ == "FastoptSourcesLocator")
    loc = stamped.from_function(kernel, py_file)
    assert loc is not None and loc.get_cache_path().startswith(NC.temp_cache_root() + os.sep)
    assert NC.temp_cache_root().startswith(str(tmp_path))
    assert os.stat(NC.temp_cache_root()).st_mode & 0o777 == 0o700
    # another user's (or a world-writable) directory there is not used: one
    # of this process's own instead
    os.chmod(NC.temp_cache_root(), 0o777)
    monkeypatch.setattr(NC, "_root", None)
    own = stamped.from_function(kernel, py_file).get_cache_path()
    assert not own.startswith(NC.temp_cache_root() + os.sep) and own.startswith(str(tmp_path))
    assert os.stat(NC._cache_root()).st_mode & 0o777 == 0o700
