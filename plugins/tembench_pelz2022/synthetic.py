"""Synthetic 4D-STEM of a thin phase object with a known phase (for tests, benchmarks and the docs).

Ψ(r; R) = P(r − R) · exp(iφ(r)) on a periodic cell, pattern = |FFT Ψ|² / N (fraction of the
probe's electrons per pixel), fftshifted so the unscattered beam sits at (n//2, n//2). The
probe is ``tembench.physics.optics.probe`` and every probe position is an exact whole-pixel
roll of it, so the data obey the 4D-STEM contract of the forward models exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tembench._lazy import lazy_import
from tembench.backend import fft_workers
from tembench.physics import constants, optics
from tembench.types import Geometry, Measurement

scipy = lazy_import("scipy")  # scipy.fft is imported on first transform (fast start-up)


def gaussian_atoms_phase(shape, sampling_A: float, n_atoms: int, sigma_A: float, peak_rad: float,
                         rng: np.random.Generator) -> np.ndarray:
    """A periodic phase map (rad) of Gaussian 'atoms' at random positions (float64)."""
    ny, nx = shape
    y = np.arange(ny) * sampling_A
    x = np.arange(nx) * sampling_A
    ly, lx = ny * sampling_A, nx * sampling_A
    phi = np.zeros(shape)
    for _ in range(n_atoms):
        cy, cx = rng.uniform(0, ly), rng.uniform(0, lx)
        dy = (y - cy + ly / 2) % ly - ly / 2
        dx = (x - cx + lx / 2) % lx - lx / 2
        phi += np.exp(-(dy[:, None] ** 2 + dx[None, :] ** 2) / (2 * sigma_A ** 2))
    return phi * peak_rad


@dataclass
class Synthetic4D:
    measurement: Measurement
    phase_rad: np.ndarray        # the object's phase on the object grid
    step_px: int                 # scan step in object pixels


def simulate(phase_rad: np.ndarray, sampling_A: float, step_px: int, energy_keV: float = 200.0,
             semiangle_mrad: float = 25.0, aberrations: dict | None = None, batch: int = 256,
             rotation_deg: float = 0.0) -> Synthetic4D:
    """4D-STEM of ``phase_rad`` (periodic, (ny, nx) at ``sampling_A``) scanned every ``step_px`` pixels.

    ``rotation_deg`` = θ rotates every pattern by −θ about the beam centre (cubic interpolation),
    i.e. a detector turned against the scan so that COM_scan = R(θ) COM_det.
    """
    ny, nx = phase_rad.shape
    ab = optics.normalize_aberrations(aberrations)
    psi = optics.probe((ny, nx), sampling_A, energy_keV, semiangle_mrad, ab, position_A=(0.0, 0.0))
    t = np.exp(1j * phase_rad).astype(np.complex64)
    sy, sx = ny // step_px, nx // step_px
    out = np.empty((sy, sx, ny, nx), dtype=np.float32)
    pos = [(iy * step_px, ix * step_px) for iy in range(sy) for ix in range(sx)]
    for start in range(0, len(pos), batch):
        chunk = pos[start:start + batch]
        waves = np.stack([np.roll(psi, p, axis=(0, 1)) for p in chunk]) * t
        pats = np.abs(scipy.fft.fft2(waves, workers=fft_workers())) ** 2 / (ny * nx)
        pats = np.fft.fftshift(pats, axes=(-2, -1))
        if rotation_deg:
            pats = _rotate_patterns(pats, rotation_deg)
        for (iy, ix), p in zip(chunk, pats):
            out[iy // step_px, ix // step_px] = p
    lam = constants.wavelength_A(energy_keV)
    det_mrad = (lam / (ny * sampling_A) * 1e3, lam / (nx * sampling_A) * 1e3)
    step = (step_px * sampling_A, step_px * sampling_A)
    positions = np.array([(iy * step[0], ix * step[1]) for iy in range(sy) for ix in range(sx)])
    defocus = -ab.get("C10", 0.0)
    geo = Geometry(energy_keV=energy_keV, semiangle_mrad=semiangle_mrad, aberrations_A=dict(ab),
                   defocus_A=[defocus], scan_step_A=step, scan_positions_A=positions,
                   detector_sampling_mrad=det_mrad, sampling_A=(sampling_A, sampling_A))
    m = Measurement(kind="4dstem", data=out, axes=("scan_y", "scan_x", "k_y", "k_x"), geometry=geo)
    return Synthetic4D(m, phase_rad, step_px)


def _rotate_patterns(pats: np.ndarray, rotation_deg: float) -> np.ndarray:
    """Rotate (n, ny, nx) patterns by −θ (counter-clockwise in (x, y)) about pixel (ny//2, nx//2)."""
    from scipy.ndimage import affine_transform

    ny, nx = pats.shape[-2:]
    c = np.array([ny // 2, nx // 2], float)
    t = np.radians(rotation_deg)
    # output (y, x) samples the input at R(θ)·(out − c) + c, with R acting on (y, x) vectors
    m = np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]])
    out = np.empty_like(pats)
    for i, p in enumerate(pats):
        out[i] = affine_transform(p, m, offset=c - m @ c, order=3, mode="constant")
    return out


def probe_intensity_blur(phase_rad: np.ndarray, sampling_A: float, energy_keV: float, semiangle_mrad: float,
                         aberrations: dict | None = None) -> np.ndarray:
    """|P|² ⋆ φ: what centre-of-mass integration recovers (Friedrich eq 3.2, periodic)."""
    psi = optics.probe(phase_rad.shape, sampling_A, energy_keV, semiangle_mrad, aberrations, position_A=(0.0, 0.0))
    p2 = np.abs(psi) ** 2
    return np.real(np.fft.ifft2(np.fft.fft2(phase_rad) * np.conj(np.fft.fft2(p2))))
