"""Atom tracing in a reconstructed volume (Ren et al. 2020 §2.6), species classification and matching.

The algorithm, for any volume (nz, ny, nx) with voxel size ``sampling_A`` = (dz, dy, dx):

1. difference-of-Gaussians filter (σ 0.5 and 1 voxel, each kernel of unit sum, so zero total
   amplitude) of the *residual* volume (data minus all sites fitted so far);
2. local maxima (26-neighbourhood) above a threshold become candidate sites, with a parabolic
   sub-voxel start position; candidates closer than the merge distance to a known site are
   ignored (they are that site's fitting residual, not a new atom);
3. every site is refined by non-linear least squares of an isotropic 3D Gaussian
   ``A·exp(-|r - c|²/2σ²)`` (σ in Å, so it is round in space even for anisotropic voxels) on
   the voxels within ``fit_radius_vox`` of its voxel, after subtracting every *other* site's
   fitted Gaussian (Ren's neighbour subtraction). The fits are batched: one Levenberg–Marquardt
   step is a (n_sites, 5, 5) solve, so there is no Python loop over atoms;
4. sites with amplitude below the intensity threshold (default 10 % of the volume maximum),
   with a size (FWHM = 2.355 σ) below ``min_size_vox`` or centred outside the volume are
   removed, and sites closer than ``merge_distance_vox`` are merged (intensity-weighted);
5. 1–4 repeat until fewer than ``tol_sites`` sites change (net additions + removals + merges)
   and the RMS position change is below ``tol_rms_vox``, or for ``max_rounds`` rounds.

Choices beyond the paper's text (each measured on synthetic volumes, see the tests):

- the fit window is a sphere of ``fit_radius_vox`` = 2.2 voxels (33 voxels) around the site's
  anchor voxel; Ren's code used 1.8 voxels around the sub-voxel centre, which on an anchored
  grid is the 3×3×3 cube — there σ and A of an off-centre atom are nearly degenerate and noise
  drives σ down until the size criterion removes a real atom;
- anchors move only when a site drifts > 0.75 voxel, so a site near a voxel boundary does not
  flip between two windows with different optima every round;
- a lost site's first-detection voxel and last position are remembered and not re-detected:
  without it noise peaks near the threshold are added and removed every other round and the
  "fewer than 2 changes" criterion is never met;
- rounds after the first refit only sites within reach of a site that changed, and update the
  model volume incrementally: the result is the same (negligible updates < 10⁻⁴ voxel are
  dropped), the later rounds are much cheaper;
- ``min_integrated_frac`` (default off) adds a removal criterion on the integrated intensity
  relative to the median site, which rejects narrow single-voxel noise peaks whose extrapolated
  peak passes the amplitude threshold;
- Ren's code also removed sites by a neighbour-count density and a local intensity ratio; the
  paper does not describe these and they are not implemented.

"A voxel" as a length is the geometric-mean voxel size (dz·dy·dx)^(1/3); for cubic voxels this is
the paper's voxel. Positions are returned in voxel coordinates (z, y, x): voxel (iz, iy, ix) has
its centre at ``origin_A + i·sampling_A``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from tembench.errors import TembenchError

FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))
_TWO_PI_3_2 = (2.0 * np.pi) ** 1.5
_CHUNK_ELEMENTS = 2_000_000      # (sites × voxels) per batch: bounds memory to ~100 MB for 10⁵ sites
_MAX_STEP_VOX = 0.5              # Levenberg–Marquardt position step limit per iteration
_MAX_DRIFT_VOX = 1.0             # a site may not leave its fitting window within one round
_MIN_VALID_VOXELS = 7            # fewer data voxels than this cannot constrain 5 parameters


@dataclass
class TraceResult:
    """Traced sites. Positions are voxel coordinates (z, y, x); ``intensity`` is the integrated
    Gaussian ``A·(2π)^{3/2}·σ³`` in (volume units)·Å³."""

    positions_vox: np.ndarray
    amplitude: np.ndarray
    sigma_A: np.ndarray
    sampling_A: np.ndarray
    n_rounds: int
    converged: bool
    history: dict[str, list[float]] = field(default_factory=dict)

    @property
    def intensity(self) -> np.ndarray:
        return self.amplitude * _TWO_PI_3_2 * self.sigma_A ** 3

    def __len__(self) -> int:
        return len(self.amplitude)

    def positions_A(self, origin_A=(0.0, 0.0, 0.0)) -> np.ndarray:
        """(N, 3) positions (z, y, x) in Å in the frame where voxel 0 is at ``origin_A`` (z, y, x)."""
        return np.asarray(origin_A, np.float64) + self.positions_vox * self.sampling_A

    def positions_xyz_A(self, origin_A=(0.0, 0.0, 0.0)) -> np.ndarray:
        """(N, 3) positions (x, y, z) in Å, the order of ``Sample.positions_A``."""
        return self.positions_A(origin_A)[:, ::-1].copy()


# --- small helpers ------------------------------------------------------------------------------
def _sampling3(sampling_A) -> np.ndarray:
    d = np.broadcast_to(np.asarray(sampling_A, np.float64), (3,)).copy()
    if not np.all(np.isfinite(d)) or np.any(d <= 0):
        raise TembenchError("atom tracing: sampling_A must be three positive voxel sizes (dz, dy, dx) in Å, "
                            f"got {sampling_A}")
    return d


def voxel_size_A(sampling_A) -> float:
    """Geometric-mean voxel size (Å): the length of "one voxel" for anisotropic sampling."""
    return float(np.prod(_sampling3(sampling_A)) ** (1.0 / 3.0))


def _ball_offsets(radius_A: float, d: np.ndarray) -> np.ndarray:
    """Integer voxel offsets (M, 3) within a sphere of ``radius_A`` (Å) for voxel size ``d``."""
    h = np.floor(radius_A / d + 1e-9).astype(int)
    g = np.stack(np.meshgrid(*[np.arange(-k, k + 1) for k in h], indexing="ij"), -1).reshape(-1, 3)
    return g[((g * d) ** 2).sum(1) <= radius_A ** 2 * (1 + 1e-9)]


class _Window:
    """Voxel offsets (M, 3) within a sphere of ``radius_A`` and per-axis tables, so that a batch of
    Gaussians is evaluated separably: three exp() on (n, 2h+1) instead of one on (n, M)."""

    def __init__(self, radius_A: float, d: np.ndarray):
        self.radius_A = float(radius_A)
        self.offsets = _ball_offsets(radius_A, d)
        self.half = np.abs(self.offsets).max(axis=0)
        self.axis = [np.arange(-h, h + 1) for h in self.half]
        self.cols = [self.offsets[:, k] + self.half[k] for k in range(3)]
        self.d = d

    def __len__(self) -> int:
        return len(self.offsets)

    def index(self, anchor: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray]:
        """Flat indices (n, M) of the window voxels (clipped into the volume) and their validity."""
        strides = (shape[1] * shape[2], shape[2], 1)
        flat, valid = 0, True
        for k in range(3):
            p = anchor[:, k, None] + self.axis[k][None, :]
            ok = (p >= 0) & (p < shape[k])
            np.clip(p, 0, shape[k] - 1, out=p)
            flat = flat + (p * strides[k])[:, self.cols[k]]
            valid = valid & ok[:, self.cols[k]]
        return flat, valid

    def gauss(self, anchor, c, s, with_derivatives: bool = True):
        """exp(-r²/2σ²) (n, M); with derivatives also the displacements u_k (Å, 3 × (n, M)) and r²."""
        inv = -0.5 / s[:, None] ** 2
        e, r2, us = 1.0, 0.0, []
        for k in range(3):
            dk = (anchor[:, k, None] + self.axis[k][None, :] - c[:, k, None]) * self.d[k]
            e = e * np.exp(dk * dk * inv)[:, self.cols[k]]
            if with_derivatives:
                u = dk[:, self.cols[k]]
                us.append(u)
                r2 = r2 + u * u
        return (e, us, r2) if with_derivatives else e

    def accumulate(self, out_flat: np.ndarray, shape, anchor, c, A, s) -> None:
        """out_flat += Σ A·exp(-r²/2σ²) over the window voxels of every site."""
        for sl in _chunks(len(A), len(self)):
            flat, valid = self.index(anchor[sl], shape)
            vals = A[sl, None] * self.gauss(anchor[sl], c[sl], s[sl], with_derivatives=False)
            if flat.size * 4 < out_flat.size:           # few sites: scatter-add beats a full-size bincount
                np.add.at(out_flat, flat[valid], vals[valid])
            else:
                out_flat += np.bincount(flat[valid], weights=vals[valid], minlength=out_flat.size)


def _chunks(n: int, per_site: int):
    step = max(1, _CHUNK_ELEMENTS // max(per_site, 1))
    for i in range(0, n, step):
        yield slice(i, min(i + step, n))


def dog_filter(volume, sampling_A=1.0, sigmas_vox=(0.5, 1.0)) -> np.ndarray:
    """Difference of two unit-sum Gaussians (σ in voxels of the mean voxel size, round in Å).

    Computed in the input's precision if float32/float64, else in float64."""
    d = _sampling3(sampling_A)
    dref = voxel_size_A(d)
    v = np.asarray(volume)
    if v.dtype not in (np.float32, np.float64):
        v = v.astype(np.float64)
    s1, s2 = (float(s) * dref / d for s in sigmas_vox)
    return ndimage.gaussian_filter(v, s1, mode="nearest") - ndimage.gaussian_filter(v, s2, mode="nearest")


def _dog_gain(sigma_A: float, d: np.ndarray, sigmas_vox) -> float:
    """Peak DoG response to a unit-amplitude Gaussian of width ``sigma_A``."""
    dref = voxel_size_A(d)
    sa = sigma_A / d
    out = 0.0
    for sign, s in zip((1.0, -1.0), sigmas_vox):
        sk = s * dref / d
        out += sign * float(np.prod(np.sqrt(sa ** 2 / (sa ** 2 + sk ** 2))))
    return out


def _local_maxima(f: np.ndarray, threshold: float) -> np.ndarray:
    """(K, 3) integer indices of 26-neighbourhood maxima of ``f`` above ``threshold``."""
    mx = ndimage.maximum_filter(f, size=3, mode="nearest")
    return np.argwhere((f >= mx) & (f > threshold))


def _parabolic_offsets(f: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Sub-voxel peak offsets (K, 3) from a 1D parabola through each axis' three values, |δ| ≤ 0.5."""
    out = np.zeros(idx.shape, np.float64)
    shape = np.asarray(f.shape)
    f0 = f[tuple(idx.T)]
    for ax in range(3):
        lo, hi = idx.copy(), idx.copy()
        lo[:, ax] = np.maximum(idx[:, ax] - 1, 0)
        hi[:, ax] = np.minimum(idx[:, ax] + 1, shape[ax] - 1)
        fm, fp = f[tuple(lo.T)], f[tuple(hi.T)]
        den = fm - 2.0 * f0 + fp
        with np.errstate(divide="ignore", invalid="ignore"):
            delta = np.where(den < 0, 0.5 * (fm - fp) / den, 0.0)
        out[:, ax] = np.clip(delta, -0.5, 0.5)
    return out


def _detect(resid: np.ndarray, d, sigmas_vox, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Local maxima of the DoG-filtered residual: (K, 3) voxel indices and sub-voxel positions.

    Filtering runs in float32 (detection only needs the peak voxel and a parabola through its
    neighbours; the fit reads the float64 residual) — about 1.5× faster for 10⁷ voxels.
    """
    dog = dog_filter(resid.astype(np.float32), d, sigmas_vox)
    idx = _local_maxima(dog, threshold)
    return idx, idx + _parabolic_offsets(dog.astype(np.float64, copy=False), idx)


def render_sites(shape, positions_vox, amplitude, sigma_A, sampling_A=1.0, radius_A: float | None = None,
                 anchors: np.ndarray | None = None) -> np.ndarray:
    """Sum of isotropic Gaussians ``A·exp(-r²/2σ²)`` on a (nz, ny, nx) grid, float64.

    Each Gaussian is evaluated on the voxels within ``radius_A`` of its anchor voxel (default:
    the nearest voxel; radius default 3 σ_max plus half a voxel diagonal), accumulated with
    ``np.bincount`` in batches.
    """
    d = _sampling3(sampling_A)
    shape = tuple(int(n) for n in shape)
    c = np.asarray(positions_vox, np.float64).reshape(-1, 3)
    A = np.asarray(amplitude, np.float64).reshape(-1)
    s = np.asarray(sigma_A, np.float64).reshape(-1)
    size = int(np.prod(shape))
    out = np.zeros(size, np.float64)
    if len(A) == 0:
        return out.reshape(shape)
    if radius_A is None:
        radius_A = 3.0 * float(s.max()) + 0.5 * float(np.linalg.norm(d))
    anchor = np.rint(c).astype(np.int64) if anchors is None else np.asarray(anchors, np.int64).reshape(-1, 3)
    _Window(radius_A, d).accumulate(out, shape, anchor, c, A, s)
    return out.reshape(shape)


# --- batched Levenberg–Marquardt -----------------------------------------------------------------
def _fit_gaussians(y, w, anchor, win: _Window, c, A, s, n_iter, s_bounds, A_min):
    """Fit ``A·exp(-|x-c|²/2σ²)`` to y (n, M) with weights w (n, M), one LM problem per site.

    Parameters are c (voxels, z y x), A and σ (Å). Returns refined (c, A, s).
    """
    c, A, s = c.copy(), A.copy(), s.copy()
    n = len(A)
    lam = np.full(n, 1e-3)
    eye = np.eye(5)

    d = win.d

    def residual(c_, A_, s_):
        e, u, r2 = win.gauss(anchor, c_, s_)
        g = A_[:, None] * e
        r = (y - g) * w
        return u, r2, e, g, r, np.einsum("nm,nm->n", r, r)

    u, r2, e, g, r, cost = residual(c, A, s)
    for _ in range(n_iter):
        J = np.empty(g.shape + (5,))
        gs = g / s[:, None] ** 2
        for k in range(3):                              # ∂g/∂c_k = g·u_k·d_k/σ² (c in voxels)
            J[..., k] = gs * u[k] * d[k]
        J[..., 3] = e
        J[..., 4] = gs * r2 / s[:, None]
        J *= w[..., None]
        JTJ = np.matmul(J.transpose(0, 2, 1), J)
        JTr = np.einsum("nmi,nm->ni", J, r)
        diag = np.diagonal(JTJ, axis1=1, axis2=2)
        ridge = lam[:, None] * diag + 1e-12 * diag.max(1, keepdims=True) + 1e-300
        delta = np.linalg.solve(JTJ + ridge[:, :, None] * eye, JTr[..., None])[..., 0]
        big = np.abs(delta[:, :3]).max(1)
        delta[:, :3] *= np.minimum(1.0, _MAX_STEP_VOX / np.maximum(big, 1e-300))[:, None]
        c_t = np.clip(c + delta[:, :3], anchor - _MAX_DRIFT_VOX, anchor + _MAX_DRIFT_VOX)
        A_t = np.maximum(A + delta[:, 3], A_min)
        s_t = np.clip(s + delta[:, 4], *s_bounds)
        u_t, r2_t, e_t, g_t, r_t, cost_t = residual(c_t, A_t, s_t)
        ok = cost_t < cost
        c[ok], A[ok], s[ok], cost[ok] = c_t[ok], A_t[ok], s_t[ok], cost_t[ok]
        for k in range(3):
            u[k][ok] = u_t[k][ok]
        r2[ok], e[ok], g[ok], r[ok] = r2_t[ok], e_t[ok], g_t[ok], r_t[ok]
        lam = np.where(ok, lam * 0.3, lam * 10.0)
    return c, A, s


def _refine(vol_resid, anchor, c, A, s, is_new, win: _Window, n_iter, s_bounds, A_min):
    """One neighbour-subtracted refinement of the given sites.

    ``vol_resid`` is data minus the model of all *existing* sites, rendered around the same
    anchors, so ``vol_resid + own model`` is the data with every other site subtracted. New
    sites are not in the model yet and see ``vol_resid`` as is.
    """
    shape = vol_resid.shape
    flat_vol = vol_resid.reshape(-1)
    c_out, A_out, s_out = c.copy(), A.copy(), s.copy()
    n_valid = np.zeros(len(A), np.int64)
    for sl in _chunks(len(A), len(win)):
        flat, valid = win.index(anchor[sl], shape)
        y = flat_vol[flat]
        old = ~is_new[sl]
        if old.any():
            y[old] += A[sl][old, None] * win.gauss(anchor[sl][old], c[sl][old], s[sl][old], with_derivatives=False)
        n_valid[sl] = valid.sum(1)
        c_out[sl], A_out[sl], s_out[sl] = _fit_gaussians(
            y, valid.astype(np.float64), anchor[sl], win, c[sl], A[sl], s[sl], n_iter, s_bounds, A_min)
    return c_out, A_out, s_out, n_valid


def _merge(anchor, c, A, s, ids, d, merge_A):
    """Merge sites closer than ``merge_A`` (connected components), intensity-weighted.

    The merged site keeps the id of its brightest member, the summed integrated intensity and
    the intensity-weighted position and width.
    """
    if len(A) < 2:
        return anchor, c, A, s, ids, 0
    pairs = cKDTree(c * d).query_pairs(merge_A, output_type="ndarray")
    if len(pairs) == 0:
        return anchor, c, A, s, ids, 0
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(A)
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    ncomp, lab = connected_components(graph, directed=False)
    I = A * s ** 3
    wsum = np.bincount(lab, I, ncomp)
    cm = np.stack([np.bincount(lab, I * c[:, k], ncomp) for k in range(3)], 1) / wsum[:, None]
    sm = np.bincount(lab, I * s, ncomp) / wsum
    order = np.lexsort((-I, lab))
    first = order[np.r_[True, lab[order][1:] != lab[order][:-1]]]   # brightest member per component
    single = np.bincount(lab, minlength=ncomp)[lab[first]] == 1
    anchor = np.where(single[:, None], anchor[first], np.rint(cm).astype(np.int64))
    return anchor, cm, wsum / sm ** 3, sm, ids[first], n - ncomp


def trace_atoms(volume, sampling_A=1.0, *, dog_sigmas_vox=(0.5, 1.0), intensity_threshold_frac: float = 0.1,
                intensity_threshold: float | None = None, min_size_vox: float = 1.0, merge_distance_vox: float = 2.25,
                fit_radius_vox: float = 2.2, sigma_init_vox: float = 0.7, sigma_range_vox=(0.25, 1.5),
                max_rounds: int = 12, tol_sites: int = 2, tol_rms_vox: float = 0.005, lm_iterations: int = 4,
                background: str = "zero", min_integrated_frac: float = 0.0) -> TraceResult:
    """Trace atoms in ``volume`` (nz, ny, nx) with voxel size ``sampling_A`` (dz, dy, dx) Å.

    ``intensity_threshold`` (volume units) overrides ``intensity_threshold_frac`` × volume
    maximum as the minimum fitted peak amplitude. ``background="median"`` subtracts the volume
    median first (reconstructions with an offset); ``"zero"`` assumes vacuum is 0, as Ren's
    positivity-constrained potentials. ``min_integrated_frac`` > 0 also removes sites whose
    integrated intensity is below that fraction of the median site's: an extra criterion (not
    Ren's) against narrow noise peaks whose fitted amplitude passes the threshold. See the module
    docstring for the algorithm.
    """
    vol = np.asarray(volume)
    if vol.ndim != 3:
        raise TembenchError(f"atom tracing needs a 3D volume (nz, ny, nx), got shape {vol.shape}")
    if min(vol.shape) < 3:
        raise TembenchError(f"atom tracing needs at least 3 voxels along every axis, got shape {vol.shape}")
    if not np.issubdtype(vol.dtype, np.floating) and not np.issubdtype(vol.dtype, np.integer):
        raise TembenchError(f"atom tracing needs a real-valued volume, got dtype {vol.dtype}")
    vol = vol.astype(np.float64, copy=background != "zero")
    if not np.all(np.isfinite(vol)):
        raise TembenchError("atom tracing: the volume contains NaN or inf; fix the reconstruction "
                            "(or replace non-finite voxels) before tracing")
    if background == "median":
        vol -= np.median(vol)
    elif background != "zero":
        raise TembenchError(f"atom tracing: background must be 'zero' or 'median', got {background!r}")
    if len(dog_sigmas_vox) != 2 or not 0 < dog_sigmas_vox[0] < dog_sigmas_vox[1]:
        raise TembenchError("atom tracing: dog_sigmas_vox must be two widths 0 < σ1 < σ2 (voxels), "
                            f"got {dog_sigmas_vox}")
    lo_vox, hi_vox = sigma_range_vox
    if not 0 < lo_vox <= sigma_init_vox <= hi_vox:
        raise TembenchError(f"atom tracing: need 0 < sigma_range_vox[0] ≤ sigma_init_vox ≤ sigma_range_vox[1], "
                            f"got {sigma_range_vox} and {sigma_init_vox}")
    d = _sampling3(sampling_A)
    dref = voxel_size_A(d)
    shape = vol.shape
    vmax = float(vol.max())
    if vmax <= 0:
        raise TembenchError("atom tracing: the volume has no positive values; atoms must be bright "
                            "(negate the volume, or use background='median' if it has an offset)")
    A_thr = float(intensity_threshold) if intensity_threshold is not None else intensity_threshold_frac * vmax
    A_min = 1e-9 * vmax
    s_init = sigma_init_vox * dref
    s_bounds = (lo_vox * dref, hi_vox * dref)
    cand_thr = 0.5 * _dog_gain(s_init, d, dog_sigmas_vox) * A_thr
    win_fit = _Window(fit_radius_vox * dref, d)
    merge_A = merge_distance_vox * dref
    half_diag = 0.5 * float(np.linalg.norm(d))
    upper = np.asarray(shape) - 0.5
    size = vol.size

    anchor = np.zeros((0, 3), np.int64)      # window centres; moved only when a site drifts > 0.75 voxel
    c = np.zeros((0, 3))
    A = np.zeros(0)
    s = np.zeros(0)
    ids = np.zeros(0, np.int64)
    next_id = 0
    rejected = np.zeros((0, 3))              # lost sites: not re-added, or noise peaks flicker forever
    born = np.zeros((0, 3))                  # voxel where each site id was first detected
    model = np.zeros(size)                   # Σ Gaussians of the sites in `snap`, updated incrementally
    snap = (ids, anchor, c, A, s)
    win_model: _Window | None = None
    hist: dict[str, list[float]] = {k: [] for k in ("n_sites", "n_candidates", "n_added", "n_removed",
                                                     "n_merged", "n_changed", "n_refined", "rms_shift_vox",
                                                     "time_s")}
    converged = False
    rnd = 0
    for rnd in range(1, max_rounds + 1):
        t_round = time.perf_counter()
        # --- model of all current sites: incremental (changed sites only) unless most changed
        need_R = max(win_fit.radius_A, 3.0 * float(s.max()) + half_diag) if len(A) else win_fit.radius_A
        full = win_model is None or need_R > win_model.radius_A
        if not full:
            common, ia, ib = np.intersect1d(ids, snap[0], assume_unique=True, return_indices=True)
            same = (np.all(anchor[ia] == snap[1][ib], 1) & np.all(c[ia] == snap[2][ib], 1)
                    & (A[ia] == snap[3][ib]) & (s[ia] == snap[4][ib]))
            cur = np.ones(len(ids), bool)
            cur[ia[same]] = False
            old = np.ones(len(snap[0]), bool)
            old[ib[same]] = False
            full = cur.sum() + old.sum() > 0.5 * len(ids)
        if full:
            win_model = _Window(1.15 * need_R, d)   # margin: sites widen a little in later rounds
            model[:] = 0.0
            win_model.accumulate(model, shape, anchor, c, A, s)
            active = np.ones(len(A), bool)
        else:
            win_model.accumulate(model, shape, anchor[cur], c[cur], A[cur], s[cur])
            win_model.accumulate(model, shape, snap[1][old], snap[2][old], -snap[3][old], snap[4][old])
            touched = np.concatenate([c[cur], snap[2][old]])
            active = np.zeros(len(A), bool)
            if len(touched):
                # a changed Gaussian reaches the fit windows of sites within this distance
                reach = win_model.radius_A + win_fit.radius_A + 4.0 * half_diag
                dist, _ = cKDTree(touched * d).query(c * d, distance_upper_bound=reach)
                active = np.isfinite(dist)
        snap = (ids.copy(), anchor.copy(), c.copy(), A.copy(), s.copy())

        # --- re-detection on the residual
        resid = vol - model.reshape(shape)
        idx, cpos = _detect(resid, d, dog_sigmas_vox, cand_thr)
        n_cand = len(idx)
        keep = np.ones(n_cand, bool)
        if len(A) and n_cand:
            dist, _ = cKDTree(c * d).query(idx * d, distance_upper_bound=merge_A)
            keep &= ~np.isfinite(dist)
        if len(rejected) and n_cand:
            dist, _ = cKDTree(rejected * d).query(idx * d, distance_upper_bound=0.75 * dref)
            keep &= ~np.isfinite(dist)
        idx, cpos = idx[keep], cpos[keep]
        n_new = len(idx)
        ids_before, c_before = ids.copy(), c.copy()
        anchor = np.concatenate([anchor, idx])
        c = np.concatenate([c, cpos])
        A = np.concatenate([A, np.maximum(resid[tuple(idx.T)], A_thr)])
        s = np.concatenate([s, np.full(n_new, float(np.mean(s)) if len(s) else s_init)])
        ids = np.concatenate([ids, np.arange(next_id, next_id + n_new)])
        next_id += n_new
        is_new = np.r_[np.zeros(len(A) - n_new, bool), np.ones(n_new, bool)]
        active = np.r_[active, np.ones(n_new, bool)]
        ids_start, c_start = ids.copy(), c.copy()
        born = np.concatenate([born, idx])

        # --- neighbour-subtracted refinement of the sites whose surroundings changed
        sel = np.flatnonzero(active)
        n_valid = np.full(len(A), _MIN_VALID_VOXELS, np.int64)
        c1, A1, s1, n_valid[sel] = _refine(resid, anchor[sel], c[sel], A[sel], s[sel], is_new[sel], win_fit,
                                           lm_iterations, s_bounds, A_min)
        del resid
        # negligible updates are dropped so that the site stays identical to the model snapshot
        tiny = ((np.abs(c1 - c[sel]) * d).max(1) < 1e-4 * dref) & (np.abs(A1 - A[sel]) < 1e-4 * A[sel]) \
            & (np.abs(s1 - s[sel]) < 1e-4 * s[sel]) & ~is_new[sel]
        upd = sel[~tiny]
        c[upd], A[upd], s[upd] = c1[~tiny], A1[~tiny], s1[~tiny]
        far = np.abs(c - anchor).max(axis=1) > 0.75
        anchor[far] = np.rint(c[far]).astype(np.int64)

        # --- removal and merging
        good = ((A >= A_thr) & (s * FWHM_PER_SIGMA / dref >= min_size_vox) & (n_valid >= _MIN_VALID_VOXELS)
                & np.all((c >= -0.5) & (c <= upper), axis=1))
        if min_integrated_frac > 0 and good.any():
            integ = A * s ** 3
            good &= integ >= min_integrated_frac * np.median(integ[good])
        n_removed_old = int((~good & ~is_new).sum())
        anchor, c, A, s, ids = anchor[good], c[good], A[good], s[good], ids[good]
        anchor, c, A, s, ids, n_merged = _merge(anchor, c, A, s, ids, d, merge_A)
        # lost sites (removed or merged away) are not re-detected where they were nor where they
        # were first found: otherwise a residual peak that fits onto a neighbour, or fails only
        # once its neighbours see it, is re-added and lost again every other round
        lost = ~np.isin(ids_start, ids, assume_unique=True)
        rejected = np.concatenate([rejected, c_start[lost], born[ids_start[lost]]])

        common, i_after, i_before = np.intersect1d(ids, ids_before, assume_unique=True, return_indices=True)
        n_changed = (len(ids) - len(common)) + (len(ids_before) - len(common))
        if len(common):
            moved = (c[i_after] - c_before[i_before]) * d / dref
            rms = float(np.sqrt(np.mean(np.sum(moved ** 2, axis=1))))
        else:
            rms = float("inf")
        for k, v in (("n_sites", len(A)), ("n_candidates", n_cand), ("n_added", len(ids) - len(common)),
                     ("n_removed", n_removed_old), ("n_merged", n_merged), ("n_changed", n_changed),
                     ("n_refined", len(sel)), ("rms_shift_vox", rms), ("time_s", time.perf_counter() - t_round)):
            hist[k].append(float(v))
        if rnd > 1 and n_changed < tol_sites and rms < tol_rms_vox:
            converged = True
            break
    return TraceResult(positions_vox=c, amplitude=A, sigma_A=s, sampling_A=d, n_rounds=rnd,
                       converged=converged, history=hist)


# --- species ----------------------------------------------------------------------------------
def _gaussian_intersection(m1, s1, w1, m2, s2, w2) -> float:
    """x in [m1, m2] where w1·N(x; m1, s1) = w2·N(x; m2, s2); the midpoint if they do not cross."""
    a = 0.5 / s2 ** 2 - 0.5 / s1 ** 2
    b = m1 / s1 ** 2 - m2 / s2 ** 2
    cc = 0.5 * m2 ** 2 / s2 ** 2 - 0.5 * m1 ** 2 / s1 ** 2 + np.log(w1 * s2 / (w2 * s1))
    if abs(a) < 1e-12 * max(abs(b), 1e-300):
        roots = np.array([-cc / b]) if b != 0 else np.array([])
    else:
        disc = b * b - 4 * a * cc
        roots = np.array([]) if disc < 0 else (-b + np.array([-1.0, 1.0]) * np.sqrt(disc)) / (2 * a)
    inside = roots[(roots >= m1) & (roots <= m2)]
    mid = 0.5 * (m1 + m2)
    return float(inside[np.argmin(np.abs(inside - mid))]) if len(inside) else float(mid)


def _mixture_1d(x: np.ndarray, k: int, random_state: int = 0, n_init: int = 3, tol: float = 1e-7,
                max_iter: int = 1000, reg_var: float = 1e-6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Maximum-likelihood k-component Gaussian mixture of 1-D data ``x`` by EM: (means, sds, weights), means ascending.

    ``x`` should be in units of its standard deviation (``reg_var``, added to every variance as a floor, is
    absolute). Starts: k-means (Lloyd) from the k quantile midpoints, then ``n_init`` − 1 k-means++ seedings drawn
    with ``random_state``; EM from each until the mean log-likelihood changes by < ``tol``; the start with the
    highest likelihood wins. This is scikit-learn's ``GaussianMixture(k, n_init=3)`` for one feature (k-means
    starts, the same variance floor), converged further (its tol is 10⁻³); it replaces it because importing
    scikit-learn (with scipy.stats) took 0.5–1 s per process, paid by every run and every pool worker, against
    milliseconds for the fit (tests/builtin/test_atom_tracing.py compares the two)."""
    n = len(x)
    rng = np.random.default_rng(random_state)
    starts = [np.sort(x)[((np.arange(k) + 0.5) * n / k).astype(np.int64)]]
    for _ in range(n_init - 1):
        c = [x[rng.integers(n)]]
        for _ in range(k - 1):
            d2 = np.min((x[:, None] - np.asarray(c)[None]) ** 2, axis=1)
            c.append(x[rng.choice(n, p=d2 / d2.sum())] if d2.sum() > 0 else x[rng.integers(n)])
        starts.append(np.sort(np.asarray(c)))
    best = None
    for c in starts:
        for _ in range(300):                            # Lloyd's k-means: the hard assignment EM starts from
            lab = np.argmin(np.abs(x[:, None] - c[None]), axis=1)
            new = np.array([x[lab == j].mean() if np.any(lab == j) else c[j] for j in range(k)])
            if np.array_equal(new, c):
                break
            c = new
        resp = np.zeros((n, k))
        resp[np.arange(n), lab] = 1.0
        ll_old = -np.inf
        for _ in range(max_iter):
            nk = resp.sum(axis=0) + 10 * np.finfo(np.float64).eps
            m = resp.T @ x / nk
            var = np.einsum("nk,nk->k", resp, (x[:, None] - m) ** 2) / nk + reg_var
            w = nk / n
            logp = np.log(w) - 0.5 * np.log(2 * np.pi * var) - 0.5 * (x[:, None] - m) ** 2 / var
            top = logp.max(axis=1, keepdims=True)
            lse = top[:, 0] + np.log(np.exp(logp - top).sum(axis=1))
            ll = float(lse.mean())
            resp = np.exp(logp - lse[:, None])
            if abs(ll - ll_old) < tol:
                break
            ll_old = ll
        if best is None or ll > best[0]:
            best = (ll, m, np.sqrt(var), w)
    _, m, sd, w = best
    order = np.argsort(m, kind="stable")
    return m[order], sd[order], w[order]


def classify_species(intensity, n_species: int, random_state: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Classes 0..K-1 (dimmest to brightest) from a K-component Gaussian mixture of ``intensity``.

    Thresholds (K-1,) are the intersections of adjacent weighted components (Ren 2020 §2.6 for
    K = 2); the mixture is fitted by :func:`_mixture_1d`. Returns (labels, thresholds).
    """
    x = np.asarray(intensity, np.float64).reshape(-1)
    if n_species < 1:
        raise TembenchError(f"classify_species: n_species must be ≥ 1, got {n_species}")
    if n_species == 1:
        return np.zeros(len(x), np.int64), np.zeros(0)
    if len(np.unique(x)) < 2 * n_species:
        raise TembenchError(f"classify_species: {len(x)} sites cannot be split into {n_species} species; "
                            "need at least two distinct intensities per species")
    scale = float(np.std(x)) or 1.0        # the variance floor is absolute: work in units of std
    m, sd, w = _mixture_1d(x / scale, n_species, random_state)
    m, sd = m * scale, sd * scale
    thr = np.array([_gaussian_intersection(m[k], sd[k], w[k], m[k + 1], sd[k + 1], w[k + 1])
                    for k in range(n_species - 1)])
    thr = np.maximum.accumulate(thr)
    return np.searchsorted(thr, x, side="right").astype(np.int64), thr


# --- matching ---------------------------------------------------------------------------------
def match_sites(true_pos, traced_pos, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matching of traced to true positions within ``radius`` (same units).

    Maximum number of pairs, then minimum total squared distance: the bipartite graph of pairs
    within ``radius`` is split into connected components; single-edge components are matched
    directly and the rest by ``linear_sum_assignment`` with a prohibitive cost for non-edges.
    Returns index arrays (i_true, i_traced), sorted by i_true.
    """
    from scipy.optimize import linear_sum_assignment
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    t = np.asarray(true_pos, np.float64).reshape(-1, 3)
    q = np.asarray(traced_pos, np.float64).reshape(-1, 3)
    empty = np.zeros(0, np.int64)
    if len(t) == 0 or len(q) == 0:
        return empty, empty.copy()
    e = cKDTree(t).sparse_distance_matrix(cKDTree(q), radius, output_type="ndarray")
    if len(e) == 0:
        return empty, empty.copy()
    rows, cols, dist = e["i"].astype(np.int64), e["j"].astype(np.int64), e["v"]
    nt, nq = len(t), len(q)
    g = coo_matrix((np.ones(len(rows)), (rows, nt + cols)), shape=(nt + nq, nt + nq))
    _, lab = connected_components(g, directed=False)
    comp = lab[rows]
    n_edges = np.bincount(comp)
    single = n_edges[comp] == 1
    out_t, out_q = [rows[single]], [cols[single]]
    multi = np.flatnonzero(~single)
    if len(multi):
        multi = multi[np.argsort(comp[multi], kind="stable")]
        bounds = np.flatnonzero(np.diff(comp[multi])) + 1
        for grp in np.split(multi, bounds):        # only ambiguous clusters: few and small
            ut, rt = np.unique(rows[grp], return_inverse=True)
            uq, rq = np.unique(cols[grp], return_inverse=True)
            big = 2.0 * (min(len(ut), len(uq)) + 1) * radius ** 2 + 1.0
            cost = np.full((len(ut), len(uq)), big)
            cost[rt, rq] = dist[grp] ** 2
            a, b = linear_sum_assignment(cost)
            ok = cost[a, b] < big
            out_t.append(ut[a[ok]])
            out_q.append(uq[b[ok]])
    it, iq = np.concatenate(out_t), np.concatenate(out_q)
    order = np.argsort(it, kind="stable")
    return it[order], iq[order]
