"""Optional test dependencies that must not silently skip in CI.

``require("abtem")`` imports a cross-check dependency: locally a missing one skips the test (as
``pytest.importorskip``), but when the environment variable ``CI`` is set (``.ci/run`` runs with
CI=true) it fails the test, so a broken dev install cannot turn the independent cross-checks
into green skips. :mod:`tests.conftest` applies the same rule to ``pytest.importorskip`` of these
modules, as a safety net for tests that do not go through :func:`require`.
"""

from __future__ import annotations

import importlib
import os

import pytest

# Dependencies of the cross-checks, installed by the ``dev`` extra (pyproject.toml); CI must have them.
CI_REQUIRED = frozenset({"abtem", "distributed"})


def in_ci() -> bool:
    """True when the ``CI`` environment variable is set to anything but '', '0', 'false' or 'no'."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require(module: str, *, minversion: str | None = None):
    """Import ``module`` for a cross-check: skip if it is missing locally, fail if it is missing in CI."""
    if not in_ci():
        return pytest.importorskip(module, minversion=minversion)
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        error = str(exc)
    else:
        error = None
    if error is not None:
        pytest.fail(f"CI: the cross-check dependency {module!r} cannot be imported ({error}); "
                    "install the dev extra (pip install -e '.[dev]')", pytrace=False)
    if minversion is not None:
        from packaging.version import Version

        have = getattr(mod, "__version__", "0")
        if Version(have) < Version(minversion):
            pytest.fail(f"CI: {module} {have} is older than the required {minversion}", pytrace=False)
    return mod
