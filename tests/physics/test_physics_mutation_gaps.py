"""Gaps in the physics tests found by mutation testing (issue 18 part 6, tests/mutation/run_mutmut_physics.sh).

Each test checks a documented property against an independent reference — a closed form, a
definition written out here, or an identity between two code paths that must agree by physics —
never the current output of the function under test. Fast (well under a second each).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from tembench.errors import TembenchError
from tembench.physics import coherence as C
from tembench.physics import grid, optics, propagation
from tembench.physics.constants import wavelength_A

LAM_300 = 0.019687489  # Å at 300 keV (literal, as in test_envelopes.py)


# --------------------------------------------------------------------------------------- grid

def test_grid_parameter_checks_accept_the_smallest_valid_and_reject_the_first_invalid_value():
    assert grid.check_gpts(1) == (1, 1)
    assert grid.check_gpts((1, 7)) == (1, 7)
    assert grid.check_gpts(5) == (5, 5)
    for bad in ((0, 4), (4, 0), 0):
        with pytest.raises(TembenchError, match="gpts"):
            grid.check_gpts(bad)
    # (y, x) order kept, a column vector is a pair too
    assert grid.check_sampling((0.1, 0.3)) == (0.1, 0.3)
    assert grid.as_pair(np.array([[0.2], [0.5]])) == (0.2, 0.5)
    assert grid.check_sampling(0.25) == (0.25, 0.25)
    for bad in ((0.0, 0.1), (0.1, 0.0), (math.inf, 0.1), (0.1, math.inf), (0.1, math.nan), (-0.1, 0.1)):
        with pytest.raises(TembenchError, match="sampling_A"):
            grid.check_sampling(bad)
    with pytest.raises(TembenchError, match="extent_A"):
        grid.gpts_for_extent((1.0, 2.0, 3.0), 0.1)


def test_nyquist_is_half_the_inverse_pixel_per_axis():
    assert grid.nyquist_A_inv((0.2, 0.5)) == pytest.approx((2.5, 1.0), rel=1e-15)


def _friendly_by_definition(n: int) -> int:
    m = max(n, 1)
    while True:
        r = m
        for p in (2, 3, 5, 7):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 1


def test_fft_friendly_is_the_smallest_7_smooth_size_not_below_n():
    # 7-smooth numbers written out up to 30: 1 2 3 4 5 6 7 8 9 10 12 14 15 16 18 20 21 24 25 27 28 30
    assert [grid.fft_friendly(n) for n in (0, 1, 11, 13, 17, 19, 22, 23, 26, 29)] == \
        [1, 1, 12, 14, 18, 20, 24, 24, 27, 30]
    assert all(grid.fft_friendly(n) == _friendly_by_definition(n) for n in range(0, 300))


def test_gpts_for_extent_covers_the_extent_at_most_at_the_sampling():
    # 10 Å / 0.5 Å = 20 exactly (no rounding up), 7.6 / 0.5 = 15.2 -> 16; 11 -> 12 when friendly
    assert grid.gpts_for_extent((10.0, 7.6), 0.5, friendly=False) == (20, 16)
    assert grid.gpts_for_extent((5.5, 10.0), (0.5, 0.25), friendly=False) == (11, 40)
    assert grid.gpts_for_extent((5.5, 10.0), (0.5, 0.25)) == (12, 40)
    assert grid.gpts_for_extent(0.01, 0.5, friendly=False) == (1, 1)


def test_frequencies_are_fftfreq_per_axis_and_polar_form_is_their_modulus_and_azimuth():
    ny, nx, sy, sx = 5, 8, 0.2, 0.5
    ky, kx = grid.spatial_frequencies((ny, nx), (sy, sx))
    assert ky.dtype == np.float32 and kx.dtype == np.float32 and ky.shape == (ny, 1) and kx.shape == (1, nx)
    # fftfreq by hand: k_i = i/(n s) for i < n/2, (i − n)/(n s) above
    ky_ref = np.array([0, 1, 2, -2, -1]) / (ny * sy)
    kx_ref = np.array([0, 1, 2, 3, -4, -3, -2, -1]) / (nx * sx)
    np.testing.assert_allclose(ky[:, 0], ky_ref, rtol=1e-6)
    np.testing.assert_allclose(kx[0], kx_ref, rtol=1e-6)
    k, phi = grid.polar_frequencies((ny, nx), (sy, sx))
    assert k.shape == (ny, nx) and phi.shape == (ny, nx) and k.dtype == np.float64
    np.testing.assert_allclose(k, np.hypot(ky_ref[:, None], kx_ref[None, :]), rtol=1e-14)
    np.testing.assert_allclose(phi, np.arctan2(ky_ref[:, None] + 0 * kx_ref, kx_ref[None, :] + 0 * ky_ref[:, None]),
                               rtol=1e-14, atol=1e-15)
    assert phi[1, 0] == pytest.approx(math.pi / 2) and phi[0, 4] == pytest.approx(math.pi)


def test_energy_check_accepts_low_energies():
    # a 0.5 keV beam is valid: λ = hc / sqrt(E(E + 2 m0c²)) with the CODATA values
    assert wavelength_A(0.5) == pytest.approx(12.398419843320026 / math.sqrt(0.5 * (0.5 + 2 * 510.99895000)), rel=1e-9)


# ------------------------------------------------------------------------------------- optics

def test_normalize_aberrations_skips_none_and_refuses_c10_with_a_defocus_alias():
    assert optics.normalize_aberrations({"C10": None, "C30": 1e4, "defocus": 20.0}) == {"C30": 1e4, "C10": -20.0}
    for ab in ({"C10": 5.0, "defocus": 3.0}, {"df": 3.0, "C10": 5.0}):
        with pytest.raises(TembenchError, match="either C10 or a defocus"):
            optics.normalize_aberrations(ab)
    with pytest.raises(TembenchError, match="finite"):
        optics.normalize_aberrations({"C30": math.nan})
    assert optics.defocus_to_C10(50.0) == -50.0


def _chi_closed_form(ky, kx, lam, c10=0.0, c12=0.0, phi12=0.0):
    """χ = πλk² C10 + πλk² C12 cos 2(φ − φ12), written out (float64)."""
    k2 = ky**2 + kx**2
    phi = np.arctan2(ky, kx)
    return math.pi * lam * k2 * (c10 + c12 * np.cos(2 * (phi - phi12)))


def test_aberration_function_closed_form_is_evaluated_in_float64_on_float32_grids():
    # float32 grids (as spatial_frequencies gives): χ of a 1 µm defocus reaches ~10⁴ rad, so a float32
    # evaluation would be off by ~1e-3 rad; the documented float64 evaluation agrees to 1e-12
    # (pixel sizes whose reciprocal is not a float32-exact binary fraction, so a float32 k² is rounded)
    ky, kx = grid.spatial_frequencies((16, 12), (0.13, 0.15))
    ky64, kx64 = ky.astype(np.float64), kx.astype(np.float64)
    chi = optics.aberration_function(ky, kx, LAM_300, {"C10": 1.0e4, "C12": 37.0, "phi12": 0.4})
    assert chi.dtype == np.float64 and chi.shape == (16, 12)
    np.testing.assert_allclose(chi, _chi_closed_form(ky64, kx64, LAM_300, 1.0e4, 37.0, 0.4), rtol=1e-12, atol=1e-9)
    # C10 of exactly 1 Å, and C12 without its angle (φ12 = 0)
    np.testing.assert_allclose(optics.aberration_function(ky, kx, LAM_300, {"C10": 1.0}),
                               _chi_closed_form(ky64, kx64, LAM_300, 1.0), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(optics.aberration_function(ky, kx, LAM_300, {"C12": 20.0}),
                               _chi_closed_form(ky64, kx64, LAM_300, 0.0, 20.0), rtol=1e-12, atol=1e-12)
    # no aberration: zeros on the broadcast grid
    z = optics.aberration_function(ky, kx, LAM_300, None)
    assert z.shape == (16, 12) and not z.any()


def test_envelopes_and_shift_phase_are_evaluated_in_float64_on_float32_grids():
    ky, kx = grid.spatial_frequencies((16, 16), (0.13, 0.11))
    ky64, kx64 = ky.astype(np.float64), kx.astype(np.float64)
    k2 = ky64**2 + kx64**2
    # E_t = exp(−½(πλΔk²)²) near its steep part, where float32 k² would show
    et = optics.temporal_envelope(ky, kx, LAM_300, 40.0)
    np.testing.assert_allclose(et, np.exp(-0.5 * (math.pi * LAM_300 * 40.0 * k2) ** 2), rtol=1e-12, atol=1e-300)
    # E_s for a pure defocus: exp(−2π²θ²C10²k²); θ = 0.05 mrad, C10 = −2000 Å (χ up to ~1.5e3 rad)
    es = optics.spatial_envelope(ky, kx, LAM_300, {"C10": -2000.0}, 0.05)
    np.testing.assert_allclose(es, np.exp(-2 * math.pi**2 * (0.05e-3) ** 2 * 2000.0**2 * k2), rtol=1e-8)
    # exp(−2πi k·s), a shift of many periods
    sh = optics.fourier_shift_phase(ky, kx, (123.4567, -98.7654))
    ref = np.exp(-2j * math.pi * (ky64 * 123.4567 + kx64 * -98.7654))
    assert sh.dtype == np.complex64
    np.testing.assert_allclose(sh, ref.astype(np.complex64), atol=2e-6)


def test_aperture_ramp_is_one_reciprocal_pixel_wide_centred_on_the_cutoff():
    lam = LAM_300
    ky, _ = grid.spatial_frequencies((64, 1), 0.2, dtype=np.float64)
    dk = 1.0 / (64 * 0.2)
    semi = 20.0
    k_cut = semi / (lam * 1e3)
    # points a quarter pixel inside / outside the cut-off and exactly on it (kx only; ky from the grid)
    kx = np.array([[k_cut - 0.25 * dk, k_cut, k_cut + 0.25 * dk, k_cut + 2 * dk]])
    a = optics.aperture(np.zeros((1, 1)) + 0 * ky[:1], kx, lam, semi)   # default edge: the x-step of kx
    # the default edge is one reciprocal pixel of the coarser axis: here kx's smallest |k| ≥ dk
    edge_px = max(dk, float(np.min(np.abs(kx)))) / dk
    expect = np.clip(np.array([0.25, 0.0, -0.25, -2.0]) / edge_px + 0.5, 0, 1)
    a_grid = optics.aperture(ky, kx, lam, semi)
    assert a.dtype == np.float32 and a_grid.dtype == np.float32 and a_grid.shape == (64, 4)
    np.testing.assert_allclose(a[0], expect, atol=1e-5)
    # an explicit 0.5 mrad ramp: 0.1 mrad outside the cut-off transmits 0.5 − 0.2 = 0.3
    kx2 = np.array([[(semi + 0.1) / (lam * 1e3), (semi - 0.1) / (lam * 1e3)]])
    np.testing.assert_allclose(optics.aperture(np.zeros((1, 1)), kx2, lam, semi, edge_mrad=0.5)[0], [0.3, 0.7],
                               atol=1e-5)
    # hard edge (edge 0): a frequency exactly on the cut-off is inside
    x = 0.37
    assert optics.aperture(np.zeros((1, 1)), np.array([[x]]), lam, x * (lam * 1e3), edge_mrad=0.0)[0, 0] == 1.0
    assert optics.aperture(np.zeros((1, 1)), np.array([[x]]), lam, x * (lam * 1e3) * 0.999, edge_mrad=0.0)[0, 0] == 0.0
    # no aperture: ones on the broadcast grid; a 0.5 mrad aperture is valid, 0 is not
    ones = optics.aperture(ky, kx, lam, None)
    assert ones.shape == (64, 4) and ones.dtype == np.float32 and np.all(ones == 1)
    assert optics.aperture(ky, kx, lam, math.inf).shape == (64, 4)
    assert optics.aperture(ky, kx, lam, 0.5).shape == (64, 4)
    with pytest.raises(TembenchError, match="semiangle_mrad"):
        optics.aperture(ky, kx, lam, 0.0)


def test_probe_fourier_is_a_plane_wave_without_aperture_and_carries_exp_minus_i_chi():
    # no aperture and no aberration: Ψ = 1 at every pixel, so ψ(r) is a delta at the origin with Σ|ψ|² = 1
    pk = optics.probe_fourier((8, 6), 0.3, 300.0, None)
    np.testing.assert_allclose(pk, np.ones((8, 6)), atol=1e-7)
    # the phase at a passed pixel is −χ = −πλC10k²
    g = (32, 32)
    ky, kx = grid.spatial_frequencies(g, 0.2, dtype=np.float64)
    pk = optics.probe_fourier(g, 0.2, 300.0, 30.0, {"C10": 25.0}, edge_mrad=0.0)
    k2 = float(ky[1, 0] ** 2 + kx[0, 2] ** 2)
    assert np.angle(pk[1, 2]) == pytest.approx(math.remainder(-math.pi * LAM_300 * 25.0 * k2, 2 * math.pi), abs=1e-5)
    # hard aperture (edge 0): |Ψ| takes exactly two values, 0 and the normalisation
    vals = np.unique(np.round(np.abs(pk), 5))
    assert len(vals) == 2 and vals[0] == 0


def test_probe_default_centre_and_defocus_equals_free_space_propagation():
    ny, nx, s = 33, 47, (0.2, 0.3)   # odd sizes: the centre pixel is n//2, not n/2
    p = optics.probe((ny, nx), s, 300.0, 25.0)
    inten = np.abs(p) ** 2
    y = np.arange(ny)[:, None] * s[0]
    x = np.arange(nx)[None, :] * s[1]
    # centroid of an aberration-free probe = the window centre (ny//2 sy, nx//2 sx)
    assert float(np.sum(inten * y)) == pytest.approx((ny // 2) * s[0], abs=2e-3)
    assert float(np.sum(inten * x)) == pytest.approx((nx // 2) * s[1], abs=2e-3)
    # a probe with C10 = c is the focused probe propagated by Δz = c (Fresnel): exp(−iπλ c k²) both
    c = 60.0
    pd = optics.probe((ny, nx), s, 300.0, 25.0, {"C10": c})
    prop = propagation.propagate(p, c, s, LAM_300, band_limit=None)
    np.testing.assert_allclose(pd, prop, atol=2e-6)
    # edge 0 gives a hard aperture in Fourier space
    ph = optics.probe((ny, nx), s, 300.0, 25.0, edge_mrad=0.0)
    vals = np.unique(np.round(np.abs(np.fft.fft2(ph)), 4))
    assert len(vals) == 2


# -------------------------------------------------------------------------------- propagation

def test_band_limit_mask_cutoff_taper_and_no_limit_cases():
    n, s = 64, 0.1
    # band limit √2 (or None) keeps every frequency, corners included
    for bl in (None, math.sqrt(2.0), 2.0):
        m = propagation.band_limit_mask((n, n), s, bl)
        assert m.dtype == np.float32 and m.shape == (n, n) and np.all(m == 1)
    with pytest.raises(TembenchError, match="band_limit"):
        propagation.band_limit_mask((n, n), s, 0.0)
    ky, kx = grid.spatial_frequencies((n, n), s, dtype=np.float64)
    k = np.hypot(ky, kx)
    cutoff = (2 / 3) / (2 * s)
    # no taper: a hard disc |k| < cutoff
    hard = propagation.band_limit_mask((n, n), s, 2 / 3, taper=0.0)
    assert hard.dtype == np.float32
    np.testing.assert_array_equal(hard, (k < cutoff).astype(np.float32))
    # 3 % cosine taper inside the cut-off: 1 below cutoff − w, ½(1 + cos(π (k − cutoff + w)/w)) above, 0 beyond
    w = 0.03 * cutoff
    ref = np.where(k < cutoff - w, 1.0, 0.5 * (1 + np.cos(np.pi * (k - cutoff + w) / w)))
    ref[k >= cutoff] = 0.0
    np.testing.assert_allclose(propagation.band_limit_mask((n, n), s, 2 / 3), ref, atol=1e-6)
    # a 50 % taper makes the ramp visible on many pixels
    w = 0.5 * cutoff
    ref = np.where(k < cutoff - w, 1.0, 0.5 * (1 + np.cos(np.pi * (k - cutoff + w) / w)))
    ref[k >= cutoff] = 0.0
    np.testing.assert_allclose(propagation.band_limit_mask((n, n), s, 2 / 3, taper=0.5), ref, atol=1e-6)


def test_fresnel_and_exact_propagators_against_their_closed_forms():
    n, s, dz = 32, 0.3, 25.0
    lam = 0.4  # a long wavelength, so the exact and paraxial propagators differ visibly
    ky, kx = grid.spatial_frequencies((n, n), s, dtype=np.float64)
    k2 = ky**2 + kx**2
    fres = propagation.propagator((n, n), s, lam, dz, "fresnel", band_limit=None)
    np.testing.assert_allclose(fres, np.exp(-1j * math.pi * lam * dz * k2), atol=2e-6)
    exact = propagation.propagator((n, n), s, lam, dz, "exact", band_limit=None)
    np.testing.assert_allclose(exact, np.exp(2j * math.pi * dz * (np.sqrt(1 / lam**2 - k2) - 1 / lam)), atol=2e-6)
    assert np.max(np.abs(exact - fres)) > 0.1
    # the exact propagator exists up to |k| = 1/λ: corner |k|² = 2/(2s)² = 5.56 < 1/λ² = 6.25 here
    with pytest.raises(TembenchError, match="evanescent"):
        propagation.propagator((n, n), 0.25, lam, dz, "exact", band_limit=None)
    with pytest.raises(TembenchError, match="propagator kind"):
        propagation.propagator((n, n), s, lam, dz, "paraxial")


def test_propagate_defaults_batches_and_band_limit():
    n, s, lam, dz = 32, 0.2, LAM_300, 50.0
    ky, kx = grid.spatial_frequencies((n, n), s, dtype=np.float64)
    # a plane wave e^{2πi k·r} at a frequency beyond 2/3 Nyquist: kept without band limit, removed with the default
    iy, ix = 2, 13
    y = np.arange(n)[:, None] * s
    x = np.arange(n)[None, :] * s
    wave = np.exp(2j * math.pi * (ky[iy, 0] * y + kx[0, ix] * x)).astype(np.complex64)
    batch = np.stack([wave, 2 * wave])
    out = propagation.propagate(batch, dz, s, lam, band_limit=None)
    factor = np.exp(-1j * math.pi * lam * dz * (ky[iy, 0] ** 2 + kx[0, ix] ** 2))
    assert out.shape == (2, n, n)
    np.testing.assert_allclose(out[0], wave * factor, atol=1e-5)
    np.testing.assert_allclose(out[1], 2 * wave * factor, atol=2e-5)
    assert np.max(np.abs(propagation.propagate(wave, dz, s, lam))) < 1e-6   # default 2/3 band limit
    np.testing.assert_allclose(propagation.propagate(out[0], dz, s, lam, band_limit=None, adjoint=True), wave,
                               atol=1e-5)


def test_propagator_cache_returns_the_same_arrays_and_the_band_limited_values():
    g, s, lam = (32, 40), (0.2, 0.15), LAM_300
    cache = propagation.PropagatorCache(g, s, lam, band_limit=0.5)
    p = cache(12.5)
    assert cache(12.5) is p and cache(12.5000000001) is p
    np.testing.assert_array_equal(p, propagation.propagator(g, s, lam, 12.5, "fresnel", 0.5))
    sc = cache.scaled(12.5, 0.25)
    assert cache.scaled(12.5, 0.25) is sc
    np.testing.assert_allclose(sc, 0.25 * p, rtol=1e-6)
    m = cache.mask()
    assert cache.mask() is m
    np.testing.assert_array_equal(m, propagation.band_limit_mask(g, s, 0.5))


@pytest.mark.parametrize("nx, band_limit", [(64, 2 / 3), (45, 0.5), (40, None)])
def test_kept_columns_are_exactly_the_columns_inside_the_band_limit(nx, band_limit):
    ny, s = 30, (0.1, 0.12)
    cache = propagation.PropagatorCache((ny, nx), s, LAM_300, band_limit=band_limit)
    left, right = cache.kept_columns()
    assert cache.kept_columns() == (left, right)
    kx = np.fft.fftfreq(nx, d=s[1])
    if band_limit is None:
        inside = np.ones(nx, bool)
    else:
        inside = np.abs(kx) < band_limit / (2 * max(s))   # a column is kept iff its ky = 0 pixel is inside
    kept = np.zeros(nx, bool)
    kept[:left] = True
    kept[nx - right:nx] = True
    assert left + right <= nx
    np.testing.assert_array_equal(kept, inside)


# --------------------------------------------------------------------------------- coherence

def test_gauss_hermite_rule_has_the_moments_of_the_normal_distribution():
    with pytest.raises(TembenchError):
        C.gaussian_quadrature(1.0, 0)
    x, w = C.gaussian_quadrature(2.0, 1)
    assert list(x) == [0.0] and list(w) == [1.0]
    for n in (2, 3, 5):
        x, w = C.gaussian_quadrature(2.0, n)
        assert len(x) == n
        assert w.sum() == pytest.approx(1.0, abs=1e-14)
        assert float(np.sum(w * x)) == pytest.approx(0.0, abs=1e-12)
        assert float(np.sum(w * x**2)) == pytest.approx(4.0, rel=1e-12)   # exact up to degree 2n − 1
        if n >= 3:
            assert float(np.sum(w * x**4)) == pytest.approx(3 * 2.0**4, rel=1e-12)


def test_focal_quadrature_reproduces_the_temporal_envelope_up_to_k_max():
    # Σ w exp(−iπλk²δ) must equal exp(−½(πλΔk²)²) at every k ≤ k_max (the accuracy it is chosen for)
    lam, delta, k_max = LAM_300, 30.0, 6.0
    d, w = C.focal_quadrature(delta, lam, k_max)
    assert w.sum() == pytest.approx(1.0, abs=1e-14)
    assert float(np.sum(w * d)) == pytest.approx(0.0, abs=1e-9)
    k = np.linspace(0, k_max, 400)
    quad = np.sum(w[None, :] * np.exp(-1j * math.pi * lam * k[:, None] ** 2 * d[None, :]), axis=1)
    # nodes over ±4Δ only: the truncated Gaussian's variance is 0.9989 Δ², so agreement is ~1e-4, while a
    # rule with too few nodes aliases by O(0.1)
    np.testing.assert_allclose(quad, np.exp(-0.5 * (math.pi * lam * delta * k**2) ** 2), atol=2e-4)
    # explicit n honoured; nodes span ±4Δ symmetrically; no spread (even below 1 Å is a spread) → a single node
    d9, w9 = C.focal_quadrature(0.5, lam, 1.0, n=9)
    assert len(d9) == 9 and d9[0] == pytest.approx(-2.0) and d9[-1] == pytest.approx(2.0)
    d0, w0 = C.focal_quadrature(0.0, lam, 1.0)
    assert list(d0) == [0.0] and list(w0) == [1.0]


def test_bin_image_averages_blocks_of_the_last_two_axes():
    rng = np.random.default_rng(3)
    img = rng.random((2, 6, 9))
    b = C.bin_image(img, 3)
    ref = np.array([[[img[i, 3 * a:3 * a + 3, 3 * c:3 * c + 3].mean() for c in range(3)] for a in range(2)]
                    for i in range(2)])
    np.testing.assert_allclose(b, ref, rtol=1e-12)
    b2 = C.bin_image(img[:, :, :8], 2)
    assert b2.shape == (2, 3, 4)
    assert b2[1, 2, 3] == pytest.approx(img[1, 4:6, 6:8].mean())
    assert C.bin_image(img, 1) is img
    for shape in ((6, 8), (7, 9)):
        with pytest.raises(TembenchError, match="cannot be binned"):
            C.bin_image(np.ones(shape), 3)


def _grating(n: int, s: float) -> np.ndarray:
    y = np.arange(n) * s
    return (20.0 * (np.cos(2 * np.pi * 4 * y / (n * s))[:, None] + np.cos(2 * np.pi * 3 * y / (n * s))[None, :]))


def test_partially_coherent_defocus_can_be_split_between_specimen_drift_and_objective():
    # Object then a vacuum drift T (two slices, each followed by a propagation of T) at defocus Δf is
    # the thin object at Δf − 2T: under a beam tilt θ, the drift shifts the wave by T·tanθ per slice and
    # the defocused objective evaluated at k + θ/λ shifts it by −C10·θ, so the two agree only if the
    # tilt enters propagation and objective with the same sign and units (θ mrad → θ·1e-3/λ 1/Å).
    n, s, T = 48, 0.25, 40.0
    v = np.zeros((2, n, n), np.float32)
    v[0] = _grating(n, s)
    kw = dict(energy_keV=300.0, sampling_A=s, band_limit=None, bandlimit_transmission=False,
              illumination_rms_mrad=1.5, n_illumination=5)
    thick = C.partially_coherent_hrtem_images(v, T, defocus_values_A=[300.0], **kw)[0]
    thin = C.partially_coherent_hrtem_images(v[:1], 0.0, defocus_values_A=[300.0 - 2 * T], **kw)[0]
    assert thick.dtype == np.float32
    contrast = float(np.abs(thin - thin.mean()).max())
    assert contrast > 0.01
    assert float(np.abs(thick - thin).max()) < 1e-3 * contrast


def test_partially_coherent_without_spread_is_the_coherent_hrtem_image():
    from tembench.physics.multislice import hrtem_images

    n, s = 32, 0.3
    rng = np.random.default_rng(5)
    v = (rng.random((3, n, n)) * 30.0).astype(np.float32)
    # 2 keV (λ = 0.27 Å): the exact and Fresnel propagators differ by a visible amount at these angles
    args = dict(energy_keV=2.0, sampling_A=s, defocus_values_A=[40.0, -60.0],
                aberrations={"C30": 2e7, "C12": 30.0, "phi12": 0.2, "C10": 15.0}, semiangle_mrad=150.0)
    opts = dict(propagator="exact", band_limit=0.5, bandlimit_transmission=False)
    ref = hrtem_images(v, 8.0, **args, **opts)
    got = C.partially_coherent_hrtem_images(v, 8.0, **args, **opts)
    assert got.dtype == np.float32 and got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=2e-5)
    fresnel = hrtem_images(v, 8.0, **args, **dict(opts, propagator="fresnel"))
    assert np.abs(fresnel - ref).max() > 1e-3
    # n_focal = 3: nodes −4Δ, 0, +4Δ with weights ∝ exp(−x²/2) as documented, i.e. the weighted sum
    # of three coherent images at Δf + δ
    delta = 50.0
    w = np.exp(-0.5 * np.array([16.0, 0.0, 16.0]))
    w /= w.sum()
    expect = sum(wi * hrtem_images(v, 8.0, **dict(args, defocus_values_A=[df + d for df in args["defocus_values_A"]]),
                                   **opts) for wi, d in zip(w, (-4 * delta, 0.0, 4 * delta)))
    three = C.partially_coherent_hrtem_images(v, 8.0, **args, **opts, focal_spread_A=delta, n_focal=3)
    np.testing.assert_allclose(three, expect, atol=2e-5)


def test_a_one_node_focal_rule_is_the_in_focus_node():
    # found by mutation testing: np.linspace(-4, 4, 1) = [-4] put the single node at -4Δ (fixed)
    d, w = C.focal_quadrature(50.0, LAM_300, 2.0, n=1)
    assert list(d) == [0.0] and list(w) == [1.0]


# --------------------------------------------------------------------------------- potentials

def test_frozen_phonon_displacements_have_the_requested_rms():
    # each atom is displaced by N(0, rms²) per axis: recover the displacement of one atom from the
    # phase of the lowest Fourier coefficient of its projected potential (shift theorem, exact on the
    # periodic grid) and compare the sample rms over 200 configurations with the requested 0.2 Å
    from tembench.physics.potentials import projected_potential

    n, s, rms = 32, 0.25, 0.2
    L = n * s
    rng = np.random.default_rng(11)
    shifts = []
    for _ in range(200):
        # atom at x = 1.0 Å, y = 1.5 Å (x → last axis): phases −2πx/L well inside (−π, π)
        v = projected_potential([[1.0, 1.5, 1.0]], [14], gpts=(n, n), sampling_A=s, rms_displacement_A=rms, rng=rng)[0]
        f = np.fft.fft2(v.astype(np.float64))
        shifts.append((-np.angle(f[1, 0]) * L / (2 * math.pi) - 1.5, -np.angle(f[0, 1]) * L / (2 * math.pi) - 1.0))
    d = np.array(shifts)
    assert np.abs(d.mean(axis=0)).max() < 0.05
    assert float(np.sqrt((d**2).mean())) == pytest.approx(rms, rel=0.15)


def test_a_one_degree_rotation_moves_the_volume_like_the_points():
    # no rotation angle is special: 1° moves an off-centre blob as the same rotation moves its centre
    # (rotate_points, exact), and the adjoint moves it back the other way
    from tembench.physics import rotation as R

    n = 28
    zz, yy, xx = np.meshgrid(*(np.arange(n, dtype=np.float64),) * 3, indexing="ij")
    p = np.array([20.0, 14.0, 14.0])   # (x, y, z) voxels, 6 voxels off the rotation centre along x
    vol = np.exp(-((xx - p[0]) ** 2 + (yy - p[1]) ** 2 + (zz - p[2]) ** 2) / (2 * 1.5**2)).astype(np.float32)

    def com(v):
        v = v.astype(np.float64)
        return np.array([float((v * c).sum() / v.sum()) for c in (xx, yy, zz)])

    m = R.axis_rotation_matrix(1.0, "y")
    c = np.full(3, n / 2)
    moved = R.rotate_points(p[None], m, c)[0]
    assert np.abs(moved - p).max() > 0.1   # 6·sin 1° = 0.105 voxel
    np.testing.assert_allclose(com(R.rotate(vol, 1.0, "y")), moved, atol=0.02)
    back = R.rotate_points(p[None], m.T, c)[0]
    np.testing.assert_allclose(com(R.rotate_adjoint(vol, 1.0, "y")), back, atol=0.02)


def test_slice_edges_follow_their_documented_rules():
    from tembench.physics.potentials import slice_edges

    # a float thickness from z0: the last slice is thinner when dz does not divide the range
    np.testing.assert_array_equal(slice_edges(2.0, (5.0, 12.0)), [5.0, 7.0, 9.0, 11.0, 12.0])
    np.testing.assert_array_equal(slice_edges(2.0, (5.0, 11.0)), [5.0, 7.0, 9.0, 11.0])
    np.testing.assert_array_equal(slice_edges(0.5, (3.0, 3.0)), [3.0, 3.5])   # an empty range: one slice
    # per-slice thicknesses: from z0 to z0 + their sum
    np.testing.assert_allclose(slice_edges([1.0, 2.5, 0.5], (-2.0, 0.0)), [-2.0, -1.0, 1.5, 2.0])
    np.testing.assert_allclose(slice_edges([0.4], (1.0, 1.0)), [1.0, 1.4])
    for bad in ((0.0, (0.0, 1.0)), ([1.0, 0.0], (0.0, 1.0)), ([0.5, -1.0], (0.0, 1.0)), ([], (0.0, 1.0)),
                (1.0, (2.0, 1.0))):
        with pytest.raises(TembenchError):
            slice_edges(*bad)


def test_projected_potential_is_the_sum_of_single_atom_potentials_on_both_packing_paths():
    # superposition: the potential of many atoms is the sum of each atom's potential in its slice. With
    # 12 atoms in one slice and 1 in each of 14 others the packed table would be mostly padding, so the
    # slice-by-slice path is taken; with 2 atoms per slice the packed path. Both must give the sum.
    from tembench.physics.potentials import projected_potential

    rng = np.random.default_rng(4)
    g, s = (24, 20), (0.3, 0.35)
    for per_slice in ([12] + [1] * 14, [2] * 8):   # 15·12 = 180 > 4·26 + 64 padded rows; 8·2 = 16 < 4·16 + 64
        z = np.concatenate([np.full(k, i + 0.5) for i, k in enumerate(per_slice)])
        pos = np.column_stack([rng.uniform(0, 7.0, z.size), rng.uniform(0, 7.2, z.size), z])
        zs = np.full(z.size, 14)   # one element: the structure factor of all atoms goes through one table
        kw = dict(gpts=g, sampling_A=s, slice_thickness_A=1.0, z_range_A=(0.0, float(len(per_slice))))
        total = projected_potential(pos, zs, **kw)
        assert total.shape == (len(per_slice),) + g and total.dtype == np.float32
        ref = np.zeros(total.shape)
        for p, Z in zip(pos, zs):
            ref += projected_potential(p[None], [Z], **kw)
        np.testing.assert_allclose(total, ref, atol=2e-3 * np.abs(ref).max())


# --------------------------------------------------------------------------------- multislice

def test_transmission_of_a_complex_potential_is_phase_times_absorption():
    """t = exp(iσ(a + ib)) = exp(iσa)·exp(−σb): the absorptive branch, written out (found untested by
    mutation testing of multislice.py: 1j·σ/v, 1j/σ·v and 2j·σ·v all survived)."""
    from tembench.physics import multislice as M

    sigma = 0.00065  # rad/(V·Å), about the 300 keV value
    rng = np.random.default_rng(3)
    a = rng.uniform(0, 200, (2, 5, 7))
    b = rng.uniform(0, 20, (2, 5, 7))
    expected = np.exp(-sigma * b) * (np.cos(sigma * a) + 1j * np.sin(sigma * a))
    t = M.transmission_function((a + 1j * b).astype(np.complex64), sigma, np)
    assert t.dtype == np.complex64 and t.shape == a.shape
    np.testing.assert_allclose(t, expected, rtol=2e-6, atol=2e-7)
    out = np.zeros(a.shape, np.complex64)
    assert M.transmission_function((a + 1j * b).astype(np.complex64), sigma, np, out=out) is out
    np.testing.assert_allclose(out, expected, rtol=2e-6, atol=2e-7)
    # the real branch is the b = 0 case of the same formula
    np.testing.assert_allclose(M.transmission_function(a.astype(np.float32), sigma, np),
                               np.exp(1j * sigma * a), rtol=2e-6, atol=2e-7)


def test_transmission_gradient_of_a_complex_potential_keeps_the_imaginary_part():
    """g_v = −iσ conj(t) g_t; for an absorptive (complex) potential both parts are gradients, for a
    real potential only the real part (finite differences on L = Re Σ w·t)."""
    from tembench.physics import multislice as M

    sigma, rng = 0.01, np.random.default_rng(4)
    v = rng.uniform(0, 50, 6) + 1j * rng.uniform(0, 5, 6)
    w = rng.normal(size=6) + 1j * rng.normal(size=6)

    def loss(v):
        return float(np.real(np.sum(np.conj(w) * np.exp(1j * sigma * v))))

    t = np.exp(1j * sigma * v)
    g = M.transmission_gradient(w, t, sigma, complex_potential=True)  # dL/dRe v + i dL/dIm v convention
    h = 1e-4
    for k in range(6):
        e = np.zeros(6)
        e[k] = h
        d_re = (loss(v + e) - loss(v - e)) / (2 * h)
        d_im = (loss(v + 1j * e) - loss(v - 1j * e)) / (2 * h)
        np.testing.assert_allclose([g[k].real, g[k].imag], [d_re, d_im], rtol=1e-5, atol=1e-9)
    g_real = M.transmission_gradient(w, t, sigma)
    assert np.isrealobj(g_real) or np.all(np.imag(g_real) == 0)
    np.testing.assert_allclose(np.real(g_real), g.real)


# ------------------------------------------------------------- potentials: guards and the method rule

def test_projected_potential_memory_guard_is_the_output_stack_plus_three_complex_planes():
    """The up-front estimate of :func:`projected_potential` is the float32 output (n_slices·ny·nx·4 B)
    plus three complex64 work planes (3·ny·nx·8 B); a limit of exactly that passes, one byte less
    raises (before anything is allocated), and the message states both sizes in GiB."""
    from tembench.errors import ResourceError
    from tembench.physics.potentials import projected_potential

    g, n = (6, 10), 3
    need = n * g[0] * g[1] * 4 + 3 * g[0] * g[1] * 8
    kw = dict(gpts=g, sampling_A=0.4, slice_thickness_A=1.0, z_range_A=(0.0, 3.0))
    v = projected_potential([[1.0, 1.0, 0.5]], [6], max_bytes=need, **kw)
    assert v.shape == (n,) + g
    with pytest.raises(ResourceError):
        projected_potential([[1.0, 1.0, 0.5]], [6], max_bytes=need - 1, **kw)
    # a large grid: refused up front (nothing allocated), 4·2¹⁴·2¹⁴·4 B + 3·2¹⁴·2¹⁴·8 B = 10 GiB
    with pytest.raises(ResourceError, match=r"4 slices x 16384x16384 needs 10\.00 GiB > limit 1\.50 GiB"):
        projected_potential([[1.0, 1.0, 0.5]], [6], gpts=2**14, sampling_A=0.1, slice_thickness_A=1.0,
                            z_range_A=(0.0, 4.0), max_bytes=int(1.5 * 2**30))


def test_potential_volume_memory_guard_is_the_padded_complex_spectrum_twice_plus_the_output():
    """:func:`potential_volume` pads z by ⌈5 Å / s⌉ voxels on each side to an FFT-friendly nzp and
    estimates 2 complex64 volumes of nzp·ny·nx plus the float32 output nz·ny·nx."""
    from types import SimpleNamespace

    from tembench.errors import ResourceError
    from tembench.physics.potentials import potential_volume

    s = 0.5
    sample = SimpleNamespace(cell_A=(3.0, 4.0, 2.0), positions_A=np.array([[1.5, 2.0, 1.0]]), numbers=np.array([8]))
    nx, ny, nz = 6, 8, 4
    pad = 10                        # ⌈5 / 0.5⌉
    nzp = 24                        # 4 + 2·10 = 24 = 2³·3 is already FFT-friendly
    need = nzp * ny * nx * 8 * 2 + nz * ny * nx * 4
    vol = potential_volume(sample, s, max_bytes=need)
    assert vol.shape == (nz, ny, nx) and vol.dtype == np.float32
    with pytest.raises(ResourceError, match=r"4x8x6 \(padded 24 in z\)"):
        potential_volume(sample, s, max_bytes=need - 1)
    assert pad == math.ceil(5.0 / s)
    big = SimpleNamespace(cell_A=(1024.0, 1024.0, 10.0), positions_A=np.zeros((1, 3)), numbers=np.array([8]))
    # 0.5 Å: 2048² × 20 voxels, nzp = fft_friendly(40) = 40: 2·40·2048²·8 B + 20·2048²·4 B = 2.5 + 0.3125 GiB
    with pytest.raises(ResourceError, match=r"needs 2\.81 GiB > limit 1\.00 GiB"):
        potential_volume(big, s, max_bytes=2**30)
    with pytest.raises(TembenchError, match="sampling_A"):
        potential_volume(sample, 0.0)


def test_choose_method_follows_its_documented_cost_rule():
    """The docstring's rule, written out: exact ≈ 1 ns·atoms·ny·(nx//2 + 1); spread ≈ 150 ns·atoms +
    0.3 ns·slices·max(1, elements)·My·Mx·log2(My·Mx) on the oversampled My × Mx grid; "spread" iff the
    exact estimate exceeds both the spread estimate and 20 ms; "exact" without atoms or off the CPU."""
    from tembench.physics import _spread as S
    from tembench.physics.potentials import choose_method

    def rule(n_atoms, gpts, n_slices, n_elements):
        ny, nx = gpts
        my, mx = S.oversampled_size(ny), S.oversampled_size(nx)
        exact = 1.0 * n_atoms * ny * (nx // 2 + 1)
        spread = 150.0 * n_atoms + 0.3 * n_slices * max(1, n_elements) * my * mx * math.log2(max(2, my * mx))
        return "spread" if exact > max(spread, 20e6) else "exact"

    assert choose_method(41472, (256, 256), 98, 1) == "spread"     # the docstring's frozen-phonon Si block
    assert choose_method(288, (96, 96), 4, 1) == "exact"           # its 3×3×4-cell crystal
    assert choose_method(0, (512, 512), 10, 1) == "exact"
    assert choose_method(10**6, (512, 512), 1, 1, xp=object()) == "exact"   # not numpy: exact
    cases = [(a, (ny, nx), s, e) for a in (100, 2000, 3000, 20000, 300000) for ny, nx in ((64, 64), (128, 96), (256, 250))
             for s in (1, 20, 200) for e in (0, 1, 3)]
    got = [choose_method(a, g, s, e) for a, g, s, e in cases]
    assert got == [rule(*c) for c in cases]
    assert {"spread", "exact"} <= set(got)   # the grid crosses the boundary
    # near the boundary in each variable: the rule's constants and comparisons are pinned
    for a in range(1, 40000, 997):
        for s in (1, 5, 50):
            assert choose_method(a, (160, 160), s, 2) == rule(a, (160, 160), s, 2)


@pytest.mark.parametrize("parametrization", ["lobato", "kirkland"])
def test_projected_scattering_kernel_times_the_structure_factor_is_the_projected_potential(parametrization):
    """Public kernel K·f_e(|q|)/(sy·sx), float32: on an odd grid (no Nyquist ambiguity) ifft2(kernel · S),
    S = Σ_j exp(−2πi q·r_j) written out here, equals :func:`projected_potential` of the same atoms, and
    its q = 0 value is K·f_e(0)/(sy·sx) from the scattering factor."""
    from tembench.physics.constants import SCATTERING_FACTOR_TO_POTENTIAL_V_A2 as K
    from tembench.physics.potentials import projected_potential, projected_scattering_kernel, scattering_factor

    g, s = (15, 21), (0.31, 0.27)
    ker = projected_scattering_kernel(14, g, s, parametrization)
    assert ker.dtype == np.float32 and ker.shape == g
    assert ker[0, 0] == pytest.approx(K * scattering_factor(14, 0.0, parametrization) / (s[0] * s[1]), rel=1e-6)
    ky = np.fft.fftfreq(g[0], d=s[0])[:, None]
    kx = np.fft.fftfreq(g[1], d=s[1])[None, :]
    pos = np.array([[1.3, 2.2, 0.0], [4.1, 0.7, 0.3]])   # (x, y, z)
    S = sum(np.exp(-2j * np.pi * (ky * y + kx * x)) for x, y, _ in pos)
    v = np.fft.ifft2(ker * S).real
    ref = projected_potential(pos, [14, 14], gpts=g, sampling_A=s, parametrization=parametrization)[0]
    np.testing.assert_allclose(v, ref, atol=1e-4 * np.abs(ref).max())


def test_potential_volume_does_not_wrap_along_z_and_projects_to_the_projected_potential():
    """Along z the volume is padded so tails do not wrap: the voxels of a cell do not change when empty
    space is added above it (a 12 Å and a 27.5 Å cell agree on their common 24 voxels); and, as
    documented, Σ_z V·s is the projected potential of the same atoms (odd lateral grids: no Nyquist)."""
    from tembench.physics.potentials import potential_volume, projected_potential
    from tembench.types import Sample

    s = 0.5
    pos = np.array([[2.0, 2.6, 1.5], [3.1, 0.9, 2.0]])
    for Z in (6, 14):
        a = potential_volume(Sample(pos, [Z, Z], (4.5, 4.5, 12.0)), s)
        b = potential_volume(Sample(pos, [Z, Z], (4.5, 4.5, 27.5)), s)
        assert a.shape == (24, 9, 9) and b.shape == (55, 9, 9)
        np.testing.assert_allclose(a, b[:24], atol=1e-3 * a.max())
    mid = pos + [0.0, 0.0, 4.5]   # well inside a 12 Å cell: the tails beyond its faces are negligible
    vol = potential_volume(Sample(mid, [14, 8], (4.5, 4.0, 12.0)), s)
    assert vol.shape == (24, 8, 9)
    proj = projected_potential(mid, [14, 8], gpts=(8, 9), sampling_A=s)[0]
    np.testing.assert_allclose(vol.sum(axis=0) * s, proj, atol=2e-3 * proj.max())
    # the same for the Kirkland parameterisation (which differs from Lobato by more than the tolerance)
    vol_k = potential_volume(Sample(mid, [14, 8], (4.5, 4.0, 12.0)), s, parametrization="kirkland")
    proj_k = projected_potential(mid, [14, 8], gpts=(8, 9), sampling_A=s, parametrization="kirkland")[0]
    np.testing.assert_allclose(vol_k.sum(axis=0) * s, proj_k, atol=5e-4 * proj_k.max())   # agree to 5e-5
    assert np.abs(proj_k - proj).max() > 2e-3 * proj.max()                                   # differ by 4e-3
    # the Nyquist plane of an even axis is left out (ny = 8): no (−1)^iy component in any z plane
    nyq = np.fft.fft(vol.astype(np.float64), axis=1)[:, 4, :]
    assert np.abs(nyq).max() < 1e-5 * vol.max() * 8
    # n = round(cell/s) voxels per axis, at least one: a 0.4 Å thin cell at 0.5 Å is one voxel thick
    assert potential_volume(Sample(pos[:1] * [1, 1, 0], [6], (4.5, 4.0, 0.4)), s).shape == (1, 8, 9)


def test_analytic_potentials_default_to_lobato():
    """The documented default parameterisation (Lobato & Van Dyck) of the analytic single-atom functions."""
    from tembench.physics.potentials import atom_potential, atom_projected_potential, scattering_factor

    r = np.array([0.1, 0.5, 1.5])
    for f in (atom_potential, atom_projected_potential, scattering_factor):
        np.testing.assert_array_equal(f(14, r), f(14, r, "lobato"))
        assert not np.allclose(f(14, r), f(14, r, "kirkland"), rtol=1e-4)
    from tembench.physics.potentials import projected_scattering_kernel

    np.testing.assert_array_equal(projected_scattering_kernel(14, 9, 0.3), projected_scattering_kernel(14, 9, 0.3, "lobato"))


def test_sliced_potential_passes_every_option_to_projected_potential():
    """sliced_potential(sample, ...) is projected_potential over z ∈ [0, cell_z) with the same options:
    parametrisation, frozen-phonon displacements (same rng stream), band limit — each option changes the
    result, so one silently dropped fails."""
    from tembench.physics.potentials import projected_potential, sliced_potential
    from tembench.types import Sample

    pos = np.array([[1.0, 1.2, 0.4], [2.5, 2.0, 1.7], [0.6, 2.9, 2.6]])
    sample = Sample(pos, [14, 8, 79], (3.3, 3.6, 3.1))
    kw = dict(gpts=(12, 11), sampling_A=(0.3, 0.3), slice_thickness_A=1.0)
    opts = dict(parametrization="kirkland", rms_displacement_A=0.1, band_limit=0.5)
    v, dz = sliced_potential(sample, rng=np.random.default_rng(7), **kw, **opts)
    np.testing.assert_allclose(dz, [1.0, 1.0, 1.0, 0.1], atol=1e-12)
    ref = projected_potential(pos, sample.numbers, z_range_A=(0.0, 3.1), rng=np.random.default_rng(7), **kw, **opts)
    np.testing.assert_array_equal(v, ref)
    plain, _ = sliced_potential(sample, **kw)
    for name in opts:   # each option on its own changes the potential
        one = {k: val for k, val in opts.items() if k == name}
        w, _ = sliced_potential(sample, rng=np.random.default_rng(7), **kw, **one)
        assert np.abs(w - plain).max() > 2e-4 * np.abs(plain).max(), name   # kirkland vs lobato: 8e-4


def test_structure_factors_are_the_same_in_one_chunk_and_in_many(monkeypatch):
    """Chunked matrix products sum every chunk: with a work budget small enough for a few atoms per
    chunk, the 2D/3D structure factors equal Σ_j exp(−2πi k·r_j) written out, and the projected
    potential (both packing paths) equals the one computed in a single chunk."""
    from tembench.physics import potentials as P

    rng = np.random.default_rng(11)
    ky, kx, kz = np.fft.fftfreq(10, 0.4), np.fft.fftfreq(10, 0.35), np.fft.fftfreq(6, 0.5)
    yx = rng.uniform(0, 4, (9, 2))
    xyz = rng.uniform(0, 3, (9, 3))
    s2 = np.exp(-2j * np.pi * (ky[None, :, None] * yx[:, 0, None, None] + kx[None, None, :] * yx[:, 1, None, None])).sum(0)
    s3 = np.exp(-2j * np.pi * (kz[None, :, None, None] * xyz[:, 2, None, None, None]
                               + ky[None, None, :, None] * xyz[:, 1, None, None, None]
                               + kx[None, None, None, :] * xyz[:, 0, None, None, None])).sum(0)
    pos = np.column_stack([rng.uniform(0, 4, 30), rng.uniform(0, 4, 30), np.repeat([0.5, 1.5, 2.5], 10)])
    kw = dict(gpts=(12, 12), sampling_A=0.35, slice_thickness_A=1.0, z_range_A=(0.0, 3.0))
    whole = P.projected_potential(pos, [6] * 30, **kw)
    lone = P.projected_potential(np.vstack([pos, [[1.0, 1.0, 3.5]] * 40]), [6] * 30 + [8] * 40,
                                 **dict(kw, z_range_A=(0.0, 4.0)))   # 40 atoms in one slice: slice-by-slice path
    monkeypatch.setattr(P, "_CHUNK_BYTES", 8 * 3 * (10 + 10) + 8)   # 3 atoms per 2D chunk
    np.testing.assert_allclose(P._structure_factor_2d(yx, ky, kx, np), s2, atol=2e-5)
    monkeypatch.setattr(P, "_CHUNK_BYTES", 8 * 2 * (6 * 10 + 10))   # 2 atoms per 3D chunk
    np.testing.assert_allclose(P._structure_factor_3d(xyz, kz, ky, kx, np), s3, atol=3e-5)
    monkeypatch.setattr(P, "_CHUNK_BYTES", 8 * 4 * (7 + 7))        # 4 atoms per chunk of a slice
    np.testing.assert_allclose(P.projected_potential(pos, [6] * 30, **kw), whole, atol=1e-4 * whole.max())
    lone2 = P.projected_potential(np.vstack([pos, [[1.0, 1.0, 3.5]] * 40]), [6] * 30 + [8] * 40,
                                  **dict(kw, z_range_A=(0.0, 4.0)))
    np.testing.assert_allclose(lone2, lone, atol=1e-4 * lone.max())


def test_image_waves_adjoint_with_a_batch_axis_is_the_adjoint():
    """Dot-product test ⟨A x, y⟩ = ⟨x, A† y⟩ of image_waves for exit waves with a leading batch axis
    (the transfer functions broadcast over it)."""
    from tembench.physics import multislice as M

    rng = np.random.default_rng(8)
    h = (rng.normal(size=(3, 6, 5)) + 1j * rng.normal(size=(3, 6, 5))).astype(np.complex64)
    for shape in ((6, 5), (2, 6, 5), (2, 2, 6, 5)):
        x = (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)
        y = (rng.normal(size=(3,) + shape) + 1j * rng.normal(size=(3,) + shape)).astype(np.complex64)
        ax = M.image_waves(x, h)
        aty = M.image_waves_adjoint(y, h)
        assert ax.shape == (3,) + shape and aty.shape == shape
        lhs = np.vdot(y.astype(np.complex128), ax.astype(np.complex128))
        rhs = np.vdot(aty.astype(np.complex128), x.astype(np.complex128))
        assert abs(lhs - rhs) < 1e-4 * abs(lhs)


def test_hrtem_loss_is_the_amplitude_loss_of_hrtem_images_with_the_same_options():
    """L = Σ (√I_pred − √I_meas)², I_pred from hrtem_images with the same optics options: propagator,
    band limits, aberrations, aperture; each option changes L, so one not passed on fails. Defaults:
    transmissions band-limited, real potential (float32 gradient)."""
    from tembench.physics import multislice as M

    rng = np.random.default_rng(6)
    v = rng.uniform(0, 40, (3, 16, 14)).astype(np.float32)
    meas = rng.uniform(0.5, 1.5, (2, 16, 14)).astype(np.float32)
    base = dict(energy_keV=80.0, sampling_A=0.3, defocus_values_A=[50.0, 300.0])

    def loss_from_images(**opts):
        i = M.hrtem_images(v, 1.5, **base, **opts)
        return float(np.sum((np.sqrt(i.astype(np.float64)) - np.sqrt(meas.astype(np.float64))) ** 2))

    l0, g0 = M.hrtem_loss_and_gradient(v, meas, 1.5, **base)
    assert g0.dtype == np.float32 and g0.shape == v.shape
    assert l0 == pytest.approx(loss_from_images(), rel=1e-5)
    assert l0 == pytest.approx(loss_from_images(bandlimit_transmission=True), rel=1e-5)
    variants = [dict(propagator="exact"), dict(bandlimit_transmission=False), dict(band_limit=0.5),
                dict(aberrations={"C30": 2e6, "C12": 40.0, "phi12": 0.3}), dict(semiangle_mrad=15.0)]
    for opts in variants:
        img_kw = {k: val for k, val in opts.items() if k not in ("aberrations", "semiangle_mrad")}
        lo, _ = M.hrtem_loss_and_gradient(v, meas, 1.5, **base, **opts)
        ref = M.hrtem_images(v, 1.5, **base, aberrations=opts.get("aberrations"),
                             semiangle_mrad=opts.get("semiangle_mrad"), **img_kw)
        ref = float(np.sum((np.sqrt(ref.astype(np.float64)) - np.sqrt(meas.astype(np.float64))) ** 2))
        assert lo == pytest.approx(ref, rel=1e-5), opts
        assert lo != l0, opts   # exact vs Fresnel: ~5e-7 relative here, deterministic


def test_intensity_amplitude_loss_closed_form_below_one():
    """L = Σ(√Î − √I)², dL/dÎ = (√Î − √I)/√Î (float32), for intensities below 1 as well (dose-normalised
    images); negative values count as 0."""
    from tembench.physics import multislice as M

    pred = np.array([[0.04, 0.25], [1.0, 2.25]], np.float32)
    meas = np.array([[0.01, 0.36], [-0.5, 4.0]], np.float32)
    loss, g = M.intensity_amplitude_loss(pred, meas)
    r = np.array([[0.2 - 0.1, 0.5 - 0.6], [1.0 - 0.0, 1.5 - 2.0]])
    assert loss == pytest.approx(float(np.sum(r**2)), rel=1e-6)
    assert g.dtype == np.float32
    np.testing.assert_allclose(g, r / np.sqrt(pred.astype(np.float64)), rtol=1e-6)


def test_hrtem_gradient_of_an_absorptive_potential_matches_finite_differences():
    """Complex (absorptive) slices through the whole HRTEM loss: the gradient 2∂L/∂v* (real part ∂L/∂Re v,
    imaginary part ∂L/∂Im v) against central differences, with and without band-limited transmissions."""
    from tembench.physics import multislice as M

    rng = np.random.default_rng(9)
    v = (rng.uniform(0, 30, (2, 12, 10)) + 1j * rng.uniform(0, 3, (2, 12, 10))).astype(np.complex64)
    meas = rng.uniform(0.5, 1.5, (2, 12, 10)).astype(np.float32)
    kw = dict(energy_keV=80.0, sampling_A=0.3, defocus_values_A=[40.0, 200.0], complex_potential=True)
    for blt in (True, False):
        loss, g = M.hrtem_loss_and_gradient(v, meas, 1.5, bandlimit_transmission=blt, **kw)
        assert g.dtype == np.complex64
        d = rng.normal(size=v.shape)
        for part, du in (("re", d), ("im", 1j * d)):
            h = 0.05
            lp, _ = M.hrtem_loss_and_gradient((v + h * du).astype(np.complex64), meas, 1.5, bandlimit_transmission=blt, **kw)
            lm, _ = M.hrtem_loss_and_gradient((v - h * du).astype(np.complex64), meas, 1.5, bandlimit_transmission=blt, **kw)
            fd = (lp - lm) / (2 * h)
            an = float(np.sum((g.real if part == "re" else g.imag) * d))
            assert fd == pytest.approx(an, rel=2e-2), (blt, part)


def test_multislice_backward_batches_transmissions_and_dtypes():
    """The adjoint of a batch of waves is the stack of the single-wave adjoints; given transmissions
    t = exp(iσv) it equals the adjoint from the potentials without a transmission band limit; float32
    gradients for a real potential by default, complex64 for an absorptive one; the tilt of
    hrtem_exit_wave reaches the propagation."""
    from tembench.physics import multislice as M
    from tembench.physics.constants import interaction_constant

    rng = np.random.default_rng(10)
    v = rng.uniform(0, 30, (3, 10, 12)).astype(np.float32)
    psi = (rng.normal(size=(2, 10, 12)) + 1j * rng.normal(size=(2, 10, 12))).astype(np.complex64)
    g_exit = (rng.normal(size=(2, 10, 12)) + 1j * rng.normal(size=(2, 10, 12))).astype(np.complex64)
    kw = dict(energy_keV=120.0, sampling_A=0.25)
    res = M.multislice(psi, 1.2, potentials=v, keep_waves=True, bandlimit_transmission=False, **kw)
    g, g_in = M.multislice_backward(g_exit, res.waves, 1.2, potentials=v, bandlimit_transmission=False, **kw)
    assert g.dtype == np.float32 and g.shape == (3, 2, 10, 12) and g_in.shape == psi.shape
    for b in range(2):
        rb = M.multislice(psi[b], 1.2, potentials=v, keep_waves=True, bandlimit_transmission=False, **kw)
        gb, gb_in = M.multislice_backward(g_exit[b], rb.waves, 1.2, potentials=v, bandlimit_transmission=False, **kw)
        np.testing.assert_allclose(g[:, b], gb, rtol=1e-4, atol=1e-5 * np.abs(gb).max())
        np.testing.assert_allclose(g_in[b], gb_in, rtol=1e-4, atol=1e-5 * np.abs(gb_in).max())
    t = M.transmission_function(v, interaction_constant(120.0), np)
    gt, gt_in = M.multislice_backward(g_exit, res.waves, 1.2, transmissions=t, **kw)   # default band limit flag
    np.testing.assert_allclose(gt, g, rtol=1e-4, atol=1e-5 * np.abs(g).max())
    np.testing.assert_allclose(gt_in, g_in, rtol=1e-4, atol=1e-5 * np.abs(g_in).max())
    gc, _ = M.multislice_backward(g_exit, res.waves, 1.2, potentials=v, bandlimit_transmission=False,
                                  complex_potential=True, **kw)
    assert gc.dtype == np.complex64
    np.testing.assert_allclose(gc.real, g, rtol=1e-4, atol=1e-5 * np.abs(g).max())
    tilted = M.hrtem_exit_wave(v, 1.2, tilt_mrad=(4.0, -2.0), **kw).exit_wave
    direct = M.multislice(M.plane_wave((10, 12)), 1.2, potentials=v, tilt_mrad=(4.0, -2.0), **kw).exit_wave
    np.testing.assert_array_equal(tilted, direct)
    assert np.abs(tilted - M.hrtem_exit_wave(v, 1.2, **kw).exit_wave).max() > 1e-3


def test_projected_potential_over_several_fft_chunks_and_permuted_repeated_slices():
    """On a 256² grid a batched inverse FFT holds 7 slices, so 9 slices take two chunks; slices holding
    the same atoms listed in another order are repeats (computed once). Both must give the sum of the
    single-atom potentials, slice by slice; and more than 1000 atoms (the O(n) element census) the same
    potential as the atoms split in two halves."""
    from tembench.physics.potentials import projected_potential

    rng = np.random.default_rng(13)
    g, s = (256, 256), 0.2
    xy = rng.uniform(0, 51.2, (9, 2))
    pos = np.column_stack([xy, np.arange(9) + 0.5])
    kw = dict(gpts=g, sampling_A=s, slice_thickness_A=1.0, z_range_A=(0.0, 9.0))
    v = projected_potential(pos, [8] * 9, **kw)
    for i in (0, 6, 7, 8):
        np.testing.assert_allclose(v[i], projected_potential(pos[i:i + 1], [8], **kw)[i], atol=1e-4 * v.max())
    a, b = [1.0, 2.0, 0.5], [3.0, 1.5, 0.5]
    two = np.array([a, b, [b[0], b[1], 1.5], [a[0], a[1], 1.5]])   # slice 1 lists slice 0's atoms reversed
    kw2 = dict(gpts=(12, 10), sampling_A=0.4, slice_thickness_A=1.0, z_range_A=(0.0, 2.0))
    w = projected_potential(two, [6, 8, 8, 6], **kw2)
    np.testing.assert_array_equal(w[1], w[0])
    np.testing.assert_allclose(w[0], projected_potential(two[:2], [6, 8], **kw2)[0], atol=1e-5 * w.max())
    many = np.column_stack([rng.uniform(0, 4.8, (1200, 2)), rng.uniform(0, 1, 1200)])
    zs = rng.choice([6, 8, 14], 1200)
    kw3 = dict(gpts=(12, 12), sampling_A=0.4, method="exact")
    whole = projected_potential(many, zs, **kw3)
    halves = projected_potential(many[:600], zs[:600], **kw3) + projected_potential(many[600:], zs[600:], **kw3)
    np.testing.assert_allclose(whole, halves, atol=1e-4 * whole.max())


def test_potential_volume_does_not_depend_on_the_parity_of_the_padded_length():
    """Found reviewing the padding mutants (issue 18 part 6): with an even padded z length the dropped
    Nyquist plane left a ±10 V (−1)^iz pattern through the whole cell (0.17 V after the fix)."""
    from tembench.physics.potentials import potential_volume
    from tembench.types import Sample

    pos = np.array([[2.0, 2.0, 1.0]])
    odd = potential_volume(Sample(pos, [79], (4.0, 4.0, 12.0)), 0.5)    # nzp = 45
    even = potential_volume(Sample(pos, [79], (4.0, 4.0, 24.0)), 0.5)   # nzp = 70
    np.testing.assert_allclose(even[:24], odd, atol=1.0)                 # V; the peak is ≈ 1100 V
