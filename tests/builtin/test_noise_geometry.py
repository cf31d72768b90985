"""Dose and noise models on non-square pixels and scan steps (sy ≠ sx), against hand-computed areas.

Every expected electron count below is dose × (side_y × side_x) written out in the test, with the
two sides chosen so that side_y², side_x², (side_y + side_x)²/4 … all differ from the true area:
a model that uses one side twice, or a mean side, fails.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from tembench.builtin.detector_noise import ScintillatorPMT
from tembench.builtin.noise import PoissonDose
from tembench.builtin.noise_eer import ElectronEventsConversion
from tembench.builtin.scan_distortions import FWHM_TO_SIGMA, FastScanSmear, ScanJitter, SourceSizeBroadening
from tembench.eer import events_of
from tembench.types import Geometry, Measurement

SY, SX = 0.2, 0.5          # Å: pixel / step sides; area 0.1 Å², sy² = 0.04, sx² = 0.25
AREA = 0.1


def _poisson(m, seed=0, **kw):
    return PoissonDose().apply(m, PoissonDose.Params(**kw), np.random.default_rng(seed))


def _mean_ok(data, lam):
    n = np.size(data)
    return abs(float(np.mean(data)) - lam) < 5 * math.sqrt(lam / n)


def test_poisson_plane_wave_non_square_pixels():
    m = Measurement("hrtem_image", np.full((96, 80), 0.8, np.float32), ("y", "x"), Geometry(sampling_A=(SY, SX)))
    out = _poisson(m, dose_e_per_A2=100.0)
    # 0.8 × 100 e/Å² × 0.2 Å × 0.5 Å = 8 electrons per pixel
    assert out.geometry.extra["electrons_per_unit_intensity"] == pytest.approx(100.0 * 0.2 * 0.5, rel=1e-12)
    assert _mean_ok(out.data, 8.0)


def test_poisson_total_budget_non_square_pixels():
    m = Measurement("hrtem_tilt_series", np.ones((4, 40, 50), np.float32), ("tilt", "y", "x"),
                    Geometry(sampling_A=(SY, SX)))
    out = _poisson(m, dose_e_per_A2=400.0, dose_mode="total_budget")
    # 100 e/Å² per tilt × 0.1 Å² = 10 per pixel; the whole series receives 400 e/Å² × its area
    assert out.geometry.extra["electrons_per_unit_intensity"] == pytest.approx(10.0, rel=1e-12)
    area = 40 * 0.2 * 50 * 0.5
    assert abs(out.data.sum() - 400.0 * area) < 5 * math.sqrt(400.0 * area)


def test_poisson_4dstem_non_square_scan_step():
    pattern = np.zeros((6, 10), np.float32)
    pattern[2:4, 3:7] = 1.0 / 8  # fractions of the probe's electrons, sum 1
    data = np.broadcast_to(pattern, (12, 9, 6, 10)).copy()
    geo = Geometry(scan_step_A=(0.3, 0.7), sampling_A=(0.05, 0.05), detector_sampling_mrad=(1.0, 1.0))
    m = Measurement("4dstem", data, ("scan_y", "scan_x", "k_y", "k_x"), geo)
    out = _poisson(m, dose_e_per_A2=50.0)
    # electrons per probe position = 50 × 0.3 × 0.7 = 10.5 (not the 0.05 Å object sampling)
    assert out.geometry.electrons_per_pattern == pytest.approx(10.5, rel=1e-12)
    assert _mean_ok(out.data.sum(axis=(2, 3)), 10.5)
    # and the inverse bookkeeping: 21 electrons per pattern on 0.21 Å² is 100 e/Å²
    back = _poisson(m, electrons_per_pattern=21.0)
    assert back.geometry.dose_e_per_A2 == pytest.approx(100.0, rel=1e-12)


def test_poisson_scanned_image_uses_its_non_square_sampling():
    m = Measurement("adf_image", np.full((64, 60), 0.25, np.float32), ("y", "x"), Geometry(sampling_A=(0.3, 0.7)))
    out = _poisson(m, dose_e_per_A2=200.0)
    # probe positions every 0.3 × 0.7 Å: 200 × 0.21 = 42 electrons each, 25 % of them on the detector
    assert out.geometry.electrons_per_pattern == pytest.approx(42.0, rel=1e-12)
    assert _mean_ok(out.data, 10.5)


@pytest.mark.parametrize("output, expected_mean", [("electrons", 0.5 * 200 * 0.3 * 0.7), ("normalized", 0.5)],
                         ids=["electrons", "normalized"])
def test_scintillator_pmt_non_square_pixels(output, expected_mean):
    m = Measurement("adf_image", np.full((80, 70), 0.5, np.float32), ("y", "x"), Geometry(sampling_A=(0.3, 0.7),
                                                                                        energy_keV=300.0))
    p = ScintillatorPMT.Params(dose_e_per_A2=200.0, output=output)
    out = ScintillatorPMT().apply(m, p, np.random.default_rng(1))
    assert out.provenance[-1]["electrons_per_unit_intensity"] == pytest.approx(200.0 * 0.3 * 0.7, rel=1e-12)
    # mean response = mean counts (Gaussian pulse noise has zero mean); σ ≈ √(k(1 + σ₁²)) / n
    n = out.data.size
    lam = 0.5 * 200 * 0.21
    tol = 5 * math.sqrt(lam * 1.1 / n) * (expected_mean / lam)
    assert abs(float(out.data.mean()) - expected_mean) < tol


def _delta_image(ny, nx, geo, kind="adf_image"):
    img = np.zeros((ny, nx), np.float32)
    img[ny // 2, nx // 2] = 1.0
    return Measurement(kind, img, ("y", "x"), geo)


def _second_moments(img):
    ny, nx = img.shape
    y = np.arange(ny) - ny // 2
    x = np.arange(nx) - nx // 2
    tot = img.sum()
    return float((img.sum(1) * y ** 2).sum() / tot), float((img.sum(0) * x ** 2).sum() / tot)


def test_source_size_sigma_per_axis_from_a_non_square_scan_step():
    fwhm = 1.0
    m = _delta_image(81, 61, Geometry(scan_step_A=(SY, SX)))
    out = SourceSizeBroadening().apply(m, SourceSizeBroadening.Params(fwhm_A=fwhm), np.random.default_rng(0))
    vy, vx = _second_moments(out.data)
    sigma_A = fwhm / (2 * math.sqrt(2 * math.log(2)))  # 0.4247 Å
    # in Å: the same Gaussian along both axes although the pixels differ
    assert math.sqrt(vy) * SY == pytest.approx(sigma_A, rel=2e-3)
    assert math.sqrt(vx) * SX == pytest.approx(sigma_A, rel=2e-2)  # 0.85 px: coarser sampling of the kernel
    assert out.provenance[-1]["sigma_px"] == pytest.approx([sigma_A / SY, sigma_A / SX], rel=1e-12)
    assert FWHM_TO_SIGMA == pytest.approx(sigma_A / fwhm, rel=1e-12)
    assert float(out.data.sum()) == pytest.approx(1.0, rel=1e-5)


def test_source_size_on_4dstem_uses_the_scan_step_not_the_object_sampling():
    data = np.zeros((41, 31, 2, 3), np.float32)
    data[20, 15] = 1.0
    geo = Geometry(scan_step_A=(SY, SX), sampling_A=(0.05, 0.05), detector_sampling_mrad=(1.0, 1.0))
    m = Measurement("4dstem", data, ("scan_y", "scan_x", "k_y", "k_x"), geo)
    out = SourceSizeBroadening().apply(m, SourceSizeBroadening.Params(fwhm_A=1.2), np.random.default_rng(0))
    img = out.data[:, :, 1, 2]
    vy, vx = _second_moments(img)
    sigma_A = 1.2 / (2 * math.sqrt(2 * math.log(2)))
    assert math.sqrt(vy) * SY == pytest.approx(sigma_A, rel=2e-3)
    assert math.sqrt(vx) * SX == pytest.approx(sigma_A, rel=2e-2)
    assert np.array_equal(out.data[:, :, 0, 0], img)  # every detector pixel blurred alike


def test_fast_scan_smear_does_not_depend_on_the_step_and_jitter_is_in_angstrom():
    # fast-scan smear is in time units (dwell / response): the same result for any scan step
    rng = np.random.default_rng(3)
    img = rng.random((24, 30)).astype(np.float32)
    a = FastScanSmear().apply(Measurement("adf_image", img, ("y", "x"), Geometry(scan_step_A=(SY, SX))),
                              FastScanSmear.Params(), np.random.default_rng(5))
    b = FastScanSmear().apply(Measurement("adf_image", img, ("y", "x"), Geometry(scan_step_A=(1.0, 1.0))),
                              FastScanSmear.Params(), np.random.default_rng(5))
    assert np.array_equal(a.data, b.data)
    # scan jitter is in Å: per axis, the shifts in scan pixels are the Å shifts over that axis' step
    p = ScanJitter.Params(record_shifts=True)
    ja = ScanJitter().apply(Measurement("adf_image", img, ("y", "x"), Geometry(scan_step_A=(SY, SX))), p,
                            np.random.default_rng(5))
    jb = ScanJitter().apply(Measurement("adf_image", img, ("y", "x"), Geometry(scan_step_A=(1.0, 1.0))), p,
                            np.random.default_rng(5))
    sa, sb = ja.extras["truth_scan_jitter_px"][0], jb.extras["truth_scan_jitter_px"][0]
    assert np.allclose(sa[:, 0] * SY, sb[:, 0], rtol=1e-12) and np.allclose(sa[:, 1] * SX, sb[:, 1], rtol=1e-12)
    assert ja.provenance[-1]["sigma_px"] == pytest.approx([p.sigma_y_A / SY, p.sigma_x_A / SX], rel=1e-12)


def test_electron_events_keep_a_non_square_geometry_and_every_electron():
    rng = np.random.default_rng(2)
    intens = rng.random((7, 5, 6, 9)).astype(np.float32)
    intens /= intens.sum(axis=(2, 3), keepdims=True)
    geo = Geometry(energy_keV=80.0, scan_step_A=(0.3, 0.7), detector_sampling_mrad=(1.5, 2.5), sampling_A=(SY, SX))
    m = Measurement("4dstem", intens, ("scan_y", "scan_x", "k_y", "k_x"), geo)
    counted = _poisson(m, dose_e_per_A2=300.0)  # 300 × 0.21 = 63 e per pattern
    assert counted.geometry.electrons_per_pattern == pytest.approx(63.0, rel=1e-12)
    eer = ElectronEventsConversion().apply(counted, ElectronEventsConversion.Params(), rng)
    ev = events_of(eer)
    assert ev.scan_shape == (7, 5) and ev.detector_shape == (6, 9)
    assert np.array_equal(ev.to_dense(np.float32), counted.data)
    assert eer.geometry.scan_step_A == (0.3, 0.7) and eer.geometry.detector_sampling_mrad == (1.5, 2.5)
    assert eer.geometry.electrons_per_pattern == pytest.approx(63.0, rel=1e-12)
    assert eer.provenance[-1]["electrons_per_pixel"] == pytest.approx(counted.data.sum() / counted.data.size)
