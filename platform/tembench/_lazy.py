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

    _skip: tuple[str, ...] = ()

    def __getattr__(self, attr: str):  # only reached when normal lookup fails
        if attr in _PROBES:
            raise AttributeError(attr)
        # sys.modules first: importlib.import_module takes the import lock even for a loaded module
        # (≈ 2 µs), and hot loops read deferred attributes tens of thousands of times per unit
        mod = sys.modules.get(self.__name__)
        if mod is None or isinstance(mod, _Deferred):
            mod = _import_deferring(self.__name__, self._skip)
        return getattr(mod, attr)

    def __dir__(self):
        return dir(importlib.import_module(self.__name__))


def lazy_import(name: str, defer_submodules: tuple[str, ...] = ()) -> ModuleType:
    """``name`` if already imported, else a stand-in that imports it on first use.

    ``defer_submodules``: submodules that the package's ``__init__`` imports but this code never uses
    (e.g. ``pyfftw.interfaces``, which pulls in scipy.fftpack and dask.array: 0.4 s of a worker's
    start); they are bound as stand-ins too when the package is imported, so they still import in
    full on first use (:func:`_import_deferring`).

    Raises :class:`ModuleNotFoundError` at once when the module is not installed, so optional
    dependencies can still be probed with ``try: lazy_import(...) except ImportError``.
    """
    if name in sys.modules:
        return sys.modules[name]
    if importlib.util.find_spec(name) is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    mod = _Deferred(name)
    mod._skip = tuple(defer_submodules)
    return mod


def _import_deferring(name: str, submodules: tuple[str, ...] = ()) -> ModuleType:
    """Import ``name`` with each of ``submodules`` (not yet imported) replaced by a stand-in while the
    package's ``__init__`` runs: its ``from . import sub`` binds the stand-in, which imports the real
    submodule on first attribute access. The stand-ins leave ``sys.modules`` right after, so any later
    ``import package.sub`` (e.g. by another library in the same process) runs the real import."""
    if name in sys.modules and not isinstance(sys.modules[name], _Deferred):
        return sys.modules[name]
    placed = [s for s in submodules if s not in sys.modules]
    for s in placed:
        sys.modules[s] = _Deferred(s)
    try:
        return importlib.import_module(name)
    finally:
        for s in placed:
            if isinstance(sys.modules.get(s), _Deferred):
                del sys.modules[s]


#: packages whose deferred imports :func:`warm_imports` follows recursively (ours); a third-party
#: module is imported, not walked
_OWN_PREFIXES = ("tembench",)


def warm_imports(modules, _seen: set[str] | None = None, _skips: dict | None = None) -> list[str]:
    """Import ``modules`` and, recursively, every module their globals defer (:func:`lazy_import`
    stand-ins) — what a worker process would otherwise import inside its first task. Returns the
    module names imported or found; a module that fails to import is skipped (the task that needs it
    reports the error)."""
    seen = set() if _seen is None else _seen
    skips = {} if _skips is None else _skips     # module → the submodules its stand-in defers
    done: list[str] = []
    for name in modules:
        if name in seen:
            continue
        seen.add(name)
        try:
            # as the stand-in would: the submodules it defers stay deferred (pyfftw.interfaces: 0.42 s that a
            # warmed worker otherwise paid before its first task, for a module no unit imports)
            mod = _import_deferring(name, skips.get(name, ()))
        except Exception:  # noqa: BLE001 - warming is only a speed-up
            continue
        done.append(name)
        if not name.startswith(_OWN_PREFIXES):
            continue
        stand_ins = [v for v in list(vars(mod).values()) if isinstance(v, _Deferred)]
        skips.update({v.__name__: v._skip for v in stand_ins if v._skip})
        own = [v.__name__ for v in list(vars(mod).values())
               if isinstance(v, ModuleType) and not isinstance(v, _Deferred)
               and v.__name__.startswith(_OWN_PREFIXES)]
        done += warm_imports([v.__name__ for v in stand_ins] + own, seen, skips)
    return done
