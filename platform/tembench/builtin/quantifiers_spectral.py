"""Blind resolution estimate of an image from its radially averaged power spectrum."""

from __future__ import annotations

import numpy as np
from pydantic import Field, model_validator

from tembench import Params, Quantifier, hookimpl
from tembench.errors import TembenchError
from tembench.metrics import Metric


def radial_power_spectrum(image: np.ndarray, sampling_A, n_bins: int | None = None, window: bool = True):
    """(k_centres 1/Å, radially averaged |F|², counts per bin) up to the axis Nyquist frequency.

    A separable Hann window (on the mean-subtracted image) suppresses the edge discontinuity of
    non-periodic images, which would otherwise leak a k⁻² tail across the spectrum.
    """
    a = np.asarray(image, dtype=np.float64)
    if a.ndim != 2 or min(a.shape) < 8:
        raise TembenchError(f"spectral resolution needs a 2-D image of at least 8x8 pixels, got shape {a.shape}")
    sy, sx = (float(sampling_A[0]), float(sampling_A[1])) if np.ndim(sampling_A) else (float(sampling_A),) * 2
    a = a - a.mean()
    if window:
        a = a * np.hanning(a.shape[0])[:, None] * np.hanning(a.shape[1])[None, :]
    p = np.abs(np.fft.fft2(a)) ** 2
    ky = np.fft.fftfreq(a.shape[0], d=sy)[:, None]
    kx = np.fft.fftfreq(a.shape[1], d=sx)[None, :]
    k = np.sqrt(ky ** 2 + kx ** 2)
    k_nyq = min(0.5 / sy, 0.5 / sx)
    if n_bins is None:
        n_bins = max(8, min(a.shape) // 2)
    edges = np.linspace(0.0, k_nyq, n_bins + 1)
    idx = np.digitize(k.ravel(), edges) - 1
    ok = (idx >= 0) & (idx < n_bins) & (k.ravel() > 0)
    counts = np.bincount(idx[ok], minlength=n_bins)
    sums = np.bincount(idx[ok], weights=p.ravel()[ok], minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        psd = sums / counts
    return 0.5 * (edges[1:] + edges[:-1]), psd, counts


def spectral_cutoff(k, psd, floor_band=(0.8, 1.0), threshold: float = 2.0, smooth_bins: int = 3):
    """(cut-off k_c in 1/Å, noise floor, limited flag): the highest frequency below the floor band where
    the smoothed spectrum is ≥ ``threshold`` × the floor (median of the spectrum in ``floor_band`` × k_max)."""
    k = np.asarray(k, float)
    psd = np.asarray(psd, float)
    good = np.isfinite(psd)
    k, psd = k[good], psd[good]
    k_max = k[-1] + 0.5 * (k[1] - k[0])
    in_floor = (k >= floor_band[0] * k_max) & (k <= floor_band[1] * k_max)
    if not in_floor.any():
        raise TembenchError("spectral resolution: the floor band holds no frequency bin; widen floor_band")
    floor = float(np.median(psd[in_floor]))
    if smooth_bins > 1:
        kernel = np.ones(smooth_bins) / smooth_bins
        s = np.convolve(np.pad(psd, smooth_bins // 2, mode="edge"), kernel, mode="valid")[:len(psd)]
    else:
        s = psd
    below_band = k < floor_band[0] * k_max
    above = below_band & (s >= threshold * floor)
    if not above.any():
        return float("nan"), floor, False
    i = int(np.flatnonzero(above)[-1])
    limited = i + 1 < len(k) and not below_band[i + 1]  # the signal runs into the floor band itself
    return float(k[i]), floor, bool(limited)


class SpectralResolution(Quantifier):
    """Resolution (Å) where an image's radially averaged power spectrum meets its noise floor.

    Criterion: the Hann-windowed spectrum is azimuthally averaged in rings up to the Nyquist
    frequency; the noise floor is the median ring power in ``floor_band`` (fractions of Nyquist,
    default 0.8–1.0, where a sampled-enough reconstruction holds only noise); the cut-off k_c is
    the highest ring below that band whose (3-ring smoothed) power is ≥ ``threshold`` × floor,
    i.e. a spectral SNR ≥ threshold − 1; resolution = 1/k_c. ``resolution_limited_by_band`` = 1
    when the signal reaches the floor band, so the estimate is a lower bound set by sampling.
    Blind: it uses no ground truth. The ring spectrum is stored as an artifact.
    """

    name = "spectral_resolution"
    accepts = ("image",)
    version = "1"
    metrics = {
        "resolution_A": Metric("Å", "lower", (0.0, None), headline=True,
                               description="1 / the highest frequency whose power is above the noise floor (blind)"),
        "spectral_cutoff_A_inv": Metric("1/Å", "higher", (0.0, None), diagnostic=True,
                                        description="the cut-off frequency k_c = 1 / resolution_A"),
        "spectral_noise_floor": Metric("(reconstruction's units)²", None, (0.0, None), diagnostic=True,
                                       description="median ring power in the floor band"),
        "resolution_limited_by_band": Metric("", None, (0.0, 1.0), diagnostic=True,
                                             description="1 = the signal reaches the floor band: the resolution is a "
                                                         "bound set by the sampling"),
    }

    class Params(Params):
        floor_band: tuple[float, float] = Field((0.8, 1.0), description="noise-floor band, fractions of Nyquist")
        threshold: float = Field(2.0, gt=1.0, description="power ratio to the floor that still counts as signal")
        smooth_bins: int = Field(3, ge=1, le=15, description="rings averaged before the threshold test")
        window: bool = Field(True, description="Hann window before the FFT (non-periodic images)")

        @model_validator(mode="after")
        def _band(self):
            lo, hi = self.floor_band
            if not (0 < lo < hi <= 1):
                raise ValueError(f"floor_band must satisfy 0 < lo < hi ≤ 1 (fractions of Nyquist), got {self.floor_band}")
            return self

    def score(self, reconstruction, measurement, sample, params):
        if reconstruction.kind != "image":
            raise TembenchError("spectral_resolution scores images only")
        k, psd, _ = radial_power_spectrum(reconstruction.data, reconstruction.sampling_A, window=params.window)
        kc, floor, limited = spectral_cutoff(k, psd, params.floor_band, params.threshold, params.smooth_bins)
        return {"resolution_A": 1.0 / kc if kc == kc and kc > 0 else float("nan"),
                "spectral_cutoff_A_inv": kc, "spectral_noise_floor": floor,
                "resolution_limited_by_band": float(limited),
                "radial_psd_k_A_inv": k, "radial_psd": psd}


@hookimpl
def tembench_register_quantifiers():
    return [SpectralResolution]
