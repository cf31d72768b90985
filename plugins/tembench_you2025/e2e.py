"""End-to-end multislice ptychographic tomography (You, Romanov & Pelz 2025, Algorithm 3, eqs 14–19).

Model of tilt k (eq 14), in the frame of :mod:`tembench_you2025.tomo_common`:

    W_k = slabs(V, Θ_k, b, s) = s·B_b A_{Θ_k} V          complex slabs (V·Å): Re = potential, Im = absorption
    positions_k = ρ_k − τ_k − grid.origin (y, x)          an object shift by +τ is a probe shift by −τ
    Î_k = Σ_i |F M_{ψ_k,i}(exp(iσ W_k), positions_k)|²   the core engine (batch-cropped multislice, K modes)
    L_k = Σ (√(Î_k + ε) − √(I_k + ε))²  [+ λ‖Im V‖₁]      eq 16, patterns normalised to unit mean total

evaluated by :func:`tembench.physics.stem.stem_loss_and_gradient` on the slabs (slab thickness b·s, the last one
shorter when b does not divide nz), whose slab gradient goes back to the volume through the exact adjoint
``tomo_common.slabs_adjoint`` (eqs 18–19: ∂L/∂V* = s·A_Θ† B_b† ∂L/∂W*). :func:`tilt_loss_and_gradient`
returns the gradients w.r.t. V (real and imaginary parts), the probe modes, the probe positions and the
translation τ_k (∂L/∂τ = −Σ_j ∂L/∂ρ_j); each is checked by central differences in the tests. The Euler
angles are held fixed at their ``joint_linear_tomo`` values, as in the paper's Alg. 3.

Probe reference plane. The msp probe of a tilt refers to the entrance plane of the simulated slice stack
(``geometry.extra['entrance_z_A']``, z after rotation, in the sample frame; without it the grid's top).
The volume's slabs start at z = grid.origin_A[0] (voxel i covers [i·s, (i+1)·s) as the core rotation's box
[0, n·s)), so the probe is propagated by ``grid.origin_A[0] − entrance_z_A`` (Fresnel, the core propagator;
forward = positive distance) before the reconstruction (:func:`probe_at_volume_entrance`).

Algorithm 3 as implemented (:func:`reconstruct_e2e`): V⁰ = 0 (or a given start); per epoch the tilts in turn
(``tilt_order``), each with its own probe ψ_k; per tilt the patterns in batches of ``batch_size`` adjacent scan
indices, visited in a reshuffled order; per batch one preconditioned gradient step on the volume, then (from
``start_probe_epoch`` on) on ψ_k and (from ``start_position_epoch`` on, off by default as in the paper's runs) on
the batch's probe positions (msp's capped Newton steps with the engine's Gauss–Newton curvature; after each tilt
the affine part of its offsets is removed: the shift belongs to τ_k, which stays fixed); the L1 shrinkage of
Im V (eq 17).

Step normalisation (msp's Gauss–Newton diagonal, :mod:`tembench_you2025.msp`): the slab step
ΔW = −γ₁·g_W / (2σ²·n_slabs·[(1−α)·Σ_b|ψ_b|² + α·max Σ_b|ψ_b|²]) is the full Gauss–Newton step of the batch's
slabs; the volume takes the least-norm change that realises it, ΔV = Sᵀ(S Sᵀ)⁻¹ΔW ≈ Sᵀ ΔW/(s²·b)
(S Sᵀ = s²·b·I for the binning B_b exactly and up to the interpolation's blur for the rotation).

``volume_update``:

* ``'minibatch'`` — Alg. 3 literally: V ← V + ΔV after every batch (one rotation and one adjoint rotation of
  V per batch), shrinkage of Im V after every batch;
* ``'tilt'`` (default) — the batches of a tilt step on its slabs W_k (later batches see the earlier batches'
  changes there, as they would in V up to the interpolation blur), and V takes the sum of the tilt's
  least-norm changes once at the end of the tilt: one rotation and one adjoint per tilt instead of per batch
  (with general Euler angles — three plane rotations each way — a rotation pair of a 96³ volume costs about
  as much as a batch of 32 patterns' multislice: ``benchmarks/test_you2025_e2e.py`` measured 2.55× the FFT
  floor per tilt and epoch for 'tilt' and 4.6× for 'minibatch', load 11–14). The shrinkage is then applied
  once per tilt with the sum of the tilt's thresholds. With one batch per tilt both modes are the same step
  (test); with several they differ by the rotation's interpolation blur (correlation 0.9999 after 3 epochs).

The shrinkage threshold in the volume is λ·P_V with P_V = A_Θ† B_b†(step_W)/(s²·b), the volume step's
diagonal preconditioner (Sᵀ(step ⊙ g) ≈ P_V ⊙ Sᵀg). If an epoch's loss rises above 1.5× the previous one,
all steps are halved (``history['step_scale']``), as msp.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import Field, field_validator

from tembench import Params, Reconstruction, Reconstructor
from tembench.backend import asnumpy, get_array_module
from tembench.errors import TembenchError
from tembench.physics.constants import interaction_constant, wavelength_A
from tembench.physics.propagation import propagate
from tembench.physics.rotation import binned_thicknesses
from tembench.physics.stem import GRADIENT_BATCH_BYTES, stem_loss_and_gradient
from tembench_you2025.msp import POSITION_MU, _adjacent_batches, orthogonalize_modes, remove_global_part
from tembench_you2025.tomo_common import TomoGrid, slabs, slabs_adjoint


class E2EParams(Params):
    """Parameters of :func:`reconstruct_e2e` (Alg. 3)."""

    n_epochs: int = Field(10, ge=1, le=10000, description="passes over all tilts (E in Alg. 3)")
    slab_voxels: int = Field(4, ge=1, le=4096, description="b: voxels binned into one multislice slab (the slab "
                             "thickness is b·voxel; the paper: slightly thinner than the probe's depth of field)")
    batch_size: int = Field(32, ge=1, le=100000, description="patterns per minibatch (adjacent scan indices)")
    step_size: float = Field(1.0, gt=0, le=10, description="volume step γ₁ (1 = the batch's full Gauss–Newton "
                             "step on its slabs)")
    probe_step_size: float = Field(0.25, gt=0, le=10, description="probe step γ₂ (as msp)")
    start_probe_epoch: int | None = Field(1, ge=0, description="refine each tilt's probe from this epoch on; "
                                          "None: never")
    illumination_reg: float = Field(0.1, gt=0, le=1, description="α of the step normalisation (as msp)")
    l1_imag: float = Field(0.0, ge=0, description="λ of eq 16 on Im V (per V and voxel, for patterns normalised "
                           "to unit mean sum); 0: no shrinkage")
    eps: float = Field(1e-6, ge=0, description="ε of eq 16, in units of the normalised pattern")
    volume_update: Literal["tilt", "minibatch"] = Field(
        "tilt", description="minibatch: V updated after every batch (Alg. 3 literally); tilt: the batches step on "
                            "the tilt's slabs and V takes their least-norm sum once per tilt (one rotation pair "
                            "per tilt instead of per batch)")
    start_position_epoch: int | None = Field(None, ge=0, description="refine the probe positions from this epoch "
                                             "on (Newton steps as msp); None: never (the paper's runs)")
    position_step_size: float = Field(1.0, gt=0, le=10, description="position step (1 = full Newton step)")
    position_frame: Literal["affine", "shift", "none"] = Field(
        "affine", description="after each tilt remove the affine part (or mean) of its position offsets: that part "
                              "moves object and positions together (the tilt's τ carries the shift)")
    max_position_shift_A: float = Field(2.0, gt=0, description="refined positions stay within this of the start (Å)")
    tilt_order: Literal["sequential", "random"] = Field("sequential", description="tilt visiting order per epoch")
    reconstruct_absorption: bool = Field(True, description="complex V (Im V = absorption); False: real V")
    positivity: bool = Field(False, description="project Re V onto ≥ 0 after every volume update (not in the "
                             "paper's Alg. 3; joint_linear_tomo's constraint)")
    band_limit: float | None = Field(None, gt=0, le=1.5, description="propagator band limit (fraction of Nyquist); "
                                     "None: every detector pixel is modelled (as msp)")
    seed: int = Field(0, ge=0, description="seed of the batch and tilt orders")


@dataclass
class TiltGradient:
    """Loss of one tilt and its gradients (dL = Re Σ conj(g)·d for complex parameters)."""

    loss: float
    volume: np.ndarray                   # (nz, ny, nx) complex64 (float32 for a real volume)
    probe: np.ndarray                    # (K, wy, wx) complex64
    positions: np.ndarray | None = None  # (N, 2) ∂L/∂ρ (y, x) per Å
    translation: np.ndarray | None = None  # (2,) ∂L/∂τ (y, x) per Å


@dataclass
class E2EResult:
    """Outcome of :func:`reconstruct_e2e`."""

    volume: np.ndarray                   # (nz, ny, nx) complex64, V: Re = potential, Im = absorption
    probes: np.ndarray                   # (n_tilts, K, wy, wx) complex64, at the volume's entrance plane
    grid: TomoGrid
    euler_deg: np.ndarray                # (n_tilts, 3) held fixed
    translations_A: np.ndarray           # (n_tilts, 2) held fixed
    positions_A: list = field(default_factory=list)  # per tilt (N_k, 2) probe positions (refined or as given)
    history: dict[str, list[float]] = field(default_factory=dict)


# --- model pieces ------------------------------------------------------------------------------------------
def propagate_probe(probe, distance_A: float, sampling_A, energy_keV: float, xp=None):
    """Probe modes (K, wy, wx) propagated by ``distance_A`` along the beam (Fresnel, no band limit; > 0 forward)."""
    xp = xp or get_array_module(probe)
    if float(distance_A) == 0.0:
        return xp.asarray(probe, xp.complex64).copy()
    out = propagate(xp.asarray(probe, xp.complex64), float(distance_A), sampling_A, wavelength_A(energy_keV),
                    "fresnel", band_limit=None, xp=xp)
    return out.astype(xp.complex64)


def volume_entrance_z_A(grid: TomoGrid) -> float:
    """z (sample frame) of the plane where the volume's first slab starts: voxel 0's face, grid.origin_A[0]."""
    return float(grid.origin_A[0])


def probe_at_volume_entrance(probe, geometry, grid: TomoGrid, sampling_A, xp=None):
    """The probe (of msp, referred to the simulated stack's entrance ``geometry.extra['entrance_z_A']``; absent:
    the grid's top, no propagation) propagated to the volume's entrance plane."""
    ze = (geometry.extra or {}).get("entrance_z_A")
    if ze is None:
        return propagate_probe(probe, 0.0, sampling_A, geometry.energy_keV, xp)
    return propagate_probe(probe, volume_entrance_z_A(grid) - float(ze), sampling_A, geometry.energy_keV, xp)


def tilt_positions_A(positions_A, translation_A, grid: TomoGrid) -> np.ndarray:
    """Probe positions of a tilt in the volume's lateral field frame: ρ − τ − origin (y, x) Å."""
    p = np.asarray(positions_A, np.float64).reshape(-1, 2)
    return p - np.asarray(translation_A, np.float64).reshape(1, 2) - np.asarray(grid.origin_yx_A).reshape(1, 2)


def _sampling(grid):
    return (grid.voxel_A, grid.voxel_A)


def _slab_thicknesses(grid, b):
    return binned_thicknesses(grid.shape[0], int(b), grid.voxel_A)


def tilt_loss_and_gradient(volume, patterns, positions_A, euler_deg, translation_A, probe, grid: TomoGrid,
                           slab_voxels: int, *, energy_keV: float, amplitude_eps: float = 0.0,
                           band_limit: float | None = None, return_position_gradient: bool = False,
                           batch_size: int | None = None, xp=None) -> TiltGradient:
    """Eq 16 (without the L1 term) of one tilt over the whole periodic lateral field, and its gradients.

    ``volume`` (nz, ny, nx) real or complex (V) on ``grid``; ``patterns`` (N, k_y, k_x) normalised the way the
    loss is wanted (fftshifted, window = pattern); ``positions_A`` (N, 2) sample-frame probe positions (y, x);
    ``translation_A`` τ (y, x); ``probe`` (K, wy, wx) at the volume's entrance plane.
    """
    xp = xp or get_array_module(volume)
    complex_v = bool(xp.iscomplexobj(volume))
    w = slabs(volume, euler_deg, slab_voxels, grid.voxel_A, xp=xp)
    pos = tilt_positions_A(positions_A, translation_A, grid)
    out = stem_loss_and_gradient(w, patterns, _slab_thicknesses(grid, slab_voxels), energy_keV=energy_keV,
                                 sampling_A=_sampling(grid), positions_A=pos, probe=probe, band_limit=band_limit,
                                 complex_potential=complex_v, amplitude_eps=amplitude_eps,
                                 return_position_gradient=return_position_gradient, batch_size=batch_size, xp=xp)
    g_v = slabs_adjoint(out[1], euler_deg, slab_voxels, grid.voxel_A, grid.shape[0], xp=xp)
    res = TiltGradient(loss=float(out[0]), volume=g_v, probe=out[2])
    if return_position_gradient:
        res.positions = out[3]
        res.translation = -out[3].sum(axis=0)
    return res


# --- Algorithm 3 -------------------------------------------------------------------------------------------
# Memory: the rotations work on float32 parts (the real and imaginary parts of V in turn), so their temporaries
# (plane copies, sparse products) are half-volumes, and the adjoint is added into V in place.
def _parts(v):
    return (v.real, v.imag) if v.dtype.kind == "c" else (v,)


def _slabs_of(vol, euler, b, s, xp):
    """:func:`tomo_common.slabs` of V, part by part."""
    out = [slabs(xp.ascontiguousarray(part), euler, b, s, xp=xp) for part in _parts(vol)]
    return (out[0] + 1j * out[1]).astype(xp.complex64) if len(out) == 2 else out[0]


def _add_adjoint(vol, grad_slabs, euler, b, s, scale: float, xp):
    """V += scale · slabs_adjoint(grad_slabs), part by part, in place."""
    nz = vol.shape[0]
    for dst, src in zip(_parts(vol), _parts(grad_slabs)):
        dst += slabs_adjoint(xp.ascontiguousarray(src) * np.float32(scale), euler, b, s, nz, xp=xp)


def _box(q, s, window, field):
    """The batch's bounding box of whole-pixel windows (y0, y1, x0, x1) (may leave the field: wrapped)."""
    wy, wx = window
    whole = np.round(q / s).astype(np.int64)
    y0, x0 = int(whole[:, 0].min()) - wy // 2, int(whole[:, 1].min()) - wx // 2
    y1, x1 = int(whole[:, 0].max()) - wy // 2 + wy, int(whole[:, 1].max()) - wx // 2 + wx
    return whole, (y0, y1, x0, x1)


class _Crop:
    """A box of the slabs (wrapped periodically, as the engine's field); the whole field when it does not fit."""

    def __init__(self, box, field, xp):
        y0, y1, x0, x1 = box
        ny, nx = field
        self.full = (y1 - y0) > ny or (x1 - x0) > nx
        self.origin = (0, 0) if self.full else (y0, x0)
        if self.full:
            self.index = (slice(None), slice(None), slice(None))
        elif 0 <= y0 and y1 <= ny and 0 <= x0 and x1 <= nx:
            self.index = (slice(None), slice(y0, y1), slice(x0, x1))
        else:  # wrapped: unique indices (the box is not larger than the field)
            iy = xp.asarray(np.arange(y0, y1) % ny)[:, None]
            ix = xp.asarray(np.arange(x0, x1) % nx)[None, :]
            self.index = (slice(None), iy, ix)


def _illumination(probe, whole, origin, shape, window, xp):
    wy, wx = window
    illum = xp.zeros(shape, xp.float32)
    pint = (xp.abs(probe) ** 2).sum(axis=0)
    ny, nx = shape
    for (oy, ox) in whole - np.array([origin[0] + wy // 2, origin[1] + wx // 2]):
        if 0 <= oy and oy + wy <= ny and 0 <= ox and ox + wx <= nx:
            illum[oy:oy + wy, ox:ox + wx] += pint
        else:  # whole-field crop: wrap
            iy = (np.arange(oy, oy + wy) % ny)[:, None]
            ix = (np.arange(ox, ox + wx) % nx)[None, :]
            illum[iy, ix] += pint
    return illum


def engine_chunk(n_patterns: int, n_modes: int, window, n_slabs: int) -> int:
    """Patterns per chunk of the engine for a batch of ``n_patterns``: near its default (what fits
    ``GRADIENT_BATCH_BYTES`` with the kept waves), preferring a divisor of the batch so that no chunk is padded
    (the default's padding cost 9 % of the FFTs at batches of 32, 2 modes, 48², 12 slabs)."""
    per = n_modes * window[0] * window[1] * 8 * (n_slabs + 3)
    c = max(1, min(int(GRADIENT_BATCH_BYTES // per), n_patterns))
    divisors = [d for d in range(max(1, c // 2), min(n_patterns, (3 * c) // 2) + 1) if n_patterns % d == 0]
    if divisors:
        return min(divisors, key=lambda d: (abs(d - c), -d))
    n_chunks = -(-n_patterns // c)
    return -(-n_patterns // n_chunks)


def normalised_patterns(patterns, scale):
    return np.asarray(patterns, np.float32) / np.float32(scale)


def reconstruct_e2e(patterns, positions_A, geometry, grid: TomoGrid, euler_deg, translations_A, probes,
                    params: E2EParams | dict | None = None, *, pattern_scales=None, init_volume=None, xp=np,
                    progress=None) -> E2EResult:
    """End-to-end ptychographic tomography (You 2025 Alg. 3) with fixed alignment.

    Parameters
    ----------
    patterns : per tilt (N_k, k_y, k_x) intensities (a list, or an array (n_tilts, N, k_y, k_x); any array-like
        read per batch, e.g. a memmap), fftshifted with the unscattered beam at (k_y//2, k_x//2), adjacent
        indices adjacent probes.
    positions_A : per tilt (N_k, 2) sample-frame probe positions (y, x) Å (nominal or msp-refined).
    geometry : energy_keV (the detector sampling must give the grid's voxel: λ/(k·Δα) = grid.voxel_A).
    grid : the volume's :class:`TomoGrid`; euler_deg (n, 3), translations_A (n, 2): the fixed alignment.
    probes : (n_tilts, K, wy, wx) or (K, wy, wx) probe modes at the volume's entrance plane
        (:func:`probe_at_volume_entrance`).
    pattern_scales : per tilt divisor of the patterns (msp's ``pattern_scale``); default the tilt's mean total.
    init_volume : starting V (default 0, as the paper).
    """
    p = params if isinstance(params, E2EParams) else E2EParams(**(params or {}))
    n_tilts = len(patterns)
    pos_all = [np.array(positions_A[k], np.float64).reshape(-1, 2) for k in range(n_tilts)]  # copies: refined
    euler = np.asarray(euler_deg, np.float64).reshape(n_tilts, 3)
    tau = np.asarray(translations_A, np.float64).reshape(n_tilts, 2)
    probes = np.asarray(probes)
    if probes.ndim == 3:
        probes = np.broadcast_to(probes, (n_tilts,) + probes.shape)
    if probes.ndim != 4 or probes.shape[0] != n_tilts:
        raise TembenchError(f"e2e: probes must be (n_tilts, K, wy, wx) or (K, wy, wx), got {probes.shape}")
    window = tuple(probes.shape[-2:])
    for k in range(n_tilts):
        shp = tuple(np.shape(patterns[k]))
        if len(shp) != 3 or shp[0] != len(pos_all[k]) or shp[1:] != window:
            raise TembenchError(f"e2e: tilt {k}: patterns {shp} do not match {len(pos_all[k])} positions and the "
                                f"{window} probe window")
    energy = float(geometry.energy_keV)
    sigma = interaction_constant(energy)
    nz, ny, nx = grid.shape
    if window[0] > ny or window[1] > nx:
        raise TembenchError(f"e2e: the probe window {window} is larger than the volume's lateral field {(ny, nx)}")
    s = grid.voxel_A
    if geometry.detector_sampling_mrad is not None:
        from tembench_you2025.msp import reconstruction_sampling

        sd = reconstruction_sampling(window, geometry.detector_sampling_mrad, energy)
        if not np.allclose(sd, (s, s), rtol=1e-4):
            raise TembenchError(f"e2e: the detector gives {sd[0]:.5f} x {sd[1]:.5f} Å pixels (λ/(k·Δα)), the grid's "
                                f"voxel is {s:.5f} Å; build the grid on the ptychographic pixel")
    b = int(p.slab_voxels)
    n_slabs = -(-nz // b)
    dz = _slab_thicknesses(grid, b)
    if pattern_scales is None:  # mean total per pattern, summed in float64 over small chunks (no copy of a tilt)
        pattern_scales = [sum(float(np.asarray(patterns[k][c], np.float32).sum(dtype=np.float64))
                              for c in _adjacent_batches(len(pos_all[k]), 32)) / len(pos_all[k])
                          for k in range(n_tilts)]
    scales = [float(v) for v in pattern_scales]
    if not all(v > 0 and math.isfinite(v) for v in scales):
        raise TembenchError(f"e2e: pattern scales must be positive and finite, got {scales}")
    ctype = xp.complex64 if p.reconstruct_absorption else xp.float32
    if init_volume is None:
        vol = xp.zeros((nz, ny, nx), ctype)
    else:
        vol = xp.asarray(init_volume).astype(ctype)
        if vol.shape != (nz, ny, nx):
            raise TembenchError(f"e2e: init_volume {vol.shape} does not match the grid {(nz, ny, nx)}")
    psi = [xp.asarray(probes[k], xp.complex64).copy() for k in range(n_tilts)]
    rng = np.random.default_rng(p.seed)
    batches = [_adjacent_batches(len(pos_all[k]), p.batch_size) for k in range(n_tilts)]
    back = np.float32(1.0 / (s * s * b))         # ΔV = Sᵀ ΔW / (s² b)
    thr_scale = np.float32(p.l1_imag / (s**3 * b))
    shrink = p.l1_imag > 0 and p.reconstruct_absorption
    kw = dict(energy_keV=energy, sampling_A=(s, s), complex_potential=p.reconstruct_absorption,
              amplitude_eps=p.eps, band_limit=p.band_limit, xp=xp)
    hist: dict[str, list[float]] = {"loss": [], "loss_relative": [], "step_scale": [], "time_s": [],
                                    "time_per_tilt_s": []}
    pos_start = [q.copy() for q in pos_all]
    pos_prev = [q.copy() for q in pos_all]
    hist["position_update_rms_A"] = []
    n_meas = float(sum(len(q) for q in pos_all))  # Σ of the normalised intensities
    damp = 1.0

    def positive(v):
        if p.positivity:
            re = _parts(v)[0]
            xp.maximum(re, 0, out=re)
        return v

    def shrink_imag(v, step_w, euler_k):
        """Eq 17 in place: Im V ← sign·max(|Im V| − λ·P_V, 0), P_V = A†B†(step_W)/(s²b) (s³b with slabs_adjoint's s)."""
        im = v.imag
        thr = slabs_adjoint(step_w, euler_k, b, s, nz, xp=xp)
        thr *= thr_scale
        mag = xp.abs(im)
        mag -= thr
        del thr
        xp.maximum(mag, 0, out=mag)
        mag *= xp.sign(im)
        im[...] = mag
        return v

    for epoch in range(p.n_epochs):
        t0 = time.perf_counter()
        loss_ep = 0.0
        refine_probe = p.start_probe_epoch is not None and epoch >= p.start_probe_epoch
        refine_pos = p.start_position_epoch is not None and epoch >= p.start_position_epoch
        dpos_ep = []
        order = rng.permutation(n_tilts) if p.tilt_order == "random" else np.arange(n_tilts)
        for k in (int(i) for i in order):
            q_all = tilt_positions_A(pos_all[k], tau[k], grid)  # rows updated as the batches refine them
            w = _slabs_of(vol, euler[k], b, s, xp)
            tilt_mode = p.volume_update == "tilt"
            if tilt_mode:
                delta = xp.zeros_like(w)
                step_sum = xp.zeros(w.shape, xp.float32) if shrink else None
            probe = psi[k]
            for bi in rng.permutation(len(batches[k])):
                idx = batches[k][bi]
                meas = xp.asarray(normalised_patterns(patterns[k][idx], scales[k]))
                whole, box = _box(q_all[idx], s, window, (ny, nx))
                crop = _Crop(box, (ny, nx), xp)
                sub = w[crop.index]
                local = q_all[idx] - np.array([crop.origin[0] * s, crop.origin[1] * s])
                chunk = engine_chunk(len(idx), probe.shape[0], window, n_slabs)
                out = stem_loss_and_gradient(sub, meas, dz, positions_A=local, probe=probe, batch_size=chunk,
                                             return_position_curvature=refine_pos, **kw)
                loss_b, g_w, g_p = out[:3]
                loss_ep += loss_b
                illum = _illumination(probe, whole, crop.origin, sub.shape[1:], window, xp)
                den = (2.0 * sigma**2 * n_slabs) * ((1 - p.illumination_reg) * illum
                                                    + p.illumination_reg * float(illum.max()))
                step = (damp * p.step_size / den).astype(xp.float32)
                d_w = (-step * g_w).astype(w.dtype)
                if tilt_mode:
                    w[crop.index] = sub + d_w
                    delta[crop.index] += d_w
                    if shrink:
                        step_sum[crop.index] += step
                else:
                    full = xp.zeros_like(w)
                    full[crop.index] = d_w
                    _add_adjoint(vol, full, euler[k], b, s, back, xp)
                    del full
                    vol = positive(vol)
                    if shrink:
                        st = xp.zeros(w.shape, xp.float32)
                        st[crop.index] = step
                        vol = shrink_imag(vol, st, euler[k])
                    w = _slabs_of(vol, euler[k], b, s, xp)
                if refine_probe:
                    probe = probe - (damp * p.probe_step_size / (2.0 * len(idx))) * g_p
                    probe = orthogonalize_modes(probe.astype(xp.complex64), xp)
                if refine_pos:  # msp's Newton step on the batch's positions, capped at half a pixel
                    g_pos, h_pos = out[3], out[4]
                    mu = POSITION_MU * float(np.mean(np.trace(h_pos, axis1=1, axis2=2))) + 1e-30
                    d = -damp * p.position_step_size * np.linalg.solve(h_pos + mu * np.eye(2), g_pos[..., None])[..., 0]
                    d = np.clip(d, -0.5 * s, 0.5 * s)
                    pos_all[k][idx] += d
                    q_all[idx] += d
            psi[k] = probe
            if refine_pos:
                off = remove_global_part(pos_all[k] - pos_start[k], pos_start[k], p.position_frame)
                off = np.clip(off, -p.max_position_shift_A, p.max_position_shift_A)
                dpos_ep.append(pos_start[k] + off - pos_prev[k])
                pos_prev[k] = pos_start[k] + off
                pos_all[k] = pos_prev[k].copy()
            if tilt_mode:
                _add_adjoint(vol, delta, euler[k], b, s, back, xp)
                vol = positive(vol)
                if shrink:
                    vol = shrink_imag(vol, step_sum, euler[k])
                del delta, w
        elapsed = time.perf_counter() - t0
        hist["loss"].append(float(loss_ep))
        hist["loss_relative"].append(float(loss_ep / n_meas))
        hist["time_s"].append(elapsed)
        hist["time_per_tilt_s"].append(elapsed / n_tilts)
        d_all = np.concatenate(dpos_ep) if dpos_ep else np.zeros((1, 2))
        hist["position_update_rms_A"].append(float(np.sqrt((d_all**2).sum(axis=1).mean())))
        if not math.isfinite(loss_ep):
            raise TembenchError(f"e2e diverged at epoch {epoch} (loss {loss_ep}); reduce step_size / probe_step_size")
        if epoch > 0 and loss_ep > 1.5 * hist["loss"][-2]:
            damp *= 0.5
        hist["step_scale"].append(damp)
        if progress is not None:
            progress(epoch + 1, p.n_epochs)
    return E2EResult(volume=asnumpy(vol).astype(np.complex64, copy=False), probes=np.stack([asnumpy(q) for q in psi]),
                     grid=grid, euler_deg=euler, translations_A=tau, positions_A=pos_all, history=hist)


# --- the pipeline: msp → joint_linear_tomo → e2e -----------------------------------------------------------
def _linear_params_type():
    from tembench_you2025.linear_tomo import JointLinearTomoParams

    return JointLinearTomoParams


class E2EPtychoTomoParams(Params):
    """The paper's three-step workflow as one reconstructor: ``linear`` (msp per tilt + Alg. 2, the parameters of
    ``joint_linear_tomo``, with its ``msp``), then ``e2e`` (Alg. 3)."""

    linear: dict = Field(default_factory=dict, description="parameters of joint_linear_tomo (steps 1–2: msp per "
                         "tilt under 'msp', Alg. 2); validated by its Params")
    e2e: E2EParams = Field(default_factory=E2EParams, description="Algorithm 3")
    init_volume: Literal["zero", "linear"] = Field("zero", description="V⁰: zero (the paper) or the linear volume")
    positions: Literal["refined", "nominal"] = Field("refined", description="probe positions per tilt: msp's "
                                                     "refined ones (nominal when msp did not refine) or nominal")

    @field_validator("linear")
    @classmethod
    def _linear(cls, v):
        return _linear_params_type()(**(v or {})).model_dump()


def e2e_stage(measurement, params: E2EPtychoTomoParams, xp=np, progress=None):
    """Steps 1–3 on a ``4dstem_tilt_series``: ``linear_stage`` (msp per tilt, Alg. 2), then Alg. 3 from its
    alignment (held fixed) and msp's probes (propagated to the volume's entrance) and positions.

    Returns (E2EResult, LinearTomoResult, grid, timings_s)."""
    from tembench_you2025.linear_tomo import linear_stage
    from tembench_you2025.msp import present_patterns
    from tembench_you2025.tomo_common import tilt_measurement

    p = params
    lp = _linear_params_type()(**p.linear)
    t0 = time.perf_counter()
    lin, msp, grid = linear_stage(measurement, lp, xp)[:3]
    t1 = time.perf_counter()
    geo = measurement.geometry
    n = len(msp)
    pats, pos, probes, scales = [], [], [], []
    for k in range(n):
        patterns_k, nominal_k, present_k, _ = present_patterns(tilt_measurement(measurement, k), "e2e_ptycho_tomo")
        res_k, used_k = msp[k]
        if not np.array_equal(np.asarray(used_k), np.asarray(present_k)):
            raise TembenchError(f"e2e: tilt {k}: msp used other patterns than the mask gives")
        pats.append(patterns_k)
        pos.append(np.asarray(res_k.positions_A if p.positions == "refined" else nominal_k, np.float64))
        probes.append(asnumpy(probe_at_volume_entrance(xp.asarray(res_k.probe), geo, grid, res_k.sampling_A, xp)))
        scales.append(res_k.pattern_scale)
    init = lin.volume_V if p.init_volume == "linear" else None
    res = reconstruct_e2e(pats, pos, geo, grid, lin.euler_deg, lin.translations_A, np.stack(probes), p.e2e,
                          pattern_scales=scales, init_volume=init, xp=xp, progress=progress)
    t2 = time.perf_counter()
    return res, lin, grid, {"linear_stage": t1 - t0, "e2e": t2 - t1}


class E2EPtychoTomo(Reconstructor):
    """You 2025 end-to-end multislice ptychographic tomography: msp per tilt → joint linear tomography with
    alignment (Alg. 2) → Algorithm 3 (one complex volume updated tilt by tilt by minibatch gradient steps through
    rotation, slab binning, batch-cropped multislice with each tilt's mixed-state probe; amplitude loss; L1
    shrinkage of Im V; probe refinement per tilt), with the alignment of Alg. 2 held fixed.

    Output: Re V (V) on the grid centred on the rotation centre (voxel = the ptychographic pixel); ``extras``:
    ``euler_deg``, ``translations_A`` (from Alg. 2), ``absorption_V`` (Im V), ``probe_modes`` (n_tilts, K, wy, wx)
    at the volume's entrance, ``linear_volume_V`` (step 2's volume, the same data's linear tomography).
    Honours ``extras['pattern_mask']``.
    """

    name = "e2e_ptycho_tomo"
    accepts = ("4dstem_tilt_series",)
    produces = "volume"
    version = "2"  # 2: its linear stage (joint_linear_tomo v2: centres of mass after a 0.1 threshold, best alignment kept)
    supports_pattern_mask = True
    Params = E2EPtychoTomoParams

    def reconstruct(self, measurement, params, xp):
        res, lin, grid, timings = e2e_stage(measurement, params, xp)
        s = grid.voxel_A
        return Reconstruction(
            kind="volume", data=np.ascontiguousarray(res.volume.real, np.float32), sampling_A=(s, s, s),
            quantity="potential_V", origin_A=grid.origin_A,
            history={"loss": res.history["loss"], "loss_relative": res.history["loss_relative"]},
            extras={"euler_deg": res.euler_deg, "translations_A": res.translations_A,
                    "absorption_V": np.ascontiguousarray(res.volume.imag, np.float32), "probe_modes": res.probes,
                    "linear_volume_V": lin.volume_V, "time_per_tilt_epoch_s": res.history["time_per_tilt_s"],
                    "positions_A": np.stack(res.positions_A) if len({len(q) for q in res.positions_A}) == 1
                    else res.positions_A,
                    "shape": list(grid.shape)},
            timings_s=timings)
