"""Root test configuration: cross-check dependencies cannot skip in CI (see ``tests/_deps.py``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # makes ``from _deps import require`` importable

from _deps import CI_REQUIRED, in_ci  # noqa: E402


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI, a skip raised by ``pytest.importorskip`` of a CI-required module becomes a failure."""
    outcome = yield
    report = outcome.get_result()
    if not (report.skipped and in_ci() and call.excinfo is not None):
        return
    exc = call.excinfo.value
    msg = str(getattr(exc, "msg", exc))
    missing = [m for m in CI_REQUIRED if f"could not import '{m}'" in msg or f"could not import {m!r}" in msg]
    if missing:
        report.outcome = "failed"
        report.longrepr = (f"CI: cross-check dependency {missing[0]!r} is missing, so this test would have "
                           f"been skipped ({msg}); install the dev extra (pip install -e '.[dev]')")
