"""An independent 4D-STEM reference for the Pelz 2022 tests: written out here, sharing no code with
the plugin (nor with tembench.physics.optics) beyond numpy.

* Wavelengths are literals (relativistic, λ = 12.2643 / sqrt(V (1 + 0.97848e-6 V)) Å).
* The object is a sum of Gaussian phase 'atoms' (rad) evaluated analytically, in the scan frame.
* The probe is a hard-edged disc |k| ≤ α/λ, aberration-free, normalised to Σ|ψ|² = 1.
* The detector is turned by θ against the scan with the convention of the plugin's docs:
  a vector with detector-frame coordinates v has scan-frame coordinates R(θ) v, R(θ) a
  counter-clockwise rotation in the (x, y) plane (k_scan = R k_det, COM_scan = R COM_det).
  The rotation is exact, not interpolated: the whole experiment is simulated in the detector's
  frame, where the object is φ(R r) and the probe positions are Rᵀ R_scan (placed by a Fourier
  shift), so every pattern lands on the detector pixels directly.
* Pattern = |FFT(ψ·t)|² / N (fraction of the probe's electrons per pixel), fftshifted: the
  unscattered beam at pixel (n//2, n//2); detector pixel = λ / (n s) rad.

The expected phase after each method's transfer is computed analytically too: SSB (least-squares
'mean' normalisation) transfers φ̂(K) flat for 0 < |K| < 2k0; integrated COM transfers
φ̂(K) · OTF(K), the OTF of |P|² for a disc aperture, (2/π)[acos u − u √(1 − u²)], u = |K|/2k0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tembench.types import Geometry, Measurement

LAMBDA_A = {80.0: 0.041757161, 200.0: 0.025079340, 300.0: 0.019687489}


def rot(theta_deg: float) -> np.ndarray:
    """R(θ) on (y, x) vectors: counter-clockwise by θ in the (x, y) plane, written out."""
    t = math.radians(theta_deg)
    # x' = x cos t − y sin t,  y' = x sin t + y cos t
    return np.array([[math.cos(t), math.sin(t)], [-math.sin(t), math.cos(t)]])


@dataclass
class Atoms:
    centres_A: np.ndarray   # (n, 2) (y, x) in the scan frame, Å, about the scan centre
    sigma_A: float
    peak_rad: float

    def phase(self, yx: np.ndarray) -> np.ndarray:
        """φ at points yx (..., 2) in the scan frame (Å, relative to the scan centre)."""
        out = np.zeros(yx.shape[:-1])
        for c in self.centres_A:
            d2 = ((yx - c) ** 2).sum(-1)
            out += np.exp(-d2 / (2 * self.sigma_A ** 2))
        return self.peak_rad * out

    def spectrum(self, Ky: np.ndarray, Kx: np.ndarray, scan_centre_A) -> np.ndarray:
        """Continuous Fourier transform of φ for positions measured from the first scan point (Å²·rad)."""
        amp = self.peak_rad * 2 * math.pi * self.sigma_A ** 2 * np.exp(-2 * math.pi ** 2 * self.sigma_A ** 2 * (Ky ** 2 + Kx ** 2))
        out = np.zeros(np.broadcast(Ky, Kx).shape, complex)
        for c in self.centres_A:
            cy, cx = c[0] + scan_centre_A[0], c[1] + scan_centre_A[1]
            out += np.exp(-2j * math.pi * (Ky * cy + Kx * cx))
        return amp * out


def random_atoms(seed: int, n: int = 10, radius_A: float = 3.5, sigma_A: float = 0.45, peak_rad: float = 0.05) -> Atoms:
    rng = np.random.default_rng(seed)
    r = radius_A * np.sqrt(rng.uniform(0, 1, n))
    a = rng.uniform(0, 2 * math.pi, n)
    return Atoms(np.stack([r * np.sin(a), r * np.cos(a)], 1), sigma_A, peak_rad)


@dataclass
class Reference4D:
    measurement: Measurement
    truth: np.ndarray          # φ at the scan positions (scan_y, scan_x), rad
    atoms: Atoms
    k0_A_inv: float            # α/λ
    step_A: tuple[float, float]
    scan_centre_A: tuple[float, float]


def simulate(atoms: Atoms, energy_keV: float, semiangle_mrad: float, scan_shape, step_A, rotation_deg: float = 0.0,
             n=128, sampling_A: float = 0.2, defocus_A: float = 0.0) -> Reference4D:
    """4D-STEM of ``atoms`` on a (scan_y, scan_x) grid of steps ``step_A`` (y, x), detector turned by θ.

    ``n`` (int or (ny, nx)) is the detector (= simulation cell) size: ny ≠ nx gives non-square
    detector pixels in mrad. ``defocus_A`` = Δf (C10 = −Δf): χ(k) = −πλΔf k², rotationally symmetric.
    """
    lam = LAMBDA_A[energy_keV]
    k0 = semiangle_mrad * 1e-3 / lam
    R = rot(rotation_deg)
    ny, nx = (n, n) if np.ndim(n) == 0 else (int(n[0]), int(n[1]))
    # detector-frame simulation grid: coordinates (i − n/2)·s, centred on the scan centre
    cy = (np.arange(ny) - ny // 2) * sampling_A
    cx = (np.arange(nx) - nx // 2) * sampling_A
    rd = np.stack(np.meshgrid(cy, cx, indexing="ij"), -1)           # (ny, nx, 2) detector frame
    rs = rd @ R.T                                                    # scan frame: r_s = R r_d
    t = np.exp(1j * atoms.phase(rs))
    ky = np.fft.fftfreq(ny, d=sampling_A)[:, None]
    kx = np.fft.fftfreq(nx, d=sampling_A)[None, :]
    k2 = ky ** 2 + kx ** 2
    aperture = (k2 <= k0 ** 2) * np.exp(-1j * (-math.pi * lam * defocus_A * k2))
    aperture /= math.sqrt((np.abs(aperture) ** 2).sum() / (ny * nx))   # Σ|ψ|² = 1
    sy, sx = scan_shape
    centre = ((sy - 1) / 2 * step_A[0], (sx - 1) / 2 * step_A[1])
    pos = np.stack(np.meshgrid(np.arange(sy) * step_A[0], np.arange(sx) * step_A[1], indexing="ij"), -1)
    pos_c = pos - np.array(centre)                                   # scan frame, about the centre
    pos_d = pos_c @ R                                                # detector frame: Rᵀ r_s
    out = np.empty((sy, sx, ny, nx), np.float32)
    origin = np.array([(ny // 2) * sampling_A, (nx // 2) * sampling_A])  # grid coordinate 0 sits at pixel n//2
    for iy in range(sy):
        shift = pos_d[iy] + origin                                   # (sx, 2)
        ph = np.exp(-2j * math.pi * (ky[None] * shift[:, 0, None, None] + kx[None] * shift[:, 1, None, None]))
        psi = np.fft.ifft2(aperture[None] * ph)
        far = np.fft.fft2(psi * t[None])
        out[iy] = np.fft.fftshift(np.abs(far) ** 2 / (ny * nx), axes=(-2, -1))
    det_mrad = (lam / (ny * sampling_A) * 1e3, lam / (nx * sampling_A) * 1e3)
    geo = Geometry(energy_keV=energy_keV, semiangle_mrad=semiangle_mrad, aberrations_A={"C10": -float(defocus_A)},
                   defocus_A=[float(defocus_A)], scan_step_A=(float(step_A[0]), float(step_A[1])),
                   scan_positions_A=pos.reshape(-1, 2), detector_sampling_mrad=det_mrad,
                   sampling_A=(sampling_A, sampling_A))
    m = Measurement(kind="4dstem", data=out, axes=("scan_y", "scan_x", "k_y", "k_x"), geometry=geo)
    return Reference4D(m, atoms.phase(pos_c), atoms, k0, (float(step_A[0]), float(step_A[1])), centre)


def scan_frequencies(shape, step_A):
    Ky = np.fft.fftfreq(shape[0], d=step_A[0])[:, None]
    Kx = np.fft.fftfreq(shape[1], d=step_A[1])[None, :]
    return Ky, Kx


def disc_otf(K: np.ndarray, k0: float) -> np.ndarray:
    """OTF of |P|² for a disc aperture of radius k0 (normalised overlap of two discs)."""
    u = np.clip(K / (2 * k0), 0, 1)
    return (2 / math.pi) * (np.arccos(u) - u * np.sqrt(1 - u * u))


def expected(ref: Reference4D, transfer: str) -> np.ndarray:
    """The truth as the method should see it, on the scan grid (mean removed): 'flat' or 'com'."""
    truth = ref.truth - ref.truth.mean()
    if transfer == "flat":
        return truth
    Ky, Kx = scan_frequencies(truth.shape, ref.step_A)
    K = np.hypot(Ky, Kx)
    return np.real(np.fft.ifft2(np.fft.fft2(truth) * disc_otf(K, ref.k0_A_inv)))


def lowpass(img: np.ndarray, step_A, k_cut: float) -> np.ndarray:
    Ky, Kx = scan_frequencies(img.shape, step_A)
    w = (np.hypot(Ky, Kx) < k_cut).astype(float)
    w[0, 0] = 0.0
    return np.real(np.fft.ifft2(np.fft.fft2(img) * w))


def fitted_scale(rec: np.ndarray, want: np.ndarray, step_A, k_cut: float) -> tuple[float, float]:
    """(least-squares slope of rec on want, NCC) after both are low-passed to |K| < k_cut."""
    a = lowpass(np.asarray(rec, float), step_A, k_cut)
    b = lowpass(want, step_A, k_cut)
    slope = float((a * b).sum() / (b * b).sum())
    ncc = float((a * b).sum() / math.sqrt((a * a).sum() * (b * b).sum()))
    return slope, ncc
