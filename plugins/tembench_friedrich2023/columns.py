"""StatSTEM-style column fitting of ADF-STEM images (Friedrich 2023 eqs 2.19–2.20, 2.25–2.29).

Model (eq 2.19): every atomic column n is a round 2D Gaussian of height η_n, width ρ_n (per
column, or one common width) and position (β_x, β_y) on a constant (or planar) background ζ:

    f(x, y) = ζ [+ g_x (x − x̄) + g_y (y − ȳ)] + Σ_n η_n exp(−((x − β_xn)² + (y − β_yn)²) / (2ρ_n²))

All columns are fitted at once. Each Gaussian is evaluated only in a window of ±``window_sigmas``·ρ
around its column (truncation error exp(−k²/2): 4e-6 of the height at k = 5), so the Jacobian is
sparse: a few hundred pixels × 4 parameters per column plus the dense background columns.
Levenberg–Marquardt (Marquardt's diagonal scaling) then solves the sparse normal equations
(JᵀWJ + μ diag JᵀWJ) δ = JᵀW r with a sparse LU each iteration. ``loss="lsq"`` is StatSTEM's
unweighted least squares (W = 1); ``loss="poisson"`` is the Poisson maximum-likelihood estimator by
Fisher scoring (W = 1/λ, r = y − λ; the image must be in electron counts, λ = f > 0).

Coordinates are Å in the sample frame: pixel (i, j) is at y = origin_y + i·s_y, x = origin_x + j·s_x.
SCS (eq 2.20) is the volume under a column's Gaussian, 2π η ρ² (image units × Å²), or the
background-subtracted intensity integrated over the column's Voronoi cell (image units × Å²).

The Cramér–Rao lower bound (eqs 2.25–2.29) uses the same model and Jacobian: with λ = α f the
expected electron counts (α electrons per image unit), the Fisher matrix is
F = α Σ_k (∂f_k/∂θ_r)(∂f_k/∂θ_s)/f_k, CRLB = diag F⁻¹, and var SCS_n = ∇SCS_n F⁻¹ ∇SCS_nᵀ.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import splu

from tembench.errors import TembenchError

# parameter kinds per column, in the order they are stored in θ
_X, _Y, _H, _S = 0, 1, 2, 3


@dataclass(frozen=True)
class ImageGrid:
    """Pixel (i, j) of an image of ``shape`` (ny, nx) lies at (origin_y + i·s_y, origin_x + j·s_x) Å."""

    shape: tuple[int, int]
    sampling_A: tuple[float, float] = (1.0, 1.0)
    origin_A: tuple[float, float] = (0.0, 0.0)

    @property
    def pixel_area_A2(self) -> float:
        return float(self.sampling_A[0] * self.sampling_A[1])

    def coords(self) -> tuple[np.ndarray, np.ndarray]:
        """(y, x) coordinates (Å) of every pixel, flattened C-order."""
        ny, nx = self.shape
        y = self.origin_A[0] + self.sampling_A[0] * np.arange(ny)
        x = self.origin_A[1] + self.sampling_A[1] * np.arange(nx)
        yy, xx = np.meshgrid(y, x, indexing="ij")
        return yy.ravel(), xx.ravel()

    @property
    def centre_A(self) -> tuple[float, float]:
        ny, nx = self.shape
        return (self.origin_A[0] + 0.5 * (ny - 1) * self.sampling_A[0],
                self.origin_A[1] + 0.5 * (nx - 1) * self.sampling_A[1])


@dataclass
class ColumnModel:
    """Parameters of eq 2.19. ``sigma_A`` is per column (equal values when the width is common)."""

    x_A: np.ndarray
    y_A: np.ndarray
    height: np.ndarray
    sigma_A: np.ndarray
    background: np.ndarray                      # (ζ,) or (ζ, g_x per Å, g_y per Å) about the image centre
    common_width: bool = False

    def __post_init__(self):
        self.x_A = np.asarray(self.x_A, np.float64).ravel()
        self.y_A = np.asarray(self.y_A, np.float64).ravel()
        n = len(self.x_A)
        self.height = np.broadcast_to(np.asarray(self.height, np.float64), (n,)).copy()
        self.sigma_A = np.broadcast_to(np.asarray(self.sigma_A, np.float64), (n,)).copy()
        self.background = np.atleast_1d(np.asarray(self.background, np.float64)).copy()
        if len(self.y_A) != n:
            raise TembenchError(f"ColumnModel: {n} x positions but {len(self.y_A)} y positions")
        if len(self.background) not in (1, 3):
            raise TembenchError("ColumnModel.background is (ζ,) or (ζ, g_x, g_y)")

    def __len__(self) -> int:
        return len(self.x_A)

    @property
    def n_params(self) -> int:
        n = len(self)
        return (3 * n + 1 if self.common_width else 4 * n) + len(self.background)

    @property
    def scs(self) -> np.ndarray:
        """Eq 2.20: volume under each Gaussian, 2π η ρ² (image units × Å²)."""
        return 2.0 * np.pi * self.height * self.sigma_A ** 2

    # θ layout: per-column blocks (x, y, η[, ρ]), then [common ρ], then background
    def theta(self) -> np.ndarray:
        n = len(self)
        if self.common_width:
            cols = np.stack([self.x_A, self.y_A, self.height], 1).ravel()
            return np.concatenate([cols, [self.sigma_A[0] if n else 1.0], self.background])
        cols = np.stack([self.x_A, self.y_A, self.height, self.sigma_A], 1).ravel()
        return np.concatenate([cols, self.background])

    def with_theta(self, theta: np.ndarray) -> ColumnModel:
        n = len(self)
        k = 3 if self.common_width else 4
        blk = theta[:k * n].reshape(n, k)
        sig = np.full(n, theta[k * n]) if self.common_width else blk[:, 3]
        nb = len(self.background)
        return ColumnModel(blk[:, 0], blk[:, 1], blk[:, 2], sig, theta[-nb:], self.common_width)

    def index(self, kind: int) -> np.ndarray:
        """θ index of parameter ``kind`` (_X, _Y, _H, _S) of every column."""
        n = len(self)
        k = 3 if self.common_width else 4
        if kind == _S and self.common_width:
            return np.full(n, k * n)
        return np.arange(n) * k + kind

    def image(self, grid: ImageGrid, window_sigmas: float = 5.0) -> np.ndarray:
        return _Evaluator(grid, window_sigmas).model(self).reshape(grid.shape)


class _Evaluator:
    """Model values and the sparse Jacobian of eq 2.19 on one image grid."""

    def __init__(self, grid: ImageGrid, window_sigmas: float = 5.0):
        self.grid = grid
        self.k = float(window_sigmas)
        self.yy, self.xx = grid.coords()
        self.npix = grid.shape[0] * grid.shape[1]
        cy, cx = grid.centre_A
        self.bg_basis = np.stack([np.ones(self.npix), self.xx - cx, self.yy - cy], 1)

    def _windows(self, m: ColumnModel):
        """Flat pixel indices (N, P) of each column's window and the validity mask."""
        g = self.grid
        sy, sx = g.sampling_A
        smax = float(np.max(m.sigma_A)) if len(m) else 1.0
        ry = max(1, int(math.ceil(self.k * smax / sy)))
        rx = max(1, int(math.ceil(self.k * smax / sx)))
        di, dj = np.meshgrid(np.arange(-ry, ry + 1), np.arange(-rx, rx + 1), indexing="ij")
        keep = (di * sy) ** 2 + (dj * sx) ** 2 <= (self.k * smax) ** 2 + 1e-12   # round window
        di, dj = di[keep], dj[keep]
        ci = np.rint((m.y_A - g.origin_A[0]) / sy).astype(np.int64)
        cj = np.rint((m.x_A - g.origin_A[1]) / sx).astype(np.int64)
        ii = ci[:, None] + di[None, :]
        jj = cj[:, None] + dj[None, :]
        valid = (ii >= 0) & (ii < g.shape[0]) & (jj >= 0) & (jj < g.shape[1])
        flat = np.where(valid, ii * g.shape[1] + jj, 0)
        return flat, valid

    def _gauss(self, m: ColumnModel):
        flat, valid = self._windows(m)
        dx = self.xx[flat] - m.x_A[:, None]
        dy = self.yy[flat] - m.y_A[:, None]
        r2 = dx * dx + dy * dy
        s2 = (m.sigma_A ** 2)[:, None]
        g = np.exp(-0.5 * r2 / s2) * valid
        return flat, valid, dx, dy, r2, g

    def background(self, m: ColumnModel) -> np.ndarray:
        return self.bg_basis[:, :len(m.background)] @ m.background

    def model(self, m: ColumnModel, parts=None) -> np.ndarray:
        if parts is None:
            parts = self._gauss(m)
        flat, valid, _, _, _, g = parts
        f = self.background(m)
        if len(m):
            f = f + np.bincount(flat[valid], weights=(m.height[:, None] * g)[valid], minlength=self.npix)
        return f

    def model_and_jacobian(self, m: ColumnModel, dense: bool = False):
        """f (npix,) and J (npix × n_params; CSC, or a dense array if ``dense``) of eq 2.19 at ``m``."""
        parts = self._gauss(m)
        flat, valid, dx, dy, r2, g = parts
        f = self.model(m, parts)
        hg = m.height[:, None] * g
        s = m.sigma_A[:, None]
        derivs = {_X: hg * dx / s ** 2, _Y: hg * dy / s ** 2, _H: g, _S: hg * r2 / s ** 3}
        rr = flat[valid]
        nb = len(m.background)
        off = m.n_params - nb
        if dense:
            J = np.zeros((self.npix, m.n_params))
            for kind, d in derivs.items():
                idx = np.broadcast_to(m.index(kind)[:, None], flat.shape)[valid]
                np.add.at(J, (rr, idx), d[valid])
            J[:, off:] = self.bg_basis[:, :nb]
            return f, J
        rows, cols, vals = [], [], []
        for kind, d in derivs.items():
            idx = np.broadcast_to(m.index(kind)[:, None], flat.shape)[valid]
            rows.append(rr)
            cols.append(idx)
            vals.append(d[valid])
        for b in range(nb):
            rows.append(np.arange(self.npix))
            cols.append(np.full(self.npix, off + b))
            vals.append(self.bg_basis[:, b])
        J = sp.csc_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                          shape=(self.npix, m.n_params))
        return f, J


@dataclass
class FitResult:
    model: ColumnModel
    loss: str
    cost: float
    n_iter: int
    converged: bool
    time_s: float
    history: list[float] = field(default_factory=list)


def _cost(y: np.ndarray, f: np.ndarray, loss: str) -> float:
    if loss == "lsq":
        r = y - f
        return 0.5 * float(r @ r)
    if np.any(f <= 0):
        return math.inf
    pos = y > 0
    return float(np.sum(f) - np.sum(y[pos] * np.log(f[pos])))   # −log L up to a constant


def fit_columns(image: np.ndarray, grid: ImageGrid | None = None, x_A=None, y_A=None, *,
                sigma_init_A: float | np.ndarray | None = None, common_width: bool = False,
                background: Literal["constant", "planar"] = "constant", loss: Literal["lsq", "poisson"] = "lsq",
                window_sigmas: float = 5.0, max_iter: int = 100, rtol: float = 1e-9,
                max_shift_A: float | None = None, sigma_bounds_A: tuple[float, float] | None = None,
                init: ColumnModel | None = None, nonnegative: bool = False) -> FitResult:
    """Fit eq 2.19 to ``image`` (ny, nx) from initial column positions (Å, sample frame).

    ``sigma_init_A``: starting width(s); default 0.3 × the median nearest-neighbour distance
    (one column: from the image's second moment). Heights and background start from the exact
    linear least-squares solution at the starting positions and widths. ``max_shift_A`` limits
    how far a column may move from its start (default 0.5 × the nearest-neighbour distance) and
    columns stay on the image; widths stay within ``sigma_bounds_A`` (default max(0.02 × the
    nearest-neighbour distance, half a pixel) … the nearest-neighbour distance). ``nonnegative``
    keeps heights and the constant background ≥ 0 (a physically valid model: no column or
    background takes electrons away), e.g. for the model a Cramér–Rao bound is evaluated at.
    """
    t0 = time.perf_counter()
    y = np.asarray(image, np.float64)
    if y.ndim != 2:
        raise TembenchError(f"fit_columns needs a 2D image, got shape {y.shape}")
    if not np.all(np.isfinite(y)):
        raise TembenchError("fit_columns: the image contains NaN or inf pixels; mask or repair them first")
    grid = grid or ImageGrid(y.shape)
    if tuple(grid.shape) != y.shape:
        raise TembenchError(f"fit_columns: grid shape {grid.shape} ≠ image shape {y.shape}")
    if loss not in ("lsq", "poisson"):
        raise TembenchError(f"fit_columns: loss {loss!r} is not 'lsq' or 'poisson'")
    yv = y.ravel()
    ev = _Evaluator(grid, window_sigmas)
    if init is None:
        if x_A is None or y_A is None:
            raise TembenchError("fit_columns needs initial positions x_A, y_A (or init=ColumnModel)")
        x0 = np.asarray(x_A, np.float64).ravel()
        y0 = np.asarray(y_A, np.float64).ravel()
        nn = nearest_neighbour_distance(x0, y0)
        if sigma_init_A is None:
            if np.isfinite(nn):
                sigma_init_A = 0.3 * nn
            else:
                sigma_init_A = _moment_width(y, grid, x0, y0)
        nb = 1 if background == "constant" else 3
        bg0 = np.zeros(nb)
        bg0[0] = float(np.percentile(yv, 5))
        m = ColumnModel(x0, y0, 0.0, sigma_init_A, bg0, common_width)
        if common_width:
            m.sigma_A[:] = float(np.mean(m.sigma_A))
        m = _linear_heights(ev, m, yv)
    else:
        m = init
        x0, y0 = m.x_A.copy(), m.y_A.copy()
        nn = nearest_neighbour_distance(x0, y0)
    scale = nn if np.isfinite(nn) else 10.0 * float(np.max(m.sigma_A))
    if max_shift_A is None:
        max_shift_A = 0.5 * scale
    # a width below half a pixel is not resolved: edge columns otherwise collapse into spikes
    px = min(grid.sampling_A)
    lo_s, hi_s = sigma_bounds_A if sigma_bounds_A is not None else (max(0.02 * scale, 0.5 * px), max(scale, px))
    ylo, xlo = grid.origin_A[0] - 0.5 * grid.sampling_A[0], grid.origin_A[1] - 0.5 * grid.sampling_A[1]
    yhi = ylo + grid.shape[0] * grid.sampling_A[0]
    xhi = xlo + grid.shape[1] * grid.sampling_A[1]

    def project(theta):
        mm = m.with_theta(theta)
        dxs, dys = mm.x_A - x0, mm.y_A - y0
        d = np.hypot(dxs, dys)
        far = d > max_shift_A
        if np.any(far):
            f = max_shift_A / d[far]
            mm.x_A[far] = x0[far] + dxs[far] * f
            mm.y_A[far] = y0[far] + dys[far] * f
        np.clip(mm.sigma_A, lo_s, hi_s, out=mm.sigma_A)
        np.clip(mm.x_A, xlo, xhi, out=mm.x_A)       # a column stays on the image
        np.clip(mm.y_A, ylo, yhi, out=mm.y_A)
        if nonnegative:
            np.maximum(mm.height, 0.0, out=mm.height)
            mm.background[0] = max(mm.background[0], 0.0)
        return mm

    if loss == "poisson":
        # the least-squares start can dip to ≤ 0 between columns; λ must be > 0 for the likelihood
        m.height = np.maximum(m.height, 1e-3 * max(float(np.max(m.height)), 1e-12))
        fmin = float(np.min(ev.model(m)))
        floor = 1e-3 * max(float(np.mean(yv)), 1e-12)
        if fmin < floor:
            m.background[0] += floor - fmin
    f, J = ev.model_and_jacobian(m)
    cost = _cost(yv, f, loss)
    if not np.isfinite(cost):
        raise TembenchError("fit_columns(loss='poisson'): the starting model is not positive everywhere; "
                            "the image must be in electron counts with a positive background")
    mu = 1e-3
    history = [cost]
    converged = False
    it = 0
    dense = m.n_params <= _DENSE_PARAMS
    if dense:
        f, J = ev.model_and_jacobian(m, dense=True)
    for it in range(1, max_iter + 1):
        r = yv - f
        if dense:
            Jw = J if loss == "lsq" else J / f[:, None]
            A = Jw.T @ J
            g = Jw.T @ r
        else:
            if loss == "lsq":
                Jw = J
            else:
                Jw = J.copy()
                Jw.data = Jw.data / f[Jw.indices]        # W = 1/λ on the rows (CSC: indices are rows)
            A = (Jw.T @ J).tocsc()
            g = Jw.T @ r
        d = A.diagonal().copy()
        d[d <= 0] = 1.0
        accepted = False
        for _ in range(30):
            try:
                step = _solve_damped(A, d, mu, g, dense)
            except (RuntimeError, np.linalg.LinAlgError):
                mu *= 10.0
                continue
            m_new = project(m.theta() + step)
            f_new = ev.model(m_new)
            c_new = _cost(yv, f_new, loss)
            if c_new <= cost:
                accepted = True
                break
            mu *= 10.0
        if not accepted:
            converged = True            # no descent direction left: at a (local) minimum to precision
            break
        # least squares: relative decrease below rtol; Poisson: −ln L decreases by < 1e-6 (statistically nil)
        done = ((cost - c_new) / max(abs(cost), 1e-300) < rtol) if loss == "lsq" else (cost - c_new < 1e-6)
        m, cost = m_new, c_new
        history.append(cost)
        mu = max(mu / 10.0, 1e-12)
        f, J = ev.model_and_jacobian(m, dense=dense)
        if done:
            converged = True
            break
    return FitResult(m, loss, cost, it, converged, time.perf_counter() - t0, history)


_DENSE_PARAMS = 24      # up to this many parameters dense normal equations beat sparse overheads


def _solve_damped(A, d, mu, g, dense):
    """Solve (A + μ diag d) δ = g (Marquardt damping)."""
    if dense:
        M = A.copy()
        M[np.diag_indices_from(M)] += mu * d
        return np.linalg.solve(M, g)
    M = A.copy()
    M.setdiag(A.diagonal() + mu * d)
    return _spd_lu(M).solve(g)


def _spd_lu(M):
    """Sparse LU of a symmetric positive-definite matrix: minimum-degree ordering on AᵀA+A, no pivoting
    (5–10× faster than the default COLAMD with partial pivoting on these normal equations)."""
    return splu(M.tocsc(), permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0, options={"SymmetricMode": True})


def _linear_heights(ev: _Evaluator, m: ColumnModel, yv: np.ndarray) -> ColumnModel:
    """Exact least-squares heights and background at fixed positions and widths."""
    f, J = ev.model_and_jacobian(m)
    free = np.concatenate([m.index(_H), np.arange(m.n_params - len(m.background), m.n_params)])
    Js = J[:, free]
    A = (Js.T @ Js).tocsc()
    step = _solve_damped(A if A.shape[0] > _DENSE_PARAMS else A.toarray(), np.ones(A.shape[0]),
                         1e-12 * max(A.diagonal().max(), 1.0), Js.T @ (yv - f), A.shape[0] <= _DENSE_PARAMS)
    theta = m.theta()
    theta[free] += step
    return m.with_theta(theta)


def _moment_width(img, grid, x0, y0) -> float:
    yy, xx = grid.coords()
    w = np.clip(img.ravel() - np.percentile(img, 5), 0, None)
    if w.sum() <= 0:
        return 2.0 * max(grid.sampling_A)
    r2 = (xx - x0[0]) ** 2 + (yy - y0[0]) ** 2
    return float(np.sqrt(0.5 * (w * r2).sum() / w.sum()))


def nearest_neighbour_distance(x_A, y_A) -> float:
    """Median nearest-neighbour distance of the columns (Å); inf for fewer than two."""
    x, y = np.asarray(x_A, float), np.asarray(y_A, float)
    if len(x) < 2:
        return math.inf
    from scipy.spatial import cKDTree

    d, _ = cKDTree(np.stack([x, y], 1)).query(np.stack([x, y], 1), k=2)
    return float(np.median(d[:, 1]))


# --- initial positions -------------------------------------------------------------------------
def find_columns(image: np.ndarray, grid: ImageGrid | None = None, min_distance_A: float = 1.0,
                 smooth_A: float = 0.3, threshold_rel: float = 0.2, border_A: float = 0.0):
    """Column positions (x_A, y_A) from local maxima of the Gaussian-smoothed image (skimage)."""
    from scipy.ndimage import gaussian_filter
    from skimage.feature import peak_local_max

    img = np.asarray(image, np.float64)
    grid = grid or ImageGrid(img.shape)
    sy, sx = grid.sampling_A
    if smooth_A > 0:
        img = gaussian_filter(img, (smooth_A / sy, smooth_A / sx), mode="nearest")
    md = max(1, int(round(min_distance_A / max(sy, sx))))
    lo = float(img.min())
    pk = peak_local_max(img - lo, min_distance=md, threshold_rel=threshold_rel, exclude_border=False)
    yA = grid.origin_A[0] + pk[:, 0] * sy
    xA = grid.origin_A[1] + pk[:, 1] * sx
    if border_A > 0:
        ny, nx = grid.shape
        keep = ((yA >= grid.origin_A[0] + border_A) & (yA <= grid.origin_A[0] + (ny - 1) * sy - border_A)
                & (xA >= grid.origin_A[1] + border_A) & (xA <= grid.origin_A[1] + (nx - 1) * sx - border_A))
        xA, yA = xA[keep], yA[keep]
    order = np.lexsort((xA, yA))
    return xA[order], yA[order]


# --- SCS -----------------------------------------------------------------------------------------
def scs_voronoi(image: np.ndarray, grid: ImageGrid, model: ColumnModel, max_radius_A: float | None = None,
                subtract_background: bool = True) -> np.ndarray:
    """Integrated intensity of each column's Voronoi cell (image units × Å²), background removed.

    Pixels are assigned to the nearest column (within ``max_radius_A`` if given); cells cut by the
    image edge are incomplete and their SCS too small — exclude border columns when scoring.
    """
    from scipy.spatial import cKDTree

    if len(model) == 0:
        return np.zeros(0)
    yy, xx = grid.coords()
    v = np.asarray(image, np.float64).ravel()
    if subtract_background:
        v = v - _Evaluator(grid).background(model)
    ub = np.inf if max_radius_A is None else max_radius_A
    _, owner = cKDTree(np.stack([model.x_A, model.y_A], 1)).query(np.stack([xx, yy], 1), distance_upper_bound=ub)
    ok = owner < len(model)
    return np.bincount(owner[ok], weights=v[ok], minlength=len(model)) * grid.pixel_area_A2


# --- Cramér–Rao lower bound ----------------------------------------------------------------------
def fisher_information(model: ColumnModel, grid: ImageGrid, electrons_per_unit: float,
                       window_sigmas: float = 6.0, floor_counts: float = 1e-9) -> sp.csc_matrix:
    """Eq 2.27: F_rs = Σ_k (∂λ_k/∂θ_r)(∂λ_k/∂θ_s)/λ_k with λ = α f (α electrons per image unit).

    λ is floored at ``floor_counts`` electrons: with a zero background the background's information
    is unbounded (a pixel that cannot receive electrons), which the floor keeps finite.
    """
    if not electrons_per_unit > 0 or not np.isfinite(electrons_per_unit):
        raise TembenchError(f"fisher_information needs a finite positive number of electrons per image unit, "
                            f"got {electrons_per_unit}")
    ev = _Evaluator(grid, window_sigmas)
    f, J = ev.model_and_jacobian(model)
    lam = np.maximum(electrons_per_unit * f, floor_counts)
    if np.any(electrons_per_unit * f < -1e-12 * np.max(np.abs(f)) * electrons_per_unit):
        raise TembenchError("fisher_information: the model has negative expected counts; a Poisson model needs "
                            "f ≥ 0 everywhere (check the background)")
    w = electrons_per_unit ** 2 / lam
    return (J.T @ (sp.diags(w) @ J)).tocsc()


@dataclass
class CRLB:
    """Cramér–Rao lower bounds (variances) per column: positions (Å²), height, width (Å²), SCS (eq 2.28)."""

    var_x_A2: np.ndarray
    var_y_A2: np.ndarray
    var_height: np.ndarray
    var_sigma_A2: np.ndarray
    var_scs: np.ndarray
    var_background: np.ndarray
    fisher: sp.csc_matrix


def inverse_entries(F: sp.spmatrix, rows: np.ndarray, cols: np.ndarray, dense_limit: int = 1500) -> np.ndarray:
    """Entries (F⁻¹)[rows[i], cols[i]] of a symmetric positive-definite F."""
    n = F.shape[0]
    rows, cols = np.asarray(rows), np.asarray(cols)
    # Jacobi scaling: the parameters' units differ by orders of magnitude (Å, counts, Å², background)
    dg = np.asarray(F.diagonal(), np.float64)
    if np.any(~np.isfinite(dg)) or np.any(dg <= 0):
        raise TembenchError("CRLB: a parameter has no Fisher information (a column entirely off the image or "
                            "of zero height); drop it from the model")
    sc = 1.0 / np.sqrt(dg)
    F = sp.csc_matrix(sp.diags(sc) @ F @ sp.diags(sc))
    rows_sc = sc[rows] * sc[cols]
    if n <= dense_limit:
        from scipy.linalg import cho_factor, cho_solve

        Fd = F.toarray()
        try:
            inv = cho_solve(cho_factor(Fd), np.eye(n))
        except np.linalg.LinAlgError as exc:
            raise TembenchError("CRLB: the Fisher matrix is singular (parameters the data cannot tell apart: "
                                "two columns on top of each other, or a column mostly off the image)") from exc
        return inv[rows, cols] * rows_sc
    lu = _spd_lu(F)
    out = np.empty(len(rows))
    ucols, inv_idx = np.unique(cols, return_inverse=True)
    for start in range(0, len(ucols), 256):
        chunk = ucols[start:start + 256]
        E = np.zeros((n, len(chunk)))
        E[chunk, np.arange(len(chunk))] = 1.0
        X = lu.solve(E)
        sel = (inv_idx >= start) & (inv_idx < start + len(chunk))
        out[sel] = X[rows[sel], inv_idx[sel] - start]
    return out * rows_sc


def crlb(model: ColumnModel, grid: ImageGrid, electrons_per_unit: float, window_sigmas: float = 6.0,
         method: Literal["auto", "exact", "local"] = "auto", local_radius_nn: float = 3.0) -> CRLB:
    """CRLB of every column's position, height, width and SCS (eqs 2.25–2.29), full model with background.

    ``exact`` inverts the whole Fisher matrix (dense up to 1500 parameters, else sparse LU solves:
    ~20 s for 1000 columns). ``local`` inverts, for tiles of columns, the Fisher matrix restricted
    to the columns within ``local_radius_nn`` nearest-neighbour distances plus the global
    parameters, whose information from all other columns is kept exactly (a Schur complement):
    only the direct coupling to columns farther away is dropped, which is of the order of their
    Gaussians' overlap and its propagation along chains of neighbours (< 3e-4 relative at 3 nn in the
    tests). ``auto``: exact up to 1500 parameters, else local.
    """
    F = fisher_information(model, grid, electrons_per_unit, window_sigmas)
    n = len(model)
    ix, iy, ih, isg = (model.index(k) for k in (_X, _Y, _H, _S))
    nb = len(model.background)
    ib = np.arange(model.n_params - nb, model.n_params)
    if method == "auto":
        method = "exact" if model.n_params <= 1500 else "local"
    if method == "exact" or n < 2:
        rows = np.concatenate([ix, iy, ih, isg, ih, ib])
        cols = np.concatenate([ix, iy, ih, isg, isg, ib])
        e = inverse_entries(F, rows, cols)
        vx, vy, vh, vs, chs = (e[i * n:(i + 1) * n] for i in range(5))
        vb = e[5 * n:]
    elif method == "local":
        vx, vy, vh, vs, chs, vb = _local_inverse(model, F, local_radius_nn)
    else:
        raise TembenchError(f"crlb: method {method!r} is not 'auto', 'exact' or 'local'")
    # eq 2.29: ∂SCS/∂ρ = 4π η ρ, ∂SCS/∂η = 2π ρ²
    gs = 4.0 * np.pi * model.height * model.sigma_A
    gh = 2.0 * np.pi * model.sigma_A ** 2
    vscs = gs * gs * vs + 2.0 * gs * gh * chs + gh * gh * vh
    return CRLB(vx, vy, vh, vs, vscs, vb, F)


def _local_inverse(model: ColumnModel, F: sp.spmatrix, radius_nn: float):
    """Diagonal blocks of F⁻¹ per column from neighbourhood-restricted Fisher matrices (see :func:`crlb`).

    The global parameters (background, common width) couple every column; what the columns outside
    a neighbourhood R contribute to them is kept exactly by a Schur complement, F_gR F_RR⁻¹ F_Rg =
    S_all − S_L with S = F_gc F_cc⁻¹ F_cg (one sparse solve with a few right-hand sides).
    """
    from scipy.linalg import cho_factor, cho_solve
    from scipy.spatial import cKDTree

    n = len(model)
    k = 3 if model.common_width else 4
    nc = k * n
    F = F.tocsc()
    Fcc, Fcg, Fgg = F[:nc, :nc], F[:nc, nc:].toarray(), F[nc:, nc:].toarray()
    s_all = Fcg.T @ _spd_lu(Fcc).solve(Fcg)
    nn = nearest_neighbour_distance(model.x_A, model.y_A)
    xy = np.stack([model.x_A, model.y_A], 1)
    t_idx = np.floor((xy - xy.min(0)) / (2.0 * nn)).astype(np.int64)
    keys, owner = np.unique(t_idx, axis=0, return_inverse=True)
    owner = owner.ravel()
    tree = cKDTree(xy)
    F = F.tocsr()
    out = np.full((5, n), np.nan)
    vb = None
    for t in range(len(keys)):
        members = np.flatnonzero(owner == t)
        centre = xy[members].mean(0)
        reach = np.max(np.hypot(*(xy[members] - centre).T)) + radius_nn * nn
        hood = np.array(sorted(tree.query_ball_point(centre, reach)))
        Lc = (hood[:, None] * k + np.arange(k)[None, :]).ravel()
        FLL = F[Lc][:, Lc].toarray()
        FLg = Fcg[Lc]
        try:
            s_L = FLg.T @ cho_solve(cho_factor(FLL), FLg)
            M = np.block([[FLL, FLg], [FLg.T, Fgg - (s_all - s_L)]])
            d = np.sqrt(np.diag(M))
            inv = cho_solve(cho_factor(M / d[:, None] / d[None, :]), np.eye(len(M))) / d[:, None] / d[None, :]
        except np.linalg.LinAlgError as exc:
            raise TembenchError("CRLB: a local Fisher matrix is singular (columns on top of each other, or a "
                                "column mostly off the image)") from exc
        pos = {c: i for i, c in enumerate(hood)}
        for c in members:
            b = pos[c] * k
            s_i = b + 3 if not model.common_width else len(Lc)
            out[0, c], out[1, c], out[2, c] = inv[b, b], inv[b + 1, b + 1], inv[b + 2, b + 2]
            out[3, c], out[4, c] = inv[s_i, s_i], inv[b + 2, s_i]
        if vb is None:
            vb = np.diag(inv)[-len(model.background):].copy()
    return out[0], out[1], out[2], out[3], out[4], vb


def lsq_covariance(model: ColumnModel, grid: ImageGrid, electrons_per_unit: float,
                   window_sigmas: float = 6.0) -> np.ndarray:
    """Asymptotic covariance of the unweighted least-squares estimator under Poisson noise (dense, small models).

    Sandwich (JᵀJ)⁻¹ Jᵀ diag(var y) J (JᵀJ)⁻¹ with var y = f/α in image units; ≥ F⁻¹ (Gauss–Markov).
    """
    ev = _Evaluator(grid, window_sigmas)
    f, J = ev.model_and_jacobian(model)
    Jd = J.toarray()
    A = np.linalg.inv(Jd.T @ Jd)
    B = Jd.T @ (Jd * (np.maximum(f, 0) / electrons_per_unit)[:, None])
    return A @ B @ A
