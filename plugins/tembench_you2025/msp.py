"""Multislice ptychography of one 4D-STEM data set (You, Romanov & Pelz 2025, Algorithm 1).

Model (You eqs 5–10), evaluated by the core engine :func:`tembench.physics.stem.stem_loss_and_gradient`:

    t_n = exp(iσ V_n)                              V_n complex slice potential (V·Å), Im V_n = absorption
    ψ_{n+1} = P^{Δz}[C_w(t_n) · ψ_n]               batch-cropped windows (eq 8), Fresnel propagator (eq 4)
    Î_b = Σ_i |F ψ_exit,i,b|² / (wy·wx)            K incoherent probe modes (eq 10)
    L = Σ_b Σ_k (√(Î_b + ε) − √(I_b + ε))²  [+ λ ‖Im V‖₁]     (eq 16)

Algorithm 1 as implemented (:func:`reconstruct_msp`): V⁰ = 0; ψ⁰ from the mean pattern's bright-field
disc amplitude with the recorded aberrations, ψ⁰(k) = √Ī(k)·exp(−iχ(k)) (the paper's
a_max/√‖Ī‖₁ scale becomes unit probe power here because the patterns are normalised to unit mean
total); batches of ``batch_size`` adjacent scan indices, visited in a reshuffled order every iteration
(``batch_order='random'``: random subsets instead, as py4DSTEM; measured better with small batches, see
below); per batch one gradient step on all slices, then (after ``start_probe_iter``) on the probe modes and
(after ``start_position_iter``) on the batch's positions, then the L1 shrinkage of Im V (eq 17). After each
iteration an optional Butterworth low-pass of the slices (``q_lowpass_invA``, ``butterworth_order``; the
paper's regulariser for noisy data, 1.51 1/Å, order 2 there).

Batch order, measured (Si [001] 10.9 Å, 576 noise-free patterns, 4 slices, 2 modes, batches of 64, 4
iterations, NCC of the projection vs truth): adjacent 0.946, random 0.961 (γ₁ = 1); 0.966 / 0.970 with
γ₁ = 3. The paper's batches are large (5 per 220² scan); 64 adjacent indices are 2.7 scan rows, and a
step from such a strip pulls the shared probe towards that strip.

Step sizes. Alg. 1 takes plain gradient steps with constant γ₁ (object) and γ₂ (probe, positions); the
paper's runs use "a step size of 1", which only makes sense with a normalised gradient. We use the
standard Gauss–Newton diagonal normalisations of the amplitude loss (Thibault & Guizar-Sicairos 2012;
the ePIE/rPIE family), so that γ = 1 is a full Gauss–Newton step:

* object:   ΔV_n = −γ₁ · g_V / (2σ² N_s · [(1−α)·Σ_b|ψ_b|² + α·max Σ_b|ψ_b|²])
  (g_V = 2∂L/∂V*, Σ_b|ψ_b|² the batch's probe illumination, N_s slices share the projected phase,
  α = ``illumination_reg``);
* L1 (eq 17): Im V ← sign(Im V)·max(|Im V| − λ·γ₁/D, 0) after each batch's object step, D the object
  step's denominator above (a proximal-gradient step with the same preconditioner);
* probe:    Δψ_i = −γ₂ · g_ψ / (2B)  (B patterns in the batch; |t| ≈ 1);
* position: Δρ_b = −γ_ρ · (H_b + μI)⁻¹ ∂L/∂ρ_b, with H_b the 2×2 Gauss–Newton matrix of the amplitudes
  (from the core), μ = 10⁻³·mean trace, each update capped at half a pixel; after each iteration the global
  part of the offsets from the nominal positions (``position_frame``: their least-squares affine part, or
  their mean) is removed (a common shift of object and positions is not measurable, an affine scan
  distortion barely: the object deforms with it).

Defaults γ₁ = 1, γ₂ = 0.25, γ_ρ = 1: object and probe steps computed from the same batch add up (the
model is bilinear in object and probe), and γ₁ = 1 with γ₂ = 0.5 was measured to diverge slowly on the
two-slice test object. If an iteration's loss rises above 1.5× the previous one, all steps are halved
(``history['step_scale']``).

After every probe update the modes are orthogonalised: the eigenvectors U of the Gram matrix
G = A Aᴴ (A = modes as rows) give ψ' = Uᴴ A, sorted by power — a unitary mixing that leaves Σ|ψ_i|²
and every modelled pattern unchanged.

Conventions: lengths Å, angles mrad, potentials V·Å per slice, phase σ·Re V > 0 for an attractive
potential (exp(+iσV), as the forward model). Patterns (N, k_y, k_x) fftshifted with the unscattered beam
at pixel (k_y//2, k_x//2) (within half a pixel: an even detector binning is modelled as a beam tilt); the reconstruction pixel is λ/(n_k·Δα) per axis (n_k detector pixels of Δα
mrad). Positions (y, x) Å in the sample frame; the object field's pixel 0 sits at ``origin_A``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from tembench import Params, Reconstruction, Reconstructor
from tembench.backend import asnumpy, fft2, ifft2
from tembench.errors import TembenchError
from tembench.physics.constants import interaction_constant, wavelength_A
from tembench.physics.grid import spatial_frequencies
from tembench.physics.optics import aberration_function, fourier_shift_phase, normalize_aberrations
from tembench.physics.stem import stem_loss_and_gradient


#: Tikhonov term of the position Newton step, relative to the batch's mean curvature trace
POSITION_MU = 1e-3


class MSPParams(Params):
    """Parameters of :func:`reconstruct_msp` (units in the names; defaults for a few-Å-thick crystal)."""

    n_slices: int = Field(2, ge=1, le=512, description="slices of the reconstructed object")
    slice_thickness_A: float | None = Field(None, gt=0, le=1000, description="slice thickness (Å); default: the "
                                            "measurement's recorded slice thickness × its slices / n_slices, else 2 Å")
    n_iterations: int = Field(20, ge=1, le=10000, description="passes over all patterns (L in Alg. 1)")
    batch_size: int = Field(32, ge=1, le=100000, description="patterns per minibatch (adjacent scan indices)")
    n_probe_modes: int = Field(1, ge=1, le=16, description="incoherent probe modes K (eq 10)")
    start_probe_iter: int = Field(2, ge=0, description="refine the probe from this iteration on (0-based)")
    start_position_iter: int | None = Field(None, ge=0, description="refine positions from this iteration on; "
                                            "None: never")
    step_size: float = Field(1.0, gt=0, le=10, description="object step γ₁ (1 = full Gauss–Newton step)")
    probe_step_size: float = Field(0.25, gt=0, le=10, description="probe step γ₂ (1 = full Gauss–Newton step; "
                                   "object and probe steps from one batch add up, so keep γ₁ + γ₂ ≲ 1.3)")
    position_step_size: float = Field(1.0, gt=0, le=10, description="position step (1 = full Newton step)")
    illumination_reg: float = Field(0.1, gt=0, le=1, description="α of the object normalisation (1: ePIE-like)")
    l1_imag: float = Field(0.0, ge=0, description="λ of eq 16 on Im V, per V·Å, for the loss of patterns "
                           "normalised to unit mean sum (typically 1e-9 … 1e-7); 0: no shrinkage")
    eps: float = Field(1e-6, ge=0, description="ε of eq 16, in units of the normalised pattern (sum ≈ 1)")
    object_padding_A: float = Field(1.0, ge=0, le=1000, description="object field beyond the outermost probe "
                                    "windows (Å); room for refined positions")
    position_frame: Literal["affine", "shift", "none"] = Field(
        "affine", description="each iteration remove from the refined offsets their affine part (default) or mean "
        "shift: the reconstruction stays in the nominal scan frame (a global shift is not measurable, an affine "
        "scan distortion only weakly, as the object deforms with it)")
    max_position_shift_A: float = Field(2.0, gt=0, description="refined positions stay within this of nominal (Å)")
    extra_mode_power: float = Field(0.02, ge=0, lt=1, description="initial power fraction in modes 2…K")
    seed: int = Field(0, ge=0, description="seed of the batch order and the initial extra modes")
    batch_order: Literal["adjacent", "random"] = Field(
        "adjacent", description="minibatches of adjacent scan indices in a reshuffled order (Alg. 1), or random "
        "subsets of the positions, drawn once (as py4DSTEM's shuffled batches; with small batches every step then "
        "spans the whole field)")
    q_lowpass_invA: float | None = Field(None, gt=0, description="Butterworth low-pass of every slice after each "
                                         "iteration: gain 1/(1 + (q/q_c)^(2·order)) (½ at q_c, 1/Å; py4DSTEM's "
                                         "q_lowpass, the paper's 1.51 1/Å); None: no filter")
    butterworth_order: float = Field(2.0, gt=0, le=32, description="order of the Butterworth low-pass")
    defocus_A: float | None = Field(None, description="initial probe defocus Δf = −C10 (Å); default: geometry's")
    band_limit: float | None = Field(None, gt=0, le=1.5, description="propagator band limit (fraction of Nyquist); "
                                     "None: none, so every detector pixel is modelled")
    reconstruct_absorption: bool = Field(True, description="complex potential (Im V = absorption); False: real V")

    @model_validator(mode="after")
    def _check(self):
        if self.start_position_iter is not None and self.start_position_iter >= self.n_iterations:
            raise ValueError(f"start_position_iter ({self.start_position_iter}) must be < n_iterations "
                             f"({self.n_iterations}) or null")
        return self


@dataclass
class MSPResult:
    """Outcome of :func:`reconstruct_msp`; ``origin_A`` is the sample-frame position (y, x) of field pixel 0."""

    potentials_VA: np.ndarray            # (n_slices, NY, NX) complex64, V·Å per slice
    probe: np.ndarray                    # (K, wy, wx) complex64, orthogonal modes, power per mode
    positions_A: np.ndarray              # (N, 2) refined positions (y, x), sample frame
    sampling_A: tuple[float, float]
    origin_A: tuple[float, float]
    slice_thickness_A: float
    pattern_scale: float                 # the patterns were divided by this (mean counts per pattern)
    history: dict[str, list[float]] = field(default_factory=dict)

    def projection(self) -> np.ndarray:
        """V_tot = Σ_n Re V_n (V·Å), You's 2D projection for the tomography step."""
        return self.potentials_VA.real.sum(axis=0)

    def scan_region(self, positions_A=None) -> tuple[slice, slice, tuple[float, float]]:
        """Field slices covering the bounding box of the (nominal) positions, and its origin (Å)."""
        p = np.asarray(self.positions_A if positions_A is None else positions_A, float).reshape(-1, 2)
        sl, org = [], []
        for a in range(2):
            s, o = self.sampling_A[a], self.origin_A[a]
            i0 = int(math.ceil((p[:, a].min() - o) / s - 1e-6))
            i1 = int(math.floor((p[:, a].max() - o) / s + 1e-6)) + 1
            i0, i1 = max(i0, 0), min(max(i1, i0 + 1), self.potentials_VA.shape[1 + a])
            sl.append(slice(i0, i1))
            org.append(o + i0 * s)
        return sl[0], sl[1], (org[0], org[1])


# --- set-up --------------------------------------------------------------------------------------
def reconstruction_sampling(pattern_shape, detector_sampling_mrad, energy_keV) -> tuple[float, float]:
    """Real-space pixel λ/(n_k·Δα) (y, x) Å of a window whose Fourier pixel is the detector pixel."""
    lam = wavelength_A(energy_keV)
    d = np.broadcast_to(np.asarray(detector_sampling_mrad, float), (2,))
    return lam / (pattern_shape[0] * d[0] * 1e-3), lam / (pattern_shape[1] * d[1] * 1e-3)


def detector_offset_px(geometry, shape) -> tuple[float, float]:
    """Where the unscattered beam falls relative to pixel (k_y//2, k_x//2), in pixels (y, x).

    An even detector binning puts it between native pixels (0.5/b binned pixels off, recorded by stem4d in
    ``extra['detector_centre_px']``). Offsets up to half a pixel are modelled as a beam tilt of the probe
    (its spectrum is centred there); larger ones are refused.
    """
    c = (geometry.extra or {}).get("detector_centre_px")
    if c is None:
        return 0.0, 0.0
    dy, dx = float(c[0]) - shape[0] // 2, float(c[1]) - shape[1] // 2
    if abs(dy) > 0.5 + 1e-9 or abs(dx) > 0.5 + 1e-9:
        raise TembenchError(
            f"msp: the unscattered beam falls at detector pixel {tuple(c)}, more than half a pixel from pixel "
            f"{(shape[0] // 2, shape[1] // 2)} where the model puts it; centre (crop) the patterns first.")
    return dy, dx


def orthogonalize_modes(modes, xp=None):
    """Orthogonal probe modes with the same incoherent intensity: ψ' = Uᴴ A from G = A Aᴴ = U Λ Uᴴ,
    sorted by decreasing power ‖ψ'_i‖² = λ_i (a unitary mixing leaves Σ_i |ψ_i|² pointwise unchanged)."""
    xp = xp or np
    k = modes.shape[0]
    if k == 1:
        return modes
    a = modes.reshape(k, -1).astype(xp.complex128)
    gram = a @ a.conj().T
    w, u = xp.linalg.eigh(gram)
    order = xp.argsort(-w)
    u = u[:, order]
    return (u.conj().T @ a).reshape(modes.shape).astype(xp.complex64)


def initial_probe(mean_pattern, sampling_A, energy_keV, aberrations, n_modes, extra_power, rng, xp,
                  offset_px=(0.0, 0.0)):
    """Probe modes (K, wy, wx) from the mean pattern's bright-field disc: ψ(k) = √Ī(k)·exp(−iχ(k)).

    ``offset_px``: the unscattered beam's position relative to pixel n//2 (:func:`detector_offset_px`).
    The disc is where Ī exceeds 30 % of its maximum, grown by one pixel for the aperture's edge. Unit total
    power; modes 2…K (``extra_power`` of it) are the first mode's spectrum times low-order polynomials of
    k, then orthogonalised.
    """
    wy, wx = mean_pattern.shape
    m = np.fft.ifftshift(np.asarray(mean_pattern, np.float64))
    disc = m > 0.3 * m.max()
    # one pixel more all round: the aperture edge's partly covered pixels carry a fair share of the power
    disc = disc | np.roll(disc, 1, 0) | np.roll(disc, -1, 0) | np.roll(disc, 1, 1) | np.roll(disc, -1, 1)
    amp = np.where(disc, np.sqrt(np.maximum(m, 0)), 0.0)
    ky, kx = spatial_frequencies((wy, wx), sampling_A, xp=np, dtype=np.float64)
    # pixel j holds the beam at angle (j − n//2 − offset)·Δα: the aberrations at the true angles, which
    # centres the probe's spectrum on the recorded beam (a tilt of ≤ ½ pixel: exact for one slice; over a
    # thickness z it shifts the probe laterally by λ·offset·Δk·z, negligible for thin samples)
    chi = aberration_function(ky - offset_px[0] / (wy * sampling_A[0]), kx - offset_px[1] / (wx * sampling_A[1]),
                              wavelength_A(energy_keV), aberrations)
    centre = ((wy // 2) * sampling_A[0], (wx // 2) * sampling_A[1])
    pk = amp * np.exp(-1j * chi) * np.asarray(fourier_shift_phase(ky, kx, centre))
    p0 = np.fft.ifft2(pk)
    p0 /= np.sqrt((np.abs(p0) ** 2).sum())
    modes = [p0]
    if n_modes > 1:
        # further modes: the first one's spectrum times low-order polynomials of k over the disc (|k|² first,
        # the shape a defocus spread gives), so they stay inside the bright field and add no dark-field
        kr = math.sqrt(float((disc * (ky**2 + kx**2)).max())) or 1.0
        qy, qx = ky / kr, kx / kr
        polys = [qy**2 + qx**2 - 0.5, qy + 0 * qx, qx + 0 * qy, qy * qx, qy**2 - qx**2]
        for i in range(1, n_modes):
            f = polys[(i - 1) % len(polys)] * (1.0 + 0.1 * ((i - 1) // len(polys)))
            mi = np.fft.ifft2(pk * f)
            modes.append(mi / np.sqrt((np.abs(mi) ** 2).sum()))
        modes = np.stack(modes)
        modes[0] *= math.sqrt(1.0 - extra_power)
        modes[1:] *= math.sqrt(extra_power / (n_modes - 1))
    else:
        modes = np.stack(modes)
    return orthogonalize_modes(xp.asarray(modes.astype(np.complex64)), xp)


def remove_global_part(offsets, nominal, frame: str):
    """Offsets minus their mean (``frame='shift'``) or their least-squares affine part in the nominal
    positions (``'affine'``): that part moves object and positions together and is (nearly) not measurable."""
    if frame == "none":
        return offsets
    if frame == "shift" or len(offsets) < 6:
        return offsets - offsets.mean(axis=0)
    c = nominal - nominal.mean(axis=0)
    span = np.maximum(np.abs(c).max(axis=0), 1e-12)
    design = np.column_stack([np.ones(len(c)), c / span])
    coef, *_ = np.linalg.lstsq(design, offsets, rcond=None)
    return offsets - design @ coef


def _adjacent_batches(n: int, batch_size: int) -> list[np.ndarray]:
    """Contiguous runs of scan indices (raster order), sizes as equal as possible."""
    n_b = max(1, -(-n // batch_size))
    return [np.asarray(b) for b in np.array_split(np.arange(n), n_b)]


def _random_batches(n: int, batch_size: int, rng) -> list[np.ndarray]:
    """A random partition of the scan indices into batches of (as equal as possible) ``batch_size``."""
    n_b = max(1, -(-n // batch_size))
    return [np.sort(b) for b in np.array_split(rng.permutation(n), n_b)]


def butterworth_lowpass(shape, sampling_A, q_lowpass_invA: float, order: float, xp=np):
    """Gain 1/(1 + (|q|/q_c)^(2·order)) on the FFT grid of ``shape`` (float32): 1 at q = 0, ½ at q_c.

    This is py4DSTEM's ``q_lowpass``/``butterworth_order`` kernel (the square of the textbook amplitude
    response 1/√(1 + (q/q_c)^(2n))), so its parameters carry over; You 2025 use q_c = 1.51 1/Å, order 2.
    """
    ky, kx = spatial_frequencies(tuple(shape), sampling_A, xp=np, dtype=np.float64)
    q2 = (ky**2 + kx**2) / float(q_lowpass_invA) ** 2
    return xp.asarray((1.0 / (1.0 + q2 ** float(order))).astype(np.float32))


def _slice_thickness(params, geometry) -> float:
    if params.slice_thickness_A is not None:
        return float(params.slice_thickness_A)
    extra = geometry.extra or {}
    dz, n_sim = geometry.slice_thickness_A, extra.get("n_slices_simulated")
    if dz is not None and n_sim:
        return float(dz) * int(n_sim) / params.n_slices
    return 2.0


# --- Algorithm 1 ---------------------------------------------------------------------------------
def reconstruct_msp(patterns, positions_A, geometry, params: MSPParams | dict | None = None, xp=np,
                    init: MSPResult | None = None, progress=None, frame_positions_A=None) -> MSPResult:
    """Multislice ptychography (You 2025 Alg. 1) of one 4D-STEM data set.

    Parameters
    ----------
    patterns : (N, k_y, k_x) intensities of the present positions (any array-like, e.g. a memmap; read
        per batch), fftshifted, unscattered beam at (k_y//2, k_x//2); counts or fractions.
    positions_A : (N, 2) nominal probe positions (y, x) Å, in raster order (adjacent indices = adjacent
        probes; batches are contiguous runs).
    geometry : :class:`tembench.Geometry` with energy_keV, detector_sampling_mrad, aberrations_A /
        defocus_A (C10 = −Δf), optionally ``extra['detector_centre_px']``.
    init : a previous result (same detector and slices) to continue from — its potentials on its
        field, probe and refined positions (part 2 calls this per tilt).
    frame_positions_A : positions (M, 2) Å that lay out the object field (default ``positions_A``); pass the
        whole scan when reconstructing a subset (a half set), so that subsets share one grid.
    """
    p = params if isinstance(params, MSPParams) else MSPParams(**(params or {}))
    pos0 = np.asarray(positions_A, dtype=np.float64).reshape(-1, 2)
    n_pos = len(pos0)
    if not hasattr(patterns, "shape"):
        patterns = np.asarray(patterns)
    shape = tuple(patterns.shape)
    if len(shape) != 3 or shape[0] != n_pos:
        raise TembenchError(f"msp: patterns must be (N, k_y, k_x) with N = {n_pos} positions, got shape {shape}")
    if n_pos < 1:
        raise TembenchError("msp: no diffraction patterns to reconstruct (all positions masked?)")
    if not np.all(np.isfinite(pos0)):
        raise TembenchError("msp: positions_A contain NaN or inf")
    if geometry.energy_keV is None or geometry.detector_sampling_mrad is None:
        raise TembenchError("msp needs Geometry.energy_keV and Geometry.detector_sampling_mrad (from stem4d)")
    wy, wx = shape[1:]
    if wy < 8 or wx < 8:
        raise TembenchError(f"msp: patterns of {wy}x{wx} pixels are too small (need >= 8x8)")
    offset_px = detector_offset_px(geometry, (wy, wx))
    energy = float(geometry.energy_keV)
    sigma = interaction_constant(energy)
    s = reconstruction_sampling((wy, wx), geometry.detector_sampling_mrad, energy)
    dz = _slice_thickness(p, geometry)
    ab = normalize_aberrations(geometry.aberrations_A or {})
    if "C10" not in ab and geometry.defocus_A:
        ab["C10"] = -float(geometry.defocus_A[0])
    if p.defocus_A is not None:
        ab["C10"] = -float(p.defocus_A)
    rng = np.random.default_rng(p.seed)

    # normalise: mean total per pattern = 1 (the engine's unit-power probe); one streaming pass
    total = 0.0
    mean = np.zeros((wy, wx), np.float64)
    for b in _adjacent_batches(n_pos, 32):  # small float32 chunks (sums in float64): little working memory
        chunk = np.asarray(patterns[b], dtype=np.float32)
        lo = float(chunk.min())
        if not math.isfinite(lo) or not math.isfinite(float(chunk.max())):
            raise TembenchError("msp: the patterns contain NaN or inf (mask dead pixels / absent patterns first)")
        if lo < 0:
            raise TembenchError("msp: the patterns contain negative intensities (subtract the dark level properly)")
        part = chunk.sum(axis=0, dtype=np.float64)
        mean += part
        total += float(part.sum())
    if not total > 0:
        raise TembenchError("msp: the patterns hold no signal (sum 0)")
    scale = total / n_pos
    mean /= total

    # object field: all probe windows plus padding; pixel 0 at origin_A in the sample frame
    pad = (max(1, int(math.ceil(p.object_padding_A / s[0]))), max(1, int(math.ceil(p.object_padding_A / s[1]))))
    if init is not None:
        v = xp.asarray(init.potentials_VA, dtype=xp.complex64).copy()
        if v.shape[0] != p.n_slices:
            raise TembenchError(f"msp: init has {v.shape[0]} slices, params ask for {p.n_slices}")
        if not np.allclose(init.sampling_A, s, rtol=1e-6):
            raise TembenchError(f"msp: init sampling {init.sampling_A} Å differs from the data's {s} Å")
        origin = tuple(init.origin_A)
        field_gpts = v.shape[1:]
    else:
        frame = pos0 if frame_positions_A is None else np.asarray(frame_positions_A, np.float64).reshape(-1, 2)
        lo = np.minimum(frame.min(axis=0), pos0.min(axis=0))
        hi = np.maximum(frame.max(axis=0), pos0.max(axis=0))
        origin = tuple(float(lo[a] - (shape[1 + a] // 2 + pad[a]) * s[a]) for a in range(2))
        field_gpts = tuple(int(math.ceil((hi[a] - lo[a]) / s[a])) + shape[1 + a] + 2 * pad[a] + 2 for a in range(2))
        v = xp.zeros((p.n_slices,) + field_gpts, dtype=xp.complex64)
    if init is not None and init.probe is not None and init.probe.shape[-2:] == (wy, wx):
        probe = xp.asarray(init.probe, dtype=xp.complex64)
        if probe.shape[0] != p.n_probe_modes:
            raise TembenchError(f"msp: init probe has {probe.shape[0]} modes, params ask for {p.n_probe_modes}")
    else:
        probe = initial_probe(mean, s, energy, ab, p.n_probe_modes, p.extra_mode_power, rng, xp, offset_px)
    pos = pos0.copy() if init is None or init.positions_A is None else np.asarray(init.positions_A, float).copy()
    if pos.shape != pos0.shape:
        raise TembenchError(f"msp: init positions {pos.shape} do not match the patterns' {pos0.shape}")

    # a position's window must stay inside the field: clip to this box (field frame, Å)
    half = np.array([(wy // 2) * s[0], (wx // 2) * s[1]])
    lo_ok = half + np.array(s)
    hi_ok = np.array([(field_gpts[0] - wy + wy // 2 - 1) * s[0], (field_gpts[1] - wx + wx // 2 - 1) * s[1]])
    org = np.asarray(origin)
    if np.any(pos0 - org < lo_ok - 1e-9) or np.any(pos0 - org > hi_ok + 1e-9):
        raise TembenchError("msp: probe windows of the given positions do not fit the init's object field")

    batches = (_adjacent_batches(n_pos, p.batch_size) if p.batch_order == "adjacent"
               else _random_batches(n_pos, p.batch_size, rng))
    lowpass = (butterworth_lowpass(field_gpts, s, p.q_lowpass_invA, p.butterworth_order, xp)
               if p.q_lowpass_invA is not None else None)
    hist: dict[str, list[float]] = {"loss": [], "loss_relative": [], "position_update_rms_A": [],
                                    "probe_power_mode0": [], "step_scale": [], "time_s": []}
    damp = 1.0
    sum_meas = total / scale  # = n_pos: Σ of normalised intensities, for the relative loss
    kw = dict(energy_keV=energy, sampling_A=s, complex_potential=p.reconstruct_absorption, amplitude_eps=p.eps,
              band_limit=p.band_limit, xp=xp)
    for it in range(p.n_iterations):
        t0 = time.perf_counter()
        refine_probe = it >= p.start_probe_iter
        refine_pos = p.start_position_iter is not None and it >= p.start_position_iter
        loss_it = 0.0
        dpos = np.zeros_like(pos)
        for bi in rng.permutation(len(batches)):
            idx = batches[bi]
            meas = xp.asarray(np.asarray(patterns[idx], dtype=np.float32) / np.float32(scale))
            q = pos[idx] - org  # field frame
            whole = np.round(q / np.asarray(s)).astype(np.int64)
            y0, x0 = int(whole[:, 0].min()) - wy // 2, int(whole[:, 1].min()) - wx // 2
            y1, x1 = int(whole[:, 0].max()) - wy // 2 + wy, int(whole[:, 1].max()) - wx // 2 + wx
            sub = v[:, y0:y1, x0:x1]
            if not p.reconstruct_absorption:
                sub = sub.real
            local = q - np.array([y0 * s[0], x0 * s[1]])
            out = stem_loss_and_gradient(sub, meas, dz, positions_A=local, probe=probe,
                                         return_position_curvature=refine_pos, **kw)
            loss_b, g_v, g_p = out[:3]
            loss_it += loss_b
            # object: Gauss–Newton diagonal normalisation by the batch's illumination
            illum = xp.zeros((y1 - y0, x1 - x0), xp.float32)
            pint = (xp.abs(probe) ** 2).sum(axis=0)
            for (oy, ox) in whole - np.array([y0 + wy // 2, x0 + wx // 2]):
                illum[oy:oy + wy, ox:ox + wx] += pint
            den = (2.0 * sigma**2 * p.n_slices) * ((1 - p.illumination_reg) * illum
                                                   + p.illumination_reg * float(illum.max()))
            step = (damp * p.step_size / den).astype(xp.float32)
            upd = sub - step * g_v
            if p.l1_imag > 0 and p.reconstruct_absorption:
                thr = step * np.float32(p.l1_imag)
                im = upd.imag
                upd = upd.real + 1j * (xp.sign(im) * xp.maximum(xp.abs(im) - thr, 0))
            v[:, y0:y1, x0:x1] = upd.astype(xp.complex64)
            if refine_probe:
                probe = probe - (damp * p.probe_step_size / (2.0 * len(idx))) * g_p
                probe = orthogonalize_modes(probe.astype(xp.complex64), xp)
            if refine_pos:
                g_pos, h_pos = out[3], out[4]
                mu = POSITION_MU * float(np.mean(np.trace(h_pos, axis1=1, axis2=2))) + 1e-30
                d = -damp * p.position_step_size * np.linalg.solve(h_pos + mu * np.eye(2), g_pos[..., None])[..., 0]
                cap = 0.5 * np.asarray(s)
                d = np.clip(d, -cap, cap)
                dpos[idx] = d
                pos[idx] += d
        if lowpass is not None:
            v = ifft2(fft2(v) * lowpass).astype(xp.complex64)
            if not p.reconstruct_absorption:
                v = v.real.astype(xp.complex64)
        if refine_pos:
            off = remove_global_part(pos - pos0, pos0, p.position_frame)
            dpos += off - (pos - pos0)
            off = np.clip(off, -p.max_position_shift_A, p.max_position_shift_A)
            pos = np.clip(pos0 + off, org + lo_ok, org + hi_ok)
        hist["loss"].append(float(loss_it))
        hist["loss_relative"].append(float(loss_it / sum_meas))
        hist["position_update_rms_A"].append(float(np.sqrt((dpos**2).sum(axis=1).mean())))
        pw = asnumpy((xp.abs(probe) ** 2).sum(axis=(-2, -1)))
        hist["probe_power_mode0"].append(float(pw[0] / pw.sum()))
        hist["time_s"].append(time.perf_counter() - t0)
        if it > 0 and loss_it > 1.5 * hist["loss"][-2]:
            damp *= 0.5  # a rising loss means the steps overshoot: halve them all (recorded in the history)
        hist["step_scale"].append(damp)
        if not math.isfinite(loss_it):
            raise TembenchError(f"msp diverged at iteration {it} (loss {loss_it}); reduce step_size / probe_step_size")
        if progress is not None:
            progress(it + 1, p.n_iterations)
    return MSPResult(potentials_VA=asnumpy(v), probe=asnumpy(probe), positions_A=pos, sampling_A=s,
                     origin_A=origin, slice_thickness_A=dz, pattern_scale=float(scale), history=hist)


# --- the reconstructor ---------------------------------------------------------------------------
class _PresentRows:
    """Row view (N_present, k_y, k_x) of (N, k_y, k_x) patterns through an index list: a memory-mapped
    data set is read batch by batch, never copied whole."""

    def __init__(self, flat, present):
        self.flat, self.present = flat, np.asarray(present)
        self.shape = (len(self.present),) + tuple(flat.shape[1:])

    def __getitem__(self, idx):
        return np.asarray(self.flat[self.present[np.asarray(idx)]])


def present_patterns(measurement, method: str = "msp"):
    """(patterns (N, k_y, k_x) of the present positions, their nominal positions (N, 2) Å, their flat
    indices, the scan shape) of a ``4dstem`` measurement, honouring ``extras['pattern_mask']``."""
    if measurement.kind != "4dstem":
        raise TembenchError(f"{method}: accepts measurement kind '4dstem', got {measurement.kind!r}")
    data = measurement.data
    if np.ndim(data) != 4:
        raise TembenchError(f"{method}: 4D-STEM data must be (scan_y, scan_x, k_y, k_x), got shape {np.shape(data)}")
    sy, sx, ky, kx = data.shape
    pos = measurement.geometry.scan_positions_A
    if pos is None:
        raise TembenchError(f"{method} needs Geometry.scan_positions_A (the probe positions, Å)")
    pos = np.asarray(pos, np.float64).reshape(-1, 2)
    if len(pos) != sy * sx:
        raise TembenchError(f"{method}: {len(pos)} scan positions for a {sy}x{sx} scan")
    flat = data.reshape(sy * sx, ky, kx)
    mask = measurement.extras.get("pattern_mask")
    if mask is None:
        return flat, pos, np.arange(sy * sx), (sy, sx)
    mask = np.asarray(mask)
    if mask.shape != (sy, sx) or mask.dtype != bool:
        raise TembenchError(f"{method}: extras['pattern_mask'] must be bool of the scan shape {(sy, sx)}, "
                            f"got {mask.dtype} {mask.shape}")
    present = np.flatnonzero(mask.ravel())
    if len(present) == 0:
        raise TembenchError(f"{method}: extras['pattern_mask'] marks no pattern as present")
    return _PresentRows(flat, present), pos[present], present, (sy, sx)


class MSP(Reconstructor):
    """Multislice ptychography (You 2025 Alg. 1): complex slice potentials, mixed-state probe and probe
    positions from one 4D-STEM scan by minibatch gradient steps on the amplitude loss (eq 16).

    Output: the projected potential Σ_n Re V_n (V·Å) over the scanned area (the bounding box of the whole
    scan, also for a masked subset) on the reconstruction grid (pixel λ/(n_k·Δα)); ``extras`` hold the complex slices on the whole field (``slices_VA``,
    ``field_origin_A``), the probe modes, the refined and nominal positions of the patterns used.
    Honours ``extras['pattern_mask']`` (absent patterns are ignored).
    """

    name = "msp"
    accepts = ("4dstem",)
    produces = "image"
    version = "2"
    supports_pattern_mask = True
    Params = MSPParams

    def reconstruct(self, measurement, params, xp):
        patterns, pos, present, scan = present_patterns(measurement, self.name)
        t0 = time.perf_counter()
        all_pos = np.asarray(measurement.geometry.scan_positions_A, np.float64).reshape(-1, 2)
        # the whole scan lays out the grid and the output region, so that half sets share them
        res = reconstruct_msp(patterns, pos, measurement.geometry, params, xp=xp, frame_positions_A=all_pos)
        elapsed = time.perf_counter() - t0
        yi, xi, org = res.scan_region(all_pos)
        proj = res.projection()[yi, xi]
        return Reconstruction(
            kind="image", data=np.asarray(proj, np.float32), sampling_A=res.sampling_A,
            quantity="projected_potential_VA", origin_A=org, history=dict(res.history),
            extras={"slices_VA": res.potentials_VA, "field_origin_A": tuple(res.origin_A),
                    "slice_thickness_A": res.slice_thickness_A, "probe_modes": res.probe,
                    "positions_A": res.positions_A, "positions_nominal_A": pos, "pattern_indices": present,
                    "pattern_scale": res.pattern_scale, "n_patterns_used": int(len(present))},
            timings_s={"msp": elapsed})
