"""Physics of the built-in baseline components, against theory."""

from __future__ import annotations

import numpy as np
import pytest

from tembench.backend import fft2, ifft2
from tembench.builtin.quantifiers import normalized_cross_correlation
from tembench.builtin.reconstructors import DirectImage, WeakPhaseWiener
from tembench.physics import constants, optics
from tembench.physics.grid import spatial_frequencies
from tembench.types import Geometry, Measurement


def _weak_phase_image(phase, sampling, energy, defocus, semiangle):
    lam = constants.wavelength_A(energy)
    ky, kx = spatial_frequencies(phase.shape, sampling)
    h = optics.ctf(ky, kx, lam, {"C10": -defocus}, semiangle)
    return np.abs(ifft2(fft2(np.exp(1j * phase).astype(np.complex64)) * h)) ** 2


def test_weak_phase_wiener_recovers_transferred_phase():
    rng = np.random.default_rng(0)
    n, sampling, energy, defocus, semiangle = 128, 0.25, 300.0, 300.0, 20.0
    # a weak, band-limited random phase object (max 0.05 rad)
    lam = constants.wavelength_A(energy)
    ky, kx = spatial_frequencies((n, n), (sampling, sampling))
    band = optics.aperture(ky, kx, lam, semiangle * 0.9)
    phase = ifft2(fft2(rng.standard_normal((n, n))) * band).real
    phase = 0.05 * phase / np.abs(phase).max()
    image = _weak_phase_image(phase, (sampling, sampling), energy, defocus, semiangle)
    m = Measurement(kind="hrtem_image", data=image.astype(np.float32), axes=("y", "x"),
                    geometry=Geometry(energy_keV=energy, sampling_A=(sampling, sampling), defocus_A=[defocus],
                                      semiangle_mrad=semiangle))
    rec = WeakPhaseWiener().reconstruct(m, WeakPhaseWiener.Params(epsilon=0.01), np)
    # compare with the part of the phase the CTF transfers: zeros of sin χ carry no information
    chi = optics.aberration_function(ky, kx, lam, {"C10": -defocus})
    transfer = np.abs(np.sin(chi)) * band
    ref = ifft2(fft2(phase) * (transfer > 0.3)).real
    assert normalized_cross_correlation(rec.data, ref) > 0.95
    assert rec.quantity == "phase_rad" and rec.sampling_A == (sampling, sampling)


def test_direct_image_frames():
    data = np.full((4, 5), 2.0, np.float32)
    m = Measurement(kind="adf_image", data=data, axes=("scan_y", "scan_x"),
                    geometry=Geometry(scan_step_A=(0.5, 0.4), scan_positions_A=np.array([[1.0, 2.0], [1.0, 2.4]])))
    rec = DirectImage().reconstruct(m, DirectImage.Params(), np)
    assert rec.sampling_A == (0.5, 0.4) and rec.origin_A == (1.0, 2.0)
    np.testing.assert_allclose(rec.data, 1.0)
    empty = DirectImage().reconstruct(m.replace(data=np.zeros((4, 5), np.float32)), DirectImage.Params(), np)
    assert empty.extras == {"normalized": False}
    with pytest.raises(Exception, match="single 2D image"):
        DirectImage().reconstruct(m.replace(data=np.zeros((2, 4, 5), np.float32), axes=("t", "y", "x")),
                                  DirectImage.Params(), np)


def test_image_statistics():
    from tembench.builtin.quantifiers import ImageStatistics
    from tembench.types import Reconstruction

    rec = Reconstruction(kind="image", data=np.array([[1.0, 3.0], [1.0, 3.0]]), sampling_A=1, quantity="intensity")
    out = ImageStatistics().score(rec, None, None, ImageStatistics.Params())
    assert out == {"mean_value": 2.0, "std_value": 1.0, "contrast": 0.5}
