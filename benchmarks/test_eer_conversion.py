"""Conversion of counted 4D-STEM data to the electron event representation (issue 4): frames/s.

Dense counts (128² scan × 128² detector) at 1, 10 and 100 electrons per pattern are converted
to the linear-index form and back; ``extra_info`` records frames per second, the ratio to a
plain ``np.count_nonzero`` pass over the same array (the memory-bandwidth floor of any
conversion that must read every pixel) and the compression ratio vs float32 dense.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from tembench.eer import ElectronEvents

SCAN, DET = 128, 128


@pytest.fixture(scope="module", params=[1, 10, 100], ids=lambda e: f"{e}e_per_pattern")
def counts(request):
    rng = np.random.default_rng(0)
    lam = request.param / (DET * DET)
    return request.param, rng.poisson(lam, size=(SCAN, SCAN, DET, DET)).astype(np.uint16)


def test_dense_to_eer(benchmark, counts):
    e, data = counts
    t0 = time.perf_counter()
    np.count_nonzero(data)
    floor = time.perf_counter() - t0
    ev = benchmark.pedantic(lambda: ElectronEvents.from_dense(data), rounds=3, iterations=1)
    t = benchmark.stats.stats.median
    benchmark.extra_info.update(frames_per_s=SCAN * SCAN / t, ratio_to_count_nonzero=t / floor,
                                compression_vs_float32=ev.dense_nbytes() / ev.nbytes, electrons_per_pattern=e)
    print(f"\n{e} e/pattern: {SCAN * SCAN / t:,.0f} frames/s, {t / floor:.1f}× a count_nonzero pass, "
          f"compression {ev.dense_nbytes() / ev.nbytes:.0f}× vs float32")


def test_eer_to_dense(benchmark, counts):
    _, data = counts
    ev = ElectronEvents.from_dense(data)
    dense = benchmark.pedantic(lambda: ev.to_dense(dtype=np.uint16), rounds=3, iterations=1)
    benchmark.extra_info.update(frames_per_s=SCAN * SCAN / benchmark.stats.stats.median)
    np.testing.assert_array_equal(dense, data)
