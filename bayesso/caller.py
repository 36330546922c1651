"""``user_stacklevel``: the ``stacklevel`` of ``warnings.warn`` that points at the user's code.

A warning raised deep inside bayesso should name the line that called into bayesso, whichever public entry
point it went through (``model.optimize_prior_precision`` or ``bayesso.laplace.optimize_prior_precision``).
"""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["user_stacklevel"]

PACKAGE = str(Path(__file__).resolve().parent)


def user_stacklevel() -> int:
    """The stacklevel, for a ``warnings.warn`` in the function calling this, of the first frame outside bayesso."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(PACKAGE):
        frame, level = frame.f_back, level + 1
    return level
