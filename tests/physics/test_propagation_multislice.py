"""Propagators and plane-wave multislice against theory; adjoints by dot-product tests; gradients by
finite differences."""

import math
import zlib

import numpy as np
import pytest

from tembench.physics import multislice as M
from tembench.physics import potentials as P
from tembench.physics.constants import interaction_constant, wavelength_A
from tembench.physics.grid import spatial_frequencies
from tembench.physics.optics import ctf
from tembench.physics.propagation import band_limit_mask, propagate, propagator

RNG = np.random.default_rng(1234)


@pytest.fixture(autouse=True)
def _rng_per_test(request):
    """A generator seeded by the test's own name: results do not depend on which tests ran before."""
    global RNG
    RNG = np.random.default_rng(zlib.crc32(request.node.name.encode()))


def _rand_wave(shape, mask=None):
    w = (RNG.standard_normal(shape) + 1j * RNG.standard_normal(shape)).astype(np.complex64)
    if mask is not None:
        w = np.fft.ifft2(np.fft.fft2(w) * mask).astype(np.complex64)
    return w


@pytest.mark.parametrize("kind", ["fresnel", "exact"])
def test_gaussian_beam_free_space(kind):
    # paraxial Gaussian beam: w(z) = w0 sqrt(1 + (z/zR)²), zR = π w0²/λ
    lam = wavelength_A(200)
    n, s, w0 = 256, 0.05, 0.4
    yy, xx = (np.mgrid[0:n, 0:n] - n // 2) * s
    r2 = xx**2 + yy**2
    psi0 = np.exp(-r2 / w0**2).astype(np.complex64)
    zr = math.pi * w0**2 / lam
    z = 2.0 * zr
    out = propagate(psi0, z, s, lam, kind=kind, band_limit=None)
    wz = w0 * math.sqrt(1 + (z / zr) ** 2)
    gouy = math.atan(z / zr)
    rz = z * (1 + (zr / z) ** 2)
    # exp(−iπλk²z) solves ∂ψ/∂z = (iλ/4π)∇²ψ (You 2025 eq 1): the curvature phase is +, Gouy −
    analytic = (w0 / wz) * np.exp(-r2 / wz**2) * np.exp(1j * math.pi * r2 / (lam * rz)) * np.exp(-1j * gouy)
    # the angular spectrum includes non-paraxial terms; they are tiny for a 0.4 Å waist at 200 keV
    err = np.linalg.norm(out - analytic) / np.linalg.norm(analytic)
    assert err < (2e-3 if kind == "exact" else 5e-4)


@pytest.mark.parametrize("kind", ["fresnel", "exact"])
def test_propagator_unitary_and_reciprocal(kind):
    lam = wavelength_A(300)
    mask = band_limit_mask((64, 48), (0.1, 0.12)) == 1  # frequencies the band limit keeps untouched
    w = _rand_wave((64, 48), mask)
    out = propagate(w, 37.0, (0.1, 0.12), lam, kind=kind)
    assert np.linalg.norm(out) == pytest.approx(np.linalg.norm(w), rel=1e-5)  # Parseval
    back = propagate(out, -37.0, (0.1, 0.12), lam, kind=kind)
    np.testing.assert_allclose(back, w, atol=1e-4 * np.abs(w).max())
    # the propagator's adjoint is the propagator of −Δz: <P x, y> = <x, P(−Δz) y>
    y = _rand_wave((64, 48))
    x = _rand_wave((64, 48))
    lhs = np.vdot(propagate(x, 37.0, (0.1, 0.12), lam, kind=kind), y)
    rhs = np.vdot(x, propagate(y, 37.0, (0.1, 0.12), lam, kind=kind, adjoint=True))
    assert lhs == pytest.approx(rhs, rel=1e-4)


def test_band_limit_two_thirds():
    m = band_limit_mask((90, 90), 0.1, taper=0.0)
    ky, kx = spatial_frequencies((90, 90), 0.1, dtype=np.float64)
    k = np.sqrt(ky**2 + kx**2)
    assert m[k < 0.99 * (2 / 3) * 5.0].min() == 1 and m[k > (2 / 3) * 5.0].max() == 0
    p = propagator((90, 90), 0.1, 0.02, 10.0)
    assert np.abs(p[k > (2 / 3) * 5.0]).max() == 0


def test_vacuum_plane_wave_stays_one():
    v = np.zeros((4, 32, 32), np.float32)
    ex = M.hrtem_exit_wave(v, 2.0, energy_keV=300, sampling_A=0.2).exit_wave
    np.testing.assert_allclose(np.abs(ex) ** 2, 1.0, atol=1e-5)
    img = M.hrtem_images(v, 2.0, energy_keV=300, sampling_A=0.2, defocus_values_A=[0.0, 500.0],
                         aberrations={"C30": 1e6})
    np.testing.assert_allclose(img, 1.0, atol=1e-5)


def test_weak_phase_object_matches_linear_ctf():
    # I = 1 + 2σ F⁻¹[V̂ sin χ] for a weak phase object (exp(−iχ) convention, Δf = −C10)
    n, s, e = 96, 0.15, 300.0
    lam, sig = wavelength_A(e), interaction_constant(e)
    pos = np.array([[5.1, 6.2, 0.0], [9.0, 4.4, 0.0], [7.3, 10.1, 0.0]])
    v = P.projected_potential(pos, [6, 6, 6], gpts=(n, n), sampling_A=s) * 0.02  # σv ≲ 0.02 rad
    df, cs = 300.0, 5e5
    img = M.hrtem_images(v, 0.0, energy_keV=e, sampling_A=s, defocus_values_A=[df], aberrations={"C30": cs},
                         bandlimit_transmission=False, band_limit=None)[0]
    ky, kx = spatial_frequencies((n, n), s, dtype=np.float64)
    h = ctf(ky, kx, lam, {"C10": -df, "C30": cs})
    sin_chi = -np.imag(h)  # H = exp(−iχ) → −Im H = sin χ
    linear = 1 + 2 * sig * np.real(np.fft.ifft2(np.fft.fft2(v[0]) * sin_chi))
    contrast = img - 1
    err = np.linalg.norm(contrast - (linear - 1)) / np.linalg.norm(linear - 1)
    assert err < 0.03  # second-order terms of the phase ~ σv


def test_multislice_adjoint_dot_product():
    # the linear map incident wave → exit wave (fixed potential) against its adjoint
    v = P.projected_potential(RNG.uniform(0, 6, (10, 3)), [14] * 10, gpts=(40, 40), sampling_A=0.15,
                              slice_thickness_A=1.5, z_range_A=(0, 6))
    x = _rand_wave((40, 40))
    y = _rand_wave((40, 40))
    kw = dict(energy_keV=200, sampling_A=0.15, potentials=v)
    fx = M.multislice(x, 1.5, **kw).exit_wave
    res = M.multislice(x, 1.5, keep_waves=True, **kw)
    _, aty = M.multislice_backward(y, res.waves, 1.5, **kw)
    assert np.vdot(fx, y) == pytest.approx(np.vdot(x, aty), rel=2e-4)


def _fd_check(f, x, g, direction, h):
    lp, lm = f(x + h * direction), f(x - h * direction)
    return (lp - lm) / (2 * h), float(np.sum(g.astype(np.float64) * direction))


@pytest.mark.parametrize("bl", [True, False])
def test_hrtem_gradient_wrt_slice_potential(bl):
    n, s = 40, 0.2
    pos = RNG.uniform(0, 8, (12, 3))
    v = P.projected_potential(pos, RNG.choice([6, 14], 12), gpts=(n, n), sampling_A=s, slice_thickness_A=2.0,
                              z_range_A=(0, 8))
    kw = dict(energy_keV=200, sampling_A=s, defocus_values_A=[0.0, 150.0], aberrations={"C30": 1e5},
              bandlimit_transmission=bl)
    meas = M.hrtem_images(v * 1.3 + 1.0, 2.0, energy_keV=200, sampling_A=s, defocus_values_A=[0.0, 150.0],
                          aberrations={"C30": 1e5})
    loss, g = M.hrtem_loss_and_gradient(v, meas, 2.0, **kw)
    d = np.zeros_like(v)
    d[2] = RNG.standard_normal((n, n))  # one slice, as Ren's per-slice gradient
    fd, an = _fd_check(lambda x: M.hrtem_loss_and_gradient(x, meas, 2.0, **kw)[0], v, g, d, 0.5)
    assert fd == pytest.approx(an, rel=0.02)
    d = RNG.standard_normal(v.shape).astype(np.float32)
    fd, an = _fd_check(lambda x: M.hrtem_loss_and_gradient(x, meas, 2.0, **kw)[0], v, g, d, 0.5)
    assert fd == pytest.approx(an, rel=0.02)


def test_hrtem_gradient_wrt_incident_wave():
    n, s = 32, 0.2
    v = P.projected_potential(RNG.uniform(0, 6.4, (8, 3)), [14] * 8, gpts=(n, n), sampling_A=s,
                              slice_thickness_A=2.0, z_range_A=(0, 6.4))
    kw = dict(energy_keV=200, sampling_A=s, defocus_values_A=[50.0])
    meas = M.hrtem_images(v * 0.7, 2.0, **kw)
    psi = np.ones((n, n), np.complex64)
    loss, _, g = M.hrtem_loss_and_gradient(v, meas, 2.0, incident=psi, return_incident_gradient=True, **kw)
    d = _rand_wave((n, n))
    f = lambda w: M.hrtem_loss_and_gradient(v, meas, 2.0, incident=w.astype(np.complex64), **kw)[0]  # noqa: E731
    h = 0.002
    fd = (f(psi + h * d) - f(psi - h * d)) / (2 * h)
    an = float(np.real(np.vdot(g, d)))  # dL = Re Σ conj(g) dψ
    assert fd == pytest.approx(an, rel=0.02)
