"""Spectral resolution: the cut-off of a band-limited signal in white noise is found where it is."""

from __future__ import annotations

import numpy as np
import pytest

from tembench.builtin.quantifiers_spectral import SpectralResolution, radial_power_spectrum, spectral_cutoff
from tembench.errors import TembenchError
from tembench.types import Reconstruction


def _band_limited(n, sampling, k_cut, rng, noise_rel):
    """White signal spectrum up to |k| < k_cut (1/Å), plus white noise noise_rel × signal rms."""
    ky = np.fft.fftfreq(n, sampling)[:, None]
    kx = np.fft.fftfreq(n, sampling)[None, :]
    spec = (rng.normal(size=(n, n)) + 1j * rng.normal(size=(n, n))) * (np.hypot(ky, kx) < k_cut)
    sig = np.real(np.fft.ifft2(spec))
    sig /= sig.std()
    return sig + noise_rel * rng.normal(size=sig.shape)


@pytest.mark.parametrize("k_cut", [0.6, 1.0, 1.4])
def test_cutoff_of_band_limited_signal_in_noise(k_cut):
    rng = np.random.default_rng(int(k_cut * 10))
    sampling = 0.25  # Nyquist 2 1/Å, floor band 1.6–2.0
    img = _band_limited(256, sampling, k_cut, rng, noise_rel=0.3)
    rec = Reconstruction(kind="image", data=img, sampling_A=sampling, quantity="phase_rad")
    out = SpectralResolution().score(rec, None, None, SpectralResolution.Params(window=False))
    bin_w = 2.0 / 128
    assert abs(out["spectral_cutoff_A_inv"] - k_cut) <= 3 * bin_w
    assert out["resolution_A"] == pytest.approx(1 / k_cut, rel=0.06)
    assert out["resolution_limited_by_band"] == 0.0
    # the floor is the white-noise power per ring: N² σ² for an unnormalised FFT
    assert out["spectral_noise_floor"] == pytest.approx(256 ** 2 * 0.3 ** 2, rel=0.1)


def test_more_noise_means_lower_resolution_and_signal_into_band_is_flagged():
    rng = np.random.default_rng(1)
    ky = np.fft.fftfreq(256, 0.25)
    k = np.hypot(ky[:, None], ky[None, :])
    # a smoothly decaying spectrum: the cut-off moves down as noise rises
    spec = (rng.normal(size=k.shape) + 1j * rng.normal(size=k.shape)) * np.exp(-(k / 0.5) ** 2)
    sig = np.real(np.fft.ifft2(spec))
    sig /= sig.std()
    res = []
    for noise in (0.01, 0.1, 1.0):
        img = sig + noise * rng.normal(size=sig.shape)
        kk, psd, _ = radial_power_spectrum(img, 0.25, window=False)
        res.append(spectral_cutoff(kk, psd)[0])
    assert res[0] > res[1] > res[2]
    # pure white noise has no ring above twice the floor: no resolution
    kk, psd, _ = radial_power_spectrum(rng.normal(size=(128, 128)), 0.25, window=False)
    assert np.isnan(spectral_cutoff(kk, psd)[0])
    # a signal that runs into the floor band is flagged as limited by the band (sampling)
    img = _band_limited(256, 0.25, 1.75, rng, noise_rel=0.01)
    kk, psd, _ = radial_power_spectrum(img, 0.25, window=False)
    kc, floor, limited = spectral_cutoff(kk, psd)
    assert limited and kc >= 1.5


def test_bad_parameters_are_rejected():
    with pytest.raises(ValueError, match="floor_band"):
        SpectralResolution.Params(floor_band=(0.9, 0.5))
    with pytest.raises(TembenchError, match="8x8"):
        radial_power_spectrum(np.zeros((4, 4)), 1.0)
