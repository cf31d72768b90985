"""Pool workers import what the units need before the first task (issue 13), and the plan-mode memo
follows the environment."""

from __future__ import annotations

import sys

import pytest

from tembench import backend
from tembench._lazy import warm_imports
from tembench.executors import ProcessExecutor


@pytest.fixture
def deferred_pair(tmp_path, monkeypatch):
    """Two throw-away modules: ``tembench_warmtest_a`` defers ``tembench_warmtest_b`` (a lazy_import
    stand-in), which defers a third-party-like ``warmtest_leaf``."""
    (tmp_path / "tembench_warmtest_a.py").write_text(
        "from tembench._lazy import lazy_import\nB = lazy_import('tembench_warmtest_b')\n")
    (tmp_path / "tembench_warmtest_b.py").write_text(
        "from tembench._lazy import lazy_import\nLEAF = lazy_import('warmtest_leaf')\nVALUE = 7\n")
    (tmp_path / "warmtest_leaf.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    names = ("tembench_warmtest_a", "tembench_warmtest_b", "warmtest_leaf")
    for n in names:
        sys.modules.pop(n, None)
    yield names
    for n in names:
        sys.modules.pop(n, None)


def test_warm_imports_follows_deferred_modules(deferred_pair):
    a, b, leaf = deferred_pair
    import tembench_warmtest_a  # noqa: F401 - importing a alone defers b

    assert b not in sys.modules
    done = warm_imports([a])
    assert set(done) == {a, b, leaf}
    assert b in sys.modules and leaf in sys.modules
    assert sys.modules[a].B.VALUE == 7  # the stand-in now reads the real module


def test_warm_imports_skips_a_module_that_fails(tmp_path, monkeypatch):
    (tmp_path / "tembench_warmtest_broken.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert warm_imports(["tembench_warmtest_broken", "json"]) == ["json"]


def _modules_loaded(names):
    return [n in sys.modules for n in names]


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_prestarted_workers_have_imported_the_units_modules(deferred_pair, method):
    a, b, leaf = deferred_pair
    ex = ProcessExecutor(workers=1, start_method=method)
    try:
        ex.prestart([a])
        assert b not in sys.modules  # the parent did not import them: the worker did, as it started
        (res,) = list(ex.map_unordered(_modules_loaded, [deferred_pair]))
    finally:
        ex.close()
    assert res == [True, True, True]


def test_plan_mode_memo_follows_the_environment(monkeypatch):
    if not backend.pyfftw_available():
        pytest.skip("pyFFTW absent: the plan mode is the scipy one")
    monkeypatch.delenv("TEMBENCH_FFT", raising=False)
    monkeypatch.delenv("TEMBENCH_FFTW_EFFORT", raising=False)
    base = backend._plan_mode()
    assert base[:2] == ("pyfftw", "wisdom")
    monkeypatch.setenv("TEMBENCH_FFTW_EFFORT", "estimate")
    assert backend._plan_mode()[:2] == ("pyfftw", "FFTW_ESTIMATE")
    monkeypatch.setenv("TEMBENCH_FFT", "scipy")
    assert backend._plan_mode() == ("scipy",)
    monkeypatch.setenv("TEMBENCH_FFT", "auto")
    monkeypatch.setenv("TEMBENCH_FFTW_EFFORT", "bogus")
    for _ in range(2):  # an invalid value is refused every time, never memoised
        with pytest.raises(ValueError, match="planner mode"):
            backend._plan_mode()
    monkeypatch.delenv("TEMBENCH_FFTW_EFFORT")
    assert backend._plan_mode() == base
