"""MSP (You 2025 Alg. 1) recovers a known two-slice object, probe positions, keeps orthogonal probe modes,
honours a pattern mask and refuses bad input. The data come from ``conftest`` (finer simulation grid,
no inverse crime). Numbers measured on a busy 2-core machine are in the comments."""

from __future__ import annotations

import numpy as np
import pytest

from you_sim import DZ_A, scan_grid, simulate
from tembench import Measurement
from tembench.errors import TembenchError
from tembench.physics import stem as S
from tembench_you2025.msp import (MSP, MSPParams, initial_probe, orthogonalize_modes, reconstruct_msp)


def _ncc(a, b):
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def _slice_ncc(result, obj, k, positions):
    yi, xi, org = result.scan_region(positions)
    rec = result.potentials_VA[k].real[yi, xi]  # NCC removes the mean: the global phase offset
    s = result.sampling_A
    truth = obj.slice_at(k, org[0] + s[0] * np.arange(rec.shape[0]), org[1] + s[1] * np.arange(rec.shape[1]))
    return _ncc(rec, truth)


FAST = dict(n_slices=2, slice_thickness_A=DZ_A, batch_size=24, start_probe_iter=3)


def test_two_slice_object_is_recovered(two_slice, clean_scan):
    patterns, geo, grid = clean_scan
    pos = grid.reshape(-1, 2)
    r = reconstruct_msp(patterns, pos, geo, MSPParams(n_iterations=30, **FAST))
    nccs = [_slice_ncc(r, two_slice, k, pos) for k in range(2)]
    # the two slices differ: each reconstructed slice matches its own truth better than the other one
    cross = [_slice_ncc(r, two_slice, k, pos) for k in range(2)]
    yi, xi, org = r.scan_region(pos)
    s = r.sampling_A
    y = org[0] + s[0] * np.arange(yi.stop - yi.start)
    x = org[1] + s[1] * np.arange(xi.stop - xi.start)
    cross = [_ncc(r.potentials_VA[k].real[yi, xi], two_slice.slice_at(1 - k, y, x)) for k in range(2)]
    print(f"NCC per slice {nccs}, against the other slice {cross}; loss {r.history['loss_relative'][0]:.2e} → "
          f"{r.history['loss_relative'][-1]:.2e}; {np.mean(r.history['time_s']):.2f} s/iteration "
          f"({len(pos)} patterns 48², 2 slices)")
    assert min(nccs) >= 0.95  # measured 0.985, 0.966
    assert max(cross) < 0.5
    h = r.history["loss"]
    assert h[-1] < 0.05 * h[0]
    assert len(h) == 30 and all(np.isfinite(h))


def test_position_jitter_is_recovered(dense_object):
    rng = np.random.default_rng(21)
    grid = scan_grid().reshape(-1, 2)
    jitter = rng.standard_normal(grid.shape) * 0.3 / np.sqrt(2)  # 0.3 Å rms (2D)
    # jitter has no affine part (mean shift, scale, rotation, shear of the scan): that part moves object and
    # positions together (msp keeps the nominal frame, position_frame='affine'); it is a calibration, not jitter
    c = grid - grid.mean(axis=0)
    design = np.column_stack([np.ones(len(c)), c])
    jitter -= design @ np.linalg.lstsq(design, jitter, rcond=None)[0]
    true = grid + jitter
    patterns, geo = simulate(dense_object, true)
    params = MSPParams(n_iterations=18, start_position_iter=4, **FAST)
    r = reconstruct_msp(patterns, grid, geo, params)
    before = float(np.sqrt((jitter**2).sum(axis=1).mean()))
    err = r.positions_A - true
    after = float(np.sqrt((err**2).sum(axis=1).mean()))
    print(f"position error rms {before:.3f} Å before, {after:.3f} Å after refinement")
    assert before == pytest.approx(0.3, rel=0.15)
    assert after < 0.1  # measured 0.067 (0.047 after 30 iterations)
    assert r.history["position_update_rms_A"][3] == 0.0 and r.history["position_update_rms_A"][4] > 0


def test_probe_modes_stay_orthogonal_and_intensity_is_unchanged():
    rng = np.random.default_rng(2)
    modes = (rng.standard_normal((3, 24, 24)) + 1j * rng.standard_normal((3, 24, 24))).astype(np.complex64)
    ortho = orthogonalize_modes(modes)
    flat = ortho.reshape(3, -1).astype(np.complex128)
    norms = np.linalg.norm(flat, axis=1)
    unit = flat / norms[:, None]
    np.testing.assert_allclose(unit @ unit.conj().T, np.eye(3), atol=1e-5)  # orthonormal directions
    assert np.all(np.diff(norms) <= 0)  # sorted by power
    np.testing.assert_allclose((np.abs(ortho) ** 2).sum(0), (np.abs(modes) ** 2).sum(0), rtol=1e-4, atol=1e-6)


def test_modes_orthogonal_after_refinement(two_slice):
    grid = scan_grid(step_A=0.6).reshape(-1, 2)
    patterns, geo = simulate(two_slice, grid, n_modes=3)
    kw = {k: v for k, v in FAST.items() if k != "start_probe_iter"}
    r = reconstruct_msp(patterns, grid, geo, MSPParams(n_iterations=4, n_probe_modes=3, start_probe_iter=0,
                                                       extra_mode_power=0.1, **kw))
    flat = r.probe.reshape(3, -1).astype(np.complex128)
    unit = flat / np.linalg.norm(flat, axis=1)[:, None]
    np.testing.assert_allclose(unit @ unit.conj().T, np.eye(3), atol=1e-4)
    power = (np.abs(r.probe) ** 2).sum(axis=(1, 2))
    assert np.all(np.diff(power) <= 0)
    assert r.history["probe_power_mode0"][-1] < 1.0


def test_initial_probe_matches_the_true_probe(clean_scan):
    patterns, geo, _ = clean_scan
    mean = patterns.sum(0) / patterns.sum()
    p0 = initial_probe(mean, (0.2, 0.2), geo.energy_keV, geo.aberrations_A, 1, 0.0, np.random.default_rng(0), np)
    true = S.make_probe_modes((48, 48), 0.2, geo.energy_keV, geo.semiangle_mrad, geo.aberrations_A)
    overlap = abs(np.vdot(true, p0)) / np.linalg.norm(true) / np.linalg.norm(p0)
    assert overlap > 0.999  # measured 0.99994
    assert np.sum(np.abs(p0) ** 2) == pytest.approx(1.0, rel=1e-5)
    # the extra modes of a mixed state start inside the bright-field disc: no spurious dark-field intensity
    modes = initial_probe(mean, (0.2, 0.2), geo.energy_keV, geo.aberrations_A, 3, 0.1, np.random.default_rng(0), np)
    spectrum = (np.abs(np.fft.fftshift(np.fft.fft2(modes), axes=(-2, -1))) ** 2).sum(0)
    outside = mean < 1e-4 * mean.max()  # truly dark pixels (the aperture edge is partly covered)
    print(f"initial mixed-state power in dark pixels: {spectrum[outside].sum() / spectrum.sum():.1e}")
    assert spectrum[outside].sum() < 1e-5 * spectrum.sum()
    assert np.sum(np.abs(modes) ** 2) == pytest.approx(1.0, rel=1e-5)
    assert (np.abs(modes[0]) ** 2).sum() == pytest.approx(0.9, abs=0.03)


def _measurement(patterns, geo, grid):
    sy, sx = grid.shape[:2]
    return Measurement(kind="4dstem", data=patterns.reshape(sy, sx, *patterns.shape[1:]),
                       axes=("scan_y", "scan_x", "k_y", "k_x"), geometry=geo)


def test_pattern_mask_is_honoured(clean_scan):
    patterns, geo, grid = clean_scan
    sy, sx = grid.shape[:2]
    mask = (np.add.outer(np.arange(sy), np.arange(sx)) % 2) == 0  # checkerboard half set
    data = patterns.reshape(sy, sx, 48, 48).copy()
    data[~mask] = np.nan  # absent patterns must never be read
    m = _measurement(patterns, geo, grid).replace(data=data, extras={"pattern_mask": mask})
    params = MSPParams(n_iterations=2, **FAST)
    rec = MSP().reconstruct(m, params, np)
    assert rec.kind == "image" and rec.quantity == "projected_potential_VA"
    assert np.all(np.isfinite(rec.data))
    assert rec.extras["n_patterns_used"] == mask.sum()
    np.testing.assert_array_equal(rec.extras["pattern_indices"], np.flatnonzero(mask.ravel()))
    direct = reconstruct_msp(patterns[mask.ravel()], grid.reshape(-1, 2)[mask.ravel()], geo, params,
                             frame_positions_A=grid.reshape(-1, 2))
    np.testing.assert_allclose(rec.extras["slices_VA"], direct.potentials_VA, rtol=1e-5, atol=1e-3)
    assert rec.extras["slices_VA"].shape[0] == 2 and rec.extras["probe_modes"].shape == (1, 48, 48)
    assert rec.extras["positions_A"].shape == (mask.sum(), 2)
    # the other half set lands on the same grid and output region (half-set FSC compares them pixel by pixel)
    other = MSP().reconstruct(m.replace(data=patterns.reshape(sy, sx, 48, 48), extras={"pattern_mask": ~mask}),
                              params, np)
    assert other.data.shape == rec.data.shape and other.origin_A == rec.origin_A
    assert other.extras["field_origin_A"] == rec.extras["field_origin_A"]
    assert _ncc(other.data, rec.data) > 0.5


def test_bad_input_errors(clean_scan):
    patterns, geo, grid = clean_scan
    pos = grid.reshape(-1, 2)
    m = _measurement(patterns, geo, grid)
    p = MSPParams(n_iterations=1, **FAST)
    with pytest.raises(TembenchError, match="4dstem"):
        MSP().reconstruct(m.replace(kind="adf_image"), p, np)
    with pytest.raises(TembenchError, match="scan_positions_A"):
        MSP().reconstruct(m.replace(geometry=geo.replace(scan_positions_A=None)), p, np)
    with pytest.raises(TembenchError, match="pattern_mask"):
        MSP().reconstruct(m.replace(extras={"pattern_mask": np.ones((3, 3), bool)}), p, np)
    with pytest.raises(TembenchError, match="no pattern"):
        MSP().reconstruct(m.replace(extras={"pattern_mask": np.zeros(grid.shape[:2], bool)}), p, np)
    with pytest.raises(TembenchError, match="detector pixel"):
        reconstruct_msp(patterns, pos, geo.replace(extra={"detector_centre_px": (25.0, 24.0)}), p)
    # an even binning's quarter-pixel offset is modelled (beam tilt), not refused
    r = reconstruct_msp(patterns, pos, geo.replace(extra={"detector_centre_px": (24.25, 24.25)}), p)
    assert np.all(np.isfinite(r.potentials_VA))
    with pytest.raises(TembenchError, match="detector_sampling_mrad"):
        reconstruct_msp(patterns, pos, geo.replace(detector_sampling_mrad=None), p)
    with pytest.raises(TembenchError, match="N = "):
        reconstruct_msp(patterns[:-1], pos, geo, p)
    bad = patterns.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(TembenchError, match="NaN"):
        reconstruct_msp(bad, pos, geo, p)
    with pytest.raises(TembenchError, match="negative"):
        reconstruct_msp(patterns - 1.0, pos, geo, p)
    with pytest.raises(Exception, match="start_position_iter"):
        MSPParams(n_iterations=5, start_position_iter=5)
    with pytest.raises(Exception, match="n_slices"):
        MSPParams(n_slices=0)
    with pytest.raises(Exception, match="extra"):
        MSPParams(not_a_param=1)


def test_registered_as_msp():
    from tembench.registry import get_registry

    cls = get_registry().get("reconstructor", "msp")
    assert cls is MSP and cls.supports_pattern_mask and "4dstem" in cls.accepts


def test_l1_shrinkage_of_the_imaginary_potential(clean_scan):
    patterns, geo, grid = clean_scan
    pos = grid.reshape(-1, 2)
    free = reconstruct_msp(patterns, pos, geo, MSPParams(n_iterations=3, **FAST))
    shrunk = reconstruct_msp(patterns, pos, geo, MSPParams(n_iterations=3, l1_imag=1e-8, **FAST))
    l1_free = float(np.abs(free.potentials_VA.imag).sum())
    l1_shrunk = float(np.abs(shrunk.potentials_VA.imag).sum())
    print(f"‖Im V‖₁ {l1_free:.3g} without, {l1_shrunk:.3g} with shrinkage")
    assert 0 < l1_shrunk < 0.5 * l1_free  # measured 1.9e4 vs 5.8e4 V·Å
    assert np.mean(shrunk.potentials_VA.imag == 0) > np.mean(free.potentials_VA.imag == 0) + 0.2  # exact zeros
    real = reconstruct_msp(patterns, pos, geo, MSPParams(n_iterations=1, reconstruct_absorption=False, **FAST))
    assert np.all(real.potentials_VA.imag == 0)


def test_continue_from_a_previous_result(clean_scan):
    """Part 2 (tomography) calls reconstruct_msp per tilt with the previous state as ``init``."""
    patterns, geo, grid = clean_scan
    pos = grid.reshape(-1, 2)
    first = reconstruct_msp(patterns, pos, geo, MSPParams(n_iterations=2, **FAST))
    more = reconstruct_msp(patterns, pos, geo, MSPParams(n_iterations=2, **FAST), init=first)
    assert more.potentials_VA.shape == first.potentials_VA.shape and more.origin_A == first.origin_A
    assert more.history["loss"][0] < first.history["loss"][0]
    with pytest.raises(TembenchError, match="slices"):
        reconstruct_msp(patterns, pos, geo, MSPParams(n_iterations=1, **{**FAST, "n_slices": 3}), init=first)


def test_butterworth_lowpass_closed_form_and_on_a_cosine():
    from tembench_you2025.msp import butterworth_lowpass

    s = (0.2, 0.25)
    g = butterworth_lowpass((64, 80), s, q_lowpass_invA=1.0, order=2)
    assert g.dtype == np.float32 and g[0, 0] == 1.0
    # a cosine of frequency q (an FFT bin) comes out scaled by 1/(1 + (q/q_c)^4), computed here independently
    y = np.arange(64)[:, None] * s[0]
    x = np.arange(80)[None, :] * s[1]
    for ky_bin, kx_bin in ((0, 20), (8, 0), (7, 9)):
        q = np.hypot(ky_bin / (64 * s[0]), kx_bin / (80 * s[1]))
        img = np.cos(2 * np.pi * (ky_bin * y / (64 * s[0]) + kx_bin * x / (80 * s[1]))) + 0 * x
        out = np.fft.ifft2(np.fft.fft2(img) * g).real
        assert np.allclose(out, img / (1 + q**4), atol=1e-5)
    # half gain at q_c: x bin 20 of 80 × 0.25 Å is 1.0 1/Å
    assert abs(g[0, 20] - 0.5) < 1e-6


def test_lowpass_removes_high_frequencies_from_the_slices(two_slice, clean_scan):
    patterns, geo, grid = clean_scan
    pos = grid.reshape(-1, 2)
    free = reconstruct_msp(patterns, pos, geo, MSPParams(n_iterations=2, **FAST))
    low = reconstruct_msp(patterns, pos, geo, MSPParams(n_iterations=2, q_lowpass_invA=0.5, butterworth_order=4,
                                                        **FAST))

    def high_fraction(v):
        f = np.abs(np.fft.fft2(v - v.mean())) ** 2
        ky = np.fft.fftfreq(v.shape[0], free.sampling_A[0])[:, None]
        kx = np.fft.fftfreq(v.shape[1], free.sampling_A[1])[None, :]
        return f[np.hypot(ky, kx) > 1.0].sum() / f.sum()

    hf_free, hf_low = high_fraction(free.projection()), high_fraction(low.projection())
    assert hf_low < 0.01 * hf_free  # gain ≤ 1/(1 + 2^8) beyond 2 q_c
    assert np.all(np.isfinite(low.potentials_VA))


def test_random_batches_partition_the_scan(clean_scan):
    from tembench_you2025.msp import _adjacent_batches, _random_batches

    b = _random_batches(103, 16, np.random.default_rng(0))
    assert sorted(np.concatenate(b).tolist()) == list(range(103))
    assert {len(x) for x in b} <= {14, 15} and len(b) == 7
    assert len(b) == len(_adjacent_batches(103, 16))
    # the random order reconstructs as well (one iteration each, same seed)
    patterns, geo, grid = clean_scan
    pos = grid.reshape(-1, 2)
    r = reconstruct_msp(patterns, pos, geo, MSPParams(n_iterations=3, batch_order="random", **FAST))
    assert r.history["loss"][-1] < r.history["loss"][0]
