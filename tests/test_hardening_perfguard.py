"""Hardening of ``fastopt check-perf`` (issue 19): the floors ship inside
the package, so an installed (non-editable) fastopt finds them from any
directory, and the repository's copy cannot drift from them."""

from __future__ import annotations

import json
import os
import sys

import pytest

import fastopt
from fastopt.bench import guard as perfguard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.dirname(os.path.abspath(fastopt.__file__))


def test_default_floors_resolve_inside_the_package():
    path = os.path.abspath(perfguard.DEFAULT_FLOORS)
    assert os.path.commonpath([path, PACKAGE]) == PACKAGE
    assert os.path.isfile(path)


def test_default_floors_load_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)        # no benchmarks/ here, as after pip install
    spec = perfguard.load_floors()
    assert spec["cases"]


def test_check_perf_runs_outside_the_repository(tmp_path, monkeypatch, capsys):
    from fastopt.cli import main
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(perfguard, "_measure", lambda c, rounds: (
        {impl: dict.fromkeys(m, 1e9) for impl, m in c["floors"].items()}, {}))
    assert main(["check-perf"]) == 0
    assert "REGRESSION" not in capsys.readouterr().out


def test_floors_are_package_data():
    """pyproject.toml ships floors.json with the package (a wheel would
    otherwise leave it out)."""
    tomllib = pytest.importorskip("tomllib") if sys.version_info >= (3, 11) else \
        pytest.importorskip("tomli")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        data = tomllib.load(f)["tool"]["setuptools"]["package-data"]
    assert "floors.json" in data.get("fastopt.bench", [])


def test_repository_copy_matches_the_shipped_floors():
    """benchmarks/floors.json (read by tests/test_perfguard.py) and the
    package's copy are one set of floors."""
    repo = os.path.join(ROOT, "benchmarks", "floors.json")
    if not os.path.exists(repo):
        pytest.skip("no benchmarks/floors.json in this checkout")
    with open(repo) as f:
        assert json.load(f) == json.loads(perfguard.shipped_floors().read_text())
