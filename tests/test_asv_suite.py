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
import math
import os
import re
import shutil
import subprocess
import sys
import threading

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASV = [sys.executable, "-m", "asv"]
# a timing benchmark, a same-run ratio benchmark and the comparison's
# smallest case (asv matches a parameterized name with its params), all quick
TINY_CASE = "list adamw 1 x 1"
BENCH_REGEX = (r"GlobalNorm\.time_global_norm|ClipAdamWRatios\.track_speedup_vs_numpy"
               rf"|bench_cases\.Step\.time_step\('{TINY_CASE}'")
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
    """The quick run saved a number for each benchmark it ran. (Whether the
    fused clip step beats NumPy is the CI guard's floor on the same case,
    re-measured on a miss: tests/test_perfguard.py.)"""
    html, head = dashboard
    results = [p for p in (html.parent / "results").rglob("*.json")
               if p.name not in ("machine.json", "benchmarks.json")]
    assert len(results) == 1 and results[0].name.startswith(head[:8])
    data = json.loads(results[0].read_text())
    names = set(data["results"])
    assert f"{GRAPH}" in names
    assert "bench_clipping.ClipAdamWRatios.track_speedup_vs_numpy" in names
    speedups = data["results"]["bench_clipping.ClipAdamWRatios.track_speedup_vs_numpy"][0]
    assert any(s is not None for s in speedups)
    assert all(s is None or s > 0 for s in speedups)
    sys.path.insert(0, ROOT)
    try:
        from benchmarks import bench_cases
    finally:
        sys.path.pop(0)
    times = dict(zip(itertools.product(bench_cases.CASES, bench_cases.IMPLS),
                     data["results"]["bench_cases.Step.time_step"][0]))
    assert all(times[(TINY_CASE, impl)] > 0 for impl in ("numba", "numpy", "roofline"))


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
    # sorted by name: the comparison's rows first
    table = dom[dom.index('id="summarylist-table-0"'):]
    first_row = re.search(r"<tbody>\s*<tr[^>]*>(.*?)</tr>", table, flags=re.S).group(1)
    assert "bench_cases." in first_row
    assert "ClipAdamWRatios.track_speedup_vs_numpy" in dom
    assert not _js_errors(console), console


def test_dashboard_draws_a_graph(served, tmp_path):
    dom, console = _render(f"{served}/index.html#{GRAPH}", tmp_path)
    assert 'class="flot-base"' in dom           # flot drew the plot's canvas
    assert "impl-numba" in dom                 # with a legend entry per series
    assert not _js_errors(console), console


def test_dashboard_compares_implementations_at_one_commit(served, tmp_path):
    """The link docs/benchmarking.md gives for one case's implementations
    (x-axis switched to impl): a bar per implementation, one series."""
    with open(os.path.join(ROOT, "docs", "benchmarking.md")) as f:
        link = re.search(r"index\.html#bench_cases\.Step\.time_step\?[^\s`]+", f.read()).group(0)
    link = re.sub(r"p-case=%27[^&]*%27", "p-case=%27" + TINY_CASE.replace(" ", "%20") + "%27",
                  link)
    dom, console = _render(f"{served}/{link}", tmp_path)
    assert 'class="flot-base"' in dom
    ticks = re.findall(r'class="flot-tick-label tickLabel"[^>]*>([^<]*)<', dom)
    assert {"numba", "numpy", "torch-foreach", "roofline"} <= set(ticks)
    assert re.findall(r'class="legendLabel">([^<]*)<', dom) == [
        f"case-{TINY_CASE}; commit-last"]
    assert not _js_errors(console), console


def _small_combinations(cls):
    """Every categorical value, but only the smallest of each numeric param
    and of a ``case`` param naming the module's CASES (fastopt.bench.cases rows:
    the one with the fewest elements; the others differ in size and kind
    only, and every kind's steps are tested in tests/test_bench.py)."""
    params = getattr(cls, "params", [])
    if params and not isinstance(params[0], (list, tuple)):
        params = [params]
    names = getattr(cls, "param_names", [])
    cases = getattr(sys.modules[cls.__module__], "CASES", {})
    choices = [[min(p)] if all(isinstance(v, int) for v in p) else
               [min(p, key=lambda c: sum(map(math.prod, cases[c].shapes)))]
               if name == "case" and set(p) <= set(cases) else list(p)
               for name, p in itertools.zip_longest(names, params)]
    return list(itertools.product(*choices))


def _benchmark_classes(setup_cache=False):
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
                        and (setup_cache or not hasattr(cls, "setup_cache"))):
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
    for combo in _small_combinations(cls):
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


# -- the comparison, first ------------------------------------------------------------

def _benchmark_names():
    """asv's names (module.Class.method) of every benchmark, in its order."""
    return sorted(f"{name}.{attr}" for name, cls in _benchmark_classes(setup_cache=True)
                  for attr in dir(cls) if attr.startswith(("time_", "track_", "peakmem_")))


def test_the_comparison_sorts_first():
    """asv's list view sorts by name: the same-run ratios of every case come
    first, then every implementation's time per case."""
    names = _benchmark_names()
    first = [n for n in names if n.startswith("bench_cases.")]
    assert names[:len(first)] == first
    assert first[0].startswith("bench_cases.Ratios.track_")
    assert first[-1] == "bench_cases.Step.time_step"


def test_the_cases_are_fastopt_bench_s():
    """Every case is the workload of that name in fastopt.bench.cases (one
    definition for the table, asv and the CI guard), every optimizer's two
    included, and the suite's other named cases are those workloads too."""
    sys.path.insert(0, ROOT)
    try:
        from benchmarks import bench_cases, bench_clipping, bench_multitensor
    finally:
        sys.path.pop(0)
    from fastopt.bench import cases
    work = cases.workloads()
    assert all(work[name] == row for name, row in bench_cases.CASES.items())
    for kind in cases.KINDS:
        assert all(r.case in bench_cases.CASES for r in cases.family_rows(kind))
    assert bench_cases.Ratios.params[0] == bench_cases.Step.params[0] == list(bench_cases.CASES)
    assert {"numpy", "roofline", *cases.TORCH_PATHS} <= set(bench_cases.Step.params[1])
    assert bench_clipping.CLIP == work["clip+adamw 200 x 5k"]
    assert bench_multitensor.MANY == work["adamw 1000 x 1k"]


def test_ratio_tracks_read_their_case_and_skip_what_torch_lacks(monkeypatch):
    """The Ratios tracks on a tiny measured matrix: a number per case and
    backend, and asv's skip (n/a, not a failure) for torch's ratio of an
    optimizer torch lacks."""
    sys.path.insert(0, ROOT)
    try:
        from benchmarks import bench_cases, common
    finally:
        sys.path.pop(0)
    from fastopt.bench import cases
    tiny = {"lion": cases.Row("lion", "lion", [(1000,)] * 2, layout="list"),
            "rmsprop": cases.Row("rmsprop", "rmsprop", [(1000,)] * 2, layout="list")}
    monkeypatch.setattr(bench_cases, "CASES", tiny)
    monkeypatch.setattr(common, "ratio_matrix", functools.partial(common.ratio_matrix, rounds=1))
    ratios = bench_cases.Ratios()
    cache = ratios.setup_cache()
    backend = common.FASTOPT_BACKENDS[0]
    ratios.setup(cache, "rmsprop", backend)
    assert ratios.track_speedup_vs_torch_best(cache, "rmsprop", backend) > 0
    assert ratios.track_speedup_vs_numpy(cache, "lion", backend) > 0
    with pytest.raises(common.SkipNotImplemented, match="not measured: lion"):
        ratios.track_speedup_vs_torch_best(cache, "lion", backend)
    if common.SkipNotImplemented is not NotImplementedError:     # asv_runner is here
        from asv_runner.benchmarks.mark import SkipNotImplemented
        assert common.SkipNotImplemented is SkipNotImplemented


def test_the_suite_refuses_to_measure_another_checkout(tmp_path):
    """``asv run --python=same`` in a second checkout imported the first
    one's editable install (asv drops PYTHONPATH) and filed its numbers
    under the second one's commit. The suite's shared module refuses,
    naming both and ASV_PYTHONPATH."""
    other = tmp_path / "checkout"
    shutil.copytree(os.path.join(ROOT, "benchmarks"), other / "benchmarks")
    (other / "pyproject.toml").write_text("")
    out = subprocess.run([sys.executable, "-c", "import common"], cwd=other / "benchmarks",
                         capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(
                             [str(other / "benchmarks"), ROOT])})
    assert out.returncode != 0
    assert (f"these benchmarks are {other}'s, but fastopt is imported from the checkout "
            f"{ROOT}") in out.stderr and f"ASV_PYTHONPATH={other}" in out.stderr
    same = subprocess.run([sys.executable, "-c", "import common"],
                          cwd=os.path.join(ROOT, "benchmarks"), capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert same.returncode == 0, same.stderr
