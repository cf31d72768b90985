"""Electron optics: aberration function, apertures, CTF with coherence envelopes, probes.

Sign convention (Krivanek/abTEM, as Kirkland and Friedrich 2023 eqs 1.16-1.17)
-----------------------------------------------------------------------------
With α = λ|k| and φ = atan2(ky, kx),

    χ(k) = 2π/λ Σ_nm C_nm α^(n+1) / (n+1) · cos(m (φ − φ_nm))        (rad)

for the coefficients C10, C12, C21, C23, C30, C32, C34, C41, C43, C45, C50 (Å) and angles
phi12, phi21, ... (rad). The objective (or probe-forming) lens multiplies the wave in Fourier
space by exp(−iχ(k)). The defocus is Δf = −C10, so χ = πλk²(½ C30 λ²k² − Δf) as in Friedrich eq
1.17: Δf > 0 is underfocus (weakened lens), and Scherzer conditions have Δf > 0 with C30 > 0.
``Geometry.defocus_A`` stores Δf.

Aliases accepted in an aberration dict: ``Cs`` → C30, ``C5`` → C50, ``defocus``/``defocus_A``/``df``
→ −C10 (Δf). Any other key is an error.
"""

from __future__ import annotations

import math

import numpy as np

from tembench.backend import ifft2
from tembench.errors import TembenchError
from tembench.physics.constants import wavelength_A as _wavelength_A
from tembench.physics.grid import check_gpts, check_sampling, spatial_frequencies

# (n, m) orders of every supported coefficient; angle key is "phi" + nm (m > 0).
ABERRATION_ORDERS: dict[str, tuple[int, int]] = {
    "C10": (1, 0), "C12": (1, 2),
    "C21": (2, 1), "C23": (2, 3),
    "C30": (3, 0), "C32": (3, 2), "C34": (3, 4),
    "C41": (4, 1), "C43": (4, 3), "C45": (4, 5),
    "C50": (5, 0), "C52": (5, 2), "C54": (5, 4), "C56": (5, 6),
}
ANGLE_KEYS = tuple("phi" + k[1:] for k, (n, m) in ABERRATION_ORDERS.items() if m > 0)
_ALIASES = {"Cs": "C30", "C5": "C50"}
_DEFOCUS_ALIASES = ("defocus", "defocus_A", "df")


def normalize_aberrations(aberrations: dict | None) -> dict[str, float]:
    """Canonical aberration dict (C_nm in Å, phi_nm in rad), aliases resolved, unknown keys rejected."""
    out: dict[str, float] = {}
    if not aberrations:
        return out
    for key, value in dict(aberrations).items():
        if value is None:
            continue
        v = float(value)
        if not math.isfinite(v):
            raise TembenchError(f"aberration {key!r} must be finite, got {value!r}")
        if key in ABERRATION_ORDERS or key in ANGLE_KEYS:
            name = key
        elif key in _ALIASES:
            name = _ALIASES[key]
        elif key in _DEFOCUS_ALIASES:
            name, v = "C10", -v
        else:
            raise TembenchError(
                f"unknown aberration {key!r}; use C10, C12, phi12, C21, phi21, C23, phi23, C30, C32, "
                f"phi32, C34, phi34, C41..C45, C50..C56 (Å, rad) or the aliases Cs, C5, defocus (= −C10)"
            )
        if name in out and name == "C10":
            raise TembenchError("aberrations: give either C10 or a defocus alias, not both")
        out[name] = v
    return out


def defocus_to_C10(defocus_A: float) -> float:
    """C10 for a defocus Δf (Δf = −C10; Δf > 0 underfocus)."""
    return -float(defocus_A)


def aberration_function(ky, kx, wavelength_A: float, aberrations: dict | None):
    """Phase error χ(k) in rad on the frequency grid (ky, kx) in 1/Å; see the module docstring.

    ``ky``/``kx`` broadcast against each other (e.g. (ny, 1) and (1, nx)). Evaluated in float64.
    """
    ab = normalize_aberrations(aberrations)
    xp = _xp_of(ky)
    ky = xp.asarray(ky, dtype=xp.float64)
    kx = xp.asarray(kx, dtype=xp.float64)
    lam = float(wavelength_A)
    alpha2 = (ky**2 + kx**2) * lam**2
    chi = xp.zeros(xp.broadcast_shapes(ky.shape, kx.shape) if hasattr(xp, "broadcast_shapes")
                   else np.broadcast_shapes(ky.shape, kx.shape), dtype=xp.float64)
    phi = None
    for key, (n, m) in ABERRATION_ORDERS.items():
        c = ab.get(key, 0.0)
        if c == 0.0:
            continue
        alpha_pow = alpha2 ** ((n + 1) / 2.0)
        term = c / (n + 1) * alpha_pow
        if m:
            if phi is None:
                phi = xp.arctan2(ky + 0 * kx, kx + 0 * ky)
            term = term * xp.cos(m * (phi - ab.get("phi" + key[1:], 0.0)))
        chi = chi + term
    return chi * (2.0 * math.pi / lam)


def aperture(ky, kx, wavelength_A: float, semiangle_mrad: float | None, edge_mrad: float | None = None):
    """Soft-edged circular aperture (float) of radius ``semiangle_mrad``.

    The edge is a linear ramp of width ``edge_mrad`` centred on the cut-off (default: one
    reciprocal pixel), so the transmitted area matches the hard disc and the edge does not alias.
    ``semiangle_mrad`` None or inf: no aperture (ones).
    """
    xp = _xp_of(ky)
    ky = xp.asarray(ky, dtype=xp.float64)
    kx = xp.asarray(kx, dtype=xp.float64)
    shape = np.broadcast_shapes(ky.shape, kx.shape)
    if semiangle_mrad is None or not math.isfinite(float(semiangle_mrad)):
        return xp.ones(shape, dtype=xp.float32)
    if semiangle_mrad <= 0:
        raise TembenchError(f"semiangle_mrad must be > 0 mrad (or None for no aperture); got {semiangle_mrad}")
    alpha_mrad = xp.sqrt(ky**2 + kx**2) * (wavelength_A * 1e3)
    if edge_mrad is None:
        dk = max(_step(ky), _step(kx))
        edge_mrad = dk * wavelength_A * 1e3
    if edge_mrad <= 0:
        return (alpha_mrad <= semiangle_mrad).astype(xp.float32)
    a = xp.clip((semiangle_mrad - alpha_mrad) / edge_mrad + 0.5, 0.0, 1.0)
    return a.astype(xp.float32)


def temporal_envelope(ky, kx, wavelength_A: float, focal_spread_A: float):
    """E_t = exp(−½ (πλ δ k²)²) for a Gaussian defocus spread of rms δ = ``focal_spread_A`` (Å)."""
    xp = _xp_of(ky)
    k2 = xp.asarray(ky, dtype=xp.float64) ** 2 + xp.asarray(kx, dtype=xp.float64) ** 2
    return xp.exp(-0.5 * (math.pi * wavelength_A * float(focal_spread_A) * k2) ** 2)


def spatial_envelope(ky, kx, wavelength_A: float, aberrations: dict | None, source_angle_rms_mrad: float):
    """E_s = exp(−½ (θ/λ)² |∇_k χ|²) for a Gaussian spread of incidence angles, rms θ per axis (mrad).

    Linear (quasi-coherent) approximation; the gradient of χ is taken by central differences in
    closed form of the radial/azimuthal terms is avoided by evaluating χ at k ± h.
    """
    xp = _xp_of(ky)
    ky = xp.asarray(ky, dtype=xp.float64)
    kx = xp.asarray(kx, dtype=xp.float64)
    h = 1e-4 / wavelength_A * 1e-3  # 0.1 µrad in 1/Å
    gy = (aberration_function(ky + h, kx, wavelength_A, aberrations)
          - aberration_function(ky - h, kx, wavelength_A, aberrations)) / (2 * h)
    gx = (aberration_function(ky, kx + h, wavelength_A, aberrations)
          - aberration_function(ky, kx - h, wavelength_A, aberrations)) / (2 * h)
    q = float(source_angle_rms_mrad) * 1e-3 / wavelength_A
    return xp.exp(-0.5 * q**2 * (gy**2 + gx**2))


def ctf(ky, kx, wavelength_A: float, aberrations: dict | None = None, semiangle_mrad: float | None = None,
        focal_spread_A: float = 0.0, source_angle_rms_mrad: float = 0.0, edge_mrad: float | None = None):
    """Coherent transfer function H(k) = A(k) E_t(k) E_s(k) exp(−iχ(k)) (complex64).

    The envelopes are the linear-imaging (quasi-coherent) approximation; for strong scattering
    simulate partial coherence with :mod:`tembench.physics.coherence` instead.
    """
    xp = _xp_of(ky)
    chi = aberration_function(ky, kx, wavelength_A, aberrations)
    h = xp.exp(-1j * chi)
    if semiangle_mrad is not None:
        h = h * aperture(ky, kx, wavelength_A, semiangle_mrad, edge_mrad)
    if focal_spread_A:
        h = h * temporal_envelope(ky, kx, wavelength_A, focal_spread_A)
    if source_angle_rms_mrad:
        h = h * spatial_envelope(ky, kx, wavelength_A, aberrations, source_angle_rms_mrad)
    return h.astype(xp.complex64)


def fourier_shift_phase(ky, kx, shift_A):
    """exp(−2πi k·s) for a shift s = (sy, sx) in Å; ``shift_A`` may be (..., 2) for a batch.

    Returns shape (..., ny, nx) (complex64): multiplying a spectrum by it moves the image by +s.
    """
    xp = _xp_of(ky)
    s = xp.asarray(shift_A, dtype=xp.float64)
    sy = s[..., 0][..., None, None]
    sx = s[..., 1][..., None, None]
    ey = xp.exp(-2j * math.pi * xp.asarray(ky, dtype=xp.float64) * sy)
    ex = xp.exp(-2j * math.pi * xp.asarray(kx, dtype=xp.float64) * sx)
    return (ey * ex).astype(xp.complex64)


def probe_fourier(gpts, sampling_A, energy_keV: float, semiangle_mrad: float | None,
                  aberrations: dict | None = None, edge_mrad: float | None = None, xp=np):
    """Probe in Fourier space, A(k) exp(−iχ(k)), FFT order, normalised so Σ|ψ(r)|² = 1 (complex64).

    Real space: ψ(r) = ifft2(Ψ) is centred at the origin (pixel 0, wrapping).
    """
    ny, nx = check_gpts(gpts)
    lam = _wavelength_A(energy_keV)
    ky, kx = spatial_frequencies((ny, nx), sampling_A, xp=xp, dtype=np.float64)
    psi = aperture(ky, kx, lam, semiangle_mrad, edge_mrad) * xp.exp(-1j * aberration_function(ky, kx, lam, aberrations))
    # Parseval: Σ|ifft2(Ψ)|² = Σ|Ψ|² / N, so normalise Σ|Ψ|² = N.
    norm = float(xp.sqrt(xp.sum(xp.abs(psi) ** 2) / (ny * nx)))
    if norm == 0:
        raise TembenchError(
            f"the probe aperture ({semiangle_mrad} mrad) passes no Fourier pixel on a {ny}x{nx} grid "
            f"with sampling {sampling_A} Å; enlarge the window (gpts) or the semiangle"
        )
    return (psi / norm).astype(xp.complex64)


def probe(gpts, sampling_A, energy_keV: float, semiangle_mrad: float | None, aberrations: dict | None = None,
          position_A=None, edge_mrad: float | None = None, xp=np):
    """Real-space probe (ny, nx) complex64 with Σ|ψ|² = 1, centred at ``position_A`` (y, x) Å.

    Default position: the window centre (ny//2·sy, nx//2·sx). Raises if the probe's intensity
    is not contained in the window (a probe larger than the window wraps around).
    """
    ny, nx = check_gpts(gpts)
    sy, sx = check_sampling(sampling_A)
    if position_A is None:
        position_A = ((ny // 2) * sy, (nx // 2) * sx)
    psi_k = probe_fourier((ny, nx), (sy, sx), energy_keV, semiangle_mrad, aberrations, edge_mrad, xp=xp)
    ky, kx = spatial_frequencies((ny, nx), (sy, sx), xp=xp, dtype=np.float64)
    psi = ifft2(psi_k * fourier_shift_phase(ky, kx, position_A))
    return psi.astype(xp.complex64)


def scherzer_defocus_A(Cs_A: float, energy_keV: float, kind: str = "probe") -> float:
    """Scherzer defocus Δf (Å, > 0 underfocus, C10 = −Δf) for spherical aberration ``Cs_A``.

    ``kind="probe"``: Δf = sqrt(1.5 Cs λ) (Friedrich 2023 eq 1.18, STEM probe);
    ``kind="hrtem"``: Δf = sqrt(4/3 Cs λ) (Scherzer 1949, widest passband of the phase CTF).
    Negative Cs gives a negative Δf (overfocus) of the same magnitude.
    """
    factor = {"probe": 1.5, "hrtem": 4.0 / 3.0}.get(kind)
    if factor is None:
        raise TembenchError(f"scherzer_defocus_A: kind must be 'probe' or 'hrtem', got {kind!r}")
    lam = _wavelength_A(energy_keV)
    return math.copysign(math.sqrt(factor * abs(float(Cs_A)) * lam), float(Cs_A))


def _xp_of(a):
    from tembench.backend import get_array_module

    return get_array_module(a) if not isinstance(a, (int, float)) else np


def _step(k) -> float:
    """Smallest non-zero frequency spacing along a broadcast axis of a frequency array."""
    flat = np.unique(np.abs(np.asarray(_to_host(k))).ravel())
    flat = flat[flat > 0]
    return float(flat.min()) if flat.size else 0.0


def _to_host(a):
    from tembench.backend import asnumpy

    return asnumpy(a)
