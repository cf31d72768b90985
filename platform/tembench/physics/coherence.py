"""Partial coherence by incoherent summation (Ren 2020 App. A1.1–A1.3).

* Temporal coherence (defocus spread, A1.2): the image is the weighted sum of coherent images at
  defocus offsets δ_i ~ N(0, Δ²) (equally spaced nodes, enough to resolve the band limit).
* Spatial coherence (illumination angle spread, A1.3): the weighted sum over incident beam
  tilts θ ~ N(0, σ_θ²) per axis; each tilt is a full multislice with the tilted propagator
  exp(−2πiΔz k·tanθ), and the objective sees the tilted beam, H(k + θ/λ).
* Detector pixels (A1.1): simulate on a grid ``factor``× finer and average factor×factor blocks.
"""

from __future__ import annotations

import math

import numpy as np

from tembench.backend import fft2, get_array_module, ifft2
from tembench.errors import TembenchError
from tembench.physics.constants import wavelength_A
from tembench.physics.grid import spatial_frequencies
from tembench.physics.multislice import hrtem_exit_wave
from tembench.physics.optics import ctf, normalize_aberrations
from tembench.physics.propagation import DEFAULT_BAND_LIMIT


def gaussian_quadrature(rms: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss–Hermite nodes (offsets, same unit as ``rms``) and weights (Σ = 1) for N(0, rms²)."""
    if n < 1:
        raise TembenchError(f"number of quadrature points must be >= 1; got {n}")
    if rms <= 0 or n == 1:
        return np.zeros(1), np.ones(1)
    x, w = np.polynomial.hermite_e.hermegauss(int(n))
    return x * float(rms), w / w.sum()


def focal_quadrature(focal_spread_A: float, wavelength_A: float, k_max: float, n: int | None = None):
    """Defocus offsets (Å) and weights for a Gaussian focal spread, accurate up to |k| = ``k_max``.

    Gauss–Hermite rules alias badly for the oscillatory exp(−iπλk²δ) at high k (21 nodes put
    ~0.5 spurious transfer where the envelope is 1e-14). Equally spaced nodes over ±4Δ with Gaussian
    weights alias only at a = 2πΔ/h, so n is chosen to keep that 6 rms beyond a_max = πλk_max²Δ.
    """
    if focal_spread_A <= 0:
        return np.zeros(1), np.ones(1)
    if n is None:
        a_max = math.pi * wavelength_A * k_max**2 * focal_spread_A
        n = int(math.ceil(8 * (a_max + 6) / (2 * math.pi))) + 1
        n = min(max(n, 7), 151)
    if int(n) == 1:  # a one-node rule is the in-focus image (linspace(-4, 4, 1) would be -4Δ)
        return np.zeros(1), np.ones(1)
    x = np.linspace(-4.0, 4.0, int(n))
    w = np.exp(-0.5 * x**2)
    return x * float(focal_spread_A), w / w.sum()


def illumination_tilts(rms_mrad: float, n_per_axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Beam tilts (K, 2) (y, x) mrad and weights for a Gaussian angular spread of rms ``rms_mrad`` per axis.

    Product Gauss–Hermite rule; nodes with weight < 1e-4 of the largest are dropped (renormalised).
    """
    t, w = gaussian_quadrature(rms_mrad, n_per_axis)
    ty, tx = np.meshgrid(t, t, indexing="ij")
    ww = np.outer(w, w).ravel()
    keep = ww >= 1e-4 * ww.max()
    tilts = np.stack([ty.ravel(), tx.ravel()], axis=1)[keep]
    ww = ww[keep]
    return tilts, ww / ww.sum()


def bin_image(image, factor: int, xp=None):
    """Average non-overlapping factor×factor blocks of the last two axes (vacuum 1 stays 1)."""
    xp = xp or get_array_module(image)
    f = int(factor)
    if f == 1:
        return image
    ny, nx = image.shape[-2:]
    if ny % f or nx % f:
        raise TembenchError(f"image of {ny}x{nx} pixels cannot be binned by {f}; the grid must be a multiple")
    shape = image.shape[:-2] + (ny // f, f, nx // f, f)
    return image.reshape(shape).mean(axis=(-3, -1))


def partially_coherent_hrtem_images(potentials, slice_thickness_A, *, energy_keV: float, sampling_A,
                                    defocus_values_A, aberrations: dict | None = None,
                                    semiangle_mrad: float | None = None, focal_spread_A: float = 0.0,
                                    n_focal: int | None = None, illumination_rms_mrad: float = 0.0, n_illumination: int = 3,
                                    propagator: str = "fresnel", band_limit: float | None = DEFAULT_BAND_LIMIT,
                                    bandlimit_transmission: bool = True, xp=None):
    """HRTEM defocus series (n_defocus, ny, nx) float32 with defocus and illumination-angle spread."""
    xp = xp or get_array_module(potentials)
    gpts = potentials.shape[-2:]
    lam = wavelength_A(energy_keV)
    ky, kx = spatial_frequencies(gpts, sampling_A, xp=xp, dtype=np.float64)
    base = normalize_aberrations(aberrations)
    from tembench.physics.grid import nyquist_A_inv

    k_max = max(nyquist_A_inv(sampling_A)) * (math.sqrt(2) if band_limit is None else band_limit)
    offsets, wf = focal_quadrature(focal_spread_A, lam, k_max, n_focal)
    tilts, wt = illumination_tilts(illumination_rms_mrad, n_illumination)
    out = xp.zeros((len(defocus_values_A),) + tuple(gpts), dtype=xp.float32)
    for (ty, tx), w_tilt in zip(tilts, wt):
        exit_wave = hrtem_exit_wave(potentials, slice_thickness_A, energy_keV=energy_keV, sampling_A=sampling_A,
                                    propagator=propagator, band_limit=band_limit,
                                    bandlimit_transmission=bandlimit_transmission, tilt_mrad=(ty, tx), xp=xp).exit_wave
        spec = fft2(exit_wave)
        # the objective sees the tilted beam: H evaluated at k + θ/λ
        qy, qx = ky + ty * 1e-3 / lam, kx + tx * 1e-3 / lam
        for j, df in enumerate(defocus_values_A):
            for d, w_f in zip(offsets, wf):
                ab = dict(base)
                ab["C10"] = base.get("C10", 0.0) - float(df) - float(d)
                h = ctf(qy, qx, lam, ab, semiangle_mrad)
                w = ifft2(spec * h)
                out[j] += (w_tilt * w_f) * (w.real**2 + w.imag**2)
    return out


def coherent_envelope_check(focal_spread_A: float, illumination_rms_mrad: float) -> None:
    if focal_spread_A < 0 or illumination_rms_mrad < 0 or not math.isfinite(focal_spread_A + illumination_rms_mrad):
        raise TembenchError("focal_spread_A and illumination_rms_mrad must be >= 0")
