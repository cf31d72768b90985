"""Centre-of-mass DPC (Pelz 2022 §V, eq 4): COM images, scan/detector rotation, Fourier integration.

Physics (phase object, numpy FFT convention): the centre of mass of a pattern, as a spatial
frequency, is ⟨k⟩(R) = (1/2π) ∫ |P(r − R)|² ∇φ(r) dr, so g = 2π⟨k⟩ (rad/Å) = ∇(|P|² ⋆ φ)(R)
(Friedrich 2023 eq 3.2) and integrating g gives the phase blurred by the probe intensity.
⟨k⟩ (1/Å) = COM (mrad) · 10⁻³ / λ.

- iCOM (direct Fourier integration): φ̂(q) = −i q·ĝ(q) / |q|², q = 2πK (rad/Å).
- Iterative (the update after eq 4): φ ← φ + μ F⁻¹[−i q·F{M ⊙ (g − ∇φ)} / (λ1 + |q|² + λ2 |q|⁴)],
  on a grid padded by ``padding_factor`` with M the measured region, so non-periodic data are
  integrated without wrap-around. λ1 (1/Å²) slows the lowest, λ2 (Å²) the highest frequencies;
  with the iteration count they act as high- and low-pass filters (Pelz 2022, [28]).
- Rotation: COM_scan = R(θ) COM_det. The curl of the rotated field is cos θ · curl g + sin θ · div g,
  so the θ minimising the solenoidal (curl) energy Σ|ĉurl|²/q² is the smallest eigenvector of
  [[Σ|ĉ|²/q², Σĉd̂*/q²], [·, Σ|d̂|²/q²]] (ĉ, d̂ the curl and divergence spectra) — exact, no search.
  The 1/q² weight (the Helmholtz energies rather than Σcurl²) keeps white noise, which the
  derivatives amplify at high q, from swamping the low-pass signal. The remaining 180° ambiguity is resolved by the sign that makes the
  image positively correlated with the dark-field image (the counts beyond 1.2 α in every pattern,
  taken in the same pass as the COM): atoms advance the phase and scatter electrons out of the bright-field
  disc. The statistic is linear in the phase and the dark-field noise is independent of the COM noise, so
  it stays decisive at low dose (10 e/pattern on MoS2: correlation 0.09–0.17, 5–9σ) where the old
  criterion — positive skew of the integrated phase, a cubic statistic that the integrated (1/q) noise
  swamps — took the wrong branch in 2 of 8 noise draws. Without a usable dark-field signal (no detector
  pixels beyond 1.2 α, or a correlation under ``BRANCH_MIN_SIGMAS`` standard deviations) the skew decides.
- Transpose: a detector read out transposed relative to the scan swaps (k_y, k_x). Then
  COM_scan = R(θ) T COM_det with T the swap, a reflection: no rotation makes T·∇φ curl-free, so the
  orientation (T or not) whose best rotation leaves the smaller fraction of curl energy,
  λ_min / (Σcurl² + Σdiv²), is the right one (py4DSTEM 0.14 compares the minimum curl of both too).
- Dense data are read a bounded number of scan rows at a time (``common.scan_row_chunks``; a
  memory-mapped data set is read with pread, so its pages never count in the process's RAM), with
  bad detector pixels (``common.find_bad_pixels``) repaired frame by frame before the COM.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import Field

from tembench import Params, Reconstructor
from tembench._lazy import lazy_import
from tembench.backend import fft_workers
from tembench.errors import TembenchError
from tembench_pelz2022.common import (ACCEPTS, CHUNK_BYTES, BadPixels, clean_row_chunks, dense_pass, load_4d,
                                      phase_image, probe_optics, rotation_matrix, scan_step)
from tembench_pelz2022.eer_ops import center_of_mass

scipy = lazy_import("scipy")  # scipy.fft is imported on first transform (fast start-up)


def _freqs(shape, step_A):
    qy = 2 * np.pi * np.fft.fftfreq(shape[0], d=step_A[0])[:, None]
    qx = 2 * np.pi * np.fft.fftfreq(shape[1], d=step_A[1])[None, :]
    return qy, qx


def _block_moments(block, numba: bool | None = None, weight=None, acc=None):
    """(frames, 4) Σ I·iy, Σ I·ix, Σ I, Σ I·weight of a (rows, scan_x, k_y, k_x) block; with ``acc`` = (first
    frame, float64 total, int64 changes) the bad-pixel statistics in the same read (``_kernels.dense_pass``)."""
    d3 = block.reshape(-1, *block.shape[2:])
    if d3.dtype not in (np.float32, np.float64):
        d3 = d3.astype(np.float64)
    from tembench_pelz2022 import _kernels  # numba: loaded when a reconstruction runs, not at plugin import

    return _kernels.dense_pass(d3, weight, acc, numba=numba)


#: the dark-field image of the 180° branch choice counts the electrons beyond this many semiangles
DARK_FIELD_FACTOR = 1.2


def dark_field_mask(grid, semiangle_mrad: float | None, factor: float = DARK_FIELD_FACTOR):
    """(k_y, k_x) bool: detector pixels beyond ``factor`` × the bright-field semiangle, or None when there are
    none (the disc fills the detector) or the semiangle is unknown."""
    if semiangle_mrad is None:
        return None
    ny, nx = grid.shape
    ky = (np.arange(ny) - grid.centre_px[0]) * grid.sampling_mrad[0]
    kx = (np.arange(nx) - grid.centre_px[1]) * grid.sampling_mrad[1]
    mask = ky[:, None] ** 2 + kx[None, :] ** 2 > (factor * float(semiangle_mrad)) ** 2
    return mask if mask.any() else None


def dark_field_image(x, grid, semiangle_mrad: float | None, numba: bool | None = None):
    """Counts beyond 1.2 α per pattern (scan_y, scan_x) float64 — dense data or electron events — or None."""
    mask = dark_field_mask(grid, semiangle_mrad)
    if mask is None:
        return None
    if isinstance(x, np.ndarray):
        sy, sx = x.shape[:2]
        out = np.empty(sy * sx, np.float64)
        for r0, r1, block in clean_row_chunks(x):
            out[r0 * sx:r1 * sx] = _block_moments(block, numba, mask)[:, 3]
        return out.reshape(sy, sx)
    from tembench_pelz2022 import _kernels

    return _kernels.csr_mask_sums(x.offsets, x.indices, mask, numba=numba).astype(np.float64).reshape(x.scan_shape)


def _com_from_sums(sums, scan_shape, grid, normalize: str, numba: bool | None = None):
    from tembench_pelz2022 import _kernels

    com_y, com_x, counts = _kernels.com_finish(sums, normalize, grid.centre_px, grid.sampling_mrad, numba=numba)
    return com_y.reshape(scan_shape), com_x.reshape(scan_shape), counts.reshape(scan_shape)


def _check_dense(x, grid, normalize: str):
    if normalize not in ("frame", "mean"):
        raise TembenchError(f"center_of_mass: normalize must be 'frame' or 'mean', got {normalize!r}")
    if tuple(x.shape[2:]) != tuple(grid.shape):
        raise TembenchError(f"detector grid {grid.shape} does not match the data's detector {tuple(x.shape[2:])}")


def center_of_mass_chunked(x, grid, normalize: str = "frame", bad: BadPixels | None = None, numba: bool | None = None,
                           max_bytes: int = CHUNK_BYTES):
    """:func:`eer_ops.center_of_mass` reading dense data a bounded number of scan rows at a time (bad pixels
    repaired per block); the per-frame sums are the same arithmetic as the whole-array path. Events: as is."""
    if not isinstance(x, np.ndarray):
        return center_of_mass(x, grid, normalize=normalize, numba=numba)
    _check_dense(x, grid, normalize)
    sy, sx = x.shape[:2]
    sums = np.empty((sy * sx, 3), np.float64)
    from tembench_pelz2022 import _kernels

    for r0, r1, block in clean_row_chunks(x, bad, max_bytes):
        d3 = block.reshape(-1, *block.shape[2:])
        # the kernel of eer_ops.center_of_mass (per-frame sums: the same bits in any chunking)
        sums[r0 * sx:r1 * sx] = _kernels.dense_moments(d3 if d3.dtype in (np.float32, np.float64) else d3.astype(np.float64),
                                                       numba=numba)
    return _com_from_sums(sums, (sy, sx), grid, normalize, numba)


def _to_gradient(com_y, com_x, wavelength_A: float, reference: str):
    if reference == "mean":
        com_y, com_x = com_y - com_y.mean(), com_x - com_x.mean()
    elif reference != "center":
        raise TembenchError(f"dpc: reference must be 'center' or 'mean', got {reference!r}")
    f = 2 * np.pi * 1e-3 / wavelength_A
    return com_y * f, com_x * f


def gradient_field(x, grid, wavelength_A: float, normalize: str = "frame", reference: str = "center",
                   numba: bool | None = None, bad: BadPixels | None = None,
                   max_bytes: int = CHUNK_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """Phase gradient (g_y, g_x) in rad/Å in the detector frame from COM of dense data or events."""
    com_y, com_x, _ = center_of_mass_chunked(x, grid, normalize, bad, numba, max_bytes)
    return _to_gradient(com_y, com_x, wavelength_A, reference)


def checked_gradient_field(x, grid, wavelength_A: float, semiangle_mrad: float | None, method: str,
                           normalize: str = "frame", reference: str = "center", numba: bool | None = None,
                           bad_pixels: str = "repair", max_bytes: int = CHUNK_BYTES, info: dict | None = None):
    """(g_y, g_x, bad-pixel result, dark-field image or None): dense data read once — finite check, bad-pixel
    statistics, COM sums and the dark-field counts (beyond 1.2 α, :func:`dark_field_mask`) in one chunked
    pass, a second pass only when bad pixels are repaired. Events: COM and dark field as they are (no check).
    ``info`` (a dict, optional) receives ``dose_per_pattern``: the mean counts per pattern (electrons for counted data)."""
    if not isinstance(x, np.ndarray):
        if info is not None:
            n_frames = max(len(x.offsets) - 1, 1)
            info["dose_per_pattern"] = float(int(x.offsets[-1]) - int(x.offsets[0])) / n_frames
        return (*gradient_field(x, grid, wavelength_A, normalize, reference, numba), None,
                dark_field_image(x, grid, semiangle_mrad, numba))
    _check_dense(x, grid, normalize)
    sy, sx = x.shape[:2]
    sums = np.empty((sy * sx, 4), np.float64)
    mask = dark_field_mask(grid, semiangle_mrad)

    def consume(r0, r1, block, acc):  # one read of each frame: COM and dark-field sums, bad-pixel statistics
        part = sums[r0 * sx:r1 * sx]
        part[...] = _block_moments(block, numba, mask, acc)
        return part[:, 2]  # the frame totals: the finite check

    bad = dense_pass(x, grid, semiangle_mrad, bad_pixels, method, consume, max_bytes, fused=True)
    if info is not None:
        info["dose_per_pattern"] = float(sums[:, 2].mean()) if len(sums) else 0.0
    com_y, com_x, _ = _com_from_sums(np.ascontiguousarray(sums[:, :3]), (sy, sx), grid, normalize, numba)
    dark = sums[:, 3].reshape(sy, sx) if mask is not None else None
    return (*_to_gradient(com_y, com_x, wavelength_A, reference), bad, dark)


def rotate_field(gy, gx, rotation_deg: float):
    R = rotation_matrix(rotation_deg)
    return R[0, 0] * gy + R[0, 1] * gx, R[1, 0] * gy + R[1, 1] * gx


def curl_div(gy, gx, step_A):
    """Spectral curl ∂x g_y − ∂y g_x and divergence ∂y g_y + ∂x g_x (periodic)."""
    qy, qx = _freqs(gy.shape, step_A)
    fy, fx = scipy.fft.fft2(gy), scipy.fft.fft2(gx)
    curl = np.real(scipy.fft.ifft2(1j * qx * fy - 1j * qy * fx))
    div = np.real(scipy.fft.ifft2(1j * qy * fy + 1j * qx * fx))
    return curl, div


def _helmholtz_moments(gy, gx, step_A):
    """(Σ|ĉ|²/q², Re Σ ĉ d̂*/q², Σ|d̂|²/q²) with ĉ, d̂ the spectra of curl g and div g: the energies of the
    solenoidal and irrotational parts of g and their cross term (Parseval; q = 0 left out). Unlike Σcurl²,
    these do not weight white noise by q², so a low-pass signal field is seen through the noise."""
    qy, qx = _freqs(gy.shape, step_A)
    fy, fx = scipy.fft.fft2(gy), scipy.fft.fft2(gx)
    c = qx * fy - qy * fx       # i·curl spectrum / i
    d = qy * fy + qx * fx       # i·div spectrum / i
    q2 = qy ** 2 + qx ** 2
    q2[0, 0] = np.inf
    return (float((np.abs(c) ** 2 / q2).sum()), float((c * np.conj(d) / q2).real.sum()),
            float((np.abs(d) ** 2 / q2).sum()))


#: the COM field is taken to carry signal when its curl-free excess (:func:`com_signal`) or the correlation of its
#: integrated phase with the dark-field counts is at least this many noise standard deviations (:func:`com_signal_check`;
#: for noise alone P ≈ 3e-4 + 6e-5). Measured on MoS2 of pelz2022_dose (80 kV, 4 draws): excess 0.6–1.5 / correlation
#: ≤ 2.2 at 1 e/pattern, ≤ 2.5 / ≤ 2.1 at 3, 1.9–3.4 / 6.0–8.1 at 10, 17.6–18.5 / 31–33 at 100; pure noise ≤ 2.3)
COM_SIGNAL_MIN_SIGMAS = 4.0


def com_signal(gy, gx, step_A, k0_A_inv: float | None = None) -> dict:
    """How far the COM field stands above shot noise: ``{"sigmas", "n_modes", "curl_energy", "div_energy"}``.

    A phase object gives a curl-free field g = ∇(|P|² ⋆ φ); shot noise (independent per probe position) is white
    and isotropic, so with the 1/q² weight of :func:`_helmholtz_moments` every Fourier mode carries the same
    noise energy μ in its curl and in its divergence part. Over the n modes with 0 < |q| ≤ 2π·2k0 (a probe of
    aperture k0 = α/λ passes nothing beyond 2k0; all modes if ``k0_A_inv`` is None) the 2×2 moment matrix
    [[C, X], [X, D]] then has, for noise alone, an eigenvalue gap λ1 − λ2 = 2√n μ·R with R Rayleigh(1), and
    λ1 + λ2 ≈ 2nμ: ``sigmas`` = √n (λ1 − λ2)/(λ1 + λ2) is R. The gap does not depend on the rotation (the
    eigenvalues of a rotated field's matrix are the same), so the choice of the rotation does not bias it. A
    curl-free signal adds to one eigenvalue only.
    """
    qy, qx = _freqs(gy.shape, step_A)
    fy, fx = scipy.fft.fft2(gy), scipy.fft.fft2(gx)
    q2 = qy ** 2 + qx ** 2
    sel = q2 > 0
    if k0_A_inv is not None:
        sel &= q2 <= (2 * np.pi * 2.0 * float(k0_A_inv)) ** 2
    n = int(sel.sum())
    if n == 0:
        return {"sigmas": 0.0, "n_modes": 0, "curl_energy": 0.0, "div_energy": 0.0}
    q2s = q2[sel]
    c = (qx * fy - qy * fx)[sel]
    d = (qy * fy + qx * fx)[sel]
    a, b, e = (float((np.abs(c) ** 2 / q2s).sum()), float((c * np.conj(d) / q2s).real.sum()),
               float((np.abs(d) ** 2 / q2s).sum()))
    w = np.linalg.eigvalsh(np.array([[a, b], [b, e]]))
    z = math.sqrt(n) * float(w[1] - w[0]) / float(w[1] + w[0]) if w[1] + w[0] > 0 else 0.0
    return {"sigmas": z, "n_modes": n, "curl_energy": float(w[0]), "div_energy": float(w[1])}


def com_signal_check(gy, gx, step_A, k0_A_inv: float | None, orientation: dict, dark_field=None) -> dict:
    """Does the COM field carry signal? ``{"detected", "sigmas", "n_modes", "dark_field_sigmas"}``: detected when
    either statistic reaches ``COM_SIGNAL_MIN_SIGMAS`` —

    - ``sigmas``: :func:`com_signal` of the field as read (transposed if ``orientation`` says so): its curl-free
      excess over its shot-noise expectation, blind (Rayleigh(1) for noise alone: P(≥ 4) = 3e-4);
    - ``dark_field_sigmas``: √N·|r|, r the correlation of the integrated phase (:func:`icom` of the field in the
      orientation used) with the dark-field counts (beyond 1.2 α, None without dark-field pixels): N(0, 1) for
      noise alone (the dark-field and COM noise are independent), P(≥ 4) = 6e-5; linear in the phase, it finds
      the signal of MoS2 at 10 e/pattern (6.0–8.1 sd) that the blind statistic misses (1.9–3.4)."""
    sig = com_signal(*_oriented(gy, gx, orientation["transpose"]), step_A, k0_A_inv)
    dfz = None
    if dark_field is not None and np.shape(dark_field) == np.shape(gy) and np.all(np.isfinite(dark_field)):
        corr = orientation.get("branch", {}).get("dark_field_corr")
        if corr is None:
            corr = _correlation(icom(orientation["gy"], orientation["gx"], step_A), np.asarray(dark_field, np.float64))
        dfz = abs(float(corr)) * math.sqrt(np.size(gy))
    detected = sig["sigmas"] >= COM_SIGNAL_MIN_SIGMAS or (dfz is not None and dfz >= COM_SIGNAL_MIN_SIGMAS)
    return {"detected": bool(detected), "sigmas": sig["sigmas"], "n_modes": sig["n_modes"], "dark_field_sigmas": dfz}


def _min_curl(gy, gx, step_A) -> tuple[float, float]:
    """(θ in [0°, 180°) minimising the solenoidal energy of R(θ)·g, the fraction of energy it leaves)."""
    # curl of R(θ)g = cos θ · curl + sin θ · div, with θ counter-clockwise in the (x, y) plane
    a, b, d = _helmholtz_moments(gy, gx, step_A)
    w, v = np.linalg.eigh(np.array([[a, b], [b, d]]))
    c, s = v[:, 0]
    frac = float(w[0]) / (a + d) if a + d > 0 else 0.5
    return math.degrees(math.atan2(s, c)) % 180.0, max(frac, 0.0)


def estimate_rotation_deg(gy, gx, step_A) -> float:
    """θ in [0°, 180°) minimising the curl of R(θ)·g (closed form; see the module docstring)."""
    return _min_curl(gy, gx, step_A)[0]


def _curl_fraction_at(gy, gx, step_A, rotation_deg: float) -> float:
    a, _, d = _helmholtz_moments(*rotate_field(gy, gx, rotation_deg), step_A)
    return a / (a + d) if a + d > 0 else 0.5


def _oriented(gy, gx, transpose: bool):
    return (gx, gy) if transpose else (gy, gx)


#: the transposed orientation is chosen only when its curl fraction is below the as-read one by this many
#: standard deviations of the fraction for pure noise, 1/sqrt(2N) for N probe positions (≈ 0.05 for 55 × 53)
TRANSPOSE_MARGIN_SIGMAS = 4.0


def estimate_orientation(gy, gx, step_A, rotation_deg: float | None = None, transpose: bool | None = None) -> dict:
    """Scan–detector orientation from the COM field: ``{"rotation_deg", "transpose", "curl_fraction": {…},
    "transpose_margin"}``.

    For each transpose option (or the given one): the rotation of minimum curl (or the given rotation)
    and the fraction of curl energy it leaves. The transposed option wins only when its fraction is
    smaller by ``transpose_margin`` = 4/sqrt(2N): a noise-dominated field (≈ 0.5 either way) is read as
    it is, not flipped by chance. The 180° branch is resolved afterwards (:func:`resolve_orientation`).
    """
    options = (False, True) if transpose is None else (bool(transpose),)
    found = {}
    for t in options:
        fy, fx = _oriented(gy, gx, t)
        if rotation_deg is None:
            found[t] = _min_curl(fy, fx, step_A)
        else:
            found[t] = (float(rotation_deg), _curl_fraction_at(fy, fx, step_A, rotation_deg))
    margin = TRANSPOSE_MARGIN_SIGMAS / math.sqrt(2.0 * max(np.size(gy), 1))
    if transpose is None:
        best = found[True][1] < found[False][1] - margin
    else:
        best = bool(transpose)
    return {"rotation_deg": found[best][0], "transpose": best, "transpose_margin": margin,
            "curl_fraction": {("transposed" if t else "as_read"): found[t][1] for t in options}}


def icom(gy, gx, step_A, padding_factor: float = 1.0) -> np.ndarray:
    """Direct Fourier integration of a gradient field (rad/Å) → phase (rad), mean zero."""
    ny, nx = gy.shape
    py, px = _padded(gy.shape, padding_factor)
    Gy = np.zeros((py, px)); Gy[:ny, :nx] = gy
    Gx = np.zeros((py, px)); Gx[:ny, :nx] = gx
    qy, qx = _freqs((py, px), step_A)
    q2 = qy ** 2 + qx ** 2
    q2[0, 0] = 1.0
    w = workers = fft_workers()
    num = qy * scipy.fft.fft2(Gy, workers=w) + qx * scipy.fft.fft2(Gx, workers=workers)
    phi_k = -1j * num / q2
    phi_k[0, 0] = 0.0
    phi = np.real(scipy.fft.ifft2(phi_k, workers=w))[:ny, :nx]
    return phi - phi.mean()


def _padded(shape, factor):
    if factor < 1:
        raise TembenchError(f"padding_factor must be ≥ 1, got {factor}")
    return tuple(int(math.ceil(n * factor)) for n in shape)


def _half_plane_norm2(a, n_last: int | None = None) -> float:
    """Σ|X|² over the full spectrum of a real field of last size ``n_last`` whose ``rfft2`` is ``a``: every
    column counts twice except those that are their own mirror images — the first, and the last when
    ``n_last`` is even (its Nyquist column). ``n_last=None`` means even, 2·(columns − 1)."""
    cols = a.shape[-1]
    n = 2 * (cols - 1) if n_last is None else int(n_last)
    if n // 2 + 1 != cols:
        raise ValueError(f"_half_plane_norm2: {cols} rfft columns do not belong to a last size of {n}")
    full = 2.0 * float(np.vdot(a, a).real)
    full -= float(np.vdot(a[..., 0], a[..., 0]).real)
    if n % 2 == 0 and cols > 1:
        full -= float(np.vdot(a[..., -1], a[..., -1]).real)
    return full


def iterative_dpc(gy, gx, step_A, step_size: float = 0.5, n_iter: int = 64, lambda1_per_A2: float = 0.0,
                  lambda2_A2: float = 0.0, padding_factor: float = 2.0, tol: float = 1e-6):
    """Regularised gradient descent of ‖M⊙(∇φ − g)‖² (Pelz 2022 update after eq 4); returns (phase, history).

    φ is real, so it lives as its half-plane spectrum (``rfft2``); both gradient components go
    through one batched real transform each way, float32/complex64, with the Fourier operators
    precomputed. Only the measured region of the residual is stored (the transforms zero-pad it).
    """
    ny, nx = gy.shape
    py, px = _padded(gy.shape, padding_factor)
    qy = (2 * np.pi * np.fft.fftfreq(py, d=step_A[0])).astype(np.float32)[:, None]
    qx = (2 * np.pi * np.fft.rfftfreq(px, d=step_A[1])).astype(np.float32)[None, :]
    q2 = qy * qy + qx * qx
    precond = lambda1_per_A2 + q2 + lambda2_A2 * q2 * q2
    with np.errstate(divide="ignore"):
        mu_inv = np.where(precond > 0, np.float32(step_size) / precond, np.float32(0)).astype(np.float32)
    del q2, precond
    # φ̂ ← φ̂ − iμ/(λ1 + q² + λ2 q⁴) · (q_y R̂_y + q_x R̂_x);   ∇φ = F⁻¹[i q φ̂]
    iqy = (1j * qy).astype(np.complex64)
    iqx = (1j * qx).astype(np.complex64)
    z = np.empty((2, ny, nx), np.float32)
    z[0], z[1] = gy, gx
    phi_k = np.zeros((py, px // 2 + 1), np.complex64)
    spec = np.empty((2, py, px // 2 + 1), np.complex64)  # i q φ̂, then F{residual}
    rp = np.zeros((2, py, px), np.float32)  # the residual, zero outside the measured region
    upd = np.empty_like(phi_k)
    workers = fft_workers() if py * px >= 256 * 256 else 1
    norm_g = math.sqrt(float(np.vdot(z, z).real)) or 1.0
    history = []
    for _ in range(int(n_iter)):
        np.multiply(phi_k, iqy, out=spec[0])
        np.multiply(phi_k, iqx, out=spec[1])
        r = rp[:, :ny, :nx]
        for c in range(2):  # one component at a time: half the transient real-space memory
            grad = scipy.fft.irfft2(spec[c], s=(py, px), workers=workers, overwrite_x=True)
            np.subtract(z[c], grad[:ny, :nx], out=r[c])  # M ⊙ (g − ∇φ)
            del grad
        del spec  # rfft2 below allocates the next one
        history.append(math.sqrt(float(np.vdot(r, r).real)) / norm_g)
        spec = scipy.fft.rfft2(rp, workers=workers)
        np.multiply(spec[0], qy, out=upd)
        spec[1] *= qx
        upd += spec[1]
        upd *= mu_inv
        upd *= np.complex64(-1j)
        phi_k += upd
        if _half_plane_norm2(upd, px) <= tol * tol * max(_half_plane_norm2(phi_k, px), 1e-300):
            break
    phi = scipy.fft.irfft2(phi_k, s=(py, px), workers=workers)[:ny, :nx].astype(np.float64)
    return phi - phi.mean(), history


def _skew(a) -> float:
    a = a - a.mean()
    s = a.std()
    return float((a ** 3).mean() / s ** 3) if s > 0 else 0.0


#: the dark-field correlation decides the 180° branch when it is at least this many standard deviations
#: (1/sqrt(N) for N probe positions) from zero; otherwise the skew of the phase does
BRANCH_MIN_SIGMAS = 3.0


def _correlation(a, b) -> float:
    a = a - a.mean()
    b = b - b.mean()
    n = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum()) / n if n > 0 else 0.0


def resolve_orientation(gy, gx, step_A, rotation_deg: float | None, transpose: bool | None = False,
                        dark_field=None) -> dict:
    """Orientation (given, or estimated: minimum curl, transpose by the smaller curl fraction, 180°
    branch by the sign of the phase's correlation with ``dark_field`` (scan_y, scan_x) — the counts beyond
    the bright-field disc, high at atoms — when that is ≥ ``BRANCH_MIN_SIGMAS``/sqrt(N) from zero, else by
    positive skew of the integrated phase) and the field in the scan frame: a dict with ``rotation_deg``,
    ``transpose``, ``curl_fraction``, ``branch`` ({"by", "dark_field_corr", "skew"}) and ``gy``, ``gx`` (rotated)."""
    if rotation_deg is not None and transpose is None:
        transpose = False  # a given rotation is a calibration: the transpose is estimated only with the rotation
    est = estimate_orientation(gy, gx, step_A, rotation_deg, transpose)
    fy, fx = _oriented(gy, gx, est["transpose"])
    if rotation_deg is not None:
        ry, rx = rotate_field(fy, fx, rotation_deg)
        return {**est, "rotation_deg": float(rotation_deg), "gy": ry, "gx": rx}
    t = est["rotation_deg"]
    ry, rx = rotate_field(fy, fx, t)
    phase = icom(ry, rx, step_A)
    sk = _skew(phase)  # the other branch's phase is −phase: its skew −sk, its correlation −corr
    corr = None
    if dark_field is not None and np.shape(dark_field) == np.shape(phase) and np.all(np.isfinite(dark_field)):
        corr = _correlation(phase, np.asarray(dark_field, np.float64))
    if corr is not None and abs(corr) * math.sqrt(phase.size) >= BRANCH_MIN_SIGMAS:
        by, flip = "dark_field", corr < 0
    else:
        by, flip = "skew", sk < 0
    if flip:
        t, ry, rx = t + 180.0, -ry, -rx
    branch = {"by": by, "dark_field_corr": None if corr is None else (-corr if flip else corr),
              "skew": -sk if flip else sk}
    return {**est, "rotation_deg": t % 360.0, "gy": ry, "gx": rx, "branch": branch}


def resolve_rotation(gy, gx, step_A, rotation_deg: float | None, transpose: bool | None = False):
    """(rotation θ in degrees, rotated gy, gx); None → curl estimate + positive-skew branch (no transpose
    unless asked: ``transpose=None`` estimates it too, see :func:`resolve_orientation`)."""
    o = resolve_orientation(gy, gx, step_A, rotation_deg, transpose)
    return o["rotation_deg"], o["gy"], o["gx"]


class _COMParams(Params):
    rotation_deg: float | None = Field(None, ge=-360, le=360, description="detector rotation vs scan (deg, COM_scan = R(θ) T COM_det); None (default) = estimate by minimum curl, 180° branch by the phase's positive correlation with the dark-field counts (positive skew without dark-field signal). Sign: ours = −py4DSTEM's (measured +16.93° vs −17.0° on the same data)")
    transpose: bool | None = Field(None, description="detector read out transposed vs the scan (T swaps k_y, k_x before the rotation); None (default) = estimate with the rotation (the orientation whose best rotation leaves less curl); with rotation_deg given, None = False")
    bad_pixels: Literal["repair", "refuse", "ignore"] = Field("repair", description="hot / negative / dead detector pixels (found over the whole scan, thresholds in docs/pelz2022.md): repair = replace by the mean of good neighbours in every frame and report in extras; refuse = error naming pixel and frame; ignore = no check")
    normalize: Literal["frame", "mean"] = Field("frame", description="COM denominator: each pattern's counts, or the mean counts (linear; better below ~1 e/pattern)")
    reference: Literal["center", "mean"] = Field("center", description="COM origin: the detector centre, or the mean COM of the scan (removes descan / a uniform field)")
    padding_factor: float = Field(1.0, ge=1.0, le=4.0, description="zero-pad the scan by this factor before integration (1 = periodic)")
    numba: bool | None = Field(None, description="numba kernel for COM on events (default: when installed)")


def _gradients(self, measurement, params):
    """(gy, gx in the scan frame, scan step, extras: orientation estimate and bad-pixel report)."""
    x, grid = load_4d(measurement, self.name, check=False)  # the finite check is made in the COM pass
    g = measurement.geometry
    opt = probe_optics(g, self.name)
    info: dict = {}
    gy, gx, bad, dark = checked_gradient_field(x, grid, opt.wavelength_A, opt.semiangle_mrad, self.name,
                                               params.normalize, params.reference, params.numba, params.bad_pixels,
                                               info=info)
    step = scan_step(g, self.name)
    o = resolve_orientation(gy, gx, step, params.rotation_deg, params.transpose, dark_field=dark)
    # issue 12: at ~1 e/pattern the COM field is noise — say so (and do not trust a rotation estimated from it)
    sig = com_signal_check(gy, gx, step, opt.k0_A_inv, o, dark)
    dose = info.get("dose_per_pattern", float("nan"))
    detected = sig["detected"]
    estimated = params.rotation_deg is None
    if not detected:
        df = ("no dark-field pixels" if sig["dark_field_sigmas"] is None
              else f"{sig['dark_field_sigmas']:.1f} sd for the correlation of the integrated phase with the dark-field counts")
        msg = (f"{self.name}: the centre-of-mass field shows no signal above the shot noise at {dose:.3g} e/pattern "
               f"(mean counts per pattern): its curl-free excess over |q| ≤ 2π·2α/λ ({sig['n_modes']} Fourier modes) is "
               f"{sig['sigmas']:.1f} noise standard deviations ({df}); either needs {COM_SIGNAL_MIN_SIGMAS:g} "
               "(dpc.com_signal_check); the image is mostly noise")
        if estimated:
            msg += ("; the rotation cannot be estimated from these data either: using rotation_deg=0 (no transpose) "
                    "instead. Pass rotation_deg (e.g. measured on a higher-dose scan of the same setup)")
            o = resolve_orientation(gy, gx, step, 0.0, False, dark_field=dark)
            # the curl fractions of both readings at the rotation used (0°), as an estimate reports them
            o["curl_fraction"] = estimate_orientation(gy, gx, step, 0.0, None)["curl_fraction"]
        import warnings
        warnings.warn(msg, UserWarning, stacklevel=3)
    extras = {"rotation_deg": o["rotation_deg"], "transpose": o["transpose"], "curl_fraction": o["curl_fraction"],
              "transpose_margin": o["transpose_margin"], **({"rotation_branch": o["branch"]} if "branch" in o else {}),
              "com_signal": {**sig, "min_sigmas": COM_SIGNAL_MIN_SIGMAS, "dose_per_pattern": dose},
              **({"rotation_estimated": detected} if estimated else {}),
              **(bad.report() if bad is not None else {})}
    return o["gy"], o["gx"], step, extras


class ICOM(Reconstructor):
    """Integrated centre of mass (iCOM): direct Fourier integration of the COM phase gradient.

    COM from dense data or directly from electron events (O(C)); rotation given or estimated
    by minimum curl. Output: |P|² ⋆ φ in rad on the scan grid.
    """
    runs_numba_kernels = True  # numba kernels from the first call (preflight counts numba's memory)

    name = "icom"
    accepts = ACCEPTS
    produces = "image"
    version = "4"

    class Params(_COMParams):
        pass

    def reconstruct(self, measurement, params, xp):
        gy, gx, step, extras = _gradients(self, measurement, params)
        phase = icom(gy, gx, step, params.padding_factor)
        return phase_image(phase, measurement.geometry, self.name, **extras)


class DPC(Reconstructor):
    """Centre-of-mass DPC by regularised iterative Fourier integration (Pelz 2022, update after eq 4).

    φ ← φ + μ F⁻¹[−i q·F{M⊙(g − ∇φ)} / (λ1 + q² + λ2 q⁴)] on a padded grid; COM from dense data
    or electron events; rotation given or estimated by minimum curl. Output: phase in rad.
    """
    runs_numba_kernels = True  # numba kernels from the first call (preflight counts numba's memory)

    name = "dpc"
    accepts = ACCEPTS
    produces = "image"
    version = "4"

    class Params(_COMParams):
        step_size: float = Field(0.5, gt=0, le=1.0, description="gradient step μ (paper: 0.5)")
        n_iter: int = Field(64, ge=1, le=10000, description="maximum iterations")
        lambda1_per_A2: float = Field(0.0, ge=0, description="λ1 (1/Å²): damps low frequencies (high-pass)")
        lambda2_A2: float = Field(0.0, ge=0, description="λ2 (Å²): damps high frequencies (low-pass)")
        padding_factor: float = Field(2.0, ge=1.0, le=4.0, description="zero-pad factor; the residual counts only on the measured region")
        tol: float = Field(1e-6, gt=0, description="stop when the relative update is below this")

    def reconstruct(self, measurement, params, xp):
        gy, gx, step, extras = _gradients(self, measurement, params)
        phase, hist = iterative_dpc(gy, gx, step, params.step_size, params.n_iter, params.lambda1_per_A2,
                                    params.lambda2_A2, params.padding_factor, params.tol)
        rec = phase_image(phase, measurement.geometry, self.name, **extras)
        rec.history["residual"] = hist
        return rec
