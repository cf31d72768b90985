"""Free-space propagators (Fresnel and exact angular spectrum) with a 2/3 anti-aliasing band limit.

Fresnel (paraxial):       P(k) = exp(−iπλ|k|²Δz)
Angular spectrum (exact): P(k) = exp(i2πΔz (sqrt(1/λ² − |k|²) − 1/λ))   (Ren 2020 eq 2 without the
                          constant phase 2πΔz/λ, which no intensity depends on)

Both are multiplied by the band-limit mask (|k| below ``band_limit`` × the Nyquist frequency of the
coarser axis, as Kirkland 2010 §6.8 and abTEM), which keeps the product t·ψ of two band-limited
functions from aliasing. Each propagator is unitary on the kept frequencies, and its adjoint is
the propagator of −Δz (:func:`propagate` with ``adjoint=True``).
"""

from __future__ import annotations

import math

import numpy as np

from tembench.backend import fft2, ifft2
from tembench.errors import TembenchError
from tembench.physics.grid import check_gpts, check_sampling, spatial_frequencies

PROPAGATORS = ("fresnel", "exact")
DEFAULT_BAND_LIMIT = 2.0 / 3.0
DEFAULT_TAPER = 0.03


def band_limit_mask(gpts, sampling_A, band_limit: float | None = DEFAULT_BAND_LIMIT,
                    taper: float = DEFAULT_TAPER, xp=np):
    """Circular mask (float32, FFT order) keeping |k| < band_limit · 1/(2·max(sampling)).

    ``band_limit`` None or ≥ √2 keeps every frequency. ``taper`` (fraction of the cut-off) gives a
    cosine roll-off inside the cut-off (default 3 %, which is abTEM's 0.01/max(sampling) at 2/3),
    so frequencies that sit on the cut-off circle are damped smoothly rather than kept or cut.
    """
    ny, nx = check_gpts(gpts)
    sy, sx = check_sampling(sampling_A)
    if band_limit is None or band_limit >= math.sqrt(2.0) * max(sy, sx) / min(sy, sx):
        return xp.ones((ny, nx), dtype=xp.float32)
    if band_limit <= 0:
        raise TembenchError(f"band_limit must be a fraction of the Nyquist frequency in (0, 1]; got {band_limit}")
    ky, kx = spatial_frequencies((ny, nx), (sy, sx), xp=np, dtype=np.float64)
    k = np.sqrt(ky**2 + kx**2)
    cutoff = band_limit / (2.0 * max(sy, sx))
    if taper > 0:
        w = taper * cutoff
        mask = np.where(k < cutoff - w, 1.0, 0.5 * (1 + np.cos(np.pi * (k - cutoff + w) / w)))
        mask[k >= cutoff] = 0.0
    else:
        mask = (k < cutoff).astype(np.float64)
    return xp.asarray(mask.astype(np.float32))


def propagator(gpts, sampling_A, wavelength_A: float, dz_A: float, kind: str = "fresnel",
               band_limit: float | None = DEFAULT_BAND_LIMIT, tilt_mrad=(0.0, 0.0), xp=np):
    """Fourier-space propagator over ``dz_A`` (complex64, FFT order), band-limited.

    ``tilt_mrad`` = (ty, tx): beam tilt; adds exp(−2πiΔz(ky·tan ty + kx·tan tx)), i.e. the wave
    drifts laterally by Δz·tan(t) per slice, so an incoherent sum over tilts models illumination
    divergence without off-grid plane waves.
    """
    if kind not in PROPAGATORS:
        raise TembenchError(f"propagator kind must be one of {PROPAGATORS}; got {kind!r}")
    lam = float(wavelength_A)
    ky, kx = spatial_frequencies(gpts, sampling_A, xp=np, dtype=np.float64)
    k2 = ky**2 + kx**2
    mask = band_limit_mask(gpts, sampling_A, band_limit)
    if kind == "fresnel":
        phase = -math.pi * lam * dz_A * k2
    else:
        arg = 1.0 / lam**2 - k2
        # only frequencies the band limit keeps must propagate; beyond it the propagator is 0 anyway
        kept = mask > 0
        if np.any(arg[kept] <= 0):
            k_max = float(np.sqrt(k2[kept].max()))
            raise TembenchError(
                f"sampling_A {sampling_A} with band_limit {band_limit} keeps frequencies up to {k_max:.1f} 1/Å, "
                f"beyond 1/λ = {1 / lam:.1f} 1/Å (evanescent waves); use a coarser sampling or a lower band_limit"
            )
        arg = np.where(kept, arg, 1.0 / lam**2)
        # 2πΔz(sqrt(1/λ² − k²) − 1/λ) written to avoid cancellation at small k
        phase = np.where(kept, -2.0 * math.pi * dz_A * k2 / (np.sqrt(arg) + 1.0 / lam), 0.0)
    ty, tx = (float(t) * 1e-3 for t in tilt_mrad)
    if ty or tx:
        phase = phase - 2.0 * math.pi * dz_A * (ky * math.tan(ty) + kx * math.tan(tx))
    p = np.exp(1j * phase) * mask
    return xp.asarray(p.astype(np.complex64))


class PropagatorCache:
    """Propagators of one grid/energy, computed once per distinct Δz (rounded to 1e-6 Å)."""

    def __init__(self, gpts, sampling_A, wavelength_A: float, kind: str = "fresnel",
                 band_limit: float | None = DEFAULT_BAND_LIMIT, tilt_mrad=(0.0, 0.0), xp=np):
        self.gpts = check_gpts(gpts)
        self.sampling_A = check_sampling(sampling_A)
        self.wavelength_A = float(wavelength_A)
        self.kind = kind
        self.band_limit = band_limit
        self.tilt_mrad = tuple(tilt_mrad)
        self.xp = xp
        self._cache: dict[float, object] = {}

    def __call__(self, dz_A: float):
        key = round(float(dz_A), 6)
        p = self._cache.get(key)
        if p is None:
            p = propagator(self.gpts, self.sampling_A, self.wavelength_A, key, self.kind, self.band_limit,
                           self.tilt_mrad, self.xp)
            self._cache[key] = p
        return p

    def scaled(self, dz_A: float, factor: float):
        """``factor`` × the propagator of ``dz_A`` (e.g. an inverse FFT's 1/N folded in), cached."""
        key = (round(float(dz_A), 6), float(factor))
        p = self._cache.get(key)
        if p is None:
            p = self(dz_A) * self.xp.complex64(factor)
            self._cache[key] = p
        return p

    def kept_columns(self):
        """(left, right): the band limit is zero in every kx column outside the first ``left`` and the
        last ``right`` columns (FFT order), for :class:`tembench.backend.PrunedFFT2Plan`."""
        m = self._cache.get("cols")
        if m is None:
            nz = np.flatnonzero(np.any(np.asarray(self.mask() if self.xp is np else self.mask().get()) != 0, axis=0))
            nx = self.gpts[1]
            left = int(np.sum(nz < (nx + 1) // 2))
            right = int(nz.size - left)
            # the kept set must be exactly [0, left) ∪ [nx − right, nx)
            if not np.array_equal(nz, np.r_[np.arange(left), np.arange(nx - right, nx)]):
                left, right = nx, 0
            m = self._cache["cols"] = (left, right)
        return m

    def mask(self):
        key = "mask"
        m = self._cache.get(key)
        if m is None:
            m = band_limit_mask(self.gpts, self.sampling_A, self.band_limit, xp=self.xp)
            self._cache[key] = m
        return m


def propagate(wave, dz_A: float, sampling_A, wavelength_A: float, kind: str = "fresnel",
              band_limit: float | None = DEFAULT_BAND_LIMIT, adjoint: bool = False, xp=None):
    """Propagate a wave (…, ny, nx) by ``dz_A``; ``adjoint=True`` applies P† (conjugate propagator)."""
    from tembench.backend import get_array_module

    xp = xp or get_array_module(wave)
    p = propagator(wave.shape[-2:], sampling_A, wavelength_A, dz_A, kind, band_limit, xp=xp)
    if adjoint:
        p = p.conj()
    return ifft2(fft2(wave) * p)
