"""Hardening of ``fastopt check-perf``: the floors ship inside the package,
so an installed (non-editable) fastopt finds them from any directory."""

from __future__ import annotations

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

