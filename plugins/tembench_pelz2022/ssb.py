"""Single-sideband (SSB) ptychography (Pelz 2022 eqs 1–3; Rodenburg et al. 1993; Pennycook et al. 2015).

Conventions (numpy FFTs, probe A(k) = aperture · exp(−iχ(k)) as ``tembench.physics.optics``):
for a weak phase object T = 1 + iφ and the scan transform G(k, K) = Σ_R I(k, R) e^{−2πiK·R},

    G(k, K) = |A(k)|² δ_K + iΦ(K) [A*(k) A(k−K) − A(k) A*(k+K)].

In the lune D−(K) = {|k| < k0, |k−K| < k0, |k+K| ≥ k0} only the first term lives, in D+(K)
(the mirror lune) only the second, so with the data normalised to |A|² = 1 in the bright field

    Φ(K) = [Σ_{D−} G · (−i) e^{−i(χ(k)−χ(k−K))} + Σ_{D+} G · i e^{i(χ(k)−χ(k+K))}] / (N− + N+),

the least-squares estimate from both sidebands (eq 3). Because the data are real, G(k, −K) =
G*(k, K): only the half plane of K (``rfft2``) is computed and φ = irfft2(Φ). Aberrations enter
only this reduction ("virtual focus"): for the quadratic part χ_q(k) = kᵀQk (defocus, 2-fold
astigmatism) χ_q(k) − χ_q(k∓K) = ±2kᵀQK − KᵀQK separates into per-axis phase factors, so a new
defocus costs one pass over G (see :mod:`tembench_pelz2022.interactive`); higher-order parts
(Cs, coma, …) are folded into G once.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import Field

from tembench import Params, Reconstructor
from tembench._lazy import lazy_import
from tembench.backend import fft_workers
from tembench.eer import ElectronEvents
from tembench.errors import TembenchError
from tembench.physics import optics
from tembench_pelz2022.common import (ACCEPTS, check_disc_calibration, ProbeOptics, load_4d, phase_image, probe_optics, rotation_matrix,
                                      scan_step)
from tembench_pelz2022.eer_ops import DetectorGrid, bright_field_crop_bin

scipy = lazy_import("scipy")  # scipy.fft is imported on first transform (fast start-up)

# numba kernels compile on first use; importing them lazily keeps `tembench list` fast
_kernels = lazy_import("tembench_pelz2022._kernels")

QUADRATIC_KEYS = ("C10", "C12", "phi12")


def split_aberrations(ab: dict) -> tuple[dict, dict]:
    """(quadratic part C10/C12/phi12, the rest) of a canonical aberration dict."""
    quad = {k: v for k, v in ab.items() if k in QUADRATIC_KEYS}
    rest = {k: v for k, v in ab.items() if k not in QUADRATIC_KEYS and (k.startswith("C") and v != 0)}
    for k, v in ab.items():  # keep the angles of the non-quadratic terms that are present
        if k.startswith("phi") and k != "phi12" and ("C" + k[3:]) in rest:
            rest[k] = v
    return quad, rest


def quadratic_matrix(quad: dict, wavelength_A: float) -> np.ndarray:
    """Q (2×2, (y, x) order, rad·Å²) with χ_q(k) = kᵀQk for C10, C12, phi12 (optics sign convention)."""
    c10 = float(quad.get("C10", 0.0))
    c12 = float(quad.get("C12", 0.0))
    p = float(quad.get("phi12", 0.0))
    f = math.pi * wavelength_A
    c2, s2 = math.cos(2 * p), math.sin(2 * p)
    # χ = πλ[C10 (kx²+ky²) + C12 ((kx²−ky²) cos 2φ12 + 2 kx ky sin 2φ12)]
    return f * np.array([[c10 - c12 * c2, c12 * s2], [c12 * s2, c10 + c12 * c2]], dtype=np.float64)


class SSBData:
    """G(k, K) of one dataset with its grids: computed once, reduced for any aberrations.

    ``data``: dense (scan_y, scan_x, ny, nx) on ``grid`` (already cropped/binned). ``G`` is
    stored K-major (n_Ky, n_Kx//2+1, ny·nx) complex64, normalised so the bright-field pixels
    have mean 1.
    """

    def __init__(self, data: np.ndarray, grid: DetectorGrid, optics_: ProbeOptics, step_A: tuple[float, float],
                 rotation_deg: float = 0.0):
        data = np.asarray(data)
        if data.ndim != 4:
            raise TembenchError(f"SSB needs dense data (scan_y, scan_x, ny, nx), got shape {data.shape}")
        self.scan_shape = data.shape[:2]
        self.grid = grid
        self.optics = optics_
        self.step_A = step_A
        self.rotation_deg = float(rotation_deg)
        lam = optics_.wavelength_A
        ay, ax = grid.axes_mrad()
        # detector axes in 1/Å (uniform)
        self.ky = ay * 1e-3 / lam
        self.kx = ax * 1e-3 / lam
        k0 = optics_.k0_A_inv
        r = np.sqrt(self.ky[:, None] ** 2 + self.kx[None, :] ** 2)
        bf = r < 0.9 * k0
        if not bf.any():
            raise TembenchError("SSB: no detector pixel lies inside the bright-field disc; check "
                                "detector_sampling_mrad and semiangle_mrad")
        if data.shape[0] < 4 or data.shape[1] < 4:
            raise TembenchError(f"SSB needs at least a 4x4 scan (a 2x2 scan has no trotter frequencies "
                                f"and returns zeros), got {data.shape[:2]}")
        mean_bf = float(data[:, :, bf].mean(dtype=np.float64))
        if not mean_bf > 0:
            raise TembenchError("SSB: the bright-field disc holds no signal (mean ≤ 0)")
        self.mean_bf = mean_bf
        flat = data.reshape(*data.shape[:2], -1)
        G = scipy.fft.rfft2(flat if flat.dtype == np.float32 else flat.astype(np.float32), axes=(0, 1),
                            workers=fft_workers())
        G *= np.float32(1.0 / mean_bf)
        self.G = G
        n1, n2 = G.shape[:2]
        Ky = np.fft.fftfreq(self.scan_shape[0], d=step_A[0])
        Kx = np.fft.rfftfreq(self.scan_shape[1], d=step_A[1])
        KYs, KXs = np.meshgrid(Ky, Kx, indexing="ij")
        # K in the detector frame: the detector is rotated by θ relative to the scan (k_scan = R k_det)
        R = rotation_matrix(self.rotation_deg)
        self.R = R
        self.KY = R[0, 0] * KYs + R[1, 0] * KXs
        self.KX = R[0, 1] * KYs + R[1, 1] * KXs
        self.folded: dict = {}

    # --- aberrations -----------------------------------------------------------------------------
    def _chi_terms(self, ab: dict, a: int, b: int):
        """χ at k, k−K and k+K (scan frame) for K rows a:b: shapes (1, 1, nk), (c, n2, nk) ×2."""
        lam = self.optics.wavelength_A
        ky = np.repeat(self.ky, len(self.kx))
        kx = np.tile(self.kx, len(self.ky))
        R = self.R
        # detector → scan frame
        ksy, ksx = R[0, 0] * ky + R[0, 1] * kx, R[1, 0] * ky + R[1, 1] * kx
        KYd, KXd = self.KY[a:b, :, None], self.KX[a:b, :, None]
        Ksy, Ksx = R[0, 0] * KYd + R[0, 1] * KXd, R[1, 0] * KYd + R[1, 1] * KXd
        chi_k = optics.aberration_function(ksy[None, None], ksx[None, None], lam, ab)
        chi_m = optics.aberration_function(ksy - Ksy, ksx - Ksx, lam, ab)
        chi_p = optics.aberration_function(ksy + Ksy, ksx + Ksx, lam, ab)
        return chi_k, chi_m, chi_p

    def _masks(self, a: int, b: int):
        ky = np.repeat(self.ky, len(self.kx))
        kx = np.tile(self.kx, len(self.ky))
        k02 = self.optics.k0_A_inv ** 2
        kk = ky * ky + kx * kx
        KYd, KXd = self.KY[a:b, :, None], self.KX[a:b, :, None]
        KK = KYd ** 2 + KXd ** 2
        dot = KYd * ky + KXd * kx
        inside = kk < k02
        dm = kk + KK - 2 * dot < k02
        dp = kk + KK + 2 * dot < k02
        return inside & dm & ~dp, inside & dp & ~dm

    def _fold(self, ab: dict, sign: float, chunk: int = 16) -> None:
        """Multiply G by the higher-order aberration phases of both lunes (sign −1 undoes it)."""
        for a in range(0, self.G.shape[0], chunk):
            b = min(a + chunk, self.G.shape[0])
            mm, mp = self._masks(a, b)
            chi_k, chi_m, chi_p = self._chi_terms(ab, a, b)
            ph = np.where(mm, -(chi_k - chi_m), 0.0) + np.where(mp, chi_k - chi_p, 0.0)
            self.G[a:b] *= np.exp(1j * sign * ph).astype(np.complex64)

    def set_fixed_aberrations(self, ab: dict) -> None:
        """Fold the non-quadratic aberrations of ``ab`` into G (undoing any earlier fold)."""
        _, rest = split_aberrations(optics.normalize_aberrations(ab))
        if rest == self.folded:
            return
        if self.folded:
            self._fold(self.folded, -1.0)
        if rest:
            self._fold(rest, +1.0)
        self.folded = dict(rest)

    # --- reduction --------------------------------------------------------------------------------
    def spectrum(self, aberrations: dict | None = None, numba: bool | None = None,
                 normalization: str = "mean") -> np.ndarray:
        """Φ(K) on the rfft half plane (complex128) for the given (full) aberrations.

        ``normalization="mean"``: least squares over the lunes, flat transfer for 0 < |K| < 2k0
        (quantitative radians, noisier at high |K|); ``"sum"``: eq 3 as written, the sum over the
        lunes, i.e. the SSB phase-contrast transfer ∝ N(K) (scaled by 1/max N): less noise, as
        py4DSTEM's SSB.
        """
        ab = optics.normalize_aberrations(self.optics.aberrations if aberrations is None else aberrations)
        quad, rest = split_aberrations(ab)
        if rest != self.folded:
            self.set_fixed_aberrations(ab)
        Q = quadratic_matrix(quad, self.optics.wavelength_A)
        Qd = self.R.T @ Q @ self.R  # χ_q in detector-frame coordinates
        ny, nx = len(self.ky), len(self.kx)
        dky = self.ky[1] - self.ky[0] if ny > 1 else 1.0
        dkx = self.kx[1] - self.kx[0] if nx > 1 else 1.0
        G = self.G.reshape(self.G.shape[0], self.G.shape[1], ny * nx)
        phi, count = _kernels.ssb_reduce(G, self.ky[0], dky, ny, self.kx[0], dkx, nx, self.KY, self.KX,
                                         self.optics.k0_A_inv, Qd, numba=numba)
        if normalization == "sum":
            phi *= count / max(int(count.max()), 1)
        elif normalization != "mean":
            raise TembenchError(f"ssb: normalization must be 'mean' or 'sum', got {normalization!r}")
        phi[0, 0] = 0.0
        return phi

    def phase(self, aberrations: dict | None = None, numba: bool | None = None,
              normalization: str = "mean") -> np.ndarray:
        """Phase image (scan_y, scan_x) in rad, float32 (see :meth:`spectrum`)."""
        return scipy.fft.irfft2(self.spectrum(aberrations, numba, normalization), s=self.scan_shape,
                                workers=fft_workers()).astype(np.float32)

    def reference_spectrum(self, aberrations: dict | None = None, chunk: int = 16) -> np.ndarray:
        """Direct evaluation of eq 3 with the full χ (slow, for tests); valid when nothing is folded."""
        if self.folded:
            raise TembenchError("reference_spectrum needs an unfolded G")
        ab = optics.normalize_aberrations(self.optics.aberrations if aberrations is None else aberrations)
        n1, n2 = self.G.shape[:2]
        G = self.G.reshape(n1, n2, -1)
        out = np.zeros((n1, n2), dtype=np.complex128)
        for a in range(0, n1, chunk):
            b = min(a + chunk, n1)
            mm, mp = self._masks(a, b)
            chi_k, chi_m, chi_p = self._chi_terms(ab, a, b)
            w = np.where(mm, -1j * np.exp(-1j * (chi_k - chi_m)), 0) + np.where(mp, 1j * np.exp(1j * (chi_k - chi_p)), 0)
            n = mm.sum(-1) + mp.sum(-1)
            out[a:b] = np.where(n > 0, (G[a:b] * w).sum(-1) / np.maximum(n, 1), 0)
        out[0, 0] = 0
        return out


def prepare(x, grid: DetectorGrid, optics_: ProbeOptics, step_A, max_detector_px: int = 32,
            bin_factor: int | None = None, crop_margin: float = 1.1, rotation_deg: float = 0.0) -> SSBData:
    """Crop to the bright-field disc and bin (in O(C) for events), densify that subset, and transform."""
    small, g, _ = bright_field_crop_bin(x, grid, optics_.semiangle_mrad, max_pixels=max_detector_px,
                                        margin=crop_margin, bin_factor=bin_factor)
    dense = small.to_dense(np.float32) if isinstance(small, ElectronEvents) else np.asarray(small, dtype=np.float32)
    return SSBData(dense, g, optics_, step_A, rotation_deg)


class SSB(Reconstructor):
    """Single-sideband ptychography (Pelz 2022 eq 3) from dense 4D-STEM or electron events.

    The detector is cropped to the bright-field disc and binned to ≤ ``max_detector_px`` per side
    (directly on the events for ``eer``), G(k, K) is one batched real FFT over the scan, and the
    reduction over both double-overlap lunes divides out A(k)A*(k−K) with the probe's aberrations
    (geometry, or ``defocus_A`` / ``aberrations_A`` here for a virtual refocus). Output: phase
    (rad) on the scan grid.
    """

    name = "ssb"
    accepts = ACCEPTS
    produces = "image"
    version = "1"

    class Params(Params):
        max_detector_px: int = Field(32, ge=4, le=256, description="bin the cropped detector to at most this many pixels per side")
        bin_factor: int | None = Field(None, ge=1, description="detector bin factor (default: from max_detector_px)")
        crop_margin: float = Field(1.1, ge=1.0, le=3.0, description="crop window half-width in units of the semiangle")
        rotation_deg: float | None = Field(0.0, ge=-360, le=360, description="detector rotation relative to the scan (deg); None = estimate from the COM field as DPC does (min curl, positive-skew branch)")
        defocus_A: float | None = Field(None, description="reconstruct at this defocus Δf (Å) instead of the recorded one")
        aberrations_A: dict[str, float] | None = Field(None, description="probe aberrations to correct (Å/rad); default: the geometry's")
        correct_aberrations: bool = Field(True, description="False: assume an aberration-free probe")
        normalization: Literal["mean", "sum"] = Field("mean", description="sum: eq 3 as written (transfer ∝ lune area, "
                                                      "less noise); mean: least squares, flat transfer (quantitative)")
        numba: bool | None = Field(None, description="use the numba kernel (default: when installed)")

    def reconstruct(self, measurement, params, xp):
        x, grid = load_4d(measurement, self.name)
        g = measurement.geometry
        opt = probe_optics(g, self.name, params.aberrations_A, params.defocus_A)
        if not params.correct_aberrations:
            opt = ProbeOptics(opt.energy_keV, opt.wavelength_A, opt.semiangle_mrad, {})
        check_disc_calibration(x, grid, opt.semiangle_mrad, self.name)
        rot = params.rotation_deg
        if rot is None:
            from tembench_pelz2022 import dpc
            gy, gx = dpc.gradient_field(x, grid, opt.wavelength_A)
            rot = dpc.resolve_rotation(gy, gx, scan_step(g, self.name), None)[0]
        data = prepare(x, grid, opt, scan_step(g, self.name), params.max_detector_px, params.bin_factor,
                       params.crop_margin, rot)
        phase = data.phase(numba=params.numba, normalization=params.normalization)
        return phase_image(phase, g, self.name, detector_shape_used=data.grid.shape, rotation_deg=float(rot),
                           aberrations_corrected=dict(opt.aberrations))
