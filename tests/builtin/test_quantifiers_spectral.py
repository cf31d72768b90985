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


# --- rules pinned on hand-built spectra (issue 18 part 6: mutation survivors) ----------------------
def test_spectral_cutoff_on_a_hand_built_ring_spectrum():
    """10 rings of width 1 (centres 0.5 … 9.5, k_max 10). floor_band (0.75, 1.0) → rings 7.5, 8.5, 9.5
    (the band's lower edge is inclusive), floor = their median = 1. With threshold 2, a ring of power
    exactly 2 counts (≥); the cut-off is the highest counting ring below the band."""
    k = np.arange(10) + 0.5
    psd = np.array([50, 40, 30, 2.0, 1.5, 1.2, 1.0, 0.9, 1.0, 1.1])
    kc, floor, limited = spectral_cutoff(k, psd, (0.75, 1.0), threshold=2.0, smooth_bins=1)
    assert (kc, floor, limited) == (3.5, 1.0, False)
    # a ring at 7.5 holding signal is in the band, not below it: floor = median(5, 1, 1.1) = 1.1, so ring
    # 3.5 (2.0 < 2.2) no longer counts and the cut-off is 2.5
    psd2 = psd.copy()
    psd2[7] = 5.0
    assert spectral_cutoff(k, psd2, (0.75, 1.0), 2.0, 1)[:2] == (2.5, 1.1)
    # the band's upper edge is a fraction of k_max = last centre + half a ring: 0.95·10 = 9.5 keeps ring 9.5
    # (inclusive): median(1.2, 1.0, 0.9, 1.5, 100) = 1.2, not median of the first four = 1.1
    psd3 = psd.copy()
    psd3[8], psd3[9] = 1.5, 100.0
    assert spectral_cutoff(k, psd3, (0.5, 0.95), 2.0, 1)[1] == pytest.approx(1.2)
    # the first ring is smoothed with itself as its lower neighbour (edge padding, not zeros):
    # s[0] = (3 + 3 + 1)/3 ≥ 2 → cut-off 0.5; zero padding would give (0 + 3 + 1)/3 < 2 → none
    assert spectral_cutoff(k, np.r_[3.0, np.ones(9)], (0.75, 1.0), 2.0, 3)[0] == 0.5
    # three-ring box smoothing, ends padded with the end values: s[3] = (30 + 2 + 1.5)/3 ≥ 2, s[4] < 2·1
    assert spectral_cutoff(k, psd, (0.75, 1.0), 2.0, 3)[0] == 3.5
    psd4 = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 9.0, 1.0, 1.0])
    # signal only in the last ring below a band that is the last ring alone: limited by the band
    kc, floor, limited = spectral_cutoff(k, np.r_[psd4[:8], 5.0, 1.0], (0.95, 1.0), 2.0, 1)
    assert (kc, floor, limited) == (8.5, 1.0, True)
    # nothing above threshold: no cut-off, not limited
    kc, floor, limited = spectral_cutoff(k, np.ones(10), (0.75, 1.0), 2.0, 1)
    assert np.isnan(kc) and floor == 1.0 and limited is False
    # two-ring smoothing averages a ring with the one below it
    assert spectral_cutoff(k, np.r_[1, 1, 1, 3.0, 1, 1, 1, 1, 1, 1], (0.75, 1.0), 2.0, 2)[0] == 4.5
    # defaults are the quantifier's: floor band (0.8, 1.0), threshold 2, 3 rings
    p = SpectralResolution.Params()
    psd5 = np.r_[np.full(5, 1.0), 2.2, 2.2, 2.2, 1.0, 1.0]
    assert spectral_cutoff(k, psd5) == spectral_cutoff(k, psd5, p.floor_band, p.threshold, p.smooth_bins)
    assert spectral_cutoff(k, psd5)[0] == 6.5          # ring 6.5: (2.2 + 2.2 + 2.2)/3 ≥ 2; ring 7.5: 5.4/3 < 2


def test_radial_power_spectrum_rings_and_defaults():
    rng = np.random.default_rng(3)
    img = rng.normal(size=(24, 40))
    k, psd, counts = radial_power_spectrum(img, (0.25, 0.2), window=False)
    # rings up to the smaller Nyquist (2 1/Å along y) in min(shape)/2 = 12 rings
    assert len(k) == 12 and k[0] == pytest.approx(1 / 12) and k[-1] == pytest.approx(2 - 1 / 12)
    # every non-zero frequency below that Nyquist is in exactly one ring; k = 0 in none
    ky = np.fft.fftfreq(24, 0.25)[:, None]
    kx = np.fft.fftfreq(40, 0.2)[None, :]
    kk = np.hypot(ky, kx)
    assert counts.sum() == np.count_nonzero((kk > 0) & (kk < 2.0))
    assert counts[0] == np.count_nonzero((kk > 0) & (kk < 1 / 6))
    # the default is the Hann window; an offset does not change the spectrum (the mean is removed first)
    np.testing.assert_array_equal(radial_power_spectrum(img, (0.25, 0.2))[1],
                                  radial_power_spectrum(img, (0.25, 0.2), window=True)[1])
    assert not np.allclose(radial_power_spectrum(img, (0.25, 0.2))[1], psd)
    np.testing.assert_allclose(radial_power_spectrum(img + 1e3, (0.25, 0.2))[1],
                               radial_power_spectrum(img, (0.25, 0.2))[1], rtol=1e-6)
    # 8×8 is the smallest image accepted, with 8 rings
    assert len(radial_power_spectrum(rng.normal(size=(8, 8)), 1.0)[0]) == 8
    with pytest.raises(TembenchError, match="8x8"):
        radial_power_spectrum(np.zeros((7, 9)), 1.0)


@pytest.mark.parametrize("sampling, cycles", [((0.2, 0.25), (47, 0)), ((0.25, 0.2), (45, 10)),
                                              ((0.25, 0.2), (0, 45))])
def test_cutoff_of_a_cosine_with_rectangular_pixels_and_image(sampling, cycles):
    """A cosine of (m, p) cycles over 160 × 192 px: |k| = √((m/(160 sy))² + (p/(192 sx))²) 1/Å, e.g.
    47/(160·0.2) = 1.469 1/Å. Rings are 1/(160 · max(s)) = 0.025 1/Å wide up to the smaller Nyquist
    (2 1/Å); the cut-off is the centre of the ring that contains |k|."""
    ny, nx = 160, 192
    y, x = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
    img = np.cos(2 * np.pi * (cycles[0] * y / ny + cycles[1] * x / nx))
    img = img + 0.05 * np.random.default_rng(4).normal(size=img.shape)
    k_true = np.hypot(cycles[0] / (ny * sampling[0]), cycles[1] / (nx * sampling[1]))
    width = 0.5 / max(sampling) / 80
    assert width == pytest.approx(0.025) and 0.1 < (k_true / width) % 1 < 0.9     # not on a ring edge
    rec = Reconstruction(kind="image", data=img, sampling_A=sampling, quantity="phase_rad")
    out = SpectralResolution().score(rec, None, None, SpectralResolution.Params(window=False, smooth_bins=1))
    assert out["spectral_cutoff_A_inv"] == pytest.approx((np.floor(k_true / width) + 0.5) * width)
    k, psd, _ = radial_power_spectrum(img, sampling, window=False)
    np.testing.assert_array_equal(out["radial_psd_k_A_inv"], k)
    np.testing.assert_array_equal(out["radial_psd"], psd)


def test_error_messages_name_the_problem():
    with pytest.raises(TembenchError, match="floor band holds no frequency bin"):
        spectral_cutoff(np.arange(10) + 0.5, np.ones(10), (0.99, 0.995))
    rec = Reconstruction(kind="volume", data=np.zeros((8, 8, 8)), sampling_A=1.0, quantity="potential_V")
    with pytest.raises(TembenchError, match="scores images only"):
        SpectralResolution().score(rec, None, None, SpectralResolution.Params())
