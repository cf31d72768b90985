"""Joint rigid alignment and linear tomography (You, Romanov & Pelz 2025, Algorithm 2, eqs 11–13).

Model (frame and conventions of :mod:`tembench_you2025.tomo_common`):

    ŷ_k = A_{0,τ_k} B_N A_{Θ_k,0} V = shift(s · Σ_z euler_rotate(V, Θ_k), τ_k)     (eq 12–13, V·Å)
    L   = Σ_k ‖ŷ_k − y_k‖²

* V (nz, ny, nx) in V, cubic voxel s; euler_rotate is three bilinear plane rotations (rot about z, tilt about y,
  psi about z); the shift moves the content by +τ_k (Fourier phase ramp).
* ∂L/∂V = 2 Σ_k A_k†(ŷ_k − y_k) with the exact adjoint (:func:`project_adjoint`).
* ∂ŷ_k/∂τ_k: the Fourier derivative of the shifted image, −2πi k · F[P_k] · ramp.
* ∂ŷ_k/∂Θ_k: exact for the interpolant — each plane rotation's derivative w.r.t. its angle is a sparse
  derivative-weights operator D(a) = diag(∂a_src/∂a)·∂_a I + diag(∂b_src/∂a)·∂_b I, with ∂I the derivative of the
  bilinear weights (a sample on a grid node — every sample at angle 0 — takes the central difference, the mean of
  the two one-sided slopes: what a central finite difference measures), chained through the three rotations
  (forward mode: three images per tilt).
  The alignment gradients are ∂L/∂τ_k = 2 J_τᵀ r_k, ∂L/∂Θ_k = 2 J_Θᵀ r_k (:func:`loss_and_gradients`).

Algorithm 2 as implemented (:func:`joint_linear_tomography`):

* pre-alignment: τ starts at the thresholded projections' centres of mass (``prealign='com'``): the centre of mass of
  a projection is the projection of the object's, so this is right up to the 3D gauge; without it the volume,
  fitted to every projection, reproduces each misaligned projection and neither the Gauss–Newton step nor a
  cross-correlation with the re-projection moves τ by more than about a feature width (measured: 3.4 Å
  translations stayed put). The threshold before the centres of mass (``com_threshold_fraction``) matters on msp
  projections, whose contrast is not a linear projection: at 0.3 (the default until linear_tomo v2) it keeps only
  the brightest columns of a crystal, and on an aligned 60-tilt needle series (cross_paper_needle_ptycho) the
  centres of mass were off by 0.47 Å median / 2.5 Å max and the loop ended 0.36 / 2.2 Å off (FSC vs truth 0.17
  at 2 Å, against 0.83 with the true alignment); at 0 the background comes in (two 3.4 Å nanocube draws of
  you2025_alignment ended at FSC 10 Å). Measured with ``keep_best_alignment`` on (median / max translation
  error, Å; the six you2025_alignment draws ±1 Å seeds 0–2, ±3.4 Å seeds 0–2, then the needle):

  | threshold | ±1 Å draws | ±3.4 Å draws | needle |
  |---|---|---|---|
  | 0.3 | 0.11/0.31, 0.20/0.35, 0.12/0.23 | 0.16/0.31, 0.66/1.08, 0.17/0.78 | 0.29/2.23 |
  | 0.1 (default) | 0.16/0.27, 0.18/0.35, 0.11/0.25 | 0.17/0.56, 0.19/0.94, 0.15/0.46 | 0.17/1.13 |
  | 0 | 0.16/0.53, 0.24/0.60, 0.12/0.23 | 0.45/1.39, 0.89/1.56, 1.04/1.23 | 0.15/0.92 |

  At 0.1 every draw reaches FSC vs truth ≤ 1.08 Å (at 0.3 one ends at 6.5 Å). Not kept: starting from whichever
  of τ⁰ and the centres of mass ends its first phase at the lower reduced loss — the loss is not a measure of
  alignment quality with fewer data than voxels (two nanocube draws ended lower from τ⁰ and 6–7 Å off).
* the alignment kept (``keep_best_alignment``, default on): each phase ends at the alignment with the lowest
  reduced loss it visited (the start, every iterate, the last update; each with its volume fitted from 0 by T
  steps — phases with joint steps or warm-started volumes keep their last update, their losses are not comparable),
  since the per-tilt steps at fixed V are not descent steps on the reduced loss: on the aligned needle series
  started at the true τ⁰ the loss rose from its start (61.10 → 61.73 ·10⁶ over 6 iterations) while τ walked
  0.11 Å median / 0.44 Å max away. Within one run the loss does track the alignment; across runs from different
  starts it did not (above). Measured at threshold 0.3 on the six nanocube draws, last vs best iterate: max error
  0.31 / 0.35 / 0.29 / 0.41 / 1.25 / 0.95 → 0.31 / 0.35 / 0.23 / 0.31 / 1.08 / 0.78 Å (medians within ±0.04 Å
  but for the 1.25 Å draw: 0.77 → 0.66 Å); one more volume fit per phase.
* pre-processing for the alignment loops (the paper's): an intensity threshold flattening the background
  (y ← max(y − t, 0), t = ``threshold_fraction``·max y) and down-sampling by averaging ``downsample``² pixels; the
  coarse images are re-centred so that the coarse grid turns about the same rotation centre.
* outer loop l = 0..L−1: V ← 0; T volume steps (accelerated projected gradient, FISTA, step 1/Lipschitz from a
  power iteration on AᵀA, optional positivity); then the translations τ (γ₂) and then the Euler angles Θ (γ₃)
  ("the spatial translation is fitted before the 3D rotation angles"). Each alignment step is a damped
  Gauss–Newton step on the block of one tilt (the loss is a sum over tilts and τ_k, Θ_k enter only ŷ_k, so the
  Gauss–Newton matrix is block diagonal: 2×2 per tilt for τ, 3×3 for Θ), scaled by γ and capped
  (``max_translation_step_A``, ``max_euler_step_deg``): γ = 1 is a full Gauss–Newton step
  (``angle_solver='alternating'``: used for τ before ``start_euler_outer``, and for Θ on request).
* joint steps for the angles (``angle_solver='joint'``, the default whenever ``refine_euler`` is set, from outer
  iteration ``start_euler_outer`` on): the volume is warm-started (T FISTA steps from the previous V), then one
  Gauss–Newton step on (V, τ, Θ) together, min ‖A δV + J_τ δτ + J_Θ δΘ + r‖² with δV on the free set V > 0, by
  CGLS (``joint_cg_iterations``, :func:`_joint_gauss_newton`); τ and Θ take the step, V does not (V + δV has
  negative voxels: clipping them made the loss 50× worse than the linearised one, measured) — the next volume
  steps refit V. Why (measured, noise-free, projections made by this operator, so the loss is zero at the truth):
  (1) with positivity off the reduced loss min_V L(V, Θ) is flat in Θ (fewer data than voxels: 11–13 tilts of
  24²–32² pixels for 24³–32³ voxels): only positivity makes the angles measurable, and only weakly; (2) a per-tilt
  step at fixed V ignores that the volume absorbs most of an angle error (the Schur complement of the V block),
  so the alternation creeps: updates shrink by ≈ 10 % per outer iteration and stall — 20 atoms, 24³, 11 tilts
  ±60°, errors 0.5–1.5° on all three angles: rotation error (common rotation removed, Procrustes) median / max
  0.38–0.45° / 0.72–1.19° after 10 iterations (3 draws), 0.21° / 0.81° after 40; (3) the volume must be nearly
  converged for the angle gradient to be unbiased: started AT the true alignment, 30 FISTA steps from V = 0 per
  outer iteration (the paper's V⁰ ← 0) walk the angles away to 0.73° max in 8 iterations, 30 warm-started steps
  to 0.33°, 100 steps from 0 to 0.10°, 300 steps stay within 0.012°. The joint steps (same 10 iterations,
  7 joint, 40 warm-started volume steps, 150 CG iterations; 3.5× the CPU of the alternation) give median /
  max 0.04 / 0.16°, 0.05 / 0.27°, 0.09 / 0.18° on the 3 draws (translations < 0.01 voxel): the issue's 0.2° is
  met in the median, at the end tilts on 2 of 3 draws. Tried and not better: an active set that also frees
  voxels at 0 with a downhill gradient, a Levenberg–Marquardt term on the joint step, more volume steps (100)
  with fewer CG iterations, a thresholded free set (V > 0.05·max: worse, 0.44–0.58°).
* gauges: a common 3D shift d of the object moves every projection by (R_k d)_yx, and a common rotation turns every
  Θ_k; neither is measurable from the projections. After each τ update the part of τ − τ⁰ of the form
  (R_k d)_yx (least-squares d) is removed (``translation_gauge='3d'``; 'mean' removes only the common mean, as
  the paper's "relative shifts"), and after each Θ update the mean change of each Euler angle over the tilts.
  The joint steps fix no gauge inside the loop (CGLS from 0 does not step along the exact null directions; a fix
  would make V inconsistent with the alignment); the τ gauge is removed once before the final volume.
* coarse to fine: ``n_outer`` iterations on the thresholded, down-sampled images (the paper's loop), then
  ``n_outer_full`` on the projections as they are (an extension: the coarse grid blurs the signal; measured on
  noisy msp projections, 6 + 3 iterations: translations 0.036 / 0.059 Å median / max in 37 s instead of
  0.064 / 0.14 Å in 25 s). Θ is updated from outer iteration ``start_euler_outer`` on: while τ is still far off,
  Θ absorbs translation errors.
* final T_final steps at full resolution with the alignment fixed.

What is and is not well determined with the alternating solver (measured before the joint steps existed,
noise-free, 13 tilts ±60°, 32³ voxels of 0.5 Å, atoms projected by the potential code — not this operator):
translations to < 0.1–0.2 voxel; psi (in-plane) to ≈ 0.2–0.3°; the tilt angle of single projections only to
≈ 0.5–0.8° at the end tilts (rms ≈ 0.2–0.3°). The volume is refitted to
every tilt, so it absorbs part of each tilt's angle error: the alternation creeps along flat directions (with
the volume's interpolation bias at the end tilts), although a Gauss–Newton step from the true alignment moves
it by < 0.1° (oracle). 25 tilts and 60 warm-started outer iterations (``reset_volume=False``) bring the tilt
errors of a blob phantom to 0.19° max.

Measured on msp projections (13 tilts ±60°, 0.25 Å voxels, 96³, a 10-atom Cu/Si/O cluster, true translations up
to 3.4 Å and Euler errors N(0, 0.5°) on all three angles, 8 msp iterations per tilt) with the defaults (6 coarse
iterations, angles fixed; 16–31 s for Alg. 2 at load 11): translation errors (3D gauge removed) 0.05 Å median /
0.11 Å max noise-free, 0.06 / 0.14 Å at the paper's 1.9·10⁴ e/Å² per tilt (Poisson) — the paper: half within
0.4 Å, max 0.8 Å. Without the thresholds (0 / 0.1) the noise-free case gives 0.03 / 0.07 Å but the noisy one
fails (0.17 / 1.2 Å). With 6 more iterations at full resolution refining all three angles (155 s) the translations
reach 0.005 / 0.012 Å noise-free, but the angles got worse (tilt rms 0.33° → 0.88°, misorientation median
0.62° → 0.78°; refining tilt and psi on the coarse grid only: tilt rms 2.6°): the projected msp phase is not a
linear projection (dynamical scattering), and the angles follow its inconsistencies along the flat directions.
With the joint steps (you2025_alignment geometry: nanocube, 10 tilts ±45°, 0.4 Å voxels, Euler errors N(0, 0.75°),
10⁵ e/Å² per tilt, one draw; 6 coarse + 4 full-resolution iterations) the angles no longer get worse but do not
improve in the median: rotation error (common rotation removed) median / max 0.83 / 1.59° against 0.83 / 2.36° with
the angles fixed (alternating: 1.24 / 2.31°), at 2.2× the time of the same schedule with the angles fixed —
hence angles are not refined by default.

Near tilt 0, rot and psi turn about the same axis (ZYZ gimbal): only rot + psi is determined there; the damping
splits the update between them. Compare recovered orientations by rotation matrices, or refine a subset of the
angles (``refine_euler``). ``joint_angle_frame='lab'`` lets the joint steps solve for a small rotation about the lab
axes instead (chain rule through the Euler Jacobian, no gimbal lock above a tilt of 3°): on the operator-made test
draws it helped some and hurt others (docs/you2025_alignment_angles.md, session 11, which also shows why rot − psi
sticks there: the bilinear rotations' blur has a kink at each angle 0, and rot ↔ psi swaps keep it), so it is off.

``rotation='fourier'`` (not the default) turns every plane by three Fourier shears instead of the sparse bilinear
operators (Unser, Thévenaz & Yaroslavsky 1995; Larkin 1997): the plane rotation with the geometry of
:func:`tembench.physics.rotation._plane_matrix` is X(α) Y(β) X(α), α = tan(θ/2), β = −sin θ, each shear a sub-pixel
shift of every column (row) by an FFT phase ramp on a plane zero-padded to an odd size (no Nyquist bin) large enough
that no content of the box wraps around — so each shear is orthogonal, the adjoint is the opposite shears (exact), the
norm of content that stays in the box is kept, and the operator is smooth in the angle: no blur growing with |a|, so
no kink at a = 0 and no rot ↔ psi mirror points. The tilt-and-sum sums the whole padded z column (the third shear,
along z, keeps every column sum and is skipped; content turned out of the box along the beam still projects, which
the bilinear operator drops). ∂ŷ/∂Θ is analytic through the shears (dα/dθ = (1 + α²)/2, dβ/dθ = −cos θ; central
differences agree to O(h²)). The projector, its adjoint, the Jacobians (Euler and lab frame) and the Lipschitz
estimate of :func:`joint_linear_tomography` all use it. Measured on the issue-15 test set-up (24³, 20 atoms one voxel
wide, 11 tilts ±60°, errors 0.5–1.5° on all three angles, default start; docs/you2025_alignment_angles.md, session
12), max rotation error on draws 5–9: on data made by the Fourier operator 0.035 / 0.053 / 0.029 / 0.036 / 0.2015°
(bilinear on its own data: 0.41 / 0.24 / 0.22 / 0.29 / 0.72°); on analytic projections of the atoms (made by no
operator) 0.029 / 0.036 / 0.040 / 0.031 / 0.172° against 0.39 / 0.38 / 0.36 / 0.47 / 0.67° with the bilinear
default; at 21 tilts ≤ 0.074° on both kinds of data (bilinear on the analytic data: 0.47–0.82°); translations
≤ 0.003 Å; 3.2–3.5× the CPU of bilinear on the same data at 11 tilts (43–46 s against 12.7–13.4 s), 1.8–2.8× at 21. Not measured on msp projections, so
not the default. The shears live here, not in :mod:`tembench.physics.rotation`, while they are this plugin's option.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

import numpy as np
from pydantic import Field, field_validator

from tembench import Params, Reconstruction, Reconstructor
from tembench._lazy import lazy_import
from tembench.backend import asnumpy, fft2, get_array_module, ifft2
from tembench.errors import TembenchError
from tembench.physics import rotation as _rot
from tembench_you2025 import tomo_common as tc
from tembench_you2025.msp import MSPParams

sp = lazy_import("scipy.sparse")

EULER_NAMES = ("rot", "tilt", "psi")
_EULER_AXES = ("z", "y", "z")


# --- the operator and its derivatives ------------------------------------------------------------------------
def _shift(image, tau_yx_A, sampling_A, xp, derivatives=False):
    """Content moved by +τ (Fourier ramp, in the image's precision) and optionally ∂/∂τ_y, ∂/∂τ_x (per Å)."""
    return tc.fourier_shift(image, tau_yx_A, sampling_A, xp, derivatives=derivatives)


def _deriv_weights(coord, n):
    """(index, weight) pairs of ∂/∂coord of the linear interpolation weights (zero outside [0, n)); on a grid
    node (fraction 0) the central difference (mean of the two one-sided slopes)."""
    i0 = np.floor(coord).astype(np.int64)
    f = coord - i0
    node = f == 0.0
    out = []
    for idx, w in ((np.where(node, i0 - 1, i0), np.where(node, -0.5, -1.0)),
                   (i0 + 1, np.where(node, 0.5, 1.0))):
        ok = (idx >= 0) & (idx < n)
        out.append((np.where(ok, idx, 0), np.where(ok, w, 0.0)))
    return out


@lru_cache(maxsize=64)
def _plane_derivative_operator(shape2, angle_deg: float, centre2):
    """Sparse d/d(angle, per degree) of :func:`tembench.physics.rotation._plane_matrix` applied to a plane
    (same geometry: source a = s·b + c·a, b = c·b − s·a about the centre), float64 CSR."""
    na, nb = shape2
    t = math.radians(angle_deg)
    c, s = math.cos(t), math.sin(t)
    ca, cb = centre2
    a, b = np.meshgrid(np.arange(na, dtype=np.float64) - ca, np.arange(nb, dtype=np.float64) - cb, indexing="ij")
    a, b = a.ravel(), b.ravel()
    b_src = c * b - s * a + cb
    a_src = s * b + c * a + ca
    deg = math.pi / 180.0
    da = (c * b - s * a) * deg          # ∂a_src/∂angle
    db = (-s * b - c * a) * deg         # ∂b_src/∂angle
    rows = np.arange(na * nb)
    wa, wb = _rot._linear_weights(a_src, na), _rot._linear_weights(b_src, nb)
    dwa, dwb = _deriv_weights(a_src, na), _deriv_weights(b_src, nb)
    data, cols, rr = [], [], []
    for (ja, xa), (jb, xb), scale in ((p, q, da) for p in dwa for q in wb):
        w = xa * xb * scale
        keep = w != 0
        data.append(w[keep]); cols.append((ja * nb + jb)[keep]); rr.append(rows[keep])  # noqa: E702
    for (ja, xa), (jb, xb), scale in ((p, q, db) for p in wa for q in dwb):
        w = xa * xb * scale
        keep = w != 0
        data.append(w[keep]); cols.append((ja * nb + jb)[keep]); rr.append(rows[keep])  # noqa: E702
    m = sp.csr_matrix((np.concatenate(data), (np.concatenate(rr), np.concatenate(cols))), shape=(na * nb, na * nb))
    m.sum_duplicates()
    return m


def rotate_derivative(volume, angle_deg: float, axis: str, xp=None):
    """∂/∂angle (per degree) of ``rotation.rotate(volume, angle_deg, axis)`` — exact for the bilinear interpolant
    (central at grid nodes)."""
    xp = xp or get_array_module(volume)
    shape = tuple(volume.shape)
    plane = _rot._axis_plane(shape, axis)
    sign = 1.0 if axis == "y" else -1.0        # rotation._plane_angle: +θ about y, −θ about x and z
    m = _plane_derivative_operator(plane, _rot._plane_angle(angle_deg, axis), _rot._centre(plane))
    out = _rot._sparse_apply(m, _rot._to_planes(volume, axis, xp), xp)
    return xp.ascontiguousarray(sign * _rot._from_planes(out, axis, shape, xp), dtype=volume.dtype)


def _as_series(euler_deg, tau_A):
    e = np.asarray(euler_deg, np.float64)
    t = np.asarray(tau_A, np.float64)
    single = e.ndim == 1
    e, t = e.reshape(-1, 3), t.reshape(-1, 2)
    if len(e) != len(t):
        raise TembenchError(f"{len(e)} Euler triples for {len(t)} translations")
    return e, t, single


@lru_cache(maxsize=256)
def _tilt_sum_operator(shape, tilt_deg: float):
    """B_nz ∘ R_y(tilt) on the (z, x) planes, one sparse matrix (core :func:`rotate_bin_operator`; cached per angle)."""
    return _rot.rotate_bin_operator(shape, tilt_deg, "y", shape[0])


# --- the kink-free option: plane rotations by three Fourier shears ------------------------------------------
# A bilinear rotation by a small angle a blurs in proportion to |a| (a kink at a = 0, docs/you2025_alignment_angles.md
# session 11); a rotation by three shears, each a sub-pixel shift of every row (column) by an FFT phase ramp, is
# unitary on the padded plane and smooth in the angle (Unser, Thévenaz & Yaroslavsky 1995; Larkin 1997). Written here
# (not in tembench.physics.rotation) while it is an experiment of this plugin.
ROTATIONS = ("bilinear", "fourier")


def _check_rotation(rotation):
    if rotation not in ROTATIONS:
        raise TembenchError(f"rotation must be one of {ROTATIONS}; got {rotation!r}")
    return rotation


def _odd_fft_len(m) -> int:
    """The smallest odd n ≥ m whose only prime factors are 3, 5 and 7 (odd: no Nyquist bin, so a real-to-real shift
    by a phase ramp is an orthogonal matrix and its adjoint the opposite shift)."""
    n = max(math.ceil(m), 1)
    n += 1 - n % 2
    while True:
        k = n
        for p in (3, 5, 7):
            while k % p == 0:
                k //= p
        if k == 1:
            return n
        n += 2


@lru_cache(maxsize=128)  # a 60° plan of a 96³ box: 4 complex64 arrays of ≈ 88 × 243, 0.7 MB; ≤ 90 MB cached
def _shear_plan(shape2, angle_deg: float, centre2, dtype_name: str):
    """Padding and phase ramps of the plane rotation by ``angle_deg`` (the plane angle of
    :func:`tembench.physics.rotation._plane_matrix`: output (a, b) samples the input at (c a + s b, −s a + c b) about
    the centre) as three shears, M = X(α) Y(β) X(α), α = tan(θ/2), β = −sin θ, X(α): a → a + α b, Y(β): b → b + β a.

    The (na, nb) plane is zero-padded to odd (Na, Nb) large enough that no shear of any content of the box wraps
    around (a: na + |α| nb, b: nb + |β| times that, + 2 each). Returns a dict: pads, sizes, the ramps (2πi k·coord/N,
    over rfft bins) and the phases exp(α·ramp_a), exp(β·ramp_b) in the complex type of ``dtype_name``."""
    na, nb = shape2
    ca, cb = centre2
    t = math.radians(angle_deg)
    al, be = math.tan(t / 2.0), -math.sin(t)
    ext_a = na + abs(al) * nb + 2.0
    big_a = _odd_fft_len(ext_a)
    big_b = _odd_fft_len(nb + abs(be) * ext_a + 2.0)
    pa, pb = (big_a - na) // 2, (big_b - nb) // 2
    ac = np.arange(big_a) - pa - ca                   # padded coordinates about the rotation centre
    bc = np.arange(big_b) - pb - cb
    ctype = np.complex128 if dtype_name == "float64" else np.complex64
    ramp_a = 2j * math.pi * np.arange(big_a // 2 + 1)[:, None] / big_a * bc[None, :]   # shear along a, per column b
    ramp_b = 2j * math.pi * ac[:, None] * np.arange(big_b // 2 + 1)[None, :] / big_b   # shear along b, per row a
    return {"na": na, "nb": nb, "Na": big_a, "Nb": big_b, "pa": pa, "pb": pb, "alpha": al, "beta": be,
            "d_alpha": 0.5 * (1.0 + al * al), "d_beta": -math.cos(t),     # dα/dθ, dβ/dθ (per radian)
            "ramp_a": ramp_a.astype(ctype), "ramp_b": ramp_b.astype(ctype),
            "ph_a": np.exp(al * ramp_a).astype(ctype), "ph_b": np.exp(be * ramp_b).astype(ctype)}


def _fft_mod(xp):
    if xp is np:
        import scipy.fft as sfft
        return sfft
    return xp.fft  # pragma: no cover - GPU


def _shear(u, plan, axis, conj=False, deriv=False, xp=np):
    """One shear of the padded planes u (..., Na, Nb): along a (``axis`` -2, row a sampled at a + α b) or along b
    (-1, at b + β a); ``conj``: its adjoint (the opposite shift); ``deriv``: ∂/∂α (∂/∂β) of the shear instead."""
    f = _fft_mod(xp)
    key = "a" if axis == -2 else "b"
    ph = xp.asarray(plan["ph_" + key])
    if conj:
        ph = xp.conj(ph)
    if deriv:
        ph = ph * xp.asarray(plan["ramp_" + key])
    n = plan["Na"] if axis == -2 else plan["Nb"]
    return f.irfft(f.rfft(u, axis=axis) * ph, n=n, axis=axis)


def _pad(planes, plan, xp):
    pad = [(0, 0)] * (planes.ndim - 2) + [(plan["pa"], plan["Na"] - plan["na"] - plan["pa"]),
                                          (plan["pb"], plan["Nb"] - plan["nb"] - plan["pb"])]
    return xp.pad(planes, pad)


def _crop(u, plan):
    return u[..., plan["pa"]:plan["pa"] + plan["na"], plan["pb"]:plan["pb"] + plan["nb"]]


def _plan_for(planes, angle):
    shape2 = tuple(planes.shape[-2:])
    return _shear_plan(shape2, float(angle), _rot._centre(shape2), "float64" if planes.dtype == np.float64 else "float32")


def fourier_rotate_planes(planes, angle_deg: float, xp=np, adjoint=False):
    """Planes (..., na, nb) turned by the plane angle ``angle_deg`` (same geometry and centre na/2, nb/2 as the
    bilinear :func:`tembench.physics.rotation._plane_matrix`) by three Fourier shears on the padded plane, cropped
    back; ``adjoint``: the exact adjoint (pad, the opposite shears in reverse order, crop)."""
    plan = _plan_for(planes, angle_deg)
    u = _pad(planes, plan, xp)
    for axis in (-2, -1, -2):                     # X Y X: symmetric, so the adjoint has the same order
        u = _shear(u, plan, axis, conj=adjoint, xp=xp)
    return xp.ascontiguousarray(_crop(u, plan), dtype=planes.dtype)


def fourier_rotate_planes_derivative(planes, angle_deg: float, xp=np):
    """∂/∂θ (per degree) of :func:`fourier_rotate_planes` — through the shears: α' (D_X Y X + X Y D_X) + β' X D_Y X."""
    plan = _plan_for(planes, angle_deg)
    u0 = _pad(planes, plan, xp)
    u1 = _shear(u0, plan, -2, xp=xp)
    u2 = _shear(u1, plan, -1, xp=xp)
    inner = plan["d_alpha"] * _shear(_shear(u0, plan, -2, deriv=True, xp=xp), plan, -1, xp=xp) \
        + plan["d_beta"] * _shear(u1, plan, -1, deriv=True, xp=xp)
    d = plan["d_alpha"] * _shear(u2, plan, -2, deriv=True, xp=xp) + _shear(inner, plan, -2, xp=xp)
    return xp.ascontiguousarray(_crop(d, plan) * (math.pi / 180.0), dtype=planes.dtype)


def _fourier_rotate_z(volume, angle_deg, xp, adjoint=False):
    """``rotation.rotate(V, angle, 'z')`` with Fourier shears (planes (y, x); plane angle −angle)."""
    return fourier_rotate_planes(volume, -float(angle_deg), xp, adjoint=adjoint)


def _fourier_tilt_sum(volume, tilt_deg, xp):
    """Σ_z of V turned by ``tilt_deg`` about y ((z, x) planes, plane angle +tilt), (ny, nx). The sum runs over the
    padded z column, so the third shear (along z: a circular shift of each column keeps its sum exactly) is
    skipped; content turned out of the box along the beam still projects (the bilinear operator drops it)."""
    planes = xp.moveaxis(volume, 1, 0)            # (ny, nz, nx)
    plan = _plan_for(planes, tilt_deg)
    u = _shear(_shear(_pad(planes, plan, xp), plan, -2, xp=xp), plan, -1, xp=xp)
    return xp.ascontiguousarray(u.sum(axis=-2)[:, plan["pb"]:plan["pb"] + plan["nb"]], dtype=volume.dtype)


def _fourier_tilt_sum_adjoint(image, tilt_deg, nz, xp):
    """Exact adjoint of :func:`_fourier_tilt_sum`: (ny, nx) → (nz, ny, nx)."""
    ny, nx = image.shape
    dt = np.float64 if image.dtype == np.float64 else np.float32
    plan = _shear_plan((int(nz), nx), float(tilt_deg), _rot._centre((int(nz), nx)), np.dtype(dt).name)
    u = xp.zeros((ny, plan["Na"], plan["Nb"]), dt)
    u[:, :, plan["pb"]:plan["pb"] + nx] = image[:, None, :]
    u = _shear(_shear(u, plan, -1, conj=True, xp=xp), plan, -2, conj=True, xp=xp)
    return xp.ascontiguousarray(xp.moveaxis(_crop(u, plan), 0, 1), dtype=image.dtype)


def _fourier_tilt_sum_derivative(volume, tilt_deg, xp):
    """∂/∂tilt (per degree) of :func:`_fourier_tilt_sum`: Σ_z (α' Y D_X + β' D_Y X) of the padded planes (the third
    shear's term sums to 0)."""
    planes = xp.moveaxis(volume, 1, 0)
    plan = _plan_for(planes, tilt_deg)
    u0 = _pad(planes, plan, xp)
    d = plan["d_alpha"] * _shear(_shear(u0, plan, -2, deriv=True, xp=xp), plan, -1, xp=xp) \
        + plan["d_beta"] * _shear(_shear(u0, plan, -2, xp=xp), plan, -1, deriv=True, xp=xp)
    d = d.sum(axis=-2)[:, plan["pb"]:plan["pb"] + plan["nb"]] * (math.pi / 180.0)
    return xp.ascontiguousarray(d, dtype=volume.dtype)


def _projection(volume, euler_deg, voxel_A, xp, rotation="bilinear"):
    """s·Σ_z euler_rotate(V, Θ) (ny, nx) = ``slabs(V, Θ, nz, s)[0]``, computed as R_z(rot) in 3D, then tilt and sum
    in one sparse product, then psi on the 2D projection: a rotation about z acts plane by plane with one 2D
    operator, so it commutes with the sum along z (exactly: the same bilinear weights). ``rotation='fourier'``:
    the same three rotations by Fourier shears (:func:`fourier_rotate_planes`, :func:`_fourier_tilt_sum`)."""
    rot, tilt, psi = (float(a) for a in euler_deg)
    if _check_rotation(rotation) == "fourier":
        v = _fourier_rotate_z(volume, rot, xp) if rot != 0.0 else volume
        p = _fourier_tilt_sum(v, tilt, xp)
        if psi != 0.0:
            p = _fourier_rotate_z(p, psi, xp)
        return float(voxel_A) * p
    v = _rot.rotate(volume, rot, "z", xp=xp) if rot != 0.0 else volume
    p = _rot.rotate_and_bin(v, tilt, "y", v.shape[0], operator=_tilt_sum_operator(tuple(v.shape), tilt), xp=xp)
    if psi != 0.0:
        p = _rot.rotate(p, psi, "z", xp=xp)
    return float(voxel_A) * p[0]


def _projection_adjoint(image, euler_deg, voxel_A, nz, xp, rotation="bilinear"):
    """Exact adjoint of :func:`_projection`: (ny, nx) → (nz, ny, nx)."""
    rot, tilt, psi = (float(a) for a in euler_deg)
    if _check_rotation(rotation) == "fourier":
        p = _fourier_rotate_z(image, psi, xp, adjoint=True) if psi != 0.0 else image
        v = _fourier_tilt_sum_adjoint(p, tilt, nz, xp)
        if rot != 0.0:
            v = _fourier_rotate_z(v, rot, xp, adjoint=True)
        return float(voxel_A) * v
    p = image[None]
    if psi != 0.0:
        p = _rot.rotate_adjoint(p, psi, "z", xp=xp)
    shape = (int(nz),) + tuple(image.shape)
    v = _rot.rotate_and_bin_adjoint(p, tilt, "y", nz, nz=nz, operator=_tilt_sum_operator(shape, tilt), xp=xp)
    if rot != 0.0:
        v = _rot.rotate_adjoint(v, rot, "z", xp=xp)
    return float(voxel_A) * v


def project(volume, euler_deg, tau_A, voxel_A: float, xp=None, rotation="bilinear"):
    """ŷ = shift(s·Σ_z euler_rotate(V, Θ), τ) (V·Å): one image for one (Θ (3,), τ (2,)), a stack (n, ny, nx) for
    (n, 3), (n, 2). Equals ``shift_image(slabs(V, Θ, nz, s)[0], τ)`` of :mod:`tomo_common` (tested).
    ``rotation``: 'bilinear' (sparse plane operators) or 'fourier' (three Fourier shears per plane rotation)."""
    xp = xp or get_array_module(volume)
    e, t, single = _as_series(euler_deg, tau_A)
    out = xp.stack([_shift(_projection(volume, e[k], voxel_A, xp, rotation), t[k], voxel_A, xp)
                    for k in range(len(e))])
    return out[0] if single else out


def project_adjoint(images, euler_deg, tau_A, voxel_A: float, nz: int, xp=None, rotation="bilinear"):
    """Exact adjoint of :func:`project`: Σ_k s·A_Θk† B† shift(image_k, −τ_k) → volume (nz, ny, nx)."""
    xp = xp or get_array_module(images)
    e, t, single = _as_series(euler_deg, tau_A)
    imgs = images[None] if single else images
    vol = None
    for k in range(len(e)):
        v = _projection_adjoint(_shift(imgs[k], -t[k], voxel_A, xp), e[k], voxel_A, nz, xp, rotation)
        if vol is None:
            vol = v
        else:
            vol += v
    return vol


def projection_jacobian(volume, euler_deg, tau_A, voxel_A: float, xp=None, euler: bool = True,
                        rotation="bilinear"):
    """ŷ (ny, nx) of one tilt, ∂ŷ/∂τ (2, ny, nx) per Å (y, x) and (if ``euler``) ∂ŷ/∂Θ (3, ny, nx) per degree
    (rot, tilt, psi) — forward mode through the three plane rotations (psi, about z, on the 2D projections); with
    ``rotation='fourier'`` through the shears (:func:`fourier_rotate_planes_derivative`)."""
    xp = xp or get_array_module(volume)
    rot, tilt, psi = (float(a) for a in euler_deg)
    s = float(voxel_A)
    y, j_tau = _shift(_projection(volume, euler_deg, s, xp, rotation), tau_A, s, xp, derivatives=True)
    if not euler:
        return y, j_tau, None
    if rotation == "fourier":
        v1 = _fourier_rotate_z(volume, rot, xp) if rot != 0.0 else volume
        p2 = s * _fourier_tilt_sum(v1, tilt, xp)                             # projection before psi
        d_rot = -s * _fourier_tilt_sum(fourier_rotate_planes_derivative(volume, -rot, xp), tilt, xp)
        d_tilt = s * _fourier_tilt_sum_derivative(v1, tilt, xp)
        if psi != 0.0:
            d_rot, d_tilt = (_fourier_rotate_z(d, psi, xp) for d in (d_rot, d_tilt))
        d_psi = -fourier_rotate_planes_derivative(p2, -psi, xp)
        j_e = xp.stack([_shift(d, tau_A, s, xp) for d in (d_rot, d_tilt, d_psi)])
        return y, j_tau, j_e
    v1 = _rot.rotate(volume, rot, "z", xp=xp)
    p2 = s * _rot.rotate(v1, tilt, "y", xp=xp).sum(axis=0)[None]          # projection before psi
    d_rot = s * _rot.rotate(rotate_derivative(volume, rot, "z", xp), tilt, "y", xp=xp).sum(axis=0)[None]
    d_tilt = s * rotate_derivative(v1, tilt, "y", xp).sum(axis=0)[None]
    d_rot, d_tilt = (_rot.rotate(d, psi, "z", xp=xp) for d in (d_rot, d_tilt))
    d_psi = rotate_derivative(p2, psi, "z", xp)
    j_e = xp.stack([_shift(d[0], tau_A, s, xp) for d in (d_rot, d_tilt, d_psi)])
    return y, j_tau, j_e


def lab_to_euler_matrix(euler_deg, min_tilt_deg: float = 3.0):
    """N (3×3): the Euler increments (rot, tilt, psi) deg of a small rotation ω deg about the lab axes (x, y, z),
    R ← exp([ω]×)·R, to first order: N = M⁻¹, M = [R_z(psi) R_y(tilt) ẑ, R_z(psi) ŷ, ẑ] (the lab rotation vector
    of a unit change of each angle). M is singular at tilt 0 (gimbal lock: rot and psi turn about the same axis),
    so below |tilt| = ``min_tilt_deg`` N is the identity (the Euler angles themselves)."""
    _, tilt, psi = (float(a) for a in euler_deg)
    if abs(math.sin(math.radians(tilt))) < math.sin(math.radians(min_tilt_deg)):
        return np.eye(3)
    rz = _rot.axis_rotation_matrix(psi, "z")
    m = np.stack([rz @ _rot.axis_rotation_matrix(tilt, "y")[:, 2], rz[:, 1], np.array([0.0, 0.0, 1.0])], 1)
    return np.linalg.inv(m)


def projection_jacobian_lab(volume, euler_deg, tau_A, voxel_A: float, xp=None, rotation="bilinear"):
    """As :func:`projection_jacobian`, with the angle columns ∂ŷ/∂ω (3, ny, nx) per degree of a small rotation
    about the lab axes x, y, z (R ← exp([ω]×)·R): ∂ŷ/∂Θ · N (:func:`lab_to_euler_matrix`), the chain rule, so
    exact for the interpolant like ∂ŷ/∂Θ. Below a tilt of 3° the columns are ∂ŷ/∂Θ."""
    y, j_tau, j_e = projection_jacobian(volume, euler_deg, tau_A, voxel_A, xp, rotation=rotation)
    n = lab_to_euler_matrix(euler_deg)
    j_w = [sum(n[i, a] * j_e[i] for i in range(3)) for a in range(3)]
    xp = xp or get_array_module(volume)
    return y, j_tau, xp.stack(j_w)


def loss_and_gradients(volume, projections, euler_deg, tau_A, voxel_A: float, xp=None, rotation="bilinear"):
    """L = Σ_k ‖ŷ_k − y_k‖² and its gradients w.r.t. V (nz, ny, nx), τ (n, 2) per Å and Θ (n, 3) per degree."""
    xp = xp or get_array_module(volume)
    e, t, _ = _as_series(euler_deg, tau_A)
    loss, g_tau, g_e = 0.0, np.zeros((len(e), 2)), np.zeros((len(e), 3))
    res = []
    for k in range(len(e)):
        y, jt, je = projection_jacobian(volume, e[k], t[k], voxel_A, xp, rotation=rotation)
        r = y - projections[k]
        res.append(r)
        loss += float(xp.sum(r.astype(np.float64) ** 2))
        g_tau[k] = 2.0 * asnumpy(xp.tensordot(jt.astype(np.float64), r.astype(np.float64), axes=2))
        g_e[k] = 2.0 * asnumpy(xp.tensordot(je.astype(np.float64), r.astype(np.float64), axes=2))
    g_v = 2.0 * project_adjoint(xp.stack(res), e, t, voxel_A, volume.shape[0], xp, rotation)
    return loss, g_v, g_tau, g_e


# --- Algorithm 2 ---------------------------------------------------------------------------------------------
class LinearTomoParams(Params):
    """Parameters of :func:`joint_linear_tomography` (Alg. 2)."""

    n_outer: int = Field(6, ge=0, le=1000, description="alignment iterations L on the down-sampled images (each: V ← 0, "
                         "T volume steps, τ, Θ)")
    n_outer_full: int = Field(0, ge=0, le=1000, description="further alignment iterations at full resolution "
                              "(coarse to fine; the paper's Alg. 2 has only the down-sampled loop: 0)")
    n_volume_steps: int = Field(30, ge=1, le=10000, description="volume steps T per outer iteration (FISTA, 1/Lipschitz)")
    n_final_steps: int = Field(60, ge=0, le=10000, description="volume steps at full resolution with the final alignment")
    downsample: int = Field(2, ge=1, le=16, description="alignment loops on images averaged over downsample² pixels")
    threshold_fraction: float = Field(0.1, ge=0, lt=1, description="alignment targets max(y − t, 0), t = fraction·max y "
                                      "(flattens the background, the paper's pre-processing; 0: none)")
    refine_translations: bool = Field(True, description="update τ (γ₂)")
    refine_euler: tuple[str, ...] = Field((), description="Euler angles updated (γ₃), e.g. ('tilt', 'psi'); default "
                                          "none: on msp projections the alternating steps made them worse and the "
                                          "joint steps did not improve the median error (module doc, "
                                          "docs/you2025_alignment_angles.md)")
    translation_step: float = Field(1.5, gt=0, le=2, description="γ₂: 1 = full Gauss–Newton step per tilt (the volume, "
                                    "fitted to every tilt, absorbs part of each tilt's error, so a full step falls "
                                    "short: 1.5 measured faster)")
    euler_step: float = Field(1.0, gt=0, le=2, description="γ₃: 1 = full Gauss–Newton step per tilt")
    prealign: Literal["com", "none"] = Field("com", description="'com': start τ at the projections' centres of mass (after the "
                          "threshold: a compact object's centre of mass projects like a point, so τ_k = com_k − "
                          "(R_k c)_yx, the unknown c being the 3D gauge); 'none': start at τ⁰")
    keep_best_alignment: bool = Field(True, description="end each phase of outer iterations at the alignment with the "
                                      "lowest reduced loss seen (the start, every iterate and the last update, each "
                                      "with its volume fitted by T steps), not at the last one: the updates are not "
                                      "descent steps (measured on noisy msp projections: loss rising from the start)")
    com_threshold_fraction: float = Field(0.1, ge=0, lt=1, description="background flattened before the centres "
                                          "of mass: max(y − f·max y, 0). 0.1 measured best of 0 / 0.1 / 0.3 on 7 msp "
                                          "series (module doc): 0.3 keeps only the brightest columns of a crystal "
                                          "(2.5 Å off on an aligned needle), 0 lets the background in (10 Å FSC on "
                                          "two nanocube draws)")
    translation_search: bool = Field(True, description="on the down-sampled images, start each τ update with the "
                                     "cross-correlation peak between the model and the measured projection (global, "
                                     "sub-pixel by a parabola) before the Gauss–Newton steps (measured on noisy msp "
                                     "projections: 0.14 Å max error with it, 1.1 Å without)")
    n_translation_steps: int = Field(3, ge=1, le=100, description="τ steps per outer iteration (V fixed: FFTs only)")
    n_euler_steps: int = Field(1, ge=1, le=100, description="Θ steps per outer iteration")
    start_euler_outer: int = Field(5, ge=0, description="update Θ from this outer iteration on (0-based, counting "
                                   "the coarse then the full-resolution ones): the "
                                   "translations are fitted first (large τ errors would otherwise be absorbed by Θ)")
    max_translation_step_A: float = Field(1.0, gt=0, description="cap of one τ update per tilt (Å)")
    max_euler_step_deg: float = Field(1.0, gt=0, description="cap of one Θ update per angle (deg)")
    damping: float = Field(1e-3, ge=0, le=10, description="Levenberg–Marquardt μ relative to the mean diagonal")
    angle_solver: Literal["joint", "alternating"] = Field("joint", description="how the outer iterations that update Θ (from "
                              "``start_euler_outer`` on, if ``refine_euler``) step: 'joint' — one Gauss–Newton step "
                              "on (V, τ, Θ) together (CGLS, V on its free set V > 0, warm-started volume); "
                              "'alternating' — per-tilt Gauss–Newton steps with V fixed (the volume absorbs most of "
                              "each angle error: measured to creep and stall at 0.3–1.1° max, module doc)")
    joint_damping: float = Field(0.0, ge=0, le=10, description="Levenberg–Marquardt μ of the joint step relative "
                                 "to λ_max(AᵀA) (the squared norm of every scaled alignment column)")
    joint_angle_frame: Literal["euler", "lab"] = Field("euler", description="what a joint step solves for "
                                                     "when all three angles are refined: 'euler' — increments of "
                                                     "(rot, tilt, psi); 'lab' — a small rotation ω about the lab axes "
                                                     "(x, y, z), R ← exp([ω]×)·R, mapped back to Euler increments to "
                                                     "first order (:func:`lab_to_euler_matrix`; Euler increments "
                                                     "below a tilt of 3°), ω capped by ``max_euler_step_deg``. "
                                                     "Measured (docs/you2025_alignment_angles.md, session 11): max "
                                                     "error below 0.2° on 1 of 5 draws against 0 of 5; not the "
                                                     "default")
    rotation: Literal["bilinear", "fourier"] = Field("bilinear", description="how the projector turns the volume "
                                                     "(forward, adjoint, Jacobians, Lipschitz estimate): 'bilinear' — "
                                                     "sparse bilinear plane rotations (:mod:`tembench.physics.rotation`); "
                                                     "'fourier' — each plane rotation by three Fourier shears on a "
                                                     "zero-padded odd-sized plane (unitary, smooth in the angle: no "
                                                     "blur kink at angle 0). Measured on the issue-15 set-up "
                                                     "(docs/you2025_alignment_angles.md, session 12): max rotation "
                                                     "error < 0.2° on 5 of 5 draws of analytic projections (bilinear: "
                                                     "0 of 5), at 1.8–3.5× the CPU; not measured on msp projections")
    joint_cg_iterations: int = Field(150, ge=1, le=10000, description="CGLS iterations of each joint Gauss–Newton "
                                     "step (each costs one projection and one back-projection of all tilts)")
    translation_gauge: Literal["3d", "mean", "none"] = Field("3d", description="'3d': remove the (R_k d)_yx part of τ − τ⁰ (a common 3D "
                                   "object shift); 'mean': its common mean; 'none'")
    fix_mean_euler: bool = Field(True, description="remove the mean change of each Euler angle (a common rotation)")
    fix_tilt_scale: bool = Field(False, description="also remove the part of the tilt changes proportional to the "
                                 "nominal tilt (a scaling of the tilt angles is nearly compensated by a stretch of the "
                                 "volume in the tilt plane: one of the flat directions of the module doc)")
    reset_volume: bool = Field(True, description="V ← 0 at each outer iteration (Alg. 2); False: continue from the "
                               "previous volume (warm start)")
    positivity: bool = Field(True, description="project V onto V ≥ 0 after each volume step")
    power_iterations: int = Field(12, ge=2, le=200, description="power iterations for the Lipschitz constant")
    nz: int | None = Field(None, ge=2, description="voxels along the beam; default max(ny, nx)")

    @field_validator("refine_euler")
    @classmethod
    def _names(cls, v):
        bad = [a for a in v if a not in EULER_NAMES]
        if bad:
            raise ValueError(f"refine_euler: unknown angle(s) {bad}; use {EULER_NAMES}")
        return tuple(v)





@dataclass
class LinearTomoResult:
    volume_V: np.ndarray             # (nz, ny, nx) V, voxel s, centred on the rotation centre
    euler_deg: np.ndarray            # (n, 3) rot, tilt, psi
    translations_A: np.ndarray       # (n, 2) τ (y, x): the content of projection k moved by +τ_k
    history: dict[str, list[float]] = field(default_factory=dict)


def downsample_images(images, factor: int, voxel_A: float, xp=None):
    """Block means of ``factor``² pixels, re-centred (Fourier shift) so that coarse pixel j sits at
    c − f·s·n'/2 + f·s·j about the same centre c = origin + s·n/2 (n' = n // f)."""
    xp = xp or get_array_module(images)
    f = int(factor)
    if f == 1:
        return images
    n, ny, nx = images.shape
    my, mx = ny // f, nx // f
    if min(my, mx) < 2:
        raise TembenchError(f"downsample {f} leaves fewer than 2 pixels of {ny}x{nx}")
    c = images[:, :my * f, :mx * f].reshape(n, my, f, mx, f).mean(axis=(2, 4))
    dy = voxel_A * (f - 1 - (ny - f * my)) / 2.0
    dx = voxel_A * (f - 1 - (nx - f * mx)) / 2.0
    return xp.stack([_shift(c[k], (dy, dx), f * voxel_A, xp) for k in range(n)])


def _lipschitz(shape, euler, tau, s, xp, n_iter, dtype, rotation="bilinear"):
    """2·λ_max(AᵀA) (gradient Lipschitz constant of Σ‖Av − y‖²) by power iteration, with a 5 % margin."""
    rng = np.random.default_rng(0)
    v = xp.asarray(rng.random(shape).astype(dtype))
    lam = 0.0
    for _ in range(n_iter):
        w = project_adjoint(project(v, euler, tau, s, xp, rotation), euler, tau, s, shape[0], xp, rotation)
        lam = float(xp.sqrt(xp.sum(w.astype(np.float64) ** 2)) / xp.sqrt(xp.sum(v.astype(np.float64) ** 2)))
        v = w / max(lam, 1e-30)
    return 2.0 * lam * 1.05


def reconstruct_volume(projections, euler, tau, voxel_A, nz, n_steps, positivity=True, xp=np, power_iterations=12,
                       volume0=None, rotation="bilinear"):
    """min_V Σ_k ‖A_k V − y_k‖² (V ≥ 0 optionally) by FISTA with step 1/Lipschitz; returns (V, losses)."""
    shape = (int(nz),) + tuple(projections.shape[1:])
    dtype = projections.dtype
    step = 1.0 / _lipschitz(shape, euler, tau, voxel_A, xp, power_iterations, dtype, rotation)
    v = xp.zeros(shape, dtype) if volume0 is None else volume0.astype(dtype, copy=True)
    u, beta, losses = v.copy(), 1.0, []
    for _ in range(int(n_steps)):
        r = project(u, euler, tau, voxel_A, xp, rotation) - projections
        losses.append(float(xp.sum(r.astype(np.float64) ** 2)))
        v_new = u - (2.0 * step) * project_adjoint(r, euler, tau, voxel_A, nz, xp, rotation)
        if positivity:
            v_new = xp.maximum(v_new, 0)
        beta_next = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * beta * beta))
        u = v_new + ((beta - 1.0) / beta_next) * (v_new - v)
        v, beta = v_new, beta_next
    return v, losses


def _reduced_loss(target, euler, tau, voxel_A, nz, p, xp, volume0=None) -> float:
    """Σ_k ‖A_k V − y_k‖² with V fitted by ``p.n_volume_steps`` FISTA steps (from 0, or from ``volume0``) at the
    alignment (Θ, τ): the loss an outer iteration records before it updates the alignment, so alignments compare."""
    vol, _ = reconstruct_volume(target, euler, tau, voxel_A, nz, p.n_volume_steps, p.positivity, xp, p.power_iterations,
                                volume0=volume0, rotation=p.rotation)
    r = project(vol, euler, tau, voxel_A, xp, p.rotation) - target
    return float(xp.sum(r.astype(np.float64) ** 2))


def _alignment_phase(tgt, factor, n_phase, tau, euler, outer, s, nz, refine_idx, euler0, tau0, p, hist, xp, t0,
                     progress, n_total):
    """``n_phase`` outer iterations of Alg. 2 on the images ``tgt`` (down-sampled by ``factor``) from (τ, Θ).

    Returns (τ, Θ, outer count, whether joint steps ran): with ``keep_best_alignment`` and volumes refitted from 0
    every iteration (``reset_volume``, no joint steps) the alignment with the lowest reduced loss among the start,
    every iterate and the last update, else the last update."""
    sc, nzc = s * factor, max(nz // factor, 2)
    vol = None
    seen = []  # (reduced loss, τ, Θ) of every alignment this phase visits
    used_joint = False
    for _ in range(n_phase):
        tau_before, euler_before, n_losses = tau.copy(), euler.copy(), len(hist["alignment_loss"])
        joint = p.angle_solver == "joint" and bool(refine_idx) and outer >= p.start_euler_outer
        vol, _ = reconstruct_volume(tgt, euler, tau, sc, nzc, p.n_volume_steps, p.positivity, xp, p.power_iterations,
                                    volume0=None if (p.reset_volume and not joint) else vol, rotation=p.rotation)
        if joint:
            # warm-started volume (a nearly converged V is needed for unbiased angle steps: module doc);
            # only τ and Θ take the step, the next volume steps refit V
            lab = p.joint_angle_frame == "lab" and len(set(refine_idx)) == 3
            _, d_tau, d_e, loss, _ = _joint_gauss_newton(vol, tgt, euler, tau, sc, refine_idx, p.refine_translations,
                                                          p.joint_cg_iterations, xp, p.power_iterations,
                                                          p.joint_damping, lab=lab, rotation=p.rotation)
            d_tau = np.clip(d_tau, -p.max_translation_step_A, p.max_translation_step_A)
            d_e = np.clip(d_e, -p.max_euler_step_deg, p.max_euler_step_deg)
            tau = tau + d_tau
            if lab:   # δω about the lab axes → Euler increments (first order)
                euler = euler + np.stack([lab_to_euler_matrix(euler[k]) @ d_e[k] for k in range(len(euler))])
            else:
                euler = euler.copy()
                euler[:, refine_idx] += d_e
            hist["alignment_loss"].append(loss)
            hist["translation_update_A"].append(float(np.abs(d_tau).max()))
            hist["euler_update_deg"].append(float(np.abs(d_e).max()))
            used_joint = True
        else:
            tau, euler = _alignment_step(vol, tgt, euler, tau, euler0, tau0, sc, refine_idx,
                                         outer >= p.start_euler_outer, p, hist, xp,
                                         search=p.translation_search and factor > 1)
        if len(hist["alignment_loss"]) > n_losses:  # the loss of the alignment this iteration started from
            seen.append((hist["alignment_loss"][-1], tau_before, euler_before))
        outer += 1
        hist["time_s"].append(time.perf_counter() - t0)
        if progress is not None:
            progress(outer, n_total)
    if not p.keep_best_alignment or used_joint or not p.reset_volume:
        # losses recorded at warm-started volumes fall as the volume converges, whatever the alignment does: not
        # comparable (on the joint angle test, picking by them gave 0.15° median against 0.04° for the last step)
        return tau, euler, outer, used_joint
    # the last update's alignment, its volume fitted from 0 by T steps like every recorded one
    seen.append((_reduced_loss(tgt, euler, tau, sc, nzc, p, xp), tau, euler))
    best = min(range(len(seen)), key=lambda i: seen[i][0])
    hist.setdefault("best_iterate", []).append(best)
    _, tau, euler = seen[best]
    return tau, euler, outer, used_joint


def _translation_gauge_basis(euler):
    """(2n, 3) columns: the τ change (R_k d)_yx per unit 3D shift d = (x, y, z) of the object."""
    rows = []
    for e in euler:
        R = _rot.euler_matrix(*e)                         # acts on (x, y, z)
        rows.append(np.stack([R[1], R[0]]))               # (τ_y, τ_x) = (R d)_y, (R d)_x
    return np.concatenate(rows)                           # (2n, 3)


def _fix_translation_gauge(tau, tau0, euler, mode):
    if mode == "none":
        return tau
    d = tau - tau0
    if mode == "mean":
        return tau - d.mean(axis=0)
    basis = _translation_gauge_basis(euler)
    coef, *_ = np.linalg.lstsq(basis, d.ravel(), rcond=None)
    return tau - (basis @ coef).reshape(tau.shape)


def com_translations(projections, voxel_A: float, threshold_fraction: float = 0.1, xp=None):
    """(n, 2) translations (y, x) Å: each projection's centre of mass (after max(y − f·max y, 0)) from the image
    centre n/2 — the translations up to the 3D gauge (R_k c)_yx of the object's centre of mass c."""
    xp = xp or get_array_module(projections)
    y = xp.asarray(projections, np.float64)
    out = []
    for img in y:
        w = xp.maximum(img - threshold_fraction * float(xp.max(img)), 0)
        tot = float(xp.sum(w))
        if not tot > 0:
            raise TembenchError("prealign 'com': a projection has no signal above the threshold")
        ny, nx = img.shape
        cy = float(xp.sum(w.sum(axis=1) * xp.arange(ny))) / tot - ny / 2.0
        cx = float(xp.sum(w.sum(axis=0) * xp.arange(nx))) / tot - nx / 2.0
        out.append((cy * voxel_A, cx * voxel_A))
    return np.array(out)


def _fix_euler_gauge(euler, euler0, refine_idx, fix_mean=True, fix_tilt_scale=False):
    """Remove from the changes Θ − Θ⁰ of the refined angles their mean (a common rotation) and, for the tilt, its
    least-squares part ∝ the nominal tilt (a tilt-angle scale)."""
    out = euler.copy()
    d = euler - euler0
    for i in refine_idx:
        cols = [np.ones(len(d))] if fix_mean else []
        if i == 1 and fix_tilt_scale:
            cols.append(euler0[:, 1])
        if cols:
            a = np.stack(cols, 1)
            coef, *_ = np.linalg.lstsq(a, d[:, i], rcond=None)
            out[:, i] -= a @ coef
    return out


def cc_shift(model, target, sampling_A, xp=None):
    """(y, x) Å shift d such that target(r) ≈ model(r − d): the periodic cross-correlation peak, refined by a parabola
    through the peak and its neighbours along each axis."""
    xp = xp or get_array_module(model)
    c = asnumpy(ifft2(fft2(xp.asarray(target, xp.complex64)) * xp.conj(fft2(xp.asarray(model, xp.complex64)))).real)
    ny, nx = c.shape
    iy, ix = np.unravel_index(int(np.argmax(c)), c.shape)
    out = []
    for i, n, line in ((iy, ny, c[:, ix]), (ix, nx, c[iy, :])):
        cm, c0, cp = float(line[(i - 1) % n]), float(line[i]), float(line[(i + 1) % n])
        den = cm - 2.0 * c0 + cp
        frac = 0.5 * (cm - cp) / den if den < 0 else 0.0
        d = i + float(np.clip(frac, -0.5, 0.5))
        out.append((d + n / 2.0) % n - n / 2.0)          # periodic: |d| ≤ n/2
    return out[0] * sampling_A, out[1] * sampling_A


def _gn_step(jac, r, damping, gamma, cap):
    """Damped Gauss–Newton step −γ (JᵀJ + μ·mean diag)⁻¹ Jᵀ r (J (p, ny, nx)), each component capped."""
    j = jac.reshape(jac.shape[0], -1).astype(np.float64)
    rr = r.reshape(-1).astype(np.float64)
    h = asnumpy(j @ j.T)
    g = asnumpy(j @ rr)
    mu = damping * max(float(np.trace(h)) / len(h), 1e-300)
    step = -gamma * np.linalg.solve(h + mu * np.eye(len(h)), g)
    return np.clip(step, -cap, cap)


def _alignment_step(vol, target, euler, tau, euler0, tau0, sc, refine_idx, do_euler, p, hist, xp, search=False):
    """One outer iteration's alignment updates with V fixed: τ (Gauss–Newton per tilt, ``n_translation_steps``; the
    unshifted projections do not change with τ), then Θ (``n_euler_steps``), each followed by its gauge fix."""
    n = len(euler)
    base = [_projection(vol, euler[k], sc, xp, p.rotation) for k in range(n)]
    loss = float(sum(float(xp.sum((_shift(base[k], tau[k], sc, xp) - target[k]).astype(np.float64) ** 2))
                     for k in range(n)))
    hist["alignment_loss"].append(loss)
    moved_t = 0.0
    if p.refine_translations:
        if search:
            new = tau.copy()
            for k in range(n):
                d = cc_shift(_shift(base[k], tau[k], sc, xp), target[k], sc, xp)
                new[k] = tau[k] + np.asarray(d)
            new = _fix_translation_gauge(new, tau0, euler, p.translation_gauge)
            moved_t = float(np.abs(new - tau).max())
            tau = new
        for _ in range(p.n_translation_steps):
            new = tau.copy()
            for k in range(n):
                yk, jt = _shift(base[k], tau[k], sc, xp, derivatives=True)
                new[k] = tau[k] + _gn_step(jt, yk - target[k], p.damping, p.translation_step,
                                           p.max_translation_step_A)
            new = _fix_translation_gauge(new, tau0, euler, p.translation_gauge)
            moved_t = max(moved_t, float(np.abs(new - tau).max()))
            tau = new
    hist["translation_update_A"].append(moved_t)
    moved_e = 0.0
    if refine_idx and do_euler:
        for _ in range(p.n_euler_steps):
            new = euler.copy()
            for k in range(n):
                yk, _, je = projection_jacobian(vol, euler[k], tau[k], sc, xp, rotation=p.rotation)
                new[k, refine_idx] += _gn_step(je[refine_idx], yk - target[k], p.damping, p.euler_step,
                                               p.max_euler_step_deg)
            new = _fix_euler_gauge(new, euler0, refine_idx, p.fix_mean_euler, p.fix_tilt_scale)
            moved_e = max(moved_e, float(np.abs(new - euler).max()))
            euler = new
    hist["euler_update_deg"].append(moved_e)
    return tau, euler


def _joint_gauss_newton(vol, target, euler, tau, sc, refine_idx, refine_tau, n_cg, xp, power_iterations=12,
                        damping=0.0, lab=False, rotation="bilinear"):
    """One Gauss–Newton step on (V, τ, Θ) together: min ‖A δV + J_τ δτ + J_Θ δΘ + r‖² over δV on the free set
    F = {V > 0} (the voxels the positivity constraint leaves free) and the per-tilt alignment, by CGLS from 0
    (``n_cg`` iterations), with a Levenberg–Marquardt term μ‖z‖² on the scaled alignment parameters z
    (μ = ``damping``·λ: every scaled column has norm √λ; default 0 — 10⁻³ and 10⁻² made the angles worse, measured).
    Unlike the per-tilt steps at fixed V this accounts for the part of an alignment error
    the volume can absorb (the Schur complement), so a step is not shortened by it.

    Columns scaled: δV as is, each alignment parameter by √λ/‖J_kj‖ (λ ≈ λ_max(AᵀA)). CGLS from 0 stays in the
    range of Kᵀ, so the unmeasurable directions (a common rotation or 3D shift of volume and alignment) are not
    excited beyond the interpolation's small asymmetry. Returns δV (on F), δτ (n, 2) Å, δΘ (n, len(refine_idx))
    deg — with ``lab`` (all three angles refined) δω (n, 3) deg about the lab axes (:func:`projection_jacobian_lab`)
    instead — the loss before and the linearised loss after."""
    n = len(euler)
    nz = vol.shape[0]
    cols, model = [], []
    for k in range(n):
        yk, jt, je = (projection_jacobian_lab if lab else projection_jacobian)(vol, euler[k], tau[k], sc, xp,
                                                                              rotation=rotation)
        model.append(yk)
        c = ([jt[0], jt[1]] if refine_tau else []) + [je[i] for i in (range(3) if lab else refine_idx)]
        cols.append(xp.stack(c).astype(np.float64))
    m = len(cols[0])
    res = (xp.stack(model) - target).astype(vol.dtype)
    free = (vol > 0).astype(vol.dtype)
    lam = _lipschitz(vol.shape, euler, tau, sc, xp, power_iterations, vol.dtype, rotation) / 2.1
    scale = np.array([[math.sqrt(lam) / max(float(xp.sqrt(xp.sum(cols[k][j] ** 2))), 1e-300) for j in range(m)]
                      for k in range(n)])

    def fwd(dv, z):
        out = project(free * dv, euler, tau, sc, xp, rotation)
        for k in range(n):
            out[k] += xp.tensordot(xp.asarray(z[k] * scale[k]), cols[k], axes=1).astype(out.dtype)
        return out

    def adj(r):
        dv = free * project_adjoint(r, euler, tau, sc, nz, xp, rotation)
        r64 = r.astype(np.float64)
        z = np.array([asnumpy(xp.tensordot(cols[k], r64[k], axes=2)) for k in range(n)]) * scale
        return dv, z

    def sq(a):
        return float(xp.sum(a.astype(np.float64) ** 2))

    dv, z = xp.zeros_like(vol), np.zeros((n, m))
    r = -res
    mu = float(damping) * lam
    sv, sz = adj(r)
    pv, pz = sv.copy(), sz.copy()
    gamma = sq(sv) + float(np.sum(sz**2))
    g0 = gamma
    for _ in range(int(n_cg)):
        q = fwd(pv, pz)
        qq = sq(q) + mu * float(np.sum(pz**2))
        if not qq > 0 or not gamma > 1e-14 * g0:
            break
        a = gamma / qq
        dv += a * pv
        z += a * pz
        r -= a * q
        sv, sz = adj(r)
        sz = sz - mu * z
        g_new = sq(sv) + float(np.sum(sz**2))
        pv = sv + (g_new / gamma) * pv
        pz = sz + (g_new / gamma) * pz
        gamma = g_new
    dp = z * scale
    d_tau = dp[:, :2] if refine_tau else np.zeros((n, 2))
    d_e = dp[:, 2:] if refine_tau else dp
    return free * dv, d_tau, d_e, sq(res), sq(r)


def joint_linear_tomography(projections_VA, voxel_A: float, euler0_deg, tau0_A, params=None, xp=np,
                            progress=None) -> LinearTomoResult:
    """You 2025 Algorithm 2: volume, Euler angles and translations from projections (n, ny, nx) V·Å on the grid of
    :mod:`tomo_common` (pixel ``voxel_A``, centred on the rotation centre), starting from Θ⁰ (n, 3) deg, τ⁰ (n, 2) Å."""
    p = params if isinstance(params, LinearTomoParams) else LinearTomoParams(**(params or {}))
    y = xp.asarray(projections_VA, np.float32)
    if y.ndim != 3:
        raise TembenchError(f"projections must be (n_tilts, ny, nx), got shape {tuple(y.shape)}")
    n, ny, nx = y.shape
    euler = np.array(euler0_deg, np.float64).reshape(n, 3)
    tau0 = np.array(tau0_A, np.float64).reshape(n, 2)
    tau = tau0.copy()
    euler0 = euler.copy()
    s = float(voxel_A)
    nz = int(p.nz or max(ny, nx))
    f = int(p.downsample)
    hist = {"alignment_loss": [], "translation_update_A": [], "euler_update_deg": [], "final_loss": [], "time_s": []}
    t0 = time.perf_counter()
    refine_idx = [EULER_NAMES.index(a) for a in p.refine_euler]
    target = y
    if p.threshold_fraction > 0:
        target = xp.maximum(y - p.threshold_fraction * float(xp.max(y)), 0)
    n_total = p.n_outer + p.n_outer_full
    # the paper's loop on thresholded, down-sampled images; the full-resolution extension on the projections as
    # they are (max(y − t, 0) is not a linear projection: measured better τ and angles there without it)
    phases = [(downsample_images(target, f, s, xp), f, p.n_outer), (y, 1, p.n_outer_full)]
    if p.refine_translations and p.prealign == "com":
        tau = _fix_translation_gauge(tau0 + com_translations(y, s, p.com_threshold_fraction, xp), tau0, euler,
                                     p.translation_gauge)
    used_joint = False
    if p.refine_translations or refine_idx:
        outer = 0
        for tgt, factor, n_phase in phases:
            if n_phase:
                tau, euler, outer, joint_here = _alignment_phase(tgt, factor, n_phase, tau, euler, outer, s, nz,
                                                                 refine_idx, euler0, tau0, p, hist, xp, t0,
                                                                 progress, n_total)
                used_joint |= joint_here
    if used_joint and p.refine_translations:
        # the joint steps leave the gauges alone (no in-loop fix: it would make V inconsistent with τ); the final
        # volume is made from scratch, so the common 3D shift can be removed here
        tau = _fix_translation_gauge(tau, tau0, euler, p.translation_gauge)
    vol, losses = reconstruct_volume(y, euler, tau, s, nz, max(p.n_final_steps, 1), p.positivity, xp,
                                     p.power_iterations, rotation=p.rotation)
    hist["final_loss"] = losses
    hist["time_s"].append(time.perf_counter() - t0)
    return LinearTomoResult(volume_V=asnumpy(vol).astype(np.float32), euler_deg=euler, translations_A=tau,
                            history=hist)


# --- the reconstructor and the stage used by e2e -------------------------------------------------------------
class JointLinearTomoParams(LinearTomoParams):
    """msp per tilt (step 1) and Algorithm 2 (step 2)."""

    msp: MSPParams = Field(default_factory=lambda: MSPParams(n_iterations=8), description="multislice ptychography "
                           "of every tilt (step 1 of the workflow)")


def linear_stage(measurement, params=None, xp=np, progress=None):
    """Steps 1–2 of You's workflow on a ``4dstem_tilt_series``: msp per tilt → projections Σ_n Re V_n resampled onto the
    :class:`~tembench_you2025.tomo_common.TomoGrid` → Algorithm 2 from Θ⁰ = nominal, τ⁰ = 0.

    Returns (LinearTomoResult, [(MSPResult, present indices)] per tilt, grid, projections (n, ny, nx) V·Å)."""
    p = params if isinstance(params, JointLinearTomoParams) else JointLinearTomoParams(**(params or {}))
    if measurement.kind != "4dstem_tilt_series":
        raise TembenchError(f"joint_linear_tomo accepts '4dstem_tilt_series', got {measurement.kind!r}")
    geo = measurement.geometry
    euler0 = tc.nominal_euler_deg(geo)
    centre = tc.rotation_centre_zyx_A(geo)
    msp = tc.msp_tilt_series(measurement, p.msp, xp=xp)
    r0 = msp[0][0]
    sy, sx = r0.sampling_A
    if abs(sy - sx) > 1e-6 * max(sy, sx):
        raise TembenchError(f"joint_linear_tomo needs square reconstruction pixels (cubic voxels), got {sy}, {sx} Å")
    field_gpts = r0.potentials_VA.shape[1:]
    grid = tc.tomo_grid(field_gpts, sy, centre, nz=p.nz)
    proj = np.stack([np.asarray(tc.resample_to_grid(r.projection().astype(np.float32), r.origin_A, grid), np.float32)
                     for r, _ in msp])
    algo = LinearTomoParams(**{k: getattr(p, k) for k in LinearTomoParams.model_fields})
    algo = algo.model_copy(update={"nz": grid.shape[0]})
    res = joint_linear_tomography(proj, grid.voxel_A, euler0, np.zeros((len(proj), 2)), algo, xp=xp, progress=progress)
    return res, msp, grid, proj


class JointLinearTomo(Reconstructor):
    """You 2025 steps 1–2: multislice ptychography of every tilt, then joint rigid alignment and linear tomography
    (Alg. 2) of the projected potentials: the volume (V) on a grid centred on the rotation centre with the
    ptychographic pixel as voxel, the recovered Euler angles and translations. Honours ``extras['pattern_mask']``."""

    name = "joint_linear_tomo"
    accepts = ("4dstem_tilt_series",)
    produces = "volume"
    version = "2"  # 2: centres of mass after a 0.1 (was 0.3) threshold; the lowest-loss alignment of each phase kept
    supports_pattern_mask = True
    Params = JointLinearTomoParams

    def reconstruct(self, measurement, params, xp):
        t0 = time.perf_counter()
        res, msp, grid, proj = linear_stage(measurement, params, xp)
        elapsed = time.perf_counter() - t0
        s = grid.voxel_A
        return Reconstruction(
            kind="volume", data=res.volume_V, sampling_A=(s, s, s), quantity="potential_V", origin_A=grid.origin_A,
            history={"alignment_loss": res.history["alignment_loss"], "final_loss": res.history["final_loss"]},
            extras={"euler_deg": res.euler_deg, "translations_A": res.translations_A, "projections_VA": proj,
                    "probe_modes": np.stack([r.probe for r, _ in msp]),
                    "positions_A": np.stack([r.positions_A for r, _ in msp]),
                    "pattern_indices": np.asarray(msp[0][1]),
                    "pattern_scale": np.array([r.pattern_scale for r, _ in msp]),
                    "msp_origin_A": np.array([r.origin_A for r, _ in msp]),
                    "shape": list(grid.shape)},
            timings_s={"joint_linear_tomo": elapsed})
