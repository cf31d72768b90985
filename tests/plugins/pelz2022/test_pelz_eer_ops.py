"""Table I operations: on electron events they equal their dense counterparts exactly."""

from __future__ import annotations

import numpy as np
import pytest

from tembench.eer import ElectronEvents
from tembench.errors import TembenchError
from tembench_pelz2022 import _kernels, eer_ops
from tembench_pelz2022.eer_ops import DetectorGrid


@pytest.fixture(scope="module")
def sparse():
    """Counted 4D data at ~0.05 e/pixel with a bright disc, plus its events and grid."""
    rng = np.random.default_rng(11)
    ny = nx = 24
    yy, xx = np.mgrid[:ny, :nx]
    disc = ((yy - 12) ** 2 + (xx - 12) ** 2 < 36).astype(float) + 0.02
    lam = disc / disc.sum() * 30  # 30 e/pattern
    c = rng.poisson(np.broadcast_to(lam, (9, 7, ny, nx))).astype(np.float32)
    c[4, 2] = 0  # an empty frame
    grid = DetectorGrid((ny, nx), (12.0, 12.0), (1.5, 1.5))
    return c, ElectronEvents.from_dense(c), grid


@pytest.mark.parametrize("numba", [False, True])
def test_center_of_mass_equal_on_events_and_dense(sparse, numba):
    if numba and not _kernels.HAVE_NUMBA:
        pytest.skip("numba not installed")
    c, ev, grid = sparse
    for norm in ("frame", "mean"):
        cy_d, cx_d, n_d = eer_ops.center_of_mass(c, grid, norm, numba=numba)
        cy_e, cx_e, n_e = eer_ops.center_of_mass(ev, grid, norm, numba=numba)
        assert np.array_equal(n_d, n_e)
        assert np.array_equal(cy_d, cy_e) and np.array_equal(cx_d, cx_e)
    # independent: a direct weighted mean
    f = c[1, 3]
    iy, ix = np.mgrid[:24, :24]
    cy, cx, _ = eer_ops.center_of_mass(ev, grid, "frame", numba=numba)
    assert cy[1, 3] == pytest.approx(((f * iy).sum() / f.sum() - 12) * 1.5, rel=1e-12)
    assert cx[1, 3] == pytest.approx(((f * ix).sum() / f.sum() - 12) * 1.5, rel=1e-12)
    assert cy[4, 2] == 0 and cx[4, 2] == 0  # empty frame


def test_kernels_numba_and_numpy_agree(sparse):
    if not _kernels.HAVE_NUMBA:
        pytest.skip("numba not installed")
    _, ev, _ = sparse
    rng = np.random.default_rng(0)
    table = rng.normal(size=(ev.n_pixels, 4))
    a = _kernels.csr_table_sums(ev.offsets, ev.indices, table, numba=True)
    b = _kernels.csr_table_sums(ev.offsets, ev.indices, table, numba=False)
    assert np.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_binning_cropping_and_centring_equal_dense(sparse):
    c, ev, grid = sparse
    for f in (2, 3, 5):
        b_ev, g_ev = eer_ops.bin_detector(ev, grid, f)
        b_d, g_d = eer_ops.bin_detector(c, grid, f)
        assert g_ev == g_d and b_ev.detector_shape == b_d.shape[2:]
        assert np.array_equal(b_ev.to_dense(), b_d)
    # the binned centre stays on the beam: pixel 12 of 24 with bins of 3 → (12 − 1)/3
    assert eer_ops.bin_detector(ev, grid, 3)[1].centre_px == (11 / 3, 11 / 3)
    win = (3, 20, 5, 17)
    c_ev, gc = eer_ops.crop(ev, grid, win)
    c_d, _ = eer_ops.crop(c, grid, win)
    assert np.array_equal(c_ev.to_dense(), c_d) and gc.centre_px == (9.0, 7.0)
    assert c_ev.n_events == int(c_d.sum())
    cc_ev, gcc = eer_ops.centre_crop(ev, grid, 6)
    cc_d, _ = eer_ops.centre_crop(c, grid, 6)
    assert np.array_equal(cc_ev.to_dense(), cc_d) and gcc.shape == (13, 13) and gcc.centre_px == (6.0, 6.0)
    with pytest.raises(TembenchError, match="not inside"):
        eer_ops.crop(ev, grid, (0, 30, 0, 5))


def test_virtual_detectors_frame_sum_and_vacuum_probe_equal_dense(sparse):
    c, ev, grid = sparse
    bf = eer_ops.annular_mask(grid, 0, 9)
    adf = eer_ops.annular_mask(grid, 9, 30)
    both = np.stack([bf, adf], axis=-1).astype(np.int8)
    r_ev = eer_ops.detector_response(ev, both)
    r_d = eer_ops.detector_response(c, both.astype(np.float32))
    assert np.array_equal(r_ev, r_d.astype(np.int64))
    assert np.array_equal(r_ev[..., 0] + r_ev[..., 1], c.sum(axis=(2, 3)).astype(np.int64))  # annuli tile the detector
    assert np.array_equal(eer_ops.frame_sum(ev), eer_ops.frame_sum(c).astype(np.int64))
    m = np.zeros((9, 7), bool)
    m[:3] = True
    assert np.array_equal(eer_ops.mean_pattern(ev, m), eer_ops.mean_pattern(c, m))
    assert np.allclose(eer_ops.mean_pattern(ev), c.mean(axis=(0, 1)))
    with pytest.raises(TembenchError, match="selects no frame"):
        eer_ops.mean_pattern(ev, np.zeros((9, 7), bool))


def test_vacuum_frames_find_the_empty_region():
    # frames with a dark-field halo (sample) vs without (vacuum)
    rng = np.random.default_rng(3)
    ny = nx = 32
    yy, xx = np.mgrid[:ny, :nx]
    r = np.hypot(yy - 16, xx - 16)
    vac = (r < 5).astype(float)
    samp = vac + 0.05 * (r >= 8)
    lam = np.empty((6, 6, ny, nx))
    lam[:, :3] = samp / samp.sum() * 200
    lam[:, 3:] = vac / vac.sum() * 200
    c = rng.poisson(lam).astype(np.float32)
    ev = ElectronEvents.from_dense(c)
    grid = DetectorGrid((ny, nx), (16.0, 16.0), (1.0, 1.0))
    sel = eer_ops.vacuum_frames(ev, grid, semiangle_mrad=5.0, quantile=0.5)
    assert sel[:, 3:].all() and not sel[:, :3].any()


def test_bright_field_crop_bin_limits_size_and_keeps_centre(sparse):
    c, ev, grid = sparse
    small, g, f = eer_ops.bright_field_crop_bin(ev, grid, semiangle_mrad=9.0, max_pixels=5)
    small_d, g_d, _ = eer_ops.bright_field_crop_bin(c, grid, semiangle_mrad=9.0, max_pixels=5)
    assert max(g.shape) <= 5 and g == g_d
    assert np.array_equal(small.to_dense(), small_d)
    ay, ax = g.axes_mrad()
    assert np.isclose(ay[g.shape[0] // 2], 0) and np.isclose(ax[g.shape[1] // 2], 0)


@pytest.mark.parametrize("numba", [False, True])
def test_remap_histogram_and_one_column_sums_match_numpy_reference(sparse, numba):
    if numba and not _kernels.HAVE_NUMBA:
        pytest.skip("numba not installed")
    c, ev, _ = sparse
    rng = np.random.default_rng(5)
    lut = rng.integers(-1, 50, ev.n_pixels)  # drops about 2 % of the pixels
    off, idx = _kernels.remap_indices(ev.offsets, ev.indices, lut, np.uint16, lambda n: np.uint32, numba=numba)
    new = lut[ev.indices]
    keep = new >= 0
    assert np.array_equal(idx, new[keep].astype(np.uint16))
    assert np.array_equal(np.diff(off.astype(np.int64)), np.bincount(ev.frame_ids()[keep], minlength=ev.n_frames))
    assert np.array_equal(_kernels.histogram(ev.indices, ev.n_pixels, numba=numba),
                          np.bincount(ev.indices, minlength=ev.n_pixels))
    for table in (rng.integers(0, 7, ev.n_pixels), rng.random(ev.n_pixels) > 0.5):
        s = _kernels.csr_table_sums(ev.offsets, ev.indices, table, numba=numba)[:, 0]
        ref = np.bincount(ev.frame_ids(), weights=table[ev.indices].astype(float), minlength=ev.n_frames)
        assert s.dtype == np.int64 and np.array_equal(s, ref.astype(np.int64))


def test_center_of_mass_table_paths_equal_the_index_arithmetic(sparse, monkeypatch):
    c, ev, grid = sparse
    arith = eer_ops.center_of_mass(ev, grid)  # 16-bit indices: Σp and Σ⌊p/nx⌋ by multiply-shift
    wide = ElectronEvents(ev.offsets, ev.indices.astype(np.uint32), ev.scan_shape, ev.detector_shape)
    packed = eer_ops.center_of_mass(wide, grid)  # 32-bit indices: packed (iy << 32 | ix) table
    monkeypatch.setattr(eer_ops, "_PACK_LIMIT", 0)  # as if a frame were so full that Σ ix could carry into Σ iy
    two = eer_ops.center_of_mass(wide, grid)
    dense = eer_ops.center_of_mass(c, grid)
    for a, b, t, d in zip(arith, packed, two, dense):
        assert np.array_equal(a, b) and np.array_equal(a, t) and np.array_equal(a, d)
    m, k = _kernels.row_divisor(24)
    p = np.arange(1 << 16, dtype=np.int64)
    assert np.array_equal((p * m) >> k, p // 24)


@pytest.mark.parametrize("numba", [False, True])
@pytest.mark.parametrize("per_frame", [3, 90, 300, 600])
def test_mask_sums_short_and_long_frames(per_frame, numba):
    """Virtual-detector counts: the per-frame kernel (short frames) and the block-prefix kernel over
    four-index words (≥ 256 events per frame) equal a bincount, with empty first/last frames and
    every event count mod 8."""
    if numba and not _kernels.HAVE_NUMBA:
        pytest.skip("numba not installed")
    rng = np.random.default_rng(per_frame)
    n_pix = 20 * 20
    mask = rng.random(n_pix) > 0.4
    for extra in range(8):
        counts = rng.poisson(per_frame, 37)
        counts[0] = 0
        counts[-1] = 0
        counts[5] += extra
        offsets = np.zeros(38, np.uint32)
        np.cumsum(counts, out=offsets[1:])
        idx = rng.integers(0, n_pix, int(offsets[-1])).astype(np.uint16)
        ref = np.bincount(np.repeat(np.arange(37), counts), weights=mask[idx], minlength=37).astype(np.int64)
        got = _kernels.csr_mask_sums(offsets, idx, mask, numba=numba)
        assert got.dtype == np.int64 and np.array_equal(got, ref)
        assert np.array_equal(_kernels.csr_mask_sums(offsets, idx, mask.astype(np.uint8), numba=numba), ref)
    c = rng.poisson(per_frame / 400, (5, 4, 20, 20)).astype(np.float32)
    ev = ElectronEvents.from_dense(c)
    grid = DetectorGrid((20, 20), (10.0, 10.0), (1.0, 1.0))
    adf = eer_ops.annular_mask(grid, 4, 30)
    r_ev = eer_ops.detector_response(ev, adf, numba=numba)
    assert np.array_equal(r_ev, eer_ops.detector_response(c, adf.astype(np.float32)).astype(np.int64))
