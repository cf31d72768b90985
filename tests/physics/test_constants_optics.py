"""Constants and optics against published values and closed forms."""

import math

import numpy as np
import pytest
import scipy.constants as sc

from tembench.errors import TembenchError
from tembench.physics import constants, optics
from tembench.physics.grid import spatial_frequencies


def _independent_wavelength_sigma(energy_keV):
    # from CODATA via scipy.constants, written independently of the module under test
    E = energy_keV * 1e3 * sc.e
    mc2 = sc.m_e * sc.c**2
    p = math.sqrt(E * (E + 2 * mc2)) / sc.c
    lam = sc.h / p
    m = sc.m_e * (1 + E / mc2)
    return lam * 1e10, 2 * math.pi * m * sc.e * lam / sc.h**2 * 1e-10


@pytest.mark.parametrize("energy_keV", [80.0, 200.0, 300.0])
def test_wavelength_and_sigma_match_codata(energy_keV):
    lam, sigma = _independent_wavelength_sigma(energy_keV)
    assert constants.wavelength_A(energy_keV) == pytest.approx(lam, rel=1e-6)
    assert constants.interaction_constant(energy_keV) == pytest.approx(sigma, rel=1e-6)


@pytest.mark.parametrize(
    "energy_keV, lam_pub, sigma_pub",
    # Kirkland (2010) Table 2.2 / abTEM: λ in Å to 5 significant digits, σ in rad/(V·Å)
    [(80.0, 0.041757, 0.0010087), (200.0, 0.025079, 0.00072884), (300.0, 0.019687, 0.00065262)],
)
def test_wavelength_and_sigma_published(energy_keV, lam_pub, sigma_pub):
    # published tables carry 5 digits, so they are met to their own last digit
    assert constants.wavelength_A(energy_keV) == pytest.approx(lam_pub, abs=1.5e-6)
    assert constants.interaction_constant(energy_keV) == pytest.approx(sigma_pub, rel=2e-4)


def test_sigma_kirkland_form():
    for e in (60.0, 300.0):
        lam = constants.wavelength_A(e)
        mc2 = constants.ELECTRON_REST_ENERGY_KEV
        kirk = 2 * math.pi / (lam * e * 1e3) * (mc2 + e) / (2 * mc2 + e)
        assert constants.interaction_constant(e) == pytest.approx(kirk, rel=1e-9)


@pytest.mark.parametrize("bad", [0, -5, float("nan")])
def test_bad_energy(bad):
    with pytest.raises(TembenchError, match="energy_keV"):
        constants.wavelength_A(bad)


def test_chi_defocus_cs_convention():
    lam = constants.wavelength_A(300)
    ky, kx = spatial_frequencies((32, 32), 0.2, dtype=np.float64)
    df, cs = 500.0, 1.2e7
    chi = optics.aberration_function(ky, kx, lam, {"C10": -df, "C30": cs})
    k2 = ky**2 + kx**2
    expect = math.pi * lam * k2 * (0.5 * cs * lam**2 * k2 - df)  # Friedrich eq 1.17
    np.testing.assert_allclose(chi, expect, rtol=1e-12, atol=1e-9)
    chi2 = optics.aberration_function(ky, kx, lam, {"defocus": df, "Cs": cs})
    np.testing.assert_allclose(chi2, chi)


def test_chi_astigmatism_angle():
    lam = constants.wavelength_A(200)
    k = np.array([[0.5]])
    for phi in (0.0, 0.7):
        ky, kx = k * math.sin(phi), k * math.cos(phi)
        chi = optics.aberration_function(ky, kx, lam, {"C12": 100.0, "phi12": 0.3})
        assert chi[0, 0] == pytest.approx(math.pi / lam * 100 * (lam * 0.5) ** 2 * math.cos(2 * (phi - 0.3)))


def test_unknown_aberration_named():
    with pytest.raises(TembenchError, match="C99"):
        optics.aberration_function(np.zeros((1, 1)), np.zeros((1, 1)), 0.02, {"C99": 1.0})


def test_scherzer():
    lam = constants.wavelength_A(300)
    assert optics.scherzer_defocus_A(1e7, 300) == pytest.approx(math.sqrt(1.5 * 1e7 * lam))
    assert optics.scherzer_defocus_A(1e7, 300, kind="hrtem") == pytest.approx(math.sqrt(4 / 3 * 1e7 * lam))


def test_probe_normalised_and_centred():
    psi = optics.probe((64, 64), 0.2, 300, 25.0, {"C10": -50.0}, position_A=(6.0, 7.0))
    assert float(np.sum(np.abs(psi) ** 2)) == pytest.approx(1.0, rel=1e-5)
    i = np.abs(psi) ** 2
    yy, xx = np.mgrid[0:64, 0:64] * 0.2
    assert float((i * yy).sum()) == pytest.approx(6.0, abs=0.05)
    assert float((i * xx).sum()) == pytest.approx(7.0, abs=0.05)


def test_soft_aperture_area_matches_disc():
    lam = constants.wavelength_A(200)
    ky, kx = spatial_frequencies((256, 256), 0.1, dtype=np.float64)
    a = optics.aperture(ky, kx, lam, 20.0)
    dk = 1 / 25.6
    area = float(a.sum()) * dk**2
    assert area == pytest.approx(math.pi * (20e-3 / lam) ** 2, rel=5e-3)
