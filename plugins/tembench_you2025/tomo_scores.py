"""Quantifiers of You 2025 part 2 for tomographic volumes (``joint_linear_tomo``, ``e2e_ptycho_tomo``).

* ``alignment_error`` — recovered alignment (``extras["translations_A"]`` (n, 2) (τ_y, τ_x) Å and
  ``extras["euler_deg"]`` (n, 3)) against the truth of ``stem4d_tilt_series``
  (:func:`tembench_you2025.tilt_series.true_alignment`). A shift t of the whole volume changes every
  τ_k by (R_k t)_{y,x} and leaves the data unchanged, so that 3-parameter part (whose y component is the
  common mean translation) is fitted and removed before the statistics; likewise a common rotation Q of the
  volume (R_k → R_k·Q⁻¹) for the rotation errors. The raw and mean-removed values are kept as diagnostics. Paper (Fig. 2a): half of the translations within 0.4 Å, max 0.8 Å.
* ``depth_elongation`` — the missing-wedge signature: atoms found by the core tracer
  (:func:`tembench.analysis.atom_tracing.trace_atoms`), each fitted in a small box by an axially
  symmetric Gaussian b + A·exp(−ρ²/2σ_lat² − (z − z_c)²/2σ_z²); the median σ_z/σ_lat, and the same fit on the
  ground-truth potential (``Sample.potential_volume``) at the same voxel at the true atom positions, so the
  ratio reads relative to truth (≈ 1 for a band-limited isotropic atom).

Both return nothing for reconstructions they do not apply to (no alignment extras / not a volume).

* ``tomo_fsc`` / ``tomo_atom_tracing`` — the core ``fsc`` and ``atom_tracing`` after registering the volume to the
  truth: a tomogram's common shift (every τ_k changed by (R_k t)_{y,x}) fits the data equally well, so each
  reconstruction fixes it by its own convention; scoring against truth removes it first (cross-correlation
  peak, |t| ≤ ``register_max_shift_A``; the origin moves, the data stay), and half B is registered onto half A.
  With half sets, ``tomo_fsc`` also reports ``half_set_fluence_e_per_A2``: the total fluence over the whole tilt
  series that one half set uses (the x axis of You 2025 Fig. 3e; :func:`half_set_fluence_e_per_A2`).
"""

from __future__ import annotations

import numpy as np
from pydantic import Field, field_validator

from tembench import Params, Quantifier
from tembench.builtin.atom_tracing import AtomTracing
from tembench.builtin.quantifiers_fsc import FourierShellCorrelation
from tembench.errors import TembenchError
from tembench.metrics import Metric
from tembench.physics.rotation import euler_matrix
from tembench_you2025.tilt_series import true_alignment


# --- alignment --------------------------------------------------------------------------------------------
def _wrap_deg(a):
    return (np.asarray(a, np.float64) + 180.0) % 360.0 - 180.0


def rotation_angle_deg(euler_a, euler_b) -> np.ndarray:
    """Angle (deg) of the rotation R_a⁻¹ R_b per row: a convention-free distance between Euler triplets
    (at tilt ≈ 0 rot and psi are degenerate, only their sum matters; this is not fooled by that)."""
    return _rotation_angles_deg([euler_matrix(*a) for a in np.asarray(euler_a).reshape(-1, 3)],
                                [euler_matrix(*b) for b in np.asarray(euler_b).reshape(-1, 3)])


def common_rotation(euler_recovered_deg, euler_true_deg) -> np.ndarray:
    """The rotation Q (3×3) that best maps the recovered rotations onto the true ones, R_rec,k·Q ≈ R_true,k (orthogonal
    Procrustes). A volume turned by Q about the rotation centre with rotations R_k·Q⁻¹ gives the same projections
    (the translations unchanged): that common rotation is not measurable from the data."""
    m = np.zeros((3, 3))
    for a, b in zip(np.asarray(euler_recovered_deg).reshape(-1, 3), np.asarray(euler_true_deg).reshape(-1, 3)):
        m += euler_matrix(*a).T @ euler_matrix(*b)
    u, _, vt = np.linalg.svd(m)
    d = np.sign(np.linalg.det(u @ vt)) or 1.0
    return u @ np.diag([1.0, 1.0, d]) @ vt


def _rotation_angles_deg(mats_a, mats_b) -> np.ndarray:
    """Angle of A⁻¹B per pair: ‖A − B‖_F = 2√2·sin(θ/2) (accurate near 0, unlike arccos of the trace)."""
    return np.asarray([np.degrees(2.0 * np.arcsin(min(1.0, np.linalg.norm(a - b) / (2.0 * np.sqrt(2.0)))))
                       for a, b in zip(mats_a, mats_b)])


def volume_shift_part(delta_tau_A, euler_deg) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares 3D shift t (x, y, z) Å of the volume with Δτ_k ≈ (R_k t)_{y,x}, and Δτ minus that part.

    A volume moved by t and translations τ_k − (R_k t)_{y,x} give the same projections: that part of the
    translation error is not measurable from the data."""
    d = np.asarray(delta_tau_A, np.float64).reshape(-1, 2)
    rows = []
    for e in np.asarray(euler_deg, np.float64).reshape(-1, 3):
        r = euler_matrix(*e)
        rows += [r[1], r[0]]                                  # (R t)_y, (R t)_x
    a = np.asarray(rows)
    t, *_ = np.linalg.lstsq(a, d.reshape(-1), rcond=None)
    return t, d - (a @ t).reshape(-1, 2)


def alignment_errors(translations_A, euler_deg, true_translations_A, true_euler_deg) -> dict:
    """Translation errors (2D distance per tilt, Å) with the unmeasurable volume shift removed, Euler errors (deg)."""
    tau = np.asarray(translations_A, np.float64).reshape(-1, 2)
    eul = np.asarray(euler_deg, np.float64).reshape(-1, 3)
    tt = np.asarray(true_translations_A, np.float64).reshape(-1, 2)
    te = np.asarray(true_euler_deg, np.float64).reshape(-1, 3)
    if tau.shape != tt.shape or eul.shape != te.shape:
        raise TembenchError(f"alignment_error: recovered alignment for {len(tau)} / {len(eul)} tilts (translations "
                            f"/ Euler angles) but the measurement has {len(tt)} tilts")
    delta = tau - tt
    t, resid = volume_shift_part(delta, te)
    err = np.linalg.norm(resid, axis=1)
    mean_removed = np.linalg.norm(delta - delta.mean(axis=0), axis=1)
    d_eul = np.abs(_wrap_deg(eul - te))
    geo_raw = rotation_angle_deg(te, eul)
    q = common_rotation(eul, te)
    geo = _rotation_angles_deg([euler_matrix(*e) for e in te], [euler_matrix(*e) @ q for e in eul])
    q_angle = float(_rotation_angles_deg([np.eye(3)], [q])[0])
    return {
        "translation_error_median_A": float(np.median(err)),
        "translation_error_max_A": float(err.max()),
        "translation_error_rms_A": float(np.sqrt(np.mean(err**2))),
        "translation_error_mean_removed_rms_A": float(np.sqrt(np.mean(mean_removed**2))),
        "translation_error_raw_rms_A": float(np.sqrt(np.mean(np.sum(delta**2, axis=1)))),
        # the volume's content sits at −t from the truth (τ_rec − τ_true = (R_k t)_{y,x}): report that displacement,
        # the same sign as tomo_fsc's registration_shift_*_A
        "volume_shift_x_A": float(-t[0]), "volume_shift_y_A": float(-t[1]), "volume_shift_z_A": float(-t[2]),
        "euler_error_max_rot_deg": float(d_eul[:, 0].max()),
        "euler_error_max_tilt_deg": float(d_eul[:, 1].max()),
        "euler_error_max_psi_deg": float(d_eul[:, 2].max()),
        "rotation_error_max_deg": float(geo.max()),
        "rotation_error_median_deg": float(np.median(geo)),
        "rotation_error_raw_max_deg": float(geo_raw.max()),
        "common_rotation_deg": q_angle,
        # arrays → artifacts (plots of recovered vs true alignment)
        "translation_error_A": err, "translations_true_A": tt, "translations_recovered_A": tau,
        "euler_true_deg": te, "euler_recovered_deg": eul,
    }


class AlignmentError(Quantifier):
    """Recovered tilt-series alignment vs truth (You 2025 Fig. 2a): translation error per tilt (2D, Å) after
    removing the volume-shift part that the data cannot fix, and Euler-angle errors (deg)."""

    name = "alignment_error"
    version = "1"
    accepts = ("volume",)
    metrics = {
        "translation_error_median_A": Metric("Å", "lower", (0.0, None), headline=True,
                                             description="median over tilts of |τ − τ_true| (2D), volume shift "
                                                         "removed (paper: 0.4 Å)"),
        "translation_error_max_A": Metric("Å", "lower", (0.0, None), description="max over tilts of |τ − τ_true| "
                                          "(2D), volume shift removed (paper: 0.8 Å)"),
        "translation_error_rms_A": Metric("Å", "lower", (0.0, None), description="rms over tilts of |τ − τ_true|, "
                                          "volume shift removed"),
        "translation_error_mean_removed_rms_A": Metric("Å", "lower", (0.0, None), diagnostic=True,
                                                       description="rms |τ − τ_true| with only the mean removed"),
        "translation_error_raw_rms_A": Metric("Å", "lower", (0.0, None), diagnostic=True,
                                              description="rms |τ − τ_true|, nothing removed"),
        "volume_shift_*_A": Metric("Å", None, diagnostic=True, description="displacement of the volume's content "
                                   "from the truth implied by the translation errors (x, y, z): −t with τ − τ_true = "
                                   "(R_k t)_{y,x}"),
        "euler_error_max_*_deg": Metric("deg", "lower", (0.0, 180.0), diagnostic=True,
                                        description="max over tilts of the error "
                                        "of one Euler angle (rot and psi are degenerate near tilt 0)"),
        "rotation_error_max_deg": Metric("deg", "lower", (0.0, 180.0), headline=True,
                                         description="max over tilts of the angle of R_true⁻¹ R_recovered Q, the "
                                                     "common rotation Q (not measurable) removed"),
        "rotation_error_median_deg": Metric("deg", "lower", (0.0, 180.0),
                                            description="median over tilts of the angle of R_true⁻¹ R_recovered Q"),
        "rotation_error_raw_max_deg": Metric("deg", "lower", (0.0, 180.0), diagnostic=True,
                                             description="max over tilts of the angle of R_true⁻¹ R_recovered"),
        "common_rotation_deg": Metric("deg", None, (0.0, 180.0), diagnostic=True,
                                      description="angle of the fitted common rotation Q of the volume vs truth"),
    }

    class Params(Params):
        pass

    def score(self, reconstruction, measurement, sample, params):
        ex = reconstruction.extras
        if "translations_A" not in ex or "euler_deg" not in ex:
            return {}
        if measurement.kind != "4dstem_tilt_series":
            raise TembenchError(f"alignment_error scores a '4dstem_tilt_series', got {measurement.kind!r}")
        te, tt = true_alignment(measurement)
        return alignment_errors(ex["translations_A"], ex["euler_deg"], tt, te)


# --- depth elongation -------------------------------------------------------------------------------------
_LM_ITERATIONS = 60


def fit_axial_gaussians(volume, sites_vox, voxel_A: float, box_lateral_A: float, box_axial_A: float):
    """Fit b + A·exp(−((x−x_c)²+(y−y_c)²)/2σ_lat² − (z−z_c)²/2σ_z²) in a box around each site (z, y, x voxels).

    One batched Levenberg–Marquardt over all sites ((n, 7, 7) solves, analytic Jacobian; boxes clipped to the
    volume). Returns (σ_z Å (n,), σ_lat Å (n,), centres (n, 3) voxels, ok (n,) bool); ``ok`` is False when the
    site lies on the volume's border, the peak is not positive, a width sits at its bound, or the centre
    moved more than one voxel laterally or to its z bound (not a resolved atom)."""
    vol = np.asarray(volume, np.float64)
    sites = np.asarray(sites_vox, np.float64).reshape(-1, 3)
    n = len(sites)
    s = float(voxel_A)
    hz = max(1, int(round(box_axial_A / s)))
    hl = max(1, int(round(box_lateral_A / s)))
    shape = np.asarray(vol.shape)
    anchor = np.rint(sites).astype(int)
    inside = np.all((anchor >= 1) & (anchor <= shape - 2), axis=1)
    oz, oy, ox = (o.ravel() for o in np.meshgrid(np.arange(-hz, hz + 1), np.arange(-hl, hl + 1),
                                                  np.arange(-hl, hl + 1), indexing="ij"))
    iz, iy, ix = anchor[:, :1] + oz, anchor[:, 1:2] + oy, anchor[:, 2:] + ox            # (n, M)
    w = ((iz >= 0) & (iz < shape[0]) & (iy >= 0) & (iy < shape[1]) & (ix >= 0) & (ix < shape[2])).astype(float)
    v = vol[np.clip(iz, 0, shape[0] - 1), np.clip(iy, 0, shape[1] - 1), np.clip(ix, 0, shape[2] - 1)] * w
    zz, yy, xx = iz.astype(float), iy.astype(float), ix.astype(float)
    big = np.where(w > 0, v, np.inf)
    b0 = np.where(np.isfinite(big.min(axis=1)), big.min(axis=1), 0.0)
    a0 = np.max(np.where(w > 0, v, -np.inf), axis=1) - b0
    # the tracer's isotropic sites may sit off an elongated atom's centre along z: let z move within the box
    dzmax = max(1.5, 0.5 * hz)
    lo_s = 0.25
    lb = np.stack([np.zeros(n), sites[:, 0] - dzmax, sites[:, 1] - 1.5, sites[:, 2] - 1.5,
                   np.full(n, lo_s), np.full(n, lo_s), np.full(n, -np.inf)], axis=1)
    ub = np.stack([np.full(n, np.inf), sites[:, 0] + dzmax, sites[:, 1] + 1.5, sites[:, 2] + 1.5,
                   np.full(n, float(hz)), np.full(n, float(hl)), np.full(n, np.inf)], axis=1)
    p = np.stack([np.maximum(a0, 1e-12), *sites.T, np.full(n, min(1.0, 0.9 * hz)), np.full(n, min(1.0, 0.9 * hl)),
                  b0], axis=1)

    def evaluate(p):
        a, cz, cy, cx, sz, sl, b = (p[:, i:i + 1] for i in range(7))
        dz, dy, dx = zz - cz, yy - cy, xx - cx
        rho2 = dy * dy + dx * dx
        g = np.exp(-rho2 / (2 * sl * sl) - dz * dz / (2 * sz * sz))
        r = (b + a * g - v) * w
        return r, (a, dz, dy, dx, rho2, sz, sl, g)

    r, parts = evaluate(p)
    cost = (r * r).sum(axis=1)
    lam = np.full(n, 1e-3)
    for _ in range(_LM_ITERATIONS):
        a, dz, dy, dx, rho2, sz, sl, g = parts
        ag = a * g
        jac = np.stack([g, ag * dz / sz**2, ag * dy / sl**2, ag * dx / sl**2, ag * dz * dz / sz**3,
                        ag * rho2 / sl**3, np.ones_like(g)], axis=2) * w[:, :, None]       # (n, M, 7)
        jtj = np.einsum("nmi,nmj->nij", jac, jac)
        grad = np.einsum("nmi,nm->ni", jac, r)
        damp = jtj + lam[:, None, None] * (np.eye(7) * np.diagonal(jtj, axis1=1, axis2=2)[:, None, :] + 1e-12 * np.eye(7))
        try:
            step = -np.linalg.solve(damp, grad[:, :, None])[:, :, 0]
        except np.linalg.LinAlgError:
            step = -grad / np.maximum(np.diagonal(damp, axis1=1, axis2=2), 1e-30)
        trial = np.clip(p + step, lb, ub)
        r_t, parts_t = evaluate(trial)
        cost_t = (r_t * r_t).sum(axis=1)
        better = cost_t < cost
        p = np.where(better[:, None], trial, p)
        r = np.where(better[:, None], r_t, r)
        parts = tuple(np.where(better[:, None], pt, pc) for pt, pc in zip(parts_t, parts))
        cost = np.where(better, cost_t, cost)
        lam = np.where(better, lam / 3.0, lam * 4.0)
        if np.all(lam > 1e8):
            break
    a, cz, cy, cx, sz, sl, _ = p.T
    ok = (inside & (a > 0) & (np.hypot(cy - sites[:, 1], cx - sites[:, 2]) <= 1.0)
          & (np.abs(cz - sites[:, 0]) <= 0.98 * dzmax) & (sz < 0.98 * hz) & (sl < 0.98 * hl)
          & (np.minimum(sz, sl) > 1.02 * lo_s))
    return sz * s, sl * s, p[:, 1:4], ok


def fit_axial_gaussian(volume, centre_vox, voxel_A: float, box_lateral_A: float, box_axial_A: float):
    """One site of :func:`fit_axial_gaussians`: (σ_z Å, σ_lat Å, centre_vox) or None when the fit is rejected."""
    sz, sl, c, ok = fit_axial_gaussians(volume, [centre_vox], voxel_A, box_lateral_A, box_axial_A)
    return (float(sz[0]), float(sl[0]), c[0]) if ok[0] else None


def elongation_ratios(volume, sites_vox, voxel_A, box_lateral_A, box_axial_A, max_sites=None):
    """(σ_z/σ_lat per fitted atom, fitted σ_z Å, fitted σ_lat Å) for the sites (z, y, x voxels) that fit; fits
    converging within one voxel of an earlier one are the same atom and counted once."""
    sites = np.asarray(sites_vox, np.float64).reshape(-1, 3)
    if max_sites is not None and len(sites) > max_sites:
        # a deterministic, evenly spread subset
        sites = sites[np.linspace(0, len(sites) - 1, max_sites).round().astype(int)]
    if not len(sites):
        return np.zeros(0), np.zeros(0), np.zeros(0)
    sz, sl, centres, ok = fit_axial_gaussians(volume, sites, voxel_A, box_lateral_A, box_axial_A)
    # sites the tracer split off one elongated atom converge to the same centre: count the atom once
    keep = []
    for i in np.flatnonzero(ok):
        if not any(np.linalg.norm(centres[i] - centres[j]) < 1.0 for j in keep):
            keep.append(i)
    keep = np.asarray(keep, int)
    return sz[keep] / sl[keep], sz[keep], sl[keep]


def mean_site_elongation(volume, sites_vox, voxel_A, box_lateral_A, box_axial_A):
    """σ_z/σ_lat (and σ_z, σ_lat in Å) of the MEAN of the volume around every site (z, y, x voxels): the average
    atom. Each site's box is resampled about the site itself (cubic spline), so sub-voxel positions do not blur the
    mean, and no site is left out — unlike :func:`elongation_ratios`, which drops the sites whose fit fails (the
    most elongated atoms among them), so that two reconstructions are compared on different atoms. Only sites whose
    box lies inside the volume enter (a rule of the truth's positions and the volume's shape, not of the fit).
    The mean box reaches twice ``box_axial_A`` along z so that σ_z up to about that can be fitted. Returns
    (ratio, σ_z Å, σ_lat Å, n_sites); NaNs when no site fits or the mean's fit is rejected."""
    from scipy.ndimage import map_coordinates, spline_filter

    vol = np.asarray(volume, np.float64)
    sites = np.asarray(sites_vox, np.float64).reshape(-1, 3)
    s = float(voxel_A)
    hz = 2 * max(1, int(round(box_axial_A / s))) + 1
    hl = max(1, int(round(box_lateral_A / s))) + 1
    shape = np.asarray(vol.shape)
    half = np.array([hz, hl, hl])
    inside = np.all((sites - half >= 0) & (sites + half <= shape - 1), axis=1)
    nan = float("nan")
    if not inside.any():
        return nan, nan, nan, 0
    offs = np.meshgrid(np.arange(-hz, hz + 1), np.arange(-hl, hl + 1), np.arange(-hl, hl + 1), indexing="ij")
    mean = np.zeros(offs[0].shape)
    coef = spline_filter(vol, order=3, mode="nearest")       # cubic: linear interpolation would widen the mean
    for c in sites[inside]:
        mean += map_coordinates(coef, [c[i] + offs[i] for i in range(3)], order=3, mode="nearest", prefilter=False)
    mean /= int(inside.sum())
    sz, sl, _, ok = fit_axial_gaussians(mean, [half.astype(float)], s, box_lateral_A, 2.0 * box_axial_A)
    if not ok[0]:
        return nan, nan, nan, int(inside.sum())
    return float(sz[0] / sl[0]), float(sz[0]), float(sl[0]), int(inside.sum())


def wedge_correlations(volume, truth, voxel_A: float, split_deg: float = 60.0, k_max_invA: float = 1.0,
                       tilt_axis: str = "y") -> tuple[float, float]:
    """Fourier correlation of a volume with the truth (both (z, y, x) on the same voxels) in two complementary
    regions of k space, for k_min < |k| ≤ ``k_max_invA`` (k_min: the first shell, 1/(n·s)): the AXIAL wedge, where
    the direction of k in the plane normal to the tilt axis is more than ``split_deg`` from the lateral axis (for a
    single-axis tilt series (tilt axis ``tilt_axis``) with split 60°: the ±30° wedge about k_z that every tilt
    range up to ±60° leaves unmeasured), and the rest (LATERAL; a tilt range ±θ measures up to θ from it). Returns (cc_axial, cc_lateral):
    Re Σ F·conj(G) / √(Σ|F|² Σ|G|²) over each region. Missing-wedge elongation is low cc_axial at fair cc_lateral;
    information the multislice model adds along the beam raises cc_axial."""
    a = np.asarray(volume, np.float64)
    g = np.asarray(truth, np.float64)
    if a.shape != g.shape:
        raise TembenchError(f"wedge_correlations: shapes {a.shape} and {g.shape}")
    fa, fg = np.fft.fftn(a - a.mean()), np.fft.fftn(g - g.mean())
    kz, ky, kx = np.meshgrid(*(np.fft.fftfreq(n, voxel_A) for n in a.shape), indexing="ij")
    k = np.sqrt(kz**2 + ky**2 + kx**2)
    k_lat = {"y": np.abs(kx), "x": np.abs(ky)}[tilt_axis]      # the lateral axis in the tilt plane
    ang = np.degrees(np.arctan2(np.abs(kz), k_lat))             # 0: lateral, 90: along the beam
    band = (k > 1.0 / (max(a.shape) * voxel_A) + 1e-12) & (k <= k_max_invA)
    out = []
    floor = 1e-12 * float(np.sum(np.abs(fa[band]) ** 2))       # a region the volume leaves empty reads 0, not 0/0
    for region in (band & (ang > split_deg), band & (ang <= split_deg)):
        num = float(np.real(np.sum(fa[region] * np.conj(fg[region]))))
        den = float(np.sqrt(max(float(np.sum(np.abs(fa[region]) ** 2)), floor) * np.sum(np.abs(fg[region]) ** 2)))
        out.append(num / den if den > 0 else float("nan"))
    return out[0], out[1]


def depth_sections(volume, origin_A, voxel_A: float, half_width_A: float, truth=None) -> dict:
    """xz sections (nz, nx) through the box centre, mean over |y − y_c| ≤ ``half_width_A``: of ``volume`` (voxel i at
    origin + i·s) and, given ``truth`` (voxel i at i·s, ``Sample.potential_volume``), of the truth at the same
    points (cubic interpolation, vacuum outside the cell)."""
    from scipy.ndimage import map_coordinates

    vol = np.asarray(volume, np.float64)
    nz, ny, nx = vol.shape
    s = float(voxel_A)
    k = int(np.floor(half_width_A / s + 1e-9))
    iy = np.arange(max(0, ny // 2 - k), min(ny, ny // 2 + k + 1))
    out = {"depth_section_xz": vol[:, iy, :].mean(axis=1).astype(np.float32),
           "depth_section_origin_zx_A": np.array([origin_A[0], origin_A[2]], np.float64),
           "depth_section_y_A": float(origin_A[1] + s * (ny // 2))}
    if truth is not None:
        o = np.asarray(origin_A, np.float64) / s
        zz, yy, xx = np.meshgrid(o[0] + np.arange(nz), o[1] + iy, o[2] + np.arange(nx), indexing="ij")
        t = map_coordinates(np.asarray(truth, np.float64), [zz, yy, xx], order=3, mode="constant", cval=0.0)
        out["depth_section_xz_truth"] = t.mean(axis=1).astype(np.float32)
    return out


class DepthElongation(Quantifier):
    """Missing-wedge elongation of atoms in a volume: median σ_z/σ_lat of axially symmetric Gaussian fits at the
    traced atoms, and the same at the true atoms in the ground-truth potential at the same voxel (You 2025
    Fig. 2d, in numbers)."""

    name = "depth_elongation"
    version = "1"
    accepts = ("volume",)
    metrics = {
        "depth_elongation_ratio": Metric("", "lower", (0.0, None), headline=True,
                                         description="median over traced atoms of σ_z/σ_lat (axial over lateral "
                                                     "Gaussian width); 1 = isotropic, > 1 elongated along the beam"),
        "depth_elongation_truth_ratio": Metric("", None, (0.0, None), diagnostic=True,
                                               description="the same on the ground-truth potential at the same "
                                                           "voxel, at the true atom positions"),
        "depth_elongation_rel": Metric("", "lower", (0.0, None),
                                       description="depth_elongation_ratio / depth_elongation_truth_ratio"),
        "depth_sigma_z_median_A": Metric("Å", "lower", (0.0, None), diagnostic=True,
                                         description="median axial Gaussian σ (Å)"),
        "depth_sigma_lateral_median_A": Metric("Å", "lower", (0.0, None), diagnostic=True,
                                               description="median lateral Gaussian σ (Å)"),
        "depth_elongation_true_sites_ratio": Metric("", "lower", (0.0, None), diagnostic=True,
                                                    description="median σ_z/σ_lat fitted in the registered volume at "
                                                                "the TRUE atom positions (not fooled by false "
                                                                "positives; atoms whose fit fails are left out)"),
        "depth_elongation_true_sites_rel": Metric("", "lower", (0.0, None),
                                                  description="depth_elongation_true_sites_ratio / "
                                                              "depth_elongation_truth_ratio"),
        "depth_elongation_mean_site_ratio": Metric("", "lower", (0.0, None), diagnostic=True,
                                                   description="σ_z/σ_lat of the mean profile of the registered "
                                                               "volume about every true atom site (the average "
                                                               "atom; no site left out, so routes are compared on "
                                                               "the same atoms)"),
        "depth_elongation_mean_site_rel": Metric("", "lower", (0.0, None),
                                                 description="depth_elongation_mean_site_ratio / the same of the "
                                                             "ground truth"),
        "depth_wedge_cc_axial": Metric("", "higher", (-1.0, 1.0),
                                       description="Fourier correlation with the truth (registered) in the axial "
                                                   "wedge (k within ±(90° − wedge_split_deg) of the beam in the tilt "
                                                   "plane, |k| ≤ wedge_k_max_invA): the information linear "
                                                   "tomography misses"),
        "depth_wedge_cc_lateral": Metric("", "higher", (-1.0, 1.0),
                                         description="the same in the complementary (measured, lateral) region"),
        "depth_sigma_*_true_sites_A": Metric("Å", "lower", (0.0, None), diagnostic=True,
                                             description="median axial / lateral σ at the true sites (Å)"),
        "depth_sigma_*_mean_site_A": Metric("Å", "lower", (0.0, None), diagnostic=True,
                                            description="axial / lateral σ of the mean profile about the true sites (Å)"),
        "depth_section_y_A": Metric("Å", None, diagnostic=True, description="y of the stored xz depth sections"),
        "depth_n_*": Metric("atoms", None, (0.0, None), diagnostic=True,
                            description="sites fitted (reconstruction / truth)"),
    }

    class Params(Params):
        box_lateral_A: float = Field(0.8, gt=0, le=5, description="half-width of the fit box in x and y (Å); about "
                                     "half the nearest-neighbour distance")
        box_axial_A: float = Field(1.6, gt=0, le=10, description="half-height of the fit box along z (Å)")
        intensity_threshold_frac: float = Field(0.2, ge=0, lt=1, description="tracer: keep peaks above this "
                                                "fraction of the volume maximum")
        dog_sigmas_vox: tuple[float, float] = Field((0.5, 1.0), description="tracer: DoG widths (voxels)")
        sigma_range_vox: tuple[float, float] = Field((0.25, 3.0), description="tracer: allowed isotropic σ (voxels)")
        max_rounds: int = Field(4, ge=1, le=50, description="tracer: refinement rounds (only peaks are needed)")
        background: str = Field("median", pattern="^(zero|median)$", description="tracer background")
        max_sites: int = Field(400, ge=1, le=100000, description="fit at most this many sites (evenly chosen)")
        truth: bool = Field(True, description="also fit the ground-truth potential at the true atom positions")
        section_half_width_A: float | None = Field(1.0, ge=0, description="store the xz depth section through the "
                                                   "box centre (mean over |y − y_c| ≤ this, Å) of the volume and of "
                                                   "the truth as artifacts; None: no sections")
        parametrization: str = Field("lobato", description="potential parametrisation of the ground truth")
        true_sites: bool = Field(True, description="also fit the reconstruction at the TRUE atom positions (after "
                                 "registering it to the truth, as tomo_fsc): not fooled by false-positive peaks")
        register_max_shift_A: float = Field(2.0, ge=0, le=50, description="registration search radius for the "
                                            "true-site fits (Å per axis)")
        wedge_split_deg: float = Field(60.0, gt=0, lt=90, description="axial wedge: k more than this from the lateral "
                                       "axis in the tilt plane (60: the ±30° wedge about the beam)")
        wedge_k_max_invA: float = Field(1.0, gt=0, description="wedge correlations up to this |k| (1/Å)")

        @field_validator("dog_sigmas_vox", "sigma_range_vox")
        @classmethod
        def _increasing(cls, v):
            if not 0 < v[0] < v[1]:
                raise ValueError(f"need two widths 0 < first < second, got {v}")
            return v

    def score(self, reconstruction, measurement, sample, params):
        from tembench.analysis.atom_tracing import trace_atoms

        if reconstruction.kind != "volume":
            return {}
        d = np.asarray(reconstruction.sampling_A, np.float64)
        if not np.allclose(d, d[0], rtol=1e-6):
            raise TembenchError(f"depth_elongation needs cubic voxels, got sampling_A {tuple(d)}")
        s = float(d[0])
        vol = np.asarray(reconstruction.data, np.float64)
        res = trace_atoms(vol, d, dog_sigmas_vox=params.dog_sigmas_vox,
                          intensity_threshold_frac=params.intensity_threshold_frac,
                          sigma_range_vox=params.sigma_range_vox,
                          sigma_init_vox=float(np.clip(0.7, *params.sigma_range_vox)),
                          max_rounds=params.max_rounds, background=params.background)
        ratio, sz, sl = elongation_ratios(vol, res.positions_vox, s, params.box_lateral_A, params.box_axial_A,
                                          params.max_sites)
        nan = float("nan")
        out = {"depth_elongation_ratio": float(np.median(ratio)) if len(ratio) else nan,
               "depth_sigma_z_median_A": float(np.median(sz)) if len(sz) else nan,
               "depth_sigma_lateral_median_A": float(np.median(sl)) if len(sl) else nan,
               "depth_n_traced": int(len(res)), "depth_n_fitted": int(len(ratio)),
               "depth_elongation_ratios": ratio}
        gt = None
        if (params.truth or params.section_half_width_A is not None) and sample is not None and len(sample):
            gt = np.asarray(sample.potential_volume(s, parametrization=params.parametrization), np.float64)
        if params.truth and gt is not None:
            t_ratio = self._truth(reconstruction, sample, s, params, gt)
            out["depth_elongation_truth_ratio"] = float(np.median(t_ratio)) if len(t_ratio) else nan
            out["depth_n_truth_fitted"] = int(len(t_ratio))
            out["depth_elongation_rel"] = out["depth_elongation_ratio"] / out["depth_elongation_truth_ratio"]
        if params.true_sites and sample is not None and len(sample):
            out.update(self._true_sites(reconstruction, vol, sample, s, params, out.get("depth_elongation_truth_ratio")))
        if params.section_half_width_A is not None:
            out.update(depth_sections(vol, reconstruction.origin_A, s, params.section_half_width_A, gt))
        return out

    @staticmethod
    def _true_sites(reconstruction, vol, sample, s, params, truth_ratio):
        """σ_z/σ_lat fitted in the reconstruction at the true atom positions (volume registered to the truth first:
        its common shift is not measurable), so noise peaks that the tracer takes for atoms do not enter."""
        t = truth_shift_A(reconstruction, sample, params.register_max_shift_A, params.parametrization)
        origin = np.asarray(reconstruction.origin_A, np.float64) - t            # (z, y, x) after registration
        shape = np.asarray(vol.shape)
        sites = (sample.positions_A[:, ::-1] - origin) / s
        inside = np.all((sites >= 0) & (sites <= shape - 1), axis=1)
        ratio, sz, sl = elongation_ratios(vol, sites[inside], s, params.box_lateral_A, params.box_axial_A,
                                          params.max_sites)
        nan = float("nan")
        med = float(np.median(ratio)) if len(ratio) else nan
        truth = _truth_on_voxels(sample, vol.shape, origin, s, params.parametrization)
        cc_ax, cc_lat = wedge_correlations(vol, truth, s, params.wedge_split_deg, params.wedge_k_max_invA)
        m_ratio, m_sz, m_sl, m_n = mean_site_elongation(vol, sites, s, params.box_lateral_A, params.box_axial_A)
        t_ratio, _, _, _ = mean_site_elongation(truth, sites, s, params.box_lateral_A, params.box_axial_A)
        return {"depth_wedge_cc_axial": cc_ax, "depth_wedge_cc_lateral": cc_lat,
                "depth_elongation_true_sites_ratio": med,
                "depth_elongation_true_sites_rel": med / truth_ratio if truth_ratio else nan,
                "depth_sigma_z_true_sites_A": float(np.median(sz)) if len(sz) else nan,
                "depth_sigma_lateral_true_sites_A": float(np.median(sl)) if len(sl) else nan,
                "depth_n_true_sites": int(inside.sum()), "depth_n_true_sites_fitted": int(len(ratio)),
                "depth_elongation_mean_site_ratio": m_ratio, "depth_elongation_mean_site_rel": m_ratio / t_ratio,
                "depth_sigma_z_mean_site_A": m_sz, "depth_sigma_lateral_mean_site_A": m_sl,
                "depth_n_mean_site": m_n}

    @staticmethod
    def _truth(reconstruction, sample, s, params, gt):
        origin = np.asarray(reconstruction.origin_A, np.float64)        # (z, y, x)
        shape = np.asarray(np.shape(reconstruction.data))
        zyx = sample.positions_A[:, ::-1]
        inside = np.all((zyx >= origin - 0.5 * s) & (zyx <= origin + (shape - 0.5) * s), axis=1)
        # truth voxel i sits at i·s (Sample.potential_volume)
        ratio, _, _ = elongation_ratios(gt, zyx[inside] / s, s, params.box_lateral_A, params.box_axial_A,
                                        params.max_sites)
        return ratio


# --- registration: the unmeasurable shift of a tomogram, removed before scoring against truth ---------------------
def correlation_shift_vox(moving, reference, max_shift_vox: float | None = None) -> np.ndarray:
    """Shift d (z, y, x voxels) with ``moving``(x) ≈ ``reference``(x − d): peak of the FFT cross-correlation (means
    removed; periodic), restricted to |d| ≤ ``max_shift_vox`` per axis, refined by a parabola per axis."""
    a = np.asarray(moving, np.float64)
    b = np.asarray(reference, np.float64)
    if a.shape != b.shape:
        raise TembenchError(f"registration: volumes of shapes {a.shape} and {b.shape}")
    c = np.fft.ifftn(np.fft.fftn(a - a.mean()) * np.conj(np.fft.fftn(b - b.mean()))).real
    if max_shift_vox is not None:
        for axis, n in enumerate(c.shape):
            f = np.abs(np.fft.fftfreq(n, 1.0 / n))
            shp = [1] * c.ndim
            shp[axis] = n
            c = np.where((f <= max_shift_vox).reshape(shp), c, -np.inf)
    peak = np.unravel_index(int(np.argmax(c)), c.shape)
    d = np.zeros(c.ndim)
    for axis, n in enumerate(c.shape):
        idx = list(peak)
        vals = []
        for o in (-1, 0, 1):
            idx[axis] = (peak[axis] + o) % n
            vals.append(c[tuple(idx)])
        cm, c0, cp = vals
        den = cm - 2 * c0 + cp
        frac = 0.5 * (cm - cp) / den if np.isfinite(den) and den < 0 else 0.0
        p = peak[axis] + float(np.clip(frac, -0.5, 0.5))
        d[axis] = p - n if p > n / 2 else p
    return d


def _truth_on_voxels(sample, shape, origin_A, s, parametrization="lobato"):
    """``Sample.potential_volume`` (voxel i at i·s) at the voxels of a volume of ``shape`` with ``origin_A``
    (cubic interpolation, vacuum outside the cell)."""
    from scipy.ndimage import map_coordinates

    gt = np.asarray(sample.potential_volume(s, parametrization=parametrization), np.float64)
    o = np.asarray(origin_A, np.float64) / s
    coords = np.meshgrid(*(o[i] + np.arange(shape[i]) for i in range(3)), indexing="ij")
    return map_coordinates(gt, coords, order=3, mode="constant", cval=0.0)


def truth_shift_A(reconstruction, sample, max_shift_A: float = 2.0, parametrization: str = "lobato") -> np.ndarray:
    """Shift t (z, y, x) Å of a volume's content from the truth (``Sample.potential_volume`` at its voxels): the
    volume with origin ``origin − t`` lies on the truth. A common shift of a tomogram (with every τ_k changed by
    (R_k t)_{y,x}) fits the data equally well, so scoring against truth removes it first."""
    from scipy.ndimage import map_coordinates

    d = np.asarray(reconstruction.sampling_A, np.float64)
    if not np.allclose(d, d[0], rtol=1e-6):
        raise TembenchError(f"registration needs cubic voxels, got sampling_A {tuple(d)}")
    s = float(d[0])
    vol = np.asarray(reconstruction.data, np.float64)
    gt = np.asarray(sample.potential_volume(s, parametrization=parametrization), np.float64)
    o = np.asarray(reconstruction.origin_A, np.float64) / s
    coords = np.meshgrid(*(o[i] + np.arange(vol.shape[i]) for i in range(3)), indexing="ij")
    truth = map_coordinates(gt, coords, order=3, mode="constant", cval=0.0)
    return correlation_shift_vox(vol, truth, max_shift_A / s) * s


def _shifted_data(data, shift_vox):
    """``data`` with its content moved by ``shift_vox`` (z, y, x): Fourier shift (periodic, exact when band-limited)."""
    from scipy.ndimage import fourier_shift

    x = np.asarray(data)
    return np.fft.ifftn(fourier_shift(np.fft.fftn(x), shift_vox)).real.astype(x.dtype)


def register_reconstruction(reconstruction, sample, max_shift_A: float, parametrization: str = "lobato"):
    """(copy of the volume reconstruction with its origin moved onto the truth, shift t (z, y, x) Å, half-set
    shift Å). Half sets (``extras['half_sets']``): B's content moved onto A's (each half's own gauge), A onto the
    truth like the full volume (the same origin shift for both, so they still cover the same voxels)."""
    import dataclasses

    from tembench.types import HALF_SETS

    t = truth_shift_A(reconstruction, sample, max_shift_A, parametrization)
    origin = tuple(float(v) for v in np.asarray(reconstruction.origin_A) - t)
    extras = dict(reconstruction.extras or {})
    half_shift = float("nan")
    halves = extras.get(HALF_SETS)
    if isinstance(halves, (list, tuple)) and len(halves) == 2 and all(hasattr(h, "data") for h in halves):
        a, b = halves
        s = float(np.asarray(a.sampling_A, np.float64)[0])
        d = correlation_shift_vox(b.data, a.data, max_shift_A / s)
        half_shift = float(np.linalg.norm(d) * s)
        ta = truth_shift_A(a, sample, max_shift_A, parametrization)
        oa = tuple(float(v) for v in np.asarray(a.origin_A) - ta)
        extras[HALF_SETS] = [dataclasses.replace(a, origin_A=oa),
                             dataclasses.replace(b, data=_shifted_data(b.data, -d), origin_A=oa)]
    return dataclasses.replace(reconstruction, origin_A=origin, extras=extras), t, half_shift


_REG_METRICS = {
    "registration_shift_*_A": Metric("Å", None, diagnostic=True, description="shift of the volume's content from "
                                     "the truth removed before scoring (z, y, x; not measurable from the data)"),
    "registration_half_shift_A": Metric("Å", None, (0.0, None), diagnostic=True,
                                        description="|shift| between the half-set volumes removed before their FSC"),
}


def _registered_score(base, self, reconstruction, measurement, sample, params):
    if reconstruction.kind != "volume" or params.register_max_shift_A is None:
        return base.score(self, reconstruction, measurement, sample, params)
    rec, t, half = register_reconstruction(reconstruction, sample, params.register_max_shift_A,
                                           getattr(params, "parametrization", "lobato"))
    out = base.score(self, rec, measurement, sample, params)
    out.update({"registration_shift_z_A": float(t[0]), "registration_shift_y_A": float(t[1]),
                "registration_shift_x_A": float(t[2]), "registration_half_shift_A": half})
    return out


_REGISTER_HELP = ("register the volume to the truth first: the shift (|t| ≤ this, Å per axis) of best cross-correlation "
                  "is removed from its origin (a tomogram's common shift is not measurable); None: no registration")


def half_set_fluence_e_per_A2(measurement) -> float | None:
    """Total fluence (e/Å², summed over every tilt of the series) that ONE half set uses, the mean of halves A and
    B — You 2025 Fig. 3e's x axis. It is the core's bookkeeping read back: ``poisson_dose`` records the full-scan
    dose of the series (``geometry.extra['dose_total_e_per_A2']`` = dose per tilt × tilts) and
    :func:`tembench.types.half_measurement` scales it by the fraction of the patterns the half holds (``split:
    positions``: 1/n_subsets of the scan, each pattern at its full dose) or halves it (``split: dose``). None without
    half sets or without a finite recorded dose."""
    import math

    from tembench.types import half_measurement, has_half_sets

    if measurement is None or not has_half_sets(measurement):
        return None
    vals = []
    for i in (0, 1):
        v = half_measurement(measurement, i).geometry.extra.get("dose_total_e_per_A2")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return None
        vals.append(float(v))
    return float(np.mean(vals))


class TomoFSC(FourierShellCorrelation):
    """``fsc`` of a tomogram after removing its unmeasurable common shift: registered to the truth by
    cross-correlation (origin moved, data untouched); half B registered onto half A."""

    name = "tomo_fsc"
    version = "1"
    accepts = ("volume",)
    metrics = {**FourierShellCorrelation.metrics, **_REG_METRICS,
               "half_set_fluence_e_per_A2": Metric(
                   "e/Å²", None, (0.0, None), diagnostic=True,
                   description="total fluence over the whole tilt series used by one half set (mean of A and B; "
                               "You 2025 Fig. 3e's x axis); only with half sets")}

    class Params(FourierShellCorrelation.Params):
        register_max_shift_A: float | None = Field(2.0, ge=0, le=50, description=_REGISTER_HELP)

    def score(self, reconstruction, measurement, sample, params):
        out = _registered_score(FourierShellCorrelation, self, reconstruction, measurement, sample, params)
        fluence = half_set_fluence_e_per_A2(measurement)
        if fluence is not None:
            out["half_set_fluence_e_per_A2"] = fluence
        return out


class TomoAtomTracing(AtomTracing):
    """``atom_tracing`` of a tomogram after removing its unmeasurable common shift (registered to the truth by
    cross-correlation; origin moved, data untouched)."""

    name = "tomo_atom_tracing"
    version = "1"
    accepts = ("volume",)
    metrics = {**AtomTracing.metrics, **_REG_METRICS}

    class Params(AtomTracing.Params):
        register_max_shift_A: float | None = Field(2.0, ge=0, le=50, description=_REGISTER_HELP)
        parametrization: str = Field("lobato", description="potential parametrisation of the truth used to register")

    def score(self, reconstruction, measurement, sample, params):
        return _registered_score(AtomTracing, self, reconstruction, measurement, sample, params)
