"""Pool workers import what the units need before the first task (issue 13), and the plan-mode memo
follows the environment."""

from __future__ import annotations

import sys

import pandas as pd
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


def test_warm_imports_keeps_a_stand_ins_deferred_submodules(tmp_path, monkeypatch):
    """Warming a module that holds ``lazy_import(pkg, defer_submodules=(pkg.heavy,))`` imports pkg as the stand-in
    would, with pkg.heavy still deferred (pyFFTW's ``interfaces``: 0.42 s that every warmed pool worker paid before
    its first task, for a module no unit imports). Fails if warming imports the package plainly."""
    pkg = tmp_path / "warmtest_pkg2"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from . import heavy\nCORE = 1\n")
    (pkg / "heavy.py").write_text("VALUE = 5\n")
    (tmp_path / "tembench_warmtest_c.py").write_text(
        "from tembench._lazy import lazy_import\nP = lazy_import('warmtest_pkg2', defer_submodules=('warmtest_pkg2.heavy',))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    names = ("warmtest_pkg2", "warmtest_pkg2.heavy", "tembench_warmtest_c")
    for n in names:
        sys.modules.pop(n, None)
    try:
        done = warm_imports(["tembench_warmtest_c"])
        assert set(done) == {"tembench_warmtest_c", "warmtest_pkg2"}
        assert "warmtest_pkg2" in sys.modules and "warmtest_pkg2.heavy" not in sys.modules
        assert sys.modules["warmtest_pkg2"].heavy.VALUE == 5            # still there on first use
    finally:
        for n in names:
            sys.modules.pop(n, None)


def test_deferred_submodule_imports_only_on_first_use(tmp_path, monkeypatch):
    """lazy_import(pkg, defer_submodules=...): the package's own ``from . import heavy`` binds a stand-in
    (pyFFTW's ``interfaces``, 0.38 s, is never used by us); the real submodule still imports on first
    attribute access, and a later ``import pkg.heavy`` elsewhere gets the real module, not the stand-in."""
    from tembench._lazy import lazy_import

    pkg = tmp_path / "warmtest_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from . import heavy\nCORE = 1\n")
    (pkg / "heavy.py").write_text("import warmtest_counter\nwarmtest_counter.N += 1\nVALUE = 5\n")
    (pkg / "other.py").write_text("from warmtest_pkg import heavy\n")
    (tmp_path / "warmtest_counter.py").write_text("N = 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    names = ("warmtest_pkg", "warmtest_pkg.heavy", "warmtest_pkg.other", "warmtest_counter")
    for n in names:
        sys.modules.pop(n, None)
    try:
        lazy = lazy_import("warmtest_pkg", defer_submodules=("warmtest_pkg.heavy",))
        assert "warmtest_pkg" not in sys.modules
        assert lazy.CORE == 1                                   # the package is imported ...
        assert "warmtest_pkg" in sys.modules
        assert "warmtest_pkg.heavy" not in sys.modules          # ... its heavy submodule is not
        assert "warmtest_counter" not in sys.modules
        real = sys.modules["warmtest_pkg"]
        assert real.heavy.VALUE == 5                            # first use imports it, once
        import warmtest_counter

        assert warmtest_counter.N == 1
        assert real.heavy is sys.modules["warmtest_pkg.heavy"]  # the stand-in was replaced
        import warmtest_pkg.other  # noqa: F401 - a sibling importing it gets the real module

        assert sys.modules["warmtest_pkg.other"].heavy is sys.modules["warmtest_pkg.heavy"]
        assert warmtest_counter.N == 1
    finally:
        for n in names:
            sys.modules.pop(n, None)


def test_fft_identity_does_not_import_pyfftw():
    """The run identity names pyFFTW's version from its metadata: reading it must not import pyFFTW (with
    its interfaces: scipy.fftpack, dask.array), nor may planning import pyfftw.interfaces."""
    import subprocess

    code = ("import sys; from tembench.backend import fft_identity, _pyfftw, pyfftw_available\n"
            "if not pyfftw_available(): print('skip'); raise SystemExit\n"
            "fft_identity(); a = 'pyfftw' in sys.modules\n"
            "import numpy as np; from tembench.backend import FFT2Plan\n"
            "p = FFT2Plan((64, 64)); p.forward()\n"
            "print(a, 'pyfftw' in sys.modules, 'pyfftw.interfaces' in sys.modules, 'dask' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    if out.stdout.strip() == "skip":
        pytest.skip("pyFFTW not installed")
    assert out.stdout.split() == ["False", "True", "False", "False"]
    import pyfftw

    # the identity string read from the metadata is the imported module's own version (the run id must not move)
    assert backend._pyfftw_version() == pyfftw.__version__
    assert backend.fft_identity()["pyfftw"] == pyfftw.__version__


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


# --- which simulations are tasks of their own (phase 1) ------------------------------------------------
class _Recording:
    """A serial stand-in for a pool: records what the runner maps (function name, number of tasks)."""

    def __init__(self):
        self.calls = []

    def map_unordered(self, fn, tasks, *, weights=None, on_lost=None):
        from tembench.executors import _ordered

        tasks = _ordered(tasks, weights)
        self.calls.append((fn.__name__, len(tasks)))
        for t in tasks:
            yield fn(t)

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_ONE_USER = """
name: one_user
seed: 3
repeats: 1
sample: dummy_dot
forward: {name: dummy_image, params: {n: 16}}
noise: [{name: dummy_noise, params: {sigma: 0.1}}]
reconstructors: [{name: dummy_identity}]
quantifiers: [dummy_mean]
sweep:
  grid:
    forward.n: [16, 24, 32]
"""


@pytest.mark.parametrize("text, phase1", ids=["one_user", "repeats", "noise_sweep"], argvalues=[
    (_ONE_USER, None),  # every simulation serves one unit: the unit simulates it (no barrier between phases)
    (_ONE_USER.replace("repeats: 1", "repeats: 2"), ("run_forward_task", 3)),  # shared by two repeats: once, first
    (_ONE_USER.replace("forward.n: [16, 24, 32]", "forward.n: [16, 24]\n    noise.0.sigma: [0.0, 0.2]"),
     ("run_forward_task", 2)),
])
def test_only_shared_simulations_run_as_their_own_tasks(registry, tmp_path, monkeypatch, text, phase1):
    """A simulation one unit needs runs inside that unit (no wait for the others); a shared one runs once,
    before its units; the table is the serial one either way."""
    from tembench import runner as runner_mod
    from tembench.scenario import parse_scenario

    import dummy_plugin

    rec = _Recording()
    monkeypatch.setattr(runner_mod, "make_executor", lambda *a, **k: rec)
    sc = parse_scenario(text)
    res = runner_mod.run_scenario(sc, out=tmp_path / "pool", executor="processes", progress=False, report=False)
    n_sim = dummy_plugin.CALLS["simulate"]
    assert (res.table["status"] == "ok").all()
    assert rec.calls[0] == phase1 if phase1 else rec.calls[0][0] == "run_unit"
    assert rec.calls[-1] == ("run_unit", sc.n_units)
    # each distinct simulation computed exactly once either way, and the table equals the serial one
    assert n_sim == len({p.spec.forward.params["n"] for p in sc.points})
    ref = runner_mod.run_scenario(sc, out=tmp_path / "serial", executor="serial", progress=False, report=False)
    cols = [c for c in ref.table.columns if not c.startswith(("time_", "wall_", "peak_memory", "run_id"))]
    pd.testing.assert_frame_equal(res.table[cols].reset_index(drop=True), ref.table[cols].reset_index(drop=True))
