"""Performance regression guard for CI on small, shared, noisy machines.

Absolute times on such machines drift by tens of percent from run to run,
so the guard never compares them. It compares **same-run ratios** (fastopt
vs a straightforward NumPy step, fastopt vs a streaming kernel that moves
the same bytes, all timed interleaved in one process) against **floors**
shipped with the package (``fastopt/bench/floors.json``, read with
importlib.resources so an installed ``fastopt check-perf`` finds them). A
floor names a case of :func:`fastopt.bench.cases.workloads`, so it measures
the table's row and the asv benchmark of that name. A ratio below its floor
is measured again, up to ``attempts`` times with growing pauses between,
and only a ratio that stays below on every attempt fails: a noisy spell
passes, a real slowdown (a kernel that lost vectorisation, parallelism or
fusion) does not.

Floors sit well under the ratios measured on the reference machine (the
file says what was measured), low enough to survive noise and high enough
to catch a 2x slowdown of the fused step. Lower one only in the commit that
explains why.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import math
import time
from dataclasses import dataclass, field
from importlib import resources

from .._cpuinfo import SIMD_BUILDS, SIMD_CAP_VAR
from ..backends import available_backends, backend_info
from . import cases, ratios

METRICS = {
    "roofline": "fraction of the streaming kernel's speed",
    "numpy": "speedup vs straightforward NumPy",
    "torch": "speedup vs torch's fastest path (fused, foreach or for-loop, same run)",
}
# the ratio each metric reads from ratios.speedups
_RATIO = {"roofline": "roofline", "numpy": "numpy", "torch": "torch_best"}


def shipped_floors():
    """The floors file inside the installed package (package data, see
    pyproject.toml), wherever the command runs from."""
    return resources.files("fastopt.bench").joinpath("floors.json")


# for messages and --help; load_floors() reads the resource itself
DEFAULT_FLOORS = str(shipped_floors())


@dataclass
class Check:
    case: str
    impl: str
    metric: str
    floor: float
    measured: list = field(default_factory=list)   # one ratio per attempt
    times: dict = field(default_factory=dict)      # last attempt: impl -> seconds
    simd: str | None = None     # the Cython build measured (None: the one loaded here)
    skipped: str = ""      # why nothing was measured (a SIMD build this CPU cannot run)

    @property
    def label(self):
        """The case's name in reports, with the build it measured."""
        return _label(self.case, self.simd)

    @property
    def best(self):
        vals = [v for v in self.measured if v is not None]
        return max(vals) if vals else None

    @property
    def ok(self):
        return bool(self.skipped) or (self.best is not None and self.best >= self.floor)


def load_floors(path=None):
    """Read and check a floors file (default: the one shipped with fastopt);
    errors name the file and the entry."""
    try:
        if path is None:
            path = DEFAULT_FLOORS
            spec = json.loads(shipped_floors().read_text())
        else:
            with open(path, encoding="utf-8") as f:
                spec = json.load(f)
    except UnicodeDecodeError as e:     # its message names no file
        raise ValueError(f"floors file {path!r} is not UTF-8 text: {e}") from None
    except IsADirectoryError:
        raise ValueError(f"floors file {path!r} is a directory; pass the floors "
                         "JSON file inside it") from None
    except FileNotFoundError:
        hint = ("the install lacks its package data; reinstall fastopt"
                if path == DEFAULT_FLOORS else "pass an existing file to --floors")
        raise FileNotFoundError(f"floors file {path!r} not found ({hint})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"floors file {path!r} is not valid JSON: {e}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"floors file {path!r} must hold a JSON object with a 'cases' list, "
                         f"got {type(spec).__name__}")
    _refuse_unknown(f"floors file {path!r}", spec, _TOP_KEYS)
    for key, low, kind in (("attempts", 1, int), ("rounds", 1, int), ("pause_s", 0, float)):
        value = spec.get(key, low)
        if not _is_number(value) or value < low or (kind is int and not isinstance(value, int)):
            raise ValueError(f"floors file {path!r}: {key} must be "
                             f"{'an int' if kind is int else 'a number'} >= {low}, "
                             f"got {value!r}")
    entries = spec.get("cases")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"floors file {path!r} needs a non-empty 'cases' list")
    named = cases.workloads()
    seen = {}
    for i, c in enumerate(entries):
        if not isinstance(c, dict):
            raise ValueError(f"{path}: cases[{i}] must be an object with 'case' and 'floors', "
                             f"got {c!r}")
        _refuse_unknown(f"{path}: cases[{i}]", c, _CASE_KEYS)
        if not isinstance(c.get("case", ""), str):
            raise ValueError(f"{path}: cases[{i}] case must be a name (a string), got "
                             f"{c['case']!r}")
        missing = {"case", "floors"} - set(c)
        spelled = {"kind", "shape"} & set(c)
        if spelled or c.get("case") not in named:
            missing |= {"kind", "shape"} - spelled
        if missing and (missing - {"kind", "shape"} or not spelled):
            hint = ("" if spelled else
                    " (nor does its case name a workload in fastopt.bench.cases)")
            raise ValueError(f"{path}: cases[{i}] lacks {sorted(missing)}{hint}")
        if missing:          # one of kind and shape: meant the workload, or a new case?
            hint = (f"drop {sorted(spelled)[0]} to measure the workload of that name in "
                    "fastopt.bench.cases, or spell both for a case of your own"
                    if c["case"] in named else "a case of your own spells both")
            raise ValueError(f"{path}: cases[{i}] ({c['case']}) gives {sorted(spelled)[0]} "
                             f"without {sorted(missing)[0]}: {hint}")
        if label(c) in seen:     # two rows of one name in the report: which is which?
            raise ValueError(f"{path}: cases[{i}] and cases[{seen[label(c)]}] are both "
                             f"{label(c)!r}; give each case its floors once")
        seen[label(c)] = i
        if spelled:
            _check_spelled(path, i, c, named.get(c["case"]))
        kind = case_row(c).kind
        where = f"{path}: cases[{i}] ({c['case']})"
        if not isinstance(c["floors"], dict) or not c["floors"]:
            # an entry that checks nothing would pass whatever happened
            raise ValueError(f"{where}: 'floors' must map implementations to their floors, "
                             f"got {c['floors']!r}")
        _check_simd(where, c)
        for impl, metrics in c["floors"].items():
            if impl not in MEASURED:      # a typo was measured as "n/a": a regression
                raise ValueError(f"{where}: unknown implementation "
                                 f"{impl!r}; floors are for {', '.join(MEASURED)}")
            if not isinstance(metrics, dict) or not metrics:
                raise ValueError(f"{where} {impl}: floors must map metrics ({', '.join(METRICS)}) "
                                 f"to numbers, got {metrics!r}")
            if impl in cases.CPU_BACKENDS and impl not in available_backends():
                # (it was measured as n/a: a regression, with profiling advice)
                reason = backend_info().get(impl, {}).get("reason", "")
                raise ValueError(f"{where}: a floor for the {impl} backend, which is not "
                                 f"available here{f' ({reason})' if reason else ''}: build or "
                                 "install it, or drop the floor")
            for metric, floor in metrics.items():
                if metric not in METRICS:
                    raise ValueError(f"{where} {impl}: unknown "
                                     f"metric {metric!r}; use one of {sorted(METRICS)}")
                if not _is_number(floor) or floor <= 0:
                    raise ValueError(f"{where} {impl} {metric}: "
                                     f"floor must be a positive number, got {floor!r}")
                if impl == metric:      # NumPy over itself: 1.0 whatever happened
                    raise ValueError(f"{where} {impl}: a {metric} floor for {impl} itself "
                                     "measures nothing; floor fastopt's backends "
                                     f"({', '.join(cases.CPU_BACKENDS)}) against {metric}")
                if metric == "torch" and not cases.KIND[kind].in_torch:
                    raise ValueError(f"{path}: cases[{i}] ({c['case']}) {impl}: torch has no "
                                     f"{cases.KIND[kind].optimizer}; floor its numpy metric")
                if metric == "torch" and importlib.util.find_spec("torch") is None:
                    # (it was measured as n/a: reported as a performance regression)
                    raise ValueError(f"{where} {impl}: a torch floor, but torch is not "
                                     "installed here (pip install torch, or drop the floor)")
    return spec


#: the implementations a floor may be set for (what _measure times)
MEASURED = (*cases.CPU_BACKENDS, "numpy")

# A case's "simd" measures that build of the Cython kernels (cython floors
# only) in a child process started with FASTOPT_CYTHON_SIMD, so that a CI
# host with AVX-512 also guards the AVX2 build every other x86 CPU loads
# (Lion's step and the 8-bit state codecs each ran scalar there, unseen).

def _label(case, simd) -> str:
    return f"{case} [{simd}]" if simd else case


def label(c) -> str:
    """A floors entry's name in reports: its case, and the build it measures."""
    return _label(c["case"], c.get("simd"))


def _check_simd(where, c):
    if "simd" not in c:
        return
    if c["simd"] not in SIMD_BUILDS:
        raise ValueError(f"{where}: simd must be one of {', '.join(SIMD_BUILDS)}, got "
                         f"{c['simd']!r}")
    others = sorted(set(c.get("floors") or {}) - {"cython"})
    if others:
        raise ValueError(f"{where}: simd picks the Cython build; floor only cython there "
                         f"(Numba compiles for this CPU), not {', '.join(others)}")

# what a floors file and each of its cases may hold ("about" and "measured":
# words and the ratios the floors were set against, for the reader)
_TOP_KEYS = ("about", "attempts", "pause_s", "rounds", "cases")
_CASE_KEYS = ("case", "floors", "measured", "kind", "shape", "tensors", "dtype", "clip",
              "layout", "simd")


def _is_number(value) -> bool:
    """A finite JSON number (not true/false, not NaN)."""
    return (not isinstance(value, bool) and isinstance(value, (int, float))
            and math.isfinite(value))


def _refuse_unknown(where, d, known):
    """A misspelt key would be ignored, and the check it meant not made."""
    for key in d:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{where}: unknown key {key!r}{hint}; it may hold "
                             f"{', '.join(known)}")


def _check_spelled(path, i, c, named):
    """A case spelled out (kind, shape, ...) is valid, and where its name is
    a workload in fastopt.bench.cases it is that workload: a floor means the
    same case as the table's row and the asv benchmark of that name."""
    if c["kind"] not in cases.KINDS:
        raise ValueError(f"{path}: cases[{i}] kind {c['kind']!r} not in {cases.KINDS}")
    if c.get("layout", "packed") not in cases.LAYOUTS:
        raise ValueError(f"{path}: cases[{i}] layout {c['layout']!r} not in {cases.LAYOUTS}")
    shape, tensors = c["shape"], c.get("tensors", 1)
    if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape):
        raise ValueError(f"{path}: cases[{i}] shape must be a list of positive ints, "
                         f"got {shape!r}")
    if isinstance(tensors, bool) or not isinstance(tensors, int) or tensors < 1:
        raise ValueError(f"{path}: cases[{i}] tensors must be an int >= 1, got {tensors!r}")
    if c.get("dtype", "float32") not in ("float32", "float64"):
        raise ValueError(f"{path}: cases[{i}] dtype must be 'float32' or 'float64', got "
                         f"{c['dtype']!r}")
    if not isinstance(c.get("clip", False), bool):
        raise ValueError(f"{path}: cases[{i}] clip must be true or false, got {c['clip']!r}")
    row = case_row(c)
    if named is not None and row != named:
        diff = [f"{k} {_show(row, k)} (fastopt.bench.cases: {_show(named, k)})"
                for k in row._fields if getattr(row, k) != getattr(named, k)]
        raise ValueError(f"{path}: cases[{i}] ({c['case']}) is not the workload of that name "
                         f"in fastopt.bench.cases: {'; '.join(diff)}. Drop kind/shape/... to "
                         "measure the workload, or rename the case")


def _show(row, field):
    value = getattr(row, field)
    if field == "shapes" and len(set(value)) == 1:
        return f"{len(value)} x {value[0]}"        # not 1000 tuples
    return value


def case_row(c):
    """The :class:`fastopt.bench.cases.Row` a floors entry measures: the one its
    ``kind``, ``shape`` and optional ``tensors``, ``dtype``, ``clip``,
    ``layout`` spell out, else the workload its ``case`` names
    (:func:`fastopt.bench.cases.workloads`)."""
    if "kind" not in c:
        return cases.workloads()[c["case"]]
    return cases.Row(c["case"], c["kind"], [tuple(c["shape"])] * c.get("tensors", 1),
                     c.get("dtype", "float32"), c.get("clip", False), c.get("layout", "packed"))


def _measure(c, rounds):
    """``(ratios by impl, seconds by impl)`` of one floors entry, or None
    where its SIMD build is not one this CPU runs."""
    if "simd" in c:
        return _measure_on_build(c, rounds)
    row = case_row(c)
    impls = [i for i in c["floors"] if i in MEASURED]
    needed = {"roofline", "numpy"} | (set(cases.TORCH_PATHS) if any(
        "torch" in m for m in c["floors"].values()) else set())
    results = ratios.compare(row, impls=(*impls, *sorted(needed - set(impls))),
                             rounds=rounds)
    return ratios.speedups(results), {r.impl: r.seconds for r in results}


# (this fastopt's folder first on sys.path: with -c the working directory
# comes first, and a checkout there is another fastopt, perhaps unbuilt)
_CHILD = """
import json, sys
sys.path.insert(0, sys.argv[3])
import fastopt
from fastopt.backends import cython_cpu
from fastopt.bench import guard
c = json.loads(sys.argv[1])
simd = c.pop("simd")
if cython_cpu.simd == simd:
    result = {"measured": guard._measure(c, int(sys.argv[2]))}
else:   # the next build down was loaded: the CPU lacks this one's features, or it is missing
    result = {"loaded": cython_cpu.simd, "cpu_runs": cython_cpu.cpu_runs(simd)}
print(sys.argv[4], json.dumps(dict(result, fastopt=fastopt.__file__)))
"""
_MARK = "fastopt-guard-result"


def _measure_on_build(c, rounds):
    """:func:`_measure` of a case's ``simd`` build, in a child process; None
    where this CPU cannot run that build. A build the CPU runs that did not
    load (missing from the install, or failing to import) is an error."""
    import os
    import subprocess
    import sys
    import fastopt
    root = os.path.dirname(os.path.dirname(fastopt.__file__))
    env = dict(os.environ, **{SIMD_CAP_VAR: c["simd"]})
    out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(c), str(rounds), root, _MARK],
                         env=env, capture_output=True, text=True, timeout=900)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(_MARK + " ")]
    if out.returncode or not lines:
        raise RuntimeError(f"measuring {label(c)} in a child process failed (exit "
                           f"{out.returncode}):\n{out.stdout[-1000:]}{out.stderr[-2000:]}")
    result = json.loads(lines[-1][len(_MARK) + 1:])
    if result["fastopt"] != fastopt.__file__:
        raise RuntimeError(f"measuring {label(c)}: the child process imported "
                           f"{result['fastopt']}, not {fastopt.__file__}")
    if "measured" in result:
        return result["measured"]
    if result["cpu_runs"]:
        raise RuntimeError(f"this CPU runs the {c['simd']} build, but the Cython kernels "
                           f"loaded {result['loaded']} under {SIMD_CAP_VAR}={c['simd']}: "
                           "that build is missing from this install or failed to import "
                           "(fastopt info says which)")
    return None


def select_cases(spec, patterns):
    """``spec`` with only the cases whose label (``adamw 1 x 16M``,
    ``... [x86-64-v3]``) matches one of ``patterns``: a shell-style glob
    (``"adamw*"``) or, without ``*?[``, a part of the label. None matching
    is a ValueError listing the labels."""
    import fnmatch

    def matches(text, pattern):
        if any(ch in pattern for ch in "*?["):
            return fnmatch.fnmatchcase(text, pattern)
        return pattern in text
    kept = [c for c in spec["cases"] if any(matches(label(c), p) for p in patterns)]
    if not kept:
        shown = ", ".join(repr(label(c)) for c in spec["cases"])
        raise ValueError(f"--case {' '.join(map(repr, patterns))} matches none of the "
                         f"floors file's cases: {shown}")
    return {**spec, "cases": kept}


def run_checks(spec, attempts=None, rounds=None, progress=None):
    """Measure every case; re-measure cases with a check below its floor."""
    attempts = spec.get("attempts", 3) if attempts is None else attempts
    rounds = spec.get("rounds", 5) if rounds is None else rounds
    if attempts < 1 or rounds < 1:
        raise ValueError(f"attempts and rounds must be >= 1, got {attempts} and {rounds}")
    # a busy spell of a shared machine (another job's threads competing for
    # the cores) hurts threaded kernels more than single-threaded NumPy; give
    # it time to pass before measuring again
    pause = spec.get("pause_s", 2.0)
    checks = []
    for c in spec["cases"]:
        mine = [Check(c["case"], impl, metric, float(floor), simd=c.get("simd"))
                for impl, metrics in c["floors"].items()
                for metric, floor in metrics.items()]
        for attempt in range(attempts):
            if attempt:
                time.sleep(pause * attempt)
            if progress:
                progress(f"{label(c)} (attempt {attempt + 1})")
            measured = _measure(c, rounds)
            if measured is None:
                for ch in mine:
                    ch.skipped = f"this CPU cannot run the {c['simd']} build"
                break
            ratios, times = measured
            for ch in mine:
                if not ch.ok:
                    ch.measured.append(ratios.get(ch.impl, {}).get(_RATIO[ch.metric]))
                    ch.times = times
            if all(ch.ok for ch in mine):
                break
        checks += mine
    return checks


#: the layout of check-perf's --json (raised when a key changes meaning
#: or goes; new keys keep it)
JSON_SCHEMA = 1


def as_json(checks, floors_path, exit_status, error=None, load=None, run=None) -> dict:
    """The result of a check-perf run for a CI job to read: every check,
    the machine, its load while measuring (``fastopt bench``'s ``load``; None
    where nothing was measured), the run (``fastopt bench``'s ``run``: when,
    the options, fastopt's commit) and the exit status (0 ok, 1 regression,
    2 setup or nothing measured, 3 measuring failed, 130 / 143 interrupted
    by Ctrl-C / SIGTERM) with ``error`` saying why where it is not 0 or 1."""
    from . import machine
    return {"schema": JSON_SCHEMA, "run": run,
            "floors": floors_path or DEFAULT_FLOORS, "exit_status": exit_status,
            "ok": exit_status == 0, "error": error, "machine": machine.describe(),
            "load": load,
            "checks": [{"case": ch.case, "simd": ch.simd, "impl": ch.impl, "metric": ch.metric,
                        "metric_means": METRICS[ch.metric], "floor": ch.floor,
                        "measured": ch.measured, "best": ch.best, "ok": ch.ok,
                        "skipped": ch.skipped or None,
                        "seconds_per_step": ch.times} for ch in checks]}


def report(checks, floors_path=None) -> str:
    floors_path = floors_path or DEFAULT_FLOORS
    width = max([24] + [len(ch.label) for ch in checks])
    lines = [f"{'case':<{width}} {'impl':<7} {'metric':<9} {'floor':>7} {'best':>7}  result"]
    for ch in checks:
        best = "-" if ch.best is None else f"{ch.best:.2f}"
        result = f"skipped: {ch.skipped}" if ch.skipped else "ok" if ch.ok else "REGRESSION"
        lines.append(f"{ch.label:<{width}} {ch.impl:<7} {ch.metric:<9} {ch.floor:>7.2f} "
                     f"{best:>7}  {result}")
    failed = [ch for ch in checks if not ch.ok]
    for ch in failed:
        tried = ", ".join("n/a" if v is None else f"{v:.2f}" for v in ch.measured)
        times = ", ".join(f"{k} {v * 1e6:.1f} us" for k, v in ch.times.items() if v)
        lines += ["",
                  f"PERFORMANCE REGRESSION in '{ch.label}': {ch.impl} "
                  f"{METRICS[ch.metric]} is below its floor {ch.floor:.2f} on every "
                  f"attempt ({tried}).",
                  f"  last attempt, time per step: {times}"]
    if failed:
        lines += ["",
                  f"The floors live in {floors_path}. Ratios are same-run, so machine "
                  "noise alone rarely explains this; profile the kernel (Numba: "
                  "inspect_asm / inspect_llvm for float64 promotion or lost "
                  "vectorisation; Cython: perf annotate of the extension, gcc's "
                  "-fopt-info-vec-missed). If the slowdown is intended, lower the floor in "
                  "the same commit and say why."]
    return "\n".join(lines)
