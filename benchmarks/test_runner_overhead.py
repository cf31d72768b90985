"""Runner overhead per point on a no-op pipeline (issue target: < 5 ms per point, < 5 % of a 1-s point).

Run: ``python -m pytest benchmarks/test_runner_overhead.py``. The benchmark's ``extra_info``
records the per-point overhead and its ratio to a 1-s point; the components themselves take
microseconds, so nearly all of the time is the runner's (validation, hashing, caching, row
writes, table consolidation).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "core"))

import dummy_plugin  # noqa: E402

from tembench.registry import Registry, set_registry  # noqa: E402
from tembench.runner import run_scenario  # noqa: E402
from tembench.scenario import parse_scenario  # noqa: E402

N_POINTS = 200


def _scenario():
    values = ", ".join(f"{0.001 * i:.3f}" for i in range(N_POINTS))
    text = dummy_plugin.SCENARIO.replace("repeats: 2", "repeats: 1").replace(
        "  - {name: dummy_identity, label: b}\n", "").replace("[0.0, 0.1, 0.2]", f"[{values}]")
    return parse_scenario(text)


def test_runner_overhead_per_point(benchmark, tmp_path):
    reg = Registry(load_entry_points=False)
    reg.register(dummy_plugin, name="dummy_plugin")
    set_registry(reg)
    counter = iter(range(10_000))
    try:
        sc = _scenario()

        def fresh_run():
            # a new output folder every round: every point is computed, nothing comes from cache
            run_scenario(sc, out=tmp_path / f"r{next(counter)}", progress=False, report=False, track_memory=False)

        benchmark.pedantic(fresh_run, rounds=3, iterations=1)
        per_point_ms = benchmark.stats.stats.median / N_POINTS * 1e3
        benchmark.extra_info["per_point_ms"] = per_point_ms
        benchmark.extra_info["fraction_of_1s_point"] = per_point_ms / 1e3
        print(f"\nrunner overhead: {per_point_ms:.2f} ms per point ({per_point_ms / 10:.2f} % of a 1-s point)")
    finally:
        set_registry(None)
