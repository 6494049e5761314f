"""``fastopt.bench.thread_modes``: the serial/threaded choice against both
fixed modes. CI-sized: one small MLP whose first layer is above the size
that may go threaded, a few steps, no settle pauses."""

from __future__ import annotations

import pytest

import fastopt
from fastopt.backends import threads
from fastopt.bench import thread_modes

SMALL = dict(sizes=(256, 160, 10), batch=8, steps=3, rounds=3, warmup=2, settle=0.0,
             pause=0.0005)
COMPILED = [b for b in ("cython", "numba") if b in fastopt.available_backends()]


@pytest.mark.parametrize("backend", COMPILED)
def test_each_policy_steps_in_its_own_mode(backend, monkeypatch):
    """The fixed policies really run their mode, auto runs the tables' own
    choices, and every setting reports all three."""
    seen = {"auto": 0, "serial": 0, "threaded": 0}
    fixed_pick = threads.FixedChoice.pick
    auto_pick = threads.ThreadChoice.pick

    def spy_fixed(self, nelem, n):
        if nelem > threads.SERIAL_MAX:
            seen["threaded" if self.threaded else "serial"] += 1
        return fixed_pick(self, nelem, n)

    def spy_auto(self, nelem, n):
        if nelem > threads.SERIAL_MAX:
            seen["auto"] += 1
        return auto_pick(self, nelem, n)
    monkeypatch.setattr(threads.FixedChoice, "pick", spy_fixed)
    monkeypatch.setattr(threads.ThreadChoice, "pick", spy_auto)
    rep = thread_modes.thread_modes_case(backend=backend, **SMALL)
    assert all(seen.values()), seen
    assert set(rep["results"]) == set(thread_modes.SETTINGS)
    for r in rep["results"].values():
        assert all(r[f"{p}_s"] > 0 for p in thread_modes.POLICIES)
        assert r["auto_vs_serial"] == pytest.approx(r["auto_s"] / r["serial_s"])


def test_the_fixed_modes_are_fixed():
    big = threads.SERIAL_MAX + 1
    assert threads.FixedChoice(True).pick(big, 2) is True
    assert threads.FixedChoice(True).pick(big, 1) is False          # one thread: serial
    assert threads.FixedChoice(True).pick(threads.SERIAL_MAX, 2) is False   # small: serial
    assert threads.FixedChoice(False).pick(big, 2) is False


@pytest.mark.skipif(not COMPILED, reason="no compiled backend")
def test_matrix_runs_each_variant_in_its_own_process():
    variant = ("OPENBLAS_NUM_THREADS=1", {"OPENBLAS_NUM_THREADS": "1"}, False)
    broken = ("a backend that does not exist", {}, False)
    out = thread_modes.thread_modes_matrix(variants=(variant,), backend=COMPILED[0],
                                           settings=["hot"], **SMALL)
    assert set(out) == {variant[0]}
    assert set(out[variant[0]]["results"]) == {"hot"}
    bad = thread_modes.thread_modes_matrix(variants=(broken,), backend="no-such-backend",
                                           settings=["hot"], **SMALL)
    assert "note" in bad[broken[0]]
    table = thread_modes.format_matrix({**out, **bad})
    assert variant[0] in table and broken[0] in table and "auto/serial" in table


@pytest.mark.skipif(not COMPILED, reason="no compiled backend")
def test_the_torch_variant_runs_on_torchs_libgomp():
    """The torch variant's process imports torch before fastopt, so torch's
    bundled libgomp is the one loaded (fastopt's preload then does nothing)."""
    pytest.importorskip("torch")
    torch_first = [v for v in thread_modes.VARIANTS if v[2]]
    out = thread_modes.thread_modes_matrix(variants=torch_first, backend=COMPILED[0],
                                           settings=["hot"], **SMALL)
    report = out[torch_first[0][0]]
    assert "results" in report, report
    assert "/torch/" in report["openmp_wait"]["libgomp"]
    plain = thread_modes.thread_modes_matrix(variants=thread_modes.VARIANTS[:1],
                                             backend=COMPILED[0], settings=["hot"], **SMALL)
    plain = plain[thread_modes.VARIANTS[0][0]]
    assert plain["openmp_wait"]["set_by"] == "fastopt"
    assert not any("/torch/" in p for p in plain["libgomp"])


def test_a_process_that_times_out_is_a_note():
    out = thread_modes.thread_modes_matrix(variants=thread_modes.VARIANTS[:1], timeout=0.01,
                                           **SMALL)
    assert "took over" in out[thread_modes.VARIANTS[0][0]]["note"]


def test_help_prints_and_measures_nothing(monkeypatch, capsys):
    """``python -m fastopt.bench.thread_modes --help`` started the 2-minute
    matrix; an unknown option is refused the same way."""
    monkeypatch.setattr(thread_modes, "thread_modes_matrix",
                        lambda: pytest.fail("the matrix ran"))
    for argv, code in ((["--help"], 0), (["--rounds", "3"], 2)):
        with pytest.raises(SystemExit) as exc:
            thread_modes.main(argv)
        assert exc.value.code == code
    assert "usage: python -m fastopt.bench.thread_modes" in capsys.readouterr().out
