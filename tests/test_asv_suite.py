"""The asv suite as a user meets it: ``asv check`` passes, a quick run of a
few benchmarks records results, ``asv publish`` builds the dashboard, and
the dashboard renders in a real browser (headless Chromium) with the
benchmark list and a graph and no JavaScript errors.

Needs asv (the ``test`` extra installs it), git, npm and Debian's chromium
(``.ci/run`` installs the last two when missing); each missing tool skips
with its name rather than failing.
"""

from __future__ import annotations

import functools
import http.server
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import threading

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASV = [sys.executable, "-m", "asv"]
# a timing benchmark and a same-run ratio benchmark, both quick
BENCH_REGEX = r"GlobalNorm\.time_global_norm|ClipAdamWRatios\.track_speedup_vs_numpy"
GRAPH = "bench_clipping.GlobalNorm.time_global_norm"

pytest.importorskip("asv")


def _need(tool):
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} not installed (.ci/run installs it)")
    return path


def _asv(*args, cwd=ROOT, timeout=600):
    out = subprocess.run([*ASV, *args], cwd=cwd, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, f"asv {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def load_conf(path):
    """asv.conf.json allows // comments; asv strips them, so do we."""
    with open(path) as f:
        return json.loads(re.sub(r"^\s*//.*$", "", f.read(), flags=re.M))


def test_asv_check_passes():
    out = _asv("check", "--python=same")
    assert "No problems found" in out


def test_conf_is_valid_for_both_modes():
    conf = load_conf(os.path.join(ROOT, "asv.conf.json"))
    assert conf["benchmark_dir"] == "benchmarks" and conf["repo"] == "."
    assert conf["environment_type"] == "virtualenv"   # `asv run` builds history
    assert "{wheel_file}" in " ".join(conf["install_command"])


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory):
    _need("git")
    tmp = tmp_path_factory.mktemp("asv")
    conf = load_conf(os.path.join(ROOT, "asv.conf.json"))
    conf.update(repo=ROOT, benchmark_dir=os.path.join(ROOT, "benchmarks"),
                results_dir=str(tmp / "results"), html_dir=str(tmp / "html"),
                env_dir=str(tmp / "env"))
    cfg = tmp / "asv.conf.json"
    cfg.write_text(json.dumps(conf))
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()
    _asv("machine", "--yes", "--config", str(cfg))
    run = _asv("run", "--python=same", "--quick", "--set-commit-hash", head,
               "--bench", BENCH_REGEX, "--config", str(cfg))
    assert "failed" not in run, run
    _asv("publish", "--config", str(cfg))
    return tmp / "html", head


def test_quick_run_records_results(dashboard):
    html, head = dashboard
    results = [p for p in (html.parent / "results").rglob("*.json")
               if p.name not in ("machine.json", "benchmarks.json")]
    assert len(results) == 1 and results[0].name.startswith(head[:8])
    data = json.loads(results[0].read_text())
    names = set(data["results"])
    assert f"{GRAPH}" in names
    assert "bench_clipping.ClipAdamWRatios.track_speedup_vs_numpy" in names
    speedups = data["results"]["bench_clipping.ClipAdamWRatios.track_speedup_vs_numpy"][0]
    assert all(s is None or s > 1 for s in speedups)   # fused clip+step beats NumPy


@pytest.fixture(scope="module")
def served(dashboard):
    html, _ = dashboard
    npm_ok = shutil.which("npm")
    if npm_ok is None:
        pytest.skip("npm not installed: the dashboard's JavaScript cannot be vendored")
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        import asv_offline
    finally:
        sys.path.pop(0)
    asv_offline.vendor(str(html))
    handler = functools.partial(_QuietHandler, directory=str(html))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _render(url, tmp_path):
    """DOM after the page's scripts ran, and the browser console's lines."""
    chromium = _need("chromium")
    out = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-extensions",
         f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
         "--window-size=1280,900", "--virtual-time-budget=15000", "--dump-dom", url],
        capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    console = [line for line in out.stderr.splitlines() if ":CONSOLE" in line]
    return out.stdout, console


def _js_errors(console):
    return [c for c in console if re.search(r"Uncaught|Error|error", c.split("]", 1)[-1])]


def test_dashboard_lists_the_benchmarks(served, tmp_path):
    dom, console = _render(f"{served}/index.html#/summarylist", tmp_path)
    assert "failed to load" not in dom, "the dashboard fell back to its error page"
    assert 'id="summarylist-table-0"' in dom
    assert GRAPH in dom
    assert "ClipAdamWRatios.track_speedup_vs_numpy" in dom
    assert not _js_errors(console), console


def test_dashboard_draws_a_graph(served, tmp_path):
    dom, console = _render(f"{served}/index.html#{GRAPH}", tmp_path)
    assert 'class="flot-base"' in dom           # flot drew the plot's canvas
    assert "impl-numba" in dom                 # with a legend entry per series
    assert not _js_errors(console), console


def _small_combinations(params):
    """Every categorical value, but only the smallest of each numeric param."""
    if params and not isinstance(params[0], (list, tuple)):
        params = [params]
    choices = [[min(p)] if all(isinstance(v, int) for v in p) else list(p) for p in params]
    return list(itertools.product(*choices))


def _benchmark_classes():
    import importlib
    import pkgutil
    sys.path.insert(0, ROOT)
    try:
        pkg = importlib.import_module("benchmarks")
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("bench_"):
                continue
            module = importlib.import_module(f"benchmarks.{info.name}")
            for name, cls in vars(module).items():
                if (isinstance(cls, type) and not name.startswith("_")
                        and cls.__module__ == module.__name__
                        and not hasattr(cls, "setup_cache")):
                    yield f"{info.name}.{name}", cls
    finally:
        sys.path.pop(0)


@pytest.mark.parametrize("name, cls", list(_benchmark_classes()),
                         ids=lambda x: x if isinstance(x, str) else "")
def test_every_timing_benchmark_runs_at_its_smallest_size(name, cls):
    """Each benchmark body runs (or skips with a reason) at its smallest
    size for every implementation: a broken benchmark fails here, not in
    the middle of an asv run."""
    ran, skipped = 0, set()
    for combo in _small_combinations(getattr(cls, "params", [])):
        bench = cls()
        try:
            if hasattr(bench, "setup"):
                bench.setup(*combo)
        except NotImplementedError as e:
            skipped.add(str(e))
            continue
        for attr in dir(bench):
            if attr.startswith(("time_", "track_", "peakmem_")):
                value = getattr(bench, attr)(*combo)
                if attr.startswith("track_"):
                    assert value is not None and value >= 0, (attr, combo)
        ran += 1
    if not ran and skipped and all("no GPU" in r for r in skipped):
        pytest.skip("no GPU on this machine")
    if not ran and any("MNIST" in r and "not found" in r for r in skipped):
        pytest.skip("MNIST files not found (../shared/data/mnist or FASTOPT_DATA)")
    assert ran, f"{name}: every combination skipped: {sorted(skipped)}"
