"""The component registry, on pluggy.

Built-in components (every module of :mod:`tembench.builtin`) are registered through the same
hooks as third-party plugins, which are found through the ``tembench`` entry-point group.
Components are validated at load time; every error names the plugin that provided the class.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import pkgutil
import warnings
from importlib.metadata import entry_points
from typing import Any

import pluggy
from pydantic import BaseModel

from tembench import hookspecs
from tembench.components import BASES, Component
from tembench.errors import PluginError, ScenarioError
from tembench.types import RECONSTRUCTION_KINDS

PROJECT = "tembench"
ENTRY_POINT_GROUP = "tembench"

HOOK_OF_KIND = {
    "sample": "tembench_register_samples",
    "forward_model": "tembench_register_forward_models",
    "noise_model": "tembench_register_noise_models",
    "reconstructor": "tembench_register_reconstructors",
    "quantifier": "tembench_register_quantifiers",
}


def builtin_modules() -> list[str]:
    """Every module of the ``tembench.builtin`` package, in name order."""
    import tembench.builtin as pkg

    return [f"{pkg.__name__}.{m.name}" for m in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name)
            if not m.name.startswith("_")]


class Registry:
    """Holds a pluggy PluginManager and the validated components of every kind."""

    def __init__(self, *, load_entry_points: bool = True, strict: bool | None = None) -> None:
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.strict = strict if strict is not None else os.environ.get("TEMBENCH_STRICT_PLUGINS") == "1"
        self.load_errors: dict[str, str] = {}
        self._components: dict[str, dict[str, type[Component]]] | None = None
        self._origin: dict[tuple[str, str], str] = {}
        for modname in builtin_modules():
            self.register(importlib.import_module(modname), name=modname)
        if load_entry_points and os.environ.get("TEMBENCH_DISABLE_PLUGIN_AUTOLOAD") != "1":
            self._load_entry_points()

    # --- plugin loading -------------------------------------------------------------------
    def _load_entry_points(self) -> None:
        # pluggy's load_setuptools_entrypoints stops the host on the first broken plugin; we
        # report it and carry on (strict mode, for CI of a plugin, raises instead).
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if self.pm.has_plugin(ep.name) or self.pm.is_blocked(ep.name):
                continue
            try:
                self.register(ep.load(), name=ep.name)
            except Exception as exc:  # noqa: BLE001 - any import error of a third-party plugin
                msg = f"tembench plugin {ep.name!r} ({ep.value}) failed to load: {type(exc).__name__}: {exc}"
                if self.strict:
                    raise PluginError(msg) from exc
                self.load_errors[ep.name] = msg
                warnings.warn(msg, stacklevel=2)

    def register(self, plugin: Any, name: str | None = None) -> str:
        """Register a plugin (a module or object with ``tembench_*`` hook implementations)."""
        try:
            plugin_name = self.pm.register(plugin, name=name)
        except ValueError as exc:
            raise PluginError(f"plugin {name or plugin!r} could not be registered: {exc}") from exc
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin {exc.plugin!r} is invalid: {exc}") from exc
        self._components = None  # re-collect lazily
        return plugin_name

    def unregister(self, name: str) -> None:
        self.pm.unregister(name=name)
        self._components = None

    # --- collection and validation ----------------------------------------------------------
    def _collect(self) -> dict[str, dict[str, type[Component]]]:
        if self._components is not None:
            return self._components
        comps: dict[str, dict[str, type[Component]]] = {k: {} for k in HOOK_OF_KIND}
        origin: dict[tuple[str, str], str] = {}
        for kind, hookname in HOOK_OF_KIND.items():
            caller = getattr(self.pm.hook, hookname)
            for impl in caller.get_hookimpls():
                plugin_name = impl.plugin_name
                result = impl.function()
                if result is None:
                    continue
                if not isinstance(result, (list, tuple)):
                    raise PluginError(f"plugin {plugin_name!r}: {hookname} must return a list of classes, got {type(result).__name__}")
                for cls in result:
                    _validate_component(cls, kind, plugin_name)
                    if cls.name in comps[kind]:
                        other = origin[(kind, cls.name)]
                        raise PluginError(
                            f"duplicate {kind} name {cls.name!r}: provided by plugin {other!r} and by "
                            f"plugin {plugin_name!r}. Rename one of them."
                        )
                    comps[kind][cls.name] = cls
                    origin[(kind, cls.name)] = plugin_name
        self._components, self._origin = comps, origin
        return comps

    def components(self, kind: str) -> dict[str, type[Component]]:
        if kind not in HOOK_OF_KIND:
            raise PluginError(f"unknown component kind {kind!r}; kinds are {list(HOOK_OF_KIND)}")
        return dict(self._collect()[kind])

    def get(self, kind: str, name: str) -> type[Component]:
        comps = self._collect()[kind]
        if name not in comps:
            known = sorted(comps)
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ScenarioError(f"unknown {kind.replace('_', ' ')} {name!r}.{hint} Known: {', '.join(known) or '(none)'}.")
        return comps[name]

    def origin(self, kind: str, name: str) -> str:
        self._collect()
        return self._origin[(kind, name)]

    def measurement_kinds(self) -> set[str]:
        """Every measurement kind some forward or noise model produces."""
        kinds = {cls.produces for cls in self.components("forward_model").values()}
        kinds |= {cls.produces for cls in self.components("noise_model").values() if cls.produces}
        return kinds

    def hook(self):
        return self.pm.hook


def _validate_component(cls: Any, kind: str, plugin_name: str) -> None:
    base = BASES[kind]
    where = f"plugin {plugin_name!r}"
    if not (inspect.isclass(cls) and issubclass(cls, base)):
        raise PluginError(f"{where}: {cls!r} registered as a {kind} is not a subclass of tembench.{base.__name__}")
    label = f"{where}, {kind} {cls.__name__}"
    if not isinstance(cls.name, str) or not cls.name or not cls.name.replace("_", "").replace("-", "").isalnum():
        raise PluginError(f"{label}: `name` must be a non-empty identifier-like string, got {cls.name!r}")
    params = getattr(cls, "Params", None)  # inherited from a concrete component is fine; the bare base is not
    if params is None or params is Component.Params or not (inspect.isclass(params) and issubclass(params, BaseModel)):
        raise PluginError(f"{label} ({cls.name!r}): missing a nested `Params` pydantic model (subclass tembench.Params)")
    method = getattr(cls, base.method, None)
    if method is None or method is getattr(base, base.method):
        raise PluginError(f"{label} ({cls.name!r}): does not implement `{base.method}`")
    if kind == "forward_model" and not cls.produces:
        raise PluginError(f"{label} ({cls.name!r}): must declare the measurement kind it `produces`")
    if kind in ("noise_model", "reconstructor", "quantifier"):
        acc = cls.accepts
        if not acc or isinstance(acc, str) or not all(isinstance(a, str) and a for a in acc):
            raise PluginError(f"{label} ({cls.name!r}): must declare `accepts` as a tuple of kinds (or ('*',))")
    if kind == "reconstructor" and cls.produces not in RECONSTRUCTION_KINDS:
        raise PluginError(f"{label} ({cls.name!r}): `produces` must be one of {RECONSTRUCTION_KINDS}, got {cls.produces!r}")
    if not inspect.getdoc(cls):
        raise PluginError(f"{label} ({cls.name!r}): needs a docstring (it is what `tembench list` shows)")


_default: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry (built-ins + entry points), created on first use."""
    global _default
    if _default is None:
        _default = Registry()
    return _default


def set_registry(registry: Registry | None) -> None:
    """Replace the process-wide registry (tests use this to register plugins explicitly)."""
    global _default
    _default = registry
