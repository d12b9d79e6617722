"""Old import paths (before the per-format packages), kept for one release with a warning."""

from __future__ import annotations

import importlib
import sys
import warnings


def alias(old: str, new: str) -> None:
    """Make module `old` the module `new`, warning once that the path moved."""
    warnings.warn(f"{old} moved to {new}; the old path goes away in the next release", DeprecationWarning, stacklevel=3)
    sys.modules[old] = importlib.import_module(new)
