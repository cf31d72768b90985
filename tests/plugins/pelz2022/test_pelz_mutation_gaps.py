"""Gaps in the Pelz 2022 plugin tests found by mutation testing (issue 18 part 6).

Hand-built 4D data on a known detector grid (pixel (n//2, n//2) is the unscattered beam, angles
(i − n//2)·d by hand), so the expected counts and angles are known by construction; the skewness
that resolves DPC's 180° ambiguity is checked against scipy.stats.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats

from tembench.errors import TembenchError
from tembench.types import Geometry, Measurement
from tembench_pelz2022 import dpc
from tembench_pelz2022.virtual import VirtualDetector, detector_angles

N_DET, D_MRAD = 16, 2.0   # 16² detector pixels of 2 mrad: the corner pixel (0, 0) is at 8√2·2 = 22.63 mrad


def _corner_and_centre(scan=(3, 4), semiangle=5.0, positions=None):
    """Every pattern: 1 electron at the detector centre and 0.25 at the outermost (corner) pixel."""
    data = np.zeros(scan + (N_DET, N_DET), np.float32)
    data[..., N_DET // 2, N_DET // 2] = 1.0
    data[..., 0, 0] = 0.25
    geo = Geometry(energy_keV=200.0, semiangle_mrad=semiangle, detector_sampling_mrad=(D_MRAD, D_MRAD),
                   scan_step_A=(0.5, 0.4), scan_positions_A=positions)
    return Measurement(kind="4dstem", data=data, axes=("scan_y", "scan_x", "k_y", "k_x"), geometry=geo)


def test_haadf_reaches_the_detector_edge_and_reports_it():
    m = _corner_and_centre(positions=np.array([[1.5, -2.0], [1.5, -1.6]]))
    rec = VirtualDetector().reconstruct(m, VirtualDetector.Params(detector="haadf"), np)
    edge = 8 * math.sqrt(2) * D_MRAD
    # HAADF = 3α … the detector edge: the corner electron is collected, the central one is not
    assert rec.data.dtype == np.float32 and rec.data.shape == (3, 4)
    np.testing.assert_allclose(rec.data, 0.25)
    assert rec.extras["inner_mrad"] == 15.0
    assert rec.extras["outer_mrad"] == pytest.approx(edge, rel=2e-4)
    # the image lives on the scan grid: sampling = scan step, origin = first probe position
    assert rec.sampling_A == (0.5, 0.4) and rec.origin_A == (1.5, -2.0)


def test_explicit_angles_need_no_semiangle_and_an_empty_annulus_is_refused():
    m = _corner_and_centre(semiangle=None)
    rec = VirtualDetector().reconstruct(m, VirtualDetector.Params(inner_mrad=0.0, outer_mrad=1.0), np)
    np.testing.assert_allclose(rec.data, 1.0)   # only the central pixel lies below 1 mrad
    assert rec.origin_A == (0.0, 0.0)
    for p in (VirtualDetector.Params(inner_mrad=2.0), VirtualDetector.Params(outer_mrad=4.0), VirtualDetector.Params()):
        with pytest.raises(TembenchError, match="semiangle_mrad is missing"):
            VirtualDetector().reconstruct(m, p, np)
    with pytest.raises(TembenchError, match="inner"):
        detector_angles("adf", 10.0, 12.0, 12.0, 40.0)
    assert detector_angles("bf", 10.0, None, None, 40.0) == (0.0, 10.0)


def test_skewness_is_the_standardised_third_moment():
    rng = np.random.default_rng(1)
    for a in (rng.exponential(2.0, (40, 50)) + 3.0, -rng.gamma(4.0, 1.0, (30, 30))):
        assert dpc._skew(a) == pytest.approx(float(scipy.stats.skew(a, axis=None)), rel=1e-9)
    assert dpc._skew(np.full((4, 4), 7.0)) == 0.0


def test_icom_reconstructor_integrates_with_the_requested_padding(focused):
    from tembench_pelz2022.common import load_4d, probe_optics

    m = focused.measurement
    # a non-periodic crop of the scan: padding changes the integral, so the parameter must reach it
    crop = m.replace(data=m.data[:40, :52])
    x, grid = load_4d(crop, "t")
    gy, gx = dpc.gradient_field(x, grid, probe_optics(crop.geometry, "t").wavelength_A)
    step = crop.geometry.scan_step_A
    for pad in (1.0, 2.0):
        rec = dpc.ICOM().reconstruct(crop, dpc.ICOM.Params(padding_factor=pad, rotation_deg=0.0), np)
        np.testing.assert_allclose(rec.data, dpc.icom(gy, gx, step, pad), atol=1e-6)
    p1 = dpc.ICOM().reconstruct(crop, dpc.ICOM.Params(padding_factor=1.0, rotation_deg=0.0), np).data
    p2 = dpc.ICOM().reconstruct(crop, dpc.ICOM.Params(padding_factor=2.0, rotation_deg=0.0), np).data
    assert np.abs(p1 - p2).max() > 1e-3 * np.abs(p1).max()


def test_probe_optics_scan_grid_and_rotation_helpers_follow_their_contracts():
    from tembench_pelz2022.common import phase_image, probe_optics, rotation_matrix, scan_origin, scan_step

    g = Geometry(energy_keV=300.0, semiangle_mrad=20.0, aberrations_A={"Cs": 1e7}, defocus_A=[50.0])
    # the geometry's aberrations, and C10 = −Δf from its first defocus when they hold none
    assert probe_optics(g, "t").aberrations == {"C30": 1e7, "C10": -50.0}
    assert probe_optics(g.replace(aberrations_A={"C10": 7.0}), "t").aberrations == {"C10": 7.0}
    # explicit aberrations replace the geometry's (no defocus added); defocus_A overrides C10
    assert probe_optics(g, "t", aberrations={"C12": 3.0}).aberrations == {"C12": 3.0}
    assert probe_optics(g, "t", defocus_A=-20.0).aberrations == {"C30": 1e7, "C10": 20.0}
    opt = probe_optics(g, "t")
    assert opt.energy_keV == 300.0 and opt.semiangle_mrad == 20.0
    for bad in (g.replace(energy_keV=None), g.replace(semiangle_mrad=None)):
        with pytest.raises(TembenchError, match="energy_keV and Geometry.semiangle_mrad"):
            probe_optics(bad, "t")
    # scan step: scalar or (y, x), every axis positive
    assert scan_step(Geometry(scan_step_A=0.3), "t") == (0.3, 0.3)
    assert scan_step(Geometry(scan_step_A=(0.3, 0.5)), "t") == (0.3, 0.5)
    for bad in ((0.0, 0.5), (0.5, 0.0), (-0.1, 0.5)):
        with pytest.raises(TembenchError, match="positive"):
            scan_step(Geometry(scan_step_A=bad), "t")
    with pytest.raises(TembenchError, match="scan_step_A"):
        scan_step(Geometry(), "t")
    # scan origin: the first probe position (y, x), (0, 0) without positions
    assert scan_origin(Geometry(scan_positions_A=np.array([[1.5, -2.0]]))) == (1.5, -2.0)
    assert scan_origin(Geometry(scan_positions_A=np.array([[1.5, -2.0], [3.0, 4.0]]))) == (1.5, -2.0)
    assert scan_origin(Geometry(scan_positions_A=np.zeros((0, 2)))) == (0.0, 0.0)
    assert scan_origin(Geometry()) == (0.0, 0.0)
    # R(θ) on (y, x) vectors is counter-clockwise in the (x, y) plane: x̂ → ŷ and ŷ → −x̂ for 90°
    np.testing.assert_allclose(rotation_matrix(90.0) @ [0.0, 1.0], [1.0, 0.0], atol=1e-15)
    np.testing.assert_allclose(rotation_matrix(90.0) @ [1.0, 0.0], [0.0, -1.0], atol=1e-15)   # ŷ → −x̂
    np.testing.assert_allclose(rotation_matrix(30.0) @ [0.0, 1.0], [0.5, math.sqrt(3) / 2], atol=1e-15)
    assert rotation_matrix(30.0).dtype == np.float64
    rec = phase_image(np.ones((2, 3)), Geometry(scan_step_A=(0.3, 0.5), scan_positions_A=np.array([[1.0, 2.0]])),
                      "t", rotation_deg=12.0)
    assert rec.quantity == "phase_rad" and rec.data.dtype == np.float32 and rec.kind == "image"
    assert rec.sampling_A == (0.3, 0.5) and rec.origin_A == (1.0, 2.0) and rec.extras == {"rotation_deg": 12.0}
