"""More gaps in the 4D-STEM engine's tests, found by reviewing the mutants of physics/stem.py that survived
(issue 18 part 6, second pass; docs/testing.md). Each test checks a closed form, a symmetry of the
physics or an identity between two code paths, not the current output. Fast and deterministic.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest

from tembench.errors import TembenchError
from tembench.physics import potentials as P
from tembench.physics import stem as S
from tembench.physics.constants import wavelength_A
from tembench.physics.multislice import transmission_functions

E = 200.0


# --- closed forms of the geometry -------------------------------------------------------------------------


def test_max_scattering_angle_and_the_aperture_check_by_their_closed_forms():
    """α_max = b·λ/(2·max(s_y, s_x)) rad (the band limit b of the Nyquist frequency 1/(2s)); an aperture up
    to α_max is accepted, a larger one refused with the sampling that would keep it, b·λ/(2α)."""
    lam = wavelength_A(E)
    for s, b in (((0.1, 0.125), 2 / 3), ((0.2, 0.2), 0.5), (0.05, 1.0)):
        smax = max(np.broadcast_to(s, (2,)))
        assert S.max_scattering_angle_mrad(s, E, b) == pytest.approx(b * lam / (2 * smax) * 1e3, rel=1e-12)
    assert S.max_scattering_angle_mrad(0.1, E) == pytest.approx(2 / 3 * lam / 0.2 * 1e3, rel=1e-12)
    s, b = (0.1, 0.125), 0.5
    amax = b * lam / (2 * 0.125) * 1e3                 # 10.03 mrad
    S.check_sampling_for_aperture(s, E, amax * (1 - 1e-9), band_limit=b)   # just inside: accepted
    S.check_sampling_for_aperture(s, E, None, band_limit=b)                # no aperture: nothing to check
    S.check_sampling_for_aperture(s, E, 1.5 * amax, band_limit=1.0)        # the band limit is used
    alpha = 1.5 * amax
    need = b * lam * 1e3 / (2 * alpha)
    with pytest.raises(TembenchError, match=rf"up to {amax:.1f} mrad\. Use sampling_A <= {need:.4f} Å"):
        S.check_sampling_for_aperture(s, E, alpha, band_limit=b)


def test_stem_scan_checks_the_default_probe_against_its_band_limit():
    """A probe built by stem_scan (no ``probe``) is checked against the band limit actually used:
    ``band_limit=None`` (no band limit) keeps angles up to the Nyquist frequency, λ/(2s)."""
    v = np.zeros((1, 32, 32), np.float32)
    lam = wavelength_A(E)
    nyq = lam / (2 * 0.2) * 1e3                      # 12.5 mrad at 0.2 Å
    kw = dict(energy_keV=E, sampling_A=0.2, positions_A=[[3.2, 3.2]], window_gpts=(32, 32))
    with pytest.raises(TembenchError, match="too coarse"):
        S.stem_scan(v, 1.0, semiangle_mrad=0.9 * nyq, **kw)                    # 2/3 of Nyquist by default
    S.stem_scan(v, 1.0, semiangle_mrad=0.9 * nyq, band_limit=None, **kw)
    with pytest.raises(TembenchError, match="too coarse"):
        S.stem_scan(v, 1.0, semiangle_mrad=1.02 * nyq, band_limit=None, **kw)


def test_detector_masks_follow_the_angle_scale_to_a_twentieth_of_a_percent():
    """α = |k|·λ·1e3 mrad exactly: edges 0.05 % above and below every pixel's angle select that pixel
    (a 0.1 % error in the angle scale moves some pixel across)."""
    g, s, e = (18, 22), (0.09, 0.11), 300.0
    lam = wavelength_A(e)
    alpha = np.hypot(np.fft.fftfreq(g[0], s[0])[:, None], np.fft.fftfreq(g[1], s[1])[None, :]) * lam * 1e3
    levels = np.unique(np.round(alpha, 9))[1:12]
    for a in levels:
        pix = np.isclose(alpha, a, rtol=1e-9)
        _, m = S.detector_masks(g, s, e, {"ring": (a * (1 - 5e-4), a * (1 + 5e-4)), "in": (a * (1 + 5e-4), None),
                                          "out": (None, a * (1 - 5e-4))})
        np.testing.assert_array_equal(m[0].astype(bool), pix)
        np.testing.assert_array_equal(m[1].astype(bool), alpha > a * (1 + 1e-6))
        np.testing.assert_array_equal(m[2].astype(bool), alpha < a * (1 - 1e-6))


def test_reported_detector_pixel_is_lambda_over_window_width():
    """Δα = λ/(w·s)·b per axis (non-square window, pixel and binning)."""
    v = np.zeros((1, 40, 48), np.float32)
    probe = S.make_probe_modes((30, 36), (0.1, 0.12), E, 25.0)
    r = S.stem_scan(v, 1.0, energy_keV=E, sampling_A=(0.1, 0.12), positions_A=[[2.0, 2.0]], probe=probe,
                    detector_binning=3)
    lam = wavelength_A(E)
    assert r.detector_sampling_mrad == pytest.approx((lam / (30 * 0.1) * 1e3 * 3, lam / (36 * 0.12) * 1e3 * 3),
                                                     rel=1e-12)
    assert r.window_gpts == (30, 36) and r.patterns.shape == (1, 10, 12)


# --- probe modes ----------------------------------------------------------------------------------------------


def _assert_same_modes(modes, want, atol):
    """The modes are the expected ones in some order (the order of incoherent modes carries no physics)."""
    assert len(modes) == len(want)
    left = list(range(len(want)))
    for m in modes:
        err = [np.abs(m - want[j]).max() for j in left]
        j = int(np.argmin(err))
        assert err[j] < atol, f"a mode matches none of the expected ones (closest: {err[j]:.2e})"
        left.pop(j)


@pytest.mark.parametrize("window", [(25, 31), (24, 27), (27, 24)])
def test_probe_is_centred_on_the_window_pixel_for_odd_and_non_square_windows(window):
    """An aberration-free probe is (periodically) point-symmetric about window pixel (wy//2, wx//2) (module
    docstring), also for odd sizes and non-square pixels; its power is 1."""
    s = (0.1, 0.13)
    p = S.make_probe_modes(window, s, E, 20.0)
    assert p.shape == (1,) + window and p.dtype == np.complex64
    i = np.abs(p[0].astype(np.complex128)) ** 2
    assert i.sum() == pytest.approx(1.0, rel=1e-5)
    cy, cx = window[0] // 2, window[1] // 2
    iy = (2 * cy - np.arange(window[0])) % window[0]
    ix = (2 * cx - np.arange(window[1])) % window[1]
    np.testing.assert_allclose(i, i[iy][:, ix], atol=1e-6 * i.max())
    assert np.unravel_index(i.argmax(), i.shape) == (cy, cx)


def test_defocus_spread_modes_are_coherent_probes_at_the_gauss_hermite_defocus_nodes():
    """n modes with rms spread Δ: mode i = √w_i × the coherent probe at C10 − x_i·Δ, with the probabilists'
    Gauss–Hermite nodes and weights written out (n = 2: ±1, ½ each; n = 3: 0, ±√3, ⅔ and ⅙); the other
    aberrations kept; one mode by default or without a spread or source size; a spread below 1 Å is still
    a spread."""
    w, s = (32, 30), (0.15, 0.15)
    base = {"C10": -25.0, "C12": 8.0, "phi12": 0.4}

    def coherent(c10):
        return S.make_probe_modes(w, s, E, 20.0, {**base, "C10": c10})[0].astype(np.complex128)

    for n, nodes, weights, spread in ((2, [-1.0, 1.0], [0.5, 0.5], 30.0),
                                      (3, [-np.sqrt(3), 0.0, np.sqrt(3)], [1 / 6, 2 / 3, 1 / 6], 30.0),
                                      (2, [-1.0, 1.0], [0.5, 0.5], 0.5)):
        modes = S.make_probe_modes(w, s, E, 20.0, base, n_modes=n, defocus_spread_A=spread)
        assert modes.shape == (n,) + w
        want = [np.sqrt(wt) * coherent(base["C10"] - x * spread) for x, wt in zip(nodes, weights)]
        _assert_same_modes(modes, want, atol=2e-6)
    astig = {"C12": 8.0, "phi12": 0.4}   # no C10 given: the nodes about 0
    no_c10 = S.make_probe_modes(w, s, E, 20.0, astig, n_modes=2, defocus_spread_A=30.0)
    _assert_same_modes(no_c10, [np.sqrt(0.5) * S.make_probe_modes(w, s, E, 20.0, {**astig, "C10": c})[0]
                                for c in (30.0, -30.0)], atol=2e-6)
    for one in (S.make_probe_modes(w, s, E, 20.0, base, defocus_spread_A=30.0),    # n_modes = 1 by default
                S.make_probe_modes(w, s, E, 20.0, base, n_modes=3)):               # nothing to spread over
        assert one.shape == (1,) + w
        np.testing.assert_allclose(one[0], coherent(base["C10"]), atol=1e-6)


def test_source_size_modes_are_copies_shifted_along_x_by_the_gauss_hermite_nodes():
    """``source_size_A`` σ: mode i is √w_i × the coherent probe moved by x_i·σ along x (y unchanged), the move
    written out by the Fourier shift theorem; its power is w_i."""
    w, s, sigma = (33, 40), (0.1, 0.12), 0.3
    modes = S.make_probe_modes(w, s, E, 25.0, n_modes=3, source_size_A=sigma)
    assert modes.shape == (3,) + w
    coherent = np.fft.fft2(S.make_probe_modes(w, s, E, 25.0)[0].astype(np.complex128))
    kx = np.fft.fftfreq(w[1], s[1])[None, :]
    want = [np.sqrt(wt) * np.fft.ifft2(coherent * np.exp(-2j * np.pi * kx * x * sigma))
            for x, wt in zip([-np.sqrt(3), 0.0, np.sqrt(3)], [1 / 6, 2 / 3, 1 / 6])]
    _assert_same_modes(modes, want, atol=2e-6)


def test_scanned_signal_is_symmetric_about_an_atom_for_odd_windows_and_non_square_pixels():
    """An aberration-free probe at ρ and at its mirror image through an atom (on a grid point) sees mirror
    images of the same object: the patterns are point reflections of each other and every annular signal
    is equal. A probe off its window centre by a (half) pixel — the window origin or the probe centre
    computed from the wrong axis, a non-integer half window — breaks it by percents."""
    s = (0.16, 0.2)
    n = (64, 50)
    atom = np.array([32 * s[0], 25 * s[1]])   # (y, x) Å, on a grid point (atoms are given as (x, y, z))
    v = P.projected_potential([[atom[1], atom[0], 1.0]], [79], gpts=n, sampling_A=s, slice_thickness_A=2.0,
                              z_range_A=(0, 2.0))
    d = np.array([[0.13, 0.07], [-0.21, 0.11], [0.05, -0.32]])
    period = np.array([n[0] * s[0], n[1] * s[1]])
    # the mirror pairs, then the atom itself and two of its periodic images (across the field's edges)
    pos = np.concatenate([atom + d, atom - d, [atom, atom + [period[0], 0.0], atom - [0.0, period[1]]]])
    for window in ((33, 27), (32, 28)):
        probe = S.make_probe_modes(window, s, E, 25.0)
        r = S.stem_scan(v, 2.0, energy_keV=E, sampling_A=s, positions_A=pos, probe=probe,
                        detectors={"adf": (40.0, None), "bf": (None, 10.0)})
        adf = r.images["adf"]
        np.testing.assert_allclose(adf[7:], adf[6], rtol=1e-4)   # the field is periodic
        assert adf[6] > 1.05 * adf[:6].max()                      # the probe on the atom scatters most
        for name in ("adf", "bf"):
            a, b = r.images[name][:3], r.images[name][3:6]
            # odd windows: exact to float32; even ones only up to their unpaired Nyquist row and column
            np.testing.assert_allclose(a, b, rtol=2e-4 if window[0] % 2 else 3e-3, err_msg=f"{window} {name}")
            assert np.ptp(a) > 0.02 * a.max()   # the offsets matter: the signals differ between positions
        pa, pb = r.patterns[:3].astype(np.float64), r.patterns[3:6].astype(np.float64)
        # fftshifted patterns: the point reflection k -> -k about pixel (k//2) (rows/cols 1.. for even sizes)
        ry = slice(1, None) if window[0] % 2 == 0 else slice(None)
        rx = slice(1, None) if window[1] % 2 == 0 else slice(None)
        np.testing.assert_allclose(pa[:, ry, rx], pb[:, ry, rx][:, ::-1, ::-1],
                                   atol=(2e-5 if window[0] % 2 else 5e-4) * pa.max())


def test_probe_window_check_reads_the_outer_sixteenth_and_one_percent_of_the_intensity():
    """The check refuses a probe with more than 1 % of Σ|ψ|² in the outer max(1, w//16) pixels."""
    v = np.zeros((1, 64, 64), np.float32)
    kw = dict(energy_keV=E, sampling_A=0.1, positions_A=[[3.0, 3.0]])

    def probe(w, row, frac, axis=0):   # amplitude 1 at the centre, √(f/(1−f)) on one pixel of row (column) ``row``
        p = np.zeros((w, w), np.complex64)
        p[w // 2, w // 2] = 1.0
        p[(row, w // 2) if axis == 0 else (w // 2, row)] = np.sqrt(frac / (1 - frac))
        return p

    for w, inside, outside in ((32, 2, 1), (16, 1, 0)):   # border 2 pixels for w = 32, 1 pixel for w = 16
        S.stem_scan(v, 1.0, probe=probe(w, inside, 0.02), **kw)       # 2 % just inside the border: accepted
        S.stem_scan(v, 1.0, probe=probe(w, outside, 0.009), **kw)     # 0.9 % in it: accepted
        S.stem_scan(v, 1.0, probe=3 * probe(w, outside, 0.009), **kw)  # a fraction: at any scale
        with pytest.raises(TembenchError, match=r"larger than its window: 1\.10 %"):
            S.stem_scan(v, 1.0, probe=probe(w, outside, 0.011), **kw)
        with pytest.raises(TembenchError, match="larger than its window"):
            S.stem_scan(v, 1.0, probe=3 * probe(w, w - 1 - outside, 0.011), **kw)   # any scale, either edge
        S.stem_scan(v, 1.0, probe=probe(w, inside, 0.02, axis=1), **kw)             # the same along x
        with pytest.raises(TembenchError, match="larger than its window"):
            S.stem_scan(v, 1.0, probe=probe(w, outside, 0.011, axis=1), **kw)


# --- binning, cropping, streaming and batches of stem_scan ----------------------------------------------------


@lru_cache(maxsize=2)
def _crystal(n=(48, 40)):
    rng = np.random.default_rng(3)
    s = (0.15, 0.18)
    v = P.projected_potential(rng.uniform(0, 7.0, (10, 3)), [14] * 5 + [42] * 5, gpts=n, sampling_A=s,
                              slice_thickness_A=2.0, z_range_A=(0, 4.0))
    pos = np.stack([rng.uniform(1, 6, 7), rng.uniform(1, 6, 7)], axis=1)
    return v, s, pos


def test_binned_and_cropped_patterns_by_their_definition():
    """Bin j of a b-binned, n-cropped axis of length w sums the fftshifted native pixels
    start + j·b … start + j·b + b − 1 (mod w), start = w//2 − (n//2)·b − b//2: zero frequency in bin n//2,
    in its middle pixel for odd b. Odd binning of a vacuum pattern stays centro-symmetric."""
    v, s, pos = _crystal()
    probe = S.make_probe_modes((30, 32), s, E, 18.0)
    kw = dict(energy_keV=E, sampling_A=s, positions_A=pos[:2], probe=probe)
    native = S.stem_scan(v, 2.0, **kw).patterns.astype(np.float64)
    for b, gy, gx in ((2, 7, 9), (3, 9, 10), (3, None, None), (1, 1, 1)):
        r = S.stem_scan(v, 2.0, detector_binning=b, detector_gpts=None if gy is None else (gy, gx), **kw)
        ny, nx = (30 // b, 32 // b) if gy is None else (gy, gx)
        iy = (30 // 2 - (ny // 2) * b - b // 2 + np.arange(ny * b)) % 30
        ix = (32 // 2 - (nx // 2) * b - b // 2 + np.arange(nx * b)) % 32
        want = native[:, iy][:, :, ix].reshape(2, ny, b, nx, b).sum(axis=(2, 4))
        assert r.patterns.shape == (2, ny, nx)
        np.testing.assert_allclose(r.patterns, want, rtol=1e-5, atol=1e-9)
    vac = S.stem_scan(np.zeros((1, 48, 40), np.float32), 2.0, detector_binning=3, detector_gpts=(9, 9),
                      **{**kw, "positions_A": pos[:1]}).patterns[0]
    np.testing.assert_allclose(vac, vac[::-1, ::-1], atol=1e-6 * vac.max())
    for b, g in ((3, (11, 9)), (2, (9, 17)), (31, None)):   # 33 > 30, 34 > 32, 30 // 31 = 0 pixels
        with pytest.raises(TembenchError, match="does not fit"):
            S.stem_scan(v, 2.0, detector_binning=b, detector_gpts=g, **kw)


def test_batches_streaming_weights_and_progress():
    """Any batch size gives the same patterns and images (7 positions in batches of 1, 3, 5, 7 and the
    default); ``out`` with ``out_weight`` w adds w × the patterns; ``progress`` gets (done, total) per batch."""
    v, s, pos = _crystal()
    probe = S.make_probe_modes((30, 32), s, E, 18.0, {"C10": -10.0})
    kw = dict(energy_keV=E, sampling_A=s, positions_A=pos, probe=probe, detectors={"adf": (35.0, None)})
    ref = S.stem_scan(v, 2.0, batch_size=1, **kw)
    for bs in (3, 5, 7, None):
        calls = []
        r = S.stem_scan(v, 2.0, batch_size=bs, progress=lambda i, n: calls.append((i, n)), **kw)
        np.testing.assert_allclose(r.patterns, ref.patterns, rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(r.images["adf"], ref.images["adf"], rtol=1e-5)
        step = calls[0][0]
        assert calls == [(min(i + step, 7), 7) for i in range(0, 7, step)], calls
        if bs is not None:
            assert step == bs
    out = np.ones((7, 30, 32), np.float32)
    r = S.stem_scan(v, 2.0, out=out, out_weight=0.25, return_patterns=False, batch_size=3, **kw)
    assert r.patterns is None
    np.testing.assert_allclose(out, 1.0 + 0.25 * ref.patterns, rtol=1e-6)


def test_given_transmissions_band_options_a_2d_probe_and_window_refusals():
    """``transmissions`` (no potentials) = the transmissions stem_scan builds from the potentials with the
    same band-limit options (default: band-limited); a 2D probe is a one-mode stack; a probe whose shape
    differs from ``window_gpts``, or a window larger than the field along either axis, is refused."""
    v, s, pos = _crystal()
    probe = S.make_probe_modes((30, 32), s, E, 18.0)
    kw = dict(energy_keV=E, sampling_A=s, positions_A=pos[:3], probe=probe)
    for opts in ({}, dict(band_limit=0.5), dict(bandlimit_transmission=False), dict(band_limit=None)):
        a = S.stem_scan(v, 2.0, **opts, **kw).patterns
        t = transmission_functions(v, energy_keV=E, sampling_A=s,
                                   **{k: x for k, x in opts.items() if k != "band_limit"},
                                   **({"band_limit": opts["band_limit"]} if "band_limit" in opts else {}))
        b = S.stem_scan(None, 2.0, transmissions=t, **{k: x for k, x in opts.items() if k == "band_limit"}, **kw)
        np.testing.assert_allclose(b.patterns, a, rtol=1e-5, atol=1e-9, err_msg=str(opts))
    c = S.stem_scan(v, 2.0, **{**kw, "probe": probe[0]}).patterns
    np.testing.assert_array_equal(c, S.stem_scan(v, 2.0, **kw).patterns)
    with pytest.raises(TembenchError, match="differs from window_gpts"):
        S.stem_scan(v, 2.0, window_gpts=(32, 32), **kw)
    for w in ((52, 20), (20, 44)):   # the field is 48 x 40
        p = np.zeros(w, np.complex64)
        p[w[0] // 2, w[1] // 2] = 1.0
        with pytest.raises(TembenchError, match="larger than the field of view"):
            S.stem_scan(v, 2.0, **{**kw, "probe": p})


@pytest.mark.parametrize("field, window", [((48, 40), (48, 40)), ((45, 39), (45, 39)), ((48, 40), (30, 27))])
def test_scan_patterns_are_the_multislice_of_the_placed_probe(field, window):
    """One position by its documented geometry: the window's pixel (wy//2, wx//2) on the whole pixel o
    nearest ρ, the probe moved by the rest ρ − o·s (Fourier shift), the field's band-limited transmissions
    cropped periodically at o − w//2, core multislice on the window grid (default band limit), pattern =
    |F ψ_exit|²/(wy·wx) fftshifted. Whole fields (even, odd) and a cropped odd window; non-square pixels."""
    from tembench.physics.multislice import multislice

    v, s, pos = _crystal(field)
    probe = S.make_probe_modes(window, s, E, 18.0, {"C10": -12.0})
    wy, wx = window
    t = transmission_functions(v, energy_keV=E, sampling_A=s)
    ky = np.fft.fftfreq(wy, s[0])[:, None]
    kx = np.fft.fftfreq(wx, s[1])[None, :]
    r = S.stem_scan(v, 2.0, energy_keV=E, sampling_A=s, positions_A=pos[:3], probe=probe).patterns
    for i, rho in enumerate(pos[:3]):
        whole = np.round(rho / np.array(s)).astype(int)
        rest = rho - whole * np.array(s)
        if window == v.shape[1:]:        # the whole field: no crop, the probe moved from its centre to ρ
            whole = np.array([wy // 2, wx // 2])
            rest = rho - whole * np.array(s)
        iy = (whole[0] - wy // 2 + np.arange(wy)) % v.shape[1]
        ix = (whole[1] - wx // 2 + np.arange(wx)) % v.shape[2]
        moved = np.fft.ifft2(np.fft.fft2(probe[0]) * np.exp(-2j * np.pi * (ky * rest[0] + kx * rest[1])))
        exit_wave = multislice(moved.astype(np.complex64), 2.0, energy_keV=E, sampling_A=s,
                               transmissions=np.ascontiguousarray(t[:, iy][:, :, ix])).exit_wave
        want = np.fft.fftshift(np.abs(np.fft.fft2(exit_wave)) ** 2 / (wy * wx))
        np.testing.assert_allclose(r[i], want, atol=2e-6 * want.max())


# --- the gradient engine -------------------------------------------------------------------------------------


def test_gradient_on_the_whole_field_equals_the_cropped_gradient_on_a_tiled_field():
    """With the window = the whole (non-square) field the engine takes its full-field path (no crop, the
    whole shift in the phase ramp). A 2×2 tiling of the object scanned with the same window through the
    crop path sees the same periodic object: same loss, same probe and position gradients, and the tiled
    potential gradient folded onto one tile (sum of the four) is the full-field one — for two slices and
    several batches."""
    rng = np.random.default_rng(8)
    n, s = (24, 30), (0.2, 0.18)
    v = P.projected_potential(rng.uniform(0, 4.5, (6, 3)), [14] * 6, gpts=n, sampling_A=s, slice_thickness_A=2.0,
                              z_range_A=(0, 4.0))
    assert v.shape[0] == 2
    probe = S.make_probe_modes(n, s, E, 20.0, {"C10": -15.0}, n_modes=2, defocus_spread_A=20.0)
    pos = np.array([[2.0, 2.3], [2.41, 2.96], [3.1, 1.77], [1.5, 3.3], [2.6, 2.2]])
    meas = S.stem_scan(v * 1.2, 2.0, energy_keV=E, sampling_A=s, positions_A=pos, probe=probe,
                       bandlimit_transmission=False).patterns
    kw = dict(energy_keV=E, sampling_A=s, positions_A=pos, probe=probe, batch_size=2, return_position_gradient=True)
    full = S.stem_loss_and_gradient(v, meas, 2.0, **kw)
    tiled = S.stem_loss_and_gradient(np.tile(v, (1, 2, 2)), meas, 2.0, **kw)
    assert full[0] == pytest.approx(tiled[0], rel=1e-5)
    g = tiled[1].reshape(2, 2, n[0], 2, n[1]).sum(axis=(1, 3))
    np.testing.assert_allclose(full[1], g, rtol=1e-3, atol=1e-4 * np.abs(g).max())
    np.testing.assert_allclose(full[2], tiled[2], rtol=1e-3, atol=1e-4 * np.abs(tiled[2]).max())
    np.testing.assert_allclose(full[3], tiled[3], rtol=1e-3, atol=1e-4 * np.abs(tiled[3]).max())


def test_gradient_without_slices_against_finite_differences():
    """No slices: the pattern is |F ψ|²/N of the shifted probe itself; ∂L/∂ψ* against central differences
    (the measured patterns: a smaller aperture's, with ±50 % noise, so that the loss is not ~0)."""
    s = (0.2, 0.2)
    v = np.zeros((0, 32, 32), np.float32)
    probe = S.make_probe_modes((24, 24), s, E, 20.0, {"C10": -10.0})
    pos = np.array([[3.1, 2.93], [2.47, 3.2]])
    meas = S.stem_scan(v, 2.0, energy_keV=E, sampling_A=s, positions_A=pos,
                       probe=S.make_probe_modes((24, 24), s, E, 15.0, {"C10": -30.0})).patterns
    meas = (meas * np.random.default_rng(1).uniform(0.5, 1.5, meas.shape)).astype(np.float32)
    kw = dict(energy_keV=E, sampling_A=s, positions_A=pos)
    loss, gv, gp = S.stem_loss_and_gradient(v, meas, 2.0, probe=probe, **kw)
    assert gv.shape == v.shape
    d = (np.exp(1j * np.angle(gp)) * (np.abs(probe) + 0.05 * np.abs(probe).max())).astype(np.complex64)
    h = 5e-4
    fd = (S.stem_loss_and_gradient(v, meas, 2.0, probe=probe + h * d, **kw)[0]
          - S.stem_loss_and_gradient(v, meas, 2.0, probe=probe - h * d, **kw)[0]) / (2 * h)
    assert fd == pytest.approx(float(np.real(np.vdot(gp, d))), rel=2e-3)


def test_position_curvature_is_the_gauss_newton_matrix_of_finite_difference_amplitudes():
    """H_b = 2 Σ_k ∇_ρ√Î ∇_ρ√Îᵀ (docstring), with ∇_ρ√Î from central differences of stem_scan's
    patterns,
    without and with ε (√(Î+ε)); non-square pixels, positions in two batches."""
    rng = np.random.default_rng(4)
    n, s = (48, 44), (0.18, 0.2)
    v = P.projected_potential(rng.uniform(0, 8.0, (8, 3)), [42] * 8, gpts=n, sampling_A=s, slice_thickness_A=2.0,
                              z_range_A=(0, 2.0))
    probe = S.make_probe_modes((32, 30), s, E, 22.0, {"C10": -20.0})
    pos = np.array([[3.01, 2.93], [4.3, 4.05], [2.5, 3.66]])   # ≥ 0.03 Å from a half-pixel boundary
    kw = dict(energy_keV=E, sampling_A=s, probe=probe, band_limit=None)
    meas = S.stem_scan(v, 2.0, positions_A=pos, bandlimit_transmission=False, **kw).patterns
    h = 2e-3

    def amp(p, eps):
        i = S.stem_scan(v, 2.0, positions_A=p, bandlimit_transmission=False, **kw).patterns.astype(np.float64)
        return np.sqrt(i + eps)

    for eps in (0.0, 1e-4 * float(meas.max())):
        out = S.stem_loss_and_gradient(v, meas * 0.9, 2.0, positions_A=pos, return_position_curvature=True,
                                       amplitude_eps=eps, batch_size=2, **kw)
        hess = out[4]
        jac = []
        for a in range(2):
            e = np.zeros_like(pos)
            e[:, a] = h
            jac.append((amp(pos + e, eps) - amp(pos - e, eps)) / (2 * h))
        want = np.stack([np.stack([2 * (jac[a] * jac[b]).sum(axis=(-2, -1)) for b in range(2)], -1)
                         for a in range(2)], -2)
        np.testing.assert_allclose(hess, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())
