"""Gaps in the tests of the Pelz plugin's shared reader (``tembench_pelz2022/common.py``) found by mutation
testing (issue 18 part 6; session 7 sample, tests/mutation/RESULTS.md).

Every expected value is known by construction: tiny hand-built 4D arrays whose chunk boundaries, non-finite
values, hot / negative pixels (and the frames they are in) and good neighbours are placed by hand, so the
row ranges, counts, frames and neighbour lists are written out, not computed by the code under test.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from tembench.errors import TembenchError
from tembench_pelz2022 import common

ROW = 3 * 2 * 2 * 4          # bytes of one scan row of a (·, 3, 2, 2) float32 array


def _ramp(rows=7):
    return np.arange(rows * 3 * 2 * 2, dtype=np.float32).reshape(rows, 3, 2, 2)


def test_rows_per_chunk_is_whole_rows_within_the_byte_budget():
    x = _ramp()
    assert common.rows_per_chunk(x, 2 * ROW + 47) == 2            # floor(budget / row bytes)
    assert common.rows_per_chunk(x, 3 * ROW) == 3
    assert common.rows_per_chunk(x, 10) == 1                      # at least one row
    assert common.rows_per_chunk(x, 10**9) == 7                   # at most the whole scan
    assert common.rows_per_chunk(np.zeros((5, 9, 4, 4), np.float64), 2**20) == 5


@pytest.mark.parametrize("backing", ["ram", "file"])
def test_scan_row_chunks_cover_the_scan_once_in_order(tmp_path, backing):
    x = _ramp()
    if backing == "file":   # a raw file with a 100-byte header: offset not a multiple of the page size
        path = tmp_path / "d.raw"
        path.write_bytes(b"h" * 100 + x.tobytes())
        data = np.memmap(path, dtype=np.float32, mode="r", offset=100, shape=x.shape)
        assert common._file_backing(data) == (str(path), 100)
        assert common._file_backing(data[2:]) == (str(path), 100 + 2 * ROW)   # a view further into the file
        assert common._file_backing(data[:, 1]) is None                        # not contiguous
    else:
        data = x
        assert common._file_backing(data) is None
    got = [(r0, r1, np.array(b)) for r0, r1, b in common.scan_row_chunks(data, max_bytes=2 * ROW)]
    assert [(r0, r1) for r0, r1, _ in got] == [(0, 2), (2, 4), (4, 6), (6, 7)]
    for r0, r1, b in got:
        np.testing.assert_array_equal(b, x[r0:r1])
    one = [(r0, r1) for r0, r1, _ in common.scan_row_chunks(data, max_bytes=1)]
    assert one == [(i, i + 1) for i in range(7)]
    # clean_row_chunks without bad pixels: the same blocks
    clean = [(r0, r1, np.array(b)) for r0, r1, b in common.clean_row_chunks(data, None, max_bytes=3 * ROW)]
    assert [(r0, r1) for r0, r1, _ in clean] == [(0, 3), (3, 6), (6, 7)]
    for r0, r1, b in clean:
        np.testing.assert_array_equal(b, x[r0:r1])


@pytest.mark.parametrize("dtype", [np.float32, np.complex64])
def test_stream_pass_counts_non_finite_values_and_frames_over_chunks(dtype):
    x = np.ones((4, 3, 2, 2), dtype)
    x[1, 2, 0, 1] = np.nan            # first in scan order: frame (1, 2)
    x[3, 0, 1, 1] = np.inf            # frame (3, 0): two values
    x[3, 0, 0, 0] = -np.inf
    x[0, 0, 0, 0] = 5.0               # finite
    msg = re.escape("t: the 4D-STEM data hold 3 non-finite value(s) in 2 frame(s); first at scan (y=1, x=2), "
                    "detector pixel (ky=0, kx=1)")
    for max_bytes in (1, 10**6):      # one scan row per chunk, and everything in one chunk
        for stats in (True, False) if dtype == np.float32 else (False,):
            with pytest.raises(TembenchError, match=msg):
                common.stream_pass(x, "t", stats=stats, max_bytes=max_bytes)
        with pytest.raises(TembenchError, match=msg):
            common.check_finite(x, "t", max_bytes=max_bytes)


def test_stream_pass_statistics_consumer_and_frame_count():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 3, (5, 3, 2, 2)).astype(np.float32)
    x[..., 1, 1] = 7.0                                   # never changes
    x[2, 1, 0, 0] = x[0, 0, 0, 0] + 1                     # changes at least here
    seen = []
    st = common.stream_pass(x, "t", consumer=lambda r0, r1, b: seen.append((r0, r1, b.copy())), max_bytes=2 * ROW)
    flat = x.reshape(15, 4).astype(np.float64)
    np.testing.assert_array_equal(st.total, flat.sum(0))
    np.testing.assert_array_equal(st.changes, (flat != flat[0]).sum(0))
    assert st.changes[3] == 0 and st.n_frames == 15
    assert [(a, b) for a, b, _ in seen] == [(0, 2), (2, 4), (4, 5)]
    np.testing.assert_array_equal(np.concatenate([b for *_, b in seen]), x)
    assert common.stream_pass(x, "t", stats=False) is None


def _hot_negative_case():
    """Scan 4 × 5, detector 12²: a flat bright field of 10 counts in a disc of radius 4.5 px about (6, 6);
    1000 instead of 10 at the disc-edge pixel (2, 6) in frame (2, 4) only (mean (19·10 + 1000)/20 = 59.5, above
    the 5x5 median 10 by more than 3 · 10), −1000 at pixel (6, 0) (outside the disc) in frame (3, 1) only
    (mean −50), and a hot pixel (11, 11) at 100 counts in every frame (the corner). Of the eight neighbours
    of (2, 6), (1, 5), (1, 6), (1, 7) are outside the disc (0) and five inside (10)."""
    ky, kx = np.mgrid[:12, :12]
    disc = np.where((ky - 6) ** 2 + (kx - 6) ** 2 <= 4.5**2, 10.0, 0.0)
    x = np.broadcast_to(disc, (4, 5, 12, 12)).astype(np.float32).copy()
    x[2, 4, 2, 6] = 1000.0
    x[3, 1, 6, 0] = -1000.0
    x[:, :, 11, 11] = 100.0
    return x


@pytest.mark.parametrize("max_bytes", [1, 10**7])   # one scan row per chunk, or one chunk
def test_bad_pixels_kind_frame_and_neighbours_by_hand(max_bytes):
    x = _hot_negative_case()
    bad = common.find_bad_pixels(x, "t", max_bytes=max_bytes)
    assert bad.checked and bad.note == "" and bad.level == 10.0
    want = np.zeros((12, 12), np.int8)
    want[2, 6], want[6, 0], want[11, 11] = 1, 2, 1
    np.testing.assert_array_equal(bad.kind, want)
    np.testing.assert_allclose(bad.mean, x.mean(axis=(0, 1), dtype=np.float64))
    assert tuple(bad.worst_frame[2, 6]) == (2, 4) and tuple(bad.worst_frame[6, 0]) == (3, 1)
    assert bad.worst_frame.shape == (12, 12, 2)
    assert tuple(bad.worst_frame[11, 11]) == (0, 0)              # constant: the first frame
    assert bad.counts() == {"hot": 2, "negative": 1, "dead": 0}
    nb = {(y, xx): sorted(zip(ys.tolist(), xs.tolist())) for y, xx, ys, xs in bad.neighbours}
    assert list(nb) == [(2, 6), (6, 0), (11, 11)]                 # row-major order of the bad pixels
    assert nb[(2, 6)] == [(1, 5), (1, 6), (1, 7), (2, 5), (2, 7), (3, 5), (3, 6), (3, 7)]
    assert nb[(6, 0)] == [(5, 0), (5, 1), (6, 1), (7, 0), (7, 1)]   # clipped at the left edge
    assert nb[(11, 11)] == [(10, 10), (10, 11), (11, 10)]            # the corner
    # the listing, description and report name exactly these
    assert bad.listing() == [
        {"kind": "hot", "ky": 2, "kx": 6, "mean": 59.5, "scan_y": 2, "scan_x": 4},
        {"kind": "negative", "ky": 6, "kx": 0, "mean": -50.0, "scan_y": 3, "scan_x": 1},
        {"kind": "hot", "ky": 11, "kx": 11, "mean": 100.0, "scan_y": 0, "scan_x": 0}]
    assert bad.listing(1) == bad.listing()[:1]
    assert bad.describe(2) == ("hot pixel (ky=2, kx=6), mean 59.5, most extreme in frame scan (y=2, x=4); "
                               "negative pixel (ky=6, kx=0), mean -50, most extreme in frame scan (y=3, x=1)"
                               " and 1 more")
    rep = bad.report()
    assert set(rep) == {"bad_pixel_counts", "bad_pixel_mask", "bad_pixels", "bad_pixel_level"}
    np.testing.assert_array_equal(rep["bad_pixel_mask"], want > 0)
    assert rep["bad_pixels"] == bad.listing() and rep["bad_pixel_level"] == 10.0
    with pytest.raises(TembenchError, match=re.escape("t: the detector has 3 bad pixel(s) (2 hot, 1 negative): "
                                                      "hot pixel (ky=2, kx=6)")):
        bad.refuse("t")


def test_repair_replaces_each_bad_pixel_by_its_good_neighbours_and_leaves_the_input():
    x = _hot_negative_case()
    x[:, :, 5, 1] = 4.0                                # a neighbour of (6, 0) with its own value
    bad = common.find_bad_pixels(x, "t")
    before = x.copy()
    fixed = common.repaired(x, bad)
    np.testing.assert_array_equal(x, before)           # the input is not changed
    assert fixed.dtype == np.float32
    assert np.all(fixed[..., 2, 6] == 50.0 / 8.0)      # five neighbours of 10, three of 0
    np.testing.assert_allclose(fixed[..., 6, 0], 4.0 / 5.0, rtol=1e-7)   # (5,1)=4; (5,0), (6,1), (7,0), (7,1)=0
    assert np.all(fixed[..., 11, 11] == 0.0)
    ok = np.ones((12, 12), bool)
    ok[2, 6] = ok[6, 0] = ok[11, 11] = False
    np.testing.assert_array_equal(fixed[..., ok], x[..., ok])
    blk = x[1:3].copy()
    out = common.repair_block(blk, bad)                # default: a copy
    assert out is not blk and np.array_equal(blk, x[1:3])
    assert common.repair_block(blk, bad, in_place=True) is blk and np.all(blk[..., 2, 6] == 6.25)
    ints = x.astype(np.int32)
    assert common.repair_block(ints, bad).dtype == np.float64
    # the repaired second pass of dense_pass feeds the consumer the repaired blocks
    seen = {}
    common.dense_pass(x, None, None, "repair", "t", lambda r0, r1, b: seen.__setitem__(r0, b.copy()), max_bytes=ROW)
    np.testing.assert_array_equal(np.concatenate([seen[r] for r in sorted(seen)]), fixed)


def test_skipped_detection_and_its_notes():
    ev = type("Events", (), {"detector_shape": (6, 7)})()
    for x, note in ((ev, "electron events"), (np.zeros((3, 3, 8, 8), np.float32), "no signal")):
        bad = common.find_bad_pixels(x, "t")
        assert not bad.checked and not bad and note in bad.note and bad.level == 0.0
        assert bad.report()["bad_pixel_note"] == bad.note
    assert common.find_bad_pixels(ev, "t").kind.shape == (6, 7)
    small = common.find_bad_pixels(_hot_negative_case(), "t", disc_radius_px=2.9)
    assert not small.checked and "2.9 px < 3 px" in small.note and not small


def test_load_4d_takes_array_likes_refuses_bad_shapes_and_kinds():
    from tembench.types import Geometry, Measurement

    geo = Geometry(energy_keV=200.0, semiangle_mrad=5.0, detector_sampling_mrad=(2.0, 1.5), scan_step_A=0.5)
    d = np.arange(3 * 4 * 5 * 6, dtype=np.float32).reshape(3, 4, 5, 6)
    axes = ("scan_y", "scan_x", "k_y", "k_x")
    x, grid = common.load_4d(Measurement(kind="4dstem", data=d.tolist(), axes=axes, geometry=geo), "t")
    assert isinstance(x, np.ndarray) and np.array_equal(x, d)          # a nested list: converted
    assert grid.shape == (5, 6) and tuple(grid.sampling_mrad) == (2.0, 1.5)
    x, _ = common.load_4d(Measurement(kind="4dstem", data=d, axes=axes, geometry=geo), "t")
    assert x is d                                                         # an array: as it is
    with pytest.raises(TembenchError, match=re.escape("t: 4D-STEM data must be (scan_y, scan_x, k_y, k_x), "
                                                      "got shape (3, 4, 30)")):
        common.load_4d(Measurement(kind="4dstem", data=d.reshape(3, 4, 30), axes=axes[:3], geometry=geo), "t")
    with pytest.raises(TembenchError, match=r"t: accepts measurement kinds \('4dstem', 'eer'\), got 'image'"):
        common.load_4d(Measurement(kind="image", data=d[0, 0], axes=("y", "x"), geometry=geo), "t")
    bad = d.copy()
    bad[2, 3, 4, 5] = np.nan
    with pytest.raises(TembenchError, match=r"scan \(y=2, x=3\), detector pixel \(ky=4, kx=5\)"):
        common.load_4d(Measurement(kind="4dstem", data=bad, axes=axes, geometry=geo), "t")
    x, _ = common.load_4d(Measurement(kind="4dstem", data=bad, axes=axes, geometry=geo), "t", check=False)
    assert x is bad                                                       # the caller checks


def test_bad_pixel_check_policies_small_disc_and_refusal_messages():
    from types import SimpleNamespace

    x = _hot_negative_case()
    grid = SimpleNamespace(sampling_mrad=(2.0, 0.5))             # √(2 · 0.5) = 1 mrad/px
    assert common.expected_disc_radius_px(grid, 4.5) == 4.5 and common.expected_disc_radius_px(grid, None) is None
    assert common.bad_pixel_check(x, grid, 4.5, "ignore", "t") is None
    assert common.bad_pixel_check(x, grid, 4.5, "repair", "t").counts() == {"hot": 2, "negative": 1, "dead": 0}
    with pytest.raises(TembenchError, match=r"^m: the detector has 3 bad pixel"):
        common.bad_pixel_check(x, grid, 4.5, "refuse", "m")
    # a disc of 2.9 px (under the 3 px the 5x5 median needs): detection skipped, nothing refused
    small = common.bad_pixel_check(x, grid, 2.9, "refuse", "t")
    assert not small.checked and "disc radius 2.9 px" in small.note
    with pytest.raises(TembenchError, match=r"^m: bad_pixels must be 'repair', 'refuse' or 'ignore', got 'fix'"):
        common.bad_pixel_check(x, grid, 4.5, "fix", "m")
    # too many: 10 more isolated hot pixels, 13 of 144 (9.0 % > 5 %); the message names the first ones
    many = x.copy()
    for ky, kx in [(0, 3), (0, 6), (0, 9), (3, 0), (9, 0), (11, 3), (11, 6), (11, 8), (3, 11), (8, 11)]:
        many[:, :, ky, kx] = 1000.0
    with pytest.raises(TembenchError, match=re.escape(
            "m: 13 of 144 detector pixels (9.0 % > 5 %) look defective (hot pixel (ky=0, kx=3), mean 1000, most "
            "extreme in frame scan (y=0, x=0); hot pixel (ky=0, kx=6), mean 1000, most extreme in frame scan (y=0, "
            "x=0); hot pixel (ky=0, kx=9), mean 1000, most extreme in frame scan (y=0, x=0) and 10 more)")):
        common.find_bad_pixels(many, "m")
    assert len(common.find_bad_pixels(many, "m", max_fraction=0.1).neighbours) == 13


def test_few_stuck_pixels_use_the_5x5_median_of_their_own_window():
    """The 'few stuck pixels' path (their own 5x5 medians, edge-padded) against scipy's 5x5 median filter
    (mode 'nearest') of the change counts: a quiet region (never changing) placed so that a window shifted by one
    pixel, or mirrored, gives a different median at the stuck pixel (8, 8) and at the region's own pixels."""
    from scipy import ndimage

    rng = np.random.default_rng(4)
    x = rng.random((5, 5, 16, 16)).astype(np.float32)    # live pixels change in all 24 later frames
    x[:, :, 8, 8] = 0.5                                   # stuck
    x[:, :, 5:11, 5:7] = 0.5                              # quiet columns 3 and 2 left of it
    x[:, :, 5, 5:10] = 0.5                                # and the row 3 above it
    changes = (x.reshape(25, 256) != x.reshape(25, 256)[0]).sum(0).reshape(16, 16)
    stuck = changes == 0
    assert 8 * stuck.sum() < 256                          # the "few" path
    want = stuck & (ndimage.median_filter(changes, size=5, mode="nearest") >= common.DEAD_MIN_CHANGES)
    assert want[8, 8] and not want.all() and want.sum() < stuck.sum()   # both outcomes occur
    bad = common.find_bad_pixels(x, "t", max_fraction=0.2)
    np.testing.assert_array_equal(bad.kind == 3, want)
