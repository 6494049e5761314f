"""Public API surface: lazy imports, backend registry, thread control."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastopt
from fastopt.backends import get_backend


def run_python(code):
    """Run ``code`` in a fresh interpreter; fail with its stderr if it fails."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_import_does_not_load_numba():
    run_python("""
        import sys
        import fastopt
        heavy = {'numba', 'llvmlite', 'torch', 'fastopt.backends.numba_cpu',
                 'fastopt.backends.cython_cpu'}
        loaded = heavy & set(sys.modules)
        assert not loaded, loaded
    """)


def test_numpy_backend_never_loads_numba():
    """The reference backend works end to end without importing Numba;
    asking for the list of backends is what loads them."""
    run_python("""
        import sys
        import numpy as np
        import fastopt
        p = fastopt.pack([np.ones(3), np.ones(2)])
        g = p.zeros_like()
        fastopt.Adam(p, backend="numpy", max_grad_norm=1.0).step(g)
        fastopt.SGD(list(p), backend="reference", momentum=0.9).step(list(g))
        fastopt.functional.adamw(p, g, p.zeros_like(), p.zeros_like(), step=1,
                                 backend="numpy")
        fastopt.clip_by_global_norm(g, 1.0, backend="numpy")
        fastopt.global_norm(g, backend="numpy")
        assert 'numba' not in sys.modules
        fastopt.available_backends()
        assert 'numba' in sys.modules
    """)


def test_available_backends():
    everything = fastopt.available_backends()
    assert set(everything) <= {"numba", "cython", "numpy", "cuda"}
    assert everything[-1] in ("numpy", "cuda")   # cuda only where a GPU/simulator is usable
    names = [n for n in everything if n != "cuda"]
    assert names[-1] == "numpy" and "numpy" in names
    assert len(set(names)) == len(names)
    if importlib.util.find_spec("numba") is not None:
        assert "numba" in names
    if importlib.util.find_spec("fastopt.backends._cython.kernels") is not None:
        assert "cython" in names
    # Fastest first, in the registry's preference order.
    order = ["cython", "numba", "numpy"]
    assert names == [n for n in order if n in names]
    # "auto" is the first available host backend, never cuda.
    assert get_backend("auto") is get_backend(names[0])
    assert fastopt.SGD([np.ones(2)], lr=0.1).backend == names[0]


def test_get_backend_names_and_alias():
    assert get_backend("reference") is get_backend("numpy")
    assert get_backend("numpy").name == "numpy"
    for name in fastopt.available_backends():   # cuda too, where it is usable
        mod = get_backend(name)
        assert mod.name == name
        for fn in ("adam_update", "sgd_update", "sumsq", "scale"):
            assert callable(getattr(mod, fn)), (name, fn)
    with pytest.raises(ValueError, match=r"backend must be one of .*got 'fortran'"):
        get_backend("fortran")
    with pytest.raises(TypeError, match="backend must be a string"):
        get_backend(1)


def test_backend_info():
    info = fastopt.backend_info()
    assert set(info) == {"numba", "cython", "numpy", "cuda"}
    available = set(fastopt.available_backends())
    for name, entry in info.items():
        assert entry["available"] == (name in available)
        if not entry["available"]:
            assert entry["reason"]
    assert info["numpy"]["threaded"] is False
    if info["numba"]["available"]:
        assert info["numba"]["threaded"] is True
        assert info["numba"]["num_threads"] == get_backend("numba").get_num_threads()
    if info["cython"]["available"]:
        # Reports whether the extension was built with OpenMP.
        kernels = get_backend("cython")._k
        assert info["cython"]["threaded"] is bool(kernels.OPENMP)
        assert isinstance(info["cython"]["threaded"], bool)
        assert info["cython"]["num_threads"] == kernels.get_num_threads()
        if not kernels.OPENMP:
            assert info["cython"]["num_threads"] == 1


@pytest.mark.parametrize("bad, error, message", [
    (0, ValueError, "n must be >= 1"), (-1, ValueError, "n must be >= 1"),
    (1.5, TypeError, "n must be an int"), (2.0, TypeError, "n must be an int"),
    (True, TypeError, "n must be an int"), (False, TypeError, "n must be an int"),
    ("2", TypeError, "n must be an int"), (None, TypeError, "n must be an int"),
    ([2], TypeError, "n must be an int")])
def test_set_num_threads_validates(bad, error, message, restore_threads):
    before = fastopt.get_num_threads()
    with pytest.raises(error, match=message):
        fastopt.set_num_threads(bad)
    assert fastopt.get_num_threads() == before


def test_more_threads_than_numbas_pool_says_it_is_one_setting(restore_threads):
    """A Cython user asking for more threads than Numba's pool read only of
    Numba: the message says the setting is shared, and nothing changes."""
    import numba
    before = fastopt.get_num_threads()
    with pytest.raises(ValueError, match=r"thread pool has \d+ \(NUMBA_NUM_THREADS.*one "
                                         r"setting for the Numba and the Cython steps"):
        fastopt.set_num_threads(numba.config.NUMBA_NUM_THREADS + 1)
    assert fastopt.get_num_threads() == before


def test_set_num_threads_holds_for_numba_steps_in_other_threads(restore_threads):
    """Numba's count is per thread: a ThreadPoolExecutor's (or joblib
    threading's) worker stepped on all the cores after set_num_threads(1),
    where the Cython step keeps one count for the process."""
    numba = pytest.importorskip("numba")
    if not fastopt.backend_info()["numba"]["available"]:
        pytest.skip("no Numba backend")
    from concurrent.futures import ThreadPoolExecutor

    def in_a_thread():
        p = [np.ones(100_000)]
        fastopt.Adam(p, backend="numba").step([np.ones(100_000)])    # a parallel-sized step
        return numba.get_num_threads(), fastopt.backend_info()["numba"]["num_threads"]

    fastopt.set_num_threads(1)
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(in_a_thread).result() == (1, 1)
        if numba.config.NUMBA_NUM_THREADS > 1:      # a later change reaches the same thread
            fastopt.set_num_threads(2)
            assert pool.submit(in_a_thread).result() == (2, 2)


def test_kernel_threads_and_a_users_own_numba_count_stay_on_their_thread(restore_threads):
    """kernel_threads(1) (an ensemble's step) is this thread's, not every
    thread's; a count the user then sets with Numba itself, for their own
    Numba code, is not replaced by fastopt's at the next step."""
    numba = pytest.importorskip("numba")
    from concurrent.futures import ThreadPoolExecutor

    from fastopt.backends import kernel_threads
    if not fastopt.backend_info()["numba"]["available"]:
        pytest.skip("no Numba backend")
    most = numba.config.NUMBA_NUM_THREADS
    fastopt.set_num_threads(most)
    with ThreadPoolExecutor(1) as pool:
        with kernel_threads(1):
            assert numba.get_num_threads() == 1
            # (the Cython team's count is the process's, its block's too)
            assert pool.submit(
                lambda: fastopt.backend_info()["numba"]["num_threads"]).result() == most
        assert numba.get_num_threads() == most
        numba.set_num_threads(1)            # the user's own, for their own kernels
        fastopt.Adam([np.ones(100_000)], backend="numba").step([np.ones(100_000)])
        assert numba.get_num_threads() == 1
        numba.set_num_threads(most)


def test_set_num_threads_accepts_numpy_ints(restore_threads):
    fastopt.set_num_threads(np.int64(1))
    assert fastopt.get_num_threads() == 1


def test_set_num_threads_reaches_every_threaded_backend(restore_threads):
    fastopt.set_num_threads(1)
    assert fastopt.get_num_threads() == 1
    info = fastopt.backend_info()
    for name in ("numba", "cython"):
        if info[name]["available"]:
            assert info[name]["num_threads"] == 1
    # The kernels still run (serially) and still give the right answer.
    x = np.arange(100_000, dtype=np.float64)
    assert fastopt.global_norm([x]) == pytest.approx(float(np.linalg.norm(x)), rel=1e-12)


def test_public_names():
    for name in fastopt.__all__:
        assert hasattr(fastopt, name), name
    assert isinstance(fastopt.__version__, str)
    assert issubclass(fastopt.AdamW, fastopt.Adam)
    assert issubclass(fastopt.Adam, fastopt.Optimizer)
    assert issubclass(fastopt.SGD, fastopt.Optimizer)
    opt = fastopt.AdamW(fastopt.pack([np.ones((2, 2), np.float32)]), backend="numpy")
    assert repr(opt) == ("AdamW(1 array, 4 elements, 1 group, lr=0.001, iterations=0, "
                         "backend='numpy')")
    two = fastopt.SGD([{"params": [np.ones(2)], "lr": 0.5}, {"params": [np.ones(3)]}], lr=0.1)
    two.step([np.ones(2), np.ones(3)])
    assert repr(two) == ("SGD(2 arrays, 5 elements, 2 groups, lr=[0.5, 0.1], iterations=1, "
                         f"backend={two.backend!r})")
    assert opt.defaults["weight_decay"] == 1e-2   # torch's AdamW default
    assert fastopt.Adam([np.ones(1)]).defaults["weight_decay"] == 0.0


def test_step_updates_in_place_and_returns_none():
    w = np.ones(3)
    flat = fastopt.pack([np.ones(2)])
    view = flat[0]
    assert fastopt.SGD([w], lr=0.5).step([np.ones(3)]) is None
    np.testing.assert_array_equal(w, 0.5)
    fastopt.SGD(flat, lr=0.5).step(flat.zeros_like())
    assert flat[0] is view


def test_group_edits_are_checked_after_a_step_cached_the_check():
    """Hypers are re-checked only when they change; edits in place count."""
    p = fastopt.pack([np.ones(10, np.float32)])
    g = p.zeros_like()
    opt = fastopt.AdamW(p)
    opt.param_groups[0]["betas"] = [0.9, 0.999]
    opt.step(g)
    before = p.data.copy()
    opt.param_groups[0]["betas"][0] = 2.0            # same list object, edited
    with pytest.raises(ValueError, match=r"betas'\]\[0\] must be < 1.0"):
        opt.step(g)
    opt.param_groups[0]["betas"] = (0.9, 0.999)
    opt.param_groups[0]["eps"] = np.array([1e-8])    # not comparable by ==
    with pytest.raises(TypeError, match="eps'\\] must be a real number"):
        opt.step(g)
    np.testing.assert_array_equal(p.data, before)


def _openmp_after_loading(env_overrides, preload=""):
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    env.update(env_overrides)
    code = (preload + "import json, os, fastopt; i = fastopt.backend_info(); "
            "print(json.dumps([os.environ.get('GOMP_SPINCOUNT'), "
            "[i[b].get('openmp_wait') for b in ('numba', 'cython') if i[b]['available']]]))")
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


def test_kernels_load_libgomp_with_a_short_spin_and_leave_env_clean():
    """Idle libgomp workers spinning for ms steal the cores from the BLAS calls
    of a training loop; fastopt's kernels load libgomp with a short spin, and
    the variable is gone afterwards (torch's own libgomp, loaded later, must
    keep its default)."""
    spin, reports = _openmp_after_loading({})
    assert spin is None
    assert reports and all(r == {"GOMP_SPINCOUNT": "5000", "set_by": "fastopt"}
                           for r in reports)
    spin, reports = _openmp_after_loading({"GOMP_SPINCOUNT": "77"})
    assert spin == "77"
    assert all(r == {"GOMP_SPINCOUNT": "77", "set_by": "user"} for r in reports)
    spin, reports = _openmp_after_loading({"OMP_WAIT_POLICY": "active"})
    assert spin is None
    assert all(r == {"OMP_WAIT_POLICY": "active", "set_by": "user"} for r in reports)


def test_libgomp_loaded_earlier_is_reported():
    code = ("import numba, numpy as np\n@numba.njit(parallel=True)\ndef f(a):\n"
            "    for i in numba.prange(a.size): a[i] += 1\nf(np.zeros(10))\n")
    _, reports = _openmp_after_loading({}, preload=f"exec({code!r}); ")
    assert reports and all(r["set_by"].startswith("default (libgomp was loaded before")
                           for r in reports)
    assert all(r["libgomp"].endswith(".so.1") or ".so.1." in r["libgomp"] for r in reports)


def test_import_fastopt_then_torch_shares_the_short_spin():
    """``import fastopt`` loads libgomp with the short spin; torch imported
    after it uses that copy rather than loading its own."""
    pytest.importorskip("torch")
    code = ("import json, fastopt, torch; torch.ones(1 << 16).sum(); "
            "i = fastopt.backend_info(); "
            "maps = [l.split()[-1] for l in open('/proc/self/maps') if 'libgomp' in l]; "
            "print(json.dumps([sorted(set(maps)), i['cython'].get('openmp_wait')]))")
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                         capture_output=True, text=True).stdout
    maps, report = json.loads(out)
    assert len(maps) == 1 and "/torch/" not in maps[0]
    assert report == ({"GOMP_SPINCOUNT": "5000", "set_by": "fastopt"}
                      if "cython" in fastopt.available_backends() else None)


def test_the_preload_can_be_turned_off():
    """``FASTOPT_PRELOAD_OPENMP=0``: no libgomp until a kernel needs one."""
    code = ("import json, fastopt; "
            "print(json.dumps([l.split()[-1] for l in open('/proc/self/maps') "
            "if 'libgomp' in l]))")
    for value, loaded in (("0", False), ("1", True)):
        env = {**os.environ, "FASTOPT_PRELOAD_OPENMP": value}
        out = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                             capture_output=True, text=True).stdout
        assert bool(json.loads(out)) is loaded, value


def test_torchs_libgomp_loaded_first_is_reported():
    """torch's bundled libgomp has the same soname: imported first, it is the
    one fastopt's kernels run on, at its own (long) spin."""
    pytest.importorskip("torch")
    _, reports = _openmp_after_loading({}, preload="import torch; ")
    assert reports and all(r["set_by"].startswith("default (torch's libgomp was loaded")
                           and "/torch/" in r["libgomp"] for r in reports)


def test_kernel_threads_restores_even_on_error(restore_threads):
    from fastopt.backends import kernel_threads
    fastopt.set_num_threads(2)
    with pytest.raises(RuntimeError, match="inside"):
        with kernel_threads(1):
            assert fastopt.get_num_threads() == 1
            info = fastopt.backend_info()
            assert all(info[b]["num_threads"] == 1 for b in ("numba", "cython")
                       if info[b]["available"] and info[b]["threaded"])
            raise RuntimeError("inside")
    assert fastopt.get_num_threads() == 2
