"""Scan jitter (AR(1) statistics, exact re-interpolation, 4D consistency), fast-scan smear and source size."""

from __future__ import annotations

import numpy as np
import pytest

from tembench.builtin.scan_distortions import (
    FastScanSmear,
    ScanJitter,
    SourceSizeBroadening,
    ar1_series,
    fast_scan_kernel,
)
from tembench.errors import TembenchError
from tembench.types import Geometry, Measurement


def adf(data, step=0.2):
    return Measurement("adf_image", np.asarray(data, np.float32), ("y", "x"),
                       Geometry(sampling_A=(step, step), scan_step_A=(step, step)))


def lag1(x):
    x = x - x.mean()
    return float(np.sum(x[1:] * x[:-1]) / np.sum(x * x))


def test_ar1_series_stationary_variance_and_autocorrelation():
    rng = np.random.default_rng(0)
    phi, sigma, n = 0.5, 0.25, 40000
    y = ar1_series(n, phi, sigma, rng, stationary_start=True)
    assert lag1(y) == pytest.approx(phi, abs=4 * np.sqrt((1 - phi**2) / n))
    assert y.var() == pytest.approx(sigma**2 / (1 - phi**2), rel=0.05)
    # eq 2.14 (x) starts at a_1, eq 2.15 (y) at a_1/√(1−φ²): first-element variance over many draws
    first_x = [ar1_series(1, 0.9, 1.0, rng, False)[0] for _ in range(4000)]
    first_y = [ar1_series(1, 0.9, 1.0, rng, True)[0] for _ in range(4000)]
    assert np.var(first_x) == pytest.approx(1.0, rel=0.1)
    assert np.var(first_y) == pytest.approx(1 / (1 - 0.81), rel=0.1)


def test_jitter_shifts_recovered_from_ramps_match_phi():
    ny, nx = 3000, 64
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float64)
    # σ in Å at the 0.2 Å step of adf(): 0.3 / 0.2 scan pixels
    p = ScanJitter.Params(phi_x=0.6, sigma_x_A=0.06, phi_y=0.4, sigma_y_A=0.04, record_shifts=True)
    # linear ramps are reproduced exactly by bilinear interpolation, away from the edges
    out_x = ScanJitter().apply(adf(xx), p, np.random.default_rng(1))
    out_y = ScanJitter().apply(adf(yy), p, np.random.default_rng(1))
    truth = out_x.extras["truth_scan_jitter_px"][0]
    dx = (out_x.data[:, 8:-8] - xx[:, 8:-8]).mean(axis=1)
    dy = (out_y.data[:, 8:-8] - yy[:, 8:-8]).mean(axis=1)
    inner = slice(20, -20)
    assert np.allclose(dx[inner], truth[inner, 1], atol=2e-3)
    assert np.allclose(dy[inner], truth[inner, 0], atol=2e-3)
    tol = 4 * np.sqrt(1 / ny)
    assert lag1(dx) == pytest.approx(0.6, abs=tol)
    assert lag1(dy[inner]) == pytest.approx(0.4, abs=tol)
    assert dy[inner].std() == pytest.approx(0.2 / np.sqrt(1 - 0.16), rel=0.08)


def test_jitter_moves_whole_4d_patterns_like_2d_images():
    rng = np.random.default_rng(2)
    data = rng.random((12, 10, 3, 4)).astype(np.float32)
    m4 = Measurement("4dstem", data, ("scan_y", "scan_x", "k_y", "k_x"), Geometry(scan_step_A=(0.5, 0.5)))
    p = ScanJitter.Params(sigma_x_A=0.35, sigma_y_A=0.25)   # 0.7 / 0.5 scan pixels at the 0.5 Å step
    out4 = ScanJitter().apply(m4, p, np.random.default_rng(7)).data
    for a, b in [(0, 0), (2, 3), (1, 2)]:
        out2 = ScanJitter().apply(adf(data[:, :, a, b], step=0.5), p, np.random.default_rng(7)).data
        assert np.allclose(out4[:, :, a, b], out2, atol=1e-6)
    # an independent series per tilt: frames of a tilt series differ
    mt = Measurement("4dstem_tilt_series", np.stack([data, data]), ("tilt", "scan_y", "scan_x", "k_y", "k_x"),
                     Geometry(scan_step_A=(0.5, 0.5)))
    outt = ScanJitter().apply(mt, p, np.random.default_rng(7)).data
    assert np.allclose(outt[0], out4, atol=1e-6) and not np.allclose(outt[1], outt[0])


def test_jitter_rejects_plane_wave_images():
    m = Measurement("hrtem_image", np.ones((4, 4)), ("y", "x"), Geometry(sampling_A=(0.5, 0.5)))
    with pytest.raises(TembenchError, match="scan"):
        ScanJitter().apply(m, ScanJitter.Params(), np.random.default_rng(0))


@pytest.mark.parametrize("model", ["exponential", "half_lorentzian"])
@pytest.mark.parametrize("arrival", ["uniform", "pixel_start"])
def test_fast_scan_psf_integral_and_shape(model, arrival):
    w = fast_scan_kernel(4096, 0.5, 0.5, model, arrival)
    assert w.sum() == pytest.approx(1.0, abs=2e-4) and np.all(np.diff(w[1:]) <= 0)   # 1/t² tail beyond 4096 px
    if model == "exponential" and arrival == "pixel_start":
        assert w[1] / w[0] == pytest.approx(np.exp(-1.0))          # β·dwell = 1
    elif model == "half_lorentzian" and arrival == "pixel_start":
        # half-Lorentzian with HWHM τ: CDF(τ) = (2/π) atan(1) = 0.5
        assert w[0] == pytest.approx(0.5, abs=1e-12)
    # a single bright pixel is smeared toward +x only; the line keeps what falls inside it
    img = np.zeros((4, 256))
    img[:, 100] = 1.0
    out = FastScanSmear().apply(adf(img), FastScanSmear.Params(model=model, arrival=arrival),
                                np.random.default_rng(0)).data
    assert np.allclose(out[:, :100], 0, atol=1e-6)
    w_line = fast_scan_kernel(256, 0.5, 0.5, model, arrival)   # the kernel over one scan line
    assert np.allclose(out[0, 100:], w_line[:156], atol=1e-6)
    assert out[0].sum() == pytest.approx(w_line[:156].sum(), rel=1e-5)


def test_source_size_fwhm_and_conservation():
    img = np.zeros((101, 101))
    img[50, 50] = 1.0
    out = SourceSizeBroadening().apply(adf(img, step=0.1), SourceSizeBroadening.Params(fwhm_A=0.7),
                                       np.random.default_rng(0)).data.astype(np.float64)
    assert out.sum() == pytest.approx(1.0, rel=1e-5)
    line = out[50]
    half = line.max() / 2
    above = np.flatnonzero(line >= half)
    # FWHM from linear interpolation of the half-maximum crossings
    lo = above[0] - 1 + (half - line[above[0] - 1]) / (line[above[0]] - line[above[0] - 1])
    hi = above[-1] + (line[above[-1]] - half) / (line[above[-1]] - line[above[-1] + 1])
    assert (hi - lo) * 0.1 == pytest.approx(0.7, rel=0.03)
    # 4D: each k-pixel image is blurred the same way
    d4 = np.zeros((101, 101, 2, 2))
    d4[50, 50] = 1.0
    m4 = Measurement("4dstem", d4, ("scan_y", "scan_x", "k_y", "k_x"), Geometry(scan_step_A=(0.1, 0.1)))
    o4 = SourceSizeBroadening().apply(m4, SourceSizeBroadening.Params(fwhm_A=0.7), np.random.default_rng(0)).data
    assert np.allclose(o4[:, :, 1, 0], out, atol=1e-6)


@pytest.mark.parametrize("cls", [ScanJitter, FastScanSmear, SourceSizeBroadening])
def test_virtual_images_move_with_the_4d_data(cls):
    rng = np.random.default_rng(4)
    data = rng.random((2, 9, 11, 3, 3)).astype(np.float32)
    vimg = data.sum(axis=(3, 4))
    m = Measurement("4dstem_tilt_series", data, ("tilt", "scan_y", "scan_x", "k_y", "k_x"),
                    Geometry(scan_step_A=(0.3, 0.3)), extras={"virtual_images": {"sum": vimg}})
    out = cls().apply(m, cls.Params(), np.random.default_rng(5))
    # every distortion is linear along the scan grid, so it commutes with summing over the detector
    assert np.allclose(out.extras["virtual_images"]["sum"], out.data.sum(axis=(3, 4)), atol=1e-4)
    assert not np.allclose(out.data, data)
