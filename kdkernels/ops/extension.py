"""Loads the compiled extension kdkernels._C, keeping the reason when it cannot be loaded
so that `kdkernels info` and the errors can say why."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Optional

_module: Optional[ModuleType] = None
load_error: Optional[str] = None

try:
    _module = importlib.import_module("kdkernels._C")
except ImportError as exc:
    load_error = f"{type(exc).__name__}: {exc}"


def compiled() -> Optional[ModuleType]:
    """The compiled module, or None when it is not built."""
    return _module


def require() -> ModuleType:
    """The compiled module; a clear error when it is missing."""
    if _module is None:
        raise RuntimeError(
            "kdkernels' compiled extension kdkernels._C is not available "
            f"({load_error}); reinstall with `pip install --no-build-isolation -e .`"
        )
    return _module
