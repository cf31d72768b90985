"""Issue 12 §3 (speed): the one-read kernels of the dense pass — COM / dark-field moments and SSB's crop/bin, each
with the frame totals (finite check) and the bad-pixel statistics — against direct numpy definitions."""

from __future__ import annotations

import numpy as np
import pytest

from tembench.errors import TembenchError
from tembench_pelz2022 import _kernels, ssb_kernels
from tembench_pelz2022.common import stream_pass

NUMBA = [False] + ([True] if _kernels.HAVE_NUMBA else [])


def _data(dtype=np.float32, shape=(3, 5, 12, 10), seed=0):
    d = np.random.default_rng(seed).poisson(2.0, shape).astype(dtype)
    d[..., 4, 3] = 7  # a stuck pixel: never changes
    return d


def _direct_stats(d):
    b = d.reshape(-1, d.shape[-2] * d.shape[-1])
    return b.astype(np.float64).sum(axis=0), (b != b[0]).sum(axis=0)


@pytest.mark.parametrize("numba", NUMBA)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dense_pass_moments_and_statistics(numba, dtype):
    d = _data(dtype)
    d3 = d.reshape(-1, 12, 10)
    w = np.random.default_rng(1).random((12, 10)) > 0.6
    acc = (d3[0].reshape(-1).copy(), np.zeros(120), np.zeros(120, np.int64))
    out = _kernels.dense_pass(d3, w, acc, numba=numba)
    iy, ix = np.mgrid[0:12, 0:10]
    want = np.stack([(d3 * iy).sum(axis=(1, 2)), (d3 * ix).sum(axis=(1, 2)), d3.sum(axis=(1, 2)),
                     (d3 * w).sum(axis=(1, 2))], axis=1)
    np.testing.assert_allclose(out, want, rtol=1e-6)
    total, changes = _direct_stats(d)
    np.testing.assert_array_equal(acc[1], total)
    np.testing.assert_array_equal(acc[2], changes)
    assert acc[2][4 * 10 + 3] == 0 and acc[2].max() > 0
    d3[2, 5, 6] = np.nan  # a NaN reaches its frame's total (and only that frame's)
    tot = _kernels.dense_pass(d3, w, numba=numba)[:, 2]
    assert np.isnan(tot[2]) and np.isfinite(np.delete(tot, 2)).all()


@pytest.mark.parametrize("numba", NUMBA)
def test_crop_bin_stats_equals_crop_bin_and_direct_statistics(numba):
    d = _data(np.float32, (2, 4, 20, 18))
    y0, x0, f, nby, nbx = 3, 2, 3, 5, 4
    out = np.empty((2, 4, nby, nbx), np.float32)
    acc = (d[0, 0].reshape(-1).copy(), np.zeros(360), np.zeros(360, np.int64))
    tot = ssb_kernels.crop_bin_stats(d, y0, x0, f, nby, nbx, out, acc, numba=numba)
    want = d[:, :, y0:y0 + f * nby, x0:x0 + f * nbx].reshape(2, 4, nby, f, nbx, f).sum(axis=(3, 5))
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(tot, d.reshape(8, -1).sum(axis=1))
    total, changes = _direct_stats(d)
    np.testing.assert_array_equal(acc[1], total)
    np.testing.assert_array_equal(acc[2], changes)
    d[1, 2, 0, 0] = np.inf  # outside the window: still caught by the frame total
    tot = ssb_kernels.crop_bin_stats(d, y0, x0, f, nby, nbx, out, None, numba=numba)
    assert not np.isfinite(tot[1 * 4 + 2]) and np.isfinite(np.delete(tot, 6)).all()


def test_stream_pass_statistics_and_finite_check_with_a_fused_consumer():
    d = _data(np.float32, (6, 5, 12, 10))
    total, changes = _direct_stats(d)
    plain = stream_pass(d, "t", max_bytes=5 * 120 * 4 * 2)  # 2 scan rows per chunk
    np.testing.assert_array_equal(plain.total, total)
    np.testing.assert_array_equal(plain.changes, changes)
    seen = []

    def fused(r0, r1, block, acc):
        seen.append((r0, r1))
        return _kernels.dense_pass(block.reshape(-1, 12, 10), None, acc)[:, 2]

    st = stream_pass(d, "t", fused=fused, max_bytes=5 * 120 * 4 * 2)
    assert seen == [(0, 2), (2, 4), (4, 6)]
    np.testing.assert_array_equal(st.total, total)
    np.testing.assert_array_equal(st.changes, changes)
    d[3, 1, 2, 2] = np.nan
    with pytest.raises(TembenchError, match=r"scan \(y=3, x=1\), detector pixel \(ky=2, kx=2\)"):
        stream_pass(d, "t", fused=fused, max_bytes=5 * 120 * 4 * 2)


@pytest.mark.parametrize("numba", NUMBA)
@pytest.mark.parametrize("dtype", [np.float32, np.uint16])
def test_crop_bin_stats_any_frame_count_and_strided_outputs(numba, dtype):
    # 15 frames: three groups of four and a remainder of three (the kernel reads frames four at a time);
    # the output also as strided views: row-major (scan_y, pixels, scan_x) as fused_crop_bin fills it, and
    # detector-major (pixels, scan_y, scan_x)
    d = _data(dtype, (3, 5, 17, 19), seed=3)
    y0, x0, f, nby, nbx = 2, 1, 4, 3, 4
    want = d[:, :, y0:y0 + f * nby, x0:x0 + f * nbx].astype(np.float64).reshape(3, 5, nby, f, nbx, f).sum(axis=(3, 5))
    total, changes = _direct_stats(d)
    # (integer data in the scan-major layout only: each strided layout is one more numba compilation per dtype)
    for layout in ("scan-major", "row-major", "detector-major") if dtype == np.float32 else ("scan-major",):
        out = np.full((3, 5, nby, nbx), np.nan, np.float32)
        rm = np.full((3, nby * nbx, 5), np.nan, np.float32)
        dm = np.full((nby * nbx, 3, 5), np.nan, np.float32)
        view = {"scan-major": out, "row-major": rm.transpose(0, 2, 1), "detector-major": dm.transpose(1, 2, 0)}[layout]
        acc = (d[0, 0].reshape(-1).copy(), np.zeros(17 * 19), np.zeros(17 * 19, np.int64))
        tot = ssb_kernels.crop_bin_stats(d, y0, x0, f, nby, nbx, view, acc, numba=numba)
        got = {"scan-major": out, "row-major": rm.transpose(0, 2, 1).reshape(3, 5, nby, nbx),
               "detector-major": dm.transpose(1, 2, 0).reshape(3, 5, nby, nbx)}[layout]
        np.testing.assert_array_equal(got, want.astype(np.float32))
        np.testing.assert_array_equal(tot, d.reshape(15, -1).astype(np.float64).sum(axis=1))
        np.testing.assert_array_equal(acc[1], total)
        np.testing.assert_array_equal(acc[2], changes)


@pytest.mark.parametrize("n_stuck", [3, 200])
def test_dead_pixels_are_the_never_changing_ones_with_a_lively_5x5_median(n_stuck):
    # common.find_bad_pixels takes the 5x5 median of the change counts only where a pixel never changes (a few:
    # per pixel; many: the whole filter); both must equal the definition on the whole detector
    from scipy import ndimage

    from tembench_pelz2022.common import DEAD_MIN_CHANGES, PixelStats, find_bad_pixels

    rng = np.random.default_rng(n_stuck)
    ky, kx = 24, 22
    changes = rng.integers(0, 60, ky * kx)
    changes[rng.choice(ky * kx, n_stuck, replace=False)] = 0
    total = rng.random(ky * kx) + 1.0  # a flat mean pattern: no hot or negative pixels
    stats = PixelStats(total * 100, changes.astype(np.int64), 100)
    ch = changes.reshape(ky, kx)
    want = (ch == 0) & (ndimage.median_filter(ch, size=5, mode="nearest") >= DEAD_MIN_CHANGES)
    bad = find_bad_pixels(np.zeros((10, 10, ky, kx), np.float32), "t", stats=stats, max_fraction=1.0)
    np.testing.assert_array_equal(bad.kind == 3, want)
