"""Ours vs Atomap 0.4.2 column refinement (issue 16): see benchmarks/peers/friedrich2023_peers.py.

Run: ``python -m pytest benchmarks/test_friedrich_atomap.py -s``. 324 columns, 8 Poisson repeats
(the full 30-repeat table: run the driver). Skips if the Atomap venv cannot be built.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "peers"))
import friedrich2023_peers as P  # noqa: E402


def test_friedrich_vs_atomap(benchmark):
    if P.ensure_venv() is None:
        pytest.skip("Atomap 0.4.2 venv unavailable")
    r = benchmark.pedantic(P.run, kwargs=dict(side=18, repeats=8), rounds=1, iterations=1)
    benchmark.extra_info.update({k: v for k, v in r.items() if k != "load"})
    benchmark.extra_info["load"] = list(r["load"])
    print(P.table(r))
    assert r["ours_warm_s"] < 5.0
    assert r["speed_ratio"] > 5.0
