"""Warnings that name the user's line, however deep inside fastopt they start."""

from __future__ import annotations

import os
import sys
import warnings

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn_user(message, category=UserWarning) -> None:
    """``warnings.warn`` attributed to the first caller outside fastopt (a
    fixed stacklevel names a fastopt line when the same code is reached
    through another path: ``load_state_dict`` or ``fastopt.load``)."""
    frame, level = sys._getframe(1), 2       # 1 would name this function
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
