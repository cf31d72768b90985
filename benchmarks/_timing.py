"""Timing helpers shared by the benchmarks: every ratio we report is taken in one run with these.

pytest puts this folder on ``sys.path`` (no ``__init__.py``), so benchmarks ``from _timing import …``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


def _samples(fn: Callable[[], object], n: int) -> list[float]:
    fn()  # warm-up: plans, caches, JIT
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return ts


def best_of(fn: Callable[[], object], n: int = 5) -> float:
    """Fastest of ``n`` calls after one warm-up call (s)."""
    return min(_samples(fn, n))


def median_of(fn: Callable[[], object], n: int = 15) -> float:
    """Median of ``n`` calls after one warm-up call (s)."""
    return float(np.median(_samples(fn, n)))


def interleaved_min(fns: dict[str, Callable[[], object]], rounds: int = 7) -> dict[str, float]:
    """Best-of-``rounds`` wall time of each function, the functions run in turn each round."""
    for f in fns.values():
        f()
    best = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            best[k] = min(best[k], time.perf_counter() - t)
    return best


def interleaved_min_wall_cpu(fns: dict[str, Callable[[], object]], rounds: int = 5) -> dict[str, dict[str, float]]:
    """Best wall and process-CPU time of each function over ``rounds``, interleaved, after one warm-up each:
    ``{"wall": {name: s}, "cpu": {name: s}}`` (CPU time is the robust figure on a loaded machine)."""
    for f in fns.values():
        f()
    wall = {k: float("inf") for k in fns}
    cpu = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t, c = time.perf_counter(), time.process_time()
            f()
            wall[k] = min(wall[k], time.perf_counter() - t)
            cpu[k] = min(cpu[k], time.process_time() - c)
    return {"wall": wall, "cpu": cpu}


def block_min(fns: dict[str, Callable[[], object]], rounds: int = 3) -> dict[str, float]:
    """Best-of-``rounds`` per function, each function timed in its own block after a pause.

    Used against abTEM: its dask/numba worker threads keep spinning for a while after a call and
    slow whatever runs next on a 2-core machine, so interleaving would penalise the code timed after it.
    """
    best = {}
    for k, f in fns.items():
        time.sleep(0.5)
        best[k] = best_of(f, rounds)
    return best
