"""Named implementation modules imported on first use.

Both backend registries (the optimizer kernels in :mod:`fastopt.backends`,
the MLP passes in :mod:`fastopt.nn`) are this: a preference-ordered map of
name -> module path, imported lazily so ``import fastopt`` stays light, with
an import failure remembered and reported instead of raised.
"""

from __future__ import annotations

import importlib

from ._held import interrupts_held


class LazyModules:
    def __init__(self, modules: dict, kind: str = "backend", aliases=None, never_auto=()):
        self.modules = dict(modules)        # name -> module path, "auto" order
        self.kind = kind                    # how errors name these ("backend", ...)
        self.aliases = dict(aliases or {})
        self.never_auto = tuple(never_auto)  # names "auto" must not pick
        self._loaded: dict = {}
        self._failed: dict = {}

    def loaded(self, name: str):
        """The module if it has been loaded already, else None (never imports)."""
        return self._loaded.get(name)

    def load(self, name: str):
        """The module, or None when it does not import here (see reason())."""
        if name in self._loaded:
            return self._loaded[name]
        if name in self._failed:
            return None
        try:
            with interrupts_held():     # (cut short, Numba stays broken: fastopt._held)
                mod = importlib.import_module(self.modules[name])
        except ImportError as exc:  # optional dependency missing (or no GPU)
            self._failed[name] = exc
            return None
        self._loaded[name] = mod
        return mod

    def reason(self, name: str) -> str:
        """Why ``name`` did not import ("" if it did or was not tried)."""
        return str(self._failed.get(name, ""))

    def available(self) -> list:
        """Names that import here, in preference order."""
        return [n for n in self.modules if self.load(n) is not None]

    def get(self, name: str = "auto"):
        """The module for ``name``; "auto" is the first importable one."""
        if not isinstance(name, str):
            raise TypeError(f"backend must be a string, got {type(name).__name__}")
        name = self.aliases.get(name, name)
        if name == "auto":
            for candidate in self.modules:
                if candidate not in self.never_auto and self.load(candidate) is not None:
                    return self._loaded[candidate]
        if name not in self.modules:
            raise ValueError(
                f"backend must be one of {['auto', *self.modules]}, got {name!r}")
        mod = self.load(name)
        if mod is None:
            raise ValueError(f"{self.kind} {name!r} is not available here: "
                             f"{self.reason(name)}")
        return mod
