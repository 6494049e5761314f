"""The import direction of the package: no module imports one of a higher
level (CONTRIBUTING.md has the map). A new module goes into LEVELS."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "fastopt"

# lowest first; a module may import its own level and those below
LEVELS = [
    {"_validate", "_warn", "_held", "_registry", "_openmp", "_plotting", "_memory",
     "_numba_cache", "_files", "_cpuinfo", "_launcher", "_arguments", "schedules", "params", "data"},
    {"backends", "cuda"},
    {"clip", "functional", "checkpoint", "optim"},
    {"fastopt"},                    # the public API (fastopt/__init__.py re-exports)
    {"nn"},
    {"distributed"},
    {"examples", "bench"},
    {"cli", "__main__"},      # python -m fastopt: the command line
]
LEVEL = {name: i for i, names in enumerate(LEVELS) for name in names}


def _area(module: str) -> str:
    """``fastopt.nn.layers`` -> ``nn``; a name of the package itself
    (``fastopt.get_num_threads``) -> ``fastopt``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LEVEL else "fastopt"


def _imports(path: pathlib.Path):
    """The fastopt modules ``path`` imports (relative imports resolved)."""
    package = list(path.relative_to(ROOT.parent).parts[:-1])   # fastopt, fastopt/nn, ...
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                if node.module:
                    yield ".".join(base + [node.module])
                else:
                    yield from (".".join(base + [a.name]) for a in node.names)
            elif node.module and node.module.split(".")[0] == "fastopt":
                if node.module == "fastopt":
                    yield from ("fastopt." + a.name for a in node.names)
                else:
                    yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.split(".")[0] == "fastopt")


def _modules():
    return sorted(p for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_area_has_a_level():
    areas = {p.relative_to(ROOT).parts[0].removesuffix(".py") for p in _modules()}
    assert areas - {"__init__"} <= set(LEVEL), sorted(areas - set(LEVEL) - {"__init__"})


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_a_higher_level(path):
    rel = path.relative_to(ROOT)
    own = "fastopt" if rel.parts[0] == "__init__.py" else rel.parts[0].removesuffix(".py")
    upward = [m for m in _imports(path) if LEVEL[_area(m)] > LEVEL[own]]
    assert not upward, f"{rel} (level {LEVEL[own]}, {own}) imports {upward}"
