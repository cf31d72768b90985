"""Energy, detector geometry and units of the Pelz 2022 plugin exercised, not fixed (issue 18.2).

Independent references, written out here: literal relativistic wavelengths; detector angles
θ = λ k computed by hand from the simulation grid (k = i / (n s)); analytic radial
distributions (a uniform disc, a 2D Gaussian whose encircled fraction is 1 − exp(−θ²/2w²));
the COM of a phase ramp, θ = λ g / 2π. The virtual detectors never see a mask built by the
function under test. (The phase reconstructions at 80 and 300 keV against the known object are
in test_pelz_phase_scale.py.)
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import _pelz_reference_4d as ref4d
from tembench.types import Geometry, Measurement
from tembench_pelz2022 import dpc, synthetic
from tembench_pelz2022.common import load_4d, probe_optics
from tembench_pelz2022.virtual import VirtualDetector

LAMBDA_A = ref4d.LAMBDA_A   # {80: 0.041757161, 200: 0.025079340, 300: 0.019687489} Å, literals
ENERGIES = (80.0, 300.0)


@pytest.mark.parametrize("energy_keV", [80.0, 200.0, 300.0])
def test_probe_optics_use_the_wavelength_of_the_beam_energy(energy_keV):
    g = Geometry(energy_keV=energy_keV, semiangle_mrad=20.0)
    opt = probe_optics(g, "test")
    assert opt.wavelength_A == pytest.approx(LAMBDA_A[energy_keV], rel=1e-6)
    assert opt.k0_A_inv == pytest.approx(20e-3 / LAMBDA_A[energy_keV], rel=1e-6)


@pytest.mark.parametrize("energy_keV", ENERGIES)
def test_synthetic_detector_sampling_follows_the_energy(energy_keV):
    m = synthetic.simulate(np.zeros((32, 40)), 0.25, 4, energy_keV, 25.0).measurement
    sy, sx = m.geometry.detector_sampling_mrad
    assert sy == pytest.approx(LAMBDA_A[energy_keV] / (32 * 0.25) * 1e3, rel=1e-6)
    assert sx == pytest.approx(LAMBDA_A[energy_keV] / (40 * 0.25) * 1e3, rel=1e-6)


@pytest.mark.parametrize("energy_keV", ENERGIES)
def test_com_of_a_phase_ramp_gives_the_gradient_at_each_energy(energy_keV):
    # φ = 2π (a_y y + a_x x): the beam is tilted by θ = λ a (rad) and the gradient is g = 2π a (rad/Å)
    n, s = 64, 0.25
    ay, ax = 3 / (n * s), -2 / (n * s)
    y, x = np.mgrid[:n, :n] * s
    m = synthetic.simulate(2 * np.pi * (ay * y + ax * x), s, 8, energy_keV, 25.0).measurement
    xdata, grid = load_4d(m, "dpc")
    from tembench_pelz2022.eer_ops import center_of_mass

    com_y, com_x, _ = center_of_mass(xdata, grid)
    lam = LAMBDA_A[energy_keV]
    assert np.allclose(com_y, lam * ay * 1e3, rtol=1e-3) and np.allclose(com_x, lam * ax * 1e3, rtol=1e-3)
    gy, gx = dpc.gradient_field(xdata, grid, probe_optics(m.geometry, "dpc").wavelength_A)
    assert np.allclose(gy, 2 * np.pi * ay, rtol=1e-3) and np.allclose(gx, 2 * np.pi * ax, rtol=1e-3)


def _vd(m, **kw):
    return VirtualDetector().reconstruct(m, VirtualDetector.Params(**kw), np)


@pytest.mark.parametrize("energy_keV", ENERGIES)
def test_virtual_detector_fractions_of_a_vacuum_probe_at_each_energy(energy_keV):
    # vacuum: the pattern is the aperture disc |k| ≤ α/λ, uniform, Σ = 1. A pixel's angle is λ|k| with
    # k = (i − n//2) / (n s), computed here by hand; the detector only gets detector_sampling_mrad.
    alpha, n, s = 20.0, 128, 0.2
    r = ref4d.simulate(ref4d.Atoms(np.zeros((0, 2)), 1.0, 0.0), energy_keV, alpha, (2, 2), (0.5, 0.5), 0.0, n=n,
                       sampling_A=s)
    m = r.measurement
    lam = LAMBDA_A[energy_keV]
    k = (np.arange(n) - n // 2) / (n * s)
    theta_mrad = lam * np.hypot(k[:, None], k[None, :]) * 1e3
    disc = theta_mrad <= alpha
    assert np.allclose(m.data[0, 0], np.where(disc, 1.0 / disc.sum(), 0.0), atol=1e-6 / disc.sum())

    def fraction(lo, hi):  # by hand: the share of disc pixels with lo ≤ θ < hi
        return float((disc & (theta_mrad >= lo) & (theta_mrad < hi)).sum() / disc.sum())

    bf = _vd(m, detector="bf").data
    assert np.allclose(bf, 1.0, atol=1e-5)                                   # [0, α): every electron
    assert np.allclose(_vd(m, detector="adf").data, 0.0, atol=1e-6)          # [α, 3α): none
    abf = _vd(m, detector="abf").data                                          # [α/2, α)
    assert np.allclose(abf, fraction(alpha / 2, alpha), rtol=1e-5)
    assert fraction(alpha / 2, alpha) == pytest.approx(0.75, abs=0.02)        # area ratio, continuous
    ring = _vd(m, detector="adf", inner_mrad=0.3 * alpha, outer_mrad=0.6 * alpha)
    assert np.allclose(ring.data, fraction(0.3 * alpha, 0.6 * alpha), rtol=1e-5)
    assert fraction(0.3 * alpha, 0.6 * alpha) == pytest.approx(0.6 ** 2 - 0.3 ** 2, abs=0.02)
    assert ring.extras["inner_mrad"] == pytest.approx(6.0) and ring.extras["outer_mrad"] == pytest.approx(12.0)


@pytest.mark.parametrize("kind, expected", [
    ("bf", 1 - math.exp(-100 / 450)),                            # [0, α)
    ("abf", math.exp(-25 / 450) - math.exp(-100 / 450)),         # [α/2, α)
    ("adf", math.exp(-100 / 450) - math.exp(-900 / 450)),        # [α, 3α)
], ids=["bf", "abf", "adf"])
def test_virtual_detector_on_a_known_radial_distribution_non_square_pixels(kind, expected):
    # I(θ) ∝ exp(−θ²/2w²), w = 15 mrad, on 0.5 × 0.7 mrad pixels: the encircled fraction within θ is
    # 1 − exp(−θ²/2w²) (2w² = 450 mrad²), α = 10 mrad
    w, alpha, (py, px) = 15.0, 10.0, (0.5, 0.7)
    ny, nx = 260, 186
    ty = (np.arange(ny) - ny // 2) * py
    tx = (np.arange(nx) - nx // 2) * px
    pat = np.exp(-(ty[:, None] ** 2 + tx[None, :] ** 2) / (2 * w * w))
    pat /= pat.sum()
    data = np.broadcast_to(pat.astype(np.float32), (2, 3, ny, nx)).copy()
    geo = Geometry(energy_keV=300.0, semiangle_mrad=alpha, scan_step_A=(0.5, 0.5), detector_sampling_mrad=(py, px))
    m = Measurement("4dstem", data, ("scan_y", "scan_x", "k_y", "k_x"), geo)
    img = _vd(m, detector=kind).data
    assert img.shape == (2, 3)
    assert np.allclose(img, expected, rtol=0.01), (kind, float(img[0, 0]), expected)


def test_virtual_detector_ring_area_on_a_uniform_pattern_non_square_pixels():
    # one count per pixel: a ring [a, b) holds π(b² − a²) / (py·px) pixels
    py, px, alpha = 0.5, 0.625, 20.0
    ny, nx = 256, 200
    data = np.ones((2, 2, ny, nx), np.float32)
    geo = Geometry(energy_keV=80.0, semiangle_mrad=alpha, scan_step_A=(0.4, 0.4), detector_sampling_mrad=(py, px))
    m = Measurement("4dstem", data, ("scan_y", "scan_x", "k_y", "k_x"), geo)
    for kind, (a, b) in {"bf": (0, alpha), "abf": (alpha / 2, alpha), "adf": (alpha, 3 * alpha)}.items():
        expect = math.pi * (b * b - a * a) / (py * px)
        assert _vd(m, detector=kind).data[0, 0] == pytest.approx(expect, rel=0.01), kind


@pytest.mark.parametrize("energy_keV", ENERGIES)
def test_stem4d_vacuum_probe_through_the_virtual_detectors_at_each_energy(energy_keV):
    # the core forward model end to end: a vacuum probe of α = 20 mrad on a 256-px window at 0.1 Å,
    # i.e. a detector pixel of λ/(25.6 Å) rad, computed here from the literal λ
    from tembench.builtin.forward_multislice import STEM4D
    from tembench.types import Sample

    vacuum = Sample(positions_A=np.zeros((0, 3)), numbers=np.zeros(0, int), cell_A=(26.0, 26.0, 4.0))
    alpha, win, s = 20.0, 256, 0.1
    m = STEM4D().simulate(vacuum, STEM4D.Params(energy_keV=energy_keV, sampling_A=s, semiangle_mrad=alpha,
                                                scan_step_A=13.0, slice_thickness_A=4.0, window_gpts=win), np)
    lam = LAMBDA_A[energy_keV]
    pix = lam / (win * s) * 1e3
    assert m.geometry.detector_sampling_mrad == pytest.approx((pix, pix), rel=1e-5)
    pat = m.data[0, 0].astype(np.float64)
    cy, cx = m.geometry.extra.get("detector_centre_px", (pat.shape[0] // 2, pat.shape[1] // 2))
    iy, ix = np.mgrid[:pat.shape[0], :pat.shape[1]]
    theta = np.hypot(iy - cy, ix - cx) * pix  # by hand

    def share(lo, hi):
        return float(pat[(theta >= lo) & (theta < hi)].sum() / pat.sum())

    ring = _vd(m, detector="adf", inner_mrad=0.3 * alpha, outer_mrad=0.6 * alpha).data
    assert np.allclose(ring, share(0.3 * alpha, 0.6 * alpha) * pat.sum(), rtol=1e-4)
    assert share(0.3 * alpha, 0.6 * alpha) == pytest.approx(0.6 ** 2 - 0.3 ** 2, abs=0.02)
    bf = _vd(m, detector="bf").data / pat.sum()
    assert np.all(bf > 0.95)                               # the soft aperture edge straddles α
    assert np.allclose(_vd(m, detector="adf", inner_mrad=1.1 * alpha, outer_mrad=3 * alpha).data, 0.0, atol=1e-5)
