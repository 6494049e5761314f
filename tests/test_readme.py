"""The README's first example is a program, not a sketch: it runs as it
stands and does what its text says (the first thing a new user copies;
it once stopped at an undefined `W1`)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_quick_start_runs_as_it_stands_and_converges():
    text = README.read_text(encoding="utf-8")
    first = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(first, "README.md quick start", "exec"), {"__name__": "__readme__"})
    mse = float(re.fullmatch(r"mean squared error (\S+)\n", out.getvalue()).group(1))
    # the noise's variance is 0.01: the fit found the weights
    assert 0.005 < mse < 0.015, out.getvalue()
    assert "prints about 0.0094" in text
