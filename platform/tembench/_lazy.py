"""Deferred imports for heavy modules (numba kernels, FFT libraries, fitting code).

``tembench list``, ``validate`` and every error message must answer in well under a second, so a
component module imports its heavy dependencies through :func:`lazy_import`: the module object
is created at once, and the real import runs on the first attribute access (the standard
library's :class:`importlib.util.LazyLoader`, as SciPy's lazy loading does).
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType


def lazy_import(name: str) -> ModuleType:
    """``name`` as a module whose import runs on first use (already imported: returned as is)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    return module
