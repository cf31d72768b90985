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
        # sys.modules first: importlib.import_module takes the import lock even for a loaded module
        # (≈ 2 µs), and hot loops read deferred attributes tens of thousands of times per unit
        mod = sys.modules.get(self.__name__)
        if mod is None or isinstance(mod, _Deferred):
            mod = importlib.import_module(self.__name__)
        return getattr(mod, attr)

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


#: packages whose deferred imports :func:`warm_imports` follows recursively (ours); a third-party
#: module is imported, not walked
_OWN_PREFIXES = ("tembench",)


def warm_imports(modules, _seen: set[str] | None = None) -> list[str]:
    """Import ``modules`` and, recursively, every module their globals defer (:func:`lazy_import`
    stand-ins) — what a worker process would otherwise import inside its first task. Returns the
    module names imported or found; a module that fails to import is skipped (the task that needs it
    reports the error)."""
    seen = set() if _seen is None else _seen
    done: list[str] = []
    for name in modules:
        if name in seen:
            continue
        seen.add(name)
        try:
            mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - warming is only a speed-up
            continue
        done.append(name)
        if not name.startswith(_OWN_PREFIXES):
            continue
        deferred = [v.__name__ for v in list(vars(mod).values()) if isinstance(v, _Deferred)]
        own = [v.__name__ for v in list(vars(mod).values())
               if isinstance(v, ModuleType) and not isinstance(v, _Deferred)
               and v.__name__.startswith(_OWN_PREFIXES)]
        done += warm_imports(deferred + own, seen)
    return done
