"""numba only once it pays (tembench._jit): a process runs the bitwise numpy twins until it has spent numba's start
in them, then the kernels; the switch never shows in a result (issue 13: a pool worker's start)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tembench import _jit

SCRIPT = r"""
import json, sys
import numpy as np
from tembench import _jit
from tembench_ren2020.prox import prox_tv
rng = np.random.default_rng(0)
x = rng.normal(0.3, 1.0, (24, 20, 22)).astype(np.float32)
outs, numba_at = [], None
for i in range(int(sys.argv[1])):
    outs.append(prox_tv(x, 0.7, n_iter=10))
    if numba_at is None and "numba" in sys.modules:
        numba_at = i
print(json.dumps({"numba_at": numba_at, "running": _jit.numba_running(), "spent": _jit.spent_s(),
                  "same": all(np.array_equal(o, outs[0]) for o in outs)}))
"""


def _run(budget: str, calls: int) -> dict:
    env = {**os.environ, "TEMBENCH_NUMBA_AFTER_S": budget}
    env.pop("TEMBENCH_NO_NUMBA", None)
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(calls)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not _jit.numba_enabled(), reason="numba not installed or switched off")
def test_a_process_loads_numba_only_after_spending_the_budget_in_twins():
    never = _run("1000", 3)                 # a small job: numba never imported
    assert never["numba_at"] is None and not never["running"] and never["spent"] > 0
    at_once = _run("0", 2)                  # budget 0: the kernels from the first call (the old behaviour)
    assert at_once["numba_at"] == 0 and at_once["running"] and at_once["spent"] == 0
    per_call = never["spent"] / 3
    late = _run(repr(2.5 * per_call), 6)    # after ≈ 3 twin calls; the same bits before and after the switch
    assert late["numba_at"] is not None and 1 <= late["numba_at"] <= 5, late
    assert late["running"] and late["same"]


def test_budget_and_forcing(monkeypatch):
    monkeypatch.setenv("TEMBENCH_NUMBA_AFTER_S", "0.25")
    assert _jit.budget_s() == 0.25
    monkeypatch.setenv("TEMBENCH_NUMBA_AFTER_S", "not a number")
    assert _jit.budget_s() == _jit.DEFAULT_BUDGET_S
    monkeypatch.setenv("TEMBENCH_NUMBA_AFTER_S", "-3")
    assert _jit.budget_s() == 0.0
    assert _jit.use_compiled(False) is False
    monkeypatch.setenv("TEMBENCH_NO_NUMBA", "1")
    assert not _jit.numba_enabled() and _jit.use_compiled(True) is False and _jit.use_compiled(None) is False
    before = _jit.spent_s()
    try:
        with _jit.twin_timer():
            sum(range(1000))
        assert _jit.spent_s() > before
    finally:
        _jit._reset_for_tests(before)
