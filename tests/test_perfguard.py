"""The CI performance regression guard (``fastopt check-perf``).

``test_committed_floors_hold`` is the guard itself: it measures the
same-run ratios named in fastopt/bench/floors.json (the floors ``fastopt
check-perf`` ships with) and fails CI when one stays below its floor, after
re-measuring it. The other tests show that the guard's logic works: it
re-measures before failing, it catches a planted slowdown, and its message
says what regressed and where the floors live.
"""

from __future__ import annotations

import json
import textwrap
import time

import pytest

import fastopt
from fastopt.bench import cases
from fastopt.bench import guard as perfguard
from fastopt.backends import get_backend

FLOORS = str(perfguard.shipped_floors())


def _spec(cases, attempts=3):
    return {"attempts": attempts, "rounds": 3, "pause_s": 0, "cases": cases}


@pytest.mark.perf
def test_committed_floors_hold():
    spec = perfguard.load_floors(FLOORS)
    checks = perfguard.run_checks(spec)
    assert checks and all(ch.ok for ch in checks), "\n" + perfguard.report(checks, FLOORS)


def _adamw_16m_case(backend):
    case = next(c for c in perfguard.load_floors(FLOORS)["cases"]
                if c["case"] == "adamw 1 x 16M" and "simd" not in c)
    return dict(case, floors={backend: case["floors"][backend]})


@pytest.mark.perf
@pytest.mark.parametrize("backend", [b for b in ("numba", "cython")
                                     if b in fastopt.available_backends()])
def test_planted_slowdown_is_caught(monkeypatch, backend):
    """A kernel that does its memory traffic three times over (what a lost
    fusion or vectorisation looks like) fails the committed floors."""
    module = get_backend(backend)
    fast = module.step      # the optimizer's one native call per group

    def slowed(*args, **kwargs):
        for _ in range(3):
            result = fast(*args, **kwargs)
        return result
    monkeypatch.setattr(module, "step", slowed)
    checks = perfguard.run_checks(_spec([_adamw_16m_case(backend)], attempts=2))
    failed = [ch for ch in checks if not ch.ok]
    assert failed, perfguard.report(checks)
    # the roofline ratio is the sharp one (a 3x slower step sits at about a
    # third of it); the NumPy speedup may or may not drop below its floor
    assert "roofline" in {ch.metric for ch in failed}
    assert all(len(ch.measured) == 2 for ch in failed)      # re-measured first
    text = perfguard.report(checks, "fastopt/bench/floors.json")
    assert f"PERFORMANCE REGRESSION in 'adamw 1 x 16M': {backend}" in text
    assert "fraction of the streaming kernel's speed is below its floor 0.60" in text
    assert "fastopt/bench/floors.json" in text


@pytest.mark.perf
@pytest.mark.skipif("cython" not in fastopt.available_backends(), reason="needs Cython")
def test_planted_fixed_cost_is_caught(monkeypatch):
    """0.3 ms added to every step (a lock, a sync, a Python loop over the
    arrays on the way in): the 16M and 1000 x 1k floors let it through, the
    small plain-list cases' floors do not."""
    module = get_backend("cython")
    make = module.list_step

    def with_a_fixed_cost(*args, **kwargs):
        run = make(*args, **kwargs)

        def slowed(*a, **kw):
            start = time.perf_counter()
            while time.perf_counter() - start < 3e-4:
                pass
            return run(*a, **kw)
        return slowed
    monkeypatch.setattr(module, "list_step", with_a_fixed_cost)
    small = [dict(c, floors={"cython": c["floors"]["cython"]})
             for c in perfguard.load_floors(FLOORS)["cases"]
             if c["case"] in ("list adamw 1 x 1", "list adamw 10 x 1k")]
    checks = perfguard.run_checks(_spec(small, attempts=1))
    assert len(checks) == 2 and not any(ch.ok for ch in checks), perfguard.report(checks)


def test_noise_passes_after_a_remeasure(monkeypatch):
    """Low once, fine the second time: passes, with both ratios recorded."""
    values = iter([0.3, 0.9])
    monkeypatch.setattr(perfguard, "_measure", lambda c, rounds: (
        {"numba": {"roofline": next(values)}}, {"numba": 1e-3}))
    case = {"case": "x", "kind": "adamw", "shape": [8], "floors": {"numba": {"roofline": 0.5}}}
    (check,) = perfguard.run_checks(_spec([case]))
    assert check.ok and check.measured == [0.3, 0.9]


def test_persistent_drop_fails_after_every_attempt(monkeypatch):
    calls = []
    monkeypatch.setattr(perfguard, "_measure", lambda c, rounds: (
        calls.append(1) or ({"numba": {"numpy": 1.5}}, {"numba": 2e-3, "numpy": 3e-3})))
    case = {"case": "x", "kind": "adamw", "shape": [8], "floors": {"numba": {"numpy": 4}}}
    (check,) = perfguard.run_checks(_spec([case], attempts=3))
    assert not check.ok and len(calls) == 3 and check.measured == [1.5, 1.5, 1.5]
    text = perfguard.report([check])
    assert "speedup vs straightforward NumPy is below its floor 4.00" in text
    assert "(1.50, 1.50, 1.50)" in text and "numba 2000.0 us" in text


def test_unmeasurable_ratio_fails(monkeypatch):
    monkeypatch.setattr(perfguard, "_measure", lambda c, rounds: ({}, {}))
    case = {"case": "x", "kind": "adamw", "shape": [8], "floors": {"numba": {"numpy": 1}}}
    (check,) = perfguard.run_checks(_spec([case], attempts=1))
    assert not check.ok and "n/a" in perfguard.report([check])


@pytest.mark.parametrize("content, match", [
    ("{", "not valid JSON"),
    ('{"attempts": 0, "cases": []}', "attempts must be an int >= 1"),
    ('{"attempts": 1.5, "cases": []}', "attempts must be an int >= 1, got 1.5"),
    ('{"rounds": 2.5, "cases": []}', "rounds must be an int >= 1, got 2.5"),
    ('{"pause_s": -1, "cases": []}', "pause_s must be a number >= 0"),
    ('{"cases": []}', "non-empty 'cases'"),
    ('{"cases": [{"case": "a", "kind": "adamw", "floors": {}}]}',
     "\\(a\\) gives kind without shape: a case of your own spells both"),
    # half of a workload spelled out: meant the workload, or a case of one's own?
    ('{"cases": [{"case": "adamw 1000 x 1k", "kind": "adamw", "floors": {}}]}',
     "gives kind without shape: drop kind to measure the workload of that name"),
    ('{"cases": [{"case": "adamw 1000 x 1k", "shape": [4], "floors": {}}]}',
     "gives shape without kind: drop shape to measure"),
    ('{"cases": [{"case": "a", "kind": "adamw"}]}', "lacks \\['floors', 'shape'\\]"),
    # checks that measure nothing, or twice under one name
    ('{"cases": [{"case": "adamw 1000 x 1k", "floors": {"numpy": {"numpy": 1}}}]}',
     "a numpy floor for numpy itself measures nothing"),
    ('{"cases": [{"case": "adamw 1000 x 1k", "floors": {"numba": {"numpy": 1}}}, '
     '{"case": "adamw 1000 x 1k", "floors": {"cython": {"numpy": 1}}}]}',
     "cases\\[1\\] and cases\\[0\\] are both 'adamw 1000 x 1k'"),
    ('{"cases": [{"case": "a", "kind": "adam", "shape": [4], "floors": {}}]}', "kind 'adam'"),
    ('{"cases": [{"case": "a", "floors": {}}]}',
     "lacks \\['kind', 'shape'\\] \\(nor does its case name a workload"),
    ('{"cases": [{"case": "a", "kind": "sgd", "shape": [4], "layout": "dict", "floors": {}}]}',
     "layout 'dict'"),
    ('{"cases": [{"case": "list lion 1000 x 1k", "floors": {"numba": {"torch": 2}}}]}',
     "torch has no Lion; floor its numpy metric"),
    ('{"cases": [{"case": "sgd nesterov 1 x 16M", "kind": "sgd", "shape": [1000], '
     '"tensors": 1000, "floors": {}}]}',
     "is not the workload of that name in fastopt.bench.cases: shapes 1000 x \\(1000,\\) "
     "\\(fastopt.bench.cases: 1 x \\(16777216,\\)\\)"),
    ('{"cases": [{"case": "a", "kind": "sgd", "shape": [4], '
     '"floors": {"numba": {"speed": 2}}}]}', "unknown metric 'speed'"),
    ('{"cases": [{"case": "a", "kind": "sgd", "shape": [4], '
     '"floors": {"numba": {"numpy": -1}}}]}', "positive number"),
    # malformed files: one clear line each, never a traceback (exit 1 reads as a regression)
    ("[1, 2]", "must hold a JSON object with a 'cases' list, got list"),
    ('{"cases": ["adamw 1000 x 1k"]}', "cases\\[0\\] must be an object"),
    ('{"cases": [{"case": [1], "floors": {}}]}', "case must be a name"),
    ('{"cases": [{"case": "adamw 1000 x 1k", "floors": [1, 2]}]}',
     "'floors' must map implementations"),
    ('{"cases": [{"case": "x", "kind": "adamw", "shape": [4], "tensors": 0, '
     '"floors": {"numba": {"numpy": 1}}}]}', "tensors must be an int >= 1, got 0"),
    ('{"cases": [{"case": "x", "kind": "adamw", "shape": "abc", '
     '"floors": {"numba": {"numpy": 1}}}]}', "shape must be a list of positive ints"),
    # files that would check nothing, or not what they meant to: refused
    ('{"cases": [{"case": "adamw 1000 x 1k", "floors": {}}]}', "'floors' must map"),
    ('{"cases": [{"case": "adamw 1000 x 1k", "floors": {"cython": {}}}]}',
     "cython: floors must map metrics"),
    ('{"cases": [{"case": "adamw 1000 x 1k", "floors": {"cython": {"numpy": true}}}]}',
     "positive number, got True"),
    ('{"cases": [{"case": "adamw 1000 x 1k", "floors": {"cython": {"numpy": NaN}}}]}',
     "positive number, got nan"),
    ('{"attempt": 9, "cases": [{"case": "adamw 1000 x 1k", "floors": {"cython": {"numpy": 1}}}]}',
     "unknown key 'attempt' \\(did you mean 'attempts'\\?\\)"),
    ('{"cases": [{"case": "adamw 1000 x 1k", "floor": {}, "floors": {"cython": {"numpy": 1}}}]}',
     "cases\\[0\\]: unknown key 'floor' \\(did you mean 'floors'\\?\\)"),
    # a SIMD build: of the Cython kernels only, spelled as the loader names them
    ('{"cases": [{"case": "adamw 1000 x 1k", "simd": "avx2", "floors": {"cython": {"numpy": 1}}}]}',
     "simd must be one of x86-64-v4, x86-64-v3, baseline, got 'avx2'"),
    ('{"cases": [{"case": "adamw 1000 x 1k", "simd": "baseline", '
     '"floors": {"cython": {"numpy": 1}, "numba": {"numpy": 1}}}]}',
     "simd picks the Cython build; floor only cython there .* not numba"),
    ('{"cases": [{"case": "adamw 1000 x 1k", "simd": "baseline", "floors": 5}]}',
     "'floors' must map implementations"),
    # a misspelt implementation was measured as "n/a": a performance regression
    ('{"cases": [{"case": "list rmsprop 1000 x 1k", "floors": {"cyton": {"numpy": 3}}}]}',
     "unknown implementation 'cyton'; floors are for numba, cython, numpy"),
])
def test_bad_floors_file(tmp_path, content, match):
    path = tmp_path / "floors.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        perfguard.load_floors(str(path))


@pytest.mark.skipif("cython" not in fastopt.available_backends(), reason="needs the Cython build")
def test_a_simd_case_measures_that_build_in_a_child_process(tmp_path):
    """A case with "simd" runs under FASTOPT_CYTHON_SIMD in a child process:
    an AVX-512 CI host guards the portable build (and the AVX2 one) too.
    Beside it, the same workload without a build: two entries, two rows."""
    path = tmp_path / "floors.json"
    path.write_text(json.dumps({"rounds": 1, "attempts": 1, "cases": [
        {"case": "list adamw 10 x 1k", "simd": "baseline", "floors": {"cython": {"numpy": 1e-3}}},
        {"case": "list adamw 10 x 1k", "floors": {"cython": {"numpy": 1e-3}}}]}))
    checks = perfguard.run_checks(perfguard.load_floors(str(path)))
    assert [ch.label for ch in checks] == ["list adamw 10 x 1k [baseline]", "list adamw 10 x 1k"]
    assert all(ch.ok and not ch.skipped and ch.best > 1e-3 for ch in checks), \
        perfguard.report(checks)
    assert "list adamw 10 x 1k [baseline] cython" in perfguard.report(checks)
    got = perfguard.as_json(checks, str(path), 0)["checks"]
    assert [(c["case"], c["simd"]) for c in got] == [("list adamw 10 x 1k", "baseline"),
                                                    ("list adamw 10 x 1k", None)]


@pytest.mark.skipif("cython" not in fastopt.available_backends(), reason="needs the Cython build")
def test_a_simd_build_the_cpu_runs_but_that_is_missing_fails(monkeypatch, tmp_path):
    """A build the CPU runs but the install lacks loaded the next one down,
    and passed as "this CPU cannot run it": the gap the per-build floors
    are there to close. The child is told the build does not import."""
    from fastopt.backends import cython_cpu
    simd = cython_cpu.simd if cython_cpu.simd != "baseline" else None
    if simd is None:
        pytest.skip("this CPU runs only the portable build")
    hook = tmp_path / "sitecustomize.py"      # the child's kernels_v3/_v4 fail to import
    hook.write_text(textwrap.dedent("""
        import sys
        class _Block:
            def find_spec(self, name, path=None, target=None):
                if name.startswith("fastopt.backends._cython.kernels_v"):
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, _Block())
    """))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    case = {"case": "list adamw 10 x 1k", "simd": simd, "floors": {"cython": {"numpy": 1e-3}}}
    with pytest.raises(RuntimeError, match=f"this CPU runs the {simd} build, but the Cython "
                                           "kernels loaded baseline"):
        perfguard._measure_on_build(case, 1)


def test_a_simd_build_this_cpu_lacks_is_skipped_by_the_child(monkeypatch):
    """The real child's answer where the CPU cannot run the build (AVX-512
    on this host, or a CPU said to lack AVX2)."""
    pytest.importorskip("fastopt.backends.cython_cpu")
    from fastopt.backends import cython_cpu
    simd = next((s for s in ("x86-64-v4", "x86-64-v3") if not cython_cpu.cpu_runs(s)), None)
    if simd is None:
        pytest.skip("this CPU runs every build")
    case = {"case": "list adamw 10 x 1k", "simd": simd, "floors": {"cython": {"numpy": 1e-3}}}
    assert perfguard._measure_on_build(case, 1) is None


def test_a_simd_build_the_cpu_cannot_run_is_skipped_not_failed(monkeypatch):
    monkeypatch.setattr(perfguard, "_measure_on_build", lambda c, rounds: None)
    case = {"case": "adamw 1000 x 1k", "simd": "x86-64-v4", "floors": {"cython": {"numpy": 1}}}
    checks = perfguard.run_checks(_spec([case]))
    assert checks[0].ok and "cannot run the x86-64-v4 build" in checks[0].skipped
    assert "adamw 1000 x 1k [x86-64-v4] cython" in perfguard.report(checks)
    assert "skipped: this CPU cannot run the x86-64-v4 build" in perfguard.report(checks)


def test_a_case_named_by_its_workload(monkeypatch, tmp_path):
    """``{"case": <name of a fastopt.bench workload>, "floors": ...}``
    measures that workload, its layout included: the guard's case is the
    table's row and the asv benchmark of the same name."""
    path = tmp_path / "floors.json"
    path.write_text(json.dumps({"cases": [
        {"case": "list rmsprop centered 1000 x 1k", "floors": {"numba": {"torch": 1.0}}}]}))
    (case,) = perfguard.load_floors(str(path))["cases"]
    seen = {}

    def compare(row, impls, rounds):
        seen.update(row=row, impls=impls)
        return []
    monkeypatch.setattr(perfguard.ratios, "compare", compare)
    perfguard._measure(case, rounds=1)
    row = cases.workloads()["list rmsprop centered 1000 x 1k"]
    assert seen["row"] == row and (row.kind, row.layout) == ("rmsprop-centered", "list")
    assert set(seen["impls"]) == {"numba", "numpy", "roofline", *cases.TORCH_PATHS}


def test_a_floors_path_that_is_no_json_file_is_named(tmp_path):
    # UnicodeDecodeError's message names no file; a directory raised
    # IsADirectoryError past the ValueError the command reports
    bad = tmp_path / "floors.json"
    bad.write_bytes(b"\xff\xfe{")
    with pytest.raises(ValueError, match=f"floors file '{bad}' is not UTF-8 text"):
        perfguard.load_floors(str(bad))
    with pytest.raises(ValueError, match=f"floors file '{tmp_path}' is a directory"):
        perfguard.load_floors(str(tmp_path))


@pytest.mark.parametrize("ratio, code", [(2.0, 0), (0.5, 1)])
def test_check_perf_json_result(monkeypatch, tmp_path, capsys, ratio, code):
    """--json writes what a CI job reads: each check's floor, ratios and
    times, the exit status, the machine."""
    from fastopt.cli import main
    path, out = tmp_path / "floors.json", tmp_path / "result.json"
    path.write_text(json.dumps({"attempts": 2, "pause_s": 0, "cases": [
        {"case": "tiny", "kind": "sgd", "shape": [64], "floors": {"numba": {"numpy": 1.0}}}]}))
    monkeypatch.setattr(perfguard, "_measure", lambda c, rounds: (
        {"numba": {"numpy": ratio}}, {"numba": 1e-3, "numpy": 2e-3}))
    assert main(["check-perf", "--floors", str(path), "--json", str(out)]) == code
    result = json.loads(out.read_text())
    assert (result["exit_status"], result["ok"], result["error"]) == (code, not code, None)
    (check,) = result["checks"]
    assert check["case"] == "tiny" and check["impl"] == "numba" and check["floor"] == 1.0
    assert check["measured"] == [ratio] * (1 if ratio > 1 else 2)
    assert check["ok"] == (not code) and check["seconds_per_step"]["numpy"] == 2e-3
    assert result["machine"]["fastopt"] == fastopt.__version__
    assert result["machine"]["numba"] and "processor" in result["machine"]
    # the machine's load while measuring, as fastopt bench reports it: a CI
    # job reading a failure needs to know the machine was busy
    assert set(result["load"]) >= {"loadavg_before", "loadavg_after", "other_processes"}
    assert "note" in result["load"]["other_processes"]


def test_check_perf_json_says_why_nothing_was_measured(monkeypatch, tmp_path, capsys):
    from fastopt.cli import main
    path, out = tmp_path / "floors.json", tmp_path / "result.json"
    path.write_text('{"cases": []}')
    assert main(["check-perf", "--floors", str(path), "--json", str(out)]) == 2
    result = json.loads(out.read_text())
    assert result["exit_status"] == 2 and "non-empty 'cases'" in result["error"]
    assert result["load"] is None
    # an unwritable --json is refused before measuring, not after
    monkeypatch.setattr(perfguard, "run_checks", lambda *a, **k: pytest.fail("measured"))
    assert main(["check-perf", "--json", str(tmp_path)]) == 2
    assert f"--json {tmp_path}: is a directory" in capsys.readouterr().err
    assert main(["check-perf", "--json", str(tmp_path / "no" / "r.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_committed_cases_are_the_tables_workloads():
    """Every committed floor names a case of fastopt.bench and measures
    exactly it (load_floors refuses a spelled-out case that differs)."""
    spec = perfguard.load_floors(FLOORS)
    named = cases.workloads()
    for c in spec["cases"]:
        assert perfguard.case_row(c) == named[c["case"]]


def test_missing_floors_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="--floors"):
        perfguard.load_floors(str(tmp_path / "nope.json"))


def test_committed_floors_file_is_valid():
    spec = perfguard.load_floors(FLOORS)
    assert json.load(open(FLOORS))["attempts"] == spec["attempts"] >= 2


@pytest.mark.parametrize("ratio, code", [(2.0, 0), (0.5, 1)])
def test_check_perf_command_exit_code(monkeypatch, tmp_path, capsys, ratio, code):
    from fastopt.cli import main
    path = tmp_path / "floors.json"
    path.write_text(json.dumps({"attempts": 2, "pause_s": 0, "cases": [
        {"case": "tiny", "kind": "sgd", "shape": [64], "floors": {"numba": {"numpy": 1.0}}}]}))
    monkeypatch.setattr(perfguard, "_measure", lambda c, rounds: (
        {"numba": {"numpy": ratio}}, {"numba": 1e-3}))
    assert main(["check-perf", "--floors", str(path)]) == code
    out = capsys.readouterr()
    assert ("REGRESSION" in out.out) == bool(code)
    assert "measuring tiny (attempt 1)" in out.err


def test_a_torch_floor_without_torch_is_a_configuration_error(tmp_path, monkeypatch):
    """It was measured as n/a on every attempt and reported as a performance
    regression (exit 1): a CI would read a missing dependency as a slowdown."""
    import importlib.util
    path = tmp_path / "floors.json"
    path.write_text(json.dumps({"cases": [{"case": "list adamw 1 x 1",
                                           "floors": {"numba": {"torch": 1}}}]}))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else real(name, *a))
    with pytest.raises(ValueError, match="a torch floor, but torch is not installed"):
        perfguard.load_floors(str(path))


def test_a_floor_for_a_backend_not_built_is_a_configuration_error(tmp_path, monkeypatch,
                                                                    capsys):
    """Without the Cython build every cython floor was measured as n/a four
    times and reported as a performance regression (exit 1), with advice to
    profile the kernel: a CI would read a build problem as a slowdown."""
    from fastopt.bench import guard
    from fastopt.cli import main
    path = tmp_path / "floors.json"
    path.write_text(json.dumps({"cases": [{"case": "list adamw 1 x 1",
                                           "floors": {"cython": {"numpy": 1}}}]}))
    monkeypatch.setattr(guard, "available_backends", lambda: ["numba", "numpy"])
    monkeypatch.setattr(guard, "backend_info",
                        lambda: {"cython": {"available": False, "reason": "not built"}})
    with pytest.raises(ValueError, match=r"a floor for the cython backend, which is not "
                                         r"available here \(not built\)"):
        perfguard.load_floors(str(path))
    assert main(["check-perf", "--floors", str(path)]) == 2


def test_a_measurement_that_fails_exits_3_not_as_a_regression(tmp_path, monkeypatch, capsys):
    # a case too large for memory raised out of the measurement and exited
    # 1, the code of a performance regression
    from fastopt.cli import main
    path = tmp_path / "floors.json"
    path.write_text(json.dumps({"cases": [
        {"case": "tiny", "kind": "sgd", "shape": [64], "floors": {"numba": {"numpy": 1.0}}}]}))

    def fail(c, rounds):
        raise MemoryError("Unable to allocate 3.64 TiB")
    monkeypatch.setattr(perfguard, "_measure", fail)
    assert main(["check-perf", "--floors", str(path)]) == 3
    assert "measuring failed: MemoryError" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["check-perf", "--help"])
    assert "1 a ratio below its floor" in capsys.readouterr().out


def test_check_perf_case_selects_the_cases_to_measure(monkeypatch, tmp_path, capsys):
    """--case PATTERN (a part of the name, or a glob), repeatable: a CI job
    that guards one kernel, or reruns the one that failed."""
    from fastopt.cli import main
    path = tmp_path / "floors.json"
    path.write_text(json.dumps({"attempts": 1, "pause_s": 0, "cases": [
        {"case": name, "kind": "sgd", "shape": [64], "floors": {"numba": {"numpy": 1.0}}}
        for name in ("sgd tiny", "adamw tiny", "adamw small")]}))
    measured = []
    monkeypatch.setattr(perfguard, "_measure", lambda c, rounds: (
        measured.append(c["case"]) or ({"numba": {"numpy": 2.0}}, {"numba": 1e-3})))
    assert main(["check-perf", "--floors", str(path), "--case", "adamw*"]) == 0
    assert measured == ["adamw tiny", "adamw small"]
    del measured[:]
    assert main(["check-perf", "--floors", str(path), "--case", "small",
                 "--case", "sgd"]) == 0
    assert measured == ["sgd tiny", "adamw small"]
    del measured[:]
    capsys.readouterr()
    assert main(["check-perf", "--floors", str(path), "--case", "lion*"]) == 2
    assert measured == []
    err = capsys.readouterr().err
    assert "--case 'lion*' matches none of the floors file's cases: 'sgd tiny'" in err


def test_check_perf_that_measured_nothing_is_no_pass(monkeypatch, tmp_path, capsys):
    """Every check skipped (a floors file for a build this CPU cannot run)
    exited 0, ok: a gate that checked nothing passed. It exits 2 now; and an
    unexpected error anywhere exits 3, so that 1 means a regression only.
    The JSON carries its schema and the run (when, options, commit)."""
    from fastopt.cli import main
    path, out = tmp_path / "floors.json", tmp_path / "r.json"
    path.write_text(json.dumps({"attempts": 1, "pause_s": 0, "cases": [
        {"case": "tiny", "kind": "sgd", "shape": [64], "floors": {"numba": {"numpy": 1.0}}}]}))
    monkeypatch.setattr(perfguard, "_measure", lambda c, rounds: None)   # cannot run it
    monkeypatch.setitem(perfguard.__dict__, "_measure", lambda c, rounds: None)
    spec = perfguard.load_floors(str(path))
    spec["cases"][0]["simd"] = "x86-64-v4"
    monkeypatch.setattr(perfguard, "load_floors", lambda p: spec)
    assert main(["check-perf", "--floors", str(path), "--json", str(out)]) == 2
    result = json.loads(out.read_text())
    assert result["schema"] == 1 and result["exit_status"] == 2 and not result["ok"]
    assert "every check was skipped" in result["error"]
    assert result["run"]["started"] and result["run"]["options"]["floors"] == str(path)
    assert "every check was skipped" in capsys.readouterr().err

    def broken(*a, **k):
        raise RuntimeError("a bug in the report")
    monkeypatch.setattr(perfguard, "_measure", lambda c, rounds: (
        {"numba": {"numpy": 2.0}}, {"numba": 1e-3}))
    monkeypatch.setattr(perfguard, "report", broken)
    assert main(["check-perf", "--floors", str(path), "--json", str(out)]) == 3
    result = json.loads(out.read_text())
    assert result["exit_status"] == 3 and "RuntimeError: a bug in the report" in result["error"]
