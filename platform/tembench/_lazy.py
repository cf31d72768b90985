"""Deferred imports for heavy modules (numba kernels, FFT libraries, fitting code, scipy parts).

``tembench list``, ``validate`` and every error message must answer in well under a second, so a
module imports its heavy dependencies through :func:`lazy_import`: it gets a stand-in module at
once, and the real import runs on the first attribute access (``_kernels.com_events(...)``).

The stand-in is a plain :class:`types.ModuleType` whose ``__getattr__`` forwards to the real
module, not the standard library's ``LazyLoader``: pluggy inspects every global of a plugin module
(``inspect.isroutine`` reads ``__class__``), which would trigger a ``LazyLoader`` module's import at
registration — exactly what this is for avoiding. The attributes introspection probes
(:data:`_PROBES`) are answered by the stand-in itself; everything else is read from the real module
on every access, so monkeypatching the real module is seen.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType


#: attributes that introspection (inspect, pluggy, pytest, doctest) probes on module globals: answered
#: by the stand-in so that looking at a module does not import what it defers
_PROBES = frozenset({"__wrapped__", "__signature__", "__func__", "__self__", "__code__", "__call__", "__get__",
                     "__origin__", "__path__", "__file__", "__test__", "__qualname__", "tembench_impl",
                     "tembench_spec", "pytestmark"})


class _Deferred(ModuleType):
    """Stand-in for a module that is imported on first attribute access."""

    def __getattr__(self, attr: str):  # only reached when normal lookup fails
        if attr in _PROBES:
            raise AttributeError(attr)
        return getattr(importlib.import_module(self.__name__), attr)

    def __dir__(self):
        return dir(importlib.import_module(self.__name__))


def lazy_import(name: str) -> ModuleType:
    """``name`` if already imported, else a stand-in that imports it on first use.

    Raises :class:`ModuleNotFoundError` at once when the module is not installed, so optional
    dependencies can still be probed with ``try: lazy_import(...) except ImportError``.
    """
    if name in sys.modules:
        return sys.modules[name]
    if importlib.util.find_spec(name) is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    return _Deferred(name)
