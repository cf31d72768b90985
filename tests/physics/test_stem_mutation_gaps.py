"""Gaps in the 4D-STEM engine's tests found by mutation testing of physics/stem.py (issue 18 part 6,
tests/mutation/run_mutmut_physics.sh extra). Each test checks an identity between two public code paths
or a documented definition written out here, not the current output. Fast and deterministic."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest

from tembench.errors import TembenchError
from tembench.physics import potentials as P
from tembench.physics import stem as S


@lru_cache(maxsize=1)
def _problem():   # cached in the module: tests/mutation/recheck.py --direct reuses it across mutants
    rng = np.random.default_rng(12)
    n, s = 32, 0.2
    v = P.projected_potential(rng.uniform(0, 6.4, (8, 3)), [14] * 8, gpts=(n, n), sampling_A=s, slice_thickness_A=2.0,
                              z_range_A=(0, 4.0))
    probe = S.make_probe_modes((24, 24), s, 200, 20, {"C10": -20.0}, n_modes=2, defocus_spread_A=20.0)
    pos = np.array([[2.0, 2.1], [2.53, 2.88], [3.1, 1.7]])
    kw = dict(energy_keV=200, sampling_A=s, positions_A=pos)
    meas = S.stem_scan(v * 1.3, 2.0, probe=probe, bandlimit_transmission=False, **kw).patterns
    return v, probe, meas, kw


def _patterns(v, probe, kw):
    return S.stem_scan(v, 2.0, probe=probe, bandlimit_transmission=False, **kw).patterns.astype(np.float64)


def test_stem_loss_is_the_amplitude_loss_of_the_scanned_patterns():
    """L = Σ(√Î − √I)² with Î the patterns stem_scan gives for the same probe and potential (no band
    limit on t, the gradient engine's default); with ε > 0, You eq 16: Σ(√(Î+ε) − √(I+ε))²."""
    v, probe, meas, kw = _problem()
    pred = _patterns(v, probe, kw)
    m = meas.astype(np.float64)
    loss, gv, gp = S.stem_loss_and_gradient(v, meas, 2.0, probe=probe, **kw)
    assert loss == pytest.approx(np.sum((np.sqrt(pred) - np.sqrt(m)) ** 2), rel=1e-4)
    eps = 0.05 * float(m.max())
    loss_eps, _, _ = S.stem_loss_and_gradient(v, meas, 2.0, probe=probe, amplitude_eps=eps, **kw)
    assert loss_eps == pytest.approx(np.sum((np.sqrt(pred + eps) - np.sqrt(m + eps)) ** 2), rel=1e-4)
    # a real potential by default: a float32 gradient, the real part of the complex-potential gradient
    assert gv.dtype == np.float32 and gv.shape == v.shape and gp.shape == probe.shape
    _, gc, _ = S.stem_loss_and_gradient(v, meas, 2.0, probe=probe, complex_potential=True, **kw)
    assert gc.dtype == np.complex64
    np.testing.assert_allclose(gc.real, gv, rtol=1e-5, atol=1e-6 * np.abs(gv).max())
    assert np.abs(gc.imag).max() > 1e-3 * np.abs(gv).max()


def test_a_single_2d_probe_is_a_one_mode_stack_and_the_chunking_does_not_matter():
    v, probe, meas, kw = _problem()
    one = probe[0] / np.sqrt(np.sum(np.abs(probe[0]) ** 2)) * np.sqrt(np.sum(np.abs(probe) ** 2))
    one = one.astype(np.complex64)
    l2, g2, p2 = S.stem_loss_and_gradient(v, meas, 2.0, probe=one, **kw)
    l3, g3, p3 = S.stem_loss_and_gradient(v, meas, 2.0, probe=one[None], **kw)
    assert p2.shape == (1,) + one.shape
    assert l2 == l3
    np.testing.assert_array_equal(g2, g3)
    # "the result does not depend on" batch_size (documented)
    ref = S.stem_loss_and_gradient(v, meas, 2.0, probe=probe, **kw)
    for bs in (1, 2):
        lb, gb, pb = S.stem_loss_and_gradient(v, meas, 2.0, probe=probe, batch_size=bs, **kw)
        assert lb == pytest.approx(ref[0], rel=1e-5)
        np.testing.assert_allclose(gb, ref[1], rtol=1e-4, atol=1e-5 * np.abs(ref[1]).max())
        np.testing.assert_allclose(pb, ref[2], rtol=1e-4, atol=1e-5 * np.abs(ref[2]).max())


def test_stem_loss_refuses_band_limited_transmissions_and_negative_eps():
    v, probe, meas, kw = _problem()
    with pytest.raises(TembenchError, match="bandlimit_transmission=True is not supported"):
        S.stem_loss_and_gradient(v, meas, 2.0, probe=probe, bandlimit_transmission=True, **kw)
    with pytest.raises(TembenchError, match="amplitude_eps must be >= 0"):
        S.stem_loss_and_gradient(v, meas, 2.0, probe=probe, amplitude_eps=-1e-3, **kw)


def test_window_size_gives_the_requested_detector_pixel():
    """w = λ/(s·Δα) pixels per axis, rounded to an FFT-friendly size not below it, so the window's Fourier
    pixel λ/(w·s) is the requested detector sampling or a little finer; (y, x) kept apart."""
    from tembench.physics.constants import wavelength_A
    from tembench.physics.grid import fft_friendly

    lam = wavelength_A(200.0)
    for det, s in ((0.5, 0.1), ((0.5, 0.8), (0.1, 0.07)), (1.3, (0.05, 0.2))):
        dy, dx = np.broadcast_to(np.asarray(det, float), (2,))
        sy, sx = np.broadcast_to(np.asarray(s, float), (2,))
        got = S.window_gpts_for(det, s, 200.0)
        assert got == (fft_friendly(int(round(lam / (sy * dy * 1e-3)))), fft_friendly(int(round(lam / (sx * dx * 1e-3)))))
        for w, si, d in zip(got, (sy, sx), (dy, dx)):
            assert lam / (w * si) * 1e3 <= d * 1.02          # the Fourier pixel in mrad
    assert S.window_gpts_for(0.5, 0.1, 200.0) == (fft_friendly(501), fft_friendly(501))   # 0.02508 Å/(0.1 Å·0.5 mrad)


def test_scan_raster_by_its_definition():
    """Positions start + i·step: below ``end`` by default, up to and including it with ``endpoint``;
    (y, x) per axis; steps must be positive in both."""
    pos = S.scan_positions((1.0, 2.0), (2.0, 3.5), (0.25, 0.5))
    assert pos.shape == (4, 3, 2) == S.scan_shape((1.0, 2.0), (2.0, 3.5), (0.25, 0.5)) + (2,)
    np.testing.assert_allclose(pos[:, 0, 0], [1.0, 1.25, 1.5, 1.75])
    np.testing.assert_allclose(pos[0, :, 1], [2.0, 2.5, 3.0])
    assert S.scan_shape((1.0, 2.0), (2.0, 3.5), (0.25, 0.5), endpoint=True) == (5, 4)
    np.testing.assert_allclose(S.scan_positions(0.0, (1.0, 2.1), 0.5, endpoint=True)[-1, -1], [1.0, 2.0])
    assert S.scan_shape(0.0, (1.0, 2.1), 0.5) == (2, 5)     # 2.1/0.5 = 4.2 -> 5 positions below 2.1
    assert S.scan_shape(3.0, 1.0, 0.5) == (1, 1)             # an empty range still scans its start
    for bad in ((0.0, 0.5), (0.5, 0.0), (-0.1, 0.5)):
        with pytest.raises(TembenchError, match="scan_step_A"):
            S.scan_shape(0.0, 2.0, bad)


def test_detector_masks_collect_the_angles_in_mrad():
    """A pixel at spatial frequency k scatters to α = |k|·λ (rad); a detector (inner, outer) mrad keeps
    inner ≤ α < outer (None: from 0 / to everything)."""
    from tembench.physics.constants import wavelength_A

    lam = wavelength_A(300.0)
    g, s = (20, 16), (0.1, 0.12)
    ky = np.fft.fftfreq(g[0], s[0])[:, None]
    kx = np.fft.fftfreq(g[1], s[1])[None, :]
    alpha = np.hypot(ky, kx) * lam * 1e3
    names, m = S.detector_masks(g, s, 300.0, {"bf": (None, 30.0), "adf": (30.0, 80.0), "all": (10.0, None)})
    assert names == ["bf", "adf", "all"] and m.dtype == np.float32
    np.testing.assert_array_equal(m[0], alpha < 30.0)
    np.testing.assert_array_equal(m[1], (alpha >= 30.0) & (alpha < 80.0))
    np.testing.assert_array_equal(m[2], alpha >= 10.0)
    assert 0 < m[0].sum() < m[0].size and m[1].sum() > 0
    for bad in ((30.0, 30.0), (40.0, 30.0)):
        with pytest.raises(TembenchError, match="outer angle"):
            S.detector_masks(g, s, 300.0, {"d": bad})
